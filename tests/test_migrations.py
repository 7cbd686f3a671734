"""Alembic migrations on SQLite and PostgreSQL: the app upgrades the schema on start, adopts
databases made by the old `create_all`, and the migrated schema is exactly the models'."""

from __future__ import annotations

import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, select, text

from storage.db import (
    BASELINE_REVISION,
    Database,
    alembic_config,
    current_revision,
    head_revision,
    make_engine,
    migrate,
)
from storage.models import Base, Corpus, Document, Segment

TABLES = {"corpora", "documents", "segments"}


@pytest.fixture
def url(db_url):
    return db_url


@pytest.fixture
def engine(url):
    """An engine on the test database that records every SQL statement it runs."""
    eng = make_engine(url)
    eng.statements = []  # type: ignore[attr-defined]
    event.listen(
        eng,
        "before_cursor_execute",
        lambda _c, _cur, stmt, *_a: eng.statements.append(" ".join(stmt.split()).upper()),
    )
    yield eng
    eng.dispose()


def _writes(statements: list[str]) -> list[str]:
    """The statements that change schema or data."""
    verbs = ("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE")
    return [s for s in statements if s.startswith(verbs)]


def _revision(engine) -> str | None:
    with engine.connect() as c:
        return current_revision(c)


def _add_corpus(db_or_engine) -> None:
    """One corpus with a document and a segment (JSON and timestamps included)."""
    from sqlalchemy.orm import Session

    with Session(db_or_engine) as s, s.begin():
        c = Corpus(name="law", model="m", settings={"chunk_size": 64})
        d = Document(corpus=c, filename="a.txt", content_hash="h1")
        d.segments.append(
            Segment(seq=0, char_start=0, char_end=3, num_tokens=3, text="abc", token_ids=[1, 2, 3])
        )
        s.add(c)


def _assert_corpus_intact(engine) -> None:
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        c = s.scalars(select(Corpus)).one()
        assert c.name == "law" and c.settings == {"chunk_size": 64}
        assert c.created_at.tzinfo is not None or engine.dialect.name == "sqlite"
        assert [seg.token_ids for d in c.documents for seg in d.segments] == [[1, 2, 3]]


def test_head_is_the_baseline_chain():
    """The scripts resolve from the package resource without alembic.ini; 0001 starts the chain."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_base() == BASELINE_REVISION
    assert scripts.get_current_head() == head_revision()


def test_upgrade_from_empty_creates_tables_at_head(url, engine):
    db = Database(url)
    db.close()
    assert TABLES | {"alembic_version"} <= set(inspect(engine).get_table_names())
    assert _revision(engine) == head_revision()
    _add_corpus(engine)
    _assert_corpus_intact(engine)


def test_second_upgrade_is_a_no_op(url, engine):
    assert migrate(engine) == head_revision()
    _add_corpus(engine)
    engine.statements.clear()
    assert migrate(engine) == head_revision()
    assert engine.statements, "the listener saw nothing"
    assert _writes(engine.statements) == []
    Database(url).close()  # and opening the app's Database again changes nothing either
    _assert_corpus_intact(engine)


def _legacy_schema(engine, drop: tuple[str, ...] = ()) -> None:
    """The schema `create_all` made before migrations existed (the baseline's tables, no
    alembic_version), less the tables in `drop`."""
    with engine.begin() as c:
        command.upgrade(alembic_config(c), BASELINE_REVISION)
        for table in ("alembic_version", *drop):
            c.execute(text(f"DROP TABLE {table}"))


def test_create_all_database_is_stamped_not_recreated(url, engine):
    _legacy_schema(engine)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO corpora (id, name, model, status, settings, preamble_len, hits, created_at) "
                "VALUES (1, 'law', 'm', 'ready', '{}', 0, 3, '2026-01-01 00:00:00+00:00')"
            )
        )
    engine.statements.clear()
    assert migrate(engine) == head_revision()
    created = [
        s for s in _writes(engine.statements) if s.startswith(("CREATE TABLE", "DROP TABLE"))
    ]
    assert created[0] == (
        "CREATE TABLE ALEMBIC_VERSION ( VERSION_NUM VARCHAR(32) NOT NULL, "
        "CONSTRAINT ALEMBIC_VERSION_PKC PRIMARY KEY (VERSION_NUM) )"
    )
    # the baseline's tables were adopted, not created again
    assert not [
        s
        for s in created
        if s.startswith(
            ("CREATE TABLE CORPORA", "CREATE TABLE DOCUMENTS ", "CREATE TABLE SEGMENTS ")
        )
    ]
    assert _revision(engine) == head_revision()
    with engine.connect() as c:  # the row survived and got the new columns' defaults
        row = c.execute(text("SELECT name, hits, visibility, tier FROM corpora")).one()
    assert tuple(row) == ("law", 3, "public", "disk")
    with engine.connect() as c:  # the adopted schema is the models' schema too
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []


def test_partial_unversioned_schema_is_refused(engine):
    """Neither empty nor the baseline: refuse (naming what is missing) and change nothing."""
    _legacy_schema(engine, drop=("segments", "documents"))
    with pytest.raises(RuntimeError, match="table documents is missing"):
        migrate(engine)
    assert set(inspect(engine).get_table_names()) == {"corpora"}


def test_migrated_schema_matches_models(engine):
    migrate(engine)
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == []
    insp = inspect(engine)
    fks = {
        t: [
            (fk["referred_table"], fk["options"].get("ondelete")) for fk in insp.get_foreign_keys(t)
        ]
        for t in ("documents", "segments")
    }
    assert {k: [(r, (o or "").upper()) for r, o in v] for k, v in fks.items()} == {
        "documents": [("corpora", "CASCADE")],
        "segments": [("documents", "CASCADE")],
    }
    if engine.dialect.name == "postgresql":
        types = {c["name"]: c["type"] for c in insp.get_columns("corpora")}
        assert type(types["settings"]).__name__ == "JSON" and types["created_at"].timezone is True


def test_downgrade_to_base_and_up_again(engine):
    migrate(engine)
    with engine.begin() as c:
        command.downgrade(alembic_config(c), "base")
    assert not TABLES & set(inspect(engine).get_table_names())
    assert _revision(engine) is None
    assert migrate(engine) == head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())


def test_concurrent_starts_migrate_once(url):
    """Several processes opening one database at once (API, workers) must not race the DDL."""
    engines = [make_engine(url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    results, errors = [], []

    def start(eng):
        barrier.wait()
        try:
            results.append(migrate(eng))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for e in engines:
        e.dispose()
    assert errors == [] and results == [head_revision()] * len(engines)
