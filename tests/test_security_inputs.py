"""Issue 15, point 6: NaN/Infinity, lone surrogates, NUL bytes and control characters are a 400
naming the field on every input path, on SQLite and PostgreSQL; no answer shows SQL, a path or
a traceback; the request id the user sees is the one in the admin's log."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kb.errors import KBError
from kb.inputs import check_text, text_problem
from tests.conftest import MODELS_DIR, serve_in_thread

CHAT = "/v1/chat/completions"
LEAKS = (
    "SELECT",
    "INSERT",
    "sqlalchemy",
    "psycopg",
    "Traceback",
    "sqlite3",
    "/tmp/",
    "site-packages",
)


@pytest.fixture
def site(db_url, tmp_path, demo_model_dir):
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    kb = KnowledgeBase(Settings(home=tmp_path / "home", models_dir=MODELS_DIR, database_url=db_url))
    kb.create_corpus("c", visibility="public")
    app = create_app(kb, warm=False)

    @app.get("/v1/_test_raise")  # a route that fails as a bug would: with SQL and a path in it
    async def _raise():
        raise RuntimeError(
            f"(psycopg.errors.Foo) SELECT password_hash FROM users; {tmp_path}/kb.sqlite3"
        )

    app.router.routes.insert(0, app.router.routes.pop())  # before the web app's mount at "/"

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield {"c": c, "kb": kb}
    kb.close()


def _ask(**kw) -> dict:
    return {"model": "kb:c", "messages": [{"role": "user", "content": "hello"}], **kw}


def _no_leak(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    for word in LEAKS:
        assert word not in r.text, (word, r.text)


@pytest.mark.parametrize(
    "field,literal",
    [
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("top_p", "NaN"),
        ("top_p", "-Infinity"),
        ("presence_penalty", "NaN"),
    ],
)
def test_non_finite_numbers_are_400_naming_the_field(site, field, literal):
    body = json.dumps(_ask(**{field: 0.5}))
    body = body.replace(f'"{field}": 0.5', f'"{field}": {literal}')
    r = site["c"].post(CHAT, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    _no_leak(r)


@pytest.mark.parametrize("bad", ["\ud800 lone", "nul \x00 byte", "bell \x07"])
@pytest.mark.parametrize("where", ["content", "model", "corpus", "stop"])
def test_bad_text_in_a_chat_is_400_naming_the_field(site, bad, where):
    body = _ask()
    if where == "content":
        body["messages"][0]["content"] = bad
    elif where == "model":
        body["model"] = f"kb:{bad}"
    else:
        body[where] = bad
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as \ud800, as a client sends it
    r = site["c"].post(CHAT, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert where in r.json()["error"]["message"]
    _no_leak(r)


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/corpora/a%00b"),
        ("GET", "/v1/corpora/a%00b/documents"),
        ("DELETE", "/v1/corpora/a%00b"),
        ("GET", "/v1/jobs?corpus=a%00b"),
        ("GET", "/v1/jobs/x%00y"),
        ("POST", "/v1/jobs/x%00y/cancel"),
        ("POST", "/v1/cache/a%00b/pin"),
        ("GET", "/v1/cache?name=a%00b"),
        ("GET", "/v1/cache/events/e%00"),
        ("GET", "/v1/corpora/a%01b"),
    ],
)
def test_nul_and_controls_in_paths_and_queries_are_400(site, method, path):
    r = site["c"].request(method, path)
    assert r.status_code == 400, (path, r.status_code, r.text)
    assert "parameter" in r.json()["error"]["message"]
    _no_leak(r)


def test_corpus_names_with_bad_text_are_400(site):
    for name in ("a\x00b", "a\ud800", "a\x01", "a\nb"):
        r = site["c"].post(
            "/v1/corpora",
            content=json.dumps({"name": name}).encode(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400, (name, r.text)
        assert "name" in r.json()["error"]["message"]
        _no_leak(r)
    r = site["c"].post(
        "/v1/corpora", json={"name": "x", "visibility": "public", "share_with": ["a\x00"]}
    )
    assert r.status_code == 400 and "share_with" in r.json()["error"]["message"]


def test_login_with_a_nul_byte_is_refused_not_a_500(site):
    r = site["c"].post("/login", data={"name": "a\x00b", "password": "x"})
    assert r.status_code == 401
    _no_leak(r)


def _call(c: httpx.Client, api: str, data: list) -> str:
    r = c.post(
        f"/gradio_api/call/{api}",
        content=json.dumps({"data": data}).encode(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    with c.stream("GET", f"/gradio_api/call/{api}/{r.json()['event_id']}") as s:
        return "".join(s.iter_text())


def test_web_app_send_with_a_nul_byte_shows_no_sql(site):
    """The probe's `send` with a NUL byte: the user reads which field is wrong, not SQL."""
    c = site["c"]
    c.get("/config")
    for data in (  # send(question, corpus, conversation)
        ["what \x00 now", "c", None],
        ["hello", "c\x00", None],
        ["hi \ud800", "c", None],
    ):
        text = _call(c, "send", data)
        assert "event: error" in text, text
        for word in LEAKS:
            assert word not in text, (word, text)
    # the corpus form says what is wrong in its status line (no error badge left on the form)
    text = _call(c, "create_corpus", ["x\x00y", "public", ""])
    assert "corpus name is" in text, text
    for word in LEAKS:
        assert word not in text, (word, text)


def test_internal_errors_show_a_request_id_the_log_carries(site, caplog):
    caplog.set_level(logging.ERROR, logger="kb.api.inputs")
    r = site["c"].get("/v1/_test_raise")
    assert r.status_code == 500
    rid = r.json()["error"]["request_id"]
    assert rid in r.json()["error"]["message"] and r.headers["x-request-id"] == rid
    for word in LEAKS:
        assert word not in r.text, word
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert site["c"].get("/healthz").headers.get("x-request-id")


def test_the_service_still_works_after_all_that(site):
    assert site["c"].get("/v1/corpora/c").status_code == 200
    assert (
        site["c"]
        .post("/v1/corpora", json={"name": "fine-name", "visibility": "public"})
        .status_code
        == 201
    )


# -- properties of the text rule ---------------------------------------------------------------
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_text_rule_accepts_exactly_storable_text(s):
    """Whatever the rule accepts encodes as UTF-8, holds no NUL and no control character but
    tab and newlines; whatever it refuses has one of those."""
    problem = text_problem(s)
    bad = (
        "\x00" in s
        or any(0xD800 <= ord(ch) <= 0xDFFF for ch in s)
        or any((ord(ch) < 32 and ch not in "\t\n\r") or ord(ch) == 127 for ch in s)
    )
    assert (problem is not None) == bad
    if problem is None:
        s.encode("utf-8")


@given(
    st.recursive(
        st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_check_text_finds_bad_text_at_any_depth(value):
    def leaves(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for k, x in v.items():
                yield k
                yield from leaves(x)
        else:
            for x in v:
                yield from leaves(x)

    bad = any(text_problem(x) for x in leaves(value))
    if bad:
        with pytest.raises(KBError):
            check_text(value, "field")
    else:
        assert check_text(value, "field") is value
