"""Routed shared attention: each query attends only the chunks it chose, grouped like MoE.

The router gives each (token, KV head) k chunks. Reading each chunk separately per query would
be one GEMV per (query, chunk). Instead the routing is inverted the way an MoE layer inverts
expert choice: the (token, slot) entries are sorted by (chunk, KV head), so the queries of one
chunk sit together (CSR: offsets per group). One program takes a block of a group's entries,
loads that chunk's keys and values once and multiplies them against all its queries (all q heads
of the GQA group: entries x G rows = a real GEMM tile). It writes a partial (o, lse) per
(token, KV head, slot); `combine.py` then merges each query's k partials by log-sum-exp.

The CSR is built with torch ops on the device (sort, bincount, cumsum, searchsorted) and the grid
is an upper bound known from shapes alone, so nothing waits on the host.
"""

from __future__ import annotations

import torch

from . import _triton as tt
from ._triton import HAS_TRITON, tl, triton
from .routed_call import RoutedCall, group_tiles, operands, prepare_routed, slot_partials

if HAS_TRITON:

    @triton.jit
    def _shared_routed_kernel(
        IO,
        ORDER,
        OFFSETS,
        TILE_GROUP,
        TILE_START,
        N,
        chunk_size,
        num_groups,
        qk_scale,
        ST,
        HKV: tl.constexpr,
        TOPK: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        KV_SCALE: tl.constexpr,
        DOT: tl.constexpr,
    ):
        Q, K, V, KS, VS, OP, LP = IO
        sq, sk, sv, ss = ST
        tile = tl.program_id(0)
        # which (chunk, KV head) group this tile serves; tiles past the last are idle
        grp = tl.load(TILE_GROUP + tile)
        live = grp < num_groups
        grp = tl.minimum(grp, num_groups - 1)
        c = grp // HKV
        h = grp % HKV
        # the group's rows are (entry, member g of the GQA group), G per entry; this tile
        # takes BLOCK_M of them. An entry is a flat index of chunk_idx,
        # (token * HKV + h) * TOPK + slot, which also addresses its partial output.
        r_base = tl.load(OFFSETS + grp) * G
        r_lo = r_base + (tile - tl.load(TILE_START + grp)) * BLOCK_M
        r_hi = tl.load(OFFSETS + grp + 1) * G
        r_hi = tl.where(live, r_hi, r_lo)
        rows = r_lo + tl.arange(0, BLOCK_M)
        row_ok = rows < r_hi
        e = rows // G
        g = rows % G
        # 64-bit: T * Hkv * k * G * d partial elements can pass 2^31
        ent = tl.load(ORDER + e, mask=row_ok, other=0).to(tl.int64)
        t = ent // (HKV * TOPK)
        offs_d = tl.arange(0, D)
        q = tt.load_q_rows(Q, t, h * G + g, row_ok, offs_d, sq).to(DOT)

        m_i, l_i, acc = tt.softmax_start(BLOCK_M, D)
        # the chunk's keys, loaded once for every query that chose it
        n_lo = c * chunk_size
        n_end = tl.minimum(n_lo + chunk_size, N)
        n_hi = tl.where(live, n_lo + chunk_size, n_lo)
        offs_n0 = tl.arange(0, BLOCK_N)
        for start in range(n_lo, n_hi, BLOCK_N):
            offs_n = start + offs_n0
            n_ok = offs_n < n_end
            k, v = tt.load_kv(K, V, h, offs_n, offs_d, n_ok, sk, sv)
            qk = tl.dot(q, tl.trans(k.to(DOT)))
            if KV_SCALE:
                # fp8: one scale per (chunk, head) folds into the score scale and into p
                ks, vs = tt.load_chunk_scales(KS, VS, c, h, ss)
                qk = qk * ks
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
            # online softmax over the chunk's key tiles (an idle tile's rows see nothing)
            m_i, l_i, acc = tt.softmax_update(
                m_i, l_i, acc, qk, v, qk_scale, vs if KV_SCALE else 1.0, DOT, KV_SCALE, True
            )

        o, lse = tt.softmax_finish(m_i, l_i, acc, True)
        # partials: OP[entry, g, :], LP[entry, g]
        tt.store_slot_partial(OP, LP, o, lse, ent, g, row_ok, offs_d, G, D)


def plan_routing(chunk_idx: torch.Tensor, num_chunks: int, group_size: int, block_m: int):
    """CSR of the routing, on chunk_idx's device with no host sync.

    chunk_idx[T,Hkv,k]: -1 (or out of range) is padding; a chunk repeated in one row counts once.
    Returns (order, offsets, tile_group, tile_start, sanitized chunk_idx):
      order[E]: flat entry indices sorted by group (c * Hkv + h), padding last;
      offsets[Hkv*C + 1]: group g's entries are order[offsets[g]:offsets[g+1]];
      tile_group[num_tiles]: the group of each tile of block_m rows, group_size rows an entry
        (num_groups: an idle tile);
      tile_start[Hkv*C]: the first tile of each group.
    """
    hkv = chunk_idx.shape[1]
    dev = chunk_idx.device
    idx = chunk_idx.long()
    idx = torch.where((idx < 0) | (idx >= num_chunks), -1, idx)
    # duplicates within a row would be attended twice: sort the row, blank repeats
    idx, _ = idx.sort(dim=-1)
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[..., 1:] = (idx[..., 1:] == idx[..., :-1]) & (idx[..., 1:] >= 0)
    idx = torch.where(dup, -1, idx)
    num_groups = num_chunks * hkv
    head = torch.arange(hkv, device=dev).view(1, hkv, 1)
    # group key: chunk-major, so all heads of a chunk (adjacent in memory) run together
    key = torch.where(idx >= 0, idx * hkv + head, num_groups).flatten()
    sorted_key, order = torch.sort(key, stable=True)
    offsets, tile_group, tile_start, _ = group_tiles(sorted_key, num_groups, group_size, block_m)
    return (
        order.to(torch.int32),
        offsets.to(torch.int32),
        tile_group.to(torch.int32),
        tile_start.to(torch.int32),
        idx,
    )


