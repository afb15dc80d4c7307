"""The `python -m bench` harness: every peer and floor side by side, over the issue-6 dimensions.

Modules: `state` (synthetic states per dtype mix), `probe` (RSS and CPU sampling), `floors`
(memcpy, raw write + fsync, O_DIRECT, cold read), `peers` (async_ckpt and every peer library,
each behind one save/load interface), `local` (one size x dtype case on a local folder),
`flatness` (RSS over many saves), `summary` (medians, ratios, verdicts, Markdown), `docs_page`
(docs/benchmarks.md). `bench/__main__.py` is the orchestrator; `bench/plots.py` draws the PNGs.
"""
