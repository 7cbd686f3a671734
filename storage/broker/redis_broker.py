"""Redis broker: jobs on Redis Streams with a consumer group, progress events on pub/sub.

Keys per queue (all under `prefix`, default "kb:"):
- `<q>`            stream of waiting and pending entries, fields `job_id` and `msg` (JSON);
                   an entry is deleted when settled, so XLEN - pending = waiting.
- `<q>:delayed`    sorted set of job ids scored by due time (server ms), for backoff/delay.
- `<q>:delayed:msg` hash job id -> JSON of the delayed job.
- `<q>:ids`        hash job id -> stream entry id or "delayed": which jobs are live, for
                   idempotent enqueue. A marker whose entry vanished counts as absent.
- `<q>:dead`       dead-letter stream (capped at about 10 000 entries).
Every state change is one Lua script, so enqueue, promotion of due jobs and settling are
atomic; times come from the server clock (`TIME`), so clients' clocks don't matter.

Redis keeps nothing on disk here, so a restart loses everything; the database re-enqueues
its unfinished jobs (idempotent) and the group is recreated on the next NOGROUP error.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import ResponseError

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

T = TypeVar("T")

DEAD_MAXLEN = 10_000

# enqueue_if_absent(stream, delayed, delayed_msg, ids, job_id, raw, delay_ms) -> 1 added / 0 live
_LUA_ENQUEUE_FN = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function enqueue_if_absent(stream, delayed, dmsg, ids, job_id, raw, delay_ms)
  local loc = redis.call('HGET', ids, job_id)
  if loc then
    if loc == 'delayed' then
      if redis.call('ZSCORE', delayed, job_id) then return 0 end
    elseif #redis.call('XRANGE', stream, loc, loc) > 0 then
      return 0
    end
  end
  if delay_ms > 0 then
    redis.call('ZADD', delayed, now_ms() + delay_ms, job_id)
    redis.call('HSET', dmsg, job_id, raw)
    redis.call('HSET', ids, job_id, 'delayed')
  else
    local id = redis.call('XADD', stream, '*', 'job_id', job_id, 'msg', raw)
    redis.call('HSET', ids, job_id, id)
  end
  return 1
end
"""

# KEYS: stream, delayed, delayed_msg, ids; ARGV: job_id, raw, delay_ms
_LUA_ENQUEUE = (
    _LUA_ENQUEUE_FN
    + """
return enqueue_if_absent(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], tonumber(ARGV[3]))
"""
)

# Move due delayed jobs into the stream. KEYS: stream, delayed, delayed_msg, ids; ARGV: limit.
# Returns ms until the next delayed job is due, or -1 when none is left.
_LUA_PROMOTE = (
    _LUA_ENQUEUE_FN
    + """
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, job_id in ipairs(due) do
  local raw = redis.call('HGET', KEYS[3], job_id)
  redis.call('ZREM', KEYS[2], job_id)
  redis.call('HDEL', KEYS[3], job_id)
  if raw then
    local id = redis.call('XADD', KEYS[1], '*', 'job_id', job_id, 'msg', raw)
    redis.call('HSET', KEYS[4], job_id, id)
  end
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return math.max(0, tonumber(nxt[2]) - now)
"""
)

# Settle a delivery. KEYS: stream, delayed, delayed_msg, ids, dead;
# ARGV: group, entry_id, job_id, mode ('ack' | 'retry' | 'dead'), raw, delay_ms, dead_maxlen.
_LUA_SETTLE = (
    _LUA_ENQUEUE_FN
    + """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[4], ARGV[3]) == ARGV[2] then redis.call('HDEL', KEYS[4], ARGV[3]) end
if ARGV[4] == 'dead' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'job_id', ARGV[3], 'msg', ARGV[5])
elseif ARGV[4] == 'retry' then
  enqueue_if_absent(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[3], ARGV[5], tonumber(ARGV[6]))
end
return 1
"""
)

