"""Issue 15, point 7 (the low items): no existence leak between "create" and "read"; names are
checked to their end (no trailing newline); a shared corpus is created in one transaction.
(The gauges following aborts are tested in test_security_engine.py.)"""

from __future__ import annotations

import httpx
import pytest

from kb.errors import KBError
from tests.conftest import MODELS_DIR, serve_in_thread


@pytest.fixture(scope="module")
def site(tmp_path_factory, demo_model_dir):
    from kb.auth import create_api_key, create_user
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    root = tmp_path_factory.mktemp("sec-low")
    kb = KnowledgeBase(Settings(home=root / "home", models_dir=MODELS_DIR, auth="on"))
    ann = create_user(kb.db, "ann", "pw-ann-1234")
    create_user(kb.db, "bob", "pw-bob-1234")
    kb.create_corpus("ann-secret", owner=ann.id, visibility="private")
    with serve_in_thread(create_app(kb, warm=False)) as url:
        clients = {
            n: httpx.Client(
                base_url=url,
                timeout=30,
                headers={"Authorization": f"Bearer {create_api_key(kb.db, n)}"},
            )
            for n in ("ann", "bob")
        }
        yield {"kb": kb, **clients}
    kb.close()


def test_creating_a_hidden_name_answers_as_any_taken_name(site):
    """bob may not learn that ann's private corpus exists: creating its name answers exactly as
    creating a name of his own that is taken, and says nothing of existence."""
    bob = site["bob"]
    assert bob.get("/v1/corpora/ann-secret").status_code == 404
    hidden = bob.post("/v1/corpora", json={"name": "ann-secret"})
    assert bob.post("/v1/corpora", json={"name": "bob-own"}).status_code == 201
    own = bob.post("/v1/corpora", json={"name": "bob-own"})
    assert hidden.status_code == own.status_code == 409
    m_hidden, m_own = hidden.json()["error"]["message"], own.json()["error"]["message"]
    assert m_hidden.replace("ann-secret", "NAME") == m_own.replace("bob-own", "NAME")
    assert "exist" not in m_hidden


def test_names_end_where_they_end(site):
    """'$' matched before a trailing newline: "handbook\\n" was a second, lookalike corpus."""
    kb = site["kb"]
    for name in ("lookalike\n", "lookalike\r\n", "lookalike\x00"):
        with pytest.raises(KBError):
            kb.create_corpus(name)
        r = site["ann"].post("/v1/corpora", json={"name": name})
        assert r.status_code == 400, (name, r.text)
    assert site["ann"].post("/v1/corpora", json={"name": "lookalike"}).status_code == 201


def test_shared_corpus_with_an_unknown_user_leaves_nothing_behind(site):
    ann = site["ann"]
    r = ann.post(
        "/v1/corpora", json={"name": "team", "visibility": "shared", "share_with": ["bob", "ghost"]}
    )
    assert r.status_code == 404 and "ghost" in r.json()["error"]["message"]
    assert ann.get("/v1/corpora/team").status_code == 404
    r = ann.post(
        "/v1/corpora", json={"name": "team", "visibility": "shared", "share_with": ["bob"]}
    )
    assert r.status_code == 201, r.text
    assert site["bob"].get("/v1/corpora/team").status_code == 200
