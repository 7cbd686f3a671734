"""CPU path of `shared_attention`: a blocked online softmax that reads only what it attends.

Same contract as `reference.shared_attention` (the tests compare them). Where the reference
scores every query against every key and masks, this path:
- walks the keys in blocks of `block` tokens (dequantized to float32 one block at a time, so
  16-bit KV is never copied whole and a block's scores stay in cache), with the GQA group's
  queries stacked as the rows of one GEMM per KV head;
- when routed, groups the query rows that chose the same chunks (after sorting and dropping
  repeats and -1 padding) and, per group, gathers only the chosen chunks' keys and values, block
  by block. A request whose prefill shares one selection per KV head (request-level routing)
  is one group: one gather and dense GEMMs over its chunks. Rows of distinct selections (decode
  tokens of different requests, token-level prefill) each gather their own chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

SCORE_BYTES = 1 << 20  # per thread: one block's scores [Hkv, rows, block] kept about L2-sized
MAX_BLOCK = 16384
_Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # k, v [Hkv, B, d] f32; bias


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_idx: torch.Tensor | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block: int | None = None,
    *,
    chunk_shift: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q[T,Hq,d] over k,v[N,Hkv,d], dense (chunk_idx None) or routed by
    chunk_idx[T,Hkv,top_k]; `chunk_shift` (beside chunk_idx) attends each chunk's keys rotated
    by its position shift (virtual positions: `reference.shared_attention`).
    Returns (o[T,Hq,d] in q.dtype, lse[T,Hq] float32)."""
    t, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block = block_size(t * g, hkv, chunk_size) if block is None else block
    block = max(
        chunk_size, block // chunk_size * chunk_size
    )  # whole chunks: per-chunk scales align
    qh = (q.float() * scale).view(t, hkv, g, d).permute(1, 0, 2, 3)  # [Hkv, T, G, d]
    if chunk_idx is None:
        o, lse = _online(
            qh.reshape(hkv, t * g, d), _dense_blocks(k, v, k_scale, v_scale, chunk_size, block)
        )
        return _to_tokens(o, lse, t, hq, d, q.dtype)
    o = torch.empty(hkv, t, g, d, dtype=torch.float32)
    lse = torch.empty(hkv, t, g, dtype=torch.float32)
    groups = selection_groups(chunk_idx, chunk_shift)
    if len(groups) > 1 and k_scale is None and v_scale is None:
        # decode: one row per request, each with its own full selection -> one batched pass
        singles = [
            x for x in groups if x[0] is not None and x[0].numel() == 1 and bool((x[1] >= 0).all())
        ]
        if len(singles) > 1:
            _single_rows(qh, k, v, chunk_size, singles, rope_inv_freq, o, lse)
            done = {id(x) for x in singles}
            groups = [x for x in groups if id(x) not in done]
    for rows, sel, shift in groups:
        qr = qh if rows is None else qh.index_select(1, rows)
        r = qr.shape[1]
        blocks = _routed_blocks(k, v, k_scale, v_scale, chunk_size, block, sel)
        qc = None
        if shift is not None and bool(
            (shift != 0).any()
        ):  # virtual positions: q by R(-shift) per chunk
            width = int((sel >= 0).sum(-1).max())
            qc = _per_chunk_queries(
                qr.reshape(hkv, r * g, d), shift[:, shift.shape[1] - width :], rope_inv_freq
            )
        o_g, lse_g = _online(qr.reshape(hkv, r * g, d), blocks, qc, chunk_size)
        if rows is None:
            o, lse = o_g.view(hkv, t, g, d), lse_g.view(hkv, t, g)
        else:
            o.index_copy_(1, rows, o_g.view(hkv, r, g, d))
            lse.index_copy_(1, rows, lse_g.view(hkv, r, g))
    return _to_tokens(o.reshape(hkv, t * g, d), lse.reshape(hkv, t * g), t, hq, d, q.dtype)