def _config(call: RoutedCall, chunk_size: int, config: dict | None = None) -> dict:
    """Launch configuration of a routed call; `config` (bench sweeps: {"BLOCK_M", "BLOCK_N",
    "num_warps", "num_stages"}) replaces the default on the GPU."""
    t, g, top_k, num_chunks, interp = call.t, call.g, call.top_k, call.num_chunks, call.interp
    if config is not None and not interp:
        return dict(config)
    # expected entries per group ~ T * k / C: size the entry block to it, 16..128 rows a tile
    # H100 sweep at N=128K, B=256, 25% (docs/KERNELS.md): 64-row blocks, 64-key tiles and 4
    # warps (1.37 ms) beat 128-row blocks with 8 warps (1.64 ms): these programs are short
    # (one chunk), so more of them per SM hide load latency better than bigger tiles do
    per_group = max(1, t * top_k // max(1, num_chunks))
    block_m = max(16, min(64, triton.next_power_of_2(per_group * g)))
    widest = 32 if interp else 64
    block_n = max(16, min(widest, triton.next_power_of_2(chunk_size)))
    if interp:
        return dict(BLOCK_M=block_m, BLOCK_N=block_n)
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m >= 128 else 4, num_stages=3
    )


# `impl` of shared_attention_routed: "auto": the rule below; "grouped":
# shared_routed_grouped.py (plan/run, spans of chunks); "union": shared_routed_union.py;
# "scatter": this module's kernel (the first design).
IMPLS = ("auto", "grouped", "union", "scatter")


def _use_grouped(q, chunk_idx) -> bool:
    """The grouped kernel (plan/run) serves every routed call; the older designs stay for the
    bench's comparison (H200 figures: docs/KERNELS.md)."""
    return True


def _use_union(q, k, chunk_idx, chunk_size) -> bool:
    """Union-of-chunks kernel (no per-chunk partials) vs this scatter kernel (partials per
    (row, chosen chunk)). H100, N=128K, 25%, uniform / Zipf / clustered alike
    (bench/results/attention_routed.json): union wins at B=1, 8, 32 (chunk 64 and 128) and at
    B=128, 256 with chunk 64 (1.12 vs 1.32 ms, 1.98 vs 2.20 ms); scatter wins at B=128, 256
    with chunk 128 (0.85 vs 1.05 ms, 1.36 vs 1.91 ms) and, from the earlier bench, chunk 256.
    Shapes only, so no host sync."""
    return not (chunk_size >= 128 and q.shape[0] >= 128)


def shared_attention_routed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_idx: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    plan=None,
    impl: str = "auto",
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.shared_attention(q, k, v, chunk_idx, ...)`.
    `plan` (a `shared_routed_grouped.RoutedPlan` of this chunk_idx) runs the grouped kernel.
    `impl` (one of IMPLS) picks the design, "auto" the served one; `config`: the chosen
    kernel's launch configuration in place of its default (bench sweeps).

    q[T,Hq,d] fp16/bf16; k, v[N,Hkv,d] in q's dtype or fp8 e4m3 with scales [Hkv] or [C,Hkv];
    chunk_idx[T,Hkv,top_k] int (-1 = padding). Returns (o[T,Hq,d] q.dtype, lse[T,Hq] float32).
    Partials are kept in q's dtype (halves their traffic; each is a normalized average, so
    rounding it costs what rounding the output costs).
    """
    from .combine import merge_slots

    assert impl in IMPLS, impl
    if plan is not None or impl == "grouped" or (impl == "auto" and _use_grouped(q, chunk_idx)):
        from .shared_routed_grouped import shared_attention_grouped

        return shared_attention_grouped(
            q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale, plan, config=config
        )
    if impl == "union" or (impl == "auto" and _use_union(q, k, chunk_idx, chunk_size)):
        from .shared_routed_union import shared_attention_routed_union

        return shared_attention_routed_union(
            q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale, config=config
        )
    call, done = prepare_routed(q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale)
    if done:
        return call.o, call.lse
    cfg = _config(call, chunk_size, config)
    order, offsets, tile_group, tile_start, _ = plan_routing(
        chunk_idx, call.num_chunks, call.g, cfg["BLOCK_M"]
    )
    o_part, lse_part = slot_partials(call)
    ops = operands(call, k_scale, v_scale, o_part, lse_part)
    _shared_routed_kernel[(tile_group.numel(),)](
        ops.io,
        order,
        offsets,
        tile_group,
        tile_start,
        call.n,
        chunk_size,
        call.num_chunks * call.hkv,
        ops.qk_scale,
        ops.strides,
        HKV=call.hkv,
        TOPK=call.top_k,
        G=call.g,
        D=call.d,
        **ops.consts,
        **cfg,
    )
    # merge each (token, head)'s k slots: rows (t*Hkv+h, g), parts = slots
    merge_slots(o_part, lse_part, call.o, call.lse)
    return call.o, call.lse
