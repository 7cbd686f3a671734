"""Torch references of the attention contracts (DESIGN.md, `attention/`).

Every Triton kernel in this package has a twin here with the same signature; the tests compare
them over a grid of shapes and dtypes. These functions are also the CPU path of the engine.

Conventions (all functions):
- `q[T, Hq, d]`: T query tokens (all requests of a step, packed), Hq query heads.
- keys/values have Hkv heads; query head h reads KV head `h // (Hq // Hkv)` (GQA).
- `lse[T, Hq]` is the natural-log sum of exp(scaled scores), float32; `-inf` where a query saw
  no key. `o` has q's dtype; a query that saw no key gets `o = 0`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

NEG_INF = float("-inf")


def twin_of(contract: Callable, leading: int | None = None) -> Callable[[Callable], Callable]:
    """Declare a function the twin of `contract` (a reference, or another twin): the one place
    its signature is written. The twin takes the contract's parameters (the first `leading`, or
    all) by the same names, in the same order, with the same defaults, and may add its own;
    checked when the module is imported. It gets the contract's annotations of them."""
    ref = list(inspect.signature(contract).parameters.values())[:leading]

    def check(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        names = [p.name for p in ref]
        assert [n for n in params if n in names] == names, (fn.__qualname__, names)
        for p in ref:
            assert params[p.name].default == p.default, (fn.__qualname__, p.name)
            if p.name in contract.__annotations__:
                fn.__annotations__.setdefault(p.name, contract.__annotations__[p.name])
        if "return" in contract.__annotations__:
            fn.__annotations__.setdefault("return", contract.__annotations__["return"])
        return fn

    return check


def dequantize(x: torch.Tensor, scale: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    """Float32 view of a stored KV tensor `[N, Hkv, d]`.

    `scale` is None (fp16/bf16), `[Hkv]` (per head) or `[C, Hkv]` (per chunk and head), the
    factor an fp8 e4m3 value is multiplied by.
    """
    xf = x.float()
    if scale is None:
        return xf
    scale = scale.float()
    if scale.dim() == 1:
        return xf * scale[None, :, None]
    per_token = scale.repeat_interleave(chunk_size, dim=0)[: x.shape[0]]
    return xf * per_token[:, :, None]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in float32 with GQA by grouping the queries (no copy of K/V).

    q[T,Hq,d], k/v[N,Hkv,d], mask broadcastable to [T,Hkv,1,N] (True = keep).
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(t, hkv, hq // hkv, d)  # query head h reads KV head h // (Hq // Hkv)
    s = torch.einsum("tkgd,nkd->tkgn", qg, k.float()) * scale
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # [T, Hkv, G]
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    p = torch.nan_to_num(p, nan=0.0)
    o = torch.einsum("tkgn,nkd->tkgd", p, v.float())
    return o.reshape(t, hq, d), lse.reshape(t, hq)


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_idx: torch.Tensor | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    chunk_shift: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the shared KV, dense or routed; no causal mask.

    q[T,Hq,d]; k,v[N,Hkv,d]; chunk_idx[T,Hkv,top_k] (int, chunk c covers tokens
    [c*chunk_size, (c+1)*chunk_size); -1 entries are ignored) or None for dense.
    Virtual positions: `chunk_shift[T,Hkv,top_k]` (int, beside chunk_idx) attends each listed
    chunk's keys as if RoPE had placed them `shift` positions later, i.e. keys rotated by
    R(shift) with the model's `rope_inv_freq[d/2]` (equivalently the query by R(-shift)); the
    stored KV is untouched.
    Returns (o[T,Hq,d] in q.dtype, lse[T,Hq] float32).
    """
    t, hq, d = q.shape
    n, hkv, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kf = dequantize(k, k_scale, chunk_size)
    vf = dequantize(v, v_scale, chunk_size)
    if chunk_shift is not None and chunk_idx is not None:
        return _shifted(q, kf, vf, chunk_idx, chunk_shift, rope_inv_freq, chunk_size, scale)
    mask = None
    if chunk_idx is not None:
        num_chunks = (n + chunk_size - 1) // chunk_size
        sel = torch.zeros(t, hkv, num_chunks + 1, dtype=torch.bool, device=q.device)
        idx = chunk_idx.long().clone()
        idx[idx < 0] = num_chunks  # padding lands in a spare column that is dropped
        sel.scatter_(2, idx, True)
        sel = sel[:, :, :num_chunks]
        token_chunk = torch.arange(n, device=q.device) // chunk_size
        mask = sel[:, :, token_chunk].unsqueeze(2)  # [T, Hkv, 1, N]: one choice per GQA group
    o, lse = _attend(q, kf, vf, mask, scale)
    return o.to(q.dtype), lse


def rope_rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x[..., d] rotated by RoPE (half-rotation layout) through shift[...] more positions, float32
    (R(a) R(b) = R(a + b), so a post-RoPE key at p becomes one at p + shift)."""
    freqs = shift.to(torch.float64)[..., None] * inv_freq.to(device=x.device, dtype=torch.float64)
    emb = torch.cat([freqs, freqs], dim=-1)
    xf = x.float()
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return xf * emb.cos().float() + rot * emb.sin().float()


def _shifted(q, kf, vf, chunk_idx, chunk_shift, inv_freq, chunk_size, scale):
    """Routed attention with a position shift per listed chunk: each row's keys are rotated by
    its own shifts (a per-row copy; the reference's plain way)."""
    t, hq, d = q.shape
    n, hkv, _ = kf.shape
    num_chunks = (n + chunk_size - 1) // chunk_size
    idx = chunk_idx.long().clone()
    idx[idx < 0] = num_chunks
    sel = torch.zeros(t, hkv, num_chunks + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(2, idx, True)
    shift = torch.zeros(t, hkv, num_chunks + 1, dtype=torch.long, device=q.device)
    shift.scatter_(2, idx, chunk_shift.long())
    token_chunk = torch.arange(n, device=q.device) // chunk_size
    keep = sel[:, :, token_chunk]  # [T, Hkv, N]
    per_tok = shift[:, :, token_chunk]  # [T, Hkv, N]
    kr = rope_rotate(kf.permute(1, 0, 2)[None], per_tok, inv_freq)  # [T, Hkv, N, d]
    qg = q.float().view(t, hkv, hq // hkv, d)
    s = torch.einsum("tkgd,tknd->tkgn", qg, kr) * scale
    s = s.masked_fill(~keep[:, :, None, :], NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.nan_to_num(
        torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min)), nan=0.0
    )
    o = torch.einsum("tkgn,nkd->tkgd", p, vf)
    return o.reshape(t, hq, d).to(q.dtype), lse.reshape(t, hq)


def unique_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each request's new tokens over its own paged KV.

    q[T,Hq,d]: the new tokens of B requests, packed; request b owns rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1]. k_cache, v_cache[num_blocks, block_size, Hkv, d];
    block_table[B, max_blocks] (int32, block ids of each request in order); seq_lens[B]: the
    request's KV length including its new tokens (already written into the cache). New token i of
    a request with q_len new tokens sits at position seq_len - q_len + i and sees positions <= it.
    Returns (o[T,Hq,d] in q.dtype, lse[T,Hq] float32).
    """
    t, hq, d = q.shape
    block_size = k_cache.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((t, hq), NEG_INF, dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        q_b = q[cu[b] : cu[b + 1]]
        q_len, kv_len = q_b.shape[0], lens[b]
        if q_len == 0 or kv_len == 0:
            continue
        n_blocks = (kv_len + block_size - 1) // block_size
        blocks = block_table[b, :n_blocks].long()
        k_b = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:kv_len]
        v_b = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:kv_len]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        kv_pos = torch.arange(kv_len, device=q.device)
        mask = (kv_pos[None, :] <= q_pos[:, None])[:, None, None, :]  # causal: [T, 1, 1, N]
        o_b, lse_b = _attend(q_b, k_b, v_b, mask, scale)
        o[cu[b] : cu[b + 1]] = o_b
        lse[cu[b] : cu[b + 1]] = lse_b
    return o.to(q.dtype), lse


def merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets by log-sum-exp.

    o*[T,H,d], lse*[T,H]. Either side may be empty (lse = -inf).
    """
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w1 = torch.exp(lse1 - safe).unsqueeze(-1)
    w2 = torch.exp(lse2 - safe).unsqueeze(-1)
    # an empty side's o is not part of the result (it may be unwritten memory)
    o = torch.where(w1 > 0, o1.float() * w1, 0.0) + torch.where(w2 > 0, o2.float() * w2, 0.0)
    return o.to(o1.dtype), lse


def route(q: torch.Tensor, centroids: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k chunks per query token and KV head by inner product with the chunk centroids.

    q[T,Hq,d]; centroids[C,Hkv,d] (one summary key per chunk and KV head). The queries of a GQA
    group are summed first, so the score of chunk c is the group's total affinity to its centroid
    (and the same inner product a FAISS IndexFlatIP over the centroids computes).
    Returns chunk_idx[T,Hkv,min(top_k, C)] (int32), best first.
    """
    t, hq, d = q.shape
    c, hkv, _ = centroids.shape
    qg = q.float().view(t, hkv, hq // hkv, d).sum(dim=2)  # [T, Hkv, d]
    scores = torch.einsum("thd,chd->thc", qg, centroids.float())
    k = min(top_k, c)
    return scores.topk(k, dim=-1).indices.to(torch.int32)


def chunk_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    chunk_size: int,
    skip: int = 0,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, C] softmax mass of q[T, Hq, d] on each chunk of k[N, Hkv, d] (scale 1/sqrt(d)), summed
    over query heads: exp(score - lse) summed over the chunk's keys, lse[T, Hq] the normalizer of
    the whole attention; the first `skip` keys count nothing. One [T, Hq, N] score matrix."""
    t, hq, d = q.shape
    kf = dequantize(k, k_scale, chunk_size)
    n, hkv, _ = kf.shape
    kf = kf.repeat_interleave(hq // hkv, dim=1)  # [N, Hq, d]
    scores = torch.einsum("thd,nhd->thn", q.float(), kf) / math.sqrt(d)
    p = torch.exp(scores - lse.float()[..., None]).sum(1)  # [T, N]
    p[:, :skip] = 0
    c = (n + chunk_size - 1) // chunk_size
    p = torch.cat([p, p.new_zeros(t, c * chunk_size - n)], dim=1)
    return p.view(t, c, chunk_size).sum(-1)
