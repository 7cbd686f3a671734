"""Broker contract tests, run against the in-process broker and a real Redis server.

Redis tests use a unique key prefix per test and delete its keys afterwards. Without a Redis
server they are skipped, except under CI (env CI set), where they fail.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis

from storage.broker import Broker, Event, MemoryBroker, Message, RedisBroker, make_broker

# the real server of the dev box and CI; overridable to point at another one
REDIS_URL = os.environ.get("KB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
Q = "jobs"


def _redis_or_skip() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        reason = f"Redis server at {REDIS_URL} unreachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set: the Redis tests must run)")
        pytest.skip(reason)


def _delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under `prefix` (what a Redis restart does to our keys)."""
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    return client.delete(*keys) if keys else 0


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., Broker]]:
    """Factory of brokers of the parametrized kind; Redis ones share one fresh prefix."""
    kind = request.param
    if kind == "redis":
        _redis_or_skip()
    prefix = f"kbtest:{uuid.uuid4().hex[:12]}:"
    made: list[Broker] = []

    def factory(**kwargs: object) -> Broker:
        broker = make_broker(REDIS_URL if kind == "redis" else None, prefix=prefix, **kwargs)  # type: ignore[arg-type]
        made.append(broker)
        return broker

    yield factory
    if kind == "redis":
        _delete_prefix(redis.Redis.from_url(REDIS_URL), prefix)
    for broker in made:
        broker.close()


@pytest.fixture
def broker(make: Callable[..., Broker]) -> Broker:
    return make()


def test_factory_picks_implementation() -> None:
    assert isinstance(make_broker(None), MemoryBroker)
    assert isinstance(make_broker(""), MemoryBroker)
    b = make_broker(REDIS_URL, prefix="kbtest:factory:")
    try:
        assert isinstance(b, RedisBroker)
        assert b.prefix == "kbtest:factory:"
    finally:
        b.close()


def test_enqueue_receive_ack(broker: Broker) -> None:
    payload = {"document_id": 7, "name": "Bericht über Ärzte.pdf", "pages": [1, 2], "opts": {}}
    broker.enqueue(Q, "job-1", "ingest", payload)
    broker.enqueue(Q, "job-2", "precompute", {})
    assert broker.depth(Q) == 2 and broker.pending(Q) == 0

    m1 = broker.receive(Q, "w1", timeout_s=1.0)
    assert m1 is not None
    assert (m1.job_id, m1.kind, m1.payload, m1.attempt, m1.error) == (
        "job-1",
        "ingest",
        payload,
        0,
        "",
    )
    assert broker.depth(Q) == 1 and broker.pending(Q) == 1

    m2 = broker.receive(Q, "w1", timeout_s=1.0)
    assert m2 is not None and m2.job_id == "job-2" and m2.id != m1.id
    broker.ack(Q, m1)
    broker.ack(Q, m2)
    broker.ack(Q, m2)  # acking twice is harmless
    assert broker.depth(Q) == 0 and broker.pending(Q) == 0

    t0 = time.monotonic()
    assert broker.receive(Q, "w1", timeout_s=0.2) is None
    assert 0.15 <= time.monotonic() - t0 < 1.5


def test_receive_blocks_until_enqueue(broker: Broker) -> None:
    got: list[Message | None] = []
    t = threading.Thread(target=lambda: got.append(broker.receive(Q, "w1", timeout_s=5.0)))
    t.start()
    time.sleep(0.1)
    broker.enqueue(Q, "late", "ingest", {"x": 1})
    t.join(5)
    assert got and got[0] is not None and got[0].job_id == "late"


def test_dead_consumer_job_is_reclaimed(broker: Broker) -> None:
    broker.enqueue(Q, "job-1", "ingest", {"n": 1})
    first = broker.receive(Q, "dies", timeout_s=1.0)
    assert first is not None
    # not idle long enough yet: nothing to take
    assert broker.receive(Q, "survivor", timeout_s=0, reclaim_idle_s=0.2) is None
    time.sleep(0.25)
    again = broker.receive(Q, "survivor", timeout_s=0, reclaim_idle_s=0.2)
    assert again is not None
    assert (again.id, again.job_id, again.payload, again.attempt) == (
        first.id,
        "job-1",
        {"n": 1},
        0,
    )
    assert broker.pending(Q) == 1
    # reclaim_idle_s=None never reclaims
    time.sleep(0.25)
    assert broker.receive(Q, "other", timeout_s=0, reclaim_idle_s=None) is None
    broker.ack(Q, again)
    assert broker.pending(Q) == 0 and broker.depth(Q) == 0


