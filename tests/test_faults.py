"""Faults with real parts: PostgreSQL connections killed under the service, a full disk while KV
is written, a unique-KV budget too small for a request, and a stored KV file damaged on disk.
Catalogued in docs/RELIABILITY.md ("Faults")."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text

from kb.engine.sequence import SamplingParams
from storage.kvstore import read_kv
from storage.models import Corpus, Document, Segment
from tests.conftest import FACT_ANSWER, FACT_QUESTION, MODELS_DIR, PG_URL, serve_in_thread

FACT = (
    "The archive of the Velmora Institute is kept in a vault. "
    "The access code of the Velmora vault is 7341."
)


def make_kb(home: Path, **settings):
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    return KnowledgeBase(Settings(home=home, models_dir=MODELS_DIR, **settings))


def fact_doc(tmp: Path) -> Path:
    doc = tmp / "vault.txt"
    doc.write_text(f"Notes of the institute.\n\n{FACT}\n\nThe reading room opens at nine.")
    return doc


def ask(kb, name: str = "facts", max_tokens: int = 24) -> dict:
    return kb.answer(name, FACT_QUESTION, SamplingParams(max_tokens=max_tokens))


# -- (a) PostgreSQL connections dropped ----------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgres_connections_killed_under_the_service_reconnect(db_url, tmp_path, demo_model_dir):
    """Every connection of the service's pool is terminated by the server; the next calls
    (list corpora, ask, the HTTP API) reconnect through pool_pre_ping and succeed."""
    from kb.server import create_app
    from storage.db import make_engine

    app_name = f"kbfault_{uuid.uuid4().hex[:8]}"  # only this test's connections are terminated
    kb = make_kb(tmp_path / "home", database_url=f"{db_url}&application_name={app_name}")
    admin = make_engine(PG_URL)

    def kill_all() -> int:
        with admin.begin() as c:
            return c.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :app AND pid <> pg_backend_pid()"
                ),
                {"app": app_name},
            ).scalar_one()

    try:
        kb.create_corpus("facts")
        assert kb.ingest("facts", [fact_doc(tmp_path)])[0].status == "ready"
        assert FACT_ANSWER in ask(kb)["answer"]

        assert kill_all() >= 1
        assert [(c.name, c.status) for c in kb.list_corpora()] == [("facts", "ready")]
        assert kill_all() >= 1
        kb.cache.drop("facts")  # the next question reads the corpus rows and KV again
        assert FACT_ANSWER in ask(kb)["answer"]
        assert kill_all() >= 1
        with (
            serve_in_thread(create_app(kb, warm=False, ui=False)) as url,
            httpx.Client(base_url=url, timeout=300) as c,
        ):
            r = c.get("/v1/corpora")
            assert r.status_code == 200 and [x["name"] for x in r.json()] == ["facts"], r.text
            assert kill_all() >= 1
            r = c.post(
                "/v1/chat/completions",
                json={
                    "model": "kb:facts",
                    "max_tokens": 24,
                    "messages": [{"role": "user", "content": FACT_QUESTION}],
                },
            )
            assert r.status_code == 200, r.text
            assert FACT_ANSWER in r.json()["choices"][0]["message"]["content"]
    finally:
        kb.close()
        admin.dispose()


# -- (b) full disk while writing KV ----------------------------------------------------------------
def _big_text() -> str:
    import collections
    import logging

    return "\n\n".join(inspect.getdoc(m) for m in (json, argparse, logging, collections))


def test_full_disk_while_writing_kv_fails_the_document_cleanly(tmp_path, demo_model_dir):
    """KB_HOME/kv on a 3 MiB tmpfs: a small document fits, a large one (about 40 MB of KV) fails
    with "no space left", leaves no torn or temporary file, and the small one still answers."""
    home = tmp_path / "home"
    kv = home / "kv"
    kv.mkdir(parents=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(kv)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root): {mount.stderr.strip() or mount.returncode}"
        )
    kb = None
    try:
        kb = make_kb(home)
        kb.create_corpus("facts")
        assert kb.ingest("facts", [fact_doc(tmp_path)])[0].status == "ready"
        assert FACT_ANSWER in ask(kb)["answer"]

        big = tmp_path / "big.txt"
        big.write_text(_big_text())
        [res] = kb.ingest("facts", [big])
        assert res.status == "failed" and "no space left" in (res.error or "").lower(), res
        docs = {d["filename"]: d for d in kb.documents("facts")}
        assert docs["vault.txt"]["stage"] == "ready"
        assert (
            docs["big.txt"]["stage"] == "failed"
            and "no space left" in docs["big.txt"]["error"].lower()
        )
        assert kb.corpus_info("facts").status == "ready"

        # no temporary or torn file: every file on the tmpfs is a verified, recorded KV file
        on_disk = {p for p in kv.rglob("*") if p.is_file()}
        assert not [p for p in on_disk if p.name.endswith(".tmp")]
        with kb.db.session() as s:
            corpus = s.scalar(select(Corpus).where(Corpus.name == "facts"))
            recorded = {Path(corpus.preamble_kv_file): corpus.preamble_checksum}
            recorded |= {
                Path(f): c
                for f, c in s.execute(
                    select(Segment.kv_file, Segment.kv_checksum).where(Segment.kv_file.is_not(None))
                )
            }
        assert on_disk == set(recorded), on_disk ^ set(recorded)
        for path, checksum in recorded.items():
            read_kv(path, checksum)

        kb.cache.drop("facts")  # read the stored KV again from the full disk
        assert FACT_ANSWER in ask(kb)["answer"]
    finally:
        if kb is not None:
            kb.close()
        subprocess.run(["umount", str(kv)], check=False)


# -- (c) unique KV out of memory for a new request -------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_model_dir):
    """A knowledge base with the smallest unique-KV budget (256 tokens, 16 blocks) and corpus
    'facts' holding the planted fact, served on loopback."""
    from kb.server import create_app

    root = tmp_path_factory.mktemp("tiny")
    kb = make_kb(root / "home", unique_kv_tokens=256, kv_block_size=16)
    kb.create_corpus("facts")
    assert kb.ingest("facts", [fact_doc(root)])[0].status == "ready"
    with serve_in_thread(create_app(kb, warm=False, ui=False)) as url:
        yield kb, url
    kb.close()


def _long_question(kb, words: int) -> tuple[str, int]:
    """A question of about `words` extra words, and its unique prompt length in tokens."""
    from kb.prompt import build_prompt, encode

    q = "Read the notes carefully and answer in one line. " * (words // 9) + FACT_QUESTION
    parts = build_prompt(kb.loaded.tokenizer, kb.settings.system_prompt, [], q)
    return q, len(encode(kb.loaded.tokenizer, parts.suffix))


def test_unique_kv_exhausted_refuses_what_can_never_fit_and_queues_what_fits_later(tiny):
    kb, url = tiny
    engine = kb.engine
    engine.start()
    cap = engine.blocks.num_blocks * engine.blocks.block_size
    assert cap == 256
    gen = 32
    q, n = _long_question(kb, 110)
    # one request fits alone (prompt + answer <= 256), two never fit together
    assert 2 * n > cap - engine.blocks.block_size and n + gen <= cap, n
    sp = lambda: SamplingParams(max_tokens=gen, ignore_eos=True)  # noqa: E731

    a = kb.ask("facts", q, sp())
    first = a.handle.get()
    assert first.__class__.__name__ == "Delta"  # A is running

    # a request that can never fit: 400 at once, naming the budget; A is untouched
    with httpx.Client(base_url=url, timeout=300) as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "kb:facts",
                "max_tokens": cap,
                "messages": [{"role": "user", "content": FACT_QUESTION}],
            },
        )
    assert r.status_code == 400, r.text
    assert "unique-KV cache holds 256" in r.json()["error"]["message"]

    # one that fits later: queued behind A, not refused, not preempting it
    b = kb.ask("facts", q.replace("carefully", "closely"), sp())
    with engine._lock:
        a_running, b_waiting = (
            a.handle.seq in engine.scheduler.running,
            b.handle.seq in engine.scheduler.waiting,
        )
    assert a_running and b_waiting
    results = []
    for ans in (a, b):
        for _ev in ans.handle:
            pass
        results.append(ans.handle.result)
    assert [(r.reason, r.completion_tokens) for r in results] == [
        ("length", gen),
        ("length", gen),
    ], results
    assert engine.metrics.max_batch_size == 1  # never stepped together: B waited for A's blocks
    with engine._lock:  # the step that finished B frees its blocks before it lets go of the lock
        assert engine.blocks.num_free == engine.blocks.num_blocks
    assert FACT_ANSWER in ask(kb)["answer"]  # and the engine still answers


# -- (d) a stored KV file corrupted on disk --------------------------------------------------------
def test_corrupted_kv_file_is_never_served_and_rebuild_repairs_it(tiny):
    """Through the HTTP API: 409 "must be rebuilt", corpus stale; `kb cache rebuild` (the cache
    API) recomputes the damaged segment and the planted fact is answered again.
    (tests/test_cache_admin.py checks the same at the library level, and that only the damaged
    segment is recomputed.)"""
    kb, url = tiny
    with kb.db.session() as s:
        seg = s.scalars(
            select(Segment)
            .join(Document)
            .join(Corpus)
            .where(Corpus.name == "facts")
            .order_by(Segment.id)
        ).first()
        path = Path(seg.kv_file)
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) - 5):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    kb.cache.drop("facts")
    chat = {
        "model": "kb:facts",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": FACT_QUESTION}],
    }
    with httpx.Client(base_url=url, timeout=300) as c:
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 409 and "must be rebuilt" in r.json()["error"]["message"], r.text
        assert c.get("/v1/corpora/facts").json()["status"] == "stale"
        r = c.post("/v1/chat/completions", json={**chat, "stream": True})
        assert r.status_code == 409  # refused before any stream starts

        r = c.post("/v1/cache/facts/rebuild")
        assert r.status_code == 202, r.text
        event_id = r.json()["event_id"]
        for _ in range(6000):
            ev = c.get(f"/v1/cache/events/{event_id}").json()
            if ev["status"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.1)
        assert ev["status"] == "done", ev
        assert ev["result"]["damaged"] == 1 and ev["result"]["prefilled"] == 1, ev
        assert c.get("/v1/corpora/facts").json()["status"] == "ready"
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        assert FACT_ANSWER in r.json()["choices"][0]["message"]["content"]
