"""In-process broker: the embedded default when no `KB_REDIS_URL` is set.

Same semantics as the Redis broker (idempotent enqueue by job id, reclaim by idle time,
backoff, dead letters, pub/sub with glob patterns), held in memory under one lock, so a
single-process deployment and the tests need no server. Nothing survives the process.
"""

from __future__ import annotations

import heapq
import itertools
import json
import queue as queue_mod
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from .base import (
    Broker,
    Event,
    Message,
    Subscription,
    backoff_delay,
    decode_job,
    encode_job,
    is_pattern,
)

_DELAYED = "delayed"


@dataclass
class _Delivery:
    """A delivered, unacknowledged message: who holds it, since when, how often delivered."""

    id: str
    raw: str
    consumer: str
    delivered_at: float
    deliveries: int


@dataclass
class _Queue:
    """State of one queue. `ids` maps a live job id to its entry id or to "delayed"."""

    ready: deque[tuple[str, str]] = field(default_factory=deque)  # (entry id, raw)
    delayed: list[tuple[float, int, str, str]] = field(
        default_factory=list
    )  # heap (due, seq, job_id, raw)
    pending: dict[str, _Delivery] = field(default_factory=dict)  # insertion order = delivery order
    ids: dict[str, str] = field(default_factory=dict)
    dead: list[Message] = field(default_factory=list)


class MemorySubscription(Subscription):
    """Events for one channel or pattern, buffered in a thread-safe queue."""

    def __init__(self, broker: MemoryBroker, channel: str) -> None:
        self.channel = channel
        self.pattern = is_pattern(channel)
        self._events: queue_mod.Queue[Event] = queue_mod.Queue()
        self._broker = broker
        self._closed = False

    def matches(self, channel: str) -> bool:
        return fnmatchcase(channel, self.channel) if self.pattern else channel == self.channel

    def deliver(self, event: Event) -> None:
        self._events.put(event)

    def get(self, timeout_s: float = 1.0) -> Event | None:
        if self._closed:
            return None
        try:
            return (
                self._events.get(timeout=max(timeout_s, 0.0))
                if timeout_s > 0
                else self._events.get_nowait()
            )
        except queue_mod.Empty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._broker._unsubscribe(self)

    @property
    def closed(self) -> bool:
        return self._closed


