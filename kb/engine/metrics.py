"""Engine figures with vLLM's names and meanings under the `kb_` prefix, in a Prometheus registry
of their own: queue and batch gauges, token counters, per-request latency histograms (time to
first token, inter-token, end to end, and its queue / prefill / decode / inference parts),
per-request prompt and generation token histograms, preemptions, and the shared cache's token
queries and hits. Per-request figures carry a `corpus` label ("none" for a request without one).

A fraction is a `_ratio` (Prometheus' convention), not vLLM's `_perc`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
NO_CORPUS = "none"

# The per-request histograms, labelled by corpus: (attribute, name, help, buckets), registered in
# this order (the exposition follows it).
_REQUEST_HISTOGRAMS: tuple[tuple[str, str, str, tuple[float, ...]], ...] = (
    ("ttft", "kb_time_to_first_token_seconds", "Time to first token", _LATENCY),
    ("itl", "kb_inter_token_latency_seconds", "Time between tokens of a request", _LATENCY),
    ("e2e", "kb_e2e_request_latency_seconds", "Request latency, arrival to finish", _LATENCY),
    ("queue_time", "kb_request_queue_time_seconds", "Arrival to first scheduled", _LATENCY),
    ("prefill_time", "kb_request_prefill_time_seconds", "First scheduled to first token", _LATENCY),
    ("decode_time", "kb_request_decode_time_seconds", "First token to finish", _LATENCY),
    ("inference_time", "kb_request_inference_time_seconds", "First scheduled to finish", _LATENCY),
    (
        "request_prompt",
        "kb_request_prompt_tokens",
        "A finished request's own prompt tokens (the shared corpus aside)",
        _TOKENS,
    ),
    (
        "request_generation",
        "kb_request_generation_tokens",
        "A finished request's generated tokens",
        _TOKENS,
    ),
)


def corpus_of(key: str | None) -> str:
    """The corpus name of a shared-KV key ("NAME@version"), or "none"."""
    return key.rsplit("@", 1)[0] if key else NO_CORPUS


@dataclass
class _Times:
    corpus: str
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


class EngineMetrics:
    # set from _REQUEST_HISTOGRAMS in __init__
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue_time: Histogram
    prefill_time: Histogram
    decode_time: Histogram
    inference_time: Histogram
    request_prompt: Histogram
    request_generation: Histogram

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        c = ["corpus"]
        self.waiting = Gauge(
            "kb_num_requests_waiting", "Requests waiting to be scheduled", registry=r
        )
        self.running = Gauge("kb_num_requests_running", "Requests in the running batch", registry=r)
        self.kv_usage = Gauge(
            "kb_unique_kv_usage_ratio", "Fraction of unique-KV blocks in use (0-1)", registry=r
        )
        self.batch_size = Histogram(
            "kb_batch_size", "Sequences stepped together", buckets=_BATCH, registry=r
        )
        for attr, name, doc, buckets in _REQUEST_HISTOGRAMS:
            setattr(self, attr, Histogram(name, doc, c, buckets=buckets, registry=r))
        self.prompt_tokens = Counter(
            "kb_prompt_tokens", "Prompt tokens of requests (their own part)", c, registry=r
        )
        self.gen_tokens = Counter("kb_generation_tokens", "Generated tokens", c, registry=r)
        self.step_tokens = Counter("kb_step_tokens", "Tokens run through the model", registry=r)
        self.preemptions = Counter(
            "kb_num_preemptions", "Requests preempted (their unique KV recomputed)", registry=r
        )
        self.cache_queries = Counter(
            "kb_shared_cache_queries",
            "Prompt tokens looked up: the shared corpus attended plus the request's own",
            c,
            registry=r,
        )
        self.cache_hits = Counter(
            "kb_shared_cache_hits",
            "Prompt tokens served from the shared corpus KV (computed once, never recomputed)",
            c,
            registry=r,
        )
        self.finished_total = Counter(
            "kb_request_success", "Finished requests", ["finished_reason", "corpus"], registry=r
        )
        self._times: dict[int, _Times] = {}
        self._preemptions_seen = 0
        self.max_batch_size = 0
        self.last_batch_size = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens generated)

    def arrived(
        self,
        seq_id: int,
        corpus_key: str | None = None,
        prompt_tokens: int = 0,
        shared_tokens: int = 0,
    ) -> None:
        corpus = corpus_of(corpus_key)
        self._times[seq_id] = _Times(corpus, time.perf_counter())
        self.prompt_tokens.labels(corpus).inc(prompt_tokens)
        self.cache_queries.labels(corpus).inc(prompt_tokens + shared_tokens)
        self.cache_hits.labels(corpus).inc(shared_tokens)

    def scheduled(self, seq_ids: list[int]) -> None:
        """The sequences of a step: the first time marks a request's end of queueing."""
        now = time.perf_counter()
        for sid in seq_ids:
            t = self._times.get(sid)
            if t is not None and t.scheduled is None:
                t.scheduled = now
                self.queue_time.labels(t.corpus).observe(now - t.arrival)

    def preempted(self, total: int) -> None:
        """The scheduler's running count of preemptions."""
        if total > self._preemptions_seen:
            self.preemptions.inc(total - self._preemptions_seen)
        self._preemptions_seen = total

    def token(self, seq_id: int) -> None:
        now = time.perf_counter()
        t = self._times.get(seq_id)
        if t is None:
            return
        self.gen_tokens.labels(t.corpus).inc()
        if t.first_token is None:
            t.first_token = now
            self.ttft.labels(t.corpus).observe(now - t.arrival)
            self.prefill_time.labels(t.corpus).observe(now - (t.scheduled or t.arrival))
        else:
            self.itl.labels(t.corpus).observe(now - t.last_token)
        t.last_token = now

    def finished(
        self, seq_id: int, reason: str, prompt_tokens: int = 0, generation_tokens: int = 0
    ) -> None:
        t = self._times.pop(seq_id, None)
        corpus = NO_CORPUS if t is None else t.corpus
        self.finished_total.labels(finished_reason=reason, corpus=corpus).inc()
        if t is None:
            return
        now = time.perf_counter()
        self.e2e.labels(t.corpus).observe(now - t.arrival)
        if t.scheduled is not None:
            self.inference_time.labels(t.corpus).observe(now - t.scheduled)
        if t.first_token is not None:
            self.decode_time.labels(t.corpus).observe(now - t.first_token)
        self.request_prompt.labels(t.corpus).observe(prompt_tokens)
        self.request_generation.labels(t.corpus).observe(generation_tokens)

    def finished_count(self, reason: str) -> float:
        """Requests finished for `reason`, over every corpus."""
        return sum(
            s.value
            for m in self.finished_total.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels["finished_reason"] == reason
        )

    def stepped(
        self,
        batch: int,
        tokens: int,
        sampled: int,
        seconds: float,
        waiting: int,
        running: int,
        kv_usage: float,
    ) -> None:
        self.batch_size.observe(batch)
        self.max_batch_size = max(self.max_batch_size, batch)
        self.last_batch_size = batch
        self.step_tokens.inc(tokens)
        self.waiting.set(waiting)
        self.running.set(running)
        self.kv_usage.set(kv_usage)
        self._recent.append((time.perf_counter(), sampled))

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self._recent if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(1e-9, recent[-1][0] - recent[0][0])
