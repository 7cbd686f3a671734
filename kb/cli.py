"""The `kb` command line: corpora, ingestion, questions, the server and cache operations.

Every command prints a one-line reason on stderr and exits non-zero when it fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from kb.errors import KBError


def _kb():
    from kb.service import KnowledgeBase

    return KnowledgeBase()


def cmd_model_fetch(args) -> int:
    from kb.settings import Settings
    from kb.model.demo import DEMO_NAME, ensure_demo_model

    s = Settings()
    if s.model != DEMO_NAME:
        print(f"KB_MODEL is {s.model}: nothing to fetch", file=sys.stderr)
        return 0
    folder = ensure_demo_model(s.resolved_models_dir)
    print(f"demo model ready: {folder}", file=sys.stderr)
    return 0


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


def cmd_ask(args) -> int:
    from kb.engine.sequence import SamplingParams

    kb = _kb()
    if args.dense or args.density is not None:
        kb.settings.density = 1.0 if args.dense else args.density
    sp = SamplingParams(max_tokens=args.max_tokens or kb.settings.max_tokens, temperature=args.temperature)
    stream = None if args.json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    out = kb.answer(args.name, args.question, sp, on_text=stream)
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print()
        for i, c in enumerate(out["citations"], 1):
            page = f", page {c['page']}" if c.get("page") else ""
            print(f"[{i}] {c['document']}{page}: {c['text'][:160]}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from kb.api.app import create_app
    from kb.settings import Settings

    s = Settings()
    host, port = args.host or s.host, args.port or s.port
    app = create_app()
    print(f"kb is serving on http://{host}:{port}  (API docs: http://{host}:{port}/docs)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kb", description="Shared-context knowledge base (MoSKA).")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the model").add_subparsers(dest="sub", required=True)
    model.add_parser("fetch", help="fetch and convert the demo model").set_defaults(func=cmd_model_fetch)

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

    c = sub.add_parser("ask", help="ask a question over a corpus")
    c.add_argument("name")
    c.add_argument("question")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--density", type=float, default=None, help="fraction of chunks each query attends")
    c.add_argument("--dense", action="store_true", help="attend every chunk")
    c.set_defaults(func=cmd_ask)

    c = sub.add_parser("serve", help="start the HTTP API")
    c.add_argument("--host", default=None)
    c.add_argument("--port", type=int, default=None)
    c.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KBError as e:
        print(f"kb: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kb: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # last resort: one line for the user, the traceback for the log
        logging.getLogger("kb").debug("unexpected error", exc_info=True)
        print(f"kb: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