def _single_rows(
    qh: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cs: int,
    groups: list,
    inv_freq: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    rows_per_pass: int = 16,
) -> None:
    """Rows that each attend their own full chunk list (decode tokens of requests that chose their
    passages): gathered and attended together, a few GEMMs per pass instead of a dozen small ops per
    row; results written into o[Hkv, T, G, d], lse[Hkv, T, G]."""
    from .reference import rope_rotate

    n, hkv, d = k.shape
    g = qh.shape[2]
    kf, vf = _rows(k), _rows(v)
    heads = torch.arange(hkv)[None, :, None]
    for p0 in range(0, len(groups), rows_per_pass):
        part = groups[p0 : p0 + rows_per_pass]
        width = max(x[1].shape[1] for x in part)
        sel = torch.stack(
            [F.pad(x[1], (width - x[1].shape[1], 0), value=-1) for x in part]
        )  # [R, Hkv, K]
        rows = torch.cat([x[0] for x in part])
        r = rows.shape[0]
        tok = (sel.clamp_min(0)[..., None] * cs + torch.arange(cs)).reshape(r, hkv, width * cs)
        valid = (sel[..., None] >= 0).expand(r, hkv, width, cs).reshape(r, hkv, width * cs) & (
            tok < n
        )
        full = n // cs
        if bool((sel == sel[:, :1]).all()) and bool((sel < full).all()) and k.element_size() > 1:
            # one list for all KV heads (a request's selection): gather whole chunks, not rows
            ids = sel[:, 0].reshape(-1)
            kb = k[: full * cs].view(full, cs, hkv, d).index_select(0, ids).float()
            vb = v[: full * cs].view(full, cs, hkv, d).index_select(0, ids).float()
            kb = kb.view(r, width, cs, hkv, d).permute(0, 3, 1, 2, 4)  # [R, Hkv, K, cs, d]
            vb = vb.view(r, width * cs, hkv, d).transpose(1, 2)
        else:
            flat = (tok.clamp_max(n - 1) * hkv + heads).reshape(-1)
            kb = kf.index_select(0, flat).view(k.dtype).view(r, hkv, width, cs, d).float()
            vb = vf.index_select(0, flat).view(v.dtype).view(r, hkv, width * cs, d).float()
        q = qh.index_select(1, rows).permute(1, 0, 2, 3)  # [R, Hkv, G, d]
        shifts = [x[2] for x in part]
        if any(sh is not None for sh in shifts) and inv_freq is not None:
            sh = torch.stack(
                [
                    F.pad(
                        x if x is not None else torch.zeros_like(y[1]), (width - y[1].shape[1], 0)
                    )
                    for x, y in zip(shifts, part)
                ]
            )  # [R, Hkv, K]
            qc = rope_rotate(
                q[:, :, None].expand(r, hkv, width, g, d),
                -sh[..., None].expand(r, hkv, width, g),
                inv_freq,
            )  # [R, Hkv, K, G, d]
            s = torch.einsum("rhkgd,rhkcd->rhgkc", qc, kb).reshape(r, hkv, g, width * cs)
        else:
            s = torch.matmul(
                q, kb.reshape(r, hkv, width * cs, d).transpose(-1, -2)
            )  # [R, Hkv, G, K*cs]
        s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
        mx = s.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        pr = torch.exp(s - mx)
        den = pr.sum(-1, keepdim=True)
        out = torch.matmul(pr, vb) / den.clamp_min(1e-38)  # [R, Hkv, G, d]
        o.index_copy_(1, rows, out.permute(1, 0, 2, 3))
        lse.index_copy_(1, rows, (mx + den.log()).squeeze(-1).permute(1, 0, 2))


