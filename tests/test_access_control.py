"""Access control (issue 11, part 5), with KB_AUTH=on: users `ann` (owner), `ben` (another user)
and `root` (admin); corpora `ann-private` (private to ann, one document with a secret fact),
`ann-team` (shared with ben) and `ann-open` (public).

Surfaces and what each test checks:
- HTTP API: ben cannot list, read, chat with (streaming or not), upload to, delete, or touch the
  jobs of ann's private corpus; a private corpus answers 404 exactly like a missing one; the
  shared corpus is readable but not writable by ben; cache administration needs the admin role.
- The web app's named Gradio events, through `gradio_client` with ben's session cookie: pickers
  do not offer the corpus; send/retry/documents/upload/delete/rebuild/open_chat refuse it;
  admin events refuse non-admins.
- The CLI has no server mode: every `kb` command except `kb serve` opens the database and KV
  store directly, as the local operator who owns KB_HOME, so file permissions are its access
  control (`kb ask NAME` reads any corpus by design). What it does enforce is tested instead:
  `kb user` (password length, unique names, keys only for existing users, keys stored hashed,
  a new password ends old sessions).
- Credentials: the api_keys table (and the whole database file) never holds a key's secret
  part; lookup is by sha256 of a 256-bit random key and session/password checks use
  hmac.compare_digest (checked in the source); a revoked key stops working at the API and the
  UI; tampered session cookies are rejected.
- Uploads: hostile file names ("../../x", absolute paths, backslashes, NUL and control
  characters, 300 characters) never write outside KB_HOME, and every stored file resolves
  inside it. A symlink planted inside KB_HOME/files by someone with write access to KB_HOME is
  out of scope: that person already owns the data.

The secret fact must never reach ben: every response body ben gets is scanned for it.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
from pathlib import Path

import pytest

from tests.conftest import MODELS_DIR, serve_in_thread

pytest.importorskip("gradio_client")

PRIVATE, TEAM, OPEN = "ann-private", "ann-team", "ann-open"
SECRET = "Quillfeather vault is 9062"  # the part of the secret document ben must never see
SECRET_FILE = "quillfeather-secret.txt"
QUESTION = "What is the access code of the Quillfeather vault?"
PASSWORDS = {"ann": "pw-ann-1234", "ben": "pw-ben-1234", "root": "pw-root-123"}


def _prose(extra: str) -> str:
    import json as _json
    import logging

    paras = "\n\n".join(inspect.getdoc(m) for m in (_json, logging)).split("\n\n")
    paras.insert(len(paras) // 2, extra)
    return "\n\n".join(paras)


def secret_text() -> str:
    return _prose(
        "The archive of the Quillfeather Society is kept in a vault. "
        "The access code of the Quillfeather vault is 9062."
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory, demo_model_dir):
    """A served KB with auth on. `root/home` is KB_HOME; `root` itself is the sentinel parent
    that must hold nothing but `home`; the documents to upload live in a separate folder."""
    import httpx

    from kb.auth import create_api_key, create_user, set_visibility
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    root = tmp_path_factory.mktemp("acl")
    docs = tmp_path_factory.mktemp("acl-docs")
    home = root / "home"
    kb = KnowledgeBase(Settings(home=home, models_dir=MODELS_DIR, auth="on", max_tokens=16))
    users = {
        n: create_user(kb.db, n, PASSWORDS[n], admin=(n == "root")) for n in ("ann", "ben", "root")
    }
    ann = users["ann"]
    kb.create_corpus(PRIVATE, owner=ann.id, visibility="private")
    kb.create_corpus(TEAM, owner=ann.id, visibility="private")
    set_visibility(kb.db, ann, TEAM, "shared", ["ben"])
    kb.create_corpus(OPEN, owner=ann.id, visibility="public")
    for name, text in (
        (TEAM, "The team garden has eleven apple trees and a pond."),
        (OPEN, "The public library opens at nine and closes at six."),
    ):
        f = docs / f"{name}.txt"
        f.write_text(_prose(text))
        assert kb.ingest(name, [f])[0].status == "ready"
    keys = {n: create_api_key(kb.db, n) for n in users}
    with serve_in_thread(create_app(kb, warm=False)) as url:
        http = httpx.Client(base_url=url, timeout=600)
        # ann uploads her secret document through the API, so the private corpus has a job too
        f = docs / SECRET_FILE
        f.write_text(secret_text())
        with open(f, "rb") as fh:
            r = http.post(
                f"/v1/corpora/{PRIVATE}/documents",
                headers=_bearer(keys["ann"]),
                files=[("files", (SECRET_FILE, fh, "text/plain"))],
            )
        assert r.status_code == 200 and r.json()["documents"][0]["status"] == "ready", r.text
        job_id = r.json()["documents"][0]["job_id"]
        doc_id = r.json()["documents"][0]["document_id"]
        cookies = {n: _login(url, n) for n in users}
        assert not http.cookies  # the shared client carries no credentials of its own
        yield {
            "url": url,
            "kb": kb,
            "http": http,
            "keys": keys,
            "cookies": cookies,
            "users": users,
            "root": root,
            "home": home,
            "docs": docs,
            "job_id": job_id,
            "doc_id": doc_id,
        }
        http.close()
    kb.close()


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _login(url: str, name: str) -> str:
    """Sign in on a client of its own (its cookie jar must not leak into other calls)."""
    import httpx

    with httpx.Client(base_url=url) as c:
        r = c.post(
            "/login", data={"name": name, "password": PASSWORDS[name]}, follow_redirects=False
        )
    assert r.status_code == 303, r.text
    return r.cookies["kb_session"]


class As:
    """HTTP calls as one user (bearer key or session cookie); every body is scanned for the
    secret unless the caller may read it."""

    def __init__(self, site, user: str, cookie: bool = False, may_see_secret: bool = False):
        self.http, self.may = site["http"], may_see_secret
        self.headers = (
            {"Cookie": f"kb_session={site['cookies'][user]}"}
            if cookie
            else _bearer(site["keys"][user])
        )
        self.seen: list[str] = []

    def __call__(self, method: str, path: str, **kw):
        kw.setdefault("headers", self.headers)
        r = self.http.request(method, path, **kw)
        self.seen.append(r.text)
        if not self.may:
            assert SECRET not in r.text and SECRET_FILE not in r.text, (
                f"{method} {path} leaked: {r.text[:300]}"
            )
        return r


def _chat(name: str, stream: bool = False, field: bool = False) -> dict:
    body = {
        "model": "whatever" if field else f"kb:{name}",
        "stream": stream,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": QUESTION}],
    }
    if field:
        body["corpus"] = name
    return body


# -- HTTP API -----------------------------------------------------------------------------------
def test_owner_reads_the_secret_so_the_scan_means_something(site):
    """Positive control: ann (and root) get the secret through the API, in the citations."""
    for user in ("ann", "root"):
        call = As(site, user, may_see_secret=True)
        r = call("POST", "/v1/chat/completions", json=_chat(PRIVATE))
        assert r.status_code == 200 and SECRET in r.text, r.text[:500]
        assert f"kb:{PRIVATE}" in [m["id"] for m in call("GET", "/v1/models").json()["data"]]
        assert call("GET", f"/v1/jobs/{site['job_id']}").status_code == 200


@pytest.mark.parametrize("cookie", [False, True], ids=["api-key", "session-cookie"])
def test_api_other_user_cannot_reach_the_private_corpus(site, cookie):
    ben = As(site, "ben", cookie=cookie)
    kb = site["kb"]
    assert {c["name"] for c in ben("GET", "/v1/corpora").json()} == {TEAM, OPEN}
    assert {m["id"] for m in ben("GET", "/v1/models").json()["data"]} == {
        f"kb:{TEAM}",
        f"kb:{OPEN}",
    }

    # a private corpus answers exactly like one that does not exist
    def same_as_missing(method: str, path: str, **kw):
        r = ben(method, path.format(PRIVATE), **kw)
        missing = ben(method, path.format("no-such-corpus"), **kw)
        assert r.status_code == missing.status_code == 404, (path, r.status_code, r.text)
        assert r.json()["error"]["message"] == missing.json()["error"]["message"].replace(
            "no-such-corpus", PRIVATE
        )

    same_as_missing("GET", "/v1/corpora/{}")
    same_as_missing("GET", "/v1/corpora/{}/documents")
    same_as_missing("GET", "/v1/jobs?corpus={}")
    for stream in (False, True):
        r = ben("POST", "/v1/chat/completions", json=_chat(PRIVATE, stream))
        assert r.status_code == 404, r.text
        r = ben("POST", "/v1/chat/completions", json=_chat(PRIVATE, stream, field=True))
        assert r.status_code == 404, r.text
    docs_before = kb.documents(PRIVATE)
    r = ben(
        "POST",
        f"/v1/corpora/{PRIVATE}/documents",
        files=[("files", ("ben.txt", b"Ben was here. The vault code is 0000.", "text/plain"))],
    )
    assert r.status_code == 404
    r = ben(
        "POST",
        f"/v1/corpora/{PRIVATE}/documents?wait=false",
        files=[("files", ("ben2.txt", b"Ben was here again.", "text/plain"))],
    )
    assert r.status_code == 404
    assert ben("DELETE", f"/v1/corpora/{PRIVATE}").status_code == 404
    assert kb.documents(PRIVATE) == docs_before  # nothing stored, nothing deleted

    # jobs of the private corpus: not listed, not readable, not cancellable, not retryable
    job = site["job_id"]
    assert job not in {j["id"] for j in ben("GET", "/v1/jobs").json()}
    assert all(j["corpus"] != PRIVATE for j in ben("GET", "/v1/jobs").json())
    for method, path in (
        ("GET", f"/v1/jobs/{job}"),
        ("POST", f"/v1/jobs/{job}/cancel"),
        ("POST", f"/v1/jobs/{job}/retry"),
    ):
        assert ben(method, path).status_code == 404, path
    assert kb.jobs.queue.get(job).status == "done"  # untouched
    assert site["doc_id"] in [d["id"] for d in kb.documents(PRIVATE)]


def test_api_shared_corpus_is_readable_not_writable(site):
    ben = As(site, "ben")
    assert ben("GET", f"/v1/corpora/{TEAM}").status_code == 200
    assert ben("GET", f"/v1/corpora/{TEAM}/documents").status_code == 200
    r = ben("POST", "/v1/chat/completions", json=_chat(TEAM))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    r = ben(
        "POST",
        f"/v1/corpora/{TEAM}/documents",
        files=[("files", ("b.txt", b"hi there", "text/plain"))],
    )
    assert r.status_code == 403
    assert ben("DELETE", f"/v1/corpora/{TEAM}").status_code == 403
    assert ben("DELETE", f"/v1/corpora/{OPEN}").status_code == 403
    assert [d["filename"] for d in site["kb"].documents(TEAM)] == [f"{TEAM}.txt"]


def test_api_unauthenticated_gets_401_everywhere(site):
    http = site["http"]
    job = site["job_id"]
    for method, path in (
        ("GET", "/v1/corpora"),
        ("GET", "/v1/models"),
        ("GET", f"/v1/corpora/{OPEN}"),
        ("GET", f"/v1/corpora/{PRIVATE}/documents"),
        ("DELETE", f"/v1/corpora/{PRIVATE}"),
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job}"),
        ("POST", f"/v1/jobs/{job}/retry"),
        ("GET", "/v1/cache"),
        ("POST", f"/v1/cache/{PRIVATE}/evict"),
    ):
        r = http.request(method, path)
        assert r.status_code == 401 and SECRET not in r.text, (method, path, r.status_code)
    r = http.post("/v1/chat/completions", json=_chat(PRIVATE))
    assert r.status_code == 401 and SECRET not in r.text


def test_api_cache_operations_need_the_admin_role(site):
    for user in ("ann", "ben"):
        call = As(site, user)
        assert call("GET", "/v1/cache").status_code == 403
        assert call("GET", f"/v1/cache?name={PRIVATE}").status_code == 403
        for op in ("pin", "unpin", "evict", "rebuild", "delete"):
            assert call("POST", f"/v1/cache/{PRIVATE}/{op}").status_code == 403, (user, op)
        assert call("POST", f"/v1/cache/{OPEN}/move?tier=disk").status_code == 403
        assert call("GET", "/v1/cache/events/anything").status_code == 403
    root = As(site, "root", may_see_secret=True)
    assert {r["name"] for r in root("GET", "/v1/cache").json()} >= {PRIVATE, TEAM, OPEN}
    r = root("POST", f"/v1/cache/{OPEN}/pin")
    assert r.status_code == 202
    assert root("GET", f"/v1/cache/events/{r.json()['event_id']}").status_code == 200
    assert root("POST", f"/v1/cache/{OPEN}/unpin").status_code == 202


# -- the web app's events (gradio_client with ben's session) -------------------------------------
def _ui(site, user: str, cookie: str | None = None):
    from gradio_client import Client

    token = cookie if cookie is not None else site["cookies"][user]
    return Client(f"{site['url']}/", headers={"Cookie": f"kb_session={token}"}, verbose=False)


def _refused(client, *args, api_name: str, match: str):
    """The event fails with `match` in its message, and the message holds no secret."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=match) as e:
        client.predict(*args, api_name=api_name)
    assert SECRET not in str(e.value) and SECRET_FILE not in str(e.value)
    return e.value


