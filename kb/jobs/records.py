"""Plain records the job modules hand out: a submission's outcome and a job's status."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from kb.ingest.pipeline import activity

TERMINAL = ("done", "failed", "cancelled")
LIVE = ("queued", "running")


@dataclass(frozen=True)
class Submission:
    """One submitted file: its job, or why it was not queued (a ready duplicate, a bad file)."""

    filename: str
    status: str  # queued | duplicate | failed
    job_id: str | None = None
    document_id: int | None = None
    segments: int = 0
    tokens: int = 0
    error: str | None = None
    code: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JobInfo:
    """A job with its document's persisted progress, as `kb jobs list` and the API show it."""

    id: str
    kind: str
    corpus: str | None
    document_id: int | None
    filename: str | None
    status: str  # queued|running|done|failed|cancelled
    stage: (
        str | None
    )  # the document's: stored|parsed|tokenized|prefilled|ready|failed (how far it got)
    percent: float
    eta_s: float | None
    segments_done: int
    segments_total: int
    tokens: int
    attempts: int
    error: str | None
    code: str | None  # the IngestError slug of a document that failed on bad input
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    tokens_done: int = 0  # tokens whose KV is stored: `percent` follows these over `tokens`
    size_bytes: int = 0  # the file's size
    pages: int | None = None  # pages of a paged format (PDF), once parsed

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def activity(self) -> str:
        """What is happening now: queued, parsing, prefilling k of n, verifying, ready, failed."""
        if self.status == "done":
            return "ready"
        if self.status == "failed":
            return "failed"
        return activity(self.stage, self.segments_done, self.segments_total, self.status)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["activity"] = self.activity
        for k in ("created_at", "started_at", "finished_at", "heartbeat_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d
