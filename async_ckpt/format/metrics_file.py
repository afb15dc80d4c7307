"""Metrics reported after a checkpoint was committed, stored beside it without touching its
manifest: one small exclusively-created JSON file per report, merged in name (time) order."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping

from ..errors import InvalidArgumentError, translate_storage_error
from ..storage import Storage, StorageError

log = logging.getLogger("async_ckpt")
PREFIX = "metrics-"


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"metric {name!r}={value!r}: names must be str and values numbers")
        out[name] = float(value)
    return out


def encode(metrics: dict[str, float]) -> dict:
    return {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}


def decode(doc: dict) -> dict[str, float]:
    out = {}
    for k, v in doc.items():
        if isinstance(k, str) and isinstance(v, (int, float, str)) and not isinstance(v, bool):
            try:
                out[k] = float(v)
            except ValueError:
                continue
    return out


def write_late(storage: Storage, folder: str, metrics: dict[str, float]) -> None:
    name = f"{folder}/{PREFIX}{time.time_ns():020d}-{os.urandom(4).hex()}.json"
    storage.create_exclusive(name, json.dumps(encode(metrics)).encode())


def read_late(storage: Storage, folder: str) -> dict[str, float]:
    merged: dict[str, float] = {}
    # Names start with the time they were written (zero-padded): sorted, a later report of the
    # same metric overrides an earlier one, whatever order the backend lists them in.
    for name in sorted(storage.list_dir(folder)):
        if name.startswith(PREFIX) and name.endswith(".json"):
            try:
                doc = json.loads(storage.read_bytes(f"{folder}/{name}"))
                merged.update(decode(doc) if isinstance(doc, dict) else {})
            except StorageError as exc:   # storage down: never rank checkpoints without these
                raise translate_storage_error(exc) from exc
            except (OSError, ValueError, RecursionError) as exc:
                log.warning("ignoring unreadable metrics file %s: %s", storage.child_url(f"{folder}/{name}"), exc)
    return merged
