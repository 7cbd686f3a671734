"""Job life cycle on the in-process broker: cancel, per-document retry, transient failures
retried with backoff until they land in the dead letters, and the HTTP job endpoints."""

from __future__ import annotations

import pytest

from tests.jobs_helpers import make_settings, paragraphs


def test_cancel_retry_and_transient_failures(tmp_path):
    from kb.errors import Conflict
    from kb.jobs import JobService, WorkerConfig
    from kb.service import KnowledgeBase
    from storage.models import Document

    kb = KnowledgeBase(make_settings(tmp_path / "home"))
    jobs = JobService(
        kb,
        config=WorkerConfig(heartbeat_s=0.2, stale_s=5, max_attempts=2, backoff_s=0.05, poll_s=0.1),
    )
    try:
        kb.create_corpus("c")
        doc = tmp_path / "canal.md"
        doc.write_text(paragraphs("canal", 4))
        (sub,) = jobs.submit("c", [doc], start_worker=False)
        cancelled = jobs.queue.cancel(sub.job_id)
        assert (
            cancelled.status == "cancelled"
            and cancelled.stage == "failed"
            and cancelled.error == "cancelled"
        )
        with pytest.raises(Conflict):
            jobs.queue.cancel(sub.job_id)
        jobs.start_local_worker()  # the cancelled job's broker entry is acknowledged, not run

        # a transient failure: the corpus's KV folder cannot be created (a file is in the way)
        corpus_id = kb.ingestor.corpus_id("c")
        kb.settings.kv_dir.mkdir(parents=True, exist_ok=True)
        blocker = kb.settings.kv_dir / str(corpus_id)
        blocker.write_text("in the way")
        failing = jobs.queue.retry(sub.job_id)
        assert failing.id != sub.job_id and failing.status == "queued"
        (info,) = jobs.wait([failing.id], timeout_s=120)
        assert info.status == "failed" and info.attempts == 2 and info.stage == "failed"
        with kb.db.session() as s:
            assert "failed after 2 attempts" in s.get(Document, sub.document_id).error
        assert [m.job_id for m in jobs.broker.dead_letters("ingest")] == [failing.id]

        blocker.unlink()  # fixed: retrying the document now succeeds
        (info,) = jobs.wait([jobs.queue.retry(failing.id).id], timeout_s=120)
        assert (
            info.status == "done"
            and info.stage == "ready"
            and info.segments_done == info.segments_total > 1
        )
        assert info.error is None and info.percent == 100.0
        with pytest.raises(Conflict):
            jobs.queue.retry(failing.id)  # the document is ready now
        listed = jobs.queue.list("c")
        assert [j.status for j in listed] == ["done", "failed", "cancelled"]  # newest first
        assert kb.corpus_info("c").status == "ready"
    finally:
        jobs.close()
        kb.close()


def test_job_endpoints(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from kb.server import create_app
    from kb.service import KnowledgeBase

    for var in ("KB_AUTH", "KB_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    kb = KnowledgeBase(make_settings(tmp_path / "home"))
    with TestClient(create_app(kb, warm=False, ui=False)) as c:
        assert c.post("/v1/corpora", json={"name": "notes"}).status_code == 201
        files = [
            ("files", ("tide.md", paragraphs("tide", 3).encode(), "text/markdown")),
            ("files", ("blank.txt", b"", "text/plain")),
        ]
        r = c.post("/v1/corpora/notes/documents", params={"wait": "false"}, files=files)
        assert r.status_code == 202
        body = r.json()
        assert len(body["jobs"]) == 2 and all(d["status"] == "queued" for d in body["documents"])
        infos = {i.filename: i for i in kb.jobs.wait(body["jobs"], timeout_s=120)}
        assert infos["tide.md"].status == "done" and infos["blank.txt"].code == "empty_file"
        one = c.get(f"/v1/jobs/{infos['tide.md'].id}").json()
        assert one["stage"] == "ready" and one["percent"] == 100.0 and one["corpus"] == "notes"
        assert {j["filename"] for j in c.get("/v1/jobs", params={"corpus": "notes"}).json()} == {
            "tide.md",
            "blank.txt",
        }
        assert c.post(f"/v1/jobs/{infos['tide.md'].id}/cancel").status_code == 409  # already done
        r = c.post(f"/v1/jobs/{infos['blank.txt'].id}/retry")
        assert r.status_code == 202 and r.json()["status"] in ("queued", "running", "failed")
        assert c.get("/v1/jobs/nope").status_code == 404
        kb.jobs.wait([r.json()["id"]], timeout_s=120)
    kb.jobs.close()
