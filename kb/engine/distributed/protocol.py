"""The wire protocol between the unique rank (rank 0) and the shared ranks (1..world-1).

Every exchange starts with a fixed-size int64 header broadcast from rank 0, so a shared rank always
knows what comes next and how big it is:

    ATTEND   [op, corpus, layer, T, top_k (0 = dense), Hq, dtype, 0]
             then broadcast q[T, Hq, d] (and chunk_idx[T, Hkv, top_k] int64 when routed);
             then gather to rank 0 of float32 [T, Hq, d + 1] per rank: o and lse side by side
    REGISTER [op, corpus, L, N, Hkv, d, chunk_size, dtype]
             then rank 0 sends each shared rank its slice [2, L, n, Hkv, d] point to point
    LOAD     [op, corpus, L, N, Hkv, d, chunk_size, dtype]
             then broadcast the length and the bytes of a JSON list of the corpus's KV files
             ({"via": dtype, "files": [[path, checksum, tokens], ...]}, in layout order); each
             shared rank reads and verifies only the files its slice overlaps, then a gather of
             one element per rank: 0 when it holds its slice, 1 when it could not read it
    DROP     [op, corpus, 0...]
    PING     [op, 0...] then gather of one element: the idle keep-alive (a collective that waits
             longer than the process group's timeout fails, so an idle link pings)
    SHUTDOWN [op, 0...]

Failure: every collective runs under the process group's timeout. A dead or stuck shared rank makes
rank 0's collective raise (at once when the peer's socket closes, else at the timeout); the link
then names the rank whose heartbeat (a counter each shared rank bumps in the rendezvous store)
stopped, raises `SharedRankError`, and refuses all later work with the same error.

Counters: `ShardLink.stats` (a `CommStats`) counts the ATTEND exchanges and the bytes their messages
carry, from the shapes sent; with `stats.timing` on it also times them (CUDA events on the current
stream, resolved by `CommStats.settle`, or the wall clock on CPU). Counting changes nothing sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

import attention
from kb.engine.distributed.placement import keep_preamble, place, remote_view, slice_kv
from kb.engine.shared_kv import SharedKV

log = logging.getLogger(__name__)

OP_ATTEND, OP_REGISTER, OP_DROP, OP_PING, OP_SHUTDOWN, OP_LOAD = 1, 2, 3, 4, 5, 6
HEADER_LEN = 8
HEARTBEAT_S = 0.5  # how often a shared rank bumps its heartbeat counter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in DTYPES:
        raise TypeError(f"{dtype} cannot travel between ranks (float32, float16 and bfloat16 can)")
    return DTYPES.index(dtype)


class SharedRankError(RuntimeError):
    """A shared rank stopped responding; requests that need its slice of the shared KV fail."""


@dataclass(frozen=True)
class KVFile:
    """One stored KV file of a corpus's layout (k, v [L, tokens, Hkv, d]) and its checksum."""

    path: str
    checksum: str | None
    tokens: int


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class World:
    """This process's place in the job: its rank, the store that carries heartbeats, the device its
    communication buffers live on (CUDA for NCCL, CPU for gloo)."""

    rank: int
    world_size: int
    store: dist.Store
    device: torch.device
    timeout_s: float

    @property
    def shared_ranks(self) -> list[int]:
        return list(range(1, self.world_size))

    def heartbeat_key(self, rank: int) -> str:
        return f"heartbeat/{rank}"


def init_world(
    init_method: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
    backend: str | None = None,
    timeout_s: float = 60.0,
    device: str | None = None,
) -> World:
    """Join the job (torchrun's env://, or tcp:// / file:// for tests) and start the process group.

    The rendezvous store is kept (under a prefix) for heartbeats, so a dead rank can be named.
    Backend: NCCL when CUDA is available, else gloo.
    """
    kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
    store, rank, world_size = next(
        dist.rendezvous(init_method, timeout=timedelta(seconds=timeout_s), **kwargs)
    )
    store.set_timeout(timedelta(seconds=timeout_s))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if device is None:
        if backend == "nccl":
            device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        else:
            device = "cpu"
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("pg", store),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return World(rank, world_size, dist.PrefixStore("kb", store), torch.device(device), timeout_s)


