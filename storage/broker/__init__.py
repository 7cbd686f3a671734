"""Job and event broker: Redis Streams + pub/sub when a Redis URL is configured, else in-process.

broker = make_broker(settings.redis_url)          # KB_REDIS_URL, or None
broker.enqueue("ingest", job.id, "ingest", {"document_id": doc.id})
msg = broker.receive("ingest", consumer="worker-1")
... run it ...; broker.ack("ingest", msg)  or  broker.retry("ingest", msg, str(exc))
"""

from __future__ import annotations

from .base import Broker, Event, Message, Subscription
from .memory_broker import MemoryBroker
from .redis_broker import RedisBroker

__all__ = [
    "Broker",
    "Event",
    "MemoryBroker",
    "Message",
    "RedisBroker",
    "Subscription",
    "make_broker",
]


def make_broker(
    redis_url: str | None,
    prefix: str = "kb:",
    group: str = "workers",
    max_deliveries: int = 5,
) -> Broker:
    """A `RedisBroker` for `redis_url` (keys under `prefix`), or a `MemoryBroker` when it is
    None or empty. `max_deliveries` bounds redeliveries of a job whose consumers keep dying."""
    if redis_url:
        return RedisBroker(redis_url, prefix=prefix, group=group, max_deliveries=max_deliveries)
    return MemoryBroker(max_deliveries=max_deliveries)
