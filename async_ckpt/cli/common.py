"""What every command shares: the exit codes, `CliError`, the shared options (``--storage-option``,
``--json``), opening a root from a path or URL, and choosing committed steps.

A root is opened read-only (`Storage.check_root`): no command except ``gc`` and ``import`` ever
writes to it. Storage errors are translated into the engine's errors once, here and by the entry
point (`cli.main`), so every failure ends as one line and an exit code.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

import click

from ..errors import CheckpointNotFoundError, translate_storage_error
from ..format.manifest import Manifest
from ..format.names import committed_steps, read_manifest, step_dir
from ..storage import Storage, StorageError, open_storage
from ..storage.registry import split_scheme

EXIT_OK = 0          # success; verify: every byte intact
EXIT_FAILED = 1      # the checkpoint is corrupt or missing, or the command failed
EXIT_USAGE = 2       # bad arguments or options
EXIT_STORAGE = 3     # the root cannot be reached or opened (wrong URL, bucket, credentials, outage)
EXIT_REFUSED = 4     # gc: a writer is active under the root (see docs/cli.md)

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A failure the command explains in one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs -> storage_options. A value that parses as JSON (numbers, true/false,
    objects) is taken as such, anything else as a string; ``a.b=v`` sets ``{"a": {"b": v}}``
    (e.g. ``client_kwargs.region_name=us-east-1``)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--storage-option {pair.split('=')[0]!r}: expected key=value", EXIT_USAGE)
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        node = options
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CliError(f"--storage-option {key}: {part} is set twice", EXIT_USAGE)
        node[last] = value
    return options


def storage_option(fn: F) -> F:
    return click.option(
        "--storage-option", "-o", "storage_options", multiple=True, metavar="KEY=VALUE",
        help="passed to the storage backend (s3: endpoint_url, key, secret, client_kwargs.region_name, "
             "retry_deadline_s, ...); repeatable. Credentials otherwise come from the usual "
             "AWS/boto sources.")(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="print one JSON document instead of a table (for scripts)")(fn)


def open_root(root: str, storage_options: tuple[str, ...] = (), must_exist: bool = True) -> Storage:
    """The Storage of `root`, checked read-only. A local root that does not exist is an error
    (`must_exist`), not an empty root."""
    options = parse_storage_options(storage_options)
    try:
        storage = open_storage(root, options)
        storage.check_root()
    except StorageError as exc:
        raise CliError(str(translate_storage_error(exc)), EXIT_STORAGE) from exc
    except (OSError, ValueError, ImportError) as exc:   # fsspec: unknown protocol, bad options
        raise CliError(f"cannot open {root}: {exc}", EXIT_STORAGE) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. botocore's credential errors, which storage does not classify
        raise CliError(f"cannot open {root}: {type(exc).__name__}: {exc}", EXIT_STORAGE) from exc
    scheme, path = split_scheme(root)
    if must_exist and scheme in ("", "file") and not os.path.isdir(path):
        raise CliError(f"no checkpoint root at {root}: "
                       + ("it is not a folder" if os.path.exists(path) else "the folder does not exist"))
    return storage


def committed(storage: Storage) -> list[int]:
    return committed_steps(storage)


def choose_step(storage: Storage, step: int | None) -> int:
    """`step`, or the newest committed one; CheckpointNotFoundError if it is not committed."""
    steps = committed(storage)
    if step is None:
        if not steps:
            raise CheckpointNotFoundError(f"no committed checkpoint at {storage.url}")
        return steps[-1]
    if step not in steps:
        near = ", ".join(map(str, steps[-5:])) or "none"
        raise CheckpointNotFoundError(f"no committed checkpoint for step {step} at {storage.url} "
                                      f"(newest committed: {near})")
    return step


def manifest_of(storage: Storage, step: int) -> Manifest:
    try:
        return read_manifest(storage, step_dir(step), step)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint for step {step} at {storage.url}") from None


def check_step_option(step: int | None) -> int | None:
    if step is not None and step < 0:
        raise CliError(f"--step must be >= 0, got {step}", EXIT_USAGE)
    return step
