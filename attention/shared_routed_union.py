"""Routed shared attention without per-chunk partials: query blocks walk the union of their chunks.

The scatter design (`shared_routed.py`) groups queries per chosen chunk and writes one partial
(o, lse) per (query row, chosen chunk): at B=256, k=256 that is ~1 GB of partial traffic, more
than the KV itself. Here the work is laid out like dense attention instead:

- a program owns one KV head h, one block of BLOCK_M query rows (tokens x the GQA group) and one
  slice of that block's chunk list;
- the chunk list of a (head, block) is the sorted UNION of the chunks its rows chose, built on
  the device (no host sync) as a padded table + count;
- for each listed chunk the program loads the chunk's K/V tiles once, computes scores for all
  its rows and masks (-inf) the rows whose token did not choose the chunk; softmax is online in
  registers, so each row is written once per slice (few slices: only to fill the SMs; their
  (o, lse) are merged by `combine.py`, a few MB at most).

Cost: K/V reads = sum over blocks of |union| chunks; MMA work = rows x |union| (the masked rows
are wasted work). Tokens are ordered per head before blocking (`order="minhash"`) so that
tokens with overlapping chunk sets share a block and the unions shrink where the routing has
structure; with independent uniform choices there is none and the union is every chunk.
"""

from __future__ import annotations

import torch

from . import _triton as tt
from ._triton import HAS_TRITON, tl, triton
from .launch import cdiv, sms
from .reference import twin_of
from .routed_call import operands, prepare_routed
from .shared_routed import shared_attention_routed

LN2 = 0.6931471805599453

if HAS_TRITON:

    @triton.jit
    def _routed_union_kernel(
        IO,
        PERM,
        SEL,
        CLIST,
        CCOUNT,
        USED,
        T,
        N,
        chunk_size,
        tiles_per_chunk,
        n_slices,
        num_chunks,
        t_pad,
        qk_scale,
        ST,
        NBLK: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        KV_SCALE: tl.constexpr,
        DOT: tl.constexpr,
        CONTIG: tl.constexpr,
        EVEN: tl.constexpr,
    ):
        Q, K, V, KS, VS, O, LSE = IO
        sq, sk, sv, ss, so, sl = ST
        pid_m = tl.program_id(0)  # query block (of the head's token order)
        h = tl.program_id(1)  # KV head
        s = tl.program_id(2)  # slice of the block's chunk list

        # rows: (position p in head h's token order, member g of the GQA group)
        # (G need not divide BLOCK_M: the block's last BLOCK_M % G rows idle)
        TPB: tl.constexpr = BLOCK_M // G
        r = tl.arange(0, BLOCK_M)
        pos = pid_m * TPB + r // G
        g = r % G
        row_ok = (r < TPB * G) & (pos < T)
        t = tl.load(PERM + h * t_pad + pos, mask=row_ok, other=0).to(tl.int64)
        offs_d = tl.arange(0, D)
        q = tt.load_q_rows(Q, t, h * G + g, row_ok, offs_d, sq).to(DOT)

        m_i, l_i, acc = tt.softmax_start(BLOCK_M, D)

        # this slice: list entries [e_lo, e_hi) of the (head, block) union, as flat key tiles
        lst = (h * NBLK + pid_m).to(tl.int64)
        if CONTIG:
            # walk a contiguous chunk range; chunks outside the block's union are masked
            # loads (no bytes move) but still computed: addresses stay affine in the loop
            # index, so the loads pipeline like dense attention's
            count = num_chunks
        else:
            count = tl.load(CCOUNT + lst)
        # slices split the block's list (or range) evenly
        slice_len = (count + n_slices - 1) // n_slices
        e_lo = s * slice_len
        e_hi = tl.minimum(e_lo + slice_len, count)
        j_lo = e_lo * tiles_per_chunk
        j_hi = tl.maximum(e_hi * tiles_per_chunk, j_lo)
        sel_row = SEL + h.to(tl.int64) * ((num_chunks + 1) * t_pad) + pos
        offs_n0 = tl.arange(0, BLOCK_N)
        for j in range(j_lo, j_hi):
            e = j // tiles_per_chunk
            in_chunk = (j - e * tiles_per_chunk) * BLOCK_N + offs_n0
            if CONTIG:
                c = e
                offs_n = c.to(tl.int64) * chunk_size + in_chunk
                if EVEN:
                    n_ok = tl.load(USED + lst * num_chunks + c + offs_n0 * 0) != 0
                else:
                    n_ok = (
                        (in_chunk < chunk_size)
                        & (offs_n < N)
                        & (tl.load(USED + lst * num_chunks + c + offs_n0 * 0) != 0)
                    )
            else:
                c = tl.load(CLIST + lst * num_chunks + e)
                offs_n = c.to(tl.int64) * chunk_size + in_chunk
                if EVEN:
                    n_ok = offs_n0 >= 0
                else:
                    n_ok = (in_chunk < chunk_size) & (offs_n < N)
            k, v = tt.load_kv(K, V, h, offs_n, offs_d, n_ok, sk, sv)
            # which rows' tokens chose chunk c: SEL[h, c, pos] (contiguous over the block)
            chose = tl.load(sel_row + c * t_pad, mask=row_ok, other=0) != 0
            qk = tl.dot(q, tl.trans(k.to(DOT)))
            if KV_SCALE:
                ks, vs = tt.load_chunk_scales(KS, VS, c, h, ss)
                qk = qk * ks
            if EVEN:
                qk = tl.where(chose[:, None], qk, float("-inf"))
            else:
                qk = tl.where(chose[:, None] & n_ok[None, :], qk, float("-inf"))
            # a row whose token chose none of the block's chunks so far has seen nothing
            m_i, l_i, acc = tt.softmax_update(
                m_i, l_i, acc, qk, v, qk_scale, vs if KV_SCALE else 1.0, DOT, KV_SCALE, True
            )

        o, lse = tt.softmax_finish(m_i, l_i, acc, True)
        tt.store_split_rows(O, LSE, o, lse, t, h * G + g, s, row_ok, offs_d, so, sl)


