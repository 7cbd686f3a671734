"""Unique attention: each request's new tokens, causally, over its own paged KV.

A program owns one request, one KV head, one block of the request's query rows (token x GQA
member, so the group shares every K/V tile) and one split of the key range. Keys are gathered
through the block table a tile at a time. Decode (one new token per request) with few requests
gives few programs, so long KV is split across programs like flash-decoding and the partials
are reduced by `combine.py`; a split that a row cannot see (causality) leaves lse = -inf there.
"""

from __future__ import annotations

import math

import torch

from . import _triton as tt
from ._triton import HAS_TRITON, tl, triton
from .launch import cdiv, check_device, dot_dtype, sms, strides

LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _paged_kernel(
        Q,
        KC,
        VC,
        BT,
        SEQ,
        CUQ,
        O,
        LSE,
        split_len,
        qk_scale,
        ST,
        HKV: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT: tl.constexpr,
    ):
        sq, skc, svc, sbt, so, sl = ST  # sbt: the block table's stride per request
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        s = tl.program_id(2)
        b = bh // HKV
        h = bh % HKV
        q_lo = tl.load(CUQ + b)
        q_len = tl.load(CUQ + b + 1) - q_lo
        kv_len = tl.load(SEQ + b)

        # rows: (new token i of request b, member g of the GQA group)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        i = rows // G
        g = rows % G
        row_ok = i < q_len
        pos = kv_len - q_len + i  # absolute position of each new token: sees keys <= pos
        offs_d = tl.arange(0, D)
        t = q_lo + i
        q = tt.load_q_rows(Q, t, h * G + g, row_ok, offs_d, sq).to(DOT)

        m_i, l_i, acc = tt.softmax_start(BLOCK_M, D)
        # keys of this split, cut at the last position any row of the block may see
        last = kv_len - q_len + tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len * G) // G
        n_lo = s * split_len
        n_hi = tl.minimum(n_lo + split_len, tl.minimum(last + 1, kv_len))
        n_hi = tl.maximum(n_hi, n_lo)
        offs_n0 = tl.arange(0, BLOCK_N)
        for start in range(n_lo, n_hi, BLOCK_N):
            offs_n = start + offs_n0
            n_ok = offs_n < n_hi
            # gather: position -> (page from the block table, slot in the page)
            page = tl.load(BT + b * sbt + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
            slot = offs_n % PAGE
            k = tt.load_page_tile(KC, page, slot, h, skc, offs_d, n_ok)
            v = tt.load_page_tile(VC, page, slot, h, svc, offs_d, n_ok)
            qk = tl.dot(q, tl.trans(k.to(DOT))) * qk_scale
            vis = n_ok[None, :] & (offs_n[None, :] <= pos[:, None])
            qk = tl.where(vis, qk, float("-inf"))
            # qk is already scaled (scale 1.0 here: exact); a row may have seen nothing yet
            m_i, l_i, acc = tt.softmax_update(m_i, l_i, acc, qk, v, 1.0, 1.0, DOT, False, True)

        o, lse = tt.softmax_finish(m_i, l_i, acc, True)
        tt.store_split_rows(O, LSE, o, lse, t, h * G + g, s, row_ok, offs_d, so, sl)


def unique_attention_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float | None = None,
    splits: int | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.unique_attention` (same arguments; `splits` forces the number
    of key-range splits, for tests). The grid is sized by the longest query run and KV length:
    pass `max_seqlen_q` / `max_seqlen_k` (the engine knows them) to skip reading them from the
    device (a host sync, which also rules out CUDA-graph capture)."""
    from .combine import merge_splits, split_parts

    check_device(q)
    t, hq, d = q.shape
    num_blocks, page, hkv, _ = k_cache.shape
    b = seq_lens.shape[0]
    assert hq % hkv == 0 and d in (16, 32, 64, 128, 256)
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    if t == 0:
        return o, lse
    q = q.contiguous()
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    cu = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    seq = seq_lens.to(device=q.device, dtype=torch.int32)
    bt = block_table.to(device=q.device, dtype=torch.int32)
    max_q = int((cu[1:] - cu[:-1]).max()) if max_seqlen_q is None else max_seqlen_q
    max_kv = int(seq.max()) if max_seqlen_k is None else max_seqlen_k
    if max_kv == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    interp = q.device.type != "cuda"
    block_m = max(16, min(64 if interp else 128, triton.next_power_of_2(max_q * g)))
    block_n = 16 if interp else 64
    num_m = cdiv(max_q * g, block_m)
    n_tiles = cdiv(max_kv, block_n)
    if splits is None:
        # flash-decoding: split the keys until the programs fill the GPU twice over
        splits = max(1, min(cdiv(2 * sms(q.device), num_m * b * hkv), n_tiles // 4))
    splits = max(1, min(splits, n_tiles))
    split_len = cdiv(n_tiles, splits) * block_n
    splits = cdiv(max_kv, split_len)
    o_part, lse_part, so, sl = split_parts(o, lse, splits)
    cfg = {} if interp else dict(num_warps=8 if block_m >= 128 else 4, num_stages=3)
    _paged_kernel[(num_m, b * hkv, splits)](
        q,
        k_cache,
        v_cache,
        bt,
        seq,
        cu,
        o_part,
        lse_part,
        split_len,
        scale * LOG2E,
        (*strides(q), *strides(k_cache, v_cache, dims=3), bt.stride(0), so, sl),
        HKV=hkv,
        G=g,
        D=d,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT=dot_dtype(q.dtype, q.device),
        **cfg,
    )
    merge_splits(o_part, lse_part, o, lse)
    return o, lse
