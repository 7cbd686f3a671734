"""The knowledge base as one object: corpora, ingestion, stored shared KV, and answers.

The CLI, the HTTP API and the UI all go through `KnowledgeBase`; the engine, the model and the
stores are created lazily so that listing corpora never loads a model.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from kb.auth import (
    Forbidden,
    Principal,
    auth_on,
    can_read,
    can_write,
    check_read,
    check_write,
    principal_for,
)
from kb.cache_admin import CacheAdmin
from kb.catalog import Catalog, CorpusInfo, corpus_row
from kb.chats import ChatHistory, Chats
from kb.citations import CitationMap
from kb.corpus_cache import CorpusCache, LoadedCorpus
from kb.document_rows import DocumentRow, document_rows
from kb.engine.distributed.backend import distributed_engine
from kb.engine.distributed.protocol import ShardLink
from kb.engine.engine import Engine, EngineConfig, QueueFull
from kb.engine.request import Delta, Finished, RequestHandle
from kb.engine.sequence import SamplingParams
from kb.errors import Conflict, KBError, NotFound, TooBusy
from kb.file_types import accepted_names, accepted_suffixes
from kb.ingest.pipeline import Ingestor, IngestResult, Progress
from kb.inputs import check_text, internal_message, new_request_id
from kb.jobs import JobService
from kb.model.config import UnsupportedModelError
from kb.model.demo import DEMO_NAME, ensure_demo_model
from kb.model.loader import LoadedModel, load_model
from kb.prompt import build_prompt, encode, question_span, turn_spans
from kb.settings import Settings
from kb.sources import SourcePage, page_image, source_page
from kb.uploads import UploadRegistry, caller_owner
from storage.db import Database
from storage.models import Corpus, CorpusShare, Document, User

log = logging.getLogger(__name__)

# the service's public face: the web app (and any other client of the service) imports these
# from here, never from the modules behind them
__all__ = [
    "Answer",
    "ChatHistory",
    "Conflict",
    "Delta",
    "DocumentRow",
    "Finished",
    "Forbidden",
    "KBError",
    "KnowledgeBase",
    "NotFound",
    "Principal",
    "SamplingParams",
    "SharedRanks",
    "SourcePage",
    "UploadRegistry",
    "accepted_names",
    "accepted_suffixes",
    "auth_on",
    "caller_owner",
    "check_text",
    "internal_message",
    "new_request_id",
    "principal_for",
]

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" let "name\n" through


@dataclass
class DocumentProgress:
    """One document's row in the web app: its stage, stored percent and ETA, tokens, error."""

    id: int
    filename: str
    stage: str
    percent: float
    eta_s: float | None
    tokens: int
    error: str | None


@dataclass
class CorpusPlacement:
    """Where a corpus's KV is, for the admin: its state columns and its stored KV files."""

    name: str
    status: str
    pinned: bool
    hits: int
    last_used_at: datetime | None
    tokens: int  # of its ready documents
    kv_files: list[str]  # the preamble's and each ready document's segments'
    tier: str | None = None  # the tier recorded for it (the tier manager's word is live)
    preamble_len: int = 0
    ready_documents: int = 0


@dataclass
class SharedRanks:
    """The shared ranks as the service sees them: how many, whether the link works, where
    corpora are served now, and per rank the corpora, tokens and bytes it holds."""

    ranks: int
    healthy: bool  # every shared rank answers (degraded while one is missing)
    serving: str  # "shared ranks", or "rank 0" while they cannot (none left, or no room)
    error: str | None  # the failure that lost a rank, until every rank is back
    per_rank: list[dict]  # rank, state ("serving" or "lost"), corpora, tokens, bytes
    members: list[int] = field(default_factory=list)  # the ranks of the current generation
    generation: int = 0  # how many times the group formed, less one

    def to_dict(self) -> dict:
        return asdict(self)


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
            self._citations = [
                c.to_dict() for c in self.citation_map.cite(self.handle.result.chunk_mass, top)
            ]
        return self._citations


