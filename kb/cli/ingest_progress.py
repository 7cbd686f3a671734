"""What `kb ingest` shows while it waits: a rich progress bar per file and one for the upload.

A file's bar follows its job's percent (tokens prefilled over tokens to prefill) and says what
is happening (queued, parsing, prefilling k of n, verifying, ready). The upload's bar weighs each
file by its size in bytes, and its ETA is the work left over the throughput measured so far.
Without a terminal (or with --quiet) nothing is drawn; `lines=True` prints one line per change.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from kb.cli.common import eta_text, human_size
from kb.jobs.progress import Throughput
from kb.jobs.records import JobInfo


def upload_fraction(infos: dict[str, JobInfo], sizes: dict[str, int]) -> float:
    """The share of the upload done: each job's percent weighed by its file's bytes."""
    weights = {j: max(1, sizes.get(j, 0)) for j in infos}
    total = sum(weights.values()) or 1
    return (
        sum(
            weights[j] * (100.0 if infos[j].status == "done" else infos[j].percent) / 100.0
            for j in infos
        )
        / total
    )


class IngestDisplay:
    """The hook for `JobService.wait`; use as a context manager around the wait."""

    def __init__(
        self,
        sizes: dict[str, int],
        draw: bool,
        lines: bool,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.sizes, self.draw, self.lines = sizes, draw, lines
        self.infos: dict[str, JobInfo] = {}
        self.throughput = Throughput(clock)
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._total = None

    def __enter__(self) -> IngestDisplay:
        if self.draw:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[detail]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            if len(self.sizes) > 1:
                self._total = self._progress.add_task(
                    f"{len(self.sizes)} files", total=100, detail=""
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, info: JobInfo) -> None:
        self.infos[info.id] = info
        frac = (
            upload_fraction(self.infos, self.sizes) if len(self.infos) == len(self.sizes) else None
        )
        if frac is not None:
            self.throughput.observe(frac, 1.0)
        eta = self.throughput.eta_s()
        size = human_size(info.size_bytes) if info.size_bytes else ""
        pages = f", {info.pages} pages" if info.pages else ""
        if self._progress is not None:
            pct = 100.0 if info.status == "done" else info.percent
            detail = f"{size}{pages}" + (
                f"  ETA {eta_text(info.eta_s)}" if info.eta_s is not None else ""
            )
            if info.id not in self._tasks:
                self._tasks[info.id] = self._progress.add_task("", total=100, detail="")
            self._progress.update(
                self._tasks[info.id],
                completed=pct,
                detail=detail,
                description=f"{info.filename}: {info.activity}",
            )
            if self._total is not None and frac is not None:
                self._progress.update(
                    self._total,
                    completed=100 * frac,
                    detail=f"ETA {eta_text(eta)}" if frac < 1 else "",
                )
        elif self.lines:
            print(
                f"  {info.filename}: {info.activity} {info.percent:5.1f}%"
                + (f" ETA {eta_text(info.eta_s)}" if info.eta_s is not None else ""),
                file=sys.stderr,
            )
