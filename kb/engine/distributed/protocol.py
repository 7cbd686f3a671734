"""The wire protocol between the unique rank (rank 0) and the shared ranks (1..world-1).

Every exchange starts with a fixed-size int64 header broadcast from rank 0, so a shared rank always
knows what comes next and how big it is:

    ATTEND   [op, corpus, layer, T, top_k (0 = dense), Hq, dtype, meta]
             then broadcast q[T, Hq, d]; when routed, chunk_idx[T, Hkv, top_k] int32 (and,
             for chunks at virtual positions, chunk_shift int32 and the RoPE frequencies),
             unless `meta` says the rank has them already this step; then gather to rank 0 of
             one 16-bit tensor [T, Hq, d + 2] per rank: o in the wire dtype (`wire_dtype`:
             bfloat16 for a bfloat16 computation, else float16) and the float32 lse's bits in
             the last two slots (`pack_partial`). When shared ranks share a host other than
             rank 0's (`MergeRoutes`), the partials travel point to point instead (tag
             `PARTIAL_TAG`): each such rank sends its partial to its host's leader, which merges
             them with its own by log-sum-exp and sends rank 0 one partial for the host; every
             other rank sends its own to rank 0
             meta bits: 1 shifted, 2 reuse slot, 4 keep in slot, 8 a new step (forget the
             slots), 16 keep q for this layer's MASS, slot = meta >> 5. A request's chosen
             passages (attention retrieval) are the same chunk ids and shifts at every layer of
             a step: they travel at its first layer only (`steady`); the router's ids differ per
             layer and travel every layer
    MASS     [op, corpus, layer, T, Hq, U, skip, 0]: citation mass at a citation layer, after
             rank 0 has merged that layer's partials with its unique attention. Then broadcast
             of one float32 [T, Hq + 1]: the merged attention's lse (the normalizer of every
             key a query saw) and, last, each row's owner (its request, 0..U-1, exact as a
             float); each shared rank computes `attention.chunk_mass` of the q it kept from
             this corpus's ATTEND of the layer (meta bit 16) over its slice, the first `skip`
             tokens of the corpus (the preamble) counting nothing, sums it per owner and sends
             [U, C_max] float32 in rank 0's gather (C_max: the largest slice's chunks, padded
             with zeros); rank 0 lays the slices side by side in chunk order ([U, C]). A
             concatenation, not a merge: it goes straight to rank 0 whatever `MergeRoutes` say
    REGISTER [op, corpus, L, N, Hkv, d, chunk_size, dtype]
             then rank 0 sends each shared rank its slice [2, L, n, Hkv, d] point to point
    LOAD     [op, corpus, L, N, Hkv, d, chunk_size, dtype]
             then broadcast the length and the bytes of a JSON list of the corpus's KV files
             ({"via": dtype, "files": [[path, checksum, tokens], ...]}, in layout order); each
             shared rank reads and verifies only the files its slice overlaps, then a gather of
             one element per rank: 0 when it holds its slice, 1 when it could not read it; then
             a broadcast of one int64 per group rank: 1 where rank 0 now sends that rank its
             slice (read from the same files), point to point as REGISTER does, -1 everywhere
             when rank 0 cannot read them either (every rank forgets the corpus)
    DROP     [op, corpus, 0...]
    PING     [op, 0...] then gather of one element: the idle keep-alive (a collective that waits
             longer than the process group's timeout fails, so an idle link pings)
    REGROUP  [op, 0...]: leave this group for the lobby (a rank came back, a new group forms)
    SHUTDOWN [op, 0...]

Overlap: rank 0 issues an ATTEND's broadcasts and the receipt of its partials without waiting
(`async_op`), runs the layer's unique attention meanwhile, then waits (`PendingAttention`); the
link's lock is held from the first ATTEND of a layer until its last is collected
(`ShardLink.attention_batch`), and a wait that fails is a failed exchange like any other.

Hosts: every rank publishes its host id in the store at `init_world` (`host/{rank}`: the
environment's `KB_HOST_ID`, else the host name); rank 0 makes each generation's `MergeRoutes` from
them and publishes them with it (`gen/{g}/routes`), so both sides route the partials alike.

Membership: the process group is one *generation* of the job. Generation g's group is rank 0
and the shared ranks rank 0 admitted to it, over its own prefix (`pg{g}`) of the rendezvous
store; group rank i is the i-th of [0, *members]. A shared rank without a group (just started,
restarted, or its group failed) takes a ticket in the lobby (`lobby/{rank}`, a counter in the
store) and waits until rank 0 publishes a generation that admits that ticket (`gen/{g}`: rank ->
ticket; `gen`: the newest g); then both sides build the group (`form_group`). Rank 0 forms a
generation at start (waiting up to the timeout for every shared rank), after a failure (over
the survivors) and when a rank is back in the lobby (the members leave on REGROUP and come back
with it). Corpus ids outlive generations: after each, `ShardLink` places every corpus it holds
again over the new members (LOAD from its files, or REGISTER from the tensors it kept).

Failure: every collective runs under the process group's timeout. A dead or stuck shared rank makes
rank 0's collective raise (at once when the peer's socket closes, else at the timeout); the link
names the rank whose heartbeat (a counter each shared rank bumps in the rendezvous store)
stopped, raises `SharedRankError` for that exchange, leaves the group (which closes its sockets,
so the survivors' waits fail at once and they go to the lobby) and forms the next generation
over the survivors. When none is left, or the survivors' memory (`rank_budget_bytes` each)
cannot hold the corpora, the link is `down`: it refuses work with the error until a rank comes
back (the corpus cache serves from rank 0 meanwhile).

Counters: `ShardLink.stats` (a `CommStats`) counts the ATTEND and MASS exchanges and the bytes
their messages carry, from the shapes sent; with `stats.timing` on it also times them (CUDA events
on the current stream, resolved by `CommStats.settle`, or the wall clock on CPU). Counting changes
nothing sent.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

import attention
from kb.engine.distributed.placement import (
    Placement,
    keep_preamble,
    place,
    read_slice,
    remote_view,
    slice_kv,
)
from kb.engine.shared_kv import SharedKV

log = logging.getLogger(__name__)

OP_ATTEND, OP_REGISTER, OP_DROP, OP_PING, OP_SHUTDOWN, OP_LOAD, OP_REGROUP = 1, 2, 3, 4, 5, 6, 7
OP_MASS = 8
HEADER_LEN = 8
HEARTBEAT_S = 0.5  # how often a shared rank bumps its heartbeat counter
LOBBY_POLL_S = 0.05  # how often a rank in the lobby looks for its generation
GEN_KEY, SHUTDOWN_KEY = "gen", "shutdown"
HOST_ENV = "KB_HOST_ID"  # overrides the host name as this rank's host id (tests: several on one)
PARTIAL_TAG = 17  # point-to-point partials (per-host merge); REGISTER's slices use tag 0

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
    """This process's place in the job: its rank (its name across generations), the store that
    carries heartbeats and membership (`store`, under a prefix of `rendezvous`), the device its
    communication buffers live on (CUDA for NCCL, CPU for gloo) and the backend its groups use."""

    rank: int
    world_size: int
    store: dist.Store
    device: torch.device
    timeout_s: float
    backend: str = "gloo"
    rendezvous: dist.Store | None = None

    @property
    def shared_ranks(self) -> list[int]:
        return list(range(1, self.world_size))

    def heartbeat_key(self, rank: int) -> str:
        return f"heartbeat/{rank}"


def lobby_key(rank: int) -> str:
    return f"lobby/{rank}"


def generation_key(generation: int) -> str:
    return f"gen/{generation}"


def routes_key(generation: int) -> str:
    return f"gen/{generation}/routes"


def host_key(rank: int) -> str:
    return f"host/{rank}"


def host_id() -> str:
    """This process's host: `KB_HOST_ID` when set (several simulated hosts on one machine),
    else the host name (ranks started by one torchrun agent share it)."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


