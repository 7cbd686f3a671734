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
from .launch import strides

if HAS_TRITON:

    @triton.jit
    def _combine_kernel(
        OP,
        LP,
        O,
        LSE,
        R2,
        P,
        so,
        sl,
        s_or,
        s_lr,
        D: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        r = tl.program_id(0)  # one output row per program: P x d partials in, d out
        s_o1, s_o2, s_op = so  # the partials' strides: (row, row, part); then the lse's
        s_l1, s_l2, s_lp = sl
        r1 = (r // R2).to(tl.int64)  # rows x parts x d can pass 2^31 elements
        r2 = r % R2
        offs_d = tl.arange(0, D)
        offs_p0 = tl.arange(0, BLOCK_P)
        lp = LP + r1 * s_l1 + r2 * s_l2
        op = OP + r1 * s_o1 + r2 * s_o2
        # pass 1: the row's max lse (P floats, cheap), so that pass 2 has no running rescale
        # and its loads of o (the bulk of the bytes) are independent of each other
        m = tl.full([BLOCK_P], float("-inf"), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + offs_p0
            m = tl.maximum(m, tl.load(lp + offs_p * s_lp, mask=offs_p < P, other=float("-inf")))
        m_row = tl.max(m, 0)
        m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)  # all parts empty: no NaN
        # pass 2: o = sum_p exp(lse_p - m) o_p / sum_p exp(lse_p - m)
        l_sum = tl.zeros([BLOCK_P], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + offs_p0
            lse = tl.load(lp + offs_p * s_lp, mask=offs_p < P, other=float("-inf"))
            live = lse > float("-inf")
            o = tl.load(
                op + offs_p[:, None] * s_op + offs_d[None, :], mask=live[:, None], other=0.0
            ).to(tl.float32)
            w = tl.where(live, tl.exp(lse - m_ref), 0.0)
            l_sum += w
            acc += tl.sum(w[:, None] * o, 0)
        total = tl.sum(l_sum, 0)
        has = total > 0
        out = acc / tl.where(has, total, 1.0)
        lse_out = tl.where(has, m_ref + tl.log(tl.where(has, total, 1.0)), float("-inf"))
        tl.store(O + r * s_or + offs_d, out)
        tl.store(LSE + r * s_lr, lse_out)


def combine(
    o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
) -> None:
    """o_part[R, P, d] or [R1, R2, P, d] (any strides, d contiguous), lse_part[R(1,R2), P]
    float32 -> writes o[R1*R2, d] (its dtype) and lse[R1*R2] in place."""
    if o_part.dim() == 3:
        o_part, lse_part = o_part.unsqueeze(1), lse_part.unsqueeze(1)
    r1, r2, p, d = o_part.shape
    assert o_part.stride(3) == 1 and o.stride(1) == 1
    if r1 * r2 == 0:
        return
    # enough parts per step to keep ~16 KB of loads in flight per program
    block_p = max(2, min(max(2, 8192 // d), triton.next_power_of_2(p)))
    _combine_kernel[(r1 * r2,)](
        o_part,
        lse_part,
        o,
        lse,
        r2,
        p,
        *strides(o_part, lse_part, dims=3),
        o.stride(0),
        lse.stride(0),
        D=d,
        BLOCK_P=block_p,
    )


def split_parts(
    o: torch.Tensor, lse: torch.Tensor, splits: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
    """Where a split-KV kernel writes its partials of o[T, Hq, d], lse[T, Hq]: with one split o
    and lse themselves (the kernel writes the answer), else float32 o_part[T, Hq, splits, d] and
    lse_part[T, Hq, splits] for `merge_splits`; with each one's (token, head, split) strides, the
    kernel's stride arguments (the split stride 0 for one split)."""
    if splits == 1:
        return o, lse, (o.stride(0), o.stride(1), 0), (lse.stride(0), lse.stride(1), 0)
    t, hq, d = o.shape
    o_part = torch.empty(t, hq, splits, d, dtype=torch.float32, device=o.device)
    lse_part = torch.empty(t, hq, splits, dtype=torch.float32, device=o.device)
    so, sl = strides(o_part, lse_part, dims=3)
    return o_part, lse_part, so, sl


def merge_splits(
    o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
) -> None:
    """Writes o[T, Hq, d], lse[T, Hq] from `split_parts`'s partials (each row's splits merged);
    nothing to do where the kernel wrote them itself (one split)."""
    if o_part is o:
        return
    t, hq, splits, d = o_part.shape
    combine(
        o_part.view(t * hq, splits, d),
        lse_part.view(t * hq, splits),
        o.view(t * hq, d),
        lse.view(t * hq),
    )


def merge_slots(
    o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
) -> None:
    """Writes o[T, Hq, d], lse[T, Hq] from a routed kernel's partials, one per (token, KV head,
    slot, member g of the GQA group): o_part[T, Hkv, top_k, G, d], lse_part[T, Hkv, top_k, G];
    each (token, query head) row merges its top_k slots."""
    t, hkv, top_k, g, d = o_part.shape
    combine(
        o_part.view(t * hkv, top_k, g, d).transpose(1, 2),
        lse_part.view(t * hkv, top_k, g).transpose(1, 2),
        o.view(t * hkv * g, d),
        lse.view(t * hkv * g),
    )
