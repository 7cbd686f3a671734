"""Corpus-wide search over chunk summaries: the admin's "find passage" and document-level lookups
for citations (DESIGN.md, `index/`, step 5).

A query is one vector per (layer, KV head): a group-summed decode query, or the mean of the keys
of a passage the model prefilled (`passage_query`). A chunk's score is the sum over the chosen
layers and heads of its similarity to the chunk's mean key, so chunks that many layers and heads
would route to rank first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from index.summaries import ChunkSummaries


@dataclass
class Hits:
    """Top results, best first: ids (chunk or document) and their scores."""

    ids: torch.Tensor  # [k] int64
    scores: torch.Tensor  # [k] float32


def passage_query(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Query for "find passage": per layer, the mean of the passage's keys [M, Hkv, d] -> [L, Hkv, d]."""
    return torch.stack([k.float().mean(dim=0) for k in keys])


def chunk_scores(
    summaries: Sequence[ChunkSummaries],
    query: torch.Tensor,
    layers: Sequence[int] | None = None,
    metric: str = "ip",
) -> torch.Tensor:
    """Score of every chunk: sum over layers and KV heads of query[l, h] . mean_l[c, h] -> [C].

    `metric="cos"` uses cosine similarity per (layer, head), so no layer or head with large key
    norms dominates the sum.
    """
    assert metric in ("ip", "cos"), f"unknown metric {metric!r}"
    layers = range(len(summaries)) if layers is None else layers
    total = torch.zeros(
        summaries[0].num_chunks, dtype=torch.float32, device=summaries[0].mean.device
    )
    for li in layers:
        m, q = summaries[li].mean, query[li].float().to(total.device)  # [C, Hkv, d], [Hkv, d]
        if metric == "cos":
            m, q = F.normalize(m, dim=-1), F.normalize(q, dim=-1)
        total += torch.einsum("chd,hd->c", m, q)
    return total


def find_chunks(
    summaries: Sequence[ChunkSummaries],
    query: torch.Tensor,
    top_k: int,
    layers: Sequence[int] | None = None,
    metric: str = "ip",
) -> Hits:
    """The corpus's top chunks for `query[L, Hkv, d]`."""
    s = chunk_scores(summaries, query, layers, metric)
    top = s.topk(min(top_k, s.numel()))
    return Hits(top.indices, top.values)


def find_documents(
    summaries: Sequence[ChunkSummaries],
    query: torch.Tensor,
    chunk_doc: torch.Tensor,
    top_k: int,
    layers: Sequence[int] | None = None,
    metric: str = "ip",
) -> Hits:
    """Top documents, each scored by its best chunk; `chunk_doc[C]` maps chunk -> document id."""
    s = chunk_scores(summaries, query, layers, metric)
    chunk_doc = chunk_doc.long().to(s.device)
    best = torch.full((int(chunk_doc.max()) + 1,), float("-inf"), device=s.device)
    best.scatter_reduce_(0, chunk_doc, s, reduce="amax")
    present = torch.isfinite(best).nonzero().squeeze(1)
    top = best[present].topk(min(top_k, present.numel()))
    return Hits(present[top.indices], top.values)
