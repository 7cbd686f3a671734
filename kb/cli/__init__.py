"""The `kb` command line: corpora, ingestion, questions, the server, jobs and caches.

Each command group lives in its own module with a `register(subparsers)` function; every
command prints a one-line reason on stderr and exits non-zero when it fails.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kb.cli.names import suggest
from kb.errors import KBError

COMMAND_MODULES = (
    "kb.cli.corpus",
    "kb.cli.ask",
    "kb.cli.chat",
    "kb.cli.serve",
    "kb.cli.users",
    "kb.cli.jobs",
    "kb.cli.cache",
)


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped command (`kb corpsu list`)."""

    def error(self, message: str):
        import re

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2)) or [
                c.strip() for c in m.group(2).split(",")
            ]
            message += suggest(m.group(1), choices)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = Parser(prog="kb", description="Shared-context knowledge base (MoSKA).")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