def header(op: int, *fields: int, device: torch.device) -> torch.Tensor:
    """The 8-int64 message header on `device`. On a GPU it is staged in pinned memory and copied
    without blocking: a pageable copy would make the host wait for the stream every layer."""
    values = [op, *fields] + [0] * (HEADER_LEN - 1 - len(fields))
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64)
    return torch.tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


@dataclass
class CommStats:
    """What the link's ATTEND exchanges carried, from the shapes sent (bytes), and optionally how long
    they took on rank 0 (`timing`): from before the header is made until the gather has returned, so
    the header's copy to the device, the collectives' launches and the waits for the shared ranks count.

    bytes_out: header + q + chunk ids, once per shared rank that receives them (a broadcast to S ranks
    counts S times); bytes_in: the float32 partials gathered from the shared ranks."""

    timing: bool = False
    exchanges: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    _pending: list = field(default_factory=list, repr=False)

    def start(self, device: torch.device):
        if not self.timing:
            return None
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, mark) -> None:
        if mark is None:
            return
        if isinstance(mark, float):
            self.seconds += time.perf_counter() - mark
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((mark, end))

    def settle(self) -> CommStats:
        """Add the recorded CUDA event pairs to `seconds` (waits for them); returns self."""
        for a, b in self._pending:
            b.synchronize()
            self.seconds += a.elapsed_time(b) / 1e3
        self._pending.clear()
        return self

    def snapshot(self) -> dict:
        self.settle()
        return {
            "exchanges": self.exchanges,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "seconds": self.seconds,
        }


