"""`kb corpus create|list|delete` and `kb ingest`."""

from __future__ import annotations

import sys

from kb.cli.common import catalog, command_group, human_size, print_json_or_empty, subcommand
from kb.cli.common import knowledge_base as _kb
from kb.cli.names import require_corpus


def cmd_corpus_create(args) -> int:
    info = _kb().create_corpus(args.name)
    print(f"created corpus {info.name}")
    return 0


def cmd_corpus_list(args) -> int:
    rows = catalog().list_corpora()
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


def cmd_corpus_documents(args) -> int:
    """A corpus's documents: stage, pages, size, tokens, and why one failed."""
    import json

    require_corpus(args.name)
    kb = _kb()
    docs = kb.documents(args.name)
    facts = kb.ingestor.document_facts([d["id"] for d in docs])
    docs = [{**d, **facts.get(d["id"], {})} for d in docs]
    if args.json:
        print(json.dumps(docs, indent=2))
        return 0
    if not docs:
        print(f"no documents yet: kb ingest {args.name} FILE...")
        return 0
    print(f"{'ID':>5} {'STAGE':10} {'PAGES':>5} {'SIZE':>10} {'TOKENS':>8}  DOCUMENT")
    for d in docs:
        pages = str(d["pages"]) if d.get("pages") else "-"
        line = (
            f"{d['id']:5d} {d['stage']:10} {pages:>5} {human_size(d.get('size_bytes') or 0):>10} "
            f"{d['tokens']:8d}  {d['filename']}"
        )
        print(line + (f"  ({d['error']})" if d.get("error") and d["stage"] == "failed" else ""))
    return 0


def _refuse_unsupported(files: list[str]) -> tuple[list[str], list[str]]:
    """Split the files into those kb reads and one-line reasons for the others (named types
    refused before anything is uploaded; a missing file is left for the store step to report)."""
    from pathlib import Path

    from kb.ingest.errors import IngestError  # kb.ingest loads its parsers: not for --help
    from kb.ingest.pipeline import refuse_unsupported  # heavy: torch, only when ingesting
    from kb.settings import Settings  # pydantic: not for `kb --help`

    allowed = Settings().allowed_types
    keep, refused = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                head = fh.read(8192)
        except OSError:
            keep.append(f)
            continue
        try:
            if head:
                refuse_unsupported(Path(f).name, head, allowed)
            keep.append(f)
        except IngestError as e:
            refused.append(f"{Path(f).name}: refused: {e}")
    return keep, refused


def cmd_ingest(args) -> int:
    """Ingest through the job path: without KB_REDIS_URL an in-process worker runs the jobs
    until they finish; with it, `kb worker` processes do, and this waits (or not: --no-wait)."""
    require_corpus(args.name)  # before anything heavy loads: a typo is reported at once
    from kb.cli.ingest_progress import IngestDisplay  # heavy: kb.jobs loads the pipeline

    files, refused = _refuse_unsupported(args.files)
    for r in refused:
        print(r, file=sys.stderr)
    if not files:
        return 1

    kb = _kb()
    jobs = kb.jobs
    try:
        subs = jobs.submit(args.name, files, start_worker=not args.no_wait)
        ids = [s.job_id for s in subs if s.job_id]
        if args.no_wait:
            for s in subs:
                if s.status == "failed":
                    print(f"{s.filename}: failed: {s.error}", file=sys.stderr)
                elif s.status == "duplicate":
                    print(f"{s.filename}: duplicate ({s.segments} segments, {s.tokens} tokens)")
                else:
                    print(f"{s.filename}: queued (job {s.job_id})")
            return 1 if refused or any(s.status == "failed" for s in subs) else 0
        if ids and not jobs.in_process and not args.quiet:
            print(
                f"waiting for {len(ids)} jobs (run `kb worker` if none is running)", file=sys.stderr
            )
        sizes = {i.id: i.size_bytes for i in (jobs.queue.get(j) for j in ids)}
        draw = not args.quiet and sys.stderr.isatty()
        with IngestDisplay(sizes, draw=draw, lines=not args.quiet and not draw) as display:
            done = {i.id: i for i in jobs.wait(ids, display)}
    finally:
        jobs.close()
    failed = bool(refused)
    for s in subs:
        info = done.get(s.job_id) if s.job_id else None
        if s.status == "failed" or (info is not None and info.status != "done"):
            failed = True
            reason = s.error if info is None else (info.error or info.status)
            print(f"{s.filename}: failed: {reason}", file=sys.stderr)
        elif info is not None:
            pages = f", {info.pages} pages" if info.pages else ""
            print(
                f"{s.filename}: ready ({human_size(info.size_bytes)}{pages}, {info.segments_total} segments, "
                f"{info.tokens} tokens)"
            )
        else:
            print(f"{s.filename}: {s.status} ({s.segments} segments, {s.tokens} tokens)")
    return 1 if failed else 0


def register(sub) -> None:
    corpus = command_group(sub, "corpus", "create, list, delete corpora")
    subcommand(corpus, "create", cmd_corpus_create, "create an empty corpus", "name")
    subcommand(corpus, "list", cmd_corpus_list, "list corpora", json=True)
    subcommand(
        corpus,
        "documents",
        cmd_corpus_documents,
        "a corpus's documents: stage, pages, size, tokens",
        "name",
        json=True,
        aliases=("docs",),
    )
    subcommand(
        corpus, "delete", cmd_corpus_delete, "delete a corpus, its documents and its KV", "name"
    )

    c = sub.add_parser("ingest", help="add files to a corpus and precompute their KV")
    c.add_argument("name")
    c.add_argument("files", nargs="+")
    c.add_argument("-q", "--quiet", action="store_true")
    c.add_argument(
        "--no-wait", action="store_true", help="submit the jobs and return (with KB_REDIS_URL)"
    )
    c.set_defaults(func=cmd_ingest)
