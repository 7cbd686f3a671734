"""Ingestion as jobs: submit files, run them on workers, follow their progress.

    jobs = kb.jobs                           # the KnowledgeBase's JobService (broker from
                                             # KB_REDIS_URL, else in-process)
    subs = jobs.submit("handbook", paths)    # Job rows first, then job ids on the broker
    infos = jobs.wait([s.job_id for s in subs if s.job_id])

With the in-process broker nothing outside this process could run the jobs, so `submit`
starts a local worker thread; with Redis, `kb worker` processes run them. See docs/JOBS.md.
Operations on what this process holds (the cache admin's) run here: `run_here` records them as
jobs of their own kind and runs them on a thread, the row carrying status, result or reason.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kb.errors import KBError
from kb.ingest.pipeline import Ingestor
from kb.jobs.queue import INGEST_QUEUE, JobQueue
from kb.jobs.records import JobInfo, Submission
from kb.jobs.worker import Worker, WorkerConfig, WorkerPool
from kb.settings import Settings
from storage.broker import Broker, MemoryBroker, make_broker
from storage.db import Database
from storage.models import Job, utcnow

log = logging.getLogger(__name__)

__all__ = [
    "JobInfo",
    "JobQueue",
    "JobService",
    "Submission",
    "Worker",
    "WorkerConfig",
    "WorkerPool",
    "INGEST_QUEUE",
]


class JobHost(Protocol):
    """What the job side needs of its knowledge base: settings, database and ingestor."""

    settings: Settings
    db: Database
    ingestor: Ingestor


class JobService:
    """The job side of one KnowledgeBase: its broker, queue, and (in-process) a local worker."""

    def __init__(
        self, kb: JobHost, broker: Broker | None = None, config: WorkerConfig | None = None
    ):
        s = kb.settings
        self.kb = kb
        self.broker = broker or make_broker(s.redis_url, prefix=s.redis_prefix)
        self.queue = JobQueue(kb.db, kb.ingestor, self.broker)
        self.config = config or WorkerConfig()
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()

    @property
    def in_process(self) -> bool:
        """True when jobs can only run inside this process (no Redis)."""
        return isinstance(self.broker, MemoryBroker)

    def submit(
        self, corpus: str, paths: list[str | Path], start_worker: bool = True
    ) -> list[Submission]:
        """Queue the files' ingest jobs; in-process, also start the local worker unless told not to
        (the jobs then wait in the database for the next worker)."""
        subs = self.queue.submit(corpus, paths)
        if self.in_process and start_worker:
            self.start_local_worker()
        return subs

    def start_local_worker(self, concurrency: int = 1) -> WorkerPool:
        """Start (once) worker threads in this process."""
        with self._lock:
            if self._pool is None:
                self._pool = WorkerPool(self.kb, self.broker, concurrency, self.config).start()
            return self._pool

    def stop_local_worker(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def wait(
        self,
        job_ids: list[str],
        on_update: Callable[[JobInfo], None] | None = None,
        poll_s: float = 0.2,
        timeout_s: float | None = None,
    ) -> list[JobInfo]:
        """Poll the database until every job is done, failed or cancelled; `on_update` gets
        each job whenever its stage or percent changes. TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen: dict[str, tuple] = {}
        while True:
            infos = [self.queue.get(j) for j in job_ids]
            for info in infos:
                key = (info.status, info.stage, round(info.percent, 1))
                if on_update is not None and seen.get(info.id) != key:
                    on_update(info)
                seen[info.id] = key
            if all(i.finished for i in infos):
                return infos
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{sum(not i.finished for i in infos)} jobs still running")
            time.sleep(poll_s)

    def run_here(
        self,
        kind: str,
        payload: dict,
        work: Callable[[], dict],
        corpus_id: int | None = None,
        expected: tuple[type[Exception], ...] = (KBError,),
    ) -> str:
        """Record a job of `kind` and run `work` on a thread of this process; returns the job id
        at once. `expected` errors fail the job with their message; others also log a trace.
        The thread is not a daemon, so a command-line process finishes the work before exiting."""
        job_id = str(uuid.uuid4())
        with self.kb.db.session() as s:
            s.add(Job(id=job_id, kind=kind, corpus_id=corpus_id, payload=payload, status="queued"))
        threading.Thread(
            target=self._run_here, args=(job_id, work, expected), name=f"kb-{kind}-{job_id[:8]}"
        ).start()
        return job_id

    def _run_here(
        self, job_id: str, work: Callable[[], dict], expected: tuple[type[Exception], ...]
    ) -> None:
        db = self.kb.db
        with db.session() as s:
            job = s.get(Job, job_id)
            job.status, job.started_at, job.attempts = "running", utcnow(), (job.attempts or 0) + 1
        try:
            result, error, status = work(), None, "done"
        except expected as e:
            result, error, status = None, getattr(e, "message", None) or str(e), "failed"
        except Exception as e:  # a thread has no caller to raise to: the row carries the reason
            log.exception("job %s failed", job_id)
            result, error, status = None, f"{type(e).__name__}: {e}", "failed"
        with db.session() as s:
            job = s.get(Job, job_id)
            job.status, job.result, job.error, job.finished_at = status, result, error, utcnow()

    def close(self) -> None:
        self.stop_local_worker()
        self.broker.close()