# Reset idle time if `consumer` still owns the delivery. KEYS: stream; ARGV: group, entry_id, consumer.
# JUSTID: the delivery counter is not incremented.
_LUA_TOUCH = """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if type(p) ~= 'table' or p.err ~= nil or #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""

# Waiting = stream length - pending + delayed. KEYS: stream, delayed; ARGV: group.
_LUA_DEPTH = """
local n = redis.call('XLEN', KEYS[1])
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(p) == 'table' and p.err == nil then n = n - tonumber(p[1]) end
return n + redis.call('ZCARD', KEYS[2])
"""


def _is_nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


def _is_group_lost(exc: ResponseError) -> bool:
    """The stream or its group vanished: NOGROUP, or a blocked XREADGROUP whose key was
    deleted ("UNBLOCKED the stream key no longer exists")."""
    return _is_nogroup(exc) or str(exc).startswith("UNBLOCKED")


class RedisSubscription(Subscription):
    """A pub/sub connection subscribed to one channel or pattern (prefix stripped on receipt)."""

    def __init__(self, client: redis.Redis, prefix: str, channel: str) -> None:
        self._prefix = prefix
        self._pubsub = client.pubsub()
        self._closed = False
        name = prefix + channel
        if is_pattern(channel):
            self._pubsub.psubscribe(name)
            kind = "psubscribe"
        else:
            self._pubsub.subscribe(name)
            kind = "subscribe"
        # wait for the server's confirmation, so a publish right after `subscribe` is seen
        deadline = time.monotonic() + 5.0
        while True:
            reply = self._pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.01))
            if reply is not None and reply["type"] == kind:
                break
            if time.monotonic() >= deadline:
                self._pubsub.close()
                raise TimeoutError(f"no {kind} confirmation for {name!r}")

    def get(self, timeout_s: float = 1.0) -> Event | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while not self._closed:
            remaining = deadline - time.monotonic()
            reply = self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=max(remaining, 0.0)
            )
            if reply is not None and reply["type"] in ("message", "pmessage"):
                channel = reply["channel"]
                if channel.startswith(self._prefix):
                    channel = channel[len(self._prefix) :]
                return Event(channel, json.loads(reply["data"]))
            if remaining <= 0:
                return None
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pubsub.close()

    @property
    def closed(self) -> bool:
        return self._closed


class RedisBroker(Broker):
    """Broker on a Redis server; see `Broker` for the contract and the module doc for keys.

    `client` is the underlying `redis.Redis` (decoded responses), exposed for health checks
    and tests.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "kb:",
        group: str = "workers",
        max_deliveries: int = 5,
        promote_batch: int = 100,
    ) -> None:
        self.client: redis.Redis = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.group = group
        self.max_deliveries = max_deliveries
        self.promote_batch = promote_batch
        self._enqueue = self.client.register_script(_LUA_ENQUEUE)
        self._promote_script = self.client.register_script(_LUA_PROMOTE)
        self._settle_script = self.client.register_script(_LUA_SETTLE)
        self._depth_script = self.client.register_script(_LUA_DEPTH)
        self._touch_script = self.client.register_script(_LUA_TOUCH)
        self._lock = threading.Lock()
        self._groups: set[str] = set()  # queues whose group we created or saw, this process
        self._claim_cursor: dict[str, str] = {}  # XAUTOCLAIM scan position per queue

    # -- keys and helpers --------------------------------------------------------------------

    def _keys(self, queue: str) -> list[str]:
        """stream, delayed, delayed_msg, ids, dead."""
        s = self.prefix + queue
        return [s, s + ":delayed", s + ":delayed:msg", s + ":ids", s + ":dead"]

    def ensure_group(self, queue: str) -> None:
        try:
            # id 0: entries added before the group existed (re-enqueued after a restart) count
            self.client.xgroup_create(self.prefix + queue, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        with self._lock:
            self._groups.add(queue)

    def _grouped(self, queue: str, op: Callable[[], T], default: T) -> T:
        """Run a group command. When the group is gone (NOGROUP: Redis restarted or our keys
        were deleted; UNBLOCKED: the stream was deleted under a blocked read), recreate it and
        return `default`, so the caller's loop simply tries again."""
        if queue not in self._groups:
            self.ensure_group(queue)
        try:
            return op()
        except ResponseError as exc:
            if not _is_group_lost(exc):
                raise
            with self._lock:
                self._groups.discard(queue)
                self._claim_cursor.pop(queue, None)
            self.ensure_group(queue)
            return default

    def _promote(self, queue: str) -> float | None:
        """Move due delayed jobs into the stream; seconds until the next one, or None."""
        k = self._keys(queue)
        ms = int(self._promote_script(keys=k[:4], args=[self.promote_batch]))
        return None if ms < 0 else ms / 1000.0

    def _settle(
        self, queue: str, message: Message, mode: str, raw: str = "", delay_s: float = 0.0
    ) -> None:
        args = [self.group, message.id, message.job_id, mode, raw, int(delay_s * 1000), DEAD_MAXLEN]
        self._settle_script(keys=self._keys(queue), args=args)

    def _bury(self, queue: str, message: Message, error: str) -> None:
        raw = encode_job(message.job_id, message.kind, message.payload, message.attempt, error)
        self._settle(queue, message, "dead", raw)

    def _reclaim(self, queue: str, consumer: str, idle_s: float) -> Message | None:
        """Claim one delivery idle for `idle_s`; bury it if delivered too often."""
        stream = self.prefix + queue
        for _ in range(8):  # a few claims per call, in case the first ones get buried
            start = self._claim_cursor.get(queue, "0-0")
            reply = self._grouped(
                queue,
                lambda start=start: self.client.xautoclaim(
                    stream,
                    self.group,
                    consumer,
                    min_idle_time=int(idle_s * 1000),
                    start_id=start,
                    count=1,
                ),
                ["0-0", [], []],
            )
            self._claim_cursor[queue] = reply[0]
            claimed = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
            if not claimed:
                if reply[0] == "0-0":
                    return None
                continue  # scanned part of a long pending list; go on from the cursor
            entry_id, fields = claimed[0]
            message = decode_job(entry_id, fields["msg"])
            info = self.client.xpending_range(stream, self.group, entry_id, entry_id, 1)
            deliveries = int(info[0]["times_delivered"]) if info else 1
            if deliveries > self.max_deliveries:
                self._bury(
                    queue, message, f"delivered {deliveries - 1} times without acknowledgement"
                )
                continue
            return message
        return None

    def _read_new(self, queue: str, consumer: str, block_ms: int | None) -> Message | None:
        stream = self.prefix + queue
        reply = self._grouped(
            queue,
            lambda: self.client.xreadgroup(
                self.group, consumer, {stream: ">"}, count=1, block=block_ms
            ),
            [],
        )
        for _, entries in reply or []:
            for entry_id, fields in entries:
                if fields:
                    return decode_job(entry_id, fields["msg"])
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
        self._enqueue(keys=self._keys(queue)[:4], args=[job_id, raw, int(delay_s * 1000)])

    def receive(
        self,
        queue: str,
        consumer: str,
        timeout_s: float = 1.0,
        reclaim_idle_s: float | None = 30.0,
    ) -> Message | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            next_due = self._promote(queue)
            if reclaim_idle_s is not None:
                message = self._reclaim(queue, consumer, reclaim_idle_s)
                if message is not None:
                    return message
            # block for new entries until the deadline, the next delayed job or a possible reclaim
            wait = deadline - time.monotonic()
            if next_due is not None:
                wait = min(wait, next_due)
            if reclaim_idle_s is not None:
                wait = min(wait, max(reclaim_idle_s, 0.01))
            block_ms = (
                int(wait * 1000) if wait >= 0.001 else None
            )  # None: don't block (0 = forever)
            message = self._read_new(queue, consumer, block_ms)
            if message is not None:
                return message
            if time.monotonic() >= deadline:
                return None

    def ack(self, queue: str, message: Message) -> None:
        self._settle(queue, message, "ack")

    def touch(self, queue: str, message: Message, consumer: str) -> bool:
        keys = [self.prefix + queue]
        return bool(self._touch_script(keys=keys, args=[self.group, message.id, consumer]))

    def retry(
        self,
        queue: str,
        message: Message,
        error: str,
        max_attempts: int = 3,
        backoff_s: float = 1.0,
    ) -> bool:
        if message.attempt + 1 >= max_attempts:
            self._bury(queue, message, error)
            return False
        raw = encode_job(message.job_id, message.kind, message.payload, message.attempt + 1, error)
        self._settle(queue, message, "retry", raw, backoff_delay(message.attempt, backoff_s))
        return True

    def dead_letters(self, queue: str, limit: int = 100) -> list[Message]:
        if limit <= 0:
            return []
        entries = self.client.xrange(self._keys(queue)[4], "-", "+", count=limit)
        return [decode_job(entry_id, fields["msg"]) for entry_id, fields in entries]

    def pending(self, queue: str) -> int:
        try:
            return int(self.client.xpending(self.prefix + queue, self.group)["pending"])
        except ResponseError as exc:
            if _is_nogroup(exc):
                return 0  # no stream or group (e.g. after a restart): nothing is pending
            raise

    def depth(self, queue: str) -> int:
        k = self._keys(queue)
        return int(self._depth_script(keys=k[:2], args=[self.group]))

    def publish(self, channel: str, data: dict) -> None:
        self.client.publish(self.prefix + channel, json.dumps(data))

    def subscribe(self, channel: str) -> RedisSubscription:
        return RedisSubscription(self.client, self.prefix, channel)

    def close(self) -> None:
        self.client.close()