class ShardLink:
    """Rank 0's side: registers corpora on the shared ranks and asks them for partial attention.

    One lock serializes exchanges (the engine thread and the keep-alive thread share the group).
    """

    def __init__(self, world: World, keepalive_s: float | None = None):
        assert world.rank == 0, "the link lives on the unique rank (rank 0)"
        self.world = world
        self._lock = threading.Lock()
        self._next_id = 0
        self._error: SharedRankError | None = None
        self._last = time.monotonic()
        self._closed = threading.Event()
        self.stats = CommStats()
        interval = world.timeout_s / 4 if keepalive_s is None else keepalive_s
        self._pinger = threading.Thread(
            target=self._keepalive, args=(interval,), name="kb-shard-ping", daemon=True
        )
        self._pinger.start()

    # -- public ------------------------------------------------------------------------------
    def register(self, shared: SharedKV) -> SharedKV:
        """Place a corpus's KV across the shared ranks and send each its slice; returns the view the
        engine registers on this rank (router and shapes only), its passage selector keeping its
        own copy of the preamble's KV (`keep_preamble`)."""
        placement = place(shared.num_tokens, shared.chunk_size, self.world.shared_ranks)
        k0, dev = shared.k[0], self.world.device
        code = dtype_code(
            k0.dtype
        )  # checked before anything travels: a bad dtype is no rank failure
        with self._exchange("registering corpus " + shared.key):
            cid = self._next_id
            self._next_id += 1
            dist.broadcast(
                header(
                    OP_REGISTER,
                    cid,
                    len(shared.k),
                    k0.shape[0],
                    k0.shape[1],
                    k0.shape[2],
                    shared.chunk_size,
                    code,
                    device=dev,
                ),
                src=0,
            )
            for s in placement.shards:
                for part in slice_kv(shared, s):  # layer by layer: no stacked copy of the corpus
                    dist.send(part.to(dev), dst=s.rank)
        keep_preamble(shared)  # the view shares this selector and drops the KV: copy it first
        return remote_view(shared, placement, cid)

    def load(
        self, shared: SharedKV, files: list[KVFile], via: torch.dtype
    ) -> tuple[SharedKV, bool]:
        """As `register`, but each shared rank reads its slice from the KV store itself: rank 0
        sends the list of the layout's files (`files`, in order; `via` the dtype they are laid
        out in before the served dtype, `shared.k`'s), each rank reads and verifies only the
        files its slice overlaps. When a rank cannot (no shared file system, a file changed),
        the slices are dropped and sent from here by `register`. Returns the view and whether
        the ranks read their slices themselves."""
        placement = place(shared.num_tokens, shared.chunk_size, self.world.shared_ranks)
        assert sum(f.tokens for f in files) == shared.num_tokens, "files do not cover the corpus"
        k0, dev = shared.k[0], self.world.device
        code = dtype_code(k0.dtype)
        spec = {"via": dtype_name(via), "files": [[f.path, f.checksum, f.tokens] for f in files]}
        payload = torch.frombuffer(bytearray(json.dumps(spec).encode()), dtype=torch.uint8)
        with self._exchange("loading corpus " + shared.key):
            cid = self._next_id
            self._next_id += 1
            dims = (len(shared.k), k0.shape[0], k0.shape[1], k0.shape[2], shared.chunk_size)
            dist.broadcast(header(OP_LOAD, cid, *dims, code, device=dev), src=0)
            size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
            dist.broadcast(size, src=0)
            dist.broadcast(payload.to(dev), src=0)
            status = [torch.zeros(1, device=dev) for _ in range(self.world.world_size)]
            dist.gather(torch.zeros(1, device=dev), status, dst=0)
        failed = [r for r in self.world.shared_ranks if status[r].item() != 0]
        view = remote_view(shared, placement, cid)
        if failed:
            log.warning(
                "corpus %s: shared ranks %s could not read their slices from the KV store; "
                "sending them from rank 0",
                shared.key,
                failed,
            )
            self.drop(view)
            return self.register(shared), False
        keep_preamble(shared)  # the view shares this selector and drops the KV: copy it first
        return view, True

    def drop(self, view: SharedKV) -> None:
        """Free a corpus's slices on the shared ranks."""
        with self._exchange("dropping corpus " + view.key):
            dist.broadcast(header(OP_DROP, view.meta.corpus_id, device=self.world.device), src=0)

    def shared_attention(
        self,
        view: SharedKV,
        layer: int,
        q: torch.Tensor,
        chunk_idx: torch.Tensor | None,
        chunk_shift: torch.Tensor | None = None,
        rope_inv_freq: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q[T, Hq, d] against the whole sharded corpus (dense, or routed by global chunk_idx
        [T, Hkv, k], each listed chunk shifted by chunk_shift [T, Hkv, k] when given: virtual
        positions, which need the model's RoPE frequencies): each shared rank attends its slice,
        and the partials merge by log-sum-exp. Returns (o[T, Hq, d] in q's dtype, lse[T, Hq]
        float32), as `attention.shared_attention`."""
        t, hq, d = q.shape
        dev = self.world.device
        top_k = 0 if chunk_idx is None else chunk_idx.shape[-1]
        shifted = int(chunk_idx is not None and chunk_shift is not None)
        assert not shifted or rope_inv_freq is not None, "shifted chunks need the RoPE frequencies"
        code = dtype_code(
            q.dtype
        )  # raised here, outside the exchange: a bad dtype is no rank failure
        stats, receivers = self.stats, self.world.world_size - 1
        with self._exchange(f"attention of layer {layer} on corpus {view.key}"):
            mark = stats.start(dev)
            head = header(
                OP_ATTEND, view.meta.corpus_id, layer, t, top_k, hq, code, shifted, device=dev
            )
            dist.broadcast(head, src=0)
            dist.broadcast(q.contiguous().to(dev), src=0)
            if chunk_idx is not None:
                dist.broadcast(chunk_idx.to(device=dev, dtype=torch.int64).contiguous(), src=0)
            if shifted:
                dist.broadcast(chunk_shift.to(device=dev, dtype=torch.int64).contiguous(), src=0)
                dist.broadcast(rope_inv_freq.to(device=dev, dtype=torch.float32), src=0)
            mine = torch.empty(t, hq, d + 1, dtype=torch.float32, device=dev)
            parts = [torch.empty_like(mine) for _ in range(self.world.world_size)]
            dist.gather(mine, parts, dst=0)
            stats.stop(mark)
            stats.exchanges += 1
            sent = HEADER_LEN * 8 + q.numel() * q.element_size()
            if chunk_idx is not None:
                sent += chunk_idx.numel() * 8 * (1 + shifted) + shifted * 4 * (d // 2)
            stats.bytes_out += receivers * sent
            stats.bytes_in += receivers * mine.numel() * mine.element_size()
        o = torch.zeros(t, hq, d, dtype=q.dtype, device=q.device)
        lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
        for p in parts[1:]:
            p = p.to(q.device)
            o, lse = attention.merge(o, lse, p[..., :d].to(q.dtype), p[..., d])
        return o, lse

    def ping(self) -> None:
        """One round trip with every shared rank (raises SharedRankError if one is gone)."""
        with self._exchange("keep-alive"):
            dev = self.world.device
            dist.broadcast(header(OP_PING, device=dev), src=0)
            dist.gather(
                torch.zeros(1, device=dev),
                [torch.zeros(1, device=dev) for _ in range(self.world.world_size)],
                dst=0,
            )

    def shutdown(self) -> None:
        """Tell the shared ranks to exit (skipped when one is already known to be gone, and
        when shut down already)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            if self._error is None:
                try:
                    dist.broadcast(header(OP_SHUTDOWN, device=self.world.device), src=0)
                except Exception as e:  # noqa: BLE001 - shutting down anyway
                    log.warning("shutdown header did not reach every shared rank: %s", e)

    @property
    def error(self) -> SharedRankError | None:
        return self._error

    # -- internals ---------------------------------------------------------------------------
    def _exchange(self, what: str) -> _Exchange:
        return _Exchange(self, what)

    def _fail(self, what: str, cause: BaseException) -> SharedRankError:
        stale = self._stale_ranks()
        if stale:
            who = ", ".join(str(r) for r in stale)
            msg = (
                f"shared rank {who} stopped responding during {what}; its slice of the shared KV is "
                f"unavailable, so requests over it fail ({type(cause).__name__}: {cause})"
            )
        else:
            msg = (
                f"a shared rank did not answer within {self.world.timeout_s:g}s during {what}, though "
                f"all heartbeats are alive ({type(cause).__name__}: {cause})"
            )
        self._error = SharedRankError(msg)
        self._closed.set()
        return self._error

    def _stale_ranks(self) -> list[int]:
        """Shared ranks whose heartbeat counter did not move over a few heartbeat periods."""
        store = self.world.store
        try:
            before = {r: store.add(self.world.heartbeat_key(r), 0) for r in self.world.shared_ranks}
            time.sleep(4 * HEARTBEAT_S)
            after = {r: store.add(self.world.heartbeat_key(r), 0) for r in self.world.shared_ranks}
        except Exception as e:  # noqa: BLE001 - the store itself may be gone with its host
            log.warning("cannot read heartbeats: %s", e)
            return []
        return [r for r in self.world.shared_ranks if after[r] == before[r]]

    def _keepalive(self, interval: float) -> None:
        while not self._closed.wait(interval / 2):
            if time.monotonic() - self._last < interval:
                continue
            try:
                self.ping()
            except SharedRankError as e:
                log.error("%s", e)
                return


class _Exchange:
    """Holds the link's lock for one exchange; turns any communication failure into SharedRankError."""

    def __init__(self, link: ShardLink, what: str):
        self.link, self.what = link, what

    def __enter__(self) -> None:
        self.link._lock.acquire()
        if self.link._error is not None:
            self.link._lock.release()
            raise self.link._error

    def __exit__(self, typ, exc, tb) -> bool:
        try:
            self.link._last = time.monotonic()
            if exc is not None and not isinstance(exc, SharedRankError):
                raise self.link._fail(self.what, exc) from exc
            return False
        finally:
            self.link._lock.release()
