"""The HTTP API through the official `openai` client, streaming and not, on a loopback server."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import FACT_ANSWER, FACT_QUESTION, serve_in_thread


@pytest.fixture(scope="module")
def server(handbook):
    from kb.server import create_app

    with serve_in_thread(create_app(handbook, warm=False)) as url:
        yield url


def test_openai_client_non_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["kb:handbook"]
    r = client.chat.completions.create(
        model="kb:handbook", max_tokens=24, messages=[{"role": "user", "content": FACT_QUESTION}]
    )
    assert FACT_ANSWER in r.choices[0].message.content
    assert r.usage.completion_tokens > 0
    citations = r.model_extra["citations"]
    assert citations and citations[0]["document"] == "handbook.txt"


def test_openai_client_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="kb:handbook",
        max_tokens=24,
        stream=True,
        messages=[{"role": "user", "content": FACT_QUESTION}],
    )
    parts, last = [], None
    for chunk in stream:
        if chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        last = chunk
    assert len(parts) > 3 and FACT_ANSWER in "".join(parts)
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.model_extra["citations"]


def test_errors_and_operational_endpoints(server):
    with httpx.Client(base_url=server) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        r = c.post(
            "/v1/chat/completions",
            json={"model": "kb:nope", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_not_found"
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "kb:handbook",
                "messages": [],
            },
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "kb:handbook",
                "temperature": -1,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = c.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert c.get("/openapi.json").json()["paths"]["/v1/chat/completions"]
        metrics = c.get("/metrics").text
        assert "kb_time_to_first_token_seconds" in metrics and "kb_num_requests_running" in metrics


def test_upload_and_corpus_endpoints(server):
    with httpx.Client(base_url=server, timeout=300) as c:
        assert c.post("/v1/corpora", json={"name": "notes"}).status_code == 201
        files = [
            (
                "files",
                ("ferry.md", b"# Ferry\n\nThe ferry to Osk leaves at nine.\n", "text/markdown"),
            ),
            ("files", ("empty.txt", b"", "text/plain")),
        ]
        r = c.post("/v1/corpora/notes/documents", files=files)
        assert r.status_code == 200
        docs = {d["filename"]: d for d in r.json()["documents"]}
        assert docs["ferry.md"]["status"] == "ready"
        assert docs["empty.txt"]["status"] == "failed" and docs["empty.txt"]["error"]
        assert c.get("/v1/corpora/notes").json()["status"] == "ready"
        assert c.delete("/v1/corpora/notes").status_code == 204
        assert c.get("/v1/corpora/notes").status_code == 404


def test_client_disconnect_mid_stream_frees_its_kv(server, handbook):
    engine = handbook.engine
    body = {
        "model": "kb:handbook",
        "stream": True,
        "max_tokens": 200,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "Summarise the documents in detail."}],
    }
    with httpx.Client(base_url=server, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert engine.scheduler.running  # generating now
    for _ in range(400):  # the server notices the closed socket at its next write
        if not engine.scheduler.running and engine.blocks.num_free == engine.blocks.num_blocks:
            break
        time.sleep(0.05)
    assert not engine.scheduler.running
    assert engine.blocks.num_free == engine.blocks.num_blocks
