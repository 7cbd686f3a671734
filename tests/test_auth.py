"""Sign-in and access: password hashing, API keys, session cookies, corpus visibility, the API
under KB_AUTH=on and off, and `kb user`."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def kb(tmp_path):
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    k = KnowledgeBase(Settings(home=tmp_path / "home", auth="on"))
    yield k
    k.close()


def test_password_hashing_and_users(kb):
    from kb.auth import authenticate, create_user, hash_password, set_password, verify_password
    from kb.errors import Conflict

    h = hash_password("correct horse")
    assert h.startswith("scrypt$") and "correct horse" not in h
    assert h != hash_password("correct horse")  # salted
    assert verify_password("correct horse", h) and not verify_password("wrong", h)
    assert not verify_password("x", "md5$nope")
    alice = create_user(kb.db, "alice", "pw-alice-1", admin=True)
    assert alice.is_admin and not alice.anonymous
    with pytest.raises(Conflict):
        create_user(kb.db, "alice", "other")
    assert authenticate(kb.db, "alice", "pw-alice-1") == alice
    assert authenticate(kb.db, "alice", "nope") is None
    assert authenticate(kb.db, "nobody", "pw-alice-1") is None
    set_password(kb.db, "alice", "pw-alice-2")
    assert authenticate(kb.db, "alice", "pw-alice-1") is None and authenticate(
        kb.db, "alice", "pw-alice-2"
    )


def test_api_keys_and_session_tokens(kb):
    from sqlalchemy import select

    from kb.auth import (
        create_api_key,
        create_user,
        make_session_token,
        session_secret,
        set_password,
        verify_api_key,
        verify_session_token,
    )
    from storage.models import ApiKey

    bob = create_user(kb.db, "bob", "pw-bob-123")
    key = create_api_key(kb.db, "bob", "laptop")
    assert verify_api_key(kb.db, key) == bob
    assert verify_api_key(kb.db, key + "x") is None and verify_api_key(kb.db, "unused") is None
    with kb.db.session() as s:
        row = s.scalar(select(ApiKey))
        assert row.prefix == key[:10] and key not in row.key_hash and row.last_used_at is not None
        row.revoked = True
    assert verify_api_key(kb.db, key) is None

    secret = session_secret(kb.home)
    assert session_secret(kb.home) == secret and len(secret) == 32
    token = make_session_token(kb.db, secret, bob)
    assert verify_session_token(kb.db, secret, token) == bob
    uid, exp, sig = token.split(".")
    assert verify_session_token(kb.db, secret, f"{uid}.{int(exp) + 1}.{sig}") is None  # tampered
    assert verify_session_token(kb.db, b"another secret" * 2, token) is None
    assert (
        verify_session_token(kb.db, secret, make_session_token(kb.db, secret, bob, ttl_s=-1))
        is None
    )
    set_password(kb.db, "bob", "pw-bob-456")  # a new password ends old sessions
    assert verify_session_token(kb.db, secret, token) is None


def test_visibility_rules(kb):
    from sqlalchemy import select

    from kb.auth import ANONYMOUS, can_read, can_write, create_user, readable_names, set_visibility
    from kb.errors import NotFound
    from storage.models import Corpus

    admin = create_user(kb.db, "root", "pw-root-123", admin=True)
    ann = create_user(kb.db, "ann", "pw-ann-1234")
    ben = create_user(kb.db, "ben", "pw-ben-1234")
    cat = create_user(kb.db, "cat", "pw-cat-1234")
    kb.create_corpus("mine", owner=ann.id, visibility="private")
    kb.create_corpus("open", owner=ann.id, visibility="public")
    kb.create_corpus("team", owner=ann.id, visibility="private")
    kb.create_corpus("legacy")  # made before sign-in existed: public, unowned
    set_visibility(kb.db, ann, "team", "shared", ["ben"])
    with pytest.raises(NotFound):
        set_visibility(kb.db, ann, "team", "shared", ["nobody"])

    assert readable_names(kb.db, ann) == {"mine", "open", "team", "legacy"}
    assert readable_names(kb.db, ben) == {"open", "team", "legacy"}
    assert readable_names(kb.db, cat) == {"open", "legacy"}
    assert readable_names(kb.db, ANONYMOUS) == {"open", "legacy"}
    assert readable_names(kb.db, admin) == {"mine", "open", "team", "legacy"}
    assert [c.name for c in kb.list_corpora(user=cat)] == ["legacy", "open"]
    assert len(kb.list_corpora()) == 4  # no user: everything, as before
    with kb.db.session() as s:
        team = s.scalar(select(Corpus).where(Corpus.name == "team"))
        legacy = s.scalar(select(Corpus).where(Corpus.name == "legacy"))
        assert can_read(s, ben, team) and not can_write(ben, team) and can_write(ann, team)
        assert can_write(admin, team) and not can_read(s, cat, team)
        assert (
            can_write(ANONYMOUS, legacy)
            and not can_write(ann, legacy)
            and not can_write(ANONYMOUS, team)
        )
    with pytest.raises(NotFound):  # asking about a corpus you may not read: as if it did not exist
        kb.ask("mine", "hello?", user=cat)


def _login(client: TestClient, name: str, password: str):
    return client.post("/login", data={"name": name, "password": password}, follow_redirects=False)


def test_api_with_auth_on(kb):
    from kb.auth import create_api_key, create_user
    from kb.server import create_app

    create_user(kb.db, "ann", "pw-ann-1234")
    create_user(kb.db, "ben", "pw-ben-1234")
    key_ann, key_ben = create_api_key(kb.db, "ann"), create_api_key(kb.db, "ben")
    with TestClient(create_app(kb, warm=False)) as c:
        assert c.get("/v1/corpora").status_code == 401
        assert c.get("/v1/corpora", headers={"Authorization": "Bearer nope"}).status_code == 401
        ann = {"Authorization": f"Bearer {key_ann}"}
        ben = {"Authorization": f"Bearer {key_ben}"}
        assert c.get("/v1/me", headers=ann).json() == {
            "name": "ann",
            "admin": False,
            "anonymous": False,
        }
        r = c.post("/v1/corpora", json={"name": "notes"}, headers=ann)
        assert r.status_code == 201
        r = c.post(
            "/v1/corpora",
            json={"name": "shared-notes", "visibility": "shared", "share_with": ["ben"]},
            headers=ann,
        )
        assert r.status_code == 201
        assert {x["name"] for x in c.get("/v1/corpora", headers=ann).json()} == {
            "notes",
            "shared-notes",
        }
        assert {x["name"] for x in c.get("/v1/corpora", headers=ben).json()} == {"shared-notes"}
        assert c.get("/v1/corpora/notes", headers=ben).status_code == 404  # private: not revealed
        assert c.get("/v1/corpora/shared-notes/documents", headers=ben).status_code == 200
        assert (
            c.delete("/v1/corpora/shared-notes", headers=ben).status_code == 403
        )  # reader, not owner
        r = c.post(
            "/v1/corpora/shared-notes/documents",
            headers=ben,
            files=[("files", ("a.txt", b"hi", "text/plain"))],
        )
        assert r.status_code == 403
        r = c.post(
            "/v1/chat/completions",
            headers=ben,
            json={"model": "kb:notes", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 404

        # cache administration is for admins only
        create_user(kb.db, "root", "pw-root-123", admin=True)
        root = {"Authorization": f"Bearer {create_api_key(kb.db, 'root')}"}
        assert c.get("/v1/cache", headers=ann).status_code == 403
        assert c.post("/v1/cache/notes/pin", headers=ann).status_code == 403
        assert c.get("/v1/cache").status_code == 401
        assert {x["name"] for x in c.get("/v1/cache", headers=root).json()} >= {
            "notes",
            "shared-notes",
        }
        event = c.post("/v1/cache/notes/pin", headers=root).json()["event_id"]
        assert c.get(f"/v1/cache/events/{event}", headers=root).status_code == 200

        # the web app: sign-in page first, then the UI with the session cookie
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "login"
        assert "Sign in" in c.get("/login").text
        assert _login(c, "ann", "wrong").status_code == 401
        r = _login(c, "ann", "pw-ann-1234")
        assert r.status_code == 303 and "kb_session" in r.cookies
        assert c.get("/v1/me").json()["name"] == "ann"  # the cookie works for the API too
        page = c.get("/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
        c.get("/logout")
        assert c.get("/v1/me").status_code == 401


def test_api_with_auth_off_is_anonymous(tmp_path):
    from kb.auth import create_api_key, create_user
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    kb = KnowledgeBase(Settings(home=tmp_path / "home"))
    assert kb.settings.auth == "off"
    create_user(kb.db, "root", "pw-root-123", admin=True)
    key = create_api_key(kb.db, "root")
    kb.create_corpus("secret", owner=1, visibility="private")
    with TestClient(create_app(kb, warm=False, ui=False)) as c:
        assert (
            c.get("/v1/me", headers={"Authorization": "Bearer unused"}).json()["anonymous"] is True
        )
        assert c.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).json()["admin"] is True
        assert c.get("/v1/corpora").json() == []
        assert c.post("/v1/corpora", json={"name": "pub"}).status_code == 201
        assert (
            c.post("/v1/corpora", json={"name": "priv", "visibility": "private"}).status_code == 403
        )
        assert [x["name"] for x in c.get("/v1/corpora").json()] == ["pub"]
        assert c.get("/").status_code == 404  # ui=False: the API alone
    kb.close()


def test_cli_user_add_and_key(kb_env, monkeypatch, capsys):
    from kb.auth import authenticate, verify_api_key
    from kb.cli import main
    from kb.service import KnowledgeBase

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-pass\n"))
    assert main(["user", "add", "alice", "--admin", "--password-stdin"]) == 0
    assert "created user alice (admin)" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["user", "add", "bob", "--password-stdin"]) == 1
    assert "at least 8" in capsys.readouterr().err
    assert main(["user", "key", "alice"]) == 0
    key = capsys.readouterr().out.strip()
    assert main(["user", "key", "nobody"]) == 1
    kb = KnowledgeBase()
    try:
        user = verify_api_key(kb.db, key)
        assert user is not None and user.name == "alice" and user.is_admin
        assert authenticate(kb.db, "alice", "s3cret-pass") == user
    finally:
        kb.close()
    # list (prefix only, never the key), revoke by prefix, and the key stops working
    assert main(["user", "key", "alice", "--label", "ci"]) == 0
    second = capsys.readouterr().out.strip()
    assert main(["user", "keys", "alice"]) == 0
    listing = capsys.readouterr().out
    assert key[:10] in listing and second[:10] in listing and key not in listing and "ci" in listing
    assert main(["user", "revoke", "kb_"]) == 1  # too short to name one key
    assert main(["user", "revoke", key[:10]]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["user", "revoke", "kb_zzzzzzz"]) == 1
    assert "no API key starts with" in capsys.readouterr().err
    kb = KnowledgeBase()
    try:
        assert verify_api_key(kb.db, key) is None
        assert verify_api_key(kb.db, second) is not None
    finally:
        kb.close()
    assert main(["user", "keys", "alice"]) == 0
    assert "revoked" in capsys.readouterr().out