@dataclass(frozen=True)
class MergeRoutes:
    """Where each shared rank of a generation sends its ATTEND partial: `to[rank]` is 0 (rank 0
    itself) or the leader of its host (the host's lowest rank), which merges the partials of its
    host's ranks and sends rank 0 one. Ranks on rank 0's host, and a rank alone on its host, send
    to rank 0. With no leader merging (`merging` false) the partials travel as one gather."""

    to: dict[int, int]

    @property
    def merging(self) -> bool:
        return any(dst != 0 for dst in self.to.values())

    @property
    def direct(self) -> list[int]:
        """The ranks whose partial rank 0 receives (its host's ranks and the leaders)."""
        return sorted(r for r, dst in self.to.items() if dst == 0)

    def followers(self, rank: int) -> list[int]:
        """The ranks whose partial `rank` merges (none unless it leads a host)."""
        return sorted(r for r, dst in self.to.items() if dst == rank)

    def to_json(self) -> str:
        return json.dumps({str(r): dst for r, dst in self.to.items()})

    @classmethod
    def from_json(cls, text: str) -> MergeRoutes:
        return cls({int(r): int(dst) for r, dst in json.loads(text).items()})


def merge_routes(members: list[int], hosts: dict[int, str]) -> MergeRoutes:
    """The routes of a generation over `members`, from each rank's host id (`hosts`, rank 0's
    included): ranks on rank 0's host send to it; on every other host the lowest rank leads."""
    home, by_host = hosts.get(0), {}
    for r in sorted(members):
        by_host.setdefault(hosts.get(r, f"rank {r}"), []).append(r)
    to = {}
    for host, ranks in by_host.items():
        for r in ranks:
            to[r] = 0 if host == home or r == ranks[0] else ranks[0]
    return MergeRoutes(to)


def init_world(
    init_method: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
    backend: str | None = None,
    timeout_s: float = 60.0,
    device: str | None = None,
) -> World:
    """Join the job's rendezvous (torchrun's env://, or tcp:// / file:// for tests); no process
    group yet: `ShardLink` (rank 0) and `run_shared_rank` form one per generation (`form_group`).
    A shared rank restarted while the job runs joins the same way. Backend: NCCL when CUDA is
    available, else gloo."""
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
    kb_store = dist.PrefixStore("kb", store)
    kb_store.set(host_key(rank), host_id())  # before the lobby: every generation can read it
    return World(rank, world_size, kb_store, torch.device(device), timeout_s, backend, store)


def form_group(world: World, generation: int, members: list[int]) -> None:
    """Build generation `generation`'s process group (torch.distributed's default group): rank 0
    and the shared ranks `members`, group rank i the i-th of [0, *members], over the store prefix
    `pg{generation}`. Every one of them calls this; it returns when all have (or raises at the
    timeout). A group this process was in is left first."""
    leave_group()
    dist.init_process_group(
        world.backend,
        store=dist.PrefixStore(f"pg{generation}", world.rendezvous),
        rank=[0, *members].index(world.rank),
        world_size=1 + len(members),
        timeout=timedelta(seconds=world.timeout_s),
    )


