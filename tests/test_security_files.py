"""Issue 15, point 1: no user reads a server file through the web app's events.

These drive the real app (`create_app`, Gradio mounted in FastAPI) over HTTP with the exact
requests of the outside probe: an upload event handed `/etc/passwd`, a chat message whose file
part names the database, `/gradio_api/file=` for another caller's upload, and Gradio's own
`/gradio_api/upload` past `KB_MAX_UPLOAD_MB`; with sign-in on and off.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODELS_DIR, serve_in_thread

FILE_DATA = {"_type": "gradio.FileData"}
SECRET = "the-secret-of-the-server-is-9271"


def _site(root: Path, auth: str):
    """A served KB: users ann and bob (sign-in on), each with a private corpus; a secret file
    outside every upload folder."""
    from kb.auth import create_api_key, create_user
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    kb = KnowledgeBase(
        Settings(
            home=root / "home", models_dir=MODELS_DIR, auth=auth, max_tokens=8, max_upload_mb=0.05
        )
    )
    secret = root / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    keys = {}
    if auth == "on":
        for name in ("ann", "bob"):
            user = create_user(kb.db, name, f"pw-{name}-1234")
            kb.create_corpus(f"{name}-corpus", owner=user.id, visibility="private")
            keys[name] = create_api_key(kb.db, name)
    else:
        kb.create_corpus("open-corpus", visibility="public")
    return kb, create_app(kb, warm=False), secret, keys


@pytest.fixture(scope="module", params=["on", "off"])
def site(request, tmp_path_factory, demo_model_dir):
    root = tmp_path_factory.mktemp(f"sec-files-{request.param}")
    kb, app, secret, keys = _site(root, request.param)
    with serve_in_thread(app) as url:
        yield {
            "url": url,
            "kb": kb,
            "secret": secret,
            "keys": keys,
            "auth": request.param,
            "corpus": {"ann": "ann-corpus", "bob": "bob-corpus"}
            if keys
            else {"ann": "open-corpus", "bob": "open-corpus"},
        }
    kb.close()


def _client(site, who: str) -> httpx.Client:
    """An HTTP client for `who`: a bearer key with sign-in on, else its own browser (cookies)."""
    c = httpx.Client(base_url=site["url"], timeout=60)
    if site["keys"]:
        c.headers["Authorization"] = f"Bearer {site['keys'][who]}"
    c.get("/config")  # as a browser and gradio_client do first: the cookies of this visitor
    return c


def _call(c: httpx.Client, api: str, data: list) -> tuple[int, str]:
    """POST /gradio_api/call/<api>, then read its event stream; (status of the POST, all text)."""
    r = c.post(f"/gradio_api/call/{api}", json={"data": data})
    if r.status_code != 200:
        return r.status_code, r.text
    event_id = r.json()["event_id"]
    with c.stream("GET", f"/gradio_api/call/{api}/{event_id}") as s:
        return 200, "".join(s.iter_text())


def _documents(site, corpus: str) -> list:
    with site["kb"].db.session() as s:
        from sqlalchemy import select

        from storage.models import Corpus, Document

        cid = s.scalar(select(Corpus.id).where(Corpus.name == corpus))
        return list(s.scalars(select(Document.filename).where(Document.corpus_id == cid)))


def _file_links(text: str) -> list[str]:
    return sorted(set(re.findall(r'/gradio_api/file=[^"\\\s]+', text)))


def test_upload_event_refuses_a_server_path(site):
    """The probe's request: the `upload` event handed /etc/passwd (and a secret file) ingests
    nothing and says why."""
    c = _client(site, "ann")
    corpus = site["corpus"]["ann"]
    for path in (
        "/etc/passwd",
        str(site["secret"]),
        str(site["kb"].settings.resolved_home / "kb.sqlite3"),
    ):
        status, text = _call(c, "upload", [corpus, [{"path": path, "meta": FILE_DATA}]])
        assert status == 403 or "event: error" in text, (path, status, text)
        assert SECRET not in text and "root:" not in text
    assert _documents(site, corpus) == []


def test_send_refuses_a_file_part_and_serves_no_server_file(site):
    """The probe's request: a chat message whose file part names the database gets no
    /gradio_api/file= link; the database, the session secret and the secret file are served
    to no one."""
    c = _client(site, "ann")
    home = site["kb"].settings.resolved_home
    db = home / "kb.sqlite3"
    for path in (db, home / "session.secret", site["secret"]):
        if not path.exists():
            continue
        msg = {
            "role": "user",
            "content": [{"type": "file", "file": {"path": str(path), "meta": FILE_DATA}}],
        }
        status, text = _call(c, "send", ["what is in it?", [msg], site["corpus"]["ann"], None])
        assert status == 403 or "event: error" in text, (path, status, text)
        for link in _file_links(text):
            body = c.get(link).content
            assert b"SQLite format 3" not in body and SECRET.encode() not in body, link
        for link in (
            f"/gradio_api/file={path}",
            f"/gradio_api/file={urllib.parse.quote(str(path))}",
        ):
            r = c.get(link)
            assert r.status_code in (403, 404), (link, r.status_code)


def test_component_message_with_a_file_is_refused(site):
    """A chat message part of type `component` carrying a server path is refused as well."""
    c = _client(site, "ann")
    msg = {
        "role": "user",
        "content": [
            {
                "type": "component",
                "component": "file",
                "constructor_args": {},
                "props": {},
                "value": {"path": str(site["secret"])},
            }
        ],
    }
    status, text = _call(c, "send", ["hi", [msg], site["corpus"]["ann"], None])
    assert status in (400, 403) or "event: error" in text, (status, text)
    for link in _file_links(text):
        assert SECRET.encode() not in c.get(link).content


def _upload(c: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return c.post("/gradio_api/upload", files=[("files", (name, data, "text/plain"))])


def test_uploads_belong_to_their_uploader(site):
    """Another caller can neither fetch ann's upload nor hand its path to an event."""
    ann, bob = _client(site, "ann"), _client(site, "bob")
    r = _upload(ann, "notes.txt", f"ann's private notes {SECRET}".encode())
    assert r.status_code == 200, r.text
    (path,) = r.json()
    assert ann.get(f"/gradio_api/file={path}").content.endswith(SECRET.encode())
    assert bob.get(f"/gradio_api/file={path}").status_code in (403, 404)
    status, text = _call(
        bob, "upload", [site["corpus"]["bob"], [{"path": path, "meta": FILE_DATA}]]
    )
    assert status == 403 or "event: error" in text, (status, text)
    assert all("notes" not in d for d in _documents(site, site["corpus"]["bob"]))


