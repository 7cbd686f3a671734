"""The ingestion pipeline: store a file, parse it, cut segments, prefill them, write their KV.

Two steps a job can run apart: `store` (refuse a type we cannot parse, copy the file, create its
Document row) and `build` (stored -> parsed -> tokenized -> prefilled k/n -> ready, or failed
with a reason). Each stage is recorded on the document and reported to a hook between steps and
segments, so a crashed ingestion resumes from its last stored segment, and one bad file never
stops the others. A StageUpdate says what is happening now (`activity`: parsing, prefilling k of
n, verifying, ready) and how much work is done: tokens prefilled over tokens to prefill.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy import select

from kb.cache_key import corpus_key, corpus_settings, segment_key
from kb.errors import KBError, NotFound
from kb.filenames import safe_filename
from kb.ingest.budgets import check_token_budgets
from kb.ingest.build import parse_document, place_segments, position_limit, prefill_corpus
from kb.ingest.errors import IngestError
from kb.ingest.parse import HEAD_BYTES, detect_type
from kb.ingest.precompute import prefill_preamble
from kb.ingest.segment import cut_segments
from kb.model.loader import LoadedModel
from kb.settings import Settings
from storage.db import Database
from storage.kvstore import KVCorruptError, read_kv, write_kv
from storage.models import Corpus, Document, Segment

log = logging.getLogger(__name__)

Progress = Callable[[str, str, float], None]

# share of a document's progress each stage has reached; prefill spans PREFILL_FROM..PREFILL_TO
# by tokens prefilled, and reading its KV back (verifying) the rest up to 100
STAGE_PERCENT = {"stored": 0.0, "parsed": 3.0, "tokenized": 5.0, "ready": 100.0}
PREFILL_FROM, PREFILL_TO = 5.0, 99.0

# what is happening after each recorded stage (the stage says how far it got)
ACTIVITY = {
    "stored": "parsing",
    "parsed": "parsing",
    "tokenized": "prefilling",
    "ready": "ready",
    "failed": "failed",
}
TYPE_NAMES = {
    "pdf": "PDF (.pdf)",
    "docx": "Word (.docx)",
    "html": "HTML (.html, .htm)",
    "markdown": "Markdown (.md)",
    "text": "text (.txt and other plain text)",
}


def accepted_types(allowed: str) -> str:
    """The accepted kinds of file, as a user reads them: "PDF (.pdf), Word (.docx), ..."."""
    kinds = [k.strip() for k in allowed.split(",") if k.strip()]
    return ", ".join(TYPE_NAMES.get(k, k) for k in kinds)


def refuse_unsupported(filename: str, head: bytes, allowed: str) -> str:
    """The kind of a file from its name and first bytes; IngestError("unsupported_type") naming
    the accepted types when we would not parse it (checked before a file is stored or uploaded)."""
    kinds = frozenset(k.strip() for k in allowed.split(",") if k.strip())
    try:
        kind = detect_type(filename, head[:HEAD_BYTES])
    except IngestError as e:
        if e.code == "binary_file":  # binary bytes under a text name: say so, and what is accepted
            raise IngestError(e.code, f"{e} Accepted: {accepted_types(allowed)}") from e
        if e.code != "unsupported_type":
            raise
        raise IngestError(
            "unsupported_type",
            f"{filename} is not a kind of file kb reads; accepted: {accepted_types(allowed)}",
        ) from e
    if kind not in kinds:
        raise IngestError(
            "unsupported_type",
            f"{filename}: {kind} files are not accepted here; accepted: {accepted_types(allowed)}",
        )
    return kind


@dataclass(frozen=True)
class StageUpdate:
    """Where one document's ingestion stands: its stage and, while prefilling, k of n segments."""

    document_id: int
    filename: str
    stage: str  # stored|parsed|tokenized|prefilled|ready: how far it got
    done: int = 0  # segments whose KV is stored
    total: int = 0  # segments of the document
    tokens_done: int = 0  # tokens whose KV is stored (the work unit of the prefill)
    tokens_total: int = 0
    size_bytes: int = 0  # the file's size (the work unit of parsing)

    @property
    def fraction(self) -> float:
        """Fraction of the prefill done, by tokens (by segments when tokens are unknown)."""
        if self.stage == "prefilled":
            if self.tokens_total:
                return self.tokens_done / self.tokens_total
            return self.done / max(1, self.total)
        return 1.0 if self.stage == "ready" else 0.0

    @property
    def percent(self) -> float:
        if self.stage == "prefilled":
            return PREFILL_FROM + (PREFILL_TO - PREFILL_FROM) * self.fraction
        return STAGE_PERCENT.get(self.stage, 0.0)

    @property
    def activity(self) -> str:
        """What is happening now: parsing, prefilling k of n, verifying, ready."""
        return activity(self.stage, self.done, self.total)


