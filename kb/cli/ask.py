"""`kb ask`: a question over a corpus, streamed or as one JSON object."""

from __future__ import annotations

import json
import sys

from kb.cli.common import knowledge_base as _kb


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


def register(sub) -> None:
    c = sub.add_parser("ask", help="ask a question over a corpus")
    c.add_argument("name")
    c.add_argument("question")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--density", type=float, default=None, help="fraction of chunks each query attends")
    c.add_argument("--dense", action="store_true", help="attend every chunk")
    c.set_defaults(func=cmd_ask)
