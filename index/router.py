"""The device path of routing: per-layer chunk vectors on the device, scored with torch each step.

`Router.route` ranks through `attention.route` (group-summed queries, inner product, top-k per
token and KV head: torch bmm + topk on CUDA, `attention.reference.route` elsewhere) and selects
exactly what FAISS's exact search selects over the same vectors (tests/test_index.py). It needs
no FAISS, so the GPU serving path runs without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from attention import route as _route
from index.store import load_summaries
from index.summaries import KINDS, ChunkSummaries, group_query, query_vectors


def top_k_for(density: float, num_chunks: int) -> int:
    """Chunks to attend for a target density (fraction of the corpus's chunks), at least 1."""
    assert 0.0 < density <= 1.0, f"density must be in (0, 1], got {density}"
    return max(1, min(num_chunks, math.ceil(density * num_chunks)))


@dataclass
class Router:
    """One corpus's routing state: per layer, the chunk vectors `[C, Hkv, D]` of `kind` on a device."""

    kind: str
    chunk_size: int
    num_tokens: int
    vectors: list[torch.Tensor]  # per layer: [C, Hkv, d] (mean) or [C, Hkv, 2d] (quest)

    def __post_init__(self) -> None:
        assert self.kind in KINDS, f"unknown router kind {self.kind!r}; expected one of {KINDS}"
        assert len({tuple(v.shape) for v in self.vectors}) <= 1, "layers disagree on shape"

    @classmethod
    def from_summaries(
        cls,
        summaries: Sequence[ChunkSummaries],
        kind: str = "mean",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Router:
        """Move one vector set per layer to `device`; float32 keeps exact agreement with FAISS."""
        assert summaries, "no layers"
        s0 = summaries[0]
        vectors = [s.vectors(kind).to(device=device, dtype=dtype).contiguous() for s in summaries]
        return cls(kind, s0.chunk_size, s0.num_tokens, vectors)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        kind: str = "mean",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Router:
        """Read the summaries a corpus stored with `index.store.save` (no FAISS needed)."""
        return cls.from_summaries(load_summaries(folder), kind, device, dtype)

    @property
    def num_layers(self) -> int:
        return len(self.vectors)

    @property
    def num_chunks(self) -> int:
        return self.vectors[0].shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.vectors[0].shape[1]

    def route(self, layer: int, q: torch.Tensor, top_k: int) -> torch.Tensor:
        """Top chunks for q[T, Hq, d] at `layer`: chunk_idx[T, Hkv, min(top_k, C)] int32, best first."""
        qv = query_vectors(group_query(q, self.num_kv_heads), self.kind)  # [T, Hkv, D]
        # one "query head" per KV head: attention.route's group sum is then the identity
        return _route(qv, self.vectors[layer], top_k)