def leave_group() -> None:
    """Leave the current process group, if any: its sockets close, so peers waiting on this
    process fail at once instead of at their timeout."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - a broken group is left all the same
            log.warning("leaving the process group: %s", e)


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype partial outputs travel in: bfloat16 for a bfloat16 computation, else
    float16 (a float32 or float16 one: o is a convex combination of values, well inside
    float16's range, with 3 more mantissa bits than bfloat16)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def pack_partial(o: torch.Tensor, lse: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    """One partial as it travels: [T, Hq, d + 2] in `wire`, o rounded to it and the float32
    lse[T, Hq] kept exactly, its 4 bytes in the last two 16-bit slots."""
    bits = lse.to(torch.float32).contiguous().unsqueeze(-1).view(wire)  # [T, Hq, 2]
    return torch.cat([o.to(wire), bits], dim=-1)


def unpack_partial(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o[T, Hq, d] in the wire dtype, lse[T, Hq] float32) of a packed partial."""
    return part[..., :-2], part[..., -2:].contiguous().view(torch.float32).squeeze(-1)


def merge_partials(parts: list[torch.Tensor], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed partials of the shared ranks merged by log-sum-exp: (o in q's dtype and on
    its device, lse float32); none: o = 0, lse = -inf."""
    t, hq, d = q.shape
    o = torch.zeros(t, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for p in parts:
        po, plse = unpack_partial(p.to(q.device))
        o, lse = attention.merge(o, lse, po.to(q.dtype), plse)
    return o, lse


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
    they took on rank 0 (`timing`): `seconds` from before the header is made until the partials have
    arrived, so the header's copy to the device, the collectives' launches, the unique attention run
    meanwhile (overlap) and the waits for the shared ranks count; `wait_seconds` only the wait for the
    partials after the unique attention (what the overlap did not hide; on a GPU the stall of the
    compute stream, between events on it before and after the wait).

    bytes_out: header + q + chunk ids, once per shared rank that receives them (a broadcast to S ranks
    counts S times); bytes_in: the 16-bit partials rank 0 receives (one per shared rank, or one per
    host where a host's leader merges its ranks' partials: those cross no link to rank 0).
    MASS exchanges (citation mass) count in `mass_exchanges`, not `exchanges`; their bytes (header,
    lse and owners out, the padded [U, C_max] float32 mass in, per shared rank) and time (in
    `seconds`) count with the ATTENDs'."""

    timing: bool = False
    exchanges: int = 0
    mass_exchanges: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    _pending: list = field(default_factory=list, repr=False)

    def start(self, device: torch.device):
        if not self.timing:
            return None
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, mark, into: str = "seconds") -> None:
        if mark is None:
            return
        if isinstance(mark, float):
            setattr(self, into, getattr(self, into) + time.perf_counter() - mark)
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((mark, end, into))

    def settle(self) -> CommStats:
        """Add the recorded CUDA event pairs to their counters (waits for them); returns self."""
        for a, b, into in self._pending:
            b.synchronize()
            setattr(self, into, getattr(self, into) + a.elapsed_time(b) / 1e3)
        self._pending.clear()
        return self

    def snapshot(self) -> dict:
        self.settle()
        return {
            "exchanges": self.exchanges,
            "mass_exchanges": self.mass_exchanges,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "seconds": self.seconds,
            "wait_seconds": self.wait_seconds,
        }


@dataclass
class _Held:
    """What the link needs to place a corpus again over new members: its shape and dtype, and
    either its KV files (`load`) or the tensors it was registered from (`register`)."""

    key: str
    dims: tuple[int, int, int, int, int]  # L, N, Hkv, d, chunk_size
    code: int
    spec: dict | None = None  # load: {"via", "files"}
    source: SharedKV | None = None  # register(keep=True)

    @property
    def token_bytes(self) -> int:
        layers, _, hkv, d, _ = self.dims
        return 2 * layers * hkv * d * DTYPES[self.code].itemsize


@dataclass(frozen=True)
class Attend:
    """One ATTEND: q[T, Hq, d] against layer `layer` of a sharded corpus, dense or routed by
    global chunk_idx [T, Hkv, k], each listed chunk shifted by chunk_shift [T, Hkv, k] when given
    (virtual positions, which need the model's RoPE frequencies); `steady`: chunk_idx and
    chunk_shift are the same tensors at every layer of this step (sent once per step); `cites`:
    the shared ranks keep q for this layer's citation mass (`AttentionBatch.chunk_mass`)."""

    view: SharedKV
    layer: int
    q: torch.Tensor
    chunk_idx: torch.Tensor | None = None
    chunk_shift: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None
    steady: bool = False
    cites: bool = False


