"""Engine figures with vLLM's meanings and the `kb_` prefix, in a Prometheus registry of their own."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.waiting = Gauge(
            "kb_num_requests_waiting", "Requests waiting to be scheduled", registry=r
        )
        self.running = Gauge("kb_num_requests_running", "Requests in the running batch", registry=r)
        self.kv_usage = Gauge(
            "kb_unique_kv_usage_perc", "Fraction of unique-KV blocks in use", registry=r
        )
        self.batch_size = Histogram(
            "kb_batch_size", "Sequences stepped together", buckets=_BATCH, registry=r
        )
        self.ttft = Histogram(
            "kb_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "kb_inter_token_latency_seconds",
            "Time between tokens of a request",
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "kb_e2e_request_latency_seconds",
            "Request latency, arrival to finish",
            buckets=_LATENCY,
            registry=r,
        )
        self.gen_tokens = Counter("kb_generation_tokens", "Generated tokens", registry=r)
        self.step_tokens = Counter("kb_step_tokens", "Tokens run through the model", registry=r)
        self.finished_total = Counter(
            "kb_request_success", "Finished requests", ["finished_reason"], registry=r
        )
        self._arrival: dict[int, float] = {}
        self._last_token: dict[int, float] = {}
        self.max_batch_size = 0
        self.last_batch_size = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens generated)

    def arrived(self, seq_id: int) -> None:
        self._arrival[seq_id] = time.perf_counter()

    def token(self, seq_id: int) -> None:
        now = time.perf_counter()
        last = self._last_token.get(seq_id)
        if last is None:
            self.ttft.observe(now - self._arrival.get(seq_id, now))
        else:
            self.itl.observe(now - last)
        self._last_token[seq_id] = now

    def finished(self, seq_id: int, reason: str) -> None:
        t0 = self._arrival.pop(seq_id, None)
        self._last_token.pop(seq_id, None)
        if t0 is not None:
            self.e2e.observe(time.perf_counter() - t0)
        self.finished_total.labels(finished_reason=reason).inc()

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
        self.gen_tokens.inc(sampled)
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
