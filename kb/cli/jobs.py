"""`kb worker` and `kb jobs list|cancel|retry`: running and managing ingest jobs."""

from __future__ import annotations

import signal
import sys
import threading

from kb.cli.common import command_group, eta_text, human_size, print_json_or_empty, subcommand
from kb.cli.common import knowledge_base as _kb
from kb.cli.names import require_corpus, require_job


def cmd_worker(args) -> int:
    """Run ingest jobs until SIGTERM or Ctrl-C (the jobs in hand are finished first)."""
    from kb.jobs import JobService, WorkerConfig, WorkerPool  # heavy: torch, for the worker

    kb = _kb()
    config = WorkerConfig(
        heartbeat_s=args.heartbeat_s,
        stale_s=args.stale_s,
        max_attempts=args.max_attempts,
        backoff_s=args.backoff_s,
        sweep_s=max(args.stale_s / 2, 1.0),
    )
    jobs = JobService(kb, config=config)
    if jobs.in_process:
        print(
            "kb: worker: no KB_REDIS_URL, so this worker sees only jobs left queued in the database",
            file=sys.stderr,
        )
    pool = WorkerPool(kb, jobs.broker, args.concurrency, config, name=args.name)
    stopping = threading.Event()

    def _stop(signum, _frame) -> None:
        if (
            stopping.is_set()
        ):  # second signal: leave now; the job's heartbeat stops and another worker takes it
            raise SystemExit(128 + signum)
        stopping.set()
        pool.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(
        f"worker {pool.workers[0].consumer}: {args.concurrency} thread(s), "
        f"{'redis' if not jobs.in_process else 'in-process'} broker",
        file=sys.stderr,
        flush=True,
    )
    pool.start()
    pool.join()
    jobs.close()
    return 0


def cmd_jobs_list(args) -> int:
    if args.corpus:
        require_corpus(args.corpus)
    rows = _kb().jobs.queue.list(args.corpus)
    if print_json_or_empty(rows, args.json, "no jobs"):
        return 0
    print(
        f"{'ID':36} {'CORPUS':16} {'STATUS':9} {'ACTIVITY':20} {'%':>6} {'ETA':>10} {'SIZE':>10}  DOCUMENT"
    )
    for r in rows:
        line = (
            f"{r.id:36} {r.corpus or '-':16} {r.status:9} {r.activity:20} "
            f"{r.percent:6.1f} {eta_text(r.eta_s):>10} {human_size(r.size_bytes):>10}  {r.filename or '-'}"
        )
        if r.error and r.status != "done":
            line += f"  ({r.error})"
        print(line)
    return 0


def cmd_jobs_cancel(args) -> int:
    require_job(args.id, "ingest", f"job {args.id!r} does not exist")
    info = _kb().jobs.queue.cancel(args.id)
    print(f"cancelled job {info.id} ({info.filename})")
    return 0


def cmd_jobs_retry(args) -> int:
    require_job(args.id, "ingest", f"job {args.id!r} does not exist")
    jobs = _kb().jobs
    info = jobs.queue.retry(args.id)
    print(f"retrying {info.filename} as job {info.id}")
    if jobs.in_process:
        print(
            "kb: no KB_REDIS_URL: the job runs at the next `kb worker` or `kb ingest`",
            file=sys.stderr,
        )
    return 0


def register(sub) -> None:
    c = sub.add_parser("worker", help="run ingest jobs from the broker")
    c.add_argument(
        "--concurrency", type=int, default=1, help="jobs run at once (threads sharing one model)"
    )
    c.add_argument("--name", default=None, help="consumer name (default: host-pid)")
    c.add_argument("--heartbeat-s", type=float, default=5.0, help="seconds between heartbeats")
    c.add_argument(
        "--stale-s", type=float, default=60.0, help="a job silent this long is taken over"
    )
    c.add_argument("--max-attempts", type=int, default=3, help="attempts before a document fails")
    c.add_argument(
        "--backoff-s", type=float, default=2.0, help="first retry delay (doubles each attempt)"
    )
    c.set_defaults(func=cmd_worker)

    jobs = command_group(sub, "jobs", "list, cancel, retry ingest jobs")
    subcommand(
        jobs,
        "list",
        cmd_jobs_list,
        "jobs with their documents' stage, progress and ETA",
        optional="corpus",
        json=True,
    )
    subcommand(jobs, "cancel", cmd_jobs_cancel, "cancel a queued or running job", "id")
    subcommand(
        jobs, "retry", cmd_jobs_retry, "ingest a failed or cancelled job's document again", "id"
    )