class ShardLink:
    """Rank 0's side: forms the generations' groups, places corpora on their shared ranks and asks
    them for partial attention.

    One lock serializes exchanges (the engine thread and the keeper thread share the group); a
    layer's ATTENDs hold it from the first's start to the last's wait (`attention_batch`).
    The keeper pings an idle link and takes back a shared rank that waits in the lobby.
    `overlap`: the serving step runs the unique attention while the shared ranks attend (off:
    `KB_SHARED_OVERLAP=0`, each partial is waited for as soon as it is asked for).
    `rank_budget_bytes`: what one shared rank may hold; after a loss, the corpora are placed
    over the survivors only when each keeps within it (else the link is `down`).
    """

    def __init__(
        self,
        world: World,
        keepalive_s: float | None = None,
        rank_budget_bytes: int | None = None,
    ):
        assert world.rank == 0, "the link lives on the unique rank (rank 0)"
        self.world = world
        self.rank_budget_bytes = rank_budget_bytes
        self._lock = threading.Lock()
        self._next_id = 0
        self._error: SharedRankError | None = None  # the last failure, while a rank is missing
        self._down: SharedRankError | None = None  # set while the link cannot serve
        self._last = time.monotonic()
        self._closed = threading.Event()
        self.stats = CommStats()
        self.generation = -1
        self.members: list[int] = []  # shared ranks of the current generation
        self.routes = MergeRoutes({})  # where the current generation's partials go
        self.overlap = os.environ.get("KB_SHARED_OVERLAP", "1") != "0"
        self._admitted: dict[int, int] = {}  # rank -> the lobby ticket its generation admitted
        self._held: dict[int, _Held] = {}
        self._placements: dict[int, Placement] = {}
        self._sent_from_here: dict[int, list[int]] = {}  # cid -> ranks sent their slice by rank 0
        self._group_ok = False  # whether the current generation's group formed (and still works)
        self._step_meta: dict[int, tuple[int, torch.Tensor, torch.Tensor | None]] = {}
        self._cited: dict[int, tuple[int, int]] = {}  # cid -> (layer, T) of its last citing q
        self._new_step = True  # the next ATTEND tells the ranks to forget their slots
        with self._lock:
            self._reform(world.shared_ranks, "start")
        interval = world.timeout_s / 4 if keepalive_s is None else keepalive_s
        self._keeper = threading.Thread(
            target=self._keep, args=(interval,), name="kb-shard-keeper", daemon=True
        )
        self._keeper.start()

    # -- public ------------------------------------------------------------------------------
    def register(self, shared: SharedKV, keep: bool = True) -> SharedKV:
        """Place a corpus's KV across the shared ranks and send each its slice; returns the view the
        engine registers on this rank (router and shapes only), its passage selector keeping its
        own copy of the preamble's KV (`keep_preamble`). `keep`: hold on to `shared`'s tensors
        (no copy) to place them again after a membership change; without it the corpus is
        forgotten then (its view's questions fail and the caller registers it again)."""
        k0 = shared.k[0]
        code = dtype_code(k0.dtype)  # checked before anything travels: no rank failure
        dims = (len(shared.k), k0.shape[0], k0.shape[1], k0.shape[2], shared.chunk_size)
        held = _Held(shared.key, dims, code, source=shared)
        with self._exchange("registering corpus " + shared.key):
            cid = self._new_id()
            placement = self._place(cid, held)
            if not keep:
                held.source = None
            self._held[cid] = held
        keep_preamble(shared)  # the view shares this selector and drops the KV: copy it first
        return remote_view(shared, placement, cid)

    def load(
        self, shared: SharedKV, files: list[KVFile], via: torch.dtype, in_memory: bool = True
    ) -> tuple[SharedKV, bool]:
        """As `register`, but each shared rank reads its slice from the KV store itself: rank 0
        sends the list of the layout's files (`files`, in order; `via` the dtype they are laid
        out in before the served dtype, `shared.k`'s), each rank reads and verifies only the
        files its slice overlaps. A rank that cannot (no shared file system, a file changed) is
        sent its slice from here: from `shared`'s tensors (`in_memory`), else read from the
        same files (`shared` may then be a view of meta tensors: rank 0 holds no layout).
        Returns the view and whether every rank read its slice itself. The link keeps the file
        list, to place the corpus again after a membership change."""
        assert sum(f.tokens for f in files) == shared.num_tokens, "files do not cover the corpus"
        k0 = shared.k[0]
        code = dtype_code(k0.dtype)
        dims = (len(shared.k), k0.shape[0], k0.shape[1], k0.shape[2], shared.chunk_size)
        spec = {"via": dtype_name(via), "files": [[f.path, f.checksum, f.tokens] for f in files]}
        held = _Held(shared.key, dims, code, spec=spec)
        try:
            with self._exchange("loading corpus " + shared.key):
                cid = self._new_id()
                placement = self._place(cid, held, shared if in_memory else None)
                self._held[cid] = held
        except _Unreadable as e:  # no rank failed: the files are damaged or gone
            raise e.__cause__ from None
        keep_preamble(shared)  # the view shares this selector and drops the KV: copy it first
        return remote_view(shared, placement, cid), not self._sent_from_here.pop(cid, [])

    def drop(self, view: SharedKV) -> None:
        """Free a corpus's slices on the shared ranks."""
        cid = view.meta.corpus_id
        with self._exchange("dropping corpus " + view.key):
            if self._held.pop(cid, None) is None:
                return  # not held (forgotten after a membership change): nothing there
            self._placements.pop(cid, None)
            dist.broadcast(header(OP_DROP, cid, device=self.world.device), src=0)

    def holds(self, view: SharedKV) -> bool:
        """Whether the shared ranks hold this view's corpus now (a membership change that could
        not place it again forgets it)."""
        return view.meta.corpus_id in self._held and self._down is None

    def placement(self, view: SharedKV) -> Placement | None:
        """Where the corpus's chunks are in the current generation (None when not held)."""
        return self._placements.get(view.meta.corpus_id) if self.holds(view) else None

    def begin_step(self) -> None:
        """A new serving step: routing metadata kept for its layers (`steady`) is forgotten."""
        self._new_step = True

    def shared_attention(
        self,
        view: SharedKV,
        layer: int,
        q: torch.Tensor,
        chunk_idx: torch.Tensor | None,
        chunk_shift: torch.Tensor | None = None,
        rope_inv_freq: torch.Tensor | None = None,
        steady: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q[T, Hq, d] against the whole sharded corpus (dense, or routed by global chunk_idx
        [T, Hkv, k], each listed chunk shifted by chunk_shift [T, Hkv, k] when given: virtual
        positions, which need the model's RoPE frequencies): each shared rank attends its slice,
        and the partials merge by log-sum-exp. Returns (o[T, Hq, d] in q's dtype, lse[T, Hq]
        float32), as `attention.shared_attention`; o travels in 16 bits (`wire_dtype`).
        `steady`: chunk_idx and chunk_shift are the same tensors at every layer of this step (a
        request's chosen passages): sent once per step (`begin_step` starts one).
        Waits for the partials; `attention_batch` starts several and collects them later."""
        with self.attention_batch() as batch:
            return batch.start(
                Attend(view, layer, q, chunk_idx, chunk_shift, rope_inv_freq, steady)
            ).wait()

    def attention_batch(self) -> AttentionBatch:
        """The exchange of one layer's ATTENDs (a context): `start` sends one and returns at once,
        its `wait` collects the merged partial; the lock is held until the batch closes."""
        return AttentionBatch(self)

    def _issue(self, a: Attend) -> PendingAttention:
        """(Lock held.) Send one ATTEND (header, q, chunk ids) and post the receipt of its
        partials, all without waiting: a gather, or with per-host merging (`routes`) one receive
        per rank that sends rank 0 a partial."""
        view, layer, q, chunk_idx, chunk_shift = a.view, a.layer, a.q, a.chunk_idx, a.chunk_shift
        t, hq, d = q.shape
        dev = self.world.device
        top_k = 0 if chunk_idx is None else chunk_idx.shape[-1]
        shifted = int(chunk_idx is not None and chunk_shift is not None)
        code, wire = dtype_code(q.dtype), wire_dtype(q.dtype)
        cid = view.meta.corpus_id
        if cid not in self._held:
            raise SharedRankError(
                f"corpus {view.key} is no longer on the shared ranks (they changed and it "
                "could not be placed again); this answer failed, retry"
            )
        meta, send_ids = shifted, chunk_idx is not None
        if self._new_step:
            self._step_meta.clear()
            meta |= 8
            self._new_step = False
        if chunk_idx is not None and a.steady:
            known = self._step_meta.get(id(chunk_idx))
            if known is not None and known[1] is chunk_idx and known[2] is chunk_shift:
                meta |= 2 | known[0] << 5
                send_ids = False
            else:
                slot = len(self._step_meta)
                self._step_meta[id(chunk_idx)] = (slot, chunk_idx, chunk_shift)
                meta |= 4 | slot << 5
        if a.cites:  # the ranks keep this q for the layer's MASS (the last one per corpus)
            meta |= 16
            self._cited[cid] = (layer, t)
        mark = self.stats.start(dev)
        works, sent_tensors = [], []

        def broadcast(x: torch.Tensor) -> None:
            sent_tensors.append(x)  # alive until the broadcast is done
            works.append(dist.broadcast(x, src=0, async_op=True))

        broadcast(header(OP_ATTEND, cid, layer, t, top_k, hq, code, meta, device=dev))
        broadcast(q.contiguous().to(dev))
        sent = HEADER_LEN * 8 + q.numel() * q.element_size()
        if send_ids:
            broadcast(chunk_idx.to(device=dev, dtype=torch.int32).contiguous())
            sent += chunk_idx.numel() * 4
            if shifted:
                broadcast(chunk_shift.to(device=dev, dtype=torch.int32).contiguous())
                broadcast(a.rope_inv_freq.to(device=dev, dtype=torch.float32))
                sent += chunk_shift.numel() * 4 + 4 * (d // 2)
        mine = torch.empty(t, hq, d + 2, dtype=wire, device=dev)
        if self.routes.merging:
            parts = [torch.empty_like(mine) for _ in self.routes.direct]
            for r, part in zip(self.routes.direct, parts):
                works.append(dist.irecv(part, src=self._group_rank(r), tag=PARTIAL_TAG))
        else:
            gathered = [torch.empty_like(mine) for _ in range(1 + len(self.members))]
            works.append(dist.gather(mine, gathered, dst=0, async_op=True))
            parts = gathered[1:]
        return PendingAttention(
            what=f"attention of layer {layer} on corpus {view.key}",
            q=q,
            works=works,
            parts=parts,
            keep=[*sent_tensors, mine],
            mark=mark,
            bytes_out=len(self.members) * sent,
            bytes_in=len(parts) * mine.numel() * mine.element_size(),
        )

    def _check_mass(self, view: SharedKV, layer: int, rows: int) -> None:
        """(Lock held.) Before a MASS travels: the corpus is still placed, and its last citing
        ATTEND (whose q the shared ranks kept) was of this layer and these rows."""
        cid = view.meta.corpus_id
        if cid not in self._held:
            raise SharedRankError(
                f"corpus {view.key} is no longer on the shared ranks (they changed and it "
                "could not be placed again); this answer failed, retry"
            )
        if self._cited.get(cid) != (layer, rows):  # the caller's bug, not a rank's failure
            raise ValueError(f"no citing ATTEND of layer {layer} ({rows} rows) on {view.key}")

    def _mass(
        self, view: SharedKV, layer: int, lse: torch.Tensor, owner: torch.Tensor, owners: int
    ) -> torch.Tensor:
        """(Lock held, `_check_mass` passed.) One MASS exchange: the float32 [U, C] citation mass
        of the q this corpus's citing ATTEND of `layer` sent, over every chunk, summed per owner
        (`owner[T]` in 0..owners-1), with lse[T, Hq] the normalizer of the merged attention."""
        cid, (t, hq) = view.meta.corpus_id, lse.shape
        placement, dev = self._placements[cid], self.world.device
        width = max(s.num_chunks for s in placement.shards)
        mark = self.stats.start(dev)
        head = header(OP_MASS, cid, layer, t, hq, owners, view.preamble_len, device=dev)
        dist.broadcast(head, src=0)
        ask = torch.cat([lse.float(), owner.float()[:, None]], dim=1).to(dev).contiguous()
        dist.broadcast(ask, src=0)
        mine = self._own_mass(view, layer, ask, owners, width)
        gathered = [torch.empty_like(mine) for _ in range(1 + len(self.members))]
        dist.gather(mine, gathered, dst=0)
        parts = [gathered[self._group_rank(s.rank)][:, : s.num_chunks] for s in placement.shards]
        self.stats.stop(mark)
        self.stats.mass_exchanges += 1
        ranks = len(self.holders)
        self.stats.bytes_out += ranks * (HEADER_LEN * 8 + ask.numel() * 4)
        self.stats.bytes_in += ranks * mine.numel() * 4
        return torch.cat(parts, dim=1).to(lse.device)

    def _own_mass(
        self, view: SharedKV, layer: int, ask: torch.Tensor, owners: int, width: int
    ) -> torch.Tensor:
        """Rank 0's own entry in a MASS gather: zeros (it holds no slice; the loopback link
        measures its whole corpus here)."""
        return torch.zeros(owners, width, dtype=torch.float32, device=self.world.device)

    def ping(self) -> None:
        """One round trip with every shared rank (raises SharedRankError if one is gone)."""
        with self._exchange("keep-alive"):
            self._ping()

    def shutdown(self) -> None:
        """Tell the shared ranks to exit (those in a group by a SHUTDOWN header, those in the
        lobby through the store); once."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            try:
                self.world.store.set(SHUTDOWN_KEY, "1")
                if self.members and self._group_ok:
                    dist.broadcast(header(OP_SHUTDOWN, device=self.world.device), src=0)
            except Exception as e:  # noqa: BLE001 - shutting down anyway
                log.warning("shutdown did not reach every shared rank: %s", e)
            leave_group()

    @property
    def error(self) -> SharedRankError | None:
        """Why the link is degraded (the failure that lost a rank, kept until every shared rank
        is back), or None."""
        return self._down or self._error

    @property
    def down(self) -> SharedRankError | None:
        """Set while the link cannot serve: no shared rank left, or the survivors cannot hold
        the corpora. Corpora are then served from rank 0."""
        return self._down

    @property
    def holders(self) -> list[int]:
        """The ranks that hold corpora's shared KV now: the current generation's members."""
        return self.members

    @property
    def degraded(self) -> bool:
        """A shared rank is missing: lost and not yet taken back with every corpus placed again
        (the failure's error stays until then), or the link is down."""
        return self.error is not None or len(self.members) < len(self.world.shared_ranks)

    # -- membership ----------------------------------------------------------------------------
    def _new_id(self) -> int:
        cid = self._next_id
        self._next_id += 1
        return cid

    def _lobby(self) -> dict[int, int]:
        """Shared ranks waiting in the lobby with a ticket no generation admitted: rank -> ticket."""
        store, waiting = self.world.store, {}
        for r in self.world.shared_ranks:
            ticket = store.add(lobby_key(r), 0)
            if ticket > self._admitted.get(r, 0):
                waiting[r] = ticket
        return waiting

    def _hosts(self, ranks: list[int]) -> dict[int, str]:
        """The host id each of `ranks` published (`init_world`); a rank that published none is
        left out (it counts as alone on its host)."""
        store, hosts = self.world.store, {}
        for r in ranks:
            if store.check([host_key(r)]):
                hosts[r] = store.get(host_key(r)).decode()
        return hosts

    def _await_lobby(self, expect: list[int], wait_s: float) -> dict[int, int]:
        deadline = time.monotonic() + wait_s
        while True:
            waiting = self._lobby()
            if set(expect) <= set(waiting) or time.monotonic() >= deadline:
                return waiting
            time.sleep(LOBBY_POLL_S)

    def _reform(self, expect: list[int], why: str) -> None:
        """(Lock held.) Leave the current group and form the next generation: rank 0 and every
        shared rank in the lobby, waiting up to the timeout for those in `expect`; then place
        the held corpora over it. A generation that does not form (a rank died meanwhile) is
        followed by another over those still alive; with no shared rank left, or no room for the
        corpora, the link is down."""
        leave_group()
        self._group_ok = False
        self._new_step = True  # the new group's ranks keep no routing metadata
        self._cited.clear()  # nor any q kept for a MASS
        for _attempt in range(3):
            waiting = self._await_lobby(expect, self.world.timeout_s)
            g, members = self.generation + 1, sorted(waiting)
            self.generation, self.members = g, []
            store = self.world.store
            routes = merge_routes(members, self._hosts([0, *members]))
            store.set(routes_key(g), routes.to_json())  # before the generation: read with it
            store.set(generation_key(g), json.dumps({str(r): t for r, t in waiting.items()}))
            store.set(GEN_KEY, str(g))
            self._admitted.update(waiting)
            try:
                form_group(self.world, g, members)
                self.members, self._group_ok, self.routes = members, True, routes
                self._place_all()
                break
            except Exception as e:  # noqa: BLE001 - a member died: form another generation
                log.warning("generation %d over shared ranks %s failed: %s", g, members, e)
                leave_group()
                self.members, self._group_ok = [], False
                stale = self._stale_ranks(members)
                expect = [r for r in members if r not in stale]
        log.info("generation %d (%s): shared ranks %s", self.generation, why, self.members)
        if not self._group_ok or not self.members:
            self._forget_all()
            if self.world.shared_ranks:
                self._down = self._down or SharedRankError(
                    "no shared rank answers; corpora are served from rank 0"
                )
            return
        if self._down is None and len(self.members) == len(self.world.shared_ranks):
            self._error = None  # every shared rank is back

    def _place_all(self) -> None:
        """(Lock held, group formed.) Place every held corpus over the members, when each member
        keeps within `rank_budget_bytes`; else forget them all and mark the link down."""
        need = {r: 0 for r in self.members}
        for h in self._held.values():
            for s in place(h.dims[1], h.dims[4], self.members).shards:
                need[s.rank] += s.num_tokens * h.token_bytes
        budget = self.rank_budget_bytes
        if budget is not None and need and max(need.values()) > budget:
            worst = max(need, key=need.get)
            self._forget_all()
            self._down = SharedRankError(
                f"the shared ranks left ({', '.join(map(str, self.members))}) cannot hold the "
                f"corpora: shared rank {worst} would need {need[worst] / 2**20:.1f} MiB of "
                f"{budget / 2**20:.1f}; corpora are served from rank 0"
            )
            return
        self._down = None
        for cid, h in list(self._held.items()):
            if h.spec is None and h.source is None:
                log.warning("corpus %s was not kept: forgotten (its questions fail)", h.key)
                self._held.pop(cid)
                self._placements.pop(cid, None)
                continue
            try:
                self._place(cid, h)
            except _Unreadable as e:
                log.error("%s (%s): forgotten, its questions fail", e, e.__cause__)
                self._held.pop(cid)
                self._placements.pop(cid, None)

    def _forget_all(self) -> None:
        self._held.clear()
        self._placements.clear()

    def _place(self, cid: int, h: _Held, layout: SharedKV | None = None) -> Placement:
        """(Lock held.) Place corpus `cid` over the members: LOAD (each reads its slice; rank 0
        sends the slices of those that could not, from `layout` when it holds the corpus, else
        read from the same files) or REGISTER (rank 0 sends every slice)."""
        dev, (layers, n, hkv, d, chunk) = self.world.device, h.dims
        placement = place(n, chunk, self.members)
        if h.spec is None:
            dist.broadcast(header(OP_REGISTER, cid, *h.dims, h.code, device=dev), src=0)
            for s in placement.shards:
                for part in slice_kv(h.source, s):  # layer by layer: no stacked copy
                    dist.send(part.to(dev), dst=self._group_rank(s.rank))
            self._placements[cid] = placement
            return placement
        payload = torch.frombuffer(bytearray(json.dumps(h.spec).encode()), dtype=torch.uint8)
        dist.broadcast(header(OP_LOAD, cid, *h.dims, h.code, device=dev), src=0)
        dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64, device=dev), src=0)
        dist.broadcast(payload.to(dev), src=0)
        size = 1 + len(self.members)
        status = [torch.zeros(1, device=dev) for _ in range(size)]
        dist.gather(torch.zeros(1, device=dev), status, dst=0)
        failed = [r for r in self.members if status[self._group_rank(r)].item() != 0]
        slices, error = {}, None
        for r in failed:  # read them before telling anyone: a file rank 0 cannot read either
            s = placement.shard(r)
            if layout is not None or not s.num_tokens:
                slices[r] = [] if layout is None else list(slice_kv(layout, s))
                continue
            kv = torch.empty(2, layers, s.num_tokens, hkv, d, dtype=DTYPES[h.code])
            try:
                read_slice(kv, s, h.spec)
            except Exception as e:  # noqa: BLE001 - raised below, after the ranks forget it
                error = e
                break
            slices[r] = [kv[j, layer] for layer in range(layers) for j in (0, 1)]
        send = torch.zeros(size, dtype=torch.int64, device=dev)
        if error is not None:
            send.fill_(-1)
        for r in slices if error is None else []:
            send[self._group_rank(r)] = 1
        dist.broadcast(send, src=0)
        if error is not None:
            raise _Unreadable(f"corpus {h.key}: rank 0 cannot read its KV files either") from error
        for r, parts in slices.items():
            log.warning("corpus %s: shared rank %d could not read its slice; sending it", h.key, r)
            for part in parts:  # layer by layer, k then v
                dist.send(part.to(dev), dst=self._group_rank(r))
        self._sent_from_here[cid] = failed
        self._placements[cid] = placement
        return placement

    def _group_rank(self, rank: int) -> int:
        return [0, *self.members].index(rank)

    def _ping(self) -> None:
        dev = self.world.device
        dist.broadcast(header(OP_PING, device=dev), src=0)
        dist.gather(
            torch.zeros(1, device=dev),
            [torch.zeros(1, device=dev) for _ in range(1 + len(self.members))],
            dst=0,
        )

    # -- internals ---------------------------------------------------------------------------
    def _exchange(self, what: str) -> _Exchange:
        return _Exchange(self, what)

    def _fail(self, what: str, cause: BaseException) -> SharedRankError:
        """(Lock held.) A collective failed: name the ranks whose heartbeat stopped, then form the
        next generation over the others. Returns the error the failed exchange raises."""
        stale = self._stale_ranks(self.members)
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
        error = SharedRankError(msg)
        self._error = error
        if not self._closed.is_set():
            survivors = [r for r in self.members if r not in stale]
            self._reform(survivors, f"after {what}")
        return error

    def _stale_ranks(self, ranks: list[int]) -> list[int]:
        """Of `ranks`, those whose heartbeat counter did not move over a few heartbeat periods."""
        store = self.world.store
        try:
            before = {r: store.add(self.world.heartbeat_key(r), 0) for r in ranks}
            time.sleep(4 * HEARTBEAT_S)
            after = {r: store.add(self.world.heartbeat_key(r), 0) for r in ranks}
        except Exception as e:  # noqa: BLE001 - the store itself may be gone with its host
            log.warning("cannot read heartbeats: %s", e)
            return []
        return [r for r in ranks if after[r] == before[r]]

    def _keep(self, interval: float) -> None:
        """The keeper: takes back shared ranks that wait in the lobby, and pings an idle link."""
        while not self._closed.wait(min(interval / 2, 1.0)):
            try:
                if self._lobby():
                    self._take_back()
                elif self._down is None and time.monotonic() - self._last >= interval:
                    self.ping()
            except SharedRankError as e:
                log.error("%s", e)
            except Exception as e:  # noqa: BLE001 - the store is gone: the job is ending
                log.warning("shard keeper: %s", e)

    def _take_back(self) -> None:
        """Ranks are waiting in the lobby: the members leave the group (REGROUP) and the next
        generation forms with them and the newcomers; the corpora are placed over all."""
        with self._lock:
            if self._closed.is_set():
                return
            back = sorted(self._lobby())
            if not back:
                return
            try:
                if self.members and self._group_ok:
                    dist.broadcast(header(OP_REGROUP, device=self.world.device), src=0)
            except Exception as e:  # noqa: BLE001 - a member died meanwhile
                log.error("%s", self._fail("taking back shared ranks", e))
                return
            self._reform(sorted(set(self.members) | set(back)), f"shared ranks {back} back")


