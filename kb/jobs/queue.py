"""Submitting jobs and keeping the broker in step with the database.

The database is the source of truth: a Job row is written before its id goes to the broker,
and `requeue_lost` re-enqueues every unfinished job whose broker entry may be gone (a Redis
restart keeps nothing here) or whose worker stopped beating. `Broker.enqueue` is idempotent by
job id, so re-enqueueing a job that is still waiting or pending changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, case, func, or_, select

from kb.errors import Conflict, KBError, NotFound
from kb.ingest.errors import IngestError
from kb.ingest.pipeline import Ingestor, failure_message
from kb.jobs.records import LIVE, JobInfo, Submission
from storage.broker import Broker
from storage.db import Database
from storage.models import Corpus, Document, Job, Segment

log = logging.getLogger(__name__)

INGEST_QUEUE = "ingest"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were written in UTC."""
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


class JobQueue:
    """Creates ingest jobs, lists, cancels and retries them, and re-enqueues lost ones."""

    def __init__(self, db: Database, ingestor: Ingestor, broker: Broker, queue: str = INGEST_QUEUE):
        self.db, self.ingestor, self.broker, self.queue = db, ingestor, broker, queue

    # -- submit ------------------------------------------------------------------------------
    def submit(self, corpus: str, paths: list[str | Path]) -> list[Submission]:
        """Store each file (the Ingestor's store step) and queue one ingest job per new document.

        A file that cannot be stored (missing, oversized) fails here alone; a document already
        ready comes back as a duplicate; one that already has a live job returns that job."""
        corpus_id = self.ingestor.corpus_id(corpus)
        out: list[Submission] = []
        queued: list[Job] = []
        for path in paths:
            path = Path(path)
            try:
                stored = self.ingestor.store(corpus_id, path)
            except (IngestError, KBError, OSError) as e:
                out.append(
                    Submission(
                        path.name,
                        "failed",
                        error=failure_message(e, path.name),
                        code=getattr(e, "code", None),
                    )
                )
                continue
            if stored.duplicate:
                out.append(
                    Submission(
                        path.name,
                        "duplicate",
                        None,
                        stored.document_id,
                        stored.segments,
                        stored.tokens,
                    )
                )
                continue
            job = self._job_for(corpus, corpus_id, stored.document_id)
            queued.append(job)
            out.append(Submission(path.name, "queued", job.id, stored.document_id))
        for job in queued:
            self.broker.enqueue(self.queue, job.id, job.kind, job.payload)
        return out

    def _job_for(self, corpus: str, corpus_id: int, document_id: int) -> Job:
        """The document's live job, or a new queued one (written before it is enqueued)."""
        with self.db.session() as s:
            live = s.scalar(
                select(Job)
                .where(Job.document_id == document_id, Job.status.in_(LIVE))
                .order_by(Job.created_at.desc())
            )
            if live is not None:
                return live
            job = Job(
                id=str(uuid.uuid4()),
                kind="ingest",
                corpus_id=corpus_id,
                document_id=document_id,
                payload={"document_id": document_id, "corpus": corpus},
                status="queued",
            )
            s.add(job)
            doc = s.get(Document, document_id)
            if doc.stage == "failed":  # a new attempt at a failed document starts clean
                doc.stage, doc.error, doc.percent, doc.eta_s = "stored", None, 0.0, None
            return job

    # -- recovery ----------------------------------------------------------------------------
    def requeue_lost(self, stale_s: float) -> int:
        """Enqueue every queued job, and every running job whose heartbeat is older than
        `stale_s`: after a Redis restart or a dead worker nothing stays stuck. Returns the
        number of jobs offered to the broker (idempotent there: live entries are kept)."""
        cutoff = utcnow() - timedelta(seconds=stale_s)
        with self.db.session() as s:
            jobs = s.execute(
                select(Job.id, Job.kind, Job.payload)
                .where(
                    or_(
                        Job.status == "queued",
                        and_(
                            Job.status == "running",
                            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
                        ),
                    )
                )
                .order_by(Job.created_at)
            ).all()
        for job_id, kind, payload in jobs:
            self.broker.enqueue(self.queue, job_id, kind, payload or {})
        if jobs:
            log.info("offered %d unfinished jobs to the broker", len(jobs))
        return len(jobs)

    # -- inspect, cancel, retry -----------------------------------------------------------------
    def _info(self, s, job: Job) -> JobInfo:
        doc = s.get(Document, job.document_id) if job.document_id is not None else None
        corpus = s.get(Corpus, job.corpus_id) if job.corpus_id is not None else None
        done = total = tokens_done = 0
        pages = None
        if doc is not None:
            total, done, tokens_done, pages = s.execute(
                select(
                    func.count(Segment.id),
                    func.count(Segment.kv_file),
                    func.coalesce(
                        func.sum(case((Segment.kv_file.is_not(None), Segment.num_tokens), else_=0)),
                        0,
                    ),
                    func.max(Segment.page_end),
                ).where(Segment.document_id == doc.id)
            ).one()
        return JobInfo(
            id=job.id,
            kind=job.kind,
            corpus=corpus.name if corpus else None,
            document_id=job.document_id,
            filename=doc.filename if doc else None,
            status=job.status,
            stage=doc.stage if doc else None,
            percent=100.0 if job.status == "done" else (doc.percent if doc else 0.0),
            eta_s=doc.eta_s if doc and job.status == "running" else None,
            segments_done=int(done),
            segments_total=int(total),
            tokens=doc.num_tokens if doc else 0,
            attempts=job.attempts,
            error=job.error or (doc.error if doc and job.status != "done" else None),
            code=(job.result or {}).get("code") if job.status == "failed" else None,
            created_at=_aware(job.created_at),
            started_at=_aware(job.started_at),
            finished_at=_aware(job.finished_at),
            heartbeat_at=_aware(job.heartbeat_at),
            tokens_done=int(tokens_done),
            size_bytes=doc.size_bytes if doc else 0,
            pages=pages,
        )

    def get(self, job_id: str) -> JobInfo:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id!r} does not exist")
            return self._info(s, job)

    def list(self, corpus: str | None = None, limit: int = 200) -> list[JobInfo]:
        """Newest first; only one corpus's jobs when `corpus` is given."""
        with self.db.session() as s:
            q = select(Job).order_by(Job.created_at.desc()).limit(limit)
            if corpus is not None:
                c = s.scalar(select(Corpus).where(Corpus.name == corpus))
                if c is None:
                    raise NotFound(f"corpus {corpus!r} does not exist")
                q = q.where(Job.corpus_id == c.id)
            return [self._info(s, j) for j in s.scalars(q)]

    def cancel(self, job_id: str) -> JobInfo:
        """Cancel a queued or running job; its worker stops at the next segment boundary and its
        document is marked failed ("cancelled"), ready for `retry`."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id!r} does not exist")
            if job.status not in LIVE:
                raise Conflict(
                    f"job {job_id} is {job.status}; only queued or running jobs can be cancelled"
                )
            job.status, job.finished_at, job.error = "cancelled", utcnow(), "cancelled"
            doc = s.get(Document, job.document_id) if job.document_id is not None else None
            if doc is not None and doc.stage != "ready":
                doc.stage, doc.error, doc.eta_s = "failed", "cancelled", None
            corpus_id = job.corpus_id
        if corpus_id is not None:
            self.ingestor.refresh_status(corpus_id)
        return self.get(job_id)

    def retry(self, job_id: str) -> JobInfo:
        """Run a failed or cancelled job's document again, as a new job; it resumes from the
        document's last stored segment."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id!r} does not exist")
            if job.status in LIVE:
                raise Conflict(f"job {job_id} is still {job.status}")
            doc = s.get(Document, job.document_id) if job.document_id is not None else None
            if doc is None:
                raise NotFound(f"the document of job {job_id} no longer exists")
            if doc.stage == "ready":
                raise Conflict(f"{doc.filename} is already ready")
            corpus = s.get(Corpus, doc.corpus_id)
            corpus_name, corpus_id, document_id = corpus.name, corpus.id, doc.id
        new = self._job_for(corpus_name, corpus_id, document_id)
        self.broker.enqueue(self.queue, new.id, new.kind, new.payload)
        return self.get(new.id)
