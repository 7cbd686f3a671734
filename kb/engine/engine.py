"""The engine: `batch = scheduler.schedule(); logits = runner.run(batch); postprocess`, in a loop.

Requests may come from any thread; the engine thread (or a caller of `step()`) owns the model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass

from kb.engine.block_manager import BlockManager
from kb.engine.metrics import EngineMetrics
from kb.engine.request import Delta, Finished, RequestHandle
from kb.engine.runner import PREFILL_ROUTING, ModelRunner
from kb.engine.sampler import BreakerMasks, SamplingFailed, sample_each
from kb.engine.scheduler import Scheduler
from kb.engine.sequence import SamplingParams, SeqStatus, Sequence
from kb.engine.shared_kv import SharedKV
from kb.model.loader import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    device: str = "cpu"
    block_size: int = 16
    unique_kv_tokens: int = 65536
    max_running: int = 64
    max_batch_tokens: int = 2048
    max_queue: int = 256
    citation_layers: int = (
        4  # layers (evenly spread over the second half) that measure attention mass
    )
    # how a routed corpus chooses chunks for a request's prefill: "request" (one selection per
    # request and KV head: block-sparse, the CPU path reads only those chunks once), "token", or
    # "auto": request on the CPU, token on the GPU (kb/engine/runner.py says why)
    prefill_routing: str = "auto"
    # how the shared KV is attended: "moska" (every request of a corpus together, the default)
    # or "per_request" (each request reads the corpus's pages as its own prefix: the baseline)
    shared_mode: str = "moska"
    # replay decode steps from CUDA graphs on a GPU (kb/engine/cuda_graphs.py); ignored on the CPU
    cuda_graphs: bool = True


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def check_sampling(sp: SamplingParams) -> None:
    """Refuse, before it enters a batch, a request whose parameters cannot run (ValueError):
    non-finite numbers and seeds torch cannot take would otherwise fail inside the step."""
    for name in (
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "dry_multiplier",
        "dry_base",
    ):
        v = getattr(sp, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number")
    if not isinstance(sp.dry_allowed_length, int):
        raise ValueError("dry_allowed_length must be an integer")
    if sp.seed is not None and (
        not isinstance(sp.seed, int) or not SEED_MIN <= sp.seed <= SEED_MAX
    ):
        raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}]")
    if not isinstance(sp.top_k, int) or not isinstance(sp.max_tokens, int):
        raise ValueError("top_k and max_tokens must be integers")


class QueueFull(RuntimeError):
    """More requests wait than the configured queue limit."""


class ShuttingDown(QueueFull):
    """The engine is stopping: no new requests (callers answer as when the queue is full)."""


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = cfg = config or EngineConfig()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        n_layers = loaded.config.num_layers
        half = list(range(n_layers // 2, n_layers))
        step = max(1, len(half) // max(1, cfg.citation_layers))
        cite = (
            frozenset(half[::step][: cfg.citation_layers]) if cfg.citation_layers else frozenset()
        )
        num_blocks = -(-cfg.unique_kv_tokens // cfg.block_size)
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.blocks, cfg.max_running, cfg.max_batch_tokens)
        if cfg.prefill_routing not in PREFILL_ROUTING + ("auto",):
            raise ValueError(
                f"prefill_routing must be 'auto' or one of {PREFILL_ROUTING}, "
                f"got {cfg.prefill_routing!r}"
            )
        self.runner = ModelRunner(
            loaded.model,
            num_blocks,
            cfg.block_size,
            cfg.device,
            cite,
            shared_mode=cfg.shared_mode,
            prefill_routing=None if cfg.prefill_routing == "auto" else cfg.prefill_routing,
        )
        if cfg.cuda_graphs:
            self.runner.enable_cuda_graphs()
        self.corpora: dict[str, SharedKV] = {}
        self.metrics = EngineMetrics()
        self._handles: dict[int, RequestHandle] = {}
        self._inbox: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closing = False  # shutdown() began: no new requests
        eos = set(loaded.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.breakers = BreakerMasks(self.tokenizer)  # DRY's breaker strings as token ids

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams | None = None,
        corpus_key: str | None = None,
        pos_offset: int = 0,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        select: bool = False,
        select_span: tuple[int, int] | None = None,
        history_spans: tuple[tuple[int, int], ...] = (),
    ) -> RequestHandle:
        """Queue a request; with `select` (over a corpus with a selector) it chooses the passages
        it reads at prefill from its question's tokens prompt_ids[select_span] and its earlier
        user turns' prompt_ids[a:b] of `history_spans` (kb/engine/selection.py)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        sampling = sampling or SamplingParams()
        sampling.validate()
        check_sampling(sampling)
        if corpus_key is not None and corpus_key not in self.corpora:
            raise KeyError(f"corpus KV {corpus_key!r} is not loaded")
        max_pos = self.loaded.config.max_position_embeddings
        if pos_offset + len(prompt_ids) + 1 > max_pos:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens after position {pos_offset}) exceeds "
                f"the model's context of {max_pos} positions"
            )
        sampling.max_tokens = min(sampling.max_tokens, max_pos - pos_offset - len(prompt_ids))
        seq = Sequence(
            list(prompt_ids),
            sampling,
            corpus_key=corpus_key,
            pos_offset=pos_offset,
            select=select and corpus_key is not None,
            select_span=select_span,
            history_spans=tuple(history_spans),
        )
        handle = RequestHandle(seq, loop)
        with self._lock:
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting")
            self.scheduler.add(seq)  # validates that it can ever fit
            self._handles[seq.seq_id] = handle
            shared = self.corpora.get(corpus_key) if corpus_key is not None else None
            self.metrics.arrived(
                seq.seq_id, corpus_key, len(prompt_ids), shared.num_tokens if shared else 0
            )
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request (client gone): its unique KV is freed at the next step boundary."""
        with self._lock:
            self._inbox.append(("abort", handle.seq))
        self._wake.set()

    def register_corpus(self, shared: SharedKV) -> None:
        with self._lock:
            self.corpora[shared.key] = shared

    def unregister_corpus(self, key: str) -> None:
        with self._lock:
            if any(
                s.corpus_key == key for s in self.scheduler.running + list(self.scheduler.waiting)
            ):
                raise RuntimeError(f"corpus KV {key!r} is in use")
            self.corpora.pop(key, None)

    def in_use(self, key: str) -> bool:
        with self._lock:
            return any(
                s.corpus_key == key for s in self.scheduler.running + list(self.scheduler.waiting)
            )

    # -- stepping ---------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._inbox)

    def step(self) -> int:
        """Run one step for everything scheduled; returns the number of sequences stepped."""
        with self._lock:
            aborted = False
            for op, seq in self._inbox:
                if op == "abort" and not seq.is_finished:
                    self.scheduler.abort(seq)
                    self._finish(seq, "abort")
                    aborted = True
            self._inbox.clear()
            batch = self.scheduler.schedule()
            self.metrics.scheduled([s.seq_id for s in batch.seqs])
            self.metrics.preempted(self.scheduler.num_preemptions)
            corpora = dict(self.corpora)
            if aborted or not batch.seqs:
                self._gauges()
        if not batch.seqs:
            return 0
        t0 = time.perf_counter()
        try:
            logits, idx = self.runner.run(batch, corpora)
            tokens = sample_each(logits, [batch.seqs[i] for i in idx], self.breakers) if idx else []
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("engine step failed")
            self._fail(batch.seqs, e)
            return len(batch.seqs)
        with self._lock:
            for i, tok in zip(idx, tokens):
                seq = batch.seqs[i]
                if isinstance(tok, SamplingFailed):  # this request alone fails; the others go on
                    log.warning("request %d: %s", seq.seq_id, tok.reason)
                    if not seq.is_finished:
                        self._finish(seq, "error", error=tok.reason)
                elif not seq.is_finished:
                    self._append(seq, tok)
            self.scheduler.postprocess(batch)
            self.metrics.stepped(
                len(batch.seqs),
                batch.num_tokens,
                len(tokens),
                time.perf_counter() - t0,
                len(self.scheduler.waiting),
                len(self.scheduler.running),
                self.blocks.usage,
            )
        return len(batch.seqs)

    def _gauges(self) -> None:
        """Queue, running and KV gauges as they are now (after aborts too, not only after steps)."""
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.kv_usage.set(self.blocks.usage)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        handle = self._handles[seq.seq_id]
        self.metrics.token(seq.seq_id)
        sp = seq.sampling
        done = None
        if token in self.eos_ids and not sp.ignore_eos:
            done = "stop"
            ids = seq.output_ids[:-1]
        else:
            ids = seq.output_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in sp.stop:
            cut = text.find(s)
            if cut >= 0:
                text, done = text[:cut], "stop"
        if done is None and len(seq.output_ids) >= sp.max_tokens:
            done = "length"
        if done is None and text.endswith("\ufffd"):
            return  # an incomplete UTF-8 character: wait for its next byte
        if len(text) > len(handle.text):
            handle.push(Delta(text[len(handle.text) :], [token]))
            handle.text = text
        if done:
            seq.status = SeqStatus.FINISHED
            self._finish(seq, done)

    def _finish(
        self, seq: Sequence, reason: str, error: str | None = None, error_type: str | None = None
    ) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.runner.release(seq)
        handle = self._handles.pop(seq.seq_id, None)
        if handle is None:
            return
        mass = []
        if seq.chunk_mass is not None:
            vals, order = seq.chunk_mass.float().cpu().sort(descending=True)
            mass = [(int(c), float(m)) for c, m in zip(order[:32].tolist(), vals[:32].tolist())]
        self.metrics.finished(seq.seq_id, reason, len(seq.prompt_ids), len(seq.output_ids))
        handle.push(
            Finished(
                reason,
                handle.text,
                len(seq.prompt_ids),
                len(seq.output_ids),
                mass,
                error,
                error_type,
            )
        )

    # -- driving ----------------------------------------------------------------------------
    def run_until_done(self) -> None:
        """Step on the calling thread until nothing is left (CLI and tests without the thread)."""
        while self.has_work:
            self.step()

    @property
    def running_in_thread(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="kb-engine", daemon=True)
            self._thread.start()

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        with self._lock:
            for seq in seqs:
                if not seq.is_finished:
                    self.scheduler.abort(seq)
                    self._finish(seq, "error", str(error), type(error).__name__)

    def _loop(self) -> None:
        while not self._stop:
            try:
                if self.has_work:
                    self.step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:  # the loop must outlive any bug: fail what runs, keep serving
                log.exception("engine loop error; failing the running requests")
                self._fail(list(self.scheduler.running) + list(self.scheduler.waiting), e)

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop within a bound: refuse new requests, let running ones finish for up to
        `grace_s`, then abort every request left (its caller gets Finished("abort")), so no
        handler waits forever on a request the engine will never step again."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        while self._thread is not None and self.has_work and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            left = list(self.scheduler.running) + list(self.scheduler.waiting)
            left += [seq for op, seq in self._inbox if op == "abort"]
            self._inbox.clear()
            for seq in left:
                self.scheduler.abort(seq)
            for seq in left + [h.seq for h in self._handles.values()]:
                self._finish(seq, "abort", error="the server is shutting down")
            self._gauges()

    def reopen(self) -> None:
        """After `shutdown`: take requests again (a KnowledgeBase that one server closed is used
        again by the next, or by the caller itself)."""
        self._closing = False