def _choices(dropdown: dict) -> list[str]:
    return [c[0] if isinstance(c, (list, tuple)) else c for c in dropdown["choices"]]


def test_ui_other_user_cannot_reach_the_private_corpus(site):
    from gradio_client import handle_file

    kb = site["kb"]
    # ann chats over her corpus in the UI: a stored conversation whose citations hold the secret
    ann = _ui(site, "ann")
    messages, _box, _sources, listed, _title = ann.predict(
        QUESTION, PRIVATE, None, api_name="/send"
    )
    ann_session = listed["value"]
    viewer = ann.predict("1-1", ann_session, api_name="/open_source")
    assert SECRET in viewer  # positive control: the scan below would catch a leak
    assert [c[1] for c in ann.predict(None, api_name="/conversations")["choices"]] == [ann_session]

    ben = _ui(site, "ben")
    outputs = []
    who = ben.predict(api_name="/whoami")
    outputs.append(who)
    assert "ben" in who and "admin" not in who
    chat = ben.predict(None, api_name="/chat_corpora")
    writable = ben.predict(None, api_name="/corpora")
    outputs += [chat, writable]
    assert set(_choices(chat)) == {TEAM, OPEN}
    assert _choices(writable) == []  # ben owns nothing; the shared corpus is read-only to him
    assert ben.predict(None, api_name="/conversations")["choices"] == []

    _refused(ben, QUESTION, PRIVATE, None, api_name="/send", match="does not exist")
    _refused(ben, PRIVATE, api_name="/retry", match="nothing to retry")
    _refused(ben, QUESTION, PRIVATE, ann_session, api_name="/send", match="does not exist")
    _refused(
        ben, ann_session, api_name="/open_chat", match="does not exist|not in the list of choices"
    )
    # the conversation events act on the session state set by open_chat, which refused above
    _refused(ben, "mine", api_name="/rename_chat", match="open a conversation")
    _refused(ben, api_name="/delete_chat", match="open a conversation")
    _refused(ben, PRIVATE, api_name="/documents", match="does not exist")
    upload = site["docs"] / "ben-upload.txt"
    upload.write_text("Ben's note. The vault code is 0000.")
    docs_before = kb.documents(PRIVATE)
    _refused(ben, PRIVATE, [handle_file(str(upload))], api_name="/upload", match="does not exist")
    _refused(ben, PRIVATE, site["doc_id"], api_name="/delete_document", match="does not exist")
    _refused(ben, PRIVATE, api_name="/rebuild", match="does not exist")
    # the shared corpus: readable, not changeable
    table, summary = ben.predict(TEAM, api_name="/documents")
    outputs += [table, summary]
    assert [r[1] for r in table["data"]] == [f"{TEAM}.txt"]
    team_doc = table["data"][0][0]
    _refused(ben, TEAM, [handle_file(str(upload))], api_name="/upload", match="only the owner")
    _refused(ben, TEAM, team_doc, api_name="/delete_document", match="only the owner")
    _refused(ben, TEAM, api_name="/rebuild", match="only the owner")
    assert kb.documents(PRIVATE) == docs_before and len(kb.documents(TEAM)) == 1
    # ann's conversation is still whole: ben's retry did not drop her last turn
    reopened, *_ = ann.predict(ann_session, api_name="/open_chat")
    assert [m["role"] for m in reopened] == ["user", "assistant"]
    blob = json.dumps(outputs, default=str)
    assert SECRET not in blob and SECRET_FILE not in blob


