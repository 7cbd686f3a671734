"""The loop a shared rank runs: wait for rank 0's header, do what it says, reply; exit on SHUTDOWN.

A shared rank holds no model, only its slices of the registered corpora, and answers each ATTEND
with `attention.shared_attention` over its slice (routed ids outside its range become -1, so a
query whose chosen chunks all live elsewhere returns lse = -inf and drops out of the merge).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

import attention
from kb.engine.distributed.placement import Placement, ShardRange, place
from kb.engine.distributed.protocol import (
    DTYPES,
    HEADER_LEN,
    HEARTBEAT_S,
    OP_ATTEND,
    OP_DROP,
    OP_LOAD,
    OP_PING,
    OP_REGISTER,
    OP_SHUTDOWN,
    World,
)
from storage.kvstore import read_kv

log = logging.getLogger(__name__)


@dataclass
class CorpusSlice:
    """This rank's part of one corpus: keys and values [L, n, Hkv, d] of chunks in `shard`."""

    placement: Placement
    shard: ShardRange
    k: torch.Tensor
    v: torch.Tensor
    head_dim: int


def read_slice(kv: torch.Tensor, shard: ShardRange, spec: dict) -> int:
    """Fill kv [2, L, n, Hkv, d] with the shard's tokens from the corpus's KV files (`spec`:
    LOAD's file list), reading and verifying only the files that overlap it; each file's
    tokens are laid out in `via`, then in kv's dtype, as rank 0's layout is. Returns the number
    of files read; raises on a file that cannot be read or does not match its checksum."""
    via = getattr(torch, spec["via"])
    start, read = 0, 0
    for path, checksum, tokens in spec["files"]:
        a, b = max(start, shard.token_start), min(start + tokens, shard.token_end)
        if a < b:
            k, v = read_kv(path, checksum, dequantize=True)
            if k.shape[1] != tokens:
                raise ValueError(f"KV file {path} holds {k.shape[1]} tokens, not {tokens}")
            for j, x in enumerate((k, v)):
                part = x[:, a - start : b - start].to(via).to(kv.dtype)
                kv[j, :, a - shard.token_start : b - shard.token_start] = part
            read += 1
        start += tokens
    return read


def _heartbeat(world: World, stop: threading.Event) -> None:
    """Bump this rank's counter in the store, so rank 0 can tell a dead rank from a slow one."""
    key = world.heartbeat_key(world.rank)
    while not stop.is_set():
        try:
            world.store.add(key, 1)
        except Exception:  # noqa: BLE001 - rank 0 (the store's host) is gone; the main loop notices
            return
        stop.wait(HEARTBEAT_S)