def test_own_upload_still_works(site):
    """The owner hands the path Gradio gave them to `upload`: the document is stored."""
    ann = _client(site, "ann")
    r = _upload(ann, "handbook-page.txt", b"Vacation days: twenty five per year.\n")
    assert r.status_code == 200, r.text
    (path,) = r.json()
    status, text = _call(
        ann, "upload", [site["corpus"]["ann"], [{"path": path, "meta": FILE_DATA}]]
    )
    assert status == 200 and "event: complete" in text, text
    assert "handbook-page.txt" in _documents(site, site["corpus"]["ann"])


def test_gradio_upload_honours_the_size_limit(site):
    """KB_MAX_UPLOAD_MB (0.05 MiB here) holds on Gradio's own /gradio_api/upload."""
    c = _client(site, "ann")
    r = _upload(c, "big.txt", b"x" * 200_000)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert _upload(c, "small.txt", b"x" * 1000).status_code == 200


def test_generic_routes_serve_nothing_of_the_server(site):
    """/gradio_api/file= and the deprecated /gradio_api/file/ serve no file that is not the
    caller's upload: not the database, not the source tree, not the cwd."""
    c = _client(site, "ann")
    home = site["kb"].settings.resolved_home
    for path in (
        home / "kb.sqlite3",
        home / "session.secret",
        Path(os.getcwd()) / "pyproject.toml",
        site["secret"],
        Path("/etc/passwd"),
    ):
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            r = c.get(f"{route}{path}")
            assert r.status_code in (403, 404), (route, path, r.status_code)


def test_path_rule_refuses_links_out_of_the_upload_folder(tmp_path):
    """Our own rule: inside the upload folder, no symlink on the way, uploaded by this caller."""
    from kb.uploads import UploadRegistry

    folder = tmp_path / "uploads"
    (folder / "abc").mkdir(parents=True)
    mine = folder / "abc" / "mine.txt"
    mine.write_text("mine")
    link = folder / "abc" / "link.txt"
    link.symlink_to(tmp_path / "outside.txt")
    (tmp_path / "outside.txt").write_text(SECRET)
    linked_dir = folder / "dir"
    linked_dir.symlink_to(tmp_path)
    reg = UploadRegistry(folder)
    for p in (mine, link, linked_dir / "outside.txt"):
        reg.add(str(p), "user:1")
    assert reg.allowed(str(mine), "user:1")
    assert not reg.allowed(str(mine), "user:2")
    assert not reg.allowed(str(link), "user:1")
    assert not reg.allowed(str(linked_dir / "outside.txt"), "user:1")
    assert not reg.allowed(str(folder / "abc" / ".." / ".." / "outside.txt"), "user:1")
    assert not reg.allowed("/etc/passwd", "user:1")


def test_event_bodies_name_no_foreign_file(tmp_path):
    """The body check finds a file object at any depth of an event's data."""
    from kb.uploads import file_paths

    data = {
        "data": [
            "c",
            [{"role": "user", "content": [{"type": "file", "file": {"path": "/etc/passwd"}}]}],
            {"x": [{"path": "/a", "meta": FILE_DATA}]},
        ]
    }
    assert sorted(file_paths(data)) == ["/a", "/etc/passwd"]
    assert (
        file_paths({"data": ["plain text with path in it", {"role": "user", "content": "hi"}]})
        == []
    )
    assert json.loads(json.dumps(data)) == data
