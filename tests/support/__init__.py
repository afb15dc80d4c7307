"""What the tests share. tests/ is on sys.path (pyproject.toml: pytest's `pythonpath`), so a test
imports `from support.<module> import ...`; the helpers under tests/helpers/, started as child
processes, get the same path from `support.paths.child_env()`.

    compare       assert_same: exact structural equality, bit-identical tensors
    net           free_port / free_ports on loopback
    stateful      Box, Holder, Copying: stateful doubles for StateComponent
    paths         the checkout's folders; child_env() for helper processes
    corruption    the corruption tests' saved checkpoints (fixtures) and damage helpers
    semantics     the contract-semantics tests' gated and failing storage
    codec         the codec tests' dtypes, round trips and manifest edits
    crash_state   the ~256 MiB state the crash tests' saver writes and checks
    dist          launching multi-node torchrun runs of helpers/dist_worker.py (one scenario,
                  or a plan of several in one launch); the shared 4-rank checkpoint (fixture)
    cli           the command-line tests' runners (in process, as a subprocess, both) and states
    resume        killed-and-resumed runs of helpers/resume_trainer.py
    fixture_state the state stored in the checked-in format fixtures (tests/fixtures/)
"""
