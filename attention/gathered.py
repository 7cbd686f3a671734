"""Attention over a request's own copy of the shared chunks it chose (CPU decode of selecting
requests).

A request that chose its passages once (kb/engine/selection.py) reads the same few chunks at every
step; on the CPU, gathering and rotating them every step and layer costs more than attending them.
`gather_chunks` copies the chosen chunks' keys and values once, in float32, keys already rotated
to their virtual positions; `attend_gathered` is then one GEMM pair per layer. Same result as
`reference.shared_attention(q, k, v, chunk_idx, chunk_size, chunk_shift=...)` with every row's
chunk_idx the chosen list (the tests compare them).
"""

from __future__ import annotations

import math

import torch

from .reference import dequantize, rope_rotate


def gather_chunks(
    k: torch.Tensor,
    v: torch.Tensor,
    chunks: torch.Tensor,
    chunk_size: int,
    shift: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of chunks[K] (ids into k, v[N, Hkv, d]) as head-major float32 k^T [Hkv, d, S]
    and v [Hkv, S, d] (S: the chunks' tokens, a last partial chunk cut at N); keys rotated by their
    chunk's shift[K] (virtual positions; needs rope_inv_freq). fp8 KV: k_scale / v_scale as in
    `shared_attention` ([Hkv] or [C, Hkv])."""
    n, hkv, d = k.shape
    chunks = chunks.long()
    tok = (chunks[:, None] * chunk_size + torch.arange(chunk_size)).reshape(-1)
    keep = tok < n
    tok = tok[keep]
    chunk_of = tok // chunk_size
    kf = _dequant_rows(k.index_select(0, tok), k_scale, chunk_of)
    vf = _dequant_rows(v.index_select(0, tok), v_scale, chunk_of)
    if shift is not None and bool((shift != 0).any()):
        assert rope_inv_freq is not None, "shifted chunks need the model's RoPE frequencies"
        per_tok = shift.long().repeat_interleave(chunk_size)[keep]
        kf = rope_rotate(kf, per_tok[:, None].expand(-1, hkv), rope_inv_freq)
    return kf.permute(1, 2, 0).contiguous(), vf.transpose(0, 1).contiguous()


def _dequant_rows(
    x: torch.Tensor, scale: torch.Tensor | None, chunk_of: torch.Tensor
) -> torch.Tensor:
    """Float32 of gathered rows x[S, Hkv, d]; `scale` None, [Hkv] or [C, Hkv] (by chunk_of[S])."""
    if scale is None or scale.dim() == 1:
        return dequantize(x, scale, 1)
    return x.float() * scale.float()[chunk_of][:, :, None]


def attend_gathered(
    q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q[T, Hq, d] over gathered kt[Hkv, d, S], v[Hkv, S, d] (`gather_chunks`), no
    mask (shared tokens precede every query). Returns (o[T, Hq, d] in q.dtype, lse[T, Hq] f32)."""
    t, hq, d = q.shape
    hkv = kt.shape[0]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = (q.float() * scale).view(t, hkv, g, d).transpose(0, 1).reshape(hkv, t * g, d)
    s = torch.bmm(qh, kt)  # [Hkv, T*G, S]
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    o = torch.bmm(torch.exp_(s.sub_(lse)), v)  # [Hkv, T*G, d]
    o = o.view(hkv, t, g, d).transpose(0, 1).reshape(t, hq, d)
    return o.to(q.dtype), lse.view(hkv, t, g).transpose(0, 1).reshape(t, hq)


def stack_gathered(
    copies: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several requests' copies (`gather_chunks`) as one batch: k^T [R, Hkv, d, S], v [R, Hkv, S,
    d] zero-padded to the longest, and lengths [R] (int64)."""
    s = max(kt.shape[-1] for kt, _ in copies)
    hkv, d = copies[0][0].shape[:2]
    kt = torch.zeros(len(copies), hkv, d, s)
    v = torch.zeros(len(copies), hkv, s, d)
    for i, (k_i, v_i) in enumerate(copies):
        kt[i, :, :, : k_i.shape[-1]] = k_i
        v[i, :, : v_i.shape[1]] = v_i
    return kt, v, torch.tensor([k_i.shape[-1] for k_i, _ in copies])


def attend_gathered_batch(
    q: torch.Tensor,
    kt: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per request, q[R, Hq, d], each over its own stacked copy kt[R, Hkv, d, S],
    v[R, Hkv, S, d] (`stack_gathered`; tokens past lengths[R] are padding): the decode step of R
    selecting requests in one GEMM pair. Returns (o[R, Hq, d] in q.dtype, lse[R, Hq] f32)."""
    r, hq, d = q.shape
    hkv = kt.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = (q.float() * scale).view(r, hkv, hq // hkv, d)
    s = torch.matmul(qh, kt)  # [R, Hkv, G, S]
    if lengths is not None and bool((lengths < kt.shape[-1]).any()):
        pad = torch.arange(kt.shape[-1])[None, :] >= lengths[:, None]
        s.masked_fill_(pad[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    o = torch.matmul(torch.exp_(s.sub_(lse)), v)  # [R, Hkv, G, d]
    return o.reshape(r, hq, d).to(q.dtype), lse.reshape(r, hq)
