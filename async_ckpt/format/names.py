"""Names under the checkpoint root, and what is committed there (a manifest means committed):
listing step folders and reading a step's manifest."""
from __future__ import annotations

import re

from ..errors import CorruptCheckpointError, translate_storage_error
from ..storage import Storage, StorageError
from .fragments import complete
from .manifest import MANIFEST_NAME, MAX_BYTES, Manifest, parse_manifest

STEP_DIGITS = 10
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(step: int) -> str:
    return f"step-{step:0{STEP_DIGITS}d}"


def manifest_path(step: int) -> str:
    return f"{step_dir(step)}/{MANIFEST_NAME}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def step_dirs(storage: Storage) -> dict[int, str]:
    """Every step folder under the root, committed or not."""
    found = {}
    for name in storage.list_dir(""):
        step = parse_step_dir(name)
        if step is not None:
            found[step] = name
    return found


def committed_steps(storage: Storage, folders: dict[int, str] | None = None, one_pass: bool = True
                    ) -> list[int]:
    """Ascending steps whose manifest exists: the only checkpoints that count. `folders`: the
    result of step_dirs() when the caller has listed already.

    `one_pass`: where the backend can list every step folder's manifest in one pass (its
    optional `find_named`: local folders one scan, S3 one listing of the root's keys, 1,000 a
    page, fsspec one `find`), that instead of one request per step folder, falling back to
    those when the listing would take more requests; the same steps either way."""
    folders = step_dirs(storage) if folders is None else folders
    find = getattr(storage, "find_named", None) if one_pass else None
    if find is not None and len(folders) > 1:
        names = find(MANIFEST_NAME, len(folders) - 1)
        if names is not None:
            holding = set(names)
            return sorted(s for s, name in folders.items() if name in holding)
    return sorted(s for s, name in folders.items()
                  if storage.exists(f"{name}/{MANIFEST_NAME}"))


def read_manifest(storage: Storage, folder: str, step: int | None = None, fragments: bool = True
                  ) -> Manifest:
    """The validated manifest of `folder`: FileNotFoundError if there is none (not committed),
    CorruptCheckpointError if it cannot be read or trusted (not a regular file inside the root,
    larger than manifest.MAX_BYTES, damaged, malformed). `fragments`: with every fragment of a
    format_version 3 checkpoint merged in (tools); False: the root only (listing, retention, and
    the loader, which merges only the fragments it needs: `fragments.complete`)."""
    path = f"{folder}/{MANIFEST_NAME}"
    try:
        raw = storage.read_limited(path, MAX_BYTES)
    except FileNotFoundError:
        raise
    except StorageError as exc:     # unreachable or misconfigured storage, not a corrupt manifest
        raise translate_storage_error(exc) from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {storage.child_url(path)}: {exc}") from exc
    manifest = parse_manifest(raw, storage.child_url(path), step)
    return complete(storage, folder, manifest) if fragments and manifest.fragments else manifest
