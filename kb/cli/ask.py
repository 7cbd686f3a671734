"""`kb ask`: a question over a corpus, streamed or as one JSON object, from a running server when
one answers, else from this process."""

from __future__ import annotations

import json
import sys

from kb.cli.answering import add_answer_options, answerer, print_citations


def cmd_ask(args) -> int:
    """Answer from a running server when one answers, else in this process (see kb/cli/answering.py)."""
    source = answerer(args, args.name)
    try:
        print(f"kb: answering from {source.where}", file=sys.stderr, flush=True)
        stream = None if args.json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        out = source.answer(args.question, [], stream)
    finally:
        source.close()
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print()
        print_citations(out["citations"])
    return 0


def register(sub) -> None:
    c = sub.add_parser("ask", help="ask a question over a corpus")
    c.add_argument("name")
    c.add_argument("question")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    add_answer_options(c)
    c.set_defaults(func=cmd_ask)
