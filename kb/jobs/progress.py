"""Persisting a document's ingestion progress and publishing it to live UIs.

`ProgressWriter` is the Ingestor's stage hook in a job: it writes stage, percent, ETA and
heartbeat on the Document row (throttled, but every stage change is written at once), so a
status survives restarts, and publishes an Event on channel `progress:<corpus>`.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from kb.ingest.pipeline import StageUpdate
from storage.broker import Broker
from storage.db import Database
from storage.models import Document

log = logging.getLogger(__name__)


def channel(corpus: str) -> str:
    """The pub/sub channel of a corpus's progress events."""
    return f"progress:{corpus}"


class ProgressWriter:
    """Stage hook for `Ingestor.build`: persist, then publish. ETA comes from this run's prefill rate."""

    def __init__(self, db: Database, broker: Broker | None, corpus: str, job_id: str | None,
                 min_interval_s: float = 0.5):
        self.db, self.broker, self.corpus, self.job_id = db, broker, corpus, job_id
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        self._last_stage: str | None = None
        self._prefill_start: tuple[float, int] | None = None  # (time, segments done) at first prefill report

    def eta_s(self, u: StageUpdate, now: float) -> float | None:
        """Seconds left, from the segments prefilled so far in this run (None until two reports)."""
        if u.stage != "prefilled":
            return 0.0 if u.stage in ("indexed", "ready") else None
        if self._prefill_start is None:
            self._prefill_start = (now, u.done)
            return None
        t0, d0 = self._prefill_start
        if u.done <= d0:
            return None
        return (now - t0) / (u.done - d0) * (u.total - u.done)

    def __call__(self, u: StageUpdate) -> None:
        now = time.monotonic()
        eta = self.eta_s(u, now)
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
            doc.heartbeat_at = datetime.now(timezone.utc)
        if self.broker is not None:
            data = {"job_id": self.job_id, "document_id": u.document_id, "filename": u.filename,
                    "stage": u.stage, "done": u.done, "total": u.total, "percent": round(u.percent, 2),
                    "eta_s": None if eta is None else round(eta, 2)}
            try:
                self.broker.publish(channel(self.corpus), data)
            except Exception as e:  # live progress is best effort; the database has the truth
                log.warning("progress event for %s not published: %s", u.filename, e)
