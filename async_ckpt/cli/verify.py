"""``async-ckpt verify``: re-read every byte of one, the newest or every committed checkpoint and
check it against its manifest (the manifest itself, each data file's size and whole-file
xxh3-128, every record's xxh3-128), files in parallel, with a progress bar on a terminal. Exit
status 0 only when everything is intact; each problem names its file.

`verify_steps` is the in-process entry (``bench/verify.py`` times it); the per-file check is
`load.reader.verify_file`, the loader's own read path.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import click

from ..errors import CorruptCheckpointError
from ..format.names import committed_steps, step_dir
from ..load.reader import verify_file
from ..storage import Storage
from .common import EXIT_FAILED, CliError, check_step_option, choose_step, json_option, manifest_of, open_root, \
    storage_option
from .output import Progress, emit_json, human_bytes


@dataclass
class StepResult:
    step: int
    files: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def default_jobs(storage: Storage) -> int:
    """Files checked at once: 2 on local disks (the loader's read pool is 2 threads; more streams
    seek), 4 on object stores (each read is already several concurrent ranged GETs; 4 x 64 MiB
    windows bound the memory)."""
    return 2 if getattr(storage, "map_private", None) is not None else 4


def verify_steps(storage: Storage, steps: list[int], jobs: int | None = None,
                 on_bytes: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None
                 ) -> list[StepResult]:
    """Check every file of every step in `steps`; one result per step, in order."""
    results, tasks = [], []
    for step in steps:
        result = StepResult(step)
        results.append(result)
        try:
            manifest = manifest_of(storage, step)
        except CorruptCheckpointError as exc:
            result.problems.append(str(exc))
            continue
        result.files = len(manifest.files)
        result.nbytes = sum(f.size for f in manifest.files.values())
        tasks += [(result, manifest, name) for name in sorted(manifest.files)]
    if on_total is not None:
        on_total(sum(manifest.files[name].size for _, manifest, name in tasks))

    def check(task: tuple[StepResult, Any, str]) -> tuple[StepResult, list[str], float]:
        result, manifest, name = task
        t0 = time.perf_counter()
        problems = verify_file(storage, step_dir(manifest.step), manifest, name, on_bytes)
        return result, problems, time.perf_counter() - t0

    with ThreadPoolExecutor(max(1, jobs or default_jobs(storage)), thread_name_prefix="ckpt-verify") as pool:
        for result, problems, seconds in pool.map(check, tasks):
            result.problems += problems
            result.seconds += seconds
    return results


@click.command("verify")
@click.argument("root")
@click.option("--step", type=int, default=None, help="the step (default: the newest committed)")
@click.option("--all", "every", is_flag=True, help="every committed checkpoint")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=None,
              help="files checked at once (default: 2 on local disk, 4 on object stores)")
@storage_option
@json_option
def verify(root: str, step: int | None, every: bool, jobs: int | None, storage_options: tuple[str, ...],
           as_json: bool) -> int:
    """Re-read every byte of a checkpoint under ROOT and check every size and hash against its
    manifest. Exit status 0 only if intact; every corrupt or missing file is named.

    \b
    Example:
      async-ckpt verify ./checkpoints --all
      async-ckpt verify s3://bucket/run1 --step 4000 -o endpoint_url=http://127.0.0.1:8333
    """
    if every and step is not None:
        raise CliError("give --step N or --all, not both", 2)
    storage = open_root(root, storage_options)
    if every:
        steps = committed_steps(storage)
        if not steps:
            raise CliError(f"no committed checkpoint at {storage.url}")
    else:
        steps = [choose_step(storage, check_step_option(step))]
    started = time.perf_counter()
    with Progress("verifying") as bar:
        results = verify_steps(storage, steps, jobs, bar.advance, bar.start)
    elapsed = time.perf_counter() - started
    bad = [r for r in results if not r.ok]
    if as_json:
        emit_json({"root": storage.url, "ok": not bad, "seconds": elapsed, "steps": [
            {"step": r.step, "ok": r.ok, "files": r.files, "bytes": r.nbytes, "problems": r.problems}
            for r in results]})
    else:
        for r in results:
            if r.ok:
                click.echo(f"step {r.step}: intact ({r.files} file(s), {human_bytes(r.nbytes)})")
            else:
                click.echo(f"step {r.step}: CORRUPT")
                for problem in r.problems:
                    click.echo(f"  {problem}")
        total = sum(r.nbytes for r in results)
        click.echo(f"checked {human_bytes(total)} in {elapsed:.2f} s "
                   f"({human_bytes(total / max(elapsed, 1e-9))}/s): "
                   + ("all intact" if not bad else f"{len(bad)} of {len(results)} checkpoint(s) CORRUPT"))
    return EXIT_FAILED if bad else 0
