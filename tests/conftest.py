"""Shared fixtures: the demo model (fetched and converted once per machine), fresh KB homes,
and a small corpus with a planted fact."""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# every KnowledgeBase a test makes preallocates its unique-KV pages: keep them small
os.environ.setdefault("KB_UNIQUE_KV_TOKENS", "8192")

PG_URL = os.environ.get("KB_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODELS_DIR = Path(
    os.environ.get("KB_TEST_MODELS_DIR", Path.home() / ".cache" / "kb-moska" / "models")
)
FACT_QUESTION = "What is the access code of the Velmora vault?"
FACT_ANSWER = "7341"


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from kb.model.demo import ensure_demo_model

    return ensure_demo_model(MODELS_DIR)


@pytest.fixture(scope="session")
def demo_model(demo_model_dir):
    from kb.model.loader import load_model

    return load_model(demo_model_dir)


class DigitTokenizer:
    """Token i decodes to str(i) and a space: enough text for an engine over random weights."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"{i} " for i in ids)


def planted_text() -> str:
    """A few pages of real prose (standard-library documentation) with one invented fact."""
    import argparse
    import collections
    import json
    import logging

    paras = "\n\n".join(inspect.getdoc(m) for m in (json, argparse, logging, collections)).split(
        "\n\n"
    )
    paras.insert(
        len(paras) // 2,
        "The archive of the Velmora Institute is kept in a vault. "
        "The access code of the Velmora vault is 7341.",
    )
    return "\n\n".join(paras)


@pytest.fixture
def kb_env(tmp_path, demo_model_dir, monkeypatch) -> Path:
    """Environment for a KB in a fresh home; returns the home."""
    home = tmp_path / "home"
    monkeypatch.setenv("KB_HOME", str(home))
    monkeypatch.setenv("KB_MODELS_DIR", str(MODELS_DIR))
    for var in (
        "KB_DATABASE_URL",
        "KB_REDIS_URL",
        "KB_MODEL",
        "KB_DEVICE",
        "KB_CONFIG",
        "KB_SEGMENT_LEN",
    ):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="module")
def handbook(tmp_path_factory, demo_model_dir):
    """A KnowledgeBase with corpus 'handbook' holding the planted-fact document (shared by a module)."""
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    root = tmp_path_factory.mktemp("handbook")
    doc = root / "handbook.txt"
    doc.write_text(planted_text())
    kb = KnowledgeBase(Settings(home=root / "home", models_dir=MODELS_DIR))
    kb.create_corpus("handbook")
    results = kb.ingest("handbook", [doc])
    assert results[0].status == "ready", results
    yield kb
    kb.close()


def _pg_available() -> bool:
    from sqlalchemy import text

    from storage.db import make_engine

    try:
        engine = make_engine(PG_URL)
        with engine.connect() as c:
            c.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """An empty database: a new SQLite file, or a fresh PostgreSQL schema (dropped afterwards).
    PostgreSQL tests skip when the server is unreachable, except under CI, where they fail."""
    from sqlalchemy import text

    from storage.db import make_engine

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kb.sqlite3'}"
        return
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL}")
        pytest.skip(f"PostgreSQL is not reachable at {PG_URL}")
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as c:
        c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
