"""The job worker: receive -> claim -> run -> ack, with a heartbeat while it runs.

A worker claims a job in the database before running it: the claim bumps `Job.attempts`, which
then serves as a fencing token (heartbeats and results are written only while the row still
carries it), so a job reclaimed from a worker that looked dead is never finished twice.
Cancellation and lost ownership are noticed between segments. Bad input (IngestError) fails
the document at once with its reason; other errors are retried with exponential backoff, and
after `max_attempts` the document fails and the message goes to the dead-letter stream.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from kb.errors import KBError
from kb.ingest.errors import IngestError
from kb.ingest.pipeline import Cancelled, Ingestor, failure_message
from kb.jobs.progress import ProgressWriter
from kb.jobs.queue import INGEST_QUEUE, JobQueue, utcnow
from storage.broker import Broker, Message
from storage.db import Database
from storage.models import Document, Job

log = logging.getLogger(__name__)


def default_consumer(index: int = 0) -> str:
    """A consumer name unique to this process (and thread index) on this host."""
    return f"{socket.gethostname()}-{os.getpid()}-{index}"


@dataclass(frozen=True)
class WorkerConfig:
    """Timing of a worker. A job whose heartbeat is older than `stale_s` is taken over."""

    heartbeat_s: float = 5.0
    stale_s: float = 60.0
    max_attempts: int = 3
    backoff_s: float = 2.0
    poll_s: float = 1.0
    sweep_s: float = 30.0  # how often `requeue_lost` runs


@dataclass(frozen=True)
class Claim:
    """A job this worker holds: `token` is the attempts value its claim wrote."""

    job_id: str
    document_id: int
    corpus: str
    token: int


class Heartbeat:
    """Background thread: touches the broker delivery and stamps Job/Document.heartbeat_at
    while the row still carries our token; `lost` turns True when it no longer does."""

    def __init__(
        self,
        db: Database,
        broker: Broker,
        queue: str,
        message: Message,
        consumer: str,
        claim: Claim,
        interval_s: float,
    ):
        self.db, self.broker, self.queue, self.message, self.consumer = (
            db,
            broker,
            queue,
            message,
            consumer,
        )
        self.claim, self.interval_s = claim, interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"kb-heartbeat-{claim.job_id[:8]}"
        )

    def beat(self) -> bool:
        """One heartbeat; False when the job is no longer ours (cancelled or taken over)."""
        try:
            self.broker.touch(
                self.queue, self.message, self.consumer
            )  # False after a Redis restart: the DB decides
        except Exception as e:
            log.warning("broker heartbeat failed: %s", e)
        now = utcnow()
        with self.db.session() as s:
            n = s.execute(
                update(Job)
                .where(
                    Job.id == self.claim.job_id,
                    Job.status == "running",
                    Job.attempts == self.claim.token,
                )
                .values(heartbeat_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if n:
                s.execute(
                    update(Document)
                    .where(Document.id == self.claim.document_id)
                    .values(heartbeat_at=now)
                    .execution_options(synchronize_session=False)
                )
        return bool(n)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.beat():
                    self.lost = True
                    return
            except Exception as e:  # a database hiccup: try again next beat
                log.warning("heartbeat of job %s failed: %s", self.claim.job_id, e)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """Runs ingest jobs from `broker` for the knowledge base `kb` (anything with `db`,
    `ingestor`): `run(stop)` loops until `stop` is set; `process(message)` runs one delivery."""

    def __init__(
        self,
        kb,
        broker: Broker,
        consumer: str | None = None,
        config: WorkerConfig | None = None,
        queue: str = INGEST_QUEUE,
    ):
        self.db: Database = kb.db
        self.ingestor: Ingestor = kb.ingestor
        self.broker, self.queue = broker, queue
        self.consumer = consumer or default_consumer()
        self.config = config or WorkerConfig()
        self.jobs = JobQueue(self.db, self.ingestor, broker, queue)
        self.processed = 0

    # -- loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Receive and run jobs until `stop` is set (the job in hand is finished first)."""
        cfg = self.config
        self.broker.ensure_group(self.queue)
        self.jobs.requeue_lost(cfg.stale_s)
        last_sweep = time.monotonic()
        while not stop.is_set():
            try:
                self.run_once(cfg.poll_s)
                if time.monotonic() - last_sweep >= cfg.sweep_s:
                    self.jobs.requeue_lost(cfg.stale_s)
                    last_sweep = time.monotonic()
            except Exception:  # the broker or database went away for a moment: keep serving
                log.exception("worker %s: loop error", self.consumer)
                stop.wait(cfg.poll_s)

    def run_once(self, timeout_s: float) -> bool:
        """Receive one delivery (waiting up to `timeout_s`) and process it; whether one came."""
        message = self.broker.receive(
            self.queue, self.consumer, timeout_s=timeout_s, reclaim_idle_s=self.config.stale_s
        )
        if message is None:
            return False
        self.process(message)
        return True

    # -- one job -------------------------------------------------------------------------------
    def claim(self, job_id: str) -> Claim | str:
        """Take the job in the database: queued, or running with a stale heartbeat. Returns the
        Claim, or the job's status ("missing" when gone) when it cannot be taken."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.config.stale_s)
        with self.db.session() as s:
            n = s.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    or_(
                        Job.status == "queued",
                        and_(
                            Job.status == "running",
                            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
                        ),
                    ),
                )
                .values(
                    status="running",
                    attempts=Job.attempts + 1,
                    started_at=now,
                    heartbeat_at=now,
                    error=None,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            job = s.get(Job, job_id)
            if job is None:
                return "missing"
            s.refresh(job)
            if not n:
                return job.status
            return Claim(
                job.id, job.document_id, (job.payload or {}).get("corpus", ""), job.attempts
            )

    def _ours(self, claim: Claim) -> bool:
        with self.db.session() as s:
            row = s.execute(
                select(Job.status, Job.attempts).where(Job.id == claim.job_id)
            ).one_or_none()
        return row is not None and row[0] == "running" and row[1] == claim.token

    def _finish(
        self, claim: Claim, status: str, error: str | None = None, result: dict | None = None
    ) -> bool:
        """Write a final or queued status if we still hold the job; whether we did."""
        values: dict = {"status": status, "error": error, "heartbeat_at": None}
        if status != "queued":
            values["finished_at"] = utcnow()
        if result is not None:
            values["result"] = result
        with self.db.session() as s:
            return bool(
                s.execute(
                    update(Job)
                    .where(
                        Job.id == claim.job_id, Job.status == "running", Job.attempts == claim.token
                    )
                    .values(**values)
                    .execution_options(synchronize_session=False)
                ).rowcount
            )

    def process(self, message: Message) -> None:
        """Run one delivery to its end and settle it with the broker."""
        cfg = self.config
        claim = self.claim(message.job_id)
        if isinstance(claim, str):
            if (
                claim == "running"
            ):  # a live worker holds it (or looked live a moment ago): look again later
                self.broker.retry(
                    self.queue,
                    message,
                    "held by another worker",
                    max_attempts=1 << 30,
                    backoff_s=cfg.heartbeat_s,
                )
            else:  # done, failed, cancelled or deleted: nothing to do
                self.broker.ack(self.queue, message)
            return
        log.info(
            "worker %s: job %s (document %s, attempt %d)",
            self.consumer,
            claim.job_id,
            claim.document_id,
            claim.token,
        )
        writer = ProgressWriter(self.db, self.broker, claim.corpus, claim.job_id)
        heartbeat = Heartbeat(
            self.db, self.broker, self.queue, message, self.consumer, claim, cfg.heartbeat_s
        )
        try:
            with heartbeat:
                result = self.ingestor.build(
                    claim.document_id,
                    hook=writer,
                    should_stop=lambda: heartbeat.lost or not self._ours(claim),
                )
            self._finish(
                claim, "done", result={"segments": result.segments, "tokens": result.tokens}
            )
            self.broker.ack(self.queue, message)
        except Cancelled:
            with self.db.session() as s:
                status = s.scalar(select(Job.status).where(Job.id == claim.job_id))
            if status == "cancelled":
                self.ingestor.mark_failed(claim.document_id, "cancelled")
            self.broker.ack(self.queue, message)  # cancelled, or another worker holds it now
        except (
            IngestError,
            KBError,
        ) as e:  # bad input: retrying cannot help; build marked it failed
            self._finish(
                claim, "failed", failure_message(e, ""), result={"code": getattr(e, "code", None)}
            )
            self.broker.ack(self.queue, message)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            log.warning(
                "job %s failed (attempt %d of %d): %s",
                claim.job_id,
                claim.token,
                cfg.max_attempts,
                reason,
            )
            if claim.token >= cfg.max_attempts:
                if self._finish(claim, "failed", reason):
                    self.ingestor.mark_failed(
                        claim.document_id, f"failed after {claim.token} attempts: {reason}"
                    )
                self.broker.retry(
                    self.queue, message, reason, max_attempts=message.attempt + 1
                )  # -> dead letters
            else:
                self._finish(claim, "queued", reason)
                self.broker.retry(
                    self.queue, message, reason, max_attempts=1 << 30, backoff_s=cfg.backoff_s
                )
        finally:
            self.processed += 1
            try:
                with self.db.session() as s:
                    corpus_id = s.scalar(
                        select(Document.corpus_id).where(Document.id == claim.document_id)
                    )
                if corpus_id is not None:
                    self.ingestor.refresh_status(corpus_id)
            except Exception as e:
                log.warning("corpus status not refreshed: %s", e)


class WorkerPool:
    """`concurrency` workers on threads of this process, sharing one model; `stop()` ends them
    after their current jobs."""

    def __init__(
        self,
        kb,
        broker: Broker,
        concurrency: int = 1,
        config: WorkerConfig | None = None,
        name: str | None = None,
    ):
        base = name or default_consumer()
        self.workers = [
            Worker(kb, broker, f"{base}-{i}" if concurrency > 1 else base, config)
            for i in range(concurrency)
        ]
        self.stop_event = threading.Event()
        self.threads = [
            threading.Thread(
                target=w.run, args=(self.stop_event,), daemon=True, name=f"kb-worker-{i}"
            )
            for i, w in enumerate(self.workers)
        ]

    def start(self) -> WorkerPool:
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout_s)

    def join(self) -> None:
        for t in self.threads:
            while t.is_alive():
                t.join(0.5)
