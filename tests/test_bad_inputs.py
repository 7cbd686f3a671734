"""The bad-input catalogue (docs/RELIABILITY.md): each input gets a clear message and the right
status, nothing already stored is lost, and the service keeps serving."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.conftest import FACT_ANSWER, FACT_QUESTION
from tests.test_parse import encrypt_pdf, make_pdf

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(handbook):
    from kb.server import create_app

    with TestClient(create_app(handbook, warm=False)) as c:
        c.post("/v1/corpora", json={"name": "inbox"})
        yield c


def _ask(question: str = "hi", **extra) -> dict:
    return {
        "model": "kb:handbook",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": question}],
        **extra,
    }


def _upload(client, *files: tuple[str, bytes]) -> dict[str, dict]:
    r = client.post(
        "/v1/corpora/inbox/documents",
        files=[("files", (n, d, "application/octet-stream")) for n, d in files],
    )
    return {d["filename"]: d | {"http": r.status_code} for d in r.json()["documents"]}


UPLOADS = [  # (name, bytes, expected error code)
    ("corrupt.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage", "corrupt_pdf"),
    ("locked.pdf", None, "encrypted_pdf"),
    ("empty.txt", b"", "empty_file"),
    ("program.txt", bytes(range(256)) * 8, "binary_file"),
    ("blank.pdf", None, "no_text"),
    ("tool.exe", b"MZ\x90\x00" + b"\x00" * 64, "unsupported_type"),
    (
        "latin.txt",
        "d\xe9j\xe0 vu \u2014 caf\xe9".encode("utf-16-le")[:7],
        None,
    ),  # odd bytes: undecodable or text
]


def test_bad_files_fail_alone_with_reasons(client):
    files = []
    for name, data, _ in UPLOADS:
        if name == "locked.pdf":
            data = encrypt_pdf(make_pdf([["secret"]]), "pw")
        elif name == "blank.pdf":
            data = make_pdf([[]])
        files.append((name, data))
    files.append(("ok.md", b"# Ferry\n\nThe ferry to Osk leaves at nine.\n"))
    out = _upload(client, *files)
    assert out["ok.md"]["status"] == "ready" and out["ok.md"]["http"] == 200
    for name, _, code in UPLOADS:
        if code is None:
            assert out[name]["status"] in ("ready", "failed")
            continue
        assert out[name]["status"] == "failed", name
        assert out[name]["code"] == code and out[name]["error"], out[name]
    docs = {d["filename"]: d for d in client.get("/v1/corpora/inbox/documents").json()}
    assert docs["ok.md"]["stage"] == "ready"


def test_oversized_upload_is_refused_before_parsing(client, handbook):
    limit = handbook.settings.max_upload_mb
    handbook.settings.max_upload_mb = 0.001
    try:
        out = _upload(client, ("big.txt", b"word " * 1000))
    finally:
        handbook.settings.max_upload_mb = limit
    assert out["big.txt"]["status"] == "failed" and out["big.txt"]["code"] == "too_large"
    assert out["big.txt"]["http"] == 422


def test_types_outside_the_allowed_list_are_refused(client, handbook):
    allowed = handbook.settings.allowed_types
    handbook.settings.allowed_types = "pdf,markdown"
    try:
        out = _upload(
            client,
            ("notes.txt", b"Plain text is not accepted here."),
            ("ok2.md", b"# Fine\n\nYes.\n"),
        )
    finally:
        handbook.settings.allowed_types = allowed
    assert out["notes.txt"]["status"] == "failed" and out["notes.txt"]["code"] == "unsupported_type"
    assert "text files are not accepted" in out["notes.txt"]["error"]
    assert out["ok2.md"]["status"] == "ready"


def test_hostile_file_names_stay_inside_home(client, handbook):
    name = "../../etc/\x07evil\r\n.md"
    r = client.post(
        "/v1/corpora/inbox/documents",
        files=[("files", (name, b"# Note\n\nInside only.\n", "text/markdown"))],
    )
    assert r.status_code == 200
    home = handbook.home.resolve()
    for path in home.rglob("*"):
        assert path.resolve().is_relative_to(home)
    stored = [d["filename"] for d in client.get("/v1/corpora/inbox/documents").json()]
    assert all("/" not in n and "\x07" not in n and "\n" not in n for n in stored)


def test_duplicate_upload_is_detected(client):
    first = _upload(client, ("dup.md", b"# Dup\n\nSame bytes.\n"))["dup.md"]
    again = _upload(client, ("dup-copy.md", b"# Dup\n\nSame bytes.\n"))["dup-copy.md"]
    assert first["status"] == "ready" and again["status"] == "duplicate"
    assert again["document_id"] == first["document_id"]


@pytest.mark.parametrize(
    "body,status,fragment,param",
    [
        (b"{not json", 400, "not valid JSON", None),
        (json.dumps({"model": "kb:handbook", "messages": "hello"}).encode(), 400, "", "messages"),
        (json.dumps({"model": "kb:handbook", "messages": []}).encode(), 400, "", "messages"),
        (json.dumps(_ask(temperature=-1)).encode(), 400, "temperature", "temperature"),
        (json.dumps(_ask(max_tokens=10**9)).encode(), 400, "max_tokens", "max_tokens"),
        (json.dumps(_ask(top_p=0)).encode(), 400, "top_p", "top_p"),
        (
            json.dumps({**_ask(), "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "",
            "messages.0.role",
        ),
        (
            json.dumps({**_ask(), "messages": [{"role": "assistant", "content": "x"}]}).encode(),
            400,
            "last message",
            "messages.0.role",
        ),
        (json.dumps(_ask("   ")).encode(), 400, "empty", "messages.0.content"),
        (json.dumps({**_ask(), "model": "kb:nope"}).encode(), 404, "does not exist", "model"),
    ],
)
def test_malformed_chat_requests(client, body, status, fragment, param):
    """Every refusal in OpenAI's envelope (validation errors are 400, not FastAPI's 422: the
    contract of issue 19), naming the field at fault in `param`."""
    r = client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["param"] == param, err
    if fragment:
        assert fragment in err["message"]


def test_question_longer_than_the_context(client):
    r = client.post(CHAT, json=_ask("word " * 9000))
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_not_ready_corpus_and_bad_corpus_requests(client):
    assert client.post("/v1/corpora", json={"name": "hollow"}).status_code == 201
    r = client.post(CHAT, json={**_ask(), "model": "kb:hollow"})
    assert r.status_code == 409 and "not ready" in r.json()["error"]["message"]
    assert client.post("/v1/corpora", json={"name": "hollow"}).status_code == 409
    assert client.post("/v1/corpora", json={"name": "../x"}).status_code == 400
    r = client.post("/v1/corpora", json={"name": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = client.post("/v1/corpora", content=b"[]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.delete("/v1/corpora/never").status_code == 404
    assert (
        client.post("/v1/corpora/never/documents", files=[("files", ("a.md", b"x"))]).status_code
        == 404
    )


def test_service_still_answers_after_all_that(client):
    r = client.post(CHAT, json=_ask(FACT_QUESTION, max_tokens=24))
    assert r.status_code == 200 and FACT_ANSWER in r.json()["choices"][0]["message"]["content"]


def test_unknown_and_foreign_models(tmp_path, kb_env, monkeypatch):
    from kb.errors import KBError
    from kb.service import KnowledgeBase

    monkeypatch.setenv("KB_MODEL", str(tmp_path / "no-such-model"))
    kb = KnowledgeBase()
    with pytest.raises(KBError, match="unknown model"):
        kb.loaded
    foreign = tmp_path / "gpt2"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8}))
    monkeypatch.setenv("KB_MODEL", str(foreign))
    kb = KnowledgeBase()
    with pytest.raises(KBError, match="not Llama-family"):
        kb.loaded
