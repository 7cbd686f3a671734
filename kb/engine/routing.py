"""Chunk routing for one loaded corpus: the preamble's chunks are always attended (they hold the
attention sink), the rest are chosen per query and KV head by the index's router."""

from __future__ import annotations

import torch

from index.router import Router, top_k_for
from index.summaries import ChunkSummaries, chunk_summaries


class CorpusRouter:
    def __init__(self, keys: list[torch.Tensor], chunk_size: int, always: int, kind: str = "mean",
                 summaries: list[ChunkSummaries] | None = None):
        """keys: per layer [N, Hkv, d] after RoPE; `always` leading chunks are never routed.
        `summaries` (per layer, e.g. read from the corpus's stored index) skip computing them."""
        self.always = always
        summaries = summaries or [chunk_summaries(k, chunk_size) for k in keys]
        self.num_chunks = summaries[0].num_chunks
        device = keys[0].device
        vectors = [s.vectors(kind)[always:].to(device=device, dtype=torch.float32).contiguous() for s in summaries]
        self.router = Router(kind, chunk_size, keys[0].shape[0], vectors)

    def top_k(self, density: float) -> int:
        return top_k_for(density, self.num_chunks)

    def route(self, layer: int, q: torch.Tensor, top_k: int) -> torch.Tensor:
        """chunk_idx [T, Hkv, top_k]: the `always` chunks, then the best routed ones."""
        t, hkv = q.shape[0], self.router.num_kv_heads
        routed = self.router.route(layer, q, max(1, top_k - self.always)) + self.always
        fixed = torch.arange(self.always, device=q.device, dtype=routed.dtype).expand(t, hkv, self.always)
        return torch.cat([fixed, routed], dim=-1)