def sanitize(chunk_idx: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """int64 copy of chunk_idx with padding and out-of-range entries as -1."""
    idx = chunk_idx.long()
    return torch.where((idx < 0) | (idx >= num_chunks), -1, idx)


def token_order(idx: torch.Tensor, num_chunks: int, order: str) -> torch.Tensor:
    """perm[Hkv, T]: per KV head, the order in which tokens are cut into query blocks.

    'none': as given. 'minhash': sort by (min hash of the chosen set, second min hash), so tokens
    whose chunk sets overlap (Jaccard J: same min hash with probability J) land in one block.
    Pure torch on the device; no host sync."""
    t, hkv, _ = idx.shape
    dev = idx.device
    if order == "none" or t <= 1:
        return torch.arange(t, device=dev, dtype=torch.int32).expand(hkv, t).contiguous()
    big = 1 << 40
    # a fixed pseudo-random permutation of chunk ids (multiplicative hash, 32-bit)
    hsh = (idx * 2654435761 + 97) % (1 << 32)
    hsh = torch.where(idx >= 0, hsh, big)
    two = torch.topk(hsh, min(2, hsh.shape[-1]), dim=-1, largest=False).values  # [T,Hkv,<=2]
    key = two[..., 0] * (1 << 20)
    if two.shape[-1] > 1:
        key = key + (two[..., 1] >> 12)
    perm = torch.argsort(key.t().contiguous(), dim=-1, stable=True)  # [Hkv, T]
    return perm.to(torch.int32)


def plan_union(
    chunk_idx: torch.Tensor,
    num_chunks: int,
    group_size: int,
    block_m: int,
    order: str = "minhash",
    lists: bool = True,
):
    """Device-side plan (no host sync). Returns (perm[Hkv,T_pad] int32, sel[Hkv,C+1,T_pad] uint8 (row C: padding),
    clist[Hkv,NBLK,C] int32 sorted union per block padded with C (None unless lists),
    count[Hkv,NBLK] int32, used[Hkv,NBLK,C] uint8, nblk, t_pad)."""
    t, hkv, top_k = chunk_idx.shape
    dev = chunk_idx.device
    idx = sanitize(chunk_idx, num_chunks)
    tpb = block_m // group_size  # tokens per query block
    nblk = cdiv(t, tpb)
    t_pad = nblk * tpb
    perm = token_order(idx, num_chunks, order)  # [Hkv, T]
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm.long(), torch.arange(t, device=dev, dtype=torch.int32).expand(hkv, t))
    # sel[h, c, pos] = token at position pos of head h's order chose chunk c (row C: padding)
    sel = torch.zeros(hkv, num_chunks + 1, t_pad, dtype=torch.uint8, device=dev)
    c_ = torch.where(idx >= 0, idx, num_chunks)  # [T, Hkv, k]
    pos = inv.t().long().unsqueeze(-1).expand(t, hkv, top_k)  # [T, Hkv, k]
    head = torch.arange(hkv, device=dev).view(1, hkv, 1)
    flat = (head * (num_chunks + 1) + c_) * t_pad + pos
    sel.view(-1).index_fill_(0, flat.flatten(), 1)
    # union per block, as a sorted list padded with C (sort of [chunk id | C] keys)
    used = (
        sel[:, :num_chunks].reshape(hkv, num_chunks, nblk, tpb).amax(-1).transpose(1, 2)
    )  # [Hkv, NBLK, C]
    count = (used > 0).sum(-1, dtype=torch.int32)
    clist = None
    if lists:
        ar = torch.arange(num_chunks, device=dev, dtype=torch.int32)
        clist = torch.where(used > 0, ar, num_chunks).sort(dim=-1).values.to(torch.int32)
        clist = clist.contiguous()
    perm_pad = torch.zeros(hkv, t_pad, dtype=torch.int32, device=dev)
    perm_pad[:, :t] = perm
    return perm_pad, sel, clist, count, used.contiguous(), nblk, t_pad