def test_touch_keeps_long_job_from_being_reclaimed(make: Callable[..., Broker]) -> None:
    broker = make(max_deliveries=5)
    broker.enqueue(Q, "long", "precompute", {})
    m = broker.receive(Q, "busy", timeout_s=1.0)
    assert m is not None
    for _ in range(3):  # 0.45 s of work in all, heartbeat every 0.15 s, reclaim after 0.3 s idle
        time.sleep(0.15)
        assert broker.touch(Q, m, "busy") is True
        assert broker.receive(Q, "thief", timeout_s=0, reclaim_idle_s=0.3) is None
    time.sleep(0.35)  # heartbeats stop: the worker hung
    stolen = broker.receive(Q, "thief", timeout_s=0, reclaim_idle_s=0.3)
    assert stolen is not None and stolen.id == m.id
    assert broker.touch(Q, m, "busy") is False  # the old worker learns it lost the job
    assert broker.touch(Q, stolen, "thief") is True
    broker.ack(Q, stolen)
    assert broker.touch(Q, stolen, "thief") is False
    assert broker.pending(Q) == 0


def test_reclaim_happens_while_waiting(broker: Broker) -> None:
    broker.enqueue(Q, "job-1", "ingest", {})
    assert broker.receive(Q, "dies", timeout_s=1.0) is not None
    t0 = time.monotonic()
    m = broker.receive(Q, "survivor", timeout_s=2.0, reclaim_idle_s=0.2)
    assert m is not None and m.job_id == "job-1"
    assert time.monotonic() - t0 < 1.5


def test_job_that_keeps_killing_workers_is_dead_lettered(make: Callable[..., Broker]) -> None:
    broker = make(max_deliveries=2)
    broker.enqueue(Q, "poison", "ingest", {"p": 1})
    assert broker.receive(Q, "w1", timeout_s=1.0) is not None  # delivery 1, worker dies
    time.sleep(0.12)
    assert broker.receive(Q, "w2", timeout_s=0, reclaim_idle_s=0.1) is not None  # delivery 2, dies
    time.sleep(0.12)
    assert broker.receive(Q, "w3", timeout_s=0, reclaim_idle_s=0.1) is None  # buried instead
    dead = broker.dead_letters(Q)
    assert [(d.job_id, d.payload) for d in dead] == [("poison", {"p": 1})]
    assert "without acknowledgement" in dead[0].error
    assert broker.pending(Q) == 0 and broker.depth(Q) == 0


def test_retry_visible_only_after_backoff(broker: Broker) -> None:
    broker.enqueue(Q, "job-1", "ingest", {"k": "v"})
    m = broker.receive(Q, "w1", timeout_s=1.0)
    assert m is not None
    t0 = time.monotonic()
    assert broker.retry(Q, m, "parse failed", max_attempts=3, backoff_s=0.3) is True
    assert broker.pending(Q) == 0 and broker.depth(Q) == 1  # delayed counts as waiting
    assert broker.receive(Q, "w1", timeout_s=0) is None
    assert broker.receive(Q, "w1", timeout_s=0.1) is None
    m2 = broker.receive(Q, "w1", timeout_s=2.0)
    elapsed = time.monotonic() - t0
    assert m2 is not None
    assert 0.25 <= elapsed < 1.5
    assert (m2.job_id, m2.payload, m2.attempt, m2.error) == ("job-1", {"k": "v"}, 1, "parse failed")
    assert m2.id != m.id

    # second failure waits twice as long (backoff_s * 2**attempt)
    t0 = time.monotonic()
    assert broker.retry(Q, m2, "again", max_attempts=3, backoff_s=0.3) is True
    assert broker.receive(Q, "w1", timeout_s=0.4) is None
    m3 = broker.receive(Q, "w1", timeout_s=2.0)
    assert m3 is not None and m3.attempt == 2
    assert 0.55 <= time.monotonic() - t0 < 2.0
    broker.ack(Q, m3)
    assert broker.dead_letters(Q) == []


def test_enqueue_with_delay(broker: Broker) -> None:
    broker.enqueue(Q, "later", "ingest", {}, delay_s=0.2)
    broker.enqueue(Q, "now", "ingest", {})
    first = broker.receive(Q, "w1", timeout_s=1.0)
    assert first is not None and first.job_id == "now"
    assert broker.receive(Q, "w1", timeout_s=0.05) is None
    second = broker.receive(Q, "w1", timeout_s=1.0)
    assert second is not None and second.job_id == "later"


