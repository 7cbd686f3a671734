"""A batch of documents through the job path: bad files fail alone with a clear reason, the
others complete; progress is persisted and published; the same on the in-process broker and on
real Redis (where the batch also survives a Redis restart between submit and work)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.jobs_helpers import (
    REDIS_URL,
    delete_prefix,
    make_settings,
    new_prefix,
    paragraphs,
    redis_or_skip,
)
from tests.test_parse import encrypt_pdf, make_pdf


def write_batch(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "ferry.md": paragraphs("ferry", 6).encode(),
        "corrupt.pdf": b"%PDF-1.4\nthis is not really a pdf at all",
        "locked.pdf": encrypt_pdf(make_pdf([["Top secret."]]), user_password="secret"),
        "empty.txt": b"",
        "huge.txt": b"word " * 8000,  # 40 KB: over the 0.02 MiB limit below
        "orchard.txt": paragraphs("orchard", 5).encode(),
    }
    out = {}
    for name, data in files.items():
        (root / name).write_bytes(data)
        out[name] = root / name
    return out


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def broker_kind(request) -> str:
    if request.param == "redis":
        redis_or_skip()
    return request.param


def test_bad_files_fail_alone_and_the_batch_completes(tmp_path, broker_kind):
    from kb.jobs import JobService, WorkerPool
    from kb.service import KnowledgeBase
    from storage.models import Document

    prefix = new_prefix()
    over = {"redis_url": REDIS_URL, "redis_prefix": prefix} if broker_kind == "redis" else {}
    kb = KnowledgeBase(make_settings(tmp_path / "home", max_upload_mb=0.02, **over))
    jobs = JobService(kb)
    pool = None
    try:
        kb.create_corpus("batch")
        files = write_batch(tmp_path / "in")
        events = jobs.broker.subscribe("progress:batch")
        subs = {
            s.filename: s for s in jobs.submit("batch", list(files.values()), start_worker=False)
        }

        # the oversized file is refused at submit time, before anything is stored
        assert subs["huge.txt"].status == "failed" and subs["huge.txt"].code == "too_large"
        assert "limit is 0.02 MiB" in subs["huge.txt"].error
        assert all(subs[n].status == "queued" for n in files if n != "huge.txt")
        if broker_kind == "redis":
            assert (
                delete_prefix(prefix) > 0
            )  # Redis restarts (it keeps nothing on disk): the queue is gone
            assert jobs.broker.depth("ingest") == 0
        pool = WorkerPool(
            kb, jobs.broker, 1, jobs.config
        ).start()  # requeue_lost at start refills it
        ids = [s.job_id for s in subs.values() if s.job_id]
        done = {i.filename: i for i in jobs.wait(ids, timeout_s=240)}

        for name in ("ferry.md", "orchard.txt"):
            assert done[name].status == "done" and done[name].stage == "ready", done[name]
            assert done[name].segments_done == done[name].segments_total > 1
        expected = {
            "corrupt.pdf": ("corrupt_pdf", "not a readable PDF"),
            "locked.pdf": ("encrypted_pdf", "password-protected"),
            "empty.txt": ("empty_file", "is empty"),
        }
        for name, (code, words) in expected.items():
            info = done[name]
            assert info.status == "failed" and info.stage == "failed" and info.code == code, info
            assert words in info.error and info.attempts == 1  # bad input is not retried
        assert jobs.broker.dead_letters("ingest") == []
        assert kb.corpus_info("batch").status == "ready"

        with kb.db.session() as s:  # the stage, percent and heartbeat live on the document rows
            ferry = s.get(Document, subs["ferry.md"].document_id)
            assert (
                ferry.stage == "ready" and ferry.percent == 100.0 and ferry.heartbeat_at is not None
            )
            bad = s.get(Document, subs["empty.txt"].document_id)
            assert bad.stage == "failed" and "is empty" in bad.error

        seen = []
        while (ev := events.get(1.0)) is not None:
            if ev.data["filename"] == "ferry.md":
                seen.append(ev.data)
        events.close()
        stages = [e["stage"] for e in seen]
        assert stages[:3] == ["stored", "parsed", "tokenized"] and stages[-2:] == [
            "prefilled",
            "ready",
        ], stages
        assert "indexed" not in stages  # nothing is indexed at ingestion: no such stage is claimed
        prefilled = [e for e in seen if e["stage"] == "prefilled"]
        assert prefilled[-1]["done"] == prefilled[-1]["total"] == done["ferry.md"].segments_total
        percents = [e["percent"] for e in seen]
        assert percents == sorted(percents) and percents[-1] == 100.0
    finally:
        if pool is not None:
            pool.stop()
        jobs.close()
        kb.close()
        if broker_kind == "redis":
            delete_prefix(prefix)
