"""kb/chats.py: a conversation is reachable only by its owner (a user by id, an anonymous
browser by its owner key), over a corpus the caller may read; retry drops the last turn."""

from __future__ import annotations

import pytest

from kb.auth import ANONYMOUS, create_user
from kb.errors import KBError, NotFound
from kb.service import KnowledgeBase
from kb.settings import Settings


@pytest.fixture
def kb(tmp_path):
    k = KnowledgeBase(Settings(home=tmp_path / "home", auth="off"))
    yield k
    k.close()


def test_a_users_chat_round_trip_and_nobody_elses(kb):
    ann = create_user(kb.db, "ann", "pw-ann-123")
    bob = create_user(kb.db, "bob", "pw-bob-123")
    kb.create_corpus("notes", owner=ann.id, visibility="private")
    sid = kb.chats.create(ann, "user:x", "notes", "q" * 300)
    kb.chats.append(ann, "ignored", sid, "user", "what is kb?")
    cite = {"document": "a.md", "page": 2, "text": "kb is", "score": 0.5, "document_id": None}
    kb.chats.append(ann, "ignored", sid, "assistant", "a knowledge base", [cite])
    history = kb.chats.load(ann, "", sid)
    assert history.corpus == "notes"
    assert [(m.role, m.content) for m in history.messages] == [
        ("user", "what is kb?"),
        ("assistant", "a knowledge base"),
    ]
    assert history.messages[1].citations == [  # with its document, for the source viewer
        {"document_id": None, "document": "a.md", "page": 2, "text": "kb is", "score": 0.5}
    ]
    [summary] = kb.chats.list(ann, "", "notes")
    assert (summary.id, summary.title) == (sid, "q" * 200)
    for call in (
        lambda: kb.chats.load(bob, "", sid),
        lambda: kb.chats.append(bob, "", sid, "user", "mine now"),
        lambda: kb.chats.drop_last_turn(bob, "", sid),
        lambda: kb.chats.rename(bob, "", sid, "taken"),
        lambda: kb.chats.delete(bob, "", sid),
        lambda: kb.chats.load(ANONYMOUS, "anon:x", sid),
    ):
        with pytest.raises(NotFound):
            call()
    assert kb.chats.list(bob, "", "notes") == []
    # without a corpus: every conversation of the caller, each naming its corpus
    assert [(c.id, c.corpus) for c in kb.chats.list(ann, "")] == [(sid, "notes")]
    assert kb.chats.list(bob, "") == []
    with pytest.raises(NotFound):  # bob may not read ann's private corpus
        kb.chats.create(bob, "", "notes", "hi")
    kb.chats.rename(ann, "", sid, "renamed")
    assert [c.title for c in kb.chats.list(ann, "", "notes")] == ["renamed"]
    kb.chats.drop_last_turn(ann, "", sid)
    assert kb.chats.load(ann, "", sid).messages == []
    kb.chats.delete(ann, "", sid)
    assert kb.chats.list(ann, "", "notes") == []
    with pytest.raises(NotFound):
        kb.chats.load(ann, "", sid)


def test_anonymous_chats_belong_to_their_browser_key(kb):
    kb.create_corpus("pub", visibility="public")
    with pytest.raises(KBError, match="no session cookie"):
        kb.chats.create(ANONYMOUS, "nobody", "pub", "hi")
    assert kb.chats.list(ANONYMOUS, "nobody", "pub") == []
    sid = kb.chats.create(ANONYMOUS, "anon:one", "pub", "hi")
    assert [c.id for c in kb.chats.list(ANONYMOUS, "anon:one", "pub")] == [sid]
    assert kb.chats.list(ANONYMOUS, "anon:two", "pub") == []
    with pytest.raises(NotFound):
        kb.chats.load(ANONYMOUS, "anon:two", sid)
    with pytest.raises(NotFound):
        kb.chats.create(ANONYMOUS, "anon:one", "missing", "hi")
