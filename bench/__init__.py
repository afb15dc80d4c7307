"""Benchmarks for async_ckpt (run each module with ``python -m bench.<name>``)."""
