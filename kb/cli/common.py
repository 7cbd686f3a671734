"""Helpers shared by the command modules.

The one seam between the command line and the service: `knowledge_base()` (the whole service:
torch, the engine), `catalog()` (corpus listings: the database and the model's hashes) and
`database()` are the only places the commands reach it, each imported when a command runs so
that `kb --help` and a mistyped name answer before SQLAlchemy or torch load.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def knowledge_base():
    """The whole service (imports torch and the engine: seconds)."""
    from kb.service import KnowledgeBase  # heavy: torch; only for the commands that use it

    return KnowledgeBase()


def catalog():
    """Corpus listings without the engine: `kb corpus list` answers in well under a second."""
    from kb.catalog import Catalog  # SQLAlchemy: not for `kb --help`
    from kb.settings import Settings  # pydantic: not for `kb --help`
    from storage.db import Database  # SQLAlchemy: not for `kb --help`

    settings = Settings()
    settings.resolved_home.mkdir(parents=True, exist_ok=True)  # as KnowledgeBase() makes it
    return Catalog(settings, Database(settings.resolved_database_url))


def database():
    """The knowledge base's database alone (no model, no engine): for commands that need no
    more, e.g. `kb user ...`, which then answer in about a second instead of six."""
    from kb.settings import Settings  # as catalog(): not for `kb --help`
    from storage.db import Database  # SQLAlchemy: not for `kb --help`

    return Database(Settings().resolved_database_url)


def command_group(sub, name: str, help: str):
    """A command of subcommands (`kb NAME SUB ...`), one of which must be given; returns the
    subparsers to add them to (with `subcommand`)."""
    return sub.add_parser(name, help=help).add_subparsers(dest="sub", required=True)


def subcommand(
    group,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    *positionals: str,
    optional: str | None = None,
    json: bool = False,
    aliases: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """A subcommand that runs `func(args)`: its positional arguments, then one `optional`
    positional (nargs "?"), then with `json` a `--json` flag, in that order (as `--help` lists
    them). Returns the parser for the arguments only it has."""
    c = group.add_parser(name, aliases=list(aliases), help=help)
    for arg in positionals:
        c.add_argument(arg)
    if optional is not None:
        c.add_argument(optional, nargs="?")
    if json:
        c.add_argument("--json", action="store_true")
    c.set_defaults(func=func)
    return c


def print_json_or_empty(rows: list, as_json: bool, empty: str) -> bool:
    """The opening every listing command shares: `--json` prints the rows' dicts, no rows prints
    `empty`. Returns True when nothing is left to print."""
    import json

    if as_json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return True
    if not rows:
        print(empty)
        return True
    return False


def human_size(n: float) -> str:
    """Bytes as people read them: 512 B, 1.5 KiB, 3.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def eta_text(eta_s: float | None) -> str:
    """An ETA as a column shows it: "-" while unknown, else 45 s, 3 min 20 s."""
    if eta_s is None:
        return "-"
    eta_s = max(0, round(eta_s))
    return f"{eta_s} s" if eta_s < 60 else f"{eta_s // 60} min {eta_s % 60:02d} s"
