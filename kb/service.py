"""The knowledge base as one object: corpora, ingestion, stored shared KV, and answers.

The CLI, the HTTP API and the UI all go through `KnowledgeBase`; the engine, the model and the
stores are created lazily so that listing corpora never loads a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from sqlalchemy import select

from kb.citations import CitationMap, SegmentRef
from kb.engine.engine import Engine, EngineConfig, QueueFull
from kb.engine.routing import CorpusRouter
from kb.engine.request import Delta, Finished, RequestHandle
from kb.engine.sequence import SamplingParams
from kb.engine.shared_kv import SharedKV
from kb.errors import Conflict, KBError, NotFound, NotReady, TooBusy
from kb.ingest import IngestError, cut_segments, parse_bytes
from kb.model.config import UnsupportedModelError
from kb.model.demo import DEMO_NAME, ensure_demo_model
from kb.model.loader import LoadedModel, load_model
from kb.precompute import prefill_preamble, prefill_segments
from kb.prompt import build_prompt, encode, preamble_text
from kb.settings import Settings
from storage.db import Database
from storage.kvstore import KVCorruptError, read_kv, write_kv
from storage.models import Corpus, Document, Segment, utcnow

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class CorpusInfo:
    name: str
    status: str
    model: str
    documents: int
    segments: int
    tokens: int
    created_at: datetime | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "model": self.model, "documents": self.documents,
                "segments": self.segments, "tokens": self.tokens,
                "created_at": self.created_at.isoformat() if self.created_at else None}


@dataclass
class IngestResult:
    filename: str
    status: str  # ready | duplicate | failed
    document_id: int | None = None
    segments: int = 0
    tokens: int = 0
    error: str | None = None
    code: str | None = None


@dataclass
class Answer:
    """A request in flight (or done): stream `handle`, then read `citations()`."""

    handle: RequestHandle
    corpus: str
    citation_map: CitationMap | None
    prompt_tokens: int
    _citations: list | None = field(default=None, init=False)

    def citations(self, top: int = 3) -> list[dict]:
        if self.handle.result is None or self.citation_map is None:
            return []
        if self._citations is None:
            self._citations = [c.to_dict() for c in self.citation_map.cite(self.handle.result.chunk_mass, top)]
        return self._citations


@dataclass
class LoadedCorpus:
    shared: SharedKV
    citation_map: CitationMap
    version: str


def _safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^\w.\- ]", "_", base).strip(" .") or "document"
    return base[:120]


class KnowledgeBase:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.home = self.settings.resolved_home
        self.home.mkdir(parents=True, exist_ok=True)
        self.db = Database(self.settings.resolved_database_url)
        self._loaded: LoadedModel | None = None
        self._engine: Engine | None = None
        self._corpora: dict[str, LoadedCorpus] = {}
        self._lock = threading.RLock()

    # -- model and engine -------------------------------------------------------------------
    def model_folder(self, name: str | None = None) -> Path:
        name = name or self.settings.model
        if name == DEMO_NAME:
            return ensure_demo_model(self.settings.resolved_models_dir)
        path = Path(name).expanduser()
        if path.is_dir():
            return path.resolve()
        raise KBError(f"unknown model {name!r}: not the demo model ({DEMO_NAME}) and not a local folder")

    @property
    def loaded(self) -> LoadedModel:
        with self._lock:
            if self._loaded is None:
                folder = self.model_folder()
                try:
                    self._loaded = load_model(folder, self.settings.torch_dtype, self.settings.device)
                except UnsupportedModelError as e:
                    raise KBError(str(e)) from e
                log.info("loaded model %s (%s, %d layers)", folder.name, self._loaded.config.model_type,
                         self._loaded.config.num_layers)
            return self._loaded

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                s = self.settings
                self._engine = Engine(self.loaded, EngineConfig(
                    device=s.device, block_size=s.kv_block_size, unique_kv_tokens=s.unique_kv_tokens,
                    max_running=s.max_running, max_queue=s.max_queue))
            return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
        self.db.close()

    # -- corpora ----------------------------------------------------------------------------
    def _corpus(self, session, name: str) -> Corpus:
        corpus = session.scalar(select(Corpus).where(Corpus.name == name))
        if corpus is None:
            raise NotFound(f"corpus {name!r} does not exist")
        return corpus

    def create_corpus(self, name: str) -> CorpusInfo:
        if not NAME_RE.match(name or ""):
            raise KBError("a corpus name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        with self.db.session() as s:
            if s.scalar(select(Corpus).where(Corpus.name == name)) is not None:
                raise Conflict(f"corpus {name!r} already exists")
            corpus = Corpus(name=name, model=self.settings.model, status="empty", settings={})
            s.add(corpus)
            s.flush()
            return self._info(corpus)

    def _info(self, c: Corpus) -> CorpusInfo:
        segs = sum(len(d.segments) for d in c.documents)
        toks = sum(d.num_tokens for d in c.documents if d.stage == "ready")
        return CorpusInfo(c.name, c.status, c.model, len(c.documents), segs, toks, c.created_at)

    def list_corpora(self) -> list[CorpusInfo]:
        with self.db.session() as s:
            return [self._info(c) for c in s.scalars(select(Corpus).order_by(Corpus.name))]

    def corpus_info(self, name: str) -> CorpusInfo:
        with self.db.session() as s:
            return self._info(self._corpus(s, name))

    def documents(self, name: str) -> list[dict]:
        with self.db.session() as s:
            c = self._corpus(s, name)
            return [{"id": d.id, "filename": d.filename, "stage": d.stage, "error": d.error,
                     "tokens": d.num_tokens, "segments": len(d.segments), "media_type": d.media_type}
                    for d in c.documents]

    def delete_corpus(self, name: str) -> None:
        with self._lock:
            with self.db.session() as s:
                c = self._corpus(s, name)
                cid = c.id
                loaded = self._corpora.pop(name, None)
                if loaded is not None and self._engine is not None:
                    if self._engine.in_use(loaded.shared.key):
                        self._corpora[name] = loaded
                        raise Conflict(f"corpus {name!r} is answering questions; try again when they finish")
                    self._engine.unregister_corpus(loaded.shared.key)
                s.delete(c)
            for d in (self.settings.kv_dir / str(cid), self.settings.files_dir / str(cid)):
                shutil.rmtree(d, ignore_errors=True)

    # -- ingestion --------------------------------------------------------------------------
    def _corpus_settings(self) -> dict:
        lm, s = self.loaded, self.settings
        preamble = encode(lm.tokenizer, preamble_text(lm.tokenizer, s.system_prompt))
        return {"weights": lm.weights_hash, "tokenizer": lm.tokenizer_hash, "kv_dtype": s.kv_dtype,
                "segment_len": s.segment_len, "chunk_size": s.chunk_size, "preamble": preamble}

    @staticmethod
    def _key(obj) -> str:
        return hashlib.sha256(repr(obj).encode()).hexdigest()[:32]

    def _ensure_preamble(self, session, corpus: Corpus, cfg: dict) -> None:
        key = self._key(cfg)
        if corpus.cache_key == key and corpus.preamble_kv_file:
            return
        k, v = prefill_preamble(self.loaded.model, cfg["preamble"], self.settings.device)
        dtype = self.settings.torch_kv_dtype
        stored = write_kv(self.settings.kv_dir / str(corpus.id) / "preamble.safetensors", k.to(dtype), v.to(dtype))
        corpus.preamble_kv_file, corpus.preamble_checksum = str(stored.path), stored.checksum
        corpus.preamble_len = len(cfg["preamble"])
        corpus.settings = cfg
        corpus.cache_key = key

    def ingest(self, name: str, paths: list[str | Path],
               progress: Callable[[str, str, float], None] | None = None) -> list[IngestResult]:
        """Store, parse, segment and prefill each file; one bad file never stops the others."""
        progress = progress or (lambda *_: None)
        with self.db.session() as s:
            corpus = self._corpus(s, name)
            corpus_id = corpus.id
        results = []
        for path in paths:
            path = Path(path)
            try:
                results.append(self._ingest_one(corpus_id, path, progress))
            except (IngestError, KBError, OSError) as e:
                msg = getattr(e, "message", None) or str(e)
                if isinstance(e, OSError):
                    msg = f"cannot read {path.name}: {e.strerror or e}"
                log.warning("ingest of %s into %s failed: %s", path.name, name, msg)
                results.append(IngestResult(path.name, "failed", error=msg, code=getattr(e, "code", None)))
        self._refresh_status(corpus_id)
        with self._lock:
            self._corpora.pop(name, None)  # the next question loads the new layout
        return results

    def _ingest_one(self, corpus_id: int, path: Path, progress) -> IngestResult:
        s = self.settings
        max_bytes = int(s.max_upload_mb * 1024 * 1024)
        size = path.stat().st_size
        if size > max_bytes:
            raise IngestError("too_large", f"{path.name} is {size / 2**20:.1f} MiB; the limit is {s.max_upload_mb:g} MiB")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with self.db.session() as sess:
            corpus = sess.get(Corpus, corpus_id)
            dup = sess.scalar(select(Document).where(Document.corpus_id == corpus_id, Document.content_hash == digest))
            if dup is not None and dup.stage == "ready":
                return IngestResult(path.name, "duplicate", dup.id, len(dup.segments), dup.num_tokens)
            if dup is None:
                stored = s.files_dir / str(corpus_id) / f"{digest[:16]}_{_safe_filename(path.name)}"
                stored.parent.mkdir(parents=True, exist_ok=True)
                stored.write_bytes(data)
                dup = Document(corpus_id=corpus_id, filename=_safe_filename(path.name), content_hash=digest,
                               size_bytes=size, file_path=str(stored), stage="stored")
                sess.add(dup)
            corpus.status = "building"
            sess.flush()
            doc_id = dup.id
        progress(path.name, "stored", 0.0)
        try:
            return self._build_document(corpus_id, doc_id, data, path.name, progress)
        except (IngestError, KBError) as e:
            with self.db.session() as sess:
                d = sess.get(Document, doc_id)
                d.stage, d.error = "failed", getattr(e, "message", None) or str(e)
            raise

    def _build_document(self, corpus_id: int, doc_id: int, data: bytes, filename: str, progress) -> IngestResult:
        """Parse, segment and prefill one stored document; resumes from its last stored segment."""
        lm, s = self.loaded, self.settings
        cfg = self._corpus_settings()
        with self.db.session() as sess:
            corpus = sess.get(Corpus, corpus_id)
            self._ensure_preamble(sess, corpus, cfg)
            doc = sess.get(Document, doc_id)
            if not doc.segments:
                parsed = parse_bytes(data, filename, max_bytes=int(s.max_upload_mb * 2**20))
                plans = cut_segments(parsed, lm.tokenizer, s.segment_len)
                doc.media_type = parsed.media_type
                next_pos = self._next_position(sess, corpus_id, len(cfg["preamble"]))
                for p in plans:
                    next_pos = self._place(next_pos, len(p.token_ids), len(cfg["preamble"]))
                    sess.add(Segment(document_id=doc.id, seq=p.index, char_start=p.char_start, char_end=p.char_end,
                                     page_start=p.page_start, page_end=p.page_end, num_tokens=len(p.token_ids),
                                     pos_start=next_pos, text=p.text, token_ids=p.token_ids))
                    next_pos += len(p.token_ids)
                doc.num_tokens = sum(len(p.token_ids) for p in plans)
                doc.stage = "parsed"
            sess.flush()
            segments = sess.scalars(select(Segment).where(Segment.document_id == doc_id).order_by(Segment.seq)).all()
            todo = [(seg.id, seg.token_ids, seg.pos_start) for seg in segments
                    if seg.kv_file is None or seg.cache_key != self._key((cfg, seg.pos_start, seg.token_ids))]
            total = len(segments)
        progress(filename, "parsed", 0.0)
        dtype = s.torch_kv_dtype
        done = total - len(todo)
        for j, k, v in prefill_segments(lm.model, cfg["preamble"], [t for _, t, _ in todo],
                                        s.prefill_batch_tokens, s.device, starts=[p for _, _, p in todo]):
            seg_id, tokens, pos_start = todo[j]
            if dtype == torch.float16 and (not torch.isfinite(k.to(dtype)).all() or not torch.isfinite(v.to(dtype)).all()):
                raise KBError("keys or values overflow float16 for this model: set KB_KV_DTYPE=bfloat16")
            stored = write_kv(s.kv_dir / str(corpus_id) / f"{doc_id}" / f"{seg_id}.safetensors", k.to(dtype), v.to(dtype))
            with self.db.session() as sess:
                seg = sess.get(Segment, seg_id)
                seg.kv_file, seg.kv_checksum = str(stored.path), stored.checksum
                seg.cache_key = self._key((cfg, pos_start, tokens))
            done += 1
            progress(filename, "prefilled", done / max(1, total))
        with self.db.session() as sess:
            doc = sess.get(Document, doc_id)
            doc.stage, doc.error = "ready", None
            result = IngestResult(filename, "ready", doc.id, total, doc.num_tokens)
        progress(filename, "ready", 1.0)
        return result

    def _position_limit(self) -> int:
        """Shared positions end here, leaving room for the unique part (question and answer)."""
        max_pos = self.loaded.config.max_position_embeddings
        return max_pos - min(2048, max_pos // 4)

    def _next_position(self, sess, corpus_id: int, preamble_len: int) -> int:
        ends = sess.scalars(select(Segment.pos_start + Segment.num_tokens).join(Document)
                            .where(Document.corpus_id == corpus_id)).all()
        return max(ends, default=preamble_len)

    def _place(self, pos: int, n: int, preamble_len: int) -> int:
        """Segments follow each other in position like one document while the model's context
        allows; past it they wrap to the start (position-independent segments overlap)."""
        return preamble_len if pos + n > self._position_limit() else pos

    def _refresh_status(self, corpus_id: int) -> None:
        with self.db.session() as sess:
            c = sess.get(Corpus, corpus_id)
            stages = [d.stage for d in c.documents]
            if any(st == "ready" for st in stages):
                c.status = "ready"
            elif not stages:
                c.status = "empty"
            else:
                c.status = "failed" if all(st == "failed" for st in stages) else "building"

    # -- serving ----------------------------------------------------------------------------
    def load_corpus(self, name: str) -> LoadedCorpus:
        """The corpus's shared KV on the serving device, loaded from its verified files once."""
        with self._lock:
            with self.db.session() as sess:
                corpus = self._corpus(sess, name)
                if corpus.status != "ready":
                    raise NotReady(f"corpus {name!r} is {corpus.status}, not ready")
                version = corpus.cache_key or ""
                cached = self._corpora.get(name)
                if cached is not None and cached.version == version:
                    return cached
                cfg = corpus.settings
                if cfg.get("weights") != self.loaded.weights_hash:
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
            loaded = LoadedCorpus(shared, CitationMap(refs, chunk, self.loaded.tokenizer), version)
            old = self._corpora.get(name)
            if old is not None and self._engine is not None and not self._engine.in_use(old.shared.key):
                self._engine.unregister_corpus(old.shared.key)
            self.engine.register_corpus(shared)
            self._corpora[name] = loaded
            return loaded

    def ask(self, name: str, question: str, sampling: SamplingParams | None = None,
            history: list[dict] | None = None, loop: asyncio.AbstractEventLoop | None = None) -> Answer:
        """Queue a question over a corpus; the returned Answer streams from the engine."""
        if not question or not question.strip():
            raise KBError("the question is empty")
        loaded = self.load_corpus(name)
        shared = loaded.shared
        if shared.router is not None:  # density applies to requests queued from now on
            shared.top_k = None if self.settings.density >= 1.0 else shared.router.top_k(self.settings.density)
        lm = self.loaded
        parts = build_prompt(lm.tokenizer, self.settings.system_prompt, history or [], question)
        ids = encode(lm.tokenizer, parts.suffix)
        sampling = sampling or SamplingParams(max_tokens=self.settings.max_tokens)
        try:
            handle = self.engine.add_request(ids, sampling, loaded.shared.key, loaded.shared.pos_offset, loop)
        except QueueFull as e:
            raise TooBusy(str(e)) from e
        except ValueError as e:
            raise KBError(str(e)) from e
        return Answer(handle, name, loaded.citation_map, len(ids))

    def answer(self, name: str, question: str, sampling: SamplingParams | None = None,
               on_text: Callable[[str], None] | None = None) -> dict:
        """Ask and wait, stepping the engine on this thread unless its loop thread runs."""
        ans = self.ask(name, question, sampling)
        engine, handle = self.engine, ans.handle
        finished = False
        while not finished:
            if engine.running_in_thread:
                events = [handle.get()]
            else:
                engine.step()
                events = handle.drain()
            for ev in events:
                if isinstance(ev, Delta) and on_text is not None:
                    on_text(ev.text)
                finished |= isinstance(ev, Finished)
        res = ans.handle.result
        if res.reason == "error":
            raise KBError(f"generation failed: {res.error}")
        return {"answer": res.text, "citations": ans.citations(),
                "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                          "total_tokens": res.prompt_tokens + res.completion_tokens},
                "finish_reason": res.reason}
