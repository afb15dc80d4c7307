"""How a worker process of the multi-process tests ends once its results are written.

`leave()` tears the default process group down and ends the process at once with status 0,
without the interpreter's finalization. torch 2.13's gloo backend races it: a gloo worker thread
(``pt_gloo_runloop``) that finished a collective drops its last reference to the work's tensors
a moment after Python's ``wait()`` returned, and freeing a tensor's Python object takes the GIL;
if the main thread has meanwhile reached ``Py_FinalizeEx``, CPython ends that thread with
``pthread_exit``, whose unwinding through the bindings calls ``std::terminate`` ("terminate
called without an active exception", SIGABRT). Seen in CI and here about once in seven 2 x 2
FSDP2 runs whose last act was a forward pass (backtrace: ``AsyncAllgatherWork::~AsyncAllgatherWork``
-> ``decref_pyobject`` -> ``take_gil`` -> ``PyThread_exit_thread``). The process groups are still
referenced by the model (device meshes, FSDP state) after ``destroy_process_group()``, so their
threads live on into finalization; nothing in Python can wait for them.

The library's own threads do not rely on this: they never touch the process group, and their Store
calls are drained before finalization (async_ckpt/dist/waits.py, tests/test_exit_in_store.py).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def leave() -> NoReturn:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
