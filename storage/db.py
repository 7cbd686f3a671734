"""Database engine and sessions: SQLite by default, PostgreSQL (or any SQLAlchemy URL) by setting.

The schema is owned by the Alembic migrations in `storage/migrations`; opening a `Database`
upgrades it to the newest revision (and adopts databases made by the old `create_all`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

# Package-resource form, so it resolves inside an installed wheel as well as in the checkout.
SCRIPT_LOCATION = "storage:migrations"
# The revision that matches what `Base.metadata.create_all` built before migrations existed.
BASELINE_REVISION = "0001"
# The tables and columns of that revision: a database that has them but no alembic_version table
# was made by create_all and is stamped at the baseline instead of being created again.
BASELINE_COLUMNS: dict[str, frozenset[str]] = {
    "corpora": frozenset(
        {
            "id",
            "name",
            "model",
            "status",
            "settings",
            "cache_key",
            "preamble_kv_file",
            "preamble_checksum",
            "preamble_len",
            "hits",
            "created_at",
            "last_used_at",
        }
    ),
    "documents": frozenset(
        {
            "id",
            "corpus_id",
            "filename",
            "media_type",
            "content_hash",
            "size_bytes",
            "file_path",
            "stage",
            "error",
            "num_tokens",
            "created_at",
        }
    ),
    "segments": frozenset(
        {
            "id",
            "document_id",
            "seq",
            "char_start",
            "char_end",
            "page_start",
            "page_end",
            "num_tokens",
            "pos_start",
            "text",
            "token_ids",
            "kv_file",
            "kv_checksum",
            "cache_key",
        }
    ),
}
# Any fixed 64-bit key: serializes concurrent starts (API and workers) on one PostgreSQL database.
_PG_MIGRATION_LOCK = 0x6B62_6D69_6772_6174


def _set_wal(cur: sqlite3.Cursor, wait_s: float = 30.0) -> None:
    """Switch to WAL, retrying while locked: the first switch of a new file needs an exclusive
    lock and SQLite fails it at once (no busy wait) while another process is migrating it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def make_engine(url: str) -> Engine:
    """An engine with sane defaults: foreign keys and WAL on SQLite, pre-ping everywhere."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DB-API connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            _set_wal(cur)
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini): our scripts, optionally a live connection."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision of the migration scripts."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migration scripts found"
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is stamped with (None: unversioned)."""
    return MigrationContext.configure(connection).get_current_revision()


def _lock(connection: Connection) -> None:
    """Take a database-wide lock for the rest of this transaction, so that processes starting at
    once migrate one after the other (the later ones then find the schema current)."""
    name = connection.dialect.name
    if name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
    elif name == "sqlite":
        # pysqlite would run DDL outside any transaction; BEGIN IMMEDIATE takes the write lock and
        # makes the DDL transactional, and pysqlite's commit() ends it.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _adopt_create_all_schema(connection: Connection, config: Config) -> None:
    """Stamp a database made by `create_all` (tables, no alembic_version) at the baseline.

    A database with only some of the baseline tables or columns is neither empty nor the
    baseline; migrating it could lose data, so it is refused with the differences named.
    """
    insp = inspect(connection)
    tables = set(insp.get_table_names())
    if "alembic_version" in tables or not tables & BASELINE_COLUMNS.keys():
        return
    problems = []
    for table, columns in BASELINE_COLUMNS.items():
        if table not in tables:
            problems.append(f"table {table} is missing")
            continue
        missing = columns - {c["name"] for c in insp.get_columns(table)}
        if missing:
            problems.append(f"{table} lacks {', '.join(sorted(missing))}")
    if problems:
        raise RuntimeError(
            "the database has an unversioned schema that is not the baseline "
            f"{BASELINE_REVISION} ({'; '.join(problems)}); migrate it by hand"
        )
    command.stamp(config, BASELINE_REVISION)


def migrate(engine: Engine) -> str:
    """Bring the schema to the newest revision in one locked transaction; returns that revision.

    Empty database: all migrations run. Current database: nothing changes. Database made by
    `create_all` before migrations existed: stamped at the baseline, then upgraded.
    """
    with engine.begin() as connection:
        _lock(connection)
        config = alembic_config(connection)
        _adopt_create_all_schema(connection, config)
        command.upgrade(config, "head")
        revision = current_revision(connection)
    assert revision is not None
    return revision


class Database:
    """Owns the engine and hands out sessions that commit on success and roll back on error."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        migrate(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def close(self) -> None:
        self.engine.dispose()