def activity(stage: str | None, done: int = 0, total: int = 0, status: str | None = None) -> str:
    """What a document's ingestion is doing, from its recorded stage (and its job's status)."""
    if status == "queued":
        return "queued"
    if status == "cancelled":
        return "cancelled"
    if stage in ("tokenized", "prefilled"):
        return f"prefilling {done} of {total}" if done < total or not total else "verifying"
    return ACTIVITY.get(stage or "", stage or "queued")


StageHook = Callable[[StageUpdate], None]


class Cancelled(Exception):
    """Raised between segments when the caller's `should_stop()` says the job was cancelled."""


@dataclass(frozen=True)
class StoredDocument:
    """The result of the store step: the document's row, or the ready duplicate it matched."""

    filename: str
    document_id: int
    duplicate: bool
    stage: str
    segments: int = 0
    tokens: int = 0

    def result(self) -> IngestResult:
        return IngestResult(
            self.filename, "duplicate", self.document_id, self.segments, self.tokens
        )


def failure_message(e: BaseException, filename: str) -> str:
    """The one-line reason shown for a failed document."""
    if isinstance(e, OSError):
        return f"cannot read {filename}: {e.strerror or e}"
    return getattr(e, "message", None) or str(e)


@dataclass
class IngestResult:
    filename: str
    status: str  # ready | duplicate | failed
    document_id: int | None = None
    segments: int = 0
    tokens: int = 0
    error: str | None = None
    code: str | None = None


