"""Stored conversations of the web app's Chat tab: each belongs to one user (by id) or, with
sign-in off, to one anonymous browser (by its owner key, a hash of a random cookie), and reads
one corpus the caller may read. Every method checks both before it touches a row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from kb.auth import Principal, can_read, check_read
from kb.errors import KBError, NotFound
from storage.db import Database
from storage.models import ChatSession, CitationRecord, Corpus, Message

LIST_LIMIT = 50  # newest conversations shown per corpus
TITLE_CHARS = 200


@dataclass
class ChatSummary:
    """One conversation in the picker."""

    id: int
    title: str
    corpus: str = ""


@dataclass
class StoredMessage:
    """One stored turn and the citations stored with it (document, page, text, score)."""

    role: str
    content: str
    citations: list[dict] = field(default_factory=list)


@dataclass
class ChatHistory:
    """A conversation as stored: the corpus it reads and its turns in order."""

    corpus: str
    messages: list[StoredMessage]


def _mine(user: Principal, owner: str):
    """The SQL condition for the caller's chats: a user's by id; with sign-in off, an anonymous
    browser's by its owner key (a random cookie, never a guessable id)."""
    if user.anonymous:
        return (ChatSession.user_id.is_(None)) & (ChatSession.owner_key == owner)
    return ChatSession.user_id == user.id


def _owns(cs: ChatSession, user: Principal, owner: str) -> bool:
    if user.anonymous:
        return cs.user_id is None and owner.startswith("anon:") and cs.owner_key == owner
    return cs.user_id == user.id


def _no_browser_key(user: Principal, owner: str) -> bool:
    return user.anonymous and not owner.startswith("anon:")


class Chats:
    """The conversations of every caller, each reachable only by its owner."""

    def __init__(self, db: Database):
        self.db = db

    def _own(self, s: Session, user: Principal, owner: str, session_id: int) -> ChatSession:
        cs = s.get(ChatSession, session_id)
        if cs is None or not _owns(cs, user, owner):
            raise NotFound(f"conversation {session_id} does not exist")
        return cs

    def list(self, user: Principal, owner: str, corpus: str | None = None) -> list[ChatSummary]:
        """The caller's newest conversations, over `corpus` or (None) over every corpus they may
        still read; none without a browser key."""
        if _no_browser_key(user, owner):
            return []
        with self.db.session() as s:
            q = (
                select(ChatSession.id, ChatSession.title, Corpus)
                .join(Corpus)
                .where(_mine(user, owner))
                .order_by(ChatSession.id.desc())
                .limit(LIST_LIMIT)
            )
            if corpus:
                q = q.where(Corpus.name == corpus)
            return [
                ChatSummary(sid, title, c.name)
                for sid, title, c in s.execute(q).all()
                if can_read(s, user, c)
            ]

    def create(self, user: Principal, owner: str, corpus: str, title: str) -> int:
        """A new conversation over a corpus the caller may read; returns its id."""
        if _no_browser_key(user, owner):
            raise KBError("this browser sent no session cookie: reload the page")
        with self.db.session() as s:
            c = s.scalar(select(Corpus).where(Corpus.name == corpus))
            if c is None:
                raise NotFound(f"corpus {corpus!r} does not exist")
            check_read(s, user, c)
            cs = ChatSession(
                user_id=user.id,
                owner_key=owner if user.anonymous else None,
                corpus_id=c.id,
                title=title[:TITLE_CHARS],
            )
            s.add(cs)
            s.flush()
            return cs.id

    def append(
        self,
        user: Principal,
        owner: str,
        session_id: int,
        role: str,
        content: str,
        citations: Sequence[dict] = (),
    ) -> None:
        """Store one turn (and an answer's citations) at the end of the caller's conversation."""
        with self.db.session() as s:
            self._own(s, user, owner, session_id)
            m = Message(session_id=session_id, role=role, content=content)
            s.add(m)
            s.flush()
            for rank, c in enumerate(citations):
                s.add(
                    CitationRecord(
                        message_id=m.id,
                        rank=rank,
                        document_id=c.get("document_id"),
                        document=c["document"],
                        page=c.get("page"),
                        text=c["text"],
                        score=float(c.get("score") or 0.0),
                    )
                )

    def drop_last_turn(self, user: Principal, owner: str, session_id: int) -> None:
        """Forget the last question and its answer (retry asks it again)."""
        with self.db.session() as s:
            cs = self._own(s, user, owner, session_id)
            msgs = list(cs.messages)
            while msgs and msgs[-1].role == "assistant":
                s.delete(msgs.pop())
            if msgs and msgs[-1].role == "user":
                s.delete(msgs.pop())

    def load(self, user: Principal, owner: str, session_id: int) -> ChatHistory:
        """The caller's conversation, if they may still read its corpus."""
        with self.db.session() as s:
            cs = self._own(s, user, owner, session_id)
            corpus = s.get(Corpus, cs.corpus_id)
            check_read(s, user, corpus)
            return ChatHistory(
                corpus.name,
                [
                    StoredMessage(
                        m.role,
                        m.content,
                        [
                            {
                                "document_id": c.document_id,
                                "document": c.document,
                                "page": c.page,
                                "text": c.text,
                                "score": c.score,
                            }
                            for c in m.citations
                        ],
                    )
                    for m in cs.messages
                ],
            )

    def rename(self, user: Principal, owner: str, session_id: int, title: str) -> None:
        """Give the caller's conversation a new title."""
        with self.db.session() as s:
            self._own(s, user, owner, session_id).title = title[:TITLE_CHARS]

    def delete(self, user: Principal, owner: str, session_id: int) -> None:
        """Remove the caller's conversation with its turns and citations."""
        with self.db.session() as s:
            s.delete(self._own(s, user, owner, session_id))
