"""Loaded corpora: a ready corpus's stored KV, verified and laid out contiguously per layer on
the serving device, registered with the engine, with its router and citation map."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from sqlalchemy import select

from kb.citations import CitationMap, SegmentRef
from kb.engine.engine import Engine
from kb.engine.routing import CorpusRouter
from kb.engine.shared_kv import SharedKV
from kb.errors import Conflict, NotFound, NotReady
from kb.model.loader import LoadedModel
from kb.settings import Settings
from storage.db import Database
from storage.kvstore import KVCorruptError, read_kv
from storage.models import Corpus, utcnow

log = logging.getLogger(__name__)


@dataclass
class LoadedCorpus:
    shared: SharedKV
    citation_map: CitationMap
    version: str


class CorpusCache:
    def __init__(self, settings: Settings, db: Database, model: Callable[[], LoadedModel],
                 engine: Callable[[], Engine]):
        self.settings, self.db = settings, db
        self._model, self._engine = model, engine
        self.loaded: dict[str, LoadedCorpus] = {}
        self._lock = threading.RLock()

    @property
    def model(self) -> LoadedModel:
        return self._model()

    @property
    def engine(self) -> Engine:
        return self._engine()

    def drop(self, name: str) -> None:
        """Forget a corpus's loaded KV (deleted, or changed: the next question reloads it)."""
        with self._lock:
            old = self.loaded.pop(name, None)
            if old is None:
                return
            if self.engine.in_use(old.shared.key):
                self.loaded[name] = old
                raise Conflict(f"corpus {name!r} is answering questions; try again when they finish")
            self.engine.unregister_corpus(old.shared.key)

    def load(self, name: str) -> LoadedCorpus:
        """The corpus's shared KV on the serving device, loaded from its verified files once."""
        with self._lock:
            with self.db.session() as sess:
                corpus = sess.scalar(select(Corpus).where(Corpus.name == name))
                if corpus is None:
                    raise NotFound(f"corpus {name!r} does not exist")
                if corpus.status != "ready":
                    raise NotReady(f"corpus {name!r} is {corpus.status}, not ready")
                # the layout changes with the settings and with the set of ready documents
                ready = ",".join(str(d.id) for d in corpus.documents if d.stage == "ready")
                version = f"{corpus.cache_key}:{ready}"
                cached = self.loaded.get(name)
                if cached is not None and cached.version == version:
                    return cached
                cfg = corpus.settings
                if cfg.get("weights") != self.model.weights_hash:
                    raise NotReady(f"corpus {name!r} was built with another model; rebuild it")
                try:
                    pk, pv = read_kv(corpus.preamble_kv_file, corpus.preamble_checksum)
                    ks, vs, refs = [pk], [pv], []
                    pos = max_end = pk.shape[1]
                    for d in corpus.documents:
                        if d.stage != "ready":
                            continue
                        for seg in d.segments:
                            k, v = read_kv(seg.kv_file, seg.kv_checksum)
                            refs.append(SegmentRef(pos, seg.num_tokens, d.filename, d.id, seg.page_start,
                                                   seg.page_end, seg.char_start, seg.text))
                            max_end = max(max_end, seg.pos_start + seg.num_tokens)
                            ks.append(k)
                            vs.append(v)
                            pos += seg.num_tokens
                except KVCorruptError as e:
                    corpus.status = "stale"
                    log.error("corpus %s: %s; marked stale for rebuild", name, e)
                    raise NotReady(f"corpus {name!r} has a damaged KV file and must be rebuilt") from e
                corpus.hits = (corpus.hits or 0) + 1
                corpus.last_used_at = utcnow()
                preamble_len = corpus.preamble_len
            dev = self.settings.device
            k_all = torch.cat(ks, dim=1).to(dev)  # [L, N, Hkv, d]
            v_all = torch.cat(vs, dim=1).to(dev)
            chunk = cfg["chunk_size"]
            shared = SharedKV(key=f"{name}@{version}", k=list(k_all.unbind(0)), v=list(v_all.unbind(0)),
                              chunk_size=chunk, pos_offset=max_end,
                              preamble_len=preamble_len, meta={"corpus": name})
            if shared.num_chunks > shared.always_chunks + 1:
                shared.router = CorpusRouter(shared.k, chunk, shared.always_chunks, self.settings.router)
            loaded = LoadedCorpus(shared, CitationMap(refs, chunk, self.model.tokenizer), version)
            old = self.loaded.get(name)
            if old is not None and not self.engine.in_use(old.shared.key):
                self.engine.unregister_corpus(old.shared.key)
            self.engine.register_corpus(shared)
            self.loaded[name] = loaded
            return loaded