def block_size(rows: int, hkv: int, chunk_size: int) -> int:
    """Keys per block: scores of `rows` query rows per KV head fill about SCORE_BYTES per thread
    (measured best on a 2-core AVX-512 host: 1024-2048 keys for a 23-token question)."""
    keys = SCORE_BYTES * torch.get_num_threads() // (4 * hkv * max(1, rows))
    return max(chunk_size, min(MAX_BLOCK, keys // chunk_size * chunk_size))


def selection_groups(
    chunk_idx: torch.Tensor, chunk_shift: torch.Tensor | None = None
) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]]:
    """Rows of chunk_idx[T,Hkv,k] that chose the same chunk set per KV head (and, with
    chunk_shift[T,Hkv,k], the same shifts), as (rows, chunks, shifts): rows [R] (None: all T
    rows), chunks [Hkv, k] ascending with repeats and -1s made -1, shifts [Hkv, k] beside them
    (None without chunk_shift)."""
    t, hkv, kk = chunk_idx.shape
    s, order = chunk_idx.long().sort(dim=-1)
    sh = None if chunk_shift is None else chunk_shift.long().gather(-1, order)
    if kk > 1:
        s[..., 1:] = s[..., 1:].masked_fill(s[..., 1:] == s[..., :-1], -1)
    s, order = s.clamp_min(-1).sort(dim=-1)  # canonical: -1s first, then the chunks ascending
    if sh is not None:
        sh = sh.gather(-1, order).masked_fill(s < 0, 0)
    flat = s.reshape(t, hkv * kk)
    if sh is not None:
        flat = torch.cat([flat, sh.reshape(t, hkv * kk)], dim=1)
    if t == 1 or bool((flat == flat[:1]).all()):
        return [(None, s[0], None if sh is None else sh[0])]
    uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)
    order = inverse.argsort(stable=True)
    counts = torch.bincount(inverse, minlength=uniq.shape[0]).tolist()
    n = hkv * kk
    return [
        (rows, u[:n].view(hkv, kk), None if sh is None else u[n:].view(hkv, kk))
        for u, rows in zip(uniq, order.split(counts))
    ]


