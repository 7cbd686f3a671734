"""The loop a shared rank runs: wait in the lobby for a generation that admits it, join its group,
then wait for rank 0's header, do what it says, reply; exit on SHUTDOWN.

A shared rank holds no model, only its slices of the registered corpora, and answers each ATTEND
with `attention.shared_attention` over its slice (routed ids outside its range become -1, so a
query whose chosen chunks all live elsewhere returns lse = -inf and drops out of the merge).
It sends that partial where the generation's `MergeRoutes` say: in rank 0's gather, or point to
point to rank 0 or to its host's leader; a leader first receives its host's ranks' partials and
sends rank 0 their log-sum-exp merge with its own (one partial per host crosses to rank 0).
At a citation layer it keeps the q of the ATTEND rank 0 marks (meta bit 16) and answers the MASS
that follows with that q's softmax mass on each chunk of its slice (`slice_mass`, normalized by
the merged lse rank 0 sends, summed per request), straight to rank 0: chunk masses concatenate,
they do not merge, so no host leader is involved.
When its group fails (a peer died; rank 0 left the group) or rank 0 says REGROUP, it forgets its
slices and goes back to the lobby; rank 0 places the corpora again over the next generation. It
exits when rank 0 is gone (the rendezvous store, which rank 0 hosts, no longer answers).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import attention
from kb.engine.distributed.placement import Placement, ShardRange, place, read_slice
from kb.engine.distributed.protocol import (
    DTYPES,
    GEN_KEY,
    HEADER_LEN,
    HEARTBEAT_S,
    LOBBY_POLL_S,
    OP_ATTEND,
    OP_DROP,
    OP_LOAD,
    OP_MASS,
    OP_PING,
    OP_REGISTER,
    OP_REGROUP,
    OP_SHUTDOWN,
    PARTIAL_TAG,
    SHUTDOWN_KEY,
    MergeRoutes,
    World,
    form_group,
    generation_key,
    leave_group,
    lobby_key,
    merge_partials,
    pack_partial,
    routes_key,
    wire_dtype,
)

__all__ = [
    "ChunkRoute",
    "CorpusSlice",
    "attend_slice",
    "read_slice",
    "run_shared_rank",
    "slice_mass",
]

log = logging.getLogger(__name__)


@dataclass
class CorpusSlice:
    """This rank's part of one corpus: keys and values [L, n, Hkv, d] of chunks in `shard`."""

    placement: Placement
    shard: ShardRange
    k: torch.Tensor
    v: torch.Tensor
    head_dim: int


def _heartbeat(world: World, stop: threading.Event) -> None:
    """Bump this rank's counter in the store, so rank 0 can tell a dead rank from a slow one."""
    key = world.heartbeat_key(world.rank)
    while not stop.is_set():
        try:
            world.store.add(key, 1)
        except Exception:  # noqa: BLE001 - rank 0 (the store's host) is gone; the main loop notices
            return
        stop.wait(HEARTBEAT_S)


@dataclass(frozen=True)
class ChunkRoute:
    """The chunks an ATTEND reads: global chunk_idx [T, Hkv, k] (None: dense) and, beside it,
    chunk_shift [T, Hkv, k] with the model's RoPE frequencies (virtual positions; None: the
    stored positions). A step's steady route is sent once and kept for its later layers."""

    chunk_idx: torch.Tensor | None = None
    chunk_shift: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None


def attend_slice(sl: CorpusSlice, layer: int, q: torch.Tensor, route: ChunkRoute) -> torch.Tensor:
    """Partial attention of q[T, Hq, d] over this slice, packed for the wire (`pack_partial`:
    o in 16 bits, the float32 lse in the last two slots of [T, Hq, d + 2]);
    with chunk_shift (beside the global chunk_idx), each chunk at its virtual position (a shift
    does not depend on where the chunk is stored: the slice keeps the stored positions' keys)."""
    chunk_idx, chunk_shift = route.chunk_idx, route.chunk_shift
    t, hq, d = q.shape
    wire = wire_dtype(q.dtype)
    if sl.shard.num_tokens == 0:
        empty = torch.full((t, hq), float("-inf"), device=q.device)
        return pack_partial(torch.zeros(t, hq, d, device=q.device), empty, wire)
    idx = None if chunk_idx is None else sl.placement.local_chunk_idx(chunk_idx, sl.shard.rank)
    extra = {}
    if idx is not None and chunk_shift is not None:
        extra = {"chunk_shift": chunk_shift, "rope_inv_freq": route.rope_inv_freq}
    o, lse = attention.shared_attention(
        q, sl.k[layer], sl.v[layer], idx, sl.placement.chunk_size, **extra
    )
    return pack_partial(o, lse, wire)


