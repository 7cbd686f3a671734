"""Reduce P partial attentions per row by log-sum-exp (the second pass of split attention).

Row r's parts are partial results over disjoint key sets: (o_p normalized, lse_p). The full
result is o = sum_p exp(lse_p - lse) o_p with lse = log sum_p exp(lse_p). Parts with
lse = -inf (an empty split, a padding slot never written) weigh nothing; their o is not even
read, so it may hold garbage. Used by dense split-KV (parts = splits), routed (parts = chosen
chunks) and paged split-KV.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _combine_kernel(
        OP, LP, O, LSE, R2, P,
        s_o1, s_o2, s_op, s_l1, s_l2, s_lp, s_or, s_lr,
        D: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        r = tl.program_id(0)  # one output row per program: P x d partials in, d out
        r1 = (r // R2).to(tl.int64)  # rows x parts x d can pass 2^31 elements
        r2 = r % R2
        offs_d = tl.arange(0, D)
        offs_p0 = tl.arange(0, BLOCK_P)
        m = tl.full([1], float("-inf"), tl.float32)
        l_sum = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + offs_p0
            lse = tl.load(LP + r1 * s_l1 + r2 * s_l2 + offs_p * s_lp, mask=offs_p < P,
                          other=float("-inf"))
            live = lse > float("-inf")
            o = tl.load(OP + r1 * s_o1 + r2 * s_o2 + offs_p[:, None] * s_op + offs_d[None, :],
                        mask=live[:, None], other=0.0).to(tl.float32)
            # online merge: rescale what was summed so far to the new max
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-empty so far: no NaN
            w = tl.where(live, tl.exp(lse - m_ref), 0.0)
            alpha = tl.exp(m - m_ref)
            l_sum = l_sum * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(w[:, None] * o, 0)
            m = m_new
        has = l_sum > 0
        out = tl.where(has, acc / tl.where(has, l_sum, 1.0), 0.0)
        lse_out = tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf"))
        tl.store(O + r * s_or + offs_d, out)
        tl.store(LSE + r * s_lr + tl.arange(0, 1), lse_out)


def combine(o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
            ) -> None:
    """o_part[R, P, d] or [R1, R2, P, d] (any strides, d contiguous), lse_part[R(1,R2), P]
    float32 -> writes o[R1*R2, d] (its dtype) and lse[R1*R2] in place."""
    if o_part.dim() == 3:
        o_part, lse_part = o_part.unsqueeze(1), lse_part.unsqueeze(1)
    r1, r2, p, d = o_part.shape
    assert o_part.stride(3) == 1 and o.stride(1) == 1
    if r1 * r2 == 0:
        return
    block_p = min(16, triton.next_power_of_2(p))
    _combine_kernel[(r1 * r2,)](
        o_part, lse_part, o, lse, r2, p,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        o.stride(0), lse.stride(0),
        D=d, BLOCK_P=block_p,
    )
