"""Ending a multi-process (torchrun) worker without torch's exit race: `end_process`.

torch 2.13's gloo backend races the interpreter's finalization. A gloo worker thread
(``pt_gloo_runloop``) that finished a collective drops its last reference to the work's tensors a
moment after Python's ``wait()`` returned; freeing a tensor's Python object takes the GIL, and if
the main thread has meanwhile reached ``Py_FinalizeEx``, CPython 3.11 ends that thread with
``pthread_exit``, whose unwinding through torch's bindings calls ``std::terminate`` ("terminate
called without an active exception", exit status -6). torchrun then reports a failed rank although
every checkpoint was committed, and the other node's launcher waits at its exit barrier. Seen in
CI about once in seven 2 x 2 FSDP2 runs whose last act was a forward pass (backtrace:
``AsyncAllgatherWork::~AsyncAllgatherWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
``PyThread_exit_thread``), and in a sharded benchmark whose last act was an ``all_gather_object``.
``destroy_process_group()`` does not help: the groups stay referenced by the model (device
meshes, FSDP state), so their threads live on into finalization, and nothing in Python can wait
for them.

`end_process` does, in order, what the interpreter's exit would do up to the racy part, then
ends the process at once:

1. threading's exit hooks and the wait for non-daemon threads (``threading._shutdown``, which
   the interpreter calls first at exit): every open `AsyncCheckpointer` finishes its pending saves
   and closes there, and the Store calls in flight drain (`dist.waits`);
2. the ``atexit`` handlers;
3. ``destroy_process_group()`` if a default group exists, logging's shutdown, flushing stdout and
   stderr;
4. ``os._exit(status)``: no finalization, so no gloo thread can meet it.

Call it from the main thread as a worker's last statement (after the training loop; the
trainers' ``train()`` returns, it never ends the process). The library's own threads never rely on
it: they never touch a process group, and their Store calls are drained at an ordinary exit too.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import NoReturn

log = logging.getLogger("async_ckpt")


def end_process(status: int = 0) -> NoReturn:
    """Finish what an ordinary exit would (pending saves, threading and ``atexit`` hooks), tear the
    default process group down and end the process with `status`, skipping the interpreter's
    finalization (see the module docstring for the torch race this avoids). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("end_process() ends the whole process: call it from the main thread")
    try:
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:           # still end the process: a half-finished exit must not hang
        log.exception("end_process: an exit hook failed")
        status = status or 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
