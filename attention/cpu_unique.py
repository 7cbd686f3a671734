"""CPU path of `unique_attention`: a step of decode rows (one new token per request) attends all
their pages in one padded batch (one GEMM pair); a lone decode row, or rows beside requests with
none, one GEMM pair each with no mask; requests with several new tokens (prefill) take the causal
reference. Same contract as `reference.unique_attention` (the tests compare them)."""

from __future__ import annotations

import math

import torch

from .gathered import attend_gathered, attend_gathered_batch
from .reference import NEG_INF, twin_of
from .reference import unique_attention as reference_unique


@twin_of(reference_unique)
def unique_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale=None):
    """Causal attention of each request's new tokens over its own paged KV (see the reference)."""
    t, hq, d = q.shape
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    if any(cu[b + 1] - cu[b] > 1 for b in range(len(lens))):
        return reference_unique(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale)
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if t == len(lens) > 1 and min(lens) > 0:  # every request decodes one token: one batched pass
        return _decode_batch(q, k_cache, v_cache, block_table, lens, scale)
    o = torch.zeros(t, hq, d, dtype=q.dtype)
    lse = torch.full((t, hq), NEG_INF, dtype=torch.float32)
    for b, kv_len in enumerate(lens):
        if cu[b + 1] == cu[b] or kv_len == 0:
            continue
        blocks = block_table[b, : -(-kv_len // bs)].long()
        k_b = k_cache.index_select(0, blocks).view(-1, hkv, d)[:kv_len].float()
        v_b = v_cache.index_select(0, blocks).view(-1, hkv, d)[:kv_len].float()
        rows = slice(cu[b], cu[b + 1])
        o[rows], lse[rows] = attend_gathered(
            q[rows], k_b.permute(1, 2, 0), v_b.transpose(0, 1), scale
        )
    return o, lse


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lens: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B decode rows (row b is request b's one new token) over their pages, gathered into one
    padded batch: one GEMM pair for all of them instead of one per request."""
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    nb = -(-max(lens) // bs)
    pages = block_table[:, :nb].long().reshape(-1)
    k_b = k_cache.index_select(0, pages).view(b, nb * bs, hkv, d).float()
    v_b = v_cache.index_select(0, pages).view(b, nb * bs, hkv, d).float()
    lengths = torch.tensor(lens)
    # slots past a request's length are pages never written (any bits, NaN too): their scores are
    # masked, their values zeroed (0 x NaN is NaN)
    v_b.masked_fill_((torch.arange(nb * bs)[None, :] >= lengths[:, None])[:, :, None, None], 0.0)
    return attend_gathered_batch(q, k_b.permute(0, 2, 3, 1), v_b.transpose(1, 2), lengths, scale)
