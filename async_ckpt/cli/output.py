"""How the commands print: plain aligned tables (stable for people and for grep), JSON documents
for ``--json``, human-readable sizes, and progress bars (rich), which appear only when standard
error is a terminal and never in a pipe, a log file or a test."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Sequence

import click


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def fmt_number(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True))
        lines.append((line + "  " + r[-1]).rstrip() if len(r) > 1 else r[0])
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def emit_json(doc: Any) -> None:
    """One JSON document on stdout (non-finite floats as strings, other objects as str())."""
    click.echo(json.dumps(jsonable(doc), indent=1, allow_nan=False))


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("ASYNC_CKPT_NO_PROGRESS")


class Progress:
    """A byte-counting progress bar on stderr (rich), shown only on a terminal. `advance(n)` may
    be called from any thread. Use as a context manager."""

    def __init__(self, description: str, total: int = 0):
        self.description, self.total = description, total
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "Progress":
        if self.total > 0:
            self.start(self.total)
        return self

    def start(self, total: int) -> None:
        """Show the bar for `total` bytes (when it is not known at __enter__)."""
        self.total = total
        if self._bar is not None or total <= 0 or not progress_enabled():
            return
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        from rich.progress import Progress as RichProgress
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n)     # rich's Progress is thread-safe

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