def test_ui_admin_events_refuse_non_admins(site):
    events = [((None,), "/admin_corpora"), ((), "/engine_stats")]
    events += [
        ((OPEN, "cpu"), f"/admin_{op}") for op in ("pin", "unpin", "evict", "move", "rebuild")
    ]
    for user in ("ann", "ben"):
        c = _ui(site, user)
        for args, name in events:
            _refused(c, *args, api_name=name, match="admins only")
    table, _corpus = _ui(site, "root").predict(None, api_name="/admin_corpora")
    assert {r[0] for r in table["data"]} >= {PRIVATE, TEAM, OPEN}


# -- credentials ------------------------------------------------------------------------------
def test_tampered_or_foreign_session_cookies_are_rejected(site):
    http = site["http"]
    uid, exp, sig = site["cookies"]["ben"].split(".")
    ann_id = site["users"]["ann"].id
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    forged = {
        "other uid": f"{ann_id}.{exp}.{sig}",
        "later expiry": f"{uid}.{int(exp) + 3600}.{sig}",
        "flipped signature": f"{uid}.{exp}.{flipped}",
        "no signature": f"{uid}.{exp}.",
        "garbage": "not-a-token",
        "extra part": f"{uid}.{exp}.{sig}.x",
    }
    for what, token in forged.items():
        h = {"Cookie": f"kb_session={token}"}
        assert http.get("/v1/me", headers=h).status_code == 401, what
        assert http.get(f"/v1/corpora/{PRIVATE}", headers=h).status_code == 401, what
        r = http.get("/", headers=h, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "login", what
    with pytest.raises(Exception):  # the Gradio app refuses to hand its config to a forged session
        _ui(site, "ben", cookie=forged["other uid"])
    assert (
        http.get("/v1/me", headers={"Cookie": f"kb_session={site['cookies']['ben']}"}).json()[
            "name"
        ]
        == "ben"
    )


def test_api_keys_are_stored_hashed_and_revocable(site):
    from sqlalchemy import select, text

    from kb.auth import create_api_key, verify_api_key, verify_password, verify_session_token
    from storage.models import ApiKey

    kb, http = site["kb"], site["http"]
    key = create_api_key(kb.db, "ben", "to-revoke")
    all_keys = list(site["keys"].values()) + [key]
    with kb.db.session() as s:
        rows = [tuple(r) for r in s.execute(text("SELECT * FROM api_keys")).all()]
    assert len(rows) >= len(all_keys)
    for k in all_keys:
        secret_part = k[10:]  # the stored prefix is k[:10]
        for row in rows:
            for value in row:
                assert str(value) != k and secret_part not in str(value)
        assert hashlib.sha256(k.encode()).hexdigest() in {str(v) for row in rows for v in row}
    # nor anywhere in the database files (SQLite's main file and its journal)
    for f in site["home"].glob("kb.sqlite3*"):
        data = f.read_bytes()
        assert all(k[10:].encode() not in data for k in all_keys), f
    # the checks that compare secrets: keys are found by the sha256 of a 256-bit random key (no
    # byte-wise compare of the secret); session signatures and passwords use compare_digest
    assert "sha256" in inspect.getsource(verify_api_key)
    assert "hmac.compare_digest" in inspect.getsource(verify_session_token)
    assert "hmac.compare_digest" in inspect.getsource(verify_password)

    assert http.get("/v1/me", headers=_bearer(key)).json()["name"] == "ben"
    assert _ui_whoami(site, key).startswith("signed in as **ben**")
    with kb.db.session() as s:
        s.scalar(select(ApiKey).where(ApiKey.name == "to-revoke")).revoked = True
    assert http.get("/v1/me", headers=_bearer(key)).status_code == 401
    assert http.get("/v1/corpora", headers=_bearer(key)).status_code == 401
    with pytest.raises(Exception):
        _ui_whoami(site, key)
    assert http.get("/v1/me", headers=_bearer(site["keys"]["ben"])).json()["name"] == "ben"


def _ui_whoami(site, key: str) -> str:
    from gradio_client import Client

    return Client(f"{site['url']}/", headers=_bearer(key), verbose=False).predict(
        api_name="/whoami"
    )


# -- uploads stay inside KB_HOME -----------------------------------------------------------------
HOSTILE_NAMES = [
    "../../escape-a.txt",
    "../../../escape-b.txt",
    "../../../../../../escape-c.txt",
    "/etc/passwd",
    "/tmp/escape-d.txt",
    "..\\..\\escape-win.txt",
    "C:\\Windows\\escape-e.txt",
    "ok\x00../../escape-f.txt",
    "ctl\x01\x1b[2J\x7fname.txt",
    "new\nline.txt",
    "tab\tname.txt",
    "x" * 300,
    ("y" * 296) + ".txt",
    "..",
    ".",
    "",
    "  ",
    "....//....//escape-g.txt",
]


def _inside(path: Path, home: Path) -> bool:
    return path.resolve().is_relative_to(home.resolve())


@pytest.mark.parametrize(
    "idx", range(len(HOSTILE_NAMES)), ids=[repr(n)[:40] for n in HOSTILE_NAMES]
)
def test_uploaded_files_never_escape_kb_home(site, idx):
    name = HOSTILE_NAMES[idx]
    kb, home, root = site["kb"], site["home"], site["root"]
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else None
    body = f"Upload number {idx} with a hostile name.\n\nIt says nothing else.".encode()
    ann = As(site, "ann", may_see_secret=True)
    if "\n" in name or "\r" in name:  # cannot stand raw in a header line: httpx percent-encodes it
        r = ann(
            "POST", f"/v1/corpora/{OPEN}/documents", files=[("files", (name, body, "text/plain"))]
        )
    else:  # raw bytes in the filename (httpx would percent-encode NUL and other control characters)
        boundary = "acl-boundary-5f1e"
        raw = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                f"Content-Type: text/plain\r\n\r\n"
            ).encode()
            + body
            + f"\r\n--{boundary}--\r\n".encode()
        )
        r = ann(
            "POST",
            f"/v1/corpora/{OPEN}/documents",
            content=raw,
            headers={**ann.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    assert r.status_code in (200, 400, 422), (name, r.status_code, r.text[:300])  # handled
    # nothing outside KB_HOME: the sentinel parent holds only the home, and no escape-* file
    # appeared anywhere under the test's temporary root
    assert sorted(os.listdir(root)) == ["home"]
    base = root.parent
    strays = [p for p in base.rglob("escape-*") if not _inside(p, home)]
    assert strays == []
    assert not any(
        Path(p).exists() for p in ("/tmp/escape-d.txt", "/escape-a.txt", "/escape-c.txt")
    )
    if passwd is not None:
        assert Path("/etc/passwd").read_bytes() == passwd
    # everything under KB_HOME resolves inside it, and no symlinks were made
    for p in home.rglob("*"):
        assert not p.is_symlink() and _inside(p, home), p
    with kb.db.session() as s:
        from sqlalchemy import select

        from storage.models import Document

        for d in s.scalars(select(Document)):
            assert d.file_path is None or _inside(Path(d.file_path), kb.settings.files_dir), (
                d.file_path
            )
            assert not any(ch in d.filename for ch in "/\\\x00\n\r") and len(d.filename) <= 255


# -- the CLI -----------------------------------------------------------------------------------
def test_cli_enforces_user_rules(kb_env, monkeypatch, capsys):
    """`kb user` is the CLI's part of access control (it has no server mode; see the docstring)."""
    from sqlalchemy import text

    from kb.auth import authenticate, make_session_token, session_secret, verify_session_token
    from kb.cli import main
    from kb.service import KnowledgeBase

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err

    assert run("user", "add", "ann", "--password-stdin", stdin="pw-ann-1234\n")[0] == 0
    rc, _, err = run("user", "add", "ann", "--password-stdin", stdin="another-pass\n")
    assert rc == 1 and "already exists" in err
    rc, _, err = run("user", "add", "ben", "--password-stdin", stdin="short\n")
    assert rc == 1 and "at least 8" in err
    rc, _, err = run("user", "key", "nobody")
    assert rc == 1 and "does not exist" in err
    rc, out, _ = run("user", "list")
    assert out.split() == ["ann"]  # not an admin, and ben was never made
    rc, key, err = run("user", "key", "ann", "--label", "laptop")
    key = key.strip()
    assert rc == 0 and key.startswith("kb_") and "only its hash is stored" in err

    kb = KnowledgeBase()
    try:
        with kb.db.session() as s:
            stored = [
                str(v) for row in s.execute(text("SELECT * FROM api_keys")).all() for v in row
            ]
        assert not any(key[10:] in v for v in stored)
        ann = authenticate(kb.db, "ann", "pw-ann-1234")
        secret = session_secret(kb.home)
        token = make_session_token(kb.db, secret, ann)
        assert verify_session_token(kb.db, secret, token) == ann
        rc, out, _ = run("user", "password", "ann", "--password-stdin", stdin="pw-ann-5678\n")
        assert rc == 0 and "sessions end" in out
        assert verify_session_token(kb.db, secret, token) is None  # signed out everywhere
        assert authenticate(kb.db, "ann", "pw-ann-1234") is None
    finally:
        kb.close()


def test_metrics_need_the_admin_role_and_auth_errors_are_the_envelope(site):
    """/metrics names corpora in its labels: with sign-in on, admins only (issue 19). The
    `openai` client raises its own classes for 401 and 403, carrying our messages."""
    import openai

    assert site["http"].get("/metrics").status_code == 401
    assert As(site, "ben")("GET", "/metrics").status_code == 403
    r = As(site, "root", may_see_secret=True)("GET", "/metrics")
    assert r.status_code == 200 and "kb_shared_kv_bytes" in r.text
    for key, cls in (("kb_wrong", openai.AuthenticationError), (site["keys"]["ben"], None)):
        client = openai.OpenAI(base_url=f"{site['url']}/v1", api_key=key, max_retries=0)
        if cls is None:  # a valid key of a user who may not read the corpus: as if missing
            with pytest.raises(openai.NotFoundError) as e:
                client.models.retrieve(f"kb:{PRIVATE}")
            assert e.value.code == "model_not_found"
            continue
        with pytest.raises(cls) as e:
            client.models.list()
        assert e.value.status_code == 401 and e.value.body["message"] in e.value.message