def _per_chunk_queries(
    qh: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """qh[Hkv, M, d] rotated by R(-shift) for each chunk's shift[Hkv, m]: [Hkv, m, M, d]. A key at
    p scored by R(-s) q scores as the key at p + s (RoPE depends on the difference only)."""
    from .reference import rope_rotate

    hkv, m = shift.shape
    return rope_rotate(
        qh[:, None].expand(hkv, m, *qh.shape[1:]),
        -shift[:, :, None].expand(hkv, m, qh.shape[1]),
        inv_freq,
    )


def _online(
    qh: torch.Tensor, blocks: Iterator[_Block], qc: torch.Tensor | None = None, cs: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-style softmax of qh[Hkv, M, d] (pre-scaled) over key blocks; returns (o [Hkv,M,d],
    lse [Hkv,M]), o = 0 and lse = -inf for rows that saw no key. `qc[Hkv, m, M, d]`: the query
    per chunk of whole-chunk blocks (virtual positions), used instead of qh."""
    hkv, m, d = qh.shape
    floor = torch.finfo(torch.float32).min
    acc = torch.zeros(hkv, m, d)
    den = torch.zeros(hkv, m, 1)
    mx = torch.full((hkv, m, 1), float("-inf"))
    c0 = 0
    for kb, vb, bias in blocks:
        if qc is None:
            s = torch.bmm(qh, kb.transpose(1, 2))  # [Hkv, M, B]
        else:
            nb = kb.shape[1] // cs
            kc = kb.view(hkv * nb, cs, d)
            q_b = qc[:, c0 : c0 + nb].reshape(hkv * nb, m, d)
            s = (
                torch.bmm(q_b, kc.transpose(1, 2))
                .view(hkv, nb, m, cs)
                .transpose(1, 2)
                .reshape(hkv, m, nb * cs)
            )
            c0 += nb
        if bias is not None:
            s += bias
        new = torch.maximum(mx, s.amax(-1, keepdim=True)).clamp_min_(floor)
        p = torch.exp_(s.sub_(new))
        alpha = torch.exp(mx - new)
        den = den * alpha + p.sum(-1, keepdim=True)
        acc = torch.baddbmm(acc * alpha, p, vb)
        mx = new
    seen = den > 0
    o = torch.where(seen, acc / den.clamp_min(1e-38), 0.0)
    lse = torch.where(seen, mx + den.log(), float("-inf"))
    return o, lse.squeeze(-1)


def _dequant(
    x: torch.Tensor, scale: torch.Tensor | None, chunks: torch.Tensor | slice
) -> torch.Tensor:
    """Float32 of a block x[B, Hkv, d]; `scale` None, [Hkv] or [C, Hkv] indexed by `chunks`."""
    xf = x.float()
    if scale is None:
        return xf
    scale = scale.float()
    return xf * (scale[None, :, None] if scale.dim() == 1 else scale[chunks][:, :, None])


def _dense_blocks(k, v, k_scale, v_scale, cs: int, block: int) -> Iterator[_Block]:
    """Consecutive key blocks of the whole shared KV, head-major float32."""
    n = k.shape[0]
    per_chunk = any(x is not None and x.dim() == 2 for x in (k_scale, v_scale))
    for s in range(0, n, block):
        e = min(n, s + block)
        tok_chunk = torch.arange(s, e) // cs if per_chunk else None
        kb = _dequant(k[s:e], k_scale, tok_chunk)
        vb = _dequant(v[s:e], v_scale, tok_chunk)
        yield kb.transpose(0, 1), vb.transpose(0, 1), None


def _routed_blocks(
    k, v, k_scale, v_scale, cs: int, block: int, sel: torch.Tensor
) -> Iterator[_Block]:
    """Blocks of the chosen chunks sel[Hkv, m] (ascending, -1 = none) of each KV head, gathered
    row by row (whole chunks); slots past the corpus end or of -1 chunks get a -inf bias."""
    n, hkv, d = k.shape
    used = sel >= 0
    width = int(used.sum(-1).max())  # per head, the valid chunks sit last (after the -1s)
    if width == 0:
        return
    sel = sel[:, sel.shape[1] - width :]
    tok = (sel.clamp_min(0)[:, :, None] * cs + torch.arange(cs)).reshape(hkv, width * cs)
    valid = (sel[:, :, None] >= 0).expand(hkv, width, cs).reshape(hkv, width * cs) & (tok < n)
    tok = tok.clamp_max(n - 1)
    rows = tok * hkv + torch.arange(hkv)[:, None]  # row of (token, head) in k.view(N*Hkv, d)
    kf, vf = _rows(k), _rows(v)
    heads = torch.arange(hkv)[:, None]
    masked = not bool(valid.all())
    for s in range(0, width * cs, block):
        r = rows[:, s : s + block]
        flat = r.reshape(-1)
        kb = kf.index_select(0, flat).view(k.dtype).view(hkv, -1, d).float()
        vb = vf.index_select(0, flat).view(v.dtype).view(hkv, -1, d).float()
        if k_scale is not None or v_scale is not None:
            kb, vb = (
                _scale_gathered(kb, k_scale, tok[:, s : s + block] // cs, heads),
                _scale_gathered(vb, v_scale, tok[:, s : s + block] // cs, heads),
            )
        bias = None
        if masked:
            bias = torch.zeros(hkv, 1, r.shape[1]).masked_fill_(
                ~valid[:, None, s : s + block], float("-inf")
            )
        yield kb, vb, bias


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x[N, Hkv, d] as [N*Hkv, d] rows (1-byte fp8 as uint8, which index_select can copy)."""
    x = x.reshape(-1, x.shape[-1])
    return x.view(torch.uint8) if x.element_size() == 1 else x


def _scale_gathered(
    x: torch.Tensor, scale: torch.Tensor | None, chunks: torch.Tensor, heads: torch.Tensor
) -> torch.Tensor:
    """x[Hkv, B, d] gathered fp8 values times their scale ([Hkv] or [C, Hkv])."""
    if scale is None:
        return x
    scale = scale.float()
    if scale.dim() == 1:
        return x * scale[:, None, None]
    return x * scale[chunks, heads][:, :, None]


def _to_tokens(
    o: torch.Tensor, lse: torch.Tensor, t: int, hq: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[Hkv, T*G, d] head-major results back to o[T, Hq, d], lse[T, Hq]."""
    hkv = o.shape[0]
    g = hq // hkv
    o = o.view(hkv, t, g, d).permute(1, 0, 2, 3).reshape(t, hq, d)
    lse = lse.view(hkv, t, g).permute(1, 0, 2).reshape(t, hq)
    return o.to(dtype), lse.contiguous()
