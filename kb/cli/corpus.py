"""`kb corpus create|list|delete` and `kb ingest`."""

from __future__ import annotations

import json
import sys

from kb.cli.common import knowledge_base as _kb


def cmd_corpus_create(args) -> int:
    info = _kb().create_corpus(args.name)
    print(f"created corpus {info.name}")
    return 0


def cmd_corpus_list(args) -> int:
    rows = _kb().list_corpora()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    if not rows:
        print("no corpora yet: kb corpus create NAME")
        return 0
    print(f"{'NAME':24} {'STATUS':9} {'DOCS':>5} {'SEGMENTS':>8} {'TOKENS':>9}")
    for r in rows:
        print(f"{r.name:24} {r.status:9} {r.documents:5d} {r.segments:8d} {r.tokens:9d}")
    return 0


def cmd_corpus_delete(args) -> int:
    _kb().delete_corpus(args.name)
    print(f"deleted corpus {args.name}")
    return 0


def cmd_ingest(args) -> int:
    kb = _kb()
    kb.corpus_info(args.name)  # fail fast on an unknown corpus

    def progress(filename: str, stage: str, frac: float) -> None:
        if not args.quiet:
            print(f"  {filename}: {stage} {frac * 100:5.1f}%", file=sys.stderr)

    results = kb.ingest(args.name, args.files, progress)
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        if r.status == "failed":
            print(f"{r.filename}: failed: {r.error}", file=sys.stderr)
        else:
            print(f"{r.filename}: {r.status} ({r.segments} segments, {r.tokens} tokens)")
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
    c.set_defaults(func=cmd_ingest)
