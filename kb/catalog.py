"""The corpora as listings show them: name, status, documents, segments, tokens, and whether a
corpus is stale (built with other settings than a corpus built now would be).

Torch-free (the database, the settings and the model's identity only), so `kb corpus list`
answers without importing the engine; `KnowledgeBase` serves the same listings through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from kb.auth import Principal, can_read
from kb.cache_key import ModelHashes, settings_key
from kb.errors import NotFound
from kb.model.demo import DEMO_NAME, demo_folder, is_converted
from kb.model.identity import ModelIdentity, model_identity
from kb.settings import Settings
from storage.db import Database
from storage.models import Corpus


@dataclass
class CorpusInfo:
    name: str
    status: str
    model: str
    documents: int
    segments: int
    tokens: int
    created_at: datetime | None = None
    stale: bool = False  # its stored KV was built with other settings (or is damaged): rebuild it

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "model": self.model,
            "documents": self.documents,
            "segments": self.segments,
            "tokens": self.tokens,
            "stale": self.stale,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


def corpus_row(session, name: str) -> Corpus:
    """Corpus `name`'s row; NotFound when it does not exist."""
    corpus = session.scalar(select(Corpus).where(Corpus.name == name))
    if corpus is None:
        raise NotFound(f"corpus {name!r} does not exist")
    return corpus


class Catalog:
    """Listings of a knowledge base's corpora. `loaded()` gives the model when it is loaded
    (its hashes are then at hand); otherwise the model folder's identity serves."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        loaded: Callable[[], ModelHashes | None] = lambda: None,
    ):
        self.settings, self.db, self._loaded = settings, db, loaded
        self._identity: ModelIdentity | None = None

    def info(self, c: Corpus, key: str | None = None) -> CorpusInfo:
        """A corpus's summary; with the current settings `key`, a ready corpus built with other
        settings shows status `stale`."""
        segs = sum(len(d.segments) for d in c.documents)
        toks = sum(d.num_tokens for d in c.documents if d.stage == "ready")
        stale = c.status == "stale" or (
            c.status == "ready" and key is not None and c.cache_key != key
        )
        status = "stale" if stale else c.status
        return CorpusInfo(
            c.name, status, c.model, len(c.documents), segs, toks, c.created_at, stale
        )

    def settings_key(self) -> str | None:
        """The cache key a corpus built now would get; None when the model is not on this
        machine yet (staleness unknown). Reads only hashes unless the model is loaded."""
        loaded = self._loaded()
        if loaded is not None:
            return settings_key(self.settings, loaded)
        if self._identity is None:
            name = self.settings.model
            folder = (
                demo_folder(self.settings.resolved_models_dir)
                if name == DEMO_NAME
                else Path(name).expanduser()
            )
            if not (is_converted(folder) if name == DEMO_NAME else folder.is_dir()):
                return None
            self._identity = model_identity(folder)
        return settings_key(self.settings, self._identity)

    def list_corpora(self, *, user: Principal | None = None) -> list[CorpusInfo]:
        """All corpora, or only those `user` may read."""
        with self.db.session() as s:
            key = self.settings_key()
            return [
                self.info(c, key)
                for c in s.scalars(select(Corpus).order_by(Corpus.name))
                if user is None or can_read(s, user, c)
            ]

    def corpus_info(self, name: str) -> CorpusInfo:
        key = self.settings_key()
        with self.db.session() as s:
            return self.info(corpus_row(s, name), key)
