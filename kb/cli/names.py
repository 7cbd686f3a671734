"""Fast checks of the names a command is given, before anything heavy loads.

`kb ask typo "..."` used to load torch, the model and the engine before saying the corpus does
not exist (8 s); `require_corpus` reads the corpus names from the database with SQLAlchemy alone
(stdlib sqlite3, or SQLAlchemy for PostgreSQL: well under a second) and says which existing names
are close ("did you mean").
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

from kb.errors import NotFound


def suggest(name: str, known: list[str], n: int = 3) -> str:
    """`; did you mean 'a' or 'b'?` for the known names close to `name`, else ''."""
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.6)
    if not close:
        lower = {k.lower(): k for k in known}
        close = [
            lower[k] for k in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)
        ]
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def unknown_corpus(name: str, known: list[str]) -> str:
    """The message for a corpus that does not exist, with suggestions or the way to make one."""
    hint = suggest(name, known)
    if not hint:
        hint = (
            f" (corpora: {', '.join(sorted(known))})"
            if known and len(known) <= 8
            else ("" if known else "; there are no corpora yet: kb corpus create NAME")
        )
    return f"corpus {name!r} does not exist{hint}"


def _column(
    sql: str, params: dict | None = None, database_url: str | None = None
) -> list[str] | None:
    """The first column of a query on this knowledge base's database; None when it cannot be
    read here (no tables yet, an unreachable server), so the caller falls back to the full check."""
    params = params or {}
    if database_url is None:
        from kb.settings import Settings  # pydantic: not for `kb --help`

        database_url = Settings().resolved_database_url
    if database_url.startswith(
        "sqlite:///"
    ):  # the stdlib driver: SQLAlchemy alone takes 0.4 s to import
        import sqlite3

        path = Path(database_url.removeprefix("sqlite:///"))
        if not path.exists():
            return []  # nothing was ever created in this home
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as c:
                return [row[0] for row in c.execute(sql, params)]
        except sqlite3.Error:
            return None
    from sqlalchemy import text  # 0.4 s: only for a server database
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with _sql_engine(database_url).connect() as c:
            return [row[0] for row in c.execute(text(sql), params)]
    except SQLAlchemyError:
        return None


@functools.cache
def _sql_engine(database_url: str):
    """One SQLAlchemy engine per database for the whole command (not one per lookup)."""
    from sqlalchemy import create_engine

    if database_url.startswith("postgresql://"):
        database_url = "postgresql+psycopg://" + database_url.removeprefix("postgresql://")
    return create_engine(database_url)


def corpus_names(database_url: str | None = None) -> list[str] | None:
    """The corpus names in the database (None: not readable here)."""
    return _column("SELECT name FROM corpora ORDER BY name", database_url=database_url)


def require_corpus(name: str, database_url: str | None = None) -> None:
    """Raise NotFound, with "did you mean", when corpus `name` is certainly not in the database."""
    known = corpus_names(database_url)
    if known is not None and name not in known:
        raise NotFound(unknown_corpus(name, known))


def require_user(name: str, database_url: str | None = None) -> None:
    """Raise NotFound, with "did you mean", when user `name` is certainly not in the database."""
    known = _column("SELECT name FROM users ORDER BY name", database_url=database_url)
    if known is not None and name not in known:
        hint = suggest(name, known) or (
            "; there are no users yet: kb user add NAME --admin" if not known else ""
        )
        raise NotFound(f"user {name!r} does not exist{hint}")


def require_job(job_id: str, kind: str, message: str, database_url: str | None = None) -> None:
    """Raise NotFound(`message`) when no job of `kind` has id `job_id`, naming the ids it starts."""
    found = _column(
        "SELECT id FROM jobs WHERE id = :id AND kind = :kind",
        {"id": job_id, "kind": kind},
        database_url,
    )
    if found is not None and not found:
        near = (
            _column(
                "SELECT id FROM jobs WHERE kind = :kind AND id LIKE :p",
                {"kind": kind, "p": f"{job_id}%"},
                database_url,
            )
            or []
        )
        hint = f"; did you mean {near[0]!r}?" if len(near) == 1 else ""
        raise NotFound(message + hint)
