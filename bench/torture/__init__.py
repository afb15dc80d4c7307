"""The torture suite: random SIGKILLs of savers (local raw, local zstd, S3 on SeaweedFS, 2 x 2
torchrun runs killed whole, one rank, or node 0's launcher) and a full disk, each followed by the
checks of `checks.py`. ``python -m bench.torture --help``; `docs/reliability.md` has the results.

Modules: `__main__` (command line, modes, results files), `single` (one saver process),
`torchrun` (2 x 2 launches), `diskfull`, `checks` (what every trial asserts), `observe` (the
root behind the engine's back), `state` (the deterministic state), `saver` and `rank` (the
children), `proc`, `results`.
"""
