"""Cache administration: per corpus, where its shared KV lives and what to do with it.

`CacheAdmin` (a KnowledgeBase's `cache_admin`, built by the service) reads with `lookup`
(tokens, bytes per tier, hits, last use, state). The operations (pin, unpin, evict, move,
rebuild, delete) run asynchronously, LMCache-style: `submit` runs one as a job of this process
(`JobService.run_here`: a Job row of kind "cache", payload {op, corpus, tier}) and returns the
job id as the event id; `event` reads its status back from the row. Tier operations act on the
KV held by this process (the server's, through the HTTP API); pin, unpin, rebuild and delete act
through the database for every process. It reaches the knowledge base through public members
only (`CacheHost`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy import select

from kb.cache_key import segment_key
from kb.corpus_cache import CorpusCache
from kb.errors import Conflict, KBError, NotFound
from kb.ingest.pipeline import Ingestor
from kb.jobs import JobService
from storage.db import Database
from storage.kvstore import KVCorruptError, read_kv
from storage.models import Corpus, Job, Segment
from storage.tiers import TIERS, TierError

log = logging.getLogger(__name__)

OPS = ("pin", "unpin", "evict", "move", "rebuild", "delete")


@dataclass
class CacheRow:
    """One corpus as the cache admin sees it."""

    name: str
    state: str  # ready|stale|building|evicted|pinned|empty|failed
    tier: str  # gpu|cpu|disk
    tokens: int
    bytes: dict[str, int]  # gpu, cpu (resident layout), disk (stored files)
    hits: int
    last_used_at: datetime | None
    pinned: bool
    # with shared ranks: per rank {rank, chunks [start, end), tokens, bytes} of its slice
    shards: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["last_used_at"] = self.last_used_at.isoformat() if self.last_used_at else None
        return d


@dataclass
class CacheEvent:
    """An operation's status, read from its Job row."""

    id: str
    op: str
    corpus: str
    tier: str | None
    status: str  # queued|running|done|failed
    error: str | None = None
    result: dict | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("created_at", "finished_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


@dataclass
class RebuildResult:
    """What a rebuild did: segments computed again, reused as stored, and damaged files found."""

    corpus: str
    status: str
    documents: int = 0
    prefilled: int = 0
    reused: int = 0
    damaged: int = 0
    failed: list[str] = field(default_factory=list)


def _file_size(path: str | None) -> int:
    try:
        return Path(path).stat().st_size if path else 0
    except OSError:
        return 0


class CacheHost(Protocol):
    """The public members of a KnowledgeBase the cache admin uses."""

    db: Database
    cache: CorpusCache
    ingestor: Ingestor

    @property
    def jobs(self) -> JobService: ...

    def list_corpora(self) -> list: ...

    def placements(self) -> list: ...

    def set_placement(
        self, name: str, *, pinned: bool | None = None, tier: str | None = None
    ) -> None: ...

    def delete_corpus(self, name: str) -> None: ...


class CacheAdmin:
    """Per corpus: where its shared KV lives (`lookup`) and the operations on it (`submit`)."""

    def __init__(self, kb: CacheHost):
        self.kb = kb

    def lookup(self, name: str | None = None) -> list[CacheRow]:
        """Per corpus (or one): tokens, bytes per tier, hits, last use, state."""
        kb = self.kb
        places = [p for p in kb.placements() if name is None or p.name == name]
        if name and not places:
            raise NotFound(f"corpus {name!r} does not exist")
        infos = {i.name: i for i in kb.list_corpora()}
        rows = []
        for p in places:
            info = infos.get(p.name)
            if info is None:
                continue  # deleted since the placements were read
            entry = kb.cache.tiers.entries.get(p.name)
            tier = entry.tier if entry is not None else (p.tier or "disk")
            resident = entry.bytes_per_tier() if entry is not None else {"gpu": 0, "cpu": 0}
            if info.stale:
                state = "stale"
            elif p.status != "ready":
                state = p.status
            elif p.pinned:
                state = "pinned"
            elif tier == "disk" and p.last_used_at is not None:
                state = "evicted"
            else:
                state = "ready"
            rows.append(
                CacheRow(
                    p.name,
                    state,
                    tier,
                    info.tokens + p.preamble_len * bool(p.ready_documents),
                    {**resident, "disk": sum(_file_size(f) for f in p.kv_files)},
                    p.hits,
                    p.last_used_at,
                    p.pinned,
                    kb.cache.shard_rows(p.name),
                )
            )
        return rows

    def run_op(self, op: str, name: str, tier: str | None = None) -> dict:
        """Run one operation now, on this thread; returns what it did."""
        kb = self.kb
        if op == "pin" or op == "unpin":
            kb.set_placement(name, pinned=op == "pin")
            if name in kb.cache.tiers.entries:
                kb.cache.tiers.pin(name, op == "pin")
            return {"pinned": op == "pin"}
        if op == "evict" or op == "move":
            return {"tier": kb.cache.move(name, "disk" if op == "evict" else tier or "")}
        if op == "rebuild":
            return asdict(self.rebuild(name))
        if op == "delete":
            kb.delete_corpus(name)
            return {"deleted": name}
        raise KBError(f"unknown cache operation {op!r}: one of {', '.join(OPS)}")

    def submit(self, op: str, name: str, tier: str | None = None) -> str:
        """Run the operation as a job of this process; returns its event id at once."""
        if op not in OPS:
            raise KBError(f"unknown cache operation {op!r}: one of {', '.join(OPS)}")
        if op == "move" and tier not in TIERS:
            raise KBError(f"move needs a tier: one of {', '.join(TIERS)}")
        corpus_id = self.kb.ingestor.corpus_id(name)
        # a delete would cascade to a job row tied to the corpus: that one keeps only the name
        return self.kb.jobs.run_here(
            "cache",
            {"op": op, "corpus": name, "tier": tier},
            lambda: self.run_op(op, name, tier),
            corpus_id=None if op == "delete" else corpus_id,
            expected=(KBError, TierError),
        )

    def event(self, event_id: str) -> CacheEvent:
        """An operation's status by its event id."""
        with self.kb.db.session() as s:
            job = s.get(Job, event_id)
            if job is None or job.kind != "cache":
                raise NotFound(f"no cache event {event_id!r}")
            p = job.payload or {}
            return CacheEvent(
                job.id,
                p.get("op", ""),
                p.get("corpus", ""),
                p.get("tier"),
                job.status,
                job.error,
                job.result,
                job.created_at,
                job.finished_at,
            )

    def wait(
        self, event_id: str, timeout_s: float | None = None, poll_s: float = 0.05
    ) -> CacheEvent:
        """Poll an event until it finishes (or `timeout_s` passes); returns its last status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            ev = self.event(event_id)
            if ev.finished or (deadline is not None and time.monotonic() > deadline):
                return ev
            time.sleep(poll_s)

    # -- rebuild ---------------------------------------------------------------------------------
    def rebuild(self, name: str) -> RebuildResult:
        """Bring a corpus's stored KV in line with the current settings, resumably: damaged files are
        dropped, the preamble is redone when its key changed, and each document re-prefills only the
        segments whose cache key changed or whose file is gone. Interrupted, it resumes where it
        stopped (every segment written is recorded with its new key)."""
        kb = self.kb
        ing = kb.ingestor
        cfg = ing.corpus_settings()
        res = RebuildResult(name, "building")
        corpus_id = ing.corpus_id(name)
        with kb.db.session() as s:
            corpus = s.get(Corpus, corpus_id)
            if corpus.status == "building" and _busy(s, corpus.id):
                raise Conflict(f"corpus {name!r} is being built; try again when it finishes")
            corpus.status = "building"  # not served until every segment matches
            try:
                read_kv(corpus.preamble_kv_file, corpus.preamble_checksum)
            except KVCorruptError:
                corpus.preamble_kv_file = None  # ensure_preamble writes it again
            ing.ensure_preamble(s, corpus, cfg)
            docs = [d.id for d in corpus.documents if d.stage != "failed"]
            for doc_id in docs:
                segments = s.scalars(
                    select(Segment).where(Segment.document_id == doc_id).order_by(Segment.seq)
                ).all()
                links = ing.links(segments)
                for seg in segments:
                    if seg.kv_file is None or seg.cache_key != segment_key(
                        cfg, seg.pos_start, seg.token_ids, links[seg.id]
                    ):
                        continue  # prefilled again anyway
                    try:
                        read_kv(seg.kv_file, seg.kv_checksum)
                    except KVCorruptError:
                        seg.kv_file = seg.cache_key = None
                        res.damaged += 1
        res.documents = len(docs)
        for doc_id in docs:
            seen: list[int] = []

            def hook(u, seen=seen) -> None:
                if u.stage == "prefilled":
                    seen.append(u.done)

            try:
                out = ing.build(doc_id, hook=hook)
            except KBError as e:
                res.failed.append(f"document {doc_id}: {e.message}")
                continue
            except Exception as e:  # IngestError and friends: the document is marked failed
                res.failed.append(f"document {doc_id}: {getattr(e, 'message', None) or e}")
                continue
            if seen:
                res.prefilled += seen[-1] - seen[0]
                res.reused += seen[0]
            else:
                res.reused += out.segments
        ing.refresh_status(corpus_id)
        with kb.db.session() as s:
            res.status = s.get(Corpus, corpus_id).status
        log.info(
            "rebuilt %s: %d segments prefilled, %d reused, %d damaged",
            name,
            res.prefilled,
            res.reused,
            res.damaged,
        )
        return res


def _busy(session, corpus_id: int) -> bool:
    """Whether an unfinished job other than cache reads is building this corpus."""
    return (
        session.scalar(
            select(Job.id)
            .where(
                Job.corpus_id == corpus_id,
                Job.kind.in_(("ingest", "rebuild")),
                Job.status.in_(("queued", "running")),
            )
            .limit(1)
        )
        is not None
    )
