"""Two-way log-sum-exp merge of partial attentions over disjoint key sets (shared + unique).

o = w1 o1 + w2 o2 with w_i = exp(lse_i - lse), lse = logaddexp(lse1, lse2). One fused pass: the
torch reference costs about ten elementwise kernels and float32 temporaries of [T,H,d].
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton
from .launch import cdiv, check_device

if HAS_TRITON:

    @triton.jit
    def _merge_kernel(O1, L1, O2, L2, O, L, R, D: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < R
        offs_d = tl.arange(0, D)
        l1 = tl.load(L1 + rows, mask=ok, other=float("-inf"))
        l2 = tl.load(L2 + rows, mask=ok, other=float("-inf"))
        m = tl.maximum(l1, l2)
        m_ref = tl.where(m == float("-inf"), 0.0, m)  # both empty: weights 0, no NaN
        w1 = tl.exp(l1 - m_ref)
        w2 = tl.exp(l2 - m_ref)
        tot = w1 + w2
        has = tot > 0
        inv = 1.0 / tl.where(has, tot, 1.0)
        # an empty side's o is not read: it may be anything
        o1 = tl.load(
            O1 + rows[:, None] * D + offs_d[None, :], mask=(ok & (w1 > 0))[:, None], other=0.0
        ).to(tl.float32)
        o2 = tl.load(
            O2 + rows[:, None] * D + offs_d[None, :], mask=(ok & (w2 > 0))[:, None], other=0.0
        ).to(tl.float32)
        o = o1 * (w1 * inv)[:, None] + o2 * (w2 * inv)[:, None]
        tl.store(O + rows[:, None] * D + offs_d[None, :], o, mask=ok[:, None])
        tl.store(
            L + rows, tl.where(has, m_ref + tl.log(tl.where(has, tot, 1.0)), float("-inf")), mask=ok
        )


def merge_triton(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.merge`: o*[T,H,d], lse*[T,H] float32 -> (o in o1.dtype, lse)."""
    check_device(o1)
    t, h, d = o1.shape
    assert o2.shape == o1.shape and lse1.shape == lse2.shape == (t, h)
    assert d == triton.next_power_of_2(d)
    o1, o2 = o1.contiguous(), o2.contiguous()
    lse1, lse2 = lse1.float().contiguous(), lse2.float().contiguous()
    o = torch.empty_like(o1)
    lse = torch.empty(t, h, dtype=torch.float32, device=o1.device)
    rows = t * h
    if rows == 0:
        return o, lse
    block_r = max(1, min(64, 8192 // d))
    _merge_kernel[(cdiv(rows, block_r),)](o1, lse1, o2, lse2, o, lse, rows, D=d, BLOCK_R=block_r)
    return o, lse
