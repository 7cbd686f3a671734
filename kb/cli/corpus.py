"""`kb corpus create|list|delete` and `kb ingest`."""

from __future__ import annotations

import sys

from kb.cli.common import knowledge_base as _kb
from kb.cli.common import print_json_or_empty
from kb.cli.names import require_corpus


def cmd_corpus_create(args) -> int:
    info = _kb().create_corpus(args.name)
    print(f"created corpus {info.name}")
    return 0


def cmd_corpus_list(args) -> int:
    rows = _kb().list_corpora()
    if print_json_or_empty(rows, args.json, "no corpora yet: kb corpus create NAME"):
        return 0
    print(f"{'NAME':24} {'STATUS':9} {'DOCS':>5} {'SEGMENTS':>8} {'TOKENS':>9}")
    for r in rows:
        print(f"{r.name:24} {r.status:9} {r.documents:5d} {r.segments:8d} {r.tokens:9d}")
    return 0


def cmd_corpus_delete(args) -> int:
    require_corpus(args.name)
    _kb().delete_corpus(args.name)
    print(f"deleted corpus {args.name}")
    return 0


def cmd_ingest(args) -> int:
    """Ingest through the job path: without KB_REDIS_URL an in-process worker runs the jobs
    until they finish; with it, `kb worker` processes do, and this waits (or not: --no-wait)."""
    require_corpus(args.name)  # before anything heavy loads: a typo is reported at once
    from kb.jobs import jobs_for

    kb = _kb()
    jobs = jobs_for(kb)
    try:
        subs = jobs.submit(args.name, args.files, start_worker=not args.no_wait)
        ids = [s.job_id for s in subs if s.job_id]
        if args.no_wait:
            for s in subs:
                if s.status == "failed":
                    print(f"{s.filename}: failed: {s.error}", file=sys.stderr)
                elif s.status == "duplicate":
                    print(f"{s.filename}: duplicate ({s.segments} segments, {s.tokens} tokens)")
                else:
                    print(f"{s.filename}: queued (job {s.job_id})")
            return 1 if any(s.status == "failed" for s in subs) else 0

        def progress(info) -> None:
            if not args.quiet and info.stage and info.status != "queued":
                frac = info.segments_done / max(1, info.segments_total) if info.stage != "ready" else 1.0
                print(f"  {info.filename}: {info.stage} {frac * 100:5.1f}%", file=sys.stderr)

        if ids and not jobs.in_process and not args.quiet:
            print(f"waiting for {len(ids)} jobs (run `kb worker` if none is running)", file=sys.stderr)
        done = {i.id: i for i in jobs.wait(ids, progress)}
    finally:
        jobs.close()
    failed = False
    for s in subs:
        info = done.get(s.job_id) if s.job_id else None
        if s.status == "failed" or (info is not None and info.status != "done"):
            failed = True
            reason = s.error if info is None else (info.error or info.status)
            print(f"{s.filename}: failed: {reason}", file=sys.stderr)
        elif info is not None:
            print(f"{s.filename}: ready ({info.segments_total} segments, {info.tokens} tokens)")
        else:
            print(f"{s.filename}: {s.status} ({s.segments} segments, {s.tokens} tokens)")
    return 1 if failed else 0


def register(sub) -> None:
    corpus = sub.add_parser("corpus", help="create, list, delete corpora").add_subparsers(dest="sub", required=True)
    c = corpus.add_parser("create", help="create an empty corpus")
    c.add_argument("name")
    c.set_defaults(func=cmd_corpus_create)
    c = corpus.add_parser("list", help="list corpora")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_corpus_list)
    c = corpus.add_parser("delete", help="delete a corpus, its documents and its KV")
    c.add_argument("name")
    c.set_defaults(func=cmd_corpus_delete)

    c = sub.add_parser("ingest", help="add files to a corpus and precompute their KV")
    c.add_argument("name")
    c.add_argument("files", nargs="+")
    c.add_argument("-q", "--quiet", action="store_true")
    c.add_argument("--no-wait", action="store_true", help="submit the jobs and return (with KB_REDIS_URL)")
    c.set_defaults(func=cmd_ingest)