class _Unreadable(RuntimeError):
    """Rank 0 cannot read a corpus's KV files to send a slice: no rank failed."""


class _Exchange:
    """Holds the link's lock for one exchange; turns any communication failure into
    SharedRankError (after which the link forms its next generation)."""

    def __init__(self, link: ShardLink, what: str):
        self.link, self.what = link, what

    def __enter__(self) -> None:
        self.link._lock.acquire()
        if self.link._down is not None:
            self.link._lock.release()
            raise self.link._down
        if self.link._closed.is_set():
            self.link._lock.release()
            raise SharedRankError("the link to the shared ranks is shut down")

    def __exit__(self, typ, exc, tb) -> bool:
        try:
            self.link._last = time.monotonic()
            if exc is not None and not isinstance(exc, (SharedRankError, _Unreadable)):
                raise self.link._fail(self.what, exc) from exc
            return False
        finally:
            self.link._lock.release()


@dataclass
class PendingAttention:
    """One ATTEND in flight on rank 0: the works of its collectives, the buffers its partials
    arrive in (`parts`), what it sent (kept alive until sent) and the counts it adds to the
    link's stats once collected. `local`: a partial rank 0 computes itself at the wait (the
    loopback link). `wait` through its batch."""

    what: str
    q: torch.Tensor
    works: list
    parts: list[torch.Tensor]
    keep: list[torch.Tensor]
    mark: object
    bytes_out: int
    bytes_in: int
    local: object | None = None  # () -> packed partial
    batch: AttentionBatch | None = None

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged partial (o in q's dtype, lse float32), as `ShardLink.shared_attention`."""
        return self.batch.collect(self)


class AttentionBatch:
    """One layer's ATTEND exchanges, overlapped with rank 0's own work: holds the link's lock
    from `__enter__` to `__exit__`; `start` sends an ATTEND and posts the receipt of its partials
    without waiting; `collect` (the pending's `wait`) waits for them and merges.

    A collective that fails, while sending or while waiting, is a failed exchange as in
    `_Exchange`: SharedRankError naming the stalled rank, and the link forms its next generation
    (the batch's other pendings die with the old group). Any other exception that leaves the
    batch with ATTENDs in flight first waits for them (the shared ranks send their partials
    regardless, and the next exchange must not read them); if that wait fails, the exchange
    failed as above."""

    def __init__(self, link: ShardLink):
        self.link = link
        self.pending: list[PendingAttention] = []
        self.generation = -1

    def __enter__(self) -> AttentionBatch:
        _Exchange(self.link, "attention").__enter__()  # the lock, or the link's refusal
        self.generation = self.link.generation
        return self

    def start(self, a: Attend) -> PendingAttention:
        """Send one ATTEND now; its `wait` collects the merged partial."""
        shifted = a.chunk_idx is not None and a.chunk_shift is not None
        assert not shifted or a.rope_inv_freq is not None, "shifted chunks need RoPE frequencies"
        dtype_code(a.q.dtype)  # raised here, before anything travels: no rank failure
        self._check_alive()
        try:
            p = self.link._issue(a)
        except SharedRankError:
            raise  # nothing was sent (the corpus is gone)
        except Exception as e:  # noqa: BLE001 - a collective failed
            self.pending.clear()
            raise self.link._fail(f"attention of layer {a.layer} on corpus {a.view.key}", e) from e
        p.batch = self
        self.pending.append(p)
        return p

    def chunk_mass(
        self, view: SharedKV, layer: int, lse: torch.Tensor, owner: torch.Tensor, owners: int
    ) -> torch.Tensor:
        """Citation mass [owners, C] float32 of the rows of this layer's citing ATTEND on `view`
        (started with `cites`, its partial collected): each shared rank measures its slice with
        the q it kept, `lse` [T, Hq] the normalizer of the merged attention, summed per owner
        (`owner` [T], 0..owners-1); columns in global chunk order. One MASS exchange, waited
        for; a collective that fails is a failed exchange as in `start`."""
        self._check_alive()
        self.link._check_mass(view, layer, lse.shape[0])  # raised before anything travels
        try:
            return self.link._mass(view, layer, lse, owner, owners)
        except Exception as e:  # noqa: BLE001 - a collective failed
            self.pending.clear()
            raise self.link._fail(f"citation mass of layer {layer} on corpus {view.key}", e) from e

    def collect(self, p: PendingAttention) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_alive()
        stats, dev = self.link.stats, self.link.world.device
        waited = stats.start(dev)
        try:
            for w in p.works:
                w.wait()
        except Exception as e:  # noqa: BLE001 - a shared rank failed (or timed out) meanwhile
            self.pending.clear()
            raise self.link._fail(p.what, e) from e
        self.pending.remove(p)
        stats.stop(waited, "wait_seconds")
        stats.stop(p.mark)
        stats.exchanges += 1
        stats.bytes_out += p.bytes_out
        stats.bytes_in += p.bytes_in
        parts = p.parts if p.local is None else [*p.parts, p.local()]
        return merge_partials(parts, p.q)

    def _check_alive(self) -> None:
        if self.link.generation != self.generation:  # a failed exchange re-formed the group
            raise self.link.error or SharedRankError("the shared ranks changed during this step")

    def __exit__(self, typ, exc, tb) -> bool:
        link = self.link
        try:
            link._last = time.monotonic()
            if self.pending and link.generation == self.generation:
                in_flight, self.pending = self.pending, []
                try:
                    for p in in_flight:
                        for w in p.works:
                            w.wait()
                except Exception as e:  # noqa: BLE001
                    raise link._fail(in_flight[0].what, e) from e
            return False
        finally:
            link._lock.release()