def test_dead_letter_after_max_attempts(broker: Broker) -> None:
    broker.enqueue(Q, "job-1", "precompute", {"corpus": "c"})
    m = broker.receive(Q, "w1", timeout_s=1.0)
    assert m is not None
    assert broker.retry(Q, m, "oom 1", max_attempts=2, backoff_s=0.05) is True
    m = broker.receive(Q, "w1", timeout_s=1.0)
    assert m is not None and m.attempt == 1
    assert broker.retry(Q, m, "oom 2", max_attempts=2, backoff_s=0.05) is False
    assert broker.pending(Q) == 0 and broker.depth(Q) == 0
    assert broker.receive(Q, "w1", timeout_s=0.2) is None
    dead = broker.dead_letters(Q)
    assert len(dead) == 1
    assert (dead[0].job_id, dead[0].kind, dead[0].payload, dead[0].attempt, dead[0].error) == (
        "job-1",
        "precompute",
        {"corpus": "c"},
        1,
        "oom 2",
    )
    # a dead job id is free again: the database may re-submit it
    broker.enqueue(Q, "job-1", "precompute", {"corpus": "c"})
    assert broker.depth(Q) == 1
    assert broker.dead_letters(Q, limit=0) == []


def test_enqueue_is_idempotent_by_job_id(broker: Broker) -> None:
    broker.enqueue(Q, "job-1", "ingest", {"v": 1})
    broker.enqueue(Q, "job-1", "ingest", {"v": 2})  # waiting: no-op
    assert broker.depth(Q) == 1
    m = broker.receive(Q, "w1", timeout_s=1.0)
    assert m is not None and m.payload == {"v": 1}
    broker.enqueue(Q, "job-1", "ingest", {"v": 3})  # pending: no-op
    assert broker.depth(Q) == 0 and broker.pending(Q) == 1
    assert broker.retry(Q, m, "x", backoff_s=0.2)
    broker.enqueue(Q, "job-1", "ingest", {"v": 4})  # delayed: no-op
    assert broker.depth(Q) == 1
    m = broker.receive(Q, "w1", timeout_s=2.0)
    assert m is not None and m.attempt == 1 and m.payload == {"v": 1}
    assert broker.receive(Q, "w1", timeout_s=0.1) is None
    broker.ack(Q, m)
    broker.enqueue(Q, "job-1", "ingest", {"v": 5})  # done: a new run is accepted
    m = broker.receive(Q, "w1", timeout_s=1.0)
    assert m is not None and m.payload == {"v": 5} and m.attempt == 0
    broker.ack(Q, m)
    # other queues are independent
    broker.enqueue("other", "job-1", "ingest", {})
    assert broker.depth("other") == 1 and broker.depth(Q) == 0


def test_pubsub_channel_and_pattern(broker: Broker) -> None:
    with broker.subscribe("progress:*") as pattern, broker.subscribe("progress:job-1") as exact:
        broker.publish("progress:job-1", {"stage": "parse", "percent": 10})
        broker.publish("progress:job-2", {"stage": "tokenize", "percent": 55.5})
        broker.publish("status:job-1", {"stage": "ignored"})
        got = [pattern.get(1.0), pattern.get(1.0)]
        assert got == [
            Event("progress:job-1", {"stage": "parse", "percent": 10}),
            Event("progress:job-2", {"stage": "tokenize", "percent": 55.5}),
        ]
        assert exact.get(1.0) == Event("progress:job-1", {"stage": "parse", "percent": 10})
        assert exact.get(0.1) is None
        assert pattern.get(0.1) is None
    assert pattern.closed and exact.closed
    broker.publish("progress:job-1", {"after": "close"})  # no subscriber: fine


def test_subscription_iterates(broker: Broker) -> None:
    sub = broker.subscribe("progress:?")
    seen: list[Event] = []

    def consume() -> None:
        for event in sub:
            seen.append(event)
            if event.data.get("done"):
                break

    t = threading.Thread(target=consume)
    t.start()
    for i in range(3):
        broker.publish(f"progress:{i}", {"i": i, "done": i == 2})
    t.join(5)
    sub.close()
    assert [e.data["i"] for e in seen] == [0, 1, 2]
    assert [e.channel for e in seen] == ["progress:0", "progress:1", "progress:2"]


