"""Ingestion as jobs: submit files, run them on workers, follow their progress.

    jobs = jobs_for(kb)                      # broker from KB_REDIS_URL, else in-process
    subs = jobs.submit("handbook", paths)    # Job rows first, then job ids on the broker
    infos = jobs.wait([s.job_id for s in subs if s.job_id])

With the in-process broker nothing outside this process could run the jobs, so `submit`
starts a local worker thread; with Redis, `kb worker` processes run them. See docs/JOBS.md.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from kb.jobs.queue import INGEST_QUEUE, JobQueue
from kb.jobs.records import JobInfo, Submission
from kb.jobs.worker import Worker, WorkerConfig, WorkerPool
from storage.broker import Broker, MemoryBroker, make_broker

__all__ = [
    "JobInfo",
    "JobQueue",
    "JobService",
    "Submission",
    "Worker",
    "WorkerConfig",
    "WorkerPool",
    "jobs_for",
    "INGEST_QUEUE",
]


class JobService:
    """The job side of one KnowledgeBase: its broker, queue, and (in-process) a local worker."""

    def __init__(self, kb, broker: Broker | None = None, config: WorkerConfig | None = None):
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

    def close(self) -> None:
        self.stop_local_worker()
        self.broker.close()


_services: weakref.WeakKeyDictionary[object, JobService] = weakref.WeakKeyDictionary()
_services_lock = threading.Lock()


def jobs_for(kb) -> JobService:
    """The JobService of a KnowledgeBase, made on first use (one broker per knowledge base)."""
    with _services_lock:
        svc = _services.get(kb)
        if svc is None:
            svc = _services[kb] = JobService(kb)
        return svc
