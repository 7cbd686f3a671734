"""Broker interface and records shared by the Redis and in-process brokers.

A broker carries jobs (at-least-once, with acknowledgement, reclaim of deliveries whose
consumer died, retries with exponential backoff and a dead-letter list) and progress events
(fire-and-forget pub/sub with glob patterns). The database is the source of truth for jobs:
`enqueue` is idempotent by job id, so the job table can be re-enqueued wholesale at any time
(e.g. after a Redis restart lost everything) without running a job twice at once.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Message:
    """One delivery of a job.

    `id` is the broker's delivery id (a stream entry id in Redis): pass the message back to
    `ack`/`retry`. `attempt` counts earlier failed attempts (0 on the first run). `error` is
    the last failure's text (set on retried and dead-lettered messages, else "").
    """

    id: str
    job_id: str
    kind: str
    payload: dict
    attempt: int
    error: str = ""


@dataclass(frozen=True)
class Event:
    """A progress event: the channel it was published on (without key prefix) and its data."""

    channel: str
    data: dict


def encode_job(job_id: str, kind: str, payload: dict, attempt: int, error: str = "") -> str:
    """Serialise a job record to JSON (both brokers store this exact text, so payloads that
    are not JSON-serialisable fail at enqueue time in both)."""
    return json.dumps(
        {"job_id": job_id, "kind": kind, "payload": payload, "attempt": attempt, "error": error},
        separators=(",", ":"),
    )


def decode_job(message_id: str, raw: str) -> Message:
    """Build a `Message` from a delivery id and the JSON written by `encode_job`."""
    d: dict[str, Any] = json.loads(raw)
    return Message(
        id=message_id,
        job_id=d["job_id"],
        kind=d["kind"],
        payload=d["payload"],
        attempt=int(d["attempt"]),
        error=d.get("error", ""),
    )


def backoff_delay(attempt: int, backoff_s: float) -> float:
    """Delay before re-running a job that failed on `attempt` (0-based): backoff_s * 2**attempt."""
    return backoff_s * (2**attempt)


def is_pattern(channel: str) -> bool:
    """True when a channel name uses Redis glob syntax (`*`, `?`, `[`)."""
    return any(c in channel for c in "*?[")


class Subscription(ABC):
    """A live subscription to a channel or glob pattern.

    Use as a context manager; `get(timeout_s)` returns the next event or None on timeout;
    iterating yields events until the subscription is closed.
    """

    @abstractmethod
    def get(self, timeout_s: float = 1.0) -> Event | None:
        """Next event, waiting at most `timeout_s` seconds; None when none arrived."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving and release the connection."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """Whether `close` was called."""

    def __iter__(self) -> Iterator[Event]:
        while not self.closed:
            event = self.get(0.5)
            if event is not None:
                yield event

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Broker(ABC):
    """Job queues plus progress pub/sub. Both implementations are thread-safe.

    Delivery is at-least-once: a message stays pending until `ack`/`retry`; if its consumer
    dies, `receive(..., reclaim_idle_s=...)` on any consumer hands it out again once it has
    been idle that long. A message delivered more than `max_deliveries` times without being
    settled (a job that keeps killing its worker) goes to the dead-letter list.
    """

    @abstractmethod
    def enqueue(
        self,
        queue: str,
        job_id: str,
        kind: str,
        payload: dict,
        attempt: int = 0,
        delay_s: float = 0.0,
    ) -> None:
        """Add a job; a no-op while a job with this id is waiting, delayed or pending.

        With `delay_s` > 0 the job becomes visible only after that delay.
        """

    @abstractmethod
    def receive(
        self,
        queue: str,
        consumer: str,
        timeout_s: float = 1.0,
        reclaim_idle_s: float | None = 30.0,
    ) -> Message | None:
        """Next job for `consumer`, waiting up to `timeout_s`; None on timeout.

        First reclaims deliveries idle for at least `reclaim_idle_s` (None: never reclaim),
        then takes new ones. Delayed jobs whose time has come are made visible first.
        """

    @abstractmethod
    def ack(self, queue: str, message: Message) -> None:
        """Mark a delivery done; the job id may be enqueued again afterwards."""

    @abstractmethod
    def touch(self, queue: str, message: Message, consumer: str) -> bool:
        """Heartbeat for a long job: reset the delivery's idle time so it is not reclaimed.

        Returns False when `consumer` no longer holds it (reclaimed by another consumer,
        settled, or lost in a Redis restart): the caller should stop working on it.
        """

    @abstractmethod
    def retry(
        self,
        queue: str,
        message: Message,
        error: str,
        max_attempts: int = 3,
        backoff_s: float = 1.0,
    ) -> bool:
        """Settle a failed delivery: re-enqueue with attempt+1 after backoff_s * 2**attempt
        and return True, or, once `max_attempts` attempts have failed, move it to the
        dead-letter list "<queue>:dead" and return False."""

    @abstractmethod
    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        """Dead-lettered jobs of a queue, oldest first (`error` says why)."""

    @abstractmethod
    def pending(self, queue: str) -> int:
        """Number of delivered, unacknowledged messages."""

    @abstractmethod
    def depth(self, queue: str) -> int:
        """Number of messages waiting for delivery, delayed ones included."""

    @abstractmethod
    def ensure_group(self, queue: str) -> None:
        """Make sure the queue can be consumed (Redis: stream + consumer group exist)."""

    @abstractmethod
    def publish(self, channel: str, data: dict) -> None:
        """Send an event to current subscribers of `channel` (and matching patterns)."""

    @abstractmethod
    def subscribe(self, channel: str) -> Subscription:
        """Subscribe to a channel or glob pattern such as "progress:*".

        Subscribed when this returns: events published afterwards are received.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections; the broker is unusable afterwards."""
