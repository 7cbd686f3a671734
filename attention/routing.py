"""Routing: top-k chunks per (token, KV head) by inner product with the chunk centroids.

Torch ops on the device: sum the queries of each GQA group, one batched matmul per KV head
([T,d] x [d,C]), then topk. Nothing here waits on the host. No fused kernel: the matmul is
cuBLAS-bound and topk over C columns is torch's own radix select; a fused Triton version would
have to beat both at once, and the score matrix [Hkv, T, C] is small (T x C x Hkv x 4 bytes).
"""

from __future__ import annotations

import torch


def route(q: torch.Tensor, centroids: torch.Tensor, top_k: int) -> torch.Tensor:
    """Same contract as `reference.route`: q[T,Hq,d], centroids[C,Hkv,d] ->
    chunk_idx[T,Hkv,min(top_k, C)] int32, best first."""
    t, hq, d = q.shape
    c, hkv, _ = centroids.shape
    k = min(top_k, c)
    qg = q.float().view(t, hkv, hq // hkv, d).sum(dim=2).transpose(0, 1)  # [Hkv, T, d]
    cent = centroids.float().permute(1, 2, 0)  # [Hkv, d, C]
    scores = torch.bmm(qg, cent)  # [Hkv, T, C]
    return scores.topk(k, dim=-1).indices.transpose(0, 1).to(torch.int32).contiguous()
