"""Chunk routing for one loaded corpus: the preamble's chunks are always attended (they hold the
attention sink), the rest are chosen per KV head by the index's router: per query token, or,
for a request's prefill (`spans`), once for all its tokens (request-level block selection)."""

from __future__ import annotations

import torch

from index.router import Router, top_k_for
from index.summaries import ChunkSummaries, chunk_summaries, group_query, query_vectors


class CorpusRouter:
    def __init__(
        self,
        keys: list[torch.Tensor],
        chunk_size: int,
        always: int,
        kind: str = "mean",
        summaries: list[ChunkSummaries] | None = None,
        dense_layers: int = 0,
    ):
        """keys: per layer [N, Hkv, d] after RoPE; `always` leading chunks are never routed.
        `summaries` (per layer, e.g. read from the corpus's stored index) skip computing them.
        The first `dense_layers` layers attend every chunk: their attention is broad, and routing
        them costs most of the answers routing loses (docs/QUALITY.md)."""
        self.always = always
        self.dense_layers = dense_layers
        summaries = summaries or [chunk_summaries(k, chunk_size) for k in keys]
        self.num_chunks = summaries[0].num_chunks
        device = keys[0].device
        vectors = [
            s.vectors(kind)[always:].to(device=device, dtype=torch.float32).contiguous()
            for s in summaries
        ]
        self.router = Router(kind, chunk_size, keys[0].shape[0], vectors)

    def top_k(self, density: float) -> int:
        return top_k_for(density, self.num_chunks)

    def route(
        self, layer: int, q: torch.Tensor, top_k: int, spans: list[tuple[int, int]] | None = None
    ) -> torch.Tensor | None:
        """chunk_idx [T, Hkv, top_k]: the `always` chunks, then the best routed ones; None (attend
        every chunk) in the first `dense_layers` layers.

        `spans` (start, length) of q's rows: each span of several rows (one request's prefill)
        gets one selection per KV head for all its rows (`request_scores`); other rows choose
        per token."""
        if layer < self.dense_layers:
            return None
        t, hkv = q.shape[0], self.router.num_kv_heads
        k = max(1, top_k - self.always)
        spans = [(s, n) for s, n in spans or () if n > 1]
        if (
            spans and sum(n for _, n in spans) == t
        ):  # every row in a request's span: no per-token pass
            k = min(k, self.router.num_chunks)
            routed = torch.empty(t, hkv, k, dtype=torch.int32, device=q.device)
        else:
            routed = self.router.route(layer, q, k)
        for s, n in spans:
            scores = self.request_scores(layer, q[s : s + n])
            routed[s : s + n] = scores.topk(min(k, scores.shape[-1]), dim=-1).indices.to(
                routed.dtype
            )
        routed += self.always
        fixed = torch.arange(self.always, device=q.device, dtype=routed.dtype).expand(
            t, hkv, self.always
        )
        return torch.cat([fixed, routed], dim=-1)

    def request_scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """[Hkv, C_routed]: how strongly the request's tokens q[n, Hq, d] call for each chunk, the
        sum of their router scores (for the "mean" router, the score of the summed query).
        Measured on real prose with the demo model, the softmax mass the request's selection
        keeps is within 0.3% of per-token selection's at 25% and 10% density (the sum did best
        of sum, max, max relative to each token's best, and summed per-token softmax)."""
        r = self.router
        qv = query_vectors(group_query(q, r.num_kv_heads), r.kind)  # [n, Hkv, D]
        return torch.einsum("thd,chd->hc", qv, r.vectors[layer].to(qv.dtype))