def _config(rows_per_head: int, chunk_size: int, interp: bool, config: dict | None = None) -> dict:
    """Launch configuration; `config` (bench sweeps: {"BLOCK_M", "BLOCK_N", "num_warps",
    "num_stages", "slices", "contig"}) updates the default on the GPU."""
    if interp:
        block_m = 16 if rows_per_head <= 16 else 32
        return dict(BLOCK_M=block_m, BLOCK_N=max(8, min(16, triton.next_power_of_2(chunk_size))))
    cfg = dict(
        BLOCK_M=128 if rows_per_head >= 512 else 64,
        BLOCK_N=max(
            16, min(128 if rows_per_head >= 512 else 64, triton.next_power_of_2(chunk_size))
        ),
    )
    cfg["num_warps"] = 8 if cfg["BLOCK_M"] >= 128 else 4
    # H100 sweep, B=256, chunk 128 (bench/results/attention_routed.json "sweep"): 3 stages
    # 1.71 ms vs 2 stages 1.92 ms; BLOCK_N 64 1.80; slices 4 / 9 (auto) / 16: 1.77 / 1.92 / 1.79
    cfg["num_stages"] = 3
    if config is not None:
        cfg.update(config)
    return cfg


@twin_of(shared_attention_routed, leading=8)
def shared_attention_routed_union(
    q,
    k,
    v,
    chunk_idx,
    chunk_size=64,
    scale=None,
    k_scale=None,
    v_scale=None,
    order: str = "minhash",
    slices: int | None = None,
    contig: bool | None = None,
    config: dict | None = None,
):
    """Same contract as `shared_routed.shared_attention_routed` (and the reference).
    contig: walk contiguous chunk ranges with unused chunks masked (True) or the union lists
    (False); None: the config's choice. `config`: see `_config` (bench sweeps)."""
    from .combine import merge_splits, split_parts

    call, done = prepare_routed(q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale)
    if done:
        return call.o, call.lse
    q, k, v, t, hq, d, n, hkv, top_k, g, scale, num_chunks, o, lse, interp = call.unpack()
    cfg = _config(t * g, chunk_size, interp, config)
    block_m = cfg.pop("BLOCK_M")
    block_m = max(block_m, triton.next_power_of_2(g))
    use_contig = cfg.pop("contig", True) if contig is None else contig
    cfg.pop("contig", None)
    perm, sel, clist, count, used, nblk, t_pad = plan_union(
        chunk_idx, num_chunks, g, block_m, order, lists=not use_contig
    )
    if clist is None:
        clist = count
    # slices of each block's chunk list: enough programs for ~2 per SM, each slice >= 4 chunks
    want = 4 * sms(q.device)
    n_slices = cfg.pop("slices", None)
    n_slices = slices if slices is not None else n_slices
    if n_slices is None:
        span = num_chunks if use_contig else min(num_chunks, (block_m // g) * top_k)
        n_slices = max(1, min(cdiv(want, nblk * hkv), max(1, span // 4), 64))
    n_slices = max(1, min(n_slices, num_chunks))
    block_n = cfg.pop("BLOCK_N")
    tiles_per_chunk = cdiv(chunk_size, block_n)
    o_part, lse_part, so, sl = split_parts(o, lse, n_slices)
    ops = operands(call, k_scale, v_scale, o_part, lse_part)
    _routed_union_kernel[(nblk, hkv, n_slices)](
        ops.io,
        perm,
        sel,
        clist,
        count,
        used,
        t,
        n,
        chunk_size,
        tiles_per_chunk,
        n_slices,
        num_chunks,
        t_pad,
        ops.qk_scale,
        (*ops.strides, so, sl),
        NBLK=nblk,
        G=g,
        D=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **ops.consts,
        CONTIG=use_contig,
        EVEN=(chunk_size % block_n == 0 and n % chunk_size == 0),
        **cfg,
    )
    merge_splits(o_part, lse_part, o, lse)
    return o, lse


def union_stats(
    chunk_idx: torch.Tensor, num_chunks: int, group_size: int, block_m: int, order: str
) -> dict:
    """Mean union size per query block as a fraction of C, and useful/computed work (the share
    of (row, chunk) products that a row chose). Syncs: for benches and docs only."""
    _, _, _, count, _, nblk, _ = plan_union(
        chunk_idx, num_chunks, group_size, block_m, order, lists=False
    )
    idx = sanitize(chunk_idx, num_chunks)
    chosen = (idx >= 0).sum().item()
    tpb = block_m // group_size
    computed = count.sum().item() * tpb
    return dict(
        order=order,
        block_m=block_m,
        union_frac=round(count.float().mean().item() / num_chunks, 4),
        useful_frac=round(chosen / max(1, computed), 4),
    )
