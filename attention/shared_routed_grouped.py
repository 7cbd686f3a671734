"""Routed shared attention, queries grouped by chunk span, with a plan/run split.

The routing is inverted as an MoE layer inverts expert choice (MoBA's varlen kernel does the
same): a device-side *plan* sorts every (token, KV head, chosen span) entry by the span it
reads, so the queries of one span sit together (CSR offsets per (span, KV head)); the *run*
kernel gives each program tiles of one span's queries (all Hq/Hkv query heads of a token as MMA
rows), loads the span's K/V once for the tile and writes one 16-bit partial (o, lse) per
(token, query head, span); `combine.py` merges a row's partials by log-sum-exp.

The kernel's granularity is a *span* of S consecutive selection chunks (S = 1: one chunk). A row
that chose several chunks of one span gets one partial for all of them (merged in registers), so
partial traffic falls by the chunks chosen per span; a row that chose only some of a span's
chunks has the others masked (-inf). Inside a span's group the entries are ordered by their
mask of chosen chunks, so rows with the same choices share a tile, and a tile skips every chunk
none of its rows chose.

The plan depends only on chunk_idx (and shapes): the engine builds it once per decode step for
all layers that share a selection (`RoutedPlan`), as FlashInfer's plan/run wrappers do. It is
torch ops on the device with grids bounded from shapes alone: no host sync, CUDA-graph safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _triton as tt
from ._triton import HAS_TRITON, tl, triton
from .launch import cdiv, sms
from .routed_call import group_tiles, operands, prepare_routed, slot_partials

if HAS_TRITON:

    @triton.jit
    def _load_q(
        Q,
        SH,
        INV,
        ent,
        t,
        hq,
        row_ok,
        offs_d,
        sq,
        D: tl.constexpr,
        SHIFT: tl.constexpr,
    ):
        """The tile's query rows; with SHIFT (virtual positions) each row rotated by R(-shift)
        of its entry, so that q . k == R(-s) q . k == q . R(s) k: the chunk's keys as if RoPE had
        put them `shift` positions later (half-rotation layout, fp32 angles)."""
        q = tt.load_q_rows(Q, t, hq, row_ok, offs_d, sq)
        if SHIFT:
            HALF: tl.constexpr = D // 2
            partner = tt.load_q_rows(Q, t, hq, row_ok, (offs_d + HALF) % D, sq)
            partner = partner.to(tl.float32)
            rot = tl.where((offs_d < HALF)[None, :], -partner, partner)  # cat(-q2, q1)
            sh = tl.load(SH + ent, mask=row_ok, other=0).to(tl.float32)
            ang = sh[:, None] * tl.load(INV + offs_d % HALF)[None, :]
            q = q.to(tl.float32) * tl.cos(ang) - rot * tl.sin(ang)
        return q

    @triton.jit
    def _routed_grouped_kernel(
        IO,
        ORDER,
        MASKS,
        TILES,
        SH,
        INV,
        N,
        num_groups,
        max_tiles,
        qk_scale,
        ST,
        HKV: tl.constexpr,
        SLOTS: tl.constexpr,
        S: tl.constexpr,
        CHUNK: tl.constexpr,
        CHUNK_K: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        KV_SCALE: tl.constexpr,
        DOT: tl.constexpr,
        PERSIST: tl.constexpr,
        EVEN: tl.constexpr,
        SHIFT: tl.constexpr,
    ):
        Q, K, V, KS, VS, OP, LP = IO
        OFFSETS, TILE_GROUP, TILE_START, TOTAL = TILES
        sq, sk, sv, ss = ST
        pid = tl.program_id(0)
        if PERSIST:
            # a fixed grid walks the live tiles (their count is on the device)
            n_tiles = tl.load(TOTAL)
            step = tl.num_programs(0)
        else:
            n_tiles = tl.minimum(tl.load(TOTAL), max_tiles)
            step = max_tiles
        offs_d = tl.arange(0, D)
        offs_n0 = tl.arange(0, BLOCK_N)
        for tile in range(pid, n_tiles, step):
            grp = tl.load(TILE_GROUP + tile)
            sp = grp // HKV
            h = grp % HKV
            # the group's rows are (entry, member g of the GQA group), G per entry
            r_lo = tl.load(OFFSETS + grp) * G + (tile - tl.load(TILE_START + grp)) * BLOCK_M
            r_hi = tl.load(OFFSETS + grp + 1) * G
            rows = r_lo + tl.arange(0, BLOCK_M)
            row_ok = rows < r_hi
            e = rows // G
            g = rows % G
            # an entry is a flat index (token * HKV + h) * SLOTS + slot; it addresses the
            # partial (64-bit: T * Hkv * slots * G * d elements can pass 2^31)
            ent = tl.load(ORDER + e, mask=row_ok, other=0).to(tl.int64)
            chose = tl.load(MASKS + ent, mask=row_ok, other=0)  # bit j: chunk sp*S+j chosen
            t = ent // (HKV * SLOTS)
            q = _load_q(Q, SH, INV, ent, t, h * G + g, row_ok, offs_d, sq, D, SHIFT).to(DOT)
            m_i, l_i, acc = tt.softmax_start(BLOCK_M, D)
            for j in tl.static_range(S):
                sel = ((chose >> j) & 1) != 0
                if tl.max(sel.to(tl.int32), 0) > 0:  # some row of the tile chose this chunk
                    c = sp * S + j
                    if KV_SCALE:
                        ks, vs = tt.load_chunk_scales(KS, VS, c, h, ss)
                    base = c.to(tl.int64) * CHUNK
                    for start in tl.static_range(0, CHUNK_K, BLOCK_N):
                        offs_n = base + start + offs_n0
                        if EVEN:
                            k = tl.load(K + offs_n[:, None] * sk[0] + h * sk[1] + offs_d[None, :])
                            v = tl.load(V + offs_n[:, None] * sv[0] + h * sv[1] + offs_d[None, :])
                        else:
                            n_ok = (start + offs_n0 < CHUNK) & (offs_n < N)
                            k, v = tt.load_kv(K, V, h, offs_n, offs_d, n_ok, sk, sv)
                        qk = tl.dot(q, tl.trans(k.to(DOT)))
                        if KV_SCALE:
                            qk = qk * ks
                        if EVEN:
                            if S > 1:
                                qk = tl.where(sel[:, None], qk, float("-inf"))
                        else:
                            qk = tl.where(sel[:, None] & n_ok[None, :], qk, float("-inf"))
                        # rows masked off (chunks they did not choose) may see nothing
                        pv = vs if KV_SCALE else 1.0  # fp8: p's factor, the chunk's v scales
                        m_i, l_i, acc = tt.softmax_update(
                            m_i, l_i, acc, qk, v, qk_scale, pv, DOT, KV_SCALE, True
                        )
            o, lse = tt.softmax_finish(m_i, l_i, acc, True)
            tt.store_slot_partial(OP, LP, o, lse, ent, g, row_ok, offs_d, G, D)

    @triton.jit
    def _routed_stationary_kernel(
        IO,
        ORDER,
        TILES,
        SH,
        INV,
        N,
        qk_scale,
        ST,
        HKV: tl.constexpr,
        SLOTS: tl.constexpr,
        CHUNK: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        RT: tl.constexpr,
        KV_SCALE: tl.constexpr,
        DOT: tl.constexpr,
        SHIFT: tl.constexpr,
    ):
        """Span 1, one key tile per chunk (CHUNK <= BLOCK_N): the chunk's K/V are loaded once
        and stay on chip while the program walks up to RT row tiles of its queries; each tile is
        one exact softmax (no running rescale: the tile sees all of the chunk's keys)."""
        Q, K, V, KS, VS, OP, LP = IO
        OFFSETS, TILE_GROUP, TILE_START, TOTAL = TILES
        sq, sk, sv, ss = ST
        tile = tl.program_id(0)
        if tile < tl.load(TOTAL):
            grp = tl.load(TILE_GROUP + tile)
            c = grp // HKV
            h = grp % HKV
            r_lo = tl.load(OFFSETS + grp) * G + (tile - tl.load(TILE_START + grp)) * (BLOCK_M * RT)
            r_hi = tl.minimum(tl.load(OFFSETS + grp + 1) * G, r_lo + BLOCK_M * RT)
            offs_d = tl.arange(0, D)
            offs_c = tl.arange(0, BLOCK_N)
            offs_n = c.to(tl.int64) * CHUNK + offs_c
            n_ok = (offs_c < CHUNK) & (offs_n < N)
            k, v = tt.load_kv(K, V, h, offs_n, offs_d, n_ok, sk, sv)
            k, v = k.to(DOT), v.to(DOT)
            if KV_SCALE:
                ks, vs = tt.load_chunk_scales(KS, VS, c, h, ss)
            for r0 in range(r_lo, r_hi, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < r_hi
                e = rows // G
                g = rows % G
                ent = tl.load(ORDER + e, mask=row_ok, other=0).to(tl.int64)
                t = ent // (HKV * SLOTS)
                q = _load_q(Q, SH, INV, ent, t, h * G + g, row_ok, offs_d, sq, D, SHIFT).to(DOT)
                qk = tl.dot(q, tl.trans(k))
                if KV_SCALE:
                    qk = qk * ks
                qk = tl.where(n_ok[None, :], qk, float("-inf"))
                m = tl.max(qk, 1) * qk_scale
                p = tl.exp2(qk * qk_scale - m[:, None])
                l_i = tl.sum(p, 1)
                if KV_SCALE:
                    p = p * vs
                # one exact softmax: the tile's (m, l, acc) are final
                o, lse = tt.softmax_finish(m, l_i, tl.dot(p.to(DOT), v), False)
                tt.store_slot_partial(OP, LP, o, lse, ent, g, row_ok, offs_d, G, D)


@dataclass
class RoutedPlan:
    """Device-side routing metadata of one selection, reusable by every layer that shares it.

    Entries are (token, KV head, slot): slot s of a row is its s-th chosen span.
      order[E]: flat entry indices sorted by (span, KV head), then by chosen-chunk mask, token;
      masks[E]: per entry (by flat index), bit j set when chunk span*S+j was chosen;
      offsets[Hkv*NS + 1]: CSR, group (span * Hkv + h)'s entries are order[offsets[g]:...];
      tile_group / tile_start: each tile's group, each group's first tile; total[1]: live tiles.
    """

    order: torch.Tensor
    masks: torch.Tensor
    offsets: torch.Tensor
    tile_group: torch.Tensor
    tile_start: torch.Tensor
    total: torch.Tensor
    t: int
    hkv: int
    slots: int
    g: int
    span: int  # S: selection chunks per kernel span
    num_chunks: int
    block_m: int
    shifts: torch.Tensor | None = None  # [E] int32 per-entry position shift (virtual positions)

    def tiles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(offsets, tile_group, tile_start, total): the CSR and tiles, the `TILES` argument of
        both run kernels."""
        return self.offsets, self.tile_group, self.tile_start, self.total


def plan_grouped(
    chunk_idx: torch.Tensor,
    num_chunks: int,
    group_size: int,
    span: int,
    block_m: int,
    chunk_shift: torch.Tensor | None = None,
) -> RoutedPlan:
    """Build the plan of `chunk_idx[T, Hkv, k]` (-1 or out of range: padding; repeats count
    once) on its device, without a host sync. `chunk_shift[T, Hkv, k]` (beside chunk_idx,
    virtual positions; spans of one chunk only) is carried per entry."""
    t, hkv, top_k = chunk_idx.shape
    dev = chunk_idx.device
    idx = chunk_idx.long()
    idx = torch.where((idx < 0) | (idx >= num_chunks), num_chunks, idx)
    idx, perm = idx.sort(dim=-1)  # padding (= num_chunks) last
    valid = idx < num_chunks
    sp = torch.where(valid, idx // span, -1)
    first = valid.clone()
    first[..., 1:] &= sp[..., 1:] != sp[..., :-1]  # a new span starts (repeats merge into it)
    slot = torch.cumsum(first.to(torch.int32), dim=-1) - 1  # rank of the span in its row
    # a row's slots are columns 0..k-1; padding (and, for the span ids, every entry that is
    # not its span's first) goes to a spare column k, dropped afterwards
    n_spans = cdiv(num_chunks, span)
    col = torch.where(valid, slot, top_k)
    dup = torch.zeros_like(valid)
    dup[..., 1:] = valid[..., 1:] & (idx[..., 1:] == idx[..., :-1])
    bit = torch.where(valid & ~dup, torch.ones_like(idx) << (idx % span), 0)
    masks = torch.zeros(t, hkv, top_k + 1, dtype=torch.int64, device=dev)
    masks.scatter_add_(2, col, bit)
    span_of = torch.full((t, hkv, top_k + 1), n_spans, dtype=torch.int64, device=dev)
    span_of.scatter_(2, torch.where(first, slot, top_k), torch.where(first, sp, n_spans))
    masks, span_of = masks[..., :top_k], span_of[..., :top_k]
    shifts = None
    if chunk_shift is not None:
        assert span == 1, "per-chunk shifts need spans of one chunk"
        sh = chunk_shift.long().gather(-1, perm)
        shifts = torch.zeros(t, hkv, top_k + 1, dtype=torch.int64, device=dev)
        shifts.scatter_(2, torch.where(first, slot, top_k), torch.where(first, sh, 0))
        shifts = shifts[..., :top_k].flatten().to(torch.int32)
    live = span_of < n_spans
    masks = torch.where(live, masks, 0)
    head = torch.arange(hkv, device=dev).view(1, hkv, 1)
    num_groups = n_spans * hkv
    grp = torch.where(live, span_of * hkv + head, num_groups)
    tok = torch.arange(t, device=dev).view(t, 1, 1)
    mbits = 1 << span
    key = (grp * mbits + masks) * t + tok
    sorted_key, order = torch.sort(key.flatten())
    offsets, tile_group, tile_start, tile_end = group_tiles(
        sorted_key // (mbits * t), num_groups, group_size, block_m
    )
    return RoutedPlan(
        order.to(torch.int32),
        masks.flatten().to(torch.int32),
        offsets.to(torch.int32),
        tile_group.clamp_max(num_groups - 1).to(torch.int32),
        tile_start.to(torch.int32),
        tile_end[-1:].to(torch.int32),
        t,
        hkv,
        top_k,
        group_size,
        span,
        num_chunks,
        block_m,
        shifts,
    )


def choose_config(
    t: int,
    g: int,
    top_k: int,
    num_chunks: int,
    chunk_size: int,
    interp: bool,
    config: dict | None = None,
) -> dict:
    """Launch configuration from shapes alone (so that plan and run agree, and nothing syncs);
    `config` ({"span", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "persist", "rt"}:
    bench sweeps, tests) updates the default; plan and run must be given the same."""
    per_group = max(1, t * top_k // max(1, num_chunks))  # expected entries per (chunk, head)
    if interp:
        cfg = dict(
            span=1,
            BLOCK_M=16 if per_group * g <= 16 else 32,
            BLOCK_N=max(8, min(16, triton.next_power_of_2(chunk_size))),
            persist=False,
            rt=0,
        )
    else:
        block_m = max(16, min(64, triton.next_power_of_2(per_group * g)))
        block_n = max(16, min(128, triton.next_power_of_2(chunk_size)))
        # H200, N=128K, B=256, 25%, chunk 128 (bench/results/attention.json, granularity study):
        # K/V-stationary programs of up to 8 row tiles of 64, 4 warps, 3 stages beat one tile
        # per program (0.79x -> 1.16x of dense); chunks past one key tile walk the key tiles
        stationary = chunk_size <= block_n
        cfg = dict(
            span=1,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=4,
            num_stages=3 if stationary else 2,
            persist=False,
            rt=8 if stationary else 0,
        )
    if config is not None:
        cfg.update(config)
    return cfg


def plan_for(
    chunk_idx: torch.Tensor,
    num_chunks: int,
    g: int,
    chunk_size: int,
    interp: bool | None = None,
    chunk_shift: torch.Tensor | None = None,
    config: dict | None = None,
) -> RoutedPlan:
    """The plan `shared_attention_grouped` would build for this selection (build it once and
    pass it to every layer, with the same `config`)."""
    if interp is None:
        interp = chunk_idx.device.type != "cuda"
    t, _, top_k = chunk_idx.shape
    cfg = choose_config(t, g, top_k, num_chunks, chunk_size, interp, config)
    if chunk_shift is not None:
        cfg["span"] = 1
    return plan_grouped(
        chunk_idx, num_chunks, g, cfg["span"], _plan_tile(cfg, chunk_size), chunk_shift
    )


def _stationary(cfg: dict, chunk_size: int) -> bool:
    """The K/V-stationary kernel serves spans of one chunk that fit one key tile."""
    return cfg.get("rt", 0) > 0 and cfg["span"] == 1 and chunk_size <= cfg["BLOCK_N"]


def _plan_tile(cfg: dict, chunk_size: int) -> int:
    """Rows of one plan tile (one program): BLOCK_M, or RT row tiles of it (stationary)."""
    return cfg["BLOCK_M"] * (cfg["rt"] if _stationary(cfg, chunk_size) else 1)


def shared_attention_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_idx: torch.Tensor | None,
    chunk_size: int = 64,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    plan: RoutedPlan | None = None,
    chunk_shift: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.shared_attention(q, k, v, chunk_idx, ..., chunk_shift,
    rope_inv_freq)`; `plan` (from `plan_for` on the same chunk_idx, chunk_shift and `config`)
    skips the plan step. chunk_idx may be None when a plan is given (only its shape is read
    otherwise). `config`: see `choose_config`."""
    from .combine import merge_slots

    if chunk_idx is None:
        assert plan is not None
        chunk_idx = torch.empty(plan.t, plan.hkv, plan.slots, dtype=torch.int32, device=q.device)
    call, done = prepare_routed(q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale)
    if done:
        return call.o, call.lse
    q, k, v, t, hq, d, n, hkv, top_k, g, scale, num_chunks, o, lse, interp = call.unpack()
    cfg = choose_config(t, g, top_k, num_chunks, chunk_size, interp, config)
    if chunk_shift is not None and plan is not None and plan.shifts is None:
        plan = None  # a plan built without the shifts cannot serve them
    if chunk_shift is not None or (plan is not None and plan.shifts is not None):
        cfg["span"] = 1
        assert rope_inv_freq is not None, "virtual positions need the model's rope_inv_freq"
    if plan is None:
        plan = plan_grouped(
            chunk_idx, num_chunks, g, cfg["span"], _plan_tile(cfg, chunk_size), chunk_shift
        )
    shift_on = plan.shifts is not None
    sh_t = plan.shifts if shift_on else plan.order
    inv = rope_inv_freq.to(q.device, torch.float32).contiguous() if shift_on else lse
    assert (plan.t, plan.hkv, plan.slots, plan.g, plan.num_chunks) == (t, hkv, top_k, g, num_chunks)
    assert plan.block_m == _plan_tile(cfg, chunk_size)
    stationary = _stationary(cfg, chunk_size)
    cfg = dict(cfg)
    cfg.pop("span")
    persist = cfg.pop("persist")
    rt = cfg.pop("rt", 0)
    block_m = cfg.pop("BLOCK_M")
    # tl.dot needs K >= 16 (8 is enough under the interpreter); a short chunk masks the rest
    block_n = min(cfg.pop("BLOCK_N"), max(8 if interp else 16, triton.next_power_of_2(chunk_size)))
    o_part, lse_part = slot_partials(call)
    ops = operands(call, k_scale, v_scale, o_part, lse_part)
    # the constexprs both run kernels take
    common = dict(
        HKV=hkv,
        SLOTS=top_k,
        CHUNK=chunk_size,
        G=g,
        D=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SHIFT=shift_on,
        **ops.consts,
        **cfg,
    )
    max_tiles = plan.tile_group.numel()
    if stationary:
        _routed_stationary_kernel[(max_tiles,)](
            ops.io,
            plan.order,
            plan.tiles(),
            sh_t,
            inv,
            n,
            ops.qk_scale,
            ops.strides,
            RT=rt,
            **common,
        )
    else:
        grid = min(max_tiles, 4 * sms(q.device)) if persist else max_tiles
        _routed_grouped_kernel[(grid,)](
            ops.io,
            plan.order,
            plan.masks,
            plan.tiles(),
            sh_t,
            inv,
            n,
            cdiv(num_chunks, plan.span) * hkv,
            max_tiles,
            ops.qk_scale,
            ops.strides,
            S=plan.span,
            CHUNK_K=cdiv(chunk_size, block_n) * block_n,
            PERSIST=persist,
            EVEN=chunk_size % block_n == 0 and n % chunk_size == 0,
            **common,
        )
    merge_slots(o_part, lse_part, o, lse)
    return o, lse
