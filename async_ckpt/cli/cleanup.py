"""``async-ckpt gc``: remove what failed saves left under a root, never a committed checkpoint and
never a save in progress.

Garbage is (1) step folders without a manifest, with their unfinished S3 multipart uploads
(`Committer.discard_uncommitted`: the manifest is checked again right before the folder goes),
(2) names in a committed step's folder that its manifest does not list (`save.commit.unlisted`),
with their unfinished uploads, (3) stale writer leases and ``.write-probe-*`` objects at the root.
Anything else at the root is not ours and is left alone.

A save in progress writes into a folder that has no manifest yet, so gc refuses to run while
any writer lease under the root is live (`save.lease`): every process that saves keeps one,
refreshed every 10 s and removed by ``close()``. A lease is stale 60 s after its last heartbeat,
or at once when it names a process of this host that has exited. The leases are read again right
before each folder is removed. ``--force`` overrides (for a writer known to be dead elsewhere).
"""
from __future__ import annotations

from typing import Any

import click

from ..errors import CorruptCheckpointError
from ..format.names import committed_steps, read_manifest, step_dirs
from ..options import CheckpointOptions
from ..save.commit import Committer, unlisted
from ..save.lease import Lease, read_leases
from ..storage import Storage
from .common import EXIT_REFUSED, CliError, json_option, open_root, storage_option
from .output import emit_json, human_bytes

PROBE_PREFIX = ".write-probe-"


def _size(storage: Storage, path: str) -> int | None:
    try:
        return storage.size(path)
    except FileNotFoundError:
        return None       # S3: an unfinished upload, no object yet


def plan(storage: Storage) -> tuple[list[dict[str, Any]], list[Lease]]:
    """What gc would remove, and the leases it found."""
    leases = read_leases(storage)
    uploads = set(getattr(storage, "list_uploads", lambda p="": [])(""))
    actions: list[dict[str, Any]] = []
    folders = step_dirs(storage)
    committed = set(committed_steps(storage, folders))
    for step, folder in sorted(folders.items()):
        names = storage.list_dir(folder)
        if step not in committed:
            sizes = [_size(storage, f"{folder}/{n}") for n in names]
            actions.append({"kind": "folder", "path": folder, "step": step, "files": len(names),
                            "bytes": sum(s or 0 for s in sizes),
                            "uploads": sum(f"{folder}/{n}" in uploads for n in names),
                            "why": "uncommitted step folder (no manifest)"})
            continue
        try:
            manifest = read_manifest(storage, folder, step, fragments=False)
        except (CorruptCheckpointError, FileNotFoundError) as exc:
            actions.append({"kind": "skip", "path": folder, "step": step,
                            "why": f"committed but its manifest is unreadable, left alone: {exc}"})
            continue
        for name in unlisted(manifest, names):
            path = f"{folder}/{name}"
            actions.append({"kind": "file", "path": path, "step": step, "bytes": _size(storage, path) or 0,
                            "uploads": int(path in uploads),
                            "why": "not listed in the committed manifest"})
    for name in storage.list_dir(""):
        if name.startswith(PROBE_PREFIX):
            actions.append({"kind": "file", "path": name, "bytes": _size(storage, name) or 0,
                            "uploads": 0, "why": "leftover write probe"})
    for lease in leases:
        reason = lease.stale_reason()
        if reason:
            actions.append({"kind": "file", "path": lease.name, "bytes": 0, "uploads": 0,
                            "why": f"stale writer lease ({reason})"})
    return actions, leases


def _live(storage: Storage) -> list[Lease]:
    return [lease for lease in read_leases(storage) if lease.stale_reason() is None]


def _refuse(live: list[Lease], url: str) -> CliError:
    return CliError(f"a writer is active under {url}: {live[0].describe()}"
                    + (f" (and {len(live) - 1} more)" if len(live) > 1 else "")
                    + "; gc never runs beside a save: stop the job (close() removes the lease) or, if "
                    "that writer is dead, wait 60 s or pass --force", EXIT_REFUSED)


def apply(storage: Storage, actions: list[dict[str, Any]], force: bool) -> None:
    committer = Committer(storage, CheckpointOptions(), 0, False, set)
    for action in actions:
        if action["kind"] == "folder":
            if not force and (live := _live(storage)):
                raise _refuse(live, storage.url)
            committer.discard_uncommitted(action["step"])   # re-checks the manifest, aborts uploads
        elif action["kind"] == "file":
            storage.delete(action["path"])
            abort = getattr(storage, "abort_uploads", None)
            if action.get("uploads") and abort is not None:
                abort(action["path"])


@click.command("gc")
@click.argument("root")
@click.option("--dry-run", "-n", is_flag=True, help="only list what would be removed")
@click.option("--force", is_flag=True, help="run even though a writer lease looks live")
@storage_option
@json_option
def gc(root: str, dry_run: bool, force: bool, storage_options: tuple[str, ...], as_json: bool) -> int:
    """Remove the leftovers of failed saves under ROOT: uncommitted step folders, files a
    committed manifest does not list, unfinished multipart uploads, stale writer leases. Never
    touches a committed checkpoint; refuses while a writer holds a live lease on ROOT.

    \b
    Example:
      async-ckpt gc ./checkpoints --dry-run
      async-ckpt gc s3://bucket/run1 -o endpoint_url=http://127.0.0.1:8333
    """
    storage = open_root(root, storage_options)
    actions, leases = plan(storage)
    live = [lease for lease in leases if lease.stale_reason() is None]
    if live and not force and not dry_run:
        raise _refuse(live, storage.url)
    removable = [a for a in actions if a["kind"] != "skip"]
    if not dry_run:
        apply(storage, removable, force)
    total = sum(a.get("bytes", 0) for a in removable)
    if as_json:
        emit_json({"root": storage.url, "dry_run": dry_run, "removed": [] if dry_run else removable,
                   "would_remove": removable if dry_run else [], "skipped": [a for a in actions if a["kind"] == "skip"],
                   "bytes": total, "live_writers": [lease.describe() for lease in live]})
        return 0
    verb = "would remove" if dry_run else "removed"
    for a in actions:
        if a["kind"] == "skip":
            click.echo(f"skipped {a['path']}: {a['why']}")
            continue
        what = (f"{a['path']}/ ({a['files']} file(s), {human_bytes(a['bytes'])})" if a["kind"] == "folder"
                else f"{a['path']} ({human_bytes(a['bytes'])})")
        uploads = f", {a['uploads']} unfinished upload(s)" if a.get("uploads") else ""
        click.echo(f"{verb} {what}{uploads}: {a['why']}")
    if dry_run and live:
        click.echo(f"note: a writer is active ({live[0].describe()}); gc without --dry-run refuses "
                   "until it stops")
    click.echo(f"{verb} {len(removable)} item(s), {human_bytes(total)}" if removable else
               f"nothing to remove under {storage.url}")
    return 0
