"""Host-side helpers every kernel launch shares: stride argument lists and the fp8 scales'
layout the routed kernels read."""

from __future__ import annotations

import torch


def strides(*tensors: torch.Tensor, dims: int = 2) -> list[int]:
    """The first `dims` strides of each tensor, in order: a kernel launch's stride arguments."""
    return [t.stride(i) for t in tensors for i in range(dims)]


def chunk_scales(
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    num_chunks: int,
    hkv: int,
    unused: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(ks, vs, stride per chunk, stride per head) of fp8 KV's scales as the routed kernels read
    them: float32 [C, Hkv], a per-head scale broadcast over the chunks; without scales, `unused`
    (never read) twice and strides 0."""
    if k_scale is None:
        return unused, unused, 0, 0
    ks, vs = k_scale.float(), v_scale.float()
    if ks.dim() == 1:  # per head: the same factor for every chunk
        ks, vs = ks.expand(num_chunks, hkv), vs.expand(num_chunks, hkv)
    assert vs.stride() == ks.stride()
    return ks, vs, ks.stride(0), ks.stride(1)