class Ingestor:
    """Builds corpora's stored KV with the serving model (loaded on first use)."""

    def __init__(self, settings: Settings, db: Database, model: Callable[[], LoadedModel]):
        self.settings, self.db, self._model = settings, db, model

    @property
    def model(self) -> LoadedModel:
        return self._model()

    def corpus_settings(self) -> dict:
        """The settings a corpus built now records and is keyed by (kb/cache_key.py)."""
        return corpus_settings(self.settings, self.model)

    def links(self, segments: list[Segment]) -> dict[int, list[int]]:
        """Segment id -> the tokens it is prefilled after under the "linked" scheme (the last
        `pic_link_tokens` of the document's previous segment; none for the first, or under
        "shared"). Read from the stored segments, so a resumed build links as a whole one does."""
        s = self.settings
        return {
            seg.id: (
                segments[i - 1].token_ids[-s.pic_link_tokens :] if i and s.pic == "linked" else []
            )
            for i, seg in enumerate(segments)
        }

    def ensure_preamble(self, session, corpus: Corpus, cfg: dict) -> None:
        """Prefill and store the corpus's preamble KV unless it is stored under `cfg`'s key."""
        key = corpus_key(cfg)
        if corpus.cache_key == key and corpus.preamble_kv_file:
            return
        k, v = prefill_preamble(self.model.model, cfg["preamble"], self.settings.device)
        dtype = self.settings.torch_kv_dtype
        stored = write_kv(
            self.settings.kv_dir / str(corpus.id) / "preamble.safetensors", k, v, dtype=dtype
        )
        corpus.preamble_kv_file, corpus.preamble_checksum = str(stored.path), stored.checksum
        corpus.preamble_len = len(cfg["preamble"])
        corpus.settings = cfg
        corpus.cache_key = key

    def corpus_id(self, name: str) -> int:
        """The id of corpus `name`; NotFound when it does not exist."""
        with self.db.session() as s:
            corpus = s.scalar(select(Corpus).where(Corpus.name == name))
            if corpus is None:
                raise NotFound(f"corpus {name!r} does not exist")
            return corpus.id

    def document_facts(self, document_ids: list[int]) -> dict[int, dict]:
        """Per document: its pages (the last page its segments reach; None for formats without
        pages, or before parsing) and its size in bytes, as listings show them."""
        from sqlalchemy import func

        if not document_ids:
            return {}
        with self.db.session() as sess:
            sizes = dict(
                sess.execute(
                    select(Document.id, Document.size_bytes).where(Document.id.in_(document_ids))
                ).all()
            )
            pages = dict(
                sess.execute(
                    select(Segment.document_id, func.max(Segment.page_end))
                    .where(Segment.document_id.in_(document_ids))
                    .group_by(Segment.document_id)
                ).all()
            )
        return {i: {"pages": pages.get(i), "size_bytes": sizes.get(i, 0)} for i in document_ids}

    def ingest(
        self,
        name: str,
        paths: list[str | Path],
        progress: Callable[[str, str, float], None] | None = None,
    ) -> list[IngestResult]:
        """Store, parse, segment and prefill each file in this thread; one bad file never stops
        the others. (The job path, `kb.jobs`, runs the same two steps, store and build, apart.)"""
        progress = progress or (lambda *_: None)
        corpus_id = self.corpus_id(name)
        results = []
        for path in paths:
            path = Path(path)
            stored = None
            try:
                stored = self.store(corpus_id, path)
                if stored.duplicate:
                    results.append(stored.result())
                    continue
                progress(path.name, "stored", 0.0)
                hook = lambda u, name=path.name: progress(name, u.stage, u.fraction)  # noqa: E731
                results.append(self.build(stored.document_id, hook=hook))
            except (IngestError, KBError, OSError) as e:
                msg = failure_message(e, path.name)
                if (
                    isinstance(e, OSError) and stored is not None
                ):  # e.g. the disk filled while writing KV
                    msg = f"cannot store the KV of {path.name}: {e.strerror or e}"
                    self.mark_failed(stored.document_id, msg)
                log.warning("ingest of %s into %s failed: %s", path.name, name, msg)
                results.append(
                    IngestResult(path.name, "failed", error=msg, code=getattr(e, "code", None))
                )
        self.refresh_status(corpus_id)
        return results

    def store(self, corpus_id: int, path: Path) -> StoredDocument:
        """Step 1: check the size, copy the file under files_dir and create (or find) its
        Document row. A document already ingested comes back with `duplicate` set."""
        s = self.settings
        path = Path(path)
        max_bytes = int(s.max_upload_mb * 1024 * 1024)
        size = path.stat().st_size
        if size > max_bytes:
            raise IngestError(
                "too_large",
                f"{path.name} is {size / 2**20:.1f} MiB; the limit is {s.max_upload_mb:g} MiB",
            )
        data = path.read_bytes()
        if data:  # an empty file fails at parsing, with its own reason
            refuse_unsupported(path.name, data, s.allowed_types)
        digest = hashlib.sha256(data).hexdigest()
        with self.db.session() as sess:
            corpus = sess.get(Corpus, corpus_id)
            doc = sess.scalar(
                select(Document).where(
                    Document.corpus_id == corpus_id, Document.content_hash == digest
                )
            )
            if doc is not None and doc.stage == "ready":
                return StoredDocument(
                    path.name, doc.id, True, "ready", len(doc.segments), doc.num_tokens
                )
            if doc is None:
                stored = s.files_dir / str(corpus_id) / f"{digest[:16]}_{safe_filename(path.name)}"
                stored.parent.mkdir(parents=True, exist_ok=True)
                stored.write_bytes(data)
                doc = Document(
                    corpus_id=corpus_id,
                    filename=safe_filename(path.name),
                    content_hash=digest,
                    size_bytes=size,
                    file_path=str(stored),
                    stage="stored",
                )
                sess.add(doc)
            corpus.status = "building"
            sess.flush()
            return StoredDocument(path.name, doc.id, False, doc.stage)

    def build(
        self,
        document_id: int,
        hook: StageHook | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> IngestResult:
        """Steps 2-5 for one stored document: parse, tokenize, prefill, verify. Resumes from its
        last stored segment. Bad input marks the document failed and raises IngestError/KBError;
        `should_stop()` is asked between segments and raises Cancelled when it says so."""
        with self.db.session() as sess:
            doc = sess.get(Document, document_id)
            if doc is None:
                raise NotFound(f"document {document_id} does not exist")
            corpus_id, filename, file_path = doc.corpus_id, doc.filename, doc.file_path
            sess.get(Corpus, corpus_id).status = "building"
        try:
            if not file_path:
                raise IngestError("missing_file", f"the stored copy of {filename} is missing")
            try:
                data = Path(file_path).read_bytes()
            except OSError as e:
                raise IngestError(
                    "missing_file", f"cannot read the stored copy of {filename}: {e.strerror or e}"
                ) from e
            return self._build_document(
                corpus_id,
                document_id,
                data,
                filename,
                hook or (lambda _u: None),
                should_stop or (lambda: False),
            )
        except (IngestError, KBError) as e:
            self.mark_failed(document_id, failure_message(e, filename))
            raise

    def mark_failed(self, document_id: int, reason: str) -> None:
        """Record that a document failed and why (the reason is shown to the user as is)."""
        with self.db.session() as sess:
            d = sess.get(Document, document_id)
            if d is not None:
                d.stage, d.error, d.eta_s = "failed", reason, None

    def _build_document(
        self,
        corpus_id: int,
        doc_id: int,
        data: bytes,
        filename: str,
        hook: StageHook,
        should_stop: Callable[[], bool],
    ) -> IngestResult:
        """Parse, segment and prefill one stored document; resumes from its last stored segment.

        No session is open while `hook` runs, so a hook may write the same rows (SQLite would
        otherwise wait on our own write lock)."""
        lm, s = self.model, self.settings
        cfg = self.corpus_settings()
        size = len(data)
        emit = lambda stage, done=0, total=0, tdone=0, ttotal=0: hook(  # noqa: E731
            StageUpdate(doc_id, filename, stage, done, total, tdone, ttotal, size)
        )
        emit("stored")  # parsing starts
        with self.db.session() as sess:
            corpus = sess.get(Corpus, corpus_id)
            self.ensure_preamble(sess, corpus, cfg)
            has_segments = (
                sess.scalar(select(Segment.id).where(Segment.document_id == doc_id).limit(1))
                is not None
            )
        if not has_segments:
            parsed = parse_document(data, filename, s)
            emit("parsed")
            plans = cut_segments(parsed, lm.tokenizer, s.segment_len)
            with self.db.session() as sess:
                check_token_budgets(
                    sess, s, corpus_id, doc_id, filename, sum(len(p.token_ids) for p in plans)
                )
                doc = sess.get(Document, doc_id)
                doc.media_type = parsed.media_type
                starts = place_segments(
                    [len(p.token_ids) for p in plans],
                    self._next_position(sess, corpus_id, len(cfg["preamble"])),
                    len(cfg["preamble"]),
                    position_limit(lm.config.max_position_embeddings),
                )
                for p, pos_start in zip(plans, starts):
                    sess.add(
                        Segment(
                            document_id=doc.id,
                            seq=p.index,
                            char_start=p.char_start,
                            char_end=p.char_end,
                            page_start=p.page_start,
                            page_end=p.page_end,
                            num_tokens=len(p.token_ids),
                            pos_start=pos_start,
                            text=p.text,
                            token_ids=p.token_ids,
                        )
                    )
                doc.num_tokens = sum(len(p.token_ids) for p in plans)
                doc.stage = "tokenized"
            emit("tokenized")
        with self.db.session() as sess:
            segments = sess.scalars(
                select(Segment).where(Segment.document_id == doc_id).order_by(Segment.seq)
            ).all()
            links = self.links(segments)
            todo = [
                (seg.id, seg.token_ids, seg.pos_start)
                for seg in segments
                if seg.kv_file is None
                or seg.cache_key != segment_key(cfg, seg.pos_start, seg.token_ids, links[seg.id])
            ]
            total = len(segments)
            tokens_total = sum(seg.num_tokens for seg in segments)
            todo_tokens = {seg.id: seg.num_tokens for seg in segments}
        dtype = s.torch_kv_dtype
        done = total - len(todo)
        tokens_done = tokens_total - sum(todo_tokens[i] for i, _, _ in todo)
        emit("prefilled", done, total, tokens_done, tokens_total)
        if todo and should_stop():
            raise Cancelled(f"ingestion of {filename} was cancelled")
        for j, k, v in prefill_corpus(
            lm.model,
            cfg["preamble"],
            [t for _, t, _ in todo],
            [p for _, _, p in todo],
            s,
            links=[links[i] for i, _, _ in todo],
        ):
            seg_id, tokens, pos_start = todo[j]
            if dtype == torch.float16 and (
                not torch.isfinite(k.to(dtype)).all() or not torch.isfinite(v.to(dtype)).all()
            ):
                raise KBError(
                    "keys or values overflow float16 for this model: set KB_KV_DTYPE=bfloat16"
                )
            stored = write_kv(
                s.kv_dir / str(corpus_id) / f"{doc_id}" / f"{seg_id}.safetensors", k, v, dtype=dtype
            )
            with self.db.session() as sess:
                seg = sess.get(Segment, seg_id)
                seg.kv_file, seg.kv_checksum = str(stored.path), stored.checksum
                seg.cache_key = segment_key(cfg, pos_start, tokens, links[seg_id])
            done += 1
            tokens_done += todo_tokens[seg_id]
            emit("prefilled", done, total, tokens_done, tokens_total)
            if done < total and should_stop():
                raise Cancelled(f"ingestion of {filename} was cancelled")
        self._verify(doc_id)  # nothing is indexed at ingestion: no "indexing" stage is reported
        with self.db.session() as sess:
            doc = sess.get(Document, doc_id)
            doc.stage, doc.error, doc.percent, doc.eta_s = "ready", None, 100.0, None
            result = IngestResult(filename, "ready", doc.id, total, doc.num_tokens)
        emit("ready", total, total, tokens_total, tokens_total)
        return result

    def _verify(self, doc_id: int) -> None:
        """Read back every segment's stored KV against its checksum: a document turns ready
        only when all of its KV is stored and verified (a torn write fails here, not at load)."""
        with self.db.session() as sess:
            files = sess.execute(
                select(Segment.seq, Segment.kv_file, Segment.kv_checksum).where(
                    Segment.document_id == doc_id
                )
            ).all()
        for seq, path, checksum in files:
            try:
                read_kv(path, checksum)
            except (KVCorruptError, OSError) as e:
                with self.db.session() as sess:  # drop the bad file's record: a retry recomputes it
                    seg = sess.scalar(
                        select(Segment).where(Segment.document_id == doc_id, Segment.seq == seq)
                    )
                    seg.kv_file = seg.cache_key = None
                raise RuntimeError(f"stored KV of segment {seq} failed verification: {e}") from e

    def _next_position(self, sess, corpus_id: int, preamble_len: int) -> int:
        ends = sess.scalars(
            select(Segment.pos_start + Segment.num_tokens)
            .join(Document)
            .where(Document.corpus_id == corpus_id)
        ).all()
        return max(ends, default=preamble_len)

    def refresh_status(self, corpus_id: int) -> None:
        """Corpus status from its documents' stages: ready once any document is ready."""
        with self.db.session() as sess:
            c = sess.get(Corpus, corpus_id)
            stages = [d.stage for d in c.documents]
            if any(st == "ready" for st in stages):
                c.status = "ready"
            elif not stages:
                c.status = "empty"
            else:
                c.status = "failed" if all(st == "failed" for st in stages) else "building"