def attend_slice(
    sl: CorpusSlice,
    layer: int,
    q: torch.Tensor,
    chunk_idx: torch.Tensor | None,
    chunk_shift: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Partial attention of q[T, Hq, d] over this slice, packed as float32 [T, Hq, d + 1] (o, lse);
    with chunk_shift (beside the global chunk_idx), each chunk at its virtual position (a shift
    does not depend on where the chunk is stored: the slice keeps the stored positions' keys)."""
    t, hq, d = q.shape
    out = torch.zeros(t, hq, d + 1, dtype=torch.float32, device=q.device)
    if sl.shard.num_tokens == 0:
        out[..., d] = float("-inf")
        return out
    idx = None if chunk_idx is None else sl.placement.local_chunk_idx(chunk_idx, sl.shard.rank)
    extra = {}
    if idx is not None and chunk_shift is not None:
        extra = {"chunk_shift": chunk_shift, "rope_inv_freq": rope_inv_freq}
    o, lse = attention.shared_attention(
        q, sl.k[layer], sl.v[layer], idx, sl.placement.chunk_size, **extra
    )
    out[..., :d] = o.float()
    out[..., d] = lse
    return out


def run_shared_rank(world: World) -> None:
    """Serve rank 0 until it says SHUTDOWN; a failed collective (rank 0 gone) raises out of here."""
    dev = world.device
    corpora: dict[int, CorpusSlice] = {}
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(world, stop), name="kb-heartbeat", daemon=True)
    beat.start()
    try:
        with torch.inference_mode():
            while True:
                h = torch.empty(HEADER_LEN, dtype=torch.int64, device=dev)
                dist.broadcast(h, src=0)
                op, *f = h.tolist()
                if op == OP_SHUTDOWN:
                    log.info("rank %d: shutdown", world.rank)
                    return
                if op == OP_PING:
                    dist.gather(torch.zeros(1, device=dev), None, dst=0)
                elif op == OP_REGISTER:
                    cid, layers, n, hkv, d, chunk, code = f[:7]
                    placement = place(n, chunk, world.shared_ranks)
                    shard = placement.shard(world.rank)
                    kv = torch.empty(
                        2, layers, shard.num_tokens, hkv, d, dtype=DTYPES[code], device=dev
                    )
                    if shard.num_tokens:  # layer by layer, k then v (placement.slice_kv's order)
                        for layer in range(layers):
                            for j in (0, 1):
                                dist.recv(kv[j, layer], src=0)
                    corpora[cid] = CorpusSlice(placement, shard, kv[0], kv[1], d)
                    log.info(
                        "rank %d: corpus %d, chunks %d..%d (%d tokens)",
                        world.rank,
                        cid,
                        shard.chunk_start,
                        shard.chunk_end,
                        shard.num_tokens,
                    )
                elif op == OP_LOAD:
                    cid, layers, n, hkv, d, chunk, code = f[:7]
                    size = torch.empty(1, dtype=torch.int64, device=dev)
                    dist.broadcast(size, src=0)
                    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
                    dist.broadcast(buf, src=0)
                    spec = json.loads(buf.cpu().numpy().tobytes())
                    placement = place(n, chunk, world.shared_ranks)
                    shard = placement.shard(world.rank)
                    kv = torch.empty(
                        2, layers, shard.num_tokens, hkv, d, dtype=DTYPES[code], device=dev
                    )
                    try:
                        read = read_slice(kv, shard, spec)
                        failed = 0.0
                    except Exception as e:  # noqa: BLE001 - rank 0 sends the slice instead
                        log.warning("rank %d: corpus %d unreadable here: %s", world.rank, cid, e)
                        failed = 1.0
                    dist.gather(torch.full((1,), failed, device=dev), None, dst=0)
                    if not failed:
                        corpora[cid] = CorpusSlice(placement, shard, kv[0], kv[1], d)
                        log.info(
                            "rank %d: corpus %d, chunks %d..%d (%d tokens) from %d of %d files",
                            world.rank,
                            cid,
                            shard.chunk_start,
                            shard.chunk_end,
                            shard.num_tokens,
                            read,
                            len(spec["files"]),
                        )
                elif op == OP_DROP:
                    corpora.pop(f[0], None)
                elif op == OP_ATTEND:
                    cid, layer, t, top_k, hq, code, shifted = f[:7]
                    sl = corpora[cid]
                    hkv = sl.k.shape[2]
                    q = torch.empty(t, hq, sl.head_dim, dtype=DTYPES[code], device=dev)
                    dist.broadcast(q, src=0)
                    idx = None
                    if top_k:
                        idx = torch.empty(t, hkv, top_k, dtype=torch.int64, device=dev)
                        dist.broadcast(idx, src=0)
                    shift = inv = None
                    if shifted:  # virtual positions: the shifts beside idx, the RoPE frequencies
                        shift = torch.empty_like(idx)
                        dist.broadcast(shift, src=0)
                        inv = torch.empty(sl.head_dim // 2, dtype=torch.float32, device=dev)
                        dist.broadcast(inv, src=0)
                    dist.gather(attend_slice(sl, layer, q, idx, shift, inv), None, dst=0)
                else:
                    raise RuntimeError(f"unknown header op {op}: the ranks run different code")
    finally:
        stop.set()
