"""Helpers shared by the command modules."""

from __future__ import annotations


def knowledge_base():
    from kb.service import KnowledgeBase

    return KnowledgeBase()


def database():
    """The knowledge base's database alone (no model, no engine): for commands that need no
    more, e.g. `kb user ...`, which then answer in about a second instead of six."""
    from kb.settings import Settings
    from storage.db import Database

    return Database(Settings().resolved_database_url)



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
