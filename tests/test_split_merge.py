"""Attention over [shared ; unique] computed in two parts and merged by log-sum-exp equals
attention over the concatenation (the identity the whole design rests on)."""

from __future__ import annotations

import math

import pytest
import torch

from attention.reference import merge, shared_attention, unique_attention


def _full(q, k, v, q_pos, kv_pos):
    """Plain causal attention of q over k, v by absolute position, GQA by head repetition."""
    hq, hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    s = torch.einsum("thd,nhd->thn", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill((kv_pos[None, :] > q_pos[:, None])[:, None, :], float("-inf"))
    return torch.einsum("thn,nhd->thd", torch.softmax(s, -1), v)


@pytest.mark.parametrize(
    "n_shared,lens,hq,hkv,d,block",
    [
        (37, [1, 5], 4, 4, 16, 4),
        (100, [3, 1, 8], 8, 2, 32, 16),
        (64, [12], 9, 3, 64, 8),
        (5, [1], 6, 1, 8, 2),
    ],
)
def test_split_then_merge_equals_concatenation(n_shared, lens, hq, hkv, d, block):
    g = torch.Generator().manual_seed(n_shared)
    ks = torch.randn(n_shared, hkv, d, generator=g, dtype=torch.float64)
    vs = torch.randn(n_shared, hkv, d, generator=g, dtype=torch.float64)
    # each request: its unique tokens are all "new" this step (prefill) except for a 2-token history
    hist = 2
    total = [hist + n for n in lens]
    nblocks = sum(-(-t // block) for t in total)
    kc = torch.zeros(nblocks, block, hkv, d, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    table = torch.zeros(len(lens), max(-(-t // block) for t in total), dtype=torch.int32)
    qs, uk, uv, next_block = [], [], [], 0
    for b, t in enumerate(total):
        ku = torch.randn(t, hkv, d, generator=g, dtype=torch.float64)
        vu = torch.randn(t, hkv, d, generator=g, dtype=torch.float64)
        for j in range(-(-t // block)):
            table[b, j] = next_block
            n = min(block, t - j * block)
            kc[next_block, :n], vc[next_block, :n] = (
                ku[j * block : j * block + n],
                vu[j * block : j * block + n],
            )
            next_block += 1
        qs.append(torch.randn(lens[b], hq, d, generator=g, dtype=torch.float64))
        uk.append(ku)
        uv.append(vu)
    q = torch.cat(qs)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    o_s, lse_s = shared_attention(q, ks, vs, None, chunk_size=16)
    o_u, lse_u = unique_attention(q, kc, vc, table, torch.tensor(total, dtype=torch.int32), cu)
    o, _ = merge(o_s, lse_s, o_u, lse_u)
    for b, t in enumerate(total):
        k_all, v_all = torch.cat([ks, uk[b]]), torch.cat([vs, uv[b]])
        kv_pos = torch.arange(n_shared + t)
        q_pos = torch.arange(n_shared + hist, n_shared + t)
        ref = _full(qs[b], k_all, v_all, q_pos, kv_pos)
        # the references compute in float32 whatever the input dtype
        torch.testing.assert_close(o[cu[b] : cu[b + 1]], ref, atol=2e-5, rtol=1e-4)


def test_merge_with_empty_side_is_identity():
    g = torch.Generator().manual_seed(0)
    o = torch.randn(3, 2, 8, generator=g)
    lse = torch.randn(3, 2, generator=g)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    mo, mlse = merge(o, lse, empty_o, empty_lse)
    torch.testing.assert_close(mo, o)
    torch.testing.assert_close(mlse, lse)
    mo, mlse = merge(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.isinf(mlse).all() and (mo == 0).all()
