"""`kb chat NAME`: a multi-turn conversation over a corpus, one question per line.

Each answer streams as it comes, its citations follow on stderr, and the conversation so far goes
with every question. Answers come from a running server when one answers, else from this
process (see kb/cli/answering.py). An empty line, `/exit`, Ctrl-D or Ctrl-C ends it; `/reset`
forgets the conversation.
"""

from __future__ import annotations

import sys

from kb.cli.answering import add_answer_options, answerer, print_citations


def _questions(prompt: str):
    """Lines from stdin: with a prompt on a terminal, without one from a pipe."""
    tty = sys.stdin.isatty()
    while True:
        try:
            line = input(prompt) if tty else sys.stdin.readline()
        except EOFError:
            return
        if not tty and not line:
            return
        yield line.strip()


def cmd_chat(args) -> int:
    source = answerer(args, args.name)
    history: list[dict] = []
    try:
        print(
            f"kb: chatting over {args.name!r} with answers from {source.where}; "
            "an empty line or /exit ends, /reset forgets",
            file=sys.stderr,
            flush=True,
        )
        for q in _questions(f"{args.name}> "):
            if q in ("", "/exit", "/quit"):
                break
            if q == "/reset":
                history.clear()
                print("kb: conversation forgotten", file=sys.stderr)
                continue
            out = source.answer(q, history, lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            print(flush=True)
            if out.get("finish_reason") == "length":
                print("kb: [stopped at the token limit]", file=sys.stderr)
            print_citations(out["citations"])
            history += [
                {"role": "user", "content": q},
                {"role": "assistant", "content": out["answer"]},
            ]
            if args.turns and len(history) // 2 >= args.turns:
                history = history[-2 * args.turns :]
    finally:
        source.close()
    return 0


def register(sub) -> None:
    c = sub.add_parser("chat", help="a conversation over a corpus (one question per line)")
    c.add_argument("name")
    c.add_argument(
        "--turns", type=int, default=8, help="past turns sent with each question (0: all)"
    )
    add_answer_options(c)
    c.set_defaults(func=cmd_chat)
