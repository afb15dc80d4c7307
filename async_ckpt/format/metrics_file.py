"""Metrics reported after a checkpoint was committed, stored beside it without touching its
manifest: one small exclusively-created JSON file per report, merged in name (time) order.

Each file is sealed like the manifest (`metrics_hash`, seal.py) and read with a size bound; a file
that is damaged, too large, not a regular file or reached through a symlink is ignored with a
warning (the checkpoint itself is fine), and so is any value that is not a number a float can
hold (a 400-digit integer, a string other than "nan"/"inf"/"-inf" or a numeral).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping

from . import seal
from ..errors import InvalidArgumentError, translate_storage_error
from ..storage import Storage, StorageError

log = logging.getLogger("async_ckpt")
PREFIX = "metrics-"
HASH_KEY = "metrics_hash"      # the seal of a metrics file; no metric may take this name
MAX_BYTES = 1 << 20            # a metrics file larger than this is refused by writer and reader


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"metric {name!r}={value!r}: names must be str and values numbers")
        if name == HASH_KEY:
            raise InvalidArgumentError(f"{HASH_KEY!r} is reserved (it seals the metrics file); "
                                       "rename that metric")
        try:
            out[name] = float(value)
        except OverflowError:
            raise InvalidArgumentError(f"metric {name!r} is an integer too large for a float") from None
    return out


def encode(metrics: dict[str, float]) -> dict:
    return {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}


def decode(doc: dict, where: str = "") -> dict[str, float]:
    """The numbers of a stored metrics object; anything else is left out (with a warning for a
    number no float can hold)."""
    out = {}
    for k, v in doc.items():
        if isinstance(k, str) and isinstance(v, (int, float, str)) and not isinstance(v, bool):
            try:
                out[k] = float(v)
            except ValueError:
                continue
            except OverflowError:       # only an int this large: a writer stores floats
                log.warning("ignoring metric %r%s: an integer of %d bits is no number a float can hold",
                            k, f" of {where}" if where else "", v.bit_length() if isinstance(v, int) else 0)
    return out


def write_late(storage: Storage, folder: str, metrics: dict[str, float]) -> None:
    name = f"{folder}/{PREFIX}{time.time_ns():020d}-{os.urandom(4).hex()}.json"
    body = seal.seal(json.dumps(encode(metrics), separators=(",", ":")).encode(), HASH_KEY)
    if len(body) > MAX_BYTES:
        raise InvalidArgumentError(f"these metrics take {len(body)} bytes as JSON, more than the "
                                   f"{MAX_BYTES} a metrics file may have; report fewer or shorter names")
    storage.create_exclusive(name, body)


def read_late(storage: Storage, folder: str) -> dict[str, float]:
    merged: dict[str, float] = {}
    # Names start with the time they were written (zero-padded): sorted, a later report of the
    # same metric overrides an earlier one, whatever order the backend lists them in.
    for name in sorted(storage.list_dir(folder)):
        if name.startswith(PREFIX) and name.endswith(".json"):
            url = storage.child_url(f"{folder}/{name}")
            try:
                doc, _sealed = seal.loads(storage.read_limited(f"{folder}/{name}", MAX_BYTES), HASH_KEY, url)
                if not isinstance(doc, dict):
                    raise ValueError(f"{url} is not a JSON object")
                merged.update(decode(doc, url))
            except StorageError as exc:   # storage down: never rank checkpoints without these
                raise translate_storage_error(exc) from exc
            except (OSError, ValueError, RecursionError) as exc:
                log.warning("ignoring unreadable metrics file %s: %s", url, exc)
    return merged
