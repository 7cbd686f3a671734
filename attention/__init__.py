"""Attention for shared-context serving (DESIGN.md, `attention/`).

The entry points the engine calls take tensors on any device: CUDA tensors (fp16/bf16
queries) go to the Triton kernels; on the CPU `shared_attention` takes `attention.cpu_shared`
(blocked, and routed attention reads only the chosen chunks); everything else goes to the torch
references in `attention.reference`, which define the contracts.

    o_s, lse_s = shared_attention(q, k_shared, v_shared, chunk_idx, chunk_size)  # dense if None
    o_u, lse_u = unique_attention(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q)
    o, lse = merge(o_s, lse_s, o_u, lse_u)
    chunk_idx = route(q, centroids, top_k)
    mass = chunk_mass(q, k_shared, lse, chunk_size)  # [T, C] attention mass per chunk
    kt, vs = gather_chunks(k_shared, v_shared, chunks, chunk_size, shift, inv_freq)  # once
    o_s, lse_s = attend_gathered(q, kt, vs)  # a request's chosen chunks, each step (CPU)

Kernel modules: shared_dense.py, shared_routed*.py, paged.py, lse_merge.py, combine.py (the
split reduction), routing.py; mass.py (chunk_mass, torch); the CPU paths cpu_shared.py,
cpu_unique.py and gathered.py (a request's own copy of the chunks it chose). The kernels' online softmax is one
`@triton.jit` pair in _triton.py (`softmax_update`, `softmax_finish`), beside the routed
kernels' K/V tile load (`load_kv`); the host side of every launch (device check, grid
arithmetic, dot operand type, stride lists, fp8 scale layout) is launch.py. (Not `merge.py` /
`route.py`: importing a submodule binds its name on the package and would shadow these
functions.) Options are arguments (`max_seqlen_q/k` here; a kernel's `impl=` / `config=`), never
module globals.

Triton is imported only when a CUDA tensor arrives, so a CPU process never loads it (and a test
can still choose Triton's interpreter with TRITON_INTERPRET=1 before that).
"""

from __future__ import annotations

import importlib.util

import torch

from . import cpu_shared, cpu_unique, reference
from .gathered import attend_gathered, attend_gathered_batch, gather_chunks, stack_gathered

__all__ = [
    "shared_attention",
    "gather_chunks",
    "attend_gathered",
    "stack_gathered",
    "attend_gathered_batch",
    "plan_routed",
    "unique_attention",
    "chunk_mass",
    "merge",
    "route",
    "reference",
    "use_triton",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(q: torch.Tensor) -> bool:
    """True when `q` (and the tensors beside it) will be served by a Triton kernel."""
    return _HAS_TRITON and q.is_cuda and q.dtype in _KERNEL_DTYPES


def shared_attention(
    q,
    k,
    v,
    chunk_idx=None,
    chunk_size=64,
    scale=None,
    k_scale=None,
    v_scale=None,
    chunk_shift=None,
    rope_inv_freq=None,
    plan=None,
):
    """All queries of a step against the shared KV, dense (chunk_idx None) or routed; with
    `chunk_shift` (virtual positions), each listed chunk at its shift. Contract:
    `reference.shared_attention`. `plan` (from `plan_routed` on the same chunk_idx): routing
    metadata built once for every layer sharing the selection (the CUDA kernel uses it)."""
    if chunk_shift is not None:  # the grouped kernel on CUDA, else the CPU path / reference
        if use_triton(q) and chunk_idx is not None:
            from .shared_routed_grouped import shared_attention_grouped

            return shared_attention_grouped(
                q,
                k,
                v,
                chunk_idx,
                chunk_size,
                scale,
                k_scale,
                v_scale,
                plan,
                chunk_shift,
                rope_inv_freq,
            )
        if q.device.type == "cpu":
            return cpu_shared.shared_attention(
                q,
                k,
                v,
                chunk_idx,
                chunk_size,
                scale,
                k_scale,
                v_scale,
                chunk_shift=chunk_shift,
                rope_inv_freq=rope_inv_freq,
            )
        return reference.shared_attention(
            q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale, chunk_shift, rope_inv_freq
        )
    if use_triton(q):
        if chunk_idx is None and plan is None:
            from .shared_dense import shared_attention_dense

            return shared_attention_dense(q, k, v, chunk_size, scale, k_scale, v_scale)
        from .shared_routed import shared_attention_routed

        return shared_attention_routed(
            q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale, plan
        )
    if q.device.type == "cpu":
        return cpu_shared.shared_attention(q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale)
    return reference.shared_attention(q, k, v, chunk_idx, chunk_size, scale, k_scale, v_scale)


def plan_routed(chunk_idx, num_chunks, group_size, chunk_size, chunk_shift=None):
    """Routing metadata of chunk_idx[T, Hkv, k] for the CUDA routed kernel, built on the device
    without a host sync (graph-capturable): build once per step, hand it to every layer's
    `shared_attention(..., plan=)`. `chunk_shift` (virtual positions, beside chunk_idx) is
    carried in the plan. None off the CUDA path (nothing to plan)."""
    if not (_HAS_TRITON and chunk_idx.is_cuda):
        return None
    from .shared_routed_grouped import plan_for

    return plan_for(chunk_idx, num_chunks, group_size, chunk_size, chunk_shift=chunk_shift)


def unique_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    cu_seqlens_q,
    scale=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
):
    """Causal attention of each request's new tokens over its paged KV.
    Contract: `reference.unique_attention`. `max_seqlen_q` / `max_seqlen_k` (the longest run of
    new tokens, the longest KV length; the engine knows them) spare the CUDA kernel reading them
    back from the device, a host sync per call that would also rule out CUDA-graph capture."""
    if use_triton(q) and k_cache.dtype == q.dtype:
        from .paged import unique_attention_paged

        return unique_attention_paged(
            q,
            k_cache,
            v_cache,
            block_table,
            seq_lens,
            cu_seqlens_q,
            scale,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
        )
    if q.device.type == "cpu":
        return cpu_unique.unique_attention(
            q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale
        )
    return reference.unique_attention(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale
    )


def chunk_mass(q, k, lse, chunk_size, skip=0, k_scale=None):
    """[T, C] softmax mass of each query on each shared chunk, summed over heads (citations),
    with lse the normalizer of the whole attention. Contract: `reference.chunk_mass`; blocked
    torch on every device (attention/mass.py)."""
    from .mass import chunk_mass as blocked

    return blocked(q, k, lse, chunk_size, skip, k_scale)


def merge(o1, lse1, o2, lse2):
    """Log-sum-exp merge of two partial attentions. Contract: `reference.merge`."""
    if use_triton(o1):
        from .lse_merge import merge_triton

        return merge_triton(o1, lse1, o2, lse2)
    return reference.merge(o1, lse1, o2, lse2)


def route(q, centroids, top_k):
    """Top-k chunks per token and KV head. Contract: `reference.route`. On the device this is
    torch (bmm + topk, no host sync); see routing.py for why there is no fused kernel."""
    if q.is_cuda:
        from .routing import route as route_device

        return route_device(q, centroids, top_k)
    return reference.route(q, centroids, top_k)