class MemoryBroker(Broker):
    """Thread-safe in-memory broker; see `Broker` for the contract."""

    def __init__(self, max_deliveries: int = 5) -> None:
        self.max_deliveries = max_deliveries
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # notified on every enqueue/settle
        self._queues: dict[str, _Queue] = {}
        self._subs: list[MemorySubscription] = []
        self._seq = itertools.count(1)
        self._closed = False

    # -- helpers (call with the lock held) ---------------------------------------------------

    def _q(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue()
        return q

    def _add(self, q: _Queue, job_id: str, raw: str, delay_s: float) -> bool:
        """Enqueue unless the job id is live; returns whether it was added."""
        if job_id in q.ids:
            return False
        seq = next(self._seq)
        if delay_s > 0:
            heapq.heappush(q.delayed, (time.monotonic() + delay_s, seq, job_id, raw))
            q.ids[job_id] = _DELAYED
        else:
            entry_id = f"{seq}-0"
            q.ready.append((entry_id, raw))
            q.ids[job_id] = entry_id
        self._cond.notify_all()
        return True

    def _promote(self, q: _Queue, now: float) -> None:
        while q.delayed and q.delayed[0][0] <= now:
            _, seq, job_id, raw = heapq.heappop(q.delayed)
            entry_id = f"{seq}-0"
            q.ready.append((entry_id, raw))
            q.ids[job_id] = entry_id

    def _settle(self, q: _Queue, message: Message) -> None:
        """Forget a delivery: drop it from pending and free its job id if it still owns it."""
        q.pending.pop(message.id, None)
        if q.ids.get(message.job_id) == message.id:
            del q.ids[message.job_id]

    def _bury(self, q: _Queue, message: Message, error: str) -> None:
        self._settle(q, message)
        dead_id = f"{next(self._seq)}-0"
        q.dead.append(
            decode_job(
                dead_id,
                encode_job(message.job_id, message.kind, message.payload, message.attempt, error),
            )
        )
        self._cond.notify_all()

    def _reclaim(self, q: _Queue, consumer: str, idle_s: float, now: float) -> Message | None:
        for delivery in list(q.pending.values()):
            if now - delivery.delivered_at < idle_s:
                continue
            message = decode_job(delivery.id, delivery.raw)
            delivery.deliveries += 1
            if delivery.deliveries > self.max_deliveries:
                self._bury(
                    q, message, f"delivered {delivery.deliveries - 1} times without acknowledgement"
                )
                continue
            delivery.consumer = consumer
            delivery.delivered_at = now
            return message
        return None

    # -- Broker ------------------------------------------------------------------------------

    def enqueue(
        self,
        queue: str,
        job_id: str,
        kind: str,
        payload: dict,
        attempt: int = 0,
        delay_s: float = 0.0,
    ) -> None:
        raw = encode_job(job_id, kind, payload, attempt)
        with self._lock:
            self._add(self._q(queue), job_id, raw, delay_s)

    def receive(
        self,
        queue: str,
        consumer: str,
        timeout_s: float = 1.0,
        reclaim_idle_s: float | None = 30.0,
    ) -> Message | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            q = self._q(queue)
            while not self._closed:
                now = time.monotonic()
                self._promote(q, now)
                if reclaim_idle_s is not None:
                    message = self._reclaim(q, consumer, reclaim_idle_s, now)
                    if message is not None:
                        return message
                if q.ready:
                    entry_id, raw = q.ready.popleft()
                    q.pending[entry_id] = _Delivery(entry_id, raw, consumer, now, 1)
                    return decode_job(entry_id, raw)
                # sleep until the deadline, the next delayed job, or the next possible reclaim
                wait = deadline - now
                if wait <= 0:
                    return None
                if q.delayed:
                    wait = min(wait, q.delayed[0][0] - now)
                if reclaim_idle_s is not None and q.pending:
                    oldest = min(d.delivered_at for d in q.pending.values())
                    wait = min(wait, max(oldest + reclaim_idle_s - now, 0.001))
                self._cond.wait(max(wait, 0.001))
        return None

    def ack(self, queue: str, message: Message) -> None:
        with self._lock:
            self._settle(self._q(queue), message)
            self._cond.notify_all()

    def touch(self, queue: str, message: Message, consumer: str) -> bool:
        with self._lock:
            delivery = self._q(queue).pending.get(message.id)
            if delivery is None or delivery.consumer != consumer:
                return False
            delivery.delivered_at = time.monotonic()
            return True

    def retry(
        self,
        queue: str,
        message: Message,
        error: str,
        max_attempts: int = 3,
        backoff_s: float = 1.0,
    ) -> bool:
        with self._lock:
            q = self._q(queue)
            if message.attempt + 1 >= max_attempts:
                self._bury(q, message, error)
                return False
            self._settle(q, message)
            raw = encode_job(
                message.job_id, message.kind, message.payload, message.attempt + 1, error
            )
            self._add(q, message.job_id, raw, backoff_delay(message.attempt, backoff_s))
            return True

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        with self._lock:
            return list(self._q(queue).dead[: max(limit, 0)])

    def pending(self, queue: str) -> int:
        with self._lock:
            return len(self._q(queue).pending)

    def depth(self, queue: str) -> int:
        with self._lock:
            q = self._q(queue)
            return len(q.ready) + len(q.delayed)

    def ensure_group(self, queue: str) -> None:
        with self._lock:
            self._q(queue)

    def publish(self, channel: str, data: dict) -> None:
        text = json.dumps(data)  # fails here on non-JSON data, as over Redis
        with self._lock:
            subs = [s for s in self._subs if s.matches(channel)]
        for sub in subs:
            # each subscriber gets its own copy, as it would from a JSON round trip over Redis
            sub.deliver(Event(channel, json.loads(text)))

    def subscribe(self, channel: str) -> MemorySubscription:
        sub = MemorySubscription(self, channel)
        with self._lock:
            self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: MemorySubscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            subs, self._subs = self._subs, []
            self._cond.notify_all()
        for sub in subs:
            sub._closed = True