def slice_mass(
    sl: CorpusSlice,
    layer: int,
    q: torch.Tensor,
    ask: torch.Tensor,
    owners: int,
    skip: int,
    width: int,
) -> torch.Tensor:
    """Citation mass of q[T, Hq, d] on this slice's chunks, summed per owner: [owners, width]
    float32, the slice's chunks first, zeros after (`width`: the largest slice's chunks, so
    every rank's part has one shape). `ask` [T, Hq + 1]: the merged attention's lse and each
    row's owner (MASS); the corpus's first `skip` tokens (the preamble) count nothing, so only
    the slice that holds them skips any."""
    hq = ask.shape[1] - 1
    out = torch.zeros(owners, width, dtype=torch.float32, device=q.device)
    n = sl.shard.num_tokens
    if n == 0:
        return out
    local_skip = min(max(skip - sl.shard.token_start, 0), n)
    per_chunk = attention.chunk_mass(
        q, sl.k[layer], ask[:, :hq], sl.placement.chunk_size, skip=local_skip
    )  # [T, chunks of the slice]
    owner = ask[:, hq].long()
    out[:, : per_chunk.shape[1]].index_add_(0, owner, per_chunk)
    return out


class RankZeroGone(RuntimeError):
    """The rendezvous store (rank 0's) no longer answers: the job is over."""


def _await_generation(world: World) -> tuple[int, list[int], MergeRoutes] | None:
    """Take a lobby ticket and wait for a generation that admits it: (generation, members, where
    the partials go), or None when rank 0 says shutdown. RankZeroGone when the store stops
    answering."""
    store = world.store
    try:
        ticket = store.add(lobby_key(world.rank), 1)
        while True:
            if store.check([SHUTDOWN_KEY]):
                return None
            if store.check([GEN_KEY]):
                g = int(store.get(GEN_KEY))
                admitted = json.loads(store.get(generation_key(g)))
                if admitted.get(str(world.rank)) == ticket:
                    routes = MergeRoutes.from_json(store.get(routes_key(g)).decode())
                    return g, sorted(int(r) for r in admitted), routes
            time.sleep(LOBBY_POLL_S)
    except Exception as e:  # noqa: BLE001 - the store's host (rank 0) is gone
        raise RankZeroGone(str(e)) from e


def run_shared_rank(world: World) -> None:
    """Serve rank 0, generation after generation, until it says SHUTDOWN; raises RankZeroGone
    (or the failure itself) when rank 0 is gone."""
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(world, stop), name="kb-heartbeat", daemon=True)
    beat.start()
    try:
        while True:
            joined = _await_generation(world)
            if joined is None:
                log.info("rank %d: shutdown", world.rank)
                return
            g, members, routes = joined
            try:
                form_group(world, g, members)
            except Exception as e:  # noqa: BLE001 - a peer did not come: back to the lobby
                log.warning("rank %d: generation %d did not form (%s)", world.rank, g, e)
                continue
            log.info("rank %d: generation %d, shared ranks %s", world.rank, g, members)
            try:
                if _serve(world, members, routes):
                    return
            except Exception as e:  # noqa: BLE001 - the group failed; is rank 0 still there?
                try:
                    world.store.add(world.heartbeat_key(world.rank), 0)
                except Exception as gone:  # noqa: BLE001
                    raise RankZeroGone(f"{e}; the store: {gone}") from e
                log.warning("rank %d: generation %d failed (%s); to the lobby", world.rank, g, e)
            finally:
                leave_group()
    finally:
        stop.set()
        # wait out the heartbeat's last store call: a daemon thread still inside the store's
        # C++ when the interpreter exits (rank 0, the store's host, just closed it) aborts the
        # process (SIGABRT) instead of a clean exit 0
        beat.join(timeout=5.0)


def _new_slice(world: World, f: list[int], members: list[int]) -> tuple:
    cid, layers, n, hkv, d, chunk, code = f[:7]
    placement = place(n, chunk, members)
    shard = placement.shard(world.rank)
    kv = torch.empty(2, layers, shard.num_tokens, hkv, d, dtype=DTYPES[code], device=world.device)
    return cid, placement, shard, kv, d


def _recv_slice(kv: torch.Tensor) -> None:
    """A slice from rank 0, layer by layer, k then v (placement.slice_kv's order)."""
    if kv.shape[2]:
        for layer in range(kv.shape[1]):
            for j in (0, 1):
                dist.recv(kv[j, layer], src=0)


def _send_partial(
    world: World, group: list[int], routes: MergeRoutes, q: torch.Tensor, attend
) -> None:
    """Send this rank's ATTEND partial (`attend()`, packed) where `routes` say: in rank 0's
    gather, or point to point; a host's leader first receives its followers' partials (posted
    before it attends its own slice) and sends their merge with its own, packed again."""
    if not routes.merging:
        dist.gather(attend(), None, dst=0)
        return
    followers = routes.followers(world.rank)
    wire = wire_dtype(q.dtype)
    t, hq, d = q.shape
    got = [torch.empty(t, hq, d + 2, dtype=wire, device=q.device) for _ in followers]
    works = [dist.irecv(buf, src=group.index(r), tag=PARTIAL_TAG) for r, buf in zip(followers, got)]
    part = attend()
    if followers:
        for w in works:
            w.wait()
        o, lse = merge_partials([part, *got], q.float())  # merged in float32, rounded once more
        part = pack_partial(o, lse, wire)
    dist.send(part, dst=group.index(routes.to[world.rank]), tag=PARTIAL_TAG)


