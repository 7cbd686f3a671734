"""The ingestion pipeline: store a file, parse it, cut segments, prefill them, write their KV.

Each stage is recorded on the document, so a crashed ingestion resumes from its last stored
segment, and one bad file never stops the others.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from sqlalchemy import select

from kb.errors import KBError, NotFound
from kb.ingest.errors import IngestError
from kb.ingest.parse import parse_bytes
from kb.ingest.segment import cut_segments
from kb.model.loader import LoadedModel
from kb.precompute import prefill_preamble, prefill_segments
from kb.prompt import encode, preamble_text
from kb.settings import Settings
from storage.db import Database
from storage.kvstore import write_kv
from storage.models import Corpus, Document, Segment

log = logging.getLogger(__name__)

Progress = Callable[[str, str, float], None]


@dataclass
class IngestResult:
    filename: str
    status: str  # ready | duplicate | failed
    document_id: int | None = None
    segments: int = 0
    tokens: int = 0
    error: str | None = None
    code: str | None = None


def _safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^\w.\- ]", "_", base).strip(" .") or "document"
    return base[:120]



class Ingestor:
    """Builds corpora's stored KV with the serving model (loaded on first use)."""

    def __init__(self, settings: Settings, db: Database, model: Callable[[], LoadedModel]):
        self.settings, self.db, self._model = settings, db, model

    @property
    def model(self) -> LoadedModel:
        return self._model()

    def _corpus_settings(self) -> dict:
        lm, s = self.model, self.settings
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
        k, v = prefill_preamble(self.model.model, cfg["preamble"], self.settings.device)
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
            corpus = s.scalar(select(Corpus).where(Corpus.name == name))
            if corpus is None:
                raise NotFound(f"corpus {name!r} does not exist")
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
        lm, s = self.model, self.settings
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
        max_pos = self.model.config.max_position_embeddings
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

