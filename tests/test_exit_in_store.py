"""A process that exits while one of the library's threads is inside a Store call exits cleanly.

Found in CI: both ranks of node 1 of a 2 x 2 FSDP2 save died with SIGABRT ("terminate called
without an active exception") after finishing their work, and node 0's launcher then waited at
torchrun's exit barrier until the test's deadline. A daemon thread still inside a TCPStore call
when the interpreter finalizes is ended by CPython with ``pthread_exit`` as soon as the call
returns, and the unwinding through torch's bindings aborts the process. Creating a TCPStore
client stalls for 5 s about once in 25 connects (torch 2.13, loopback), so the link's
connect-ahead thread was still connecting when the worker exited.

Each case runs a fresh interpreter that hosts a real TCPStore, starts a thread whose Store call
returns about 1 s later, and exits at once; an object freed by the last garbage collection of
finalization sleeps 2.5 s, so the call returns while the interpreter is finalizing, every time. The control case (a bare daemon
thread) shows the abort is real on this machine; the library's threads must not abort.

`end_process` (async_ckpt/dist/ending.py) is the way out for threads the library does not own
(torch gloo's, which abort the same way): the bare thread's case ends with it cleanly, and it still
finishes pending saves, runs ``atexit`` handlers and exits with the status it is given. The
suite's own pytest process ends through it too (tests/support/finish.py): a plain pytest whose
session leaves such a thread behind aborts after every test passed, as one full run here did.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from support.paths import child_env

pytestmark = pytest.mark.timeout(120)

PRELUDE = textwrap.dedent("""
    import datetime, threading, time
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30))
    base = dist.TCPStore("127.0.0.1", server.port, 1, False, timeout=datetime.timedelta(seconds=30))

    def slow_store_call():
        # a real Store call with the GIL released, returning in about 1 s (as a stalled connect does)
        probe = base.clone()
        try:
            probe.wait(["never-set"], datetime.timedelta(seconds=1.0))
        except Exception:
            pass

    class SlowFinalization:
        def __del__(self, sleep=time.sleep):
            sleep(2.5)          # runs while the interpreter finalizes: the call returns meanwhile

    def garbage_cycle():
        # unreachable once this returns; collected by the interpreter's last garbage collection,
        # which runs after finalization has begun (atexit's hooks come after threading's)
        slow = SlowFinalization()
        slow.me = slow

    import atexit
    atexit.register(garbage_cycle)
""")

BARE = PRELUDE + textwrap.dedent("""
    threading.Thread(target=slow_store_call, daemon=True).start()
    time.sleep(0.3)
""")

LINK = PRELUDE + textwrap.dedent("""
    from async_ckpt.dist.link import StoreLink

    class SlowConnects:
        # the base Store, whose new connections stall once, inside a real Store call
        def clone(self):
            slow_store_call()
            return base.clone()

        def __getattr__(self, name):
            return getattr(base, name)

    link = StoreLink(SlowConnects(), "exit-test", timeout_s=30)
    link.prepare(waiters=1)      # connects in the background, as every multi-rank checkpointer does
    time.sleep(0.3)              # that thread is now inside the stalled call
""")

HEARTBEAT = PRELUDE + textwrap.dedent("""
    from async_ckpt.dist.link import StoreLink
    from async_ckpt.dist.liveness import Heartbeat

    class SlowSets:
        # every heartbeat write is slow, inside a real Store call
        def set(self, key, value):
            slow_store_call()
            return base.set(key, value)

        def __getattr__(self, name):
            return getattr(base, name)

    link = StoreLink(SlowSets(), "exit-test", timeout_s=30)
    link._pool.shared = link._base       # requests go straight to the slow Store
    beat = Heartbeat(link, 0, lambda: 0)
    time.sleep(0.3)                      # the heartbeat thread is now inside a slow write
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                          env=child_env(OMP_NUM_THREADS="1"))


def test_the_hazard_is_real_a_bare_thread_in_a_store_call_aborts_the_exit():
    proc = _run(BARE)
    assert proc.returncode != 0 and "terminate called" in proc.stderr, (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("code", [LINK, HEARTBEAT], ids=["connect-ahead", "heartbeat"])
def test_exit_waits_for_the_librarys_store_calls_instead_of_aborting(code):
    proc = _run(code)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "terminate called" not in proc.stderr


def test_end_process_ends_cleanly_where_a_thread_the_library_does_not_own_aborts_an_exit():
    proc = _run(BARE + "from async_ckpt import end_process\nend_process()\n")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "terminate called" not in proc.stderr


def test_end_process_finishes_pending_saves_runs_atexit_handlers_and_exits_with_the_status(tmp_path):
    script = textwrap.dedent("""
        import atexit, sys, torch, async_ckpt as ac
        class B:
            def state_dict(self): return {'w': torch.full((32 << 20,), 7.0)}
            def load_state_dict(self, sd): pass
        atexit.register(print, "atexit handler ran")
        ck = ac.AsyncCheckpointer(sys.argv[1], [ac.StateComponent('b', B(), ac.SharingPattern.GLOBAL)])
        ck.save(7)
        ac.end_process(3)      # the save is still in flight
        print("never reached")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=90, env=child_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "finishing pending saves of steps [7]" in proc.stderr
    assert proc.stdout.split("\n")[:1] == ["atexit handler ran"] and "never reached" not in proc.stdout
    assert (tmp_path / "step-0000000007" / "manifest.json").is_file()


def test_end_process_refuses_a_thread_other_than_main():
    code = textwrap.dedent("""
        import threading
        from async_ckpt import end_process
        caught = []
        def other():
            try:
                end_process()
            except RuntimeError as exc:
                caught.append(str(exc))
        t = threading.Thread(target=other)
        t.start(); t.join()
        print(caught)
    """)
    proc = _run(code)
    assert proc.returncode == 0 and "call it from the main thread" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("plugin", [False, True], ids=["plain-pytest", "support.finish"])
def test_the_pytest_process_itself_ends_through_end_process(tmp_path, plugin):
    """tests/support/finish.py: a test that leaves a thread the library does not own inside a
    call returning during finalization aborts a plain pytest process after every test passed;
    the suite's own pytest ends through end_process with pytest's exit status."""
    (tmp_path / "test_hazard.py").write_text(PRELUDE + textwrap.dedent("""
        import pytest

        @pytest.fixture(scope="session")
        def hazard():
            yield
            # at exit (atexit runs last-registered first): a call that returns in about 1 s,
            # while the interpreter finalizes (slowed 2.5 s by the garbage cycle); automatic
            # collections off, or the exit handlers run after garbage_cycle would collect the
            # cycle before the interpreter finalizes
            import gc
            gc.disable()

            def start():
                threading.Thread(target=slow_store_call, daemon=True).start()
                time.sleep(0.3)
            atexit.register(start)

        def test_leaves_a_thread_in_a_store_call(hazard):
            pass
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hazard.py"]
    if plugin:
        args[3:3] = ["-p", "support.finish"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=90,
                          env=child_env(OMP_NUM_THREADS="1"))
    assert "1 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    if plugin:
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    else:
        assert proc.returncode != 0 and "terminate called" in proc.stderr, (proc.returncode, proc.stderr[-2000:])
