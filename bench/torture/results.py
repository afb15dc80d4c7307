"""What a torture run records per mode, its progress lines, and the results table (markdown)."""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from .checks import Run, Verdict

LANDING_ORDER = ["opening", "staging", "mid-write", "mid-upload", "written", "mid-commit",
                 "after commit", "retention", "idle"]


@dataclass
class ModeResult:
    mode: str
    kind: str = "kills"                # "kills" or "trials" (disk-full: no kill)
    kills: int = 0
    landings: Counter = field(default_factory=Counter)
    before_first_commit: int = 0       # kills before the saver committed anything
    commits: int = 0                   # commits the savers reported between the kills
    loads: int = 0                     # checkpoints loaded and compared bit for bit
    cleaned: int = 0                   # leftovers of a kill seen removed by a later commit
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    final_checked: bool = False        # the save after the last kill committed and cleaned up
    kept_roots: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def record_kill(self, verdict: Verdict, run: Run, plan: str) -> None:
        self.kills += 1
        self.landings[verdict.landing] += 1
        self.before_first_commit += not run.committed
        self.commits += len(run.committed)
        self.loads += verdict.loads
        self.cleaned += verdict.cleaned

    def record_failure(self, trial: int, landing: str, problems: list[str], root: str,
                       lines: list, plan: str) -> None:
        self.failures.append({"trial": trial, "landing": landing, "plan": plan, "root": root,
                              "problems": problems, "last_lines": [t for _, t in lines[-6:]]})

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["landings"] = dict(self.landings)
        return doc


class Progress:
    """One line per trial on stderr (rewritten in place on a terminal)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def trial(self, result: ModeResult, trial: int, total: int, landing: str) -> None:
        if self.quiet:
            return
        line = (f"[{result.mode}] {trial + 1}/{total} {landing:<13} failures {len(result.failures)}"
                f"  {time.monotonic() - self.started:7.0f} s")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(78) + ("\n" if trial + 1 == total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def say(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


def landings_text(landings: Counter) -> str:
    order = LANDING_ORDER + sorted(set(landings) - set(LANDING_ORDER))
    return ", ".join(f"{name} {landings[name]}" for name in order if landings.get(name))


def table(results: list[ModeResult]) -> str:
    rows = ["| mode | kills | where they landed | before first commit | commits between kills | "
            "checkpoints loaded | leftovers removed | failures | seconds |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        count = f"{r.kills}" if r.kind == "kills" else f"{r.kills} trials"
        rows.append(f"| {r.mode} | {count} | {landings_text(r.landings)} | {r.before_first_commit} | "
                    f"{r.commits} | {r.loads} | {r.cleaned} | {len(r.failures)} | {r.seconds:.0f} |")
    kills = sum(r.kills for r in results if r.kind == "kills")
    fails = sum(len(r.failures) for r in results)
    seconds = sum(r.seconds for r in results)
    rows.append(f"| **all** | **{kills}** | | | {sum(r.commits for r in results)} | "
                f"{sum(r.loads for r in results)} | {sum(r.cleaned for r in results)} | **{fails}** | "
                f"{seconds:.0f} |")
    return "\n".join(rows)