def test_concurrent_consumers_each_job_once(broker: Broker) -> None:
    n_jobs, n_workers = 60, 6
    for i in range(n_jobs):
        broker.enqueue(Q, f"job-{i}", "ingest", {"i": i})
    delivered: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            m = broker.receive(Q, name, timeout_s=0.3, reclaim_idle_s=30.0)
            if m is None:
                return
            with lock:
                delivered.append(m.job_id)
            broker.ack(Q, m)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    counts = Counter(delivered)
    assert len(counts) == n_jobs and set(counts.values()) == {1}
    assert broker.pending(Q) == 0 and broker.depth(Q) == 0


def test_concurrent_enqueue_same_job_id_once(broker: Broker) -> None:
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        for _ in range(20):
            broker.enqueue(Q, "same", "ingest", {})

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert broker.depth(Q) == 1


@pytest.mark.redis
def test_redis_restart_loses_keys_but_broker_recovers() -> None:
    """Deleting all our keys (what a restart of a diskless Redis does) mid-flight: stale acks
    and retries don't fail, the database's re-enqueue is accepted, and the consumer group is
    recreated transparently on the next receive."""
    _redis_or_skip()
    prefix = f"kbtest:{uuid.uuid4().hex[:12]}:"
    broker = RedisBroker(REDIS_URL, prefix=prefix)
    try:
        broker.enqueue(Q, "running", "ingest", {"n": 1})
        broker.enqueue(Q, "failing", "ingest", {"n": 2})
        broker.enqueue(Q, "waiting", "ingest", {"n": 3})
        running = broker.receive(Q, "w1", timeout_s=1.0)
        failing = broker.receive(Q, "w1", timeout_s=1.0)
        assert running is not None and failing is not None
        assert broker.pending(Q) == 2

        assert _delete_prefix(broker.client, prefix) >= 2  # stream + ids hash at least
        assert broker.pending(Q) == 0 and broker.depth(Q) == 0

        # a heartbeat tells the worker its delivery is gone
        assert broker.touch(Q, running, "w1") is False
        # the worker finishing its job after the restart: harmless
        broker.ack(Q, running)
        # a retry after the restart re-enqueues (delayed) ...
        assert broker.retry(Q, failing, "lost", backoff_s=0.1) is True
        # ... and the database re-enqueues every unfinished job; "failing" is not doubled
        for job_id, n in (("running", 1), ("failing", 2), ("waiting", 3)):
            broker.enqueue(Q, job_id, "ingest", {"n": n})
        assert broker.depth(Q) == 3

        # the stream exists again but without our group: receive recreates it (NOGROUP path)
        got = []
        while (m := broker.receive(Q, "w2", timeout_s=1.0, reclaim_idle_s=0.2)) is not None:
            got.append((m.job_id, m.attempt))
            broker.ack(Q, m)
        assert sorted(got) == [("failing", 1), ("running", 0), ("waiting", 0)]
        assert broker.pending(Q) == 0 and broker.depth(Q) == 0

        # deleting the keys under a receive that is blocked waiting (Redis answers it with
        # "UNBLOCKED the stream key no longer exists"): it keeps waiting and gets the next job
        got_late: list[Message | None] = []
        waiter = threading.Thread(
            target=lambda: got_late.append(
                broker.receive(Q, "w3", timeout_s=3.0, reclaim_idle_s=None)
            )
        )
        waiter.start()
        time.sleep(0.3)
        _delete_prefix(broker.client, prefix)
        time.sleep(0.1)
        broker.enqueue(Q, "after", "ingest", {})
        waiter.join(5)
        assert got_late and got_late[0] is not None and got_late[0].job_id == "after"
        broker.ack(Q, got_late[0])
        assert broker.pending(Q) == 0 and broker.depth(Q) == 0
    finally:
        _delete_prefix(broker.client, prefix)
        broker.close()


@pytest.mark.redis
def test_redis_prefixes_isolate_brokers() -> None:
    _redis_or_skip()
    a = RedisBroker(REDIS_URL, prefix=f"kbtest:{uuid.uuid4().hex[:12]}:")
    b = RedisBroker(REDIS_URL, prefix=f"kbtest:{uuid.uuid4().hex[:12]}:")
    try:
        a.enqueue(Q, "job-1", "ingest", {})
        assert b.depth(Q) == 0 and b.receive(Q, "w", timeout_s=0) is None
        with b.subscribe("progress:*") as sub:
            a.publish("progress:1", {"x": 1})
            assert sub.get(0.2) is None
        assert a.depth(Q) == 1
    finally:
        for br in (a, b):
            _delete_prefix(br.client, br.prefix)
            br.close()