class KnowledgeBase:
    def __init__(self, settings: Settings | None = None, link: ShardLink | None = None):
        """`link`: rank 0's side of a `kb serve --shared-ranks` job; corpora are then attended by
        the shared ranks (docs/SCALING.md)."""
        self.settings = settings or Settings()
        self.link = link
        self.home = self.settings.resolved_home
        self.home.mkdir(parents=True, exist_ok=True)
        self.db = Database(self.settings.resolved_database_url)
        self._loaded: LoadedModel | None = None
        self._engine: Engine | None = None
        self._lock = threading.RLock()
        self.ingestor = Ingestor(self.settings, self.db, lambda: self.loaded)
        self.cache = CorpusCache(
            self.settings, self.db, lambda: self.loaded, lambda: self.engine, link
        )
        self.chats = Chats(self.db)
        self.catalog = Catalog(self.settings, self.db, lambda: self._loaded)
        self._jobs: JobService | None = None
        self.cache_admin = CacheAdmin(self)

    # -- model and engine -------------------------------------------------------------------
    def model_folder(self, name: str | None = None) -> Path:
        name = name or self.settings.model
        if name == DEMO_NAME:
            return ensure_demo_model(self.settings.resolved_models_dir)
        path = Path(name).expanduser()
        if path.is_dir():
            return path.resolve()
        raise KBError(
            f"unknown model {name!r}: not the demo model ({DEMO_NAME}) and not a local folder"
        )

    @property
    def loaded(self) -> LoadedModel:
        with self._lock:
            if self._loaded is None:
                folder = self.model_folder()
                try:
                    self._loaded = load_model(
                        folder, self.settings.torch_dtype, self.settings.device
                    )
                except UnsupportedModelError as e:
                    raise KBError(str(e)) from e
                log.info(
                    "loaded model %s (%s, %d layers)",
                    folder.name,
                    self._loaded.config.model_type,
                    self._loaded.config.num_layers,
                )
            return self._loaded

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                s = self.settings
                config = EngineConfig(
                    device=s.device,
                    block_size=s.kv_block_size,
                    unique_kv_tokens=s.unique_kv_tokens,
                    max_running=s.max_running,
                    max_queue=s.max_queue,
                )
                if self.link is not None:  # sharded corpora are attended on the shared ranks
                    self._engine = distributed_engine(self.loaded, self.link, config)
                else:
                    self._engine = Engine(self.loaded, config)
            return self._engine

    def shared_ranks(self) -> SharedRanks | None:
        """The shared ranks' state (None without them): /healthz, /metrics and the admin."""
        link = self.link
        if link is None:
            return None
        # the shared ranks, and rank 0 where it is its own (a world of one: LoopbackLink)
        members = list(link.holders)
        ranks = sorted(set(link.world.shared_ranks) | set(members))
        per_rank = {
            r: {
                "rank": r,
                "state": "serving" if r in members else "lost",
                "corpora": 0,
                "tokens": 0,
                "bytes": 0,
            }
            for r in ranks
        }
        for name in list(self.cache.loaded):  # no lock: a corpus may be loading meanwhile
            for row in self.cache.shard_rows(name):
                into = per_rank[row["rank"]]
                into["corpora"] += 1
                into["tokens"] += row["tokens"]
                into["bytes"] += row["bytes"]
        error = link.error  # its first clause: which rank, during what (the log has the cause)
        return SharedRanks(
            len(link.world.shared_ranks),
            not link.degraded,
            "shared ranks" if self.cache.sharded and link.down is None else "rank 0",
            None if error is None else str(error).split(";")[0],
            list(per_rank.values()),
            members,
            link.generation,
        )

    @property
    def started_engine(self) -> Engine | None:
        """The engine if a request has started it, else None (never starts one)."""
        return self._engine

    @property
    def jobs(self) -> JobService:
        """The job service (broker, queue, local worker) of this knowledge base, made on first
        use: listing corpora never connects to the broker."""
        with self._lock:
            if self._jobs is None:
                self._jobs = JobService(self)
            return self._jobs

    def close(self) -> None:
        with self._lock:
            jobs, self._jobs = self._jobs, None
        if jobs is not None:
            jobs.close()
        if self._engine is not None:
            self._engine.shutdown(grace_s=self.settings.shutdown_grace_s)
            self._engine.reopen()  # stopped and empty; a later use steps it again
        if self.link is not None:  # the job ends with its server: the shared ranks exit
            self.link.shutdown()
        self.db.close()

    # -- corpora ----------------------------------------------------------------------------
    def _corpus(self, session, name: str) -> Corpus:
        return corpus_row(session, name)

    def create_corpus(
        self,
        name: str,
        *,
        owner: int | None = None,
        visibility: str = "public",
        share_with: list[str] | None = None,
    ) -> CorpusInfo:
        """A new empty corpus; `owner` (a user id), `visibility` and, when shared, the users it
        is shared with decide who may read it. One transaction: an unknown user in `share_with`
        leaves no corpus behind."""
        if not NAME_RE.match(name or ""):
            raise KBError(
                "a corpus name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if visibility not in ("private", "public", "shared"):
            raise KBError("visibility is one of private, public, shared")
        with self.db.session() as s:
            if s.scalar(select(Corpus).where(Corpus.name == name)) is not None:
                raise Conflict(f"corpus {name!r} already exists")
            corpus = Corpus(
                name=name,
                model=self.settings.model,
                status="empty",
                settings={},
                owner_id=owner,
                visibility=visibility,
            )
            s.add(corpus)
            s.flush()
            if visibility == "shared":
                for uname in dict.fromkeys(n.strip() for n in share_with or [] if n.strip()):
                    uid = s.scalar(select(User.id).where(User.name == uname))
                    if uid is None:
                        raise NotFound(f"user {uname!r} does not exist")  # rolls the corpus back
                    s.add(CorpusShare(corpus_id=corpus.id, user_id=uid))
            return self.catalog.info(corpus)

    def settings_key(self) -> str | None:
        """The cache key a corpus built now would get (kb/catalog.py); None when the model is
        not on this machine yet."""
        return self.catalog.settings_key()

    def list_corpora(self, *, user: Principal | None = None) -> list[CorpusInfo]:
        """All corpora, or only those `user` may read."""
        return self.catalog.list_corpora(user=user)

    def corpus_info(self, name: str) -> CorpusInfo:
        return self.catalog.corpus_info(name)

    def documents(self, name: str) -> list[dict]:
        with self.db.session() as s:
            c = self._corpus(s, name)
            return [
                {
                    "id": d.id,
                    "filename": d.filename,
                    "stage": d.stage,
                    "error": d.error,
                    "tokens": d.num_tokens,
                    "segments": len(d.segments),
                    "media_type": d.media_type,
                }
                for d in c.documents
            ]

    def document_rows(self, user: Principal, corpus: str) -> list[DocumentRow]:
        """Each document of `corpus` (which `user` may read) as the web app lists it."""
        return document_rows(self.db, user, corpus)

    def source_page(
        self, user: Principal, corpus: str, document_id: int, page: int | None, passage: str
    ) -> SourcePage:
        """The cited page of a document of `corpus` with `passage` located in it (kb/sources.py)."""
        return source_page(self.db, self.settings, user, corpus, document_id, page, passage)

    def page_image(self, user: Principal, corpus: str, document_id: int, page: int) -> bytes | None:
        """PNG bytes of page `page` of a stored PDF of `corpus`, or None where it cannot be drawn."""
        return page_image(self.db, user, corpus, document_id, page)

    def writable_corpora(self, user: Principal) -> list[str]:
        """The names of the corpora `user` may read and change, in name order."""
        with self.db.session() as s:
            return [
                c.name
                for c in s.scalars(select(Corpus).order_by(Corpus.name))
                if can_read(s, user, c) and can_write(user, c)
            ]

    def check_write(self, name: str, user: Principal) -> None:
        """Raise unless corpus `name` exists, `user` may read it and change it."""
        with self.db.session() as s:
            check_write(s, user, self._corpus(s, name))

    def document_progress(self, name: str, *, user: Principal) -> list[DocumentProgress]:
        """Each document of a corpus `user` may read, with its stored progress."""
        with self.db.session() as s:
            c = self._corpus(s, name)
            check_read(s, user, c)
            return [
                DocumentProgress(
                    d.id, d.filename, d.stage, d.percent or 0.0, d.eta_s, d.num_tokens, d.error
                )
                for d in c.documents
            ]

    def delete_document(self, name: str, doc_id: int, *, user: Principal) -> str:
        """Remove a document, its stored file and its KV (the next question loads the new
        layout); returns its file name."""
        with self.db.session() as s:
            corpus = self._corpus(s, name)
            check_write(s, user, corpus)
            cid = corpus.id
        with self.db.session() as s:
            d = s.get(Document, doc_id)
            if d is None or d.corpus_id != cid:
                raise NotFound(f"document {doc_id} is not in corpus {name!r}")
            fname, file_path = d.filename, d.file_path
            s.delete(d)
        shutil.rmtree(self.settings.kv_dir / str(cid) / str(doc_id), ignore_errors=True)
        if file_path:
            Path(file_path).unlink(missing_ok=True)
        self.ingestor.refresh_status(cid)
        return fname

    def reset_for_rebuild(self, name: str) -> list[Path]:
        """Drop a corpus from the serving cache (refused while it answers questions) and mark
        its documents, segments and preamble to be prefilled again; returns its stored files
        still on disk, for ingesting again."""
        self.cache.drop(name)
        with self.db.session() as s:
            c = self._corpus(s, name)
            paths = [
                Path(d.file_path) for d in c.documents if d.file_path and Path(d.file_path).exists()
            ]
            for d in c.documents:
                d.stage, d.error = "stored", None
            c.cache_key, c.status = None, "building"  # the preamble is prefilled again too
            for d in c.documents:
                for seg in d.segments:
                    seg.cache_key = None
        return paths

    def placements(self) -> list[CorpusPlacement]:
        """Every corpus's cache state columns and stored KV files, in name order (admin)."""
        with self.db.session() as s:
            out = []
            for c in s.scalars(select(Corpus).order_by(Corpus.name)):
                ready = [d for d in c.documents if d.stage == "ready"]
                files = [c.preamble_kv_file] + [seg.kv_file for d in ready for seg in d.segments]
                tokens = sum(d.num_tokens for d in ready)
                out.append(
                    CorpusPlacement(
                        c.name,
                        c.status,
                        bool(c.pinned),
                        c.hits or 0,
                        c.last_used_at,
                        tokens,
                        [f for f in files if f],
                        c.tier,
                        c.preamble_len or 0,
                        len(ready),
                    )
                )
            return out

    def set_placement(
        self, name: str, *, pinned: bool | None = None, tier: str | None = None
    ) -> None:
        """Record a corpus's pinned flag and tier (admin operations)."""
        with self.db.session() as s:
            c = self._corpus(s, name)
            if pinned is not None:
                c.pinned = pinned
            if tier is not None:
                c.tier = tier

    def delete_corpus(self, name: str) -> None:
        with self._lock:
            with self.db.session() as s:
                c = self._corpus(s, name)
                cid = c.id
                self.cache.drop(name)  # refuses while the corpus answers questions
                s.delete(c)
            for d in (self.settings.kv_dir / str(cid), self.settings.files_dir / str(cid)):
                shutil.rmtree(d, ignore_errors=True)

    # -- ingestion --------------------------------------------------------------------------
    def ingest(
        self, name: str, paths: list[str | Path], progress: Progress | None = None
    ) -> list[IngestResult]:
        """Store, parse, segment and prefill each file; one bad file never stops the others."""
        return self.ingestor.ingest(name, paths, progress)  # the next question loads the new layout

    # -- serving ----------------------------------------------------------------------------
    def load_corpus(self, name: str) -> LoadedCorpus:
        return self.cache.load(name)

    def default_sampling(self) -> SamplingParams:
        """What a request that names no sampling gets: the served answer length and penalties
        (KB_MAX_TOKENS, KB_REPETITION_PENALTY, KB_FREQUENCY_PENALTY, KB_DRY_*); the web app's
        and the CLI's answers."""
        s = self.settings
        return SamplingParams(
            max_tokens=s.max_tokens,
            repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
            dry_multiplier=s.dry_multiplier,
            dry_base=s.dry_base,
            dry_allowed_length=s.dry_allowed_length,
            dry_sequence_breakers=tuple(s.dry_sequence_breakers),
        )

    def ask(
        self,
        name: str,
        question: str,
        sampling: SamplingParams | None = None,
        history: list[dict] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        user: Principal | None = None,
        dense: bool = False,
    ) -> Answer:
        """Queue a question over a corpus; the returned Answer streams from the engine.
        With `user`, a corpus they may not read answers as if it did not exist. By default a
        request over a corpus larger than the selection budget chooses the passages it reads
        (attention retrieval, kb/engine/selection.py); `dense` (or a density below 1) keeps
        dense (or routed) attention over the whole corpus."""
        if not question or not question.strip():
            raise KBError("the question is empty")
        if user is not None:
            with self.db.session() as s:
                check_read(s, user, self._corpus(s, name))
        lm = self.loaded
        parts = build_prompt(lm.tokenizer, self.settings.system_prompt, history or [], question)
        ids = encode(lm.tokenizer, parts.suffix)
        sampling = sampling or self.default_sampling()
        # loading and queueing under the cache's lock: an evict between the two would unregister
        # the corpus the request is about to name
        with self.cache.lock:
            loaded = self.load_corpus(name)
            shared = loaded.shared
            if shared.router is not None:  # density applies to requests queued from now on
                shared.top_k = (
                    None
                    if self.settings.density >= 1.0
                    else shared.router.top_k(self.settings.density)
                )
            selects = shared.selector is not None and not dense and self.settings.density >= 1.0
            span, turns, pos = None, (), shared.pos_offset
            if selects:  # the question's tokens and the earlier user turns' (oldest first)
                span = question_span(lm.tokenizer, parts.suffix, question)
                asked = [
                    t["content"]
                    for t in history or []
                    if t.get("role") == "user" and isinstance(t.get("content"), str)
                ]
                turns = turn_spans(lm.tokenizer, parts.suffix, asked)
                if span is not None:
                    turns = tuple(t for t in turns if t[1] <= span[0])
                pos = shared.selector.query_position(shared.pos_offset, len(turns))
            try:
                handle = self.engine.add_request(
                    ids,
                    sampling,
                    shared.key,
                    pos,
                    loop,
                    select=selects,
                    select_span=span,
                    history_spans=turns,
                )
            except QueueFull as e:
                raise TooBusy(str(e)) from e
            except ValueError as e:
                raise KBError(str(e)) from e
        return Answer(handle, name, loaded.citation_map, len(ids))

    def chat(
        self,
        messages: list[dict],
        corpus: str | None = None,
        sampling: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Answer:
        """A chat turn, `messages` in OpenAI's shape ending with the user's. Over a corpus: its shared
        KV is the context (`ask`); without one: the model alone, with the chat template."""
        if not messages or messages[-1].get("role") != "user":
            raise KBError("the last message must be the user's")
        history = [m for m in messages[:-1] if m.get("role") in ("user", "assistant")]
        if corpus is not None:
            return self.ask(corpus, messages[-1]["content"], sampling, history, loop)
        tok = self.loaded.tokenizer
        text = (
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if getattr(tok, "chat_template", None)
            else messages[-1]["content"]
        )
        return self._generate(encode(tok, text), sampling, loop)

    def generate(
        self,
        prompt: str,
        sampling: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Answer:
        """Continue a raw prompt with the model alone (no corpus, no template)."""
        return self._generate(encode(self.loaded.tokenizer, prompt), sampling, loop)

    def _generate(self, ids: list[int], sampling: SamplingParams | None, loop) -> Answer:
        sampling = sampling or self.default_sampling()
        try:
            handle = self.engine.add_request(ids, sampling, None, 0, loop)
        except QueueFull as e:
            raise TooBusy(str(e)) from e
        except ValueError as e:
            raise KBError(str(e)) from e
        return Answer(handle, "", None, len(ids))

    def wait(self, ans: Answer, on_text: Callable[[str], None] | None = None) -> dict:
        """Wait for an answer (stepping the engine on this thread unless its loop thread runs) and
        return {"answer", "citations", "usage", "finish_reason"}."""
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
        res = handle.result
        if res.reason == "error":
            raise KBError(f"generation failed: {res.error}")
        return {
            "answer": res.text,
            "citations": ans.citations(),
            "usage": {
                "prompt_tokens": res.prompt_tokens,
                "completion_tokens": res.completion_tokens,
                "total_tokens": res.prompt_tokens + res.completion_tokens,
            },
            "finish_reason": res.reason,
        }

    def answer(
        self,
        name: str,
        question: str,
        sampling: SamplingParams | None = None,
        on_text: Callable[[str], None] | None = None,
        *,
        dense: bool = False,
    ) -> dict:
        """Ask a corpus and wait for the whole answer (`dense`: as `ask`)."""
        return self.wait(self.ask(name, question, sampling, dense=dense), on_text)