def _serve(world: World, members: list[int], routes: MergeRoutes) -> bool:
    """One generation: answer rank 0's headers. True on SHUTDOWN, False on REGROUP; raises when
    the group fails."""
    dev = world.device
    group = [0, *members]
    me = group.index(world.rank)
    corpora: dict[int, CorpusSlice] = {}
    slots: dict[int, ChunkRoute] = {}  # this step's routing metadata that rank 0 sends once
    kept: dict[int, tuple[int, torch.Tensor]] = {}  # cid -> (layer, q) of its last citing ATTEND
    with torch.inference_mode():
        while True:
            h = torch.empty(HEADER_LEN, dtype=torch.int64, device=dev)
            dist.broadcast(h, src=0)
            op, *f = h.tolist()
            if op == OP_SHUTDOWN:
                return True
            if op == OP_REGROUP:
                return False
            if op == OP_PING:
                dist.gather(torch.zeros(1, device=dev), None, dst=0)
            elif op == OP_REGISTER:
                cid, placement, shard, kv, d = _new_slice(world, f, members)
                _recv_slice(kv)
                corpora[cid] = CorpusSlice(placement, shard, kv[0], kv[1], d)
                log.info(
                    "rank %d: corpus %d, chunks %d..%d (%d tokens) sent by rank 0",
                    world.rank,
                    cid,
                    shard.chunk_start,
                    shard.chunk_end,
                    shard.num_tokens,
                )
            elif op == OP_LOAD:
                cid, placement, shard, kv, d = _new_slice(world, f, members)
                size = torch.empty(1, dtype=torch.int64, device=dev)
                dist.broadcast(size, src=0)
                buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
                dist.broadcast(buf, src=0)
                spec = json.loads(buf.cpu().numpy().tobytes())
                read = 0
                try:
                    read = read_slice(kv, shard, spec)
                    failed = 0.0
                except Exception as e:  # noqa: BLE001 - rank 0 sends the slice instead
                    log.warning("rank %d: corpus %d unreadable here: %s", world.rank, cid, e)
                    failed = 1.0
                dist.gather(torch.full((1,), failed, device=dev), None, dst=0)
                send = torch.empty(1 + len(members), dtype=torch.int64, device=dev)
                dist.broadcast(send, src=0)
                if send[me].item() < 0:  # rank 0 cannot read the files either
                    continue
                if send[me].item() == 1:
                    _recv_slice(kv)
                corpora[cid] = CorpusSlice(placement, shard, kv[0], kv[1], d)
                log.info(
                    "rank %d: corpus %d, chunks %d..%d (%d tokens) %s",
                    world.rank,
                    cid,
                    shard.chunk_start,
                    shard.chunk_end,
                    shard.num_tokens,
                    "sent by rank 0" if failed else f"from {read} of {len(spec['files'])} files",
                )
            elif op == OP_DROP:
                corpora.pop(f[0], None)
                kept.pop(f[0], None)
            elif op == OP_ATTEND:
                cid, layer, t, top_k, hq, code, meta = f[:7]
                sl = corpora[cid]
                hkv = sl.k.shape[2]
                if meta & 8:  # a new step
                    slots.clear()
                q = torch.empty(t, hq, sl.head_dim, dtype=DTYPES[code], device=dev)
                dist.broadcast(q, src=0)
                route = ChunkRoute()  # dense
                if meta & 16:  # this layer's MASS measures this q
                    kept[cid] = (layer, q)
                if top_k and meta & 2:  # sent at an earlier layer of this step
                    route = slots[meta >> 5]
                elif top_k:
                    ids = torch.empty(t, hkv, top_k, dtype=torch.int32, device=dev)
                    dist.broadcast(ids, src=0)
                    idx, shift, inv = ids.long(), None, None
                    if meta & 1:  # virtual positions: the shifts beside idx, the frequencies
                        shifts = torch.empty_like(ids)
                        dist.broadcast(shifts, src=0)
                        shift = shifts.long()
                        inv = torch.empty(sl.head_dim // 2, dtype=torch.float32, device=dev)
                        dist.broadcast(inv, src=0)
                    route = ChunkRoute(idx, shift, inv)
                    if meta & 4:
                        slots[meta >> 5] = route
                attend = functools.partial(attend_slice, sl, layer, q, route)
                _send_partial(world, group, routes, q, attend)
            elif op == OP_MASS:
                cid, layer, t, hq, owners, skip = f[:6]
                sl = corpora[cid]
                ask = torch.empty(t, hq + 1, dtype=torch.float32, device=dev)
                dist.broadcast(ask, src=0)
                at, q = kept.get(cid, (None, None))
                if at != layer or q.shape[:2] != (t, hq):
                    raise RuntimeError(f"MASS of layer {layer} on corpus {cid}: no q kept for it")
                width = max(s.num_chunks for s in sl.placement.shards)
                mass = slice_mass(sl, layer, q, ask, owners, skip, width)
                dist.gather(mass, None, dst=0)
            else:
                raise RuntimeError(f"unknown header op {op}: the ranks run different code")
