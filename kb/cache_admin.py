"""Cache administration: per corpus, where its shared KV lives and what to do with it.

`lookup` reads (tokens, bytes per tier, hits, last use, state). The operations (pin, unpin,
evict, move, rebuild, delete) run asynchronously, LMCache-style: `submit` records a Job row
(kind "cache", payload {op, corpus, tier}), runs it on a thread of this process and returns the
job id as the event id; `event` reads its status back from the row. Tier operations act on the
KV held by this process (the server's, through the HTTP API); pin, unpin, rebuild and delete act
through the database for every process.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from kb.cache_key import segment_key
from kb.errors import Conflict, KBError, NotFound
from storage.kvstore import KVCorruptError, read_kv
from storage.models import Corpus, Job, Segment, utcnow
from storage.tiers import TIERS, TierError

if TYPE_CHECKING:
    from kb.service import KnowledgeBase

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


def lookup(kb: KnowledgeBase, name: str | None = None) -> list[CacheRow]:
    """Per corpus (or one): tokens, bytes per tier, hits, last use, state."""
    key = kb.settings_key()
    rows = []
    with kb.db.session() as s:
        q = select(Corpus).order_by(Corpus.name)
        corpora = list(s.scalars(q.where(Corpus.name == name) if name else q))
        if name and not corpora:
            raise NotFound(f"corpus {name!r} does not exist")
        for c in corpora:
            info = kb._info(c, key)
            ready = [d for d in c.documents if d.stage == "ready"]
            disk = _file_size(c.preamble_kv_file) + sum(
                _file_size(g.kv_file) for d in ready for g in d.segments
            )
            entry = kb.cache.tiers.entries.get(c.name)
            tier = entry.tier if entry is not None else (c.tier or "disk")
            resident = entry.bytes_per_tier() if entry is not None else {"gpu": 0, "cpu": 0}
            if info.stale:
                state = "stale"
            elif c.status != "ready":
                state = c.status
            elif c.pinned:
                state = "pinned"
            elif tier == "disk" and c.last_used_at is not None:
                state = "evicted"
            else:
                state = "ready"
            rows.append(
                CacheRow(
                    c.name,
                    state,
                    tier,
                    info.tokens + (c.preamble_len or 0) * bool(ready),
                    {**resident, "disk": disk},
                    c.hits or 0,
                    c.last_used_at,
                    bool(c.pinned),
                )
            )
    return rows


# -- operations ------------------------------------------------------------------------------
def run_op(kb: KnowledgeBase, op: str, name: str, tier: str | None = None) -> dict:
    """Run one operation now, on this thread; returns what it did."""
    if op == "pin" or op == "unpin":
        with kb.db.session() as s:
            kb._corpus(s, name).pinned = op == "pin"
        if name in kb.cache.tiers.entries:
            kb.cache.tiers.pin(name, op == "pin")
        return {"pinned": op == "pin"}
    if op == "evict" or op == "move":
        return {"tier": kb.cache.move(name, "disk" if op == "evict" else tier or "")}
    if op == "rebuild":
        return asdict(rebuild(kb, name))
    if op == "delete":
        kb.delete_corpus(name)
        return {"deleted": name}
    raise KBError(f"unknown cache operation {op!r}: one of {', '.join(OPS)}")


def submit(kb: KnowledgeBase, op: str, name: str, tier: str | None = None) -> str:
    """Record the operation as a Job and run it on a thread; returns its event id at once.
    The thread is not a daemon, so a command-line process finishes the work before exiting."""
    if op not in OPS:
        raise KBError(f"unknown cache operation {op!r}: one of {', '.join(OPS)}")
    if op == "move" and tier not in TIERS:
        raise KBError(f"move needs a tier: one of {', '.join(TIERS)}")
    job_id = str(uuid.uuid4())
    with kb.db.session() as s:
        corpus = kb._corpus(s, name)
        # a delete would cascade to a job row tied to the corpus: that one keeps only the name
        s.add(
            Job(
                id=job_id,
                kind="cache",
                corpus_id=None if op == "delete" else corpus.id,
                payload={"op": op, "corpus": name, "tier": tier},
                status="queued",
            )
        )
    threading.Thread(target=_run, args=(kb, job_id, op, name, tier), name=f"kb-cache-{op}").start()
    return job_id


def _run(kb: KnowledgeBase, job_id: str, op: str, name: str, tier: str | None) -> None:
    with kb.db.session() as s:
        job = s.get(Job, job_id)
        job.status, job.started_at, job.attempts = "running", utcnow(), (job.attempts or 0) + 1
    try:
        result, error, status = run_op(kb, op, name, tier), None, "done"
    except (KBError, TierError) as e:
        result, error, status = None, getattr(e, "message", None) or str(e), "failed"
    except Exception as e:  # a thread has no caller to raise to: the row carries the reason
        log.exception("cache %s of %s failed", op, name)
        result, error, status = None, f"{type(e).__name__}: {e}", "failed"
    with kb.db.session() as s:
        job = s.get(Job, job_id)
        job.status, job.result, job.error, job.finished_at = status, result, error, utcnow()


def event(kb: KnowledgeBase, event_id: str) -> CacheEvent:
    """An operation's status by its event id."""
    with kb.db.session() as s:
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
    kb: KnowledgeBase, event_id: str, timeout_s: float | None = None, poll_s: float = 0.05
) -> CacheEvent:
    """Poll an event until it finishes (or `timeout_s` passes); returns its last status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        ev = event(kb, event_id)
        if ev.finished or (deadline is not None and time.monotonic() > deadline):
            return ev
        time.sleep(poll_s)


# -- rebuild ---------------------------------------------------------------------------------
def rebuild(kb: KnowledgeBase, name: str) -> RebuildResult:
    """Bring a corpus's stored KV in line with the current settings, resumably: damaged files are
    dropped, the preamble is redone when its key changed, and each document re-prefills only the
    segments whose cache key changed or whose file is gone. Interrupted, it resumes where it
    stopped (every segment written is recorded with its new key)."""
    ing = kb.ingestor
    cfg = ing.corpus_settings()
    res = RebuildResult(name, "building")
    with kb.db.session() as s:
        corpus = kb._corpus(s, name)
        if corpus.status == "building" and _busy(s, corpus.id):
            raise Conflict(f"corpus {name!r} is being built; try again when it finishes")
        corpus_id = corpus.id
        corpus.status = "building"  # not served until every segment matches
        try:
            read_kv(corpus.preamble_kv_file, corpus.preamble_checksum)
        except KVCorruptError:
            corpus.preamble_kv_file = None  # _ensure_preamble writes it again
        ing._ensure_preamble(s, corpus, cfg)
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
