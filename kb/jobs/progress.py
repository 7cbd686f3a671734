"""Persisting a document's ingestion progress and publishing it to live UIs.

`ProgressWriter` is the Ingestor's stage hook in a job: it writes stage, percent, ETA and
heartbeat on the Document row (throttled, but every stage change is written at once), so a
status survives restarts, and publishes an Event on channel `progress:<corpus>`.

The ETA is the work left over the throughput measured in this run (`Throughput`): tokens
prefilled per second of the clock since the document's prefill began (tokens, not segments:
segments differ in length, and the last one is often short), given once a rate has been seen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kb.ingest.pipeline import StageUpdate
from storage.broker import Broker
from storage.db import Database
from storage.models import Document

log = logging.getLogger(__name__)


def channel(corpus: str) -> str:
    """The pub/sub channel of a corpus's progress events."""
    return f"progress:{corpus}"


Clock = Callable[[], float]


@dataclass
class Throughput:
    """Work done per second of `clock`, and the seconds left at that rate.

    `observe(done, total)` records the work done so far (tokens prefilled, here); `eta_s()` is
    (total - done) / rate, with the rate averaged from the first report on (prefill batches
    land in bursts, so a rate between two reports says little). None until work was seen.
    """

    clock: Clock = time.monotonic
    _start: tuple[float, float] | None = field(
        default=None, init=False
    )  # (time, done) at the first report
    _last: tuple[float, float, float] | None = field(
        default=None, init=False
    )  # (time, done, total)

    def observe(self, done: float, total: float) -> None:
        now = self.clock()
        if self._start is None:
            self._start = (now, done)
        self._last = (now, done, total)

    def rate(self) -> float | None:
        """Work per second since the first report, or None before any progress was seen."""
        if self._last is None:
            return None
        (t0, d0), (now, done, _) = self._start, self._last
        return (done - d0) / (now - t0) if done > d0 and now > t0 else None

    def eta_s(self) -> float | None:
        if self._last is None:
            return None
        _, done, total = self._last
        if done >= total:
            return None
        r = self.rate()
        return None if not r else (total - done) / r


class ProgressWriter:
    """Stage hook for `Ingestor.build`: persist, then publish. The ETA comes from this run's
    prefill throughput in tokens per second (`clock` is injectable for tests)."""

    def __init__(
        self,
        db: Database,
        broker: Broker | None,
        corpus: str,
        job_id: str | None,
        min_interval_s: float = 0.5,
        clock: Clock = time.monotonic,
    ):
        self.db, self.broker, self.corpus, self.job_id = db, broker, corpus, job_id
        self.min_interval_s, self.clock = min_interval_s, clock
        self._last_write = float("-inf")
        self._last_stage: str | None = None
        self.throughput = Throughput(clock)

    def eta_s(self, u: StageUpdate) -> float | None:
        """Seconds left for this document: None before a rate is measured and once it is ready
        (nothing is left then; "ETA 0 s" on a ready row said nothing true)."""
        if u.stage != "prefilled":
            return None
        if u.tokens_total:
            self.throughput.observe(u.tokens_done, u.tokens_total)
        else:
            self.throughput.observe(u.done, u.total)
        return self.throughput.eta_s()

    def __call__(self, u: StageUpdate) -> None:
        eta = self.eta_s(u)
        now = self.clock()
        changed = u.stage != self._last_stage or u.done == u.total
        if not changed and now - self._last_write < self.min_interval_s:
            return
        self._last_write, self._last_stage = now, u.stage
        with self.db.session() as s:
            doc = s.get(Document, u.document_id)
            if doc is None:
                return
            if doc.stage != "failed":  # a cancel marks it failed; don't paint over that
                doc.stage = u.stage
            doc.percent, doc.eta_s = u.percent, eta
            doc.heartbeat_at = datetime.now(UTC)
        if self.broker is not None:
            data = {
                "job_id": self.job_id,
                "document_id": u.document_id,
                "filename": u.filename,
                "stage": u.stage,
                "activity": u.activity,
                "done": u.done,
                "total": u.total,
                "tokens_done": u.tokens_done,
                "tokens_total": u.tokens_total,
                "size_bytes": u.size_bytes,
                "percent": round(u.percent, 2),
                "eta_s": None if eta is None else round(eta, 2),
            }
            try:
                self.broker.publish(channel(self.corpus), data)
            except Exception as e:  # live progress is best effort; the database has the truth
                log.warning("progress event for %s not published: %s", u.filename, e)
