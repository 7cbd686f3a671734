"""Chunk summaries of a corpus's shared keys: the vectors that routing scores (DESIGN.md, `index/`).

Per layer and KV head, chunk c covers tokens [c*chunk_size, (c+1)*chunk_size) of the concatenated
shared KV (the last chunk may be partial) and is summarised, from the keys after RoPE, by
- `mean`: the mean key (MoBA): score = q . mean, the chunk's average affinity;
- `kmin`/`kmax`: per-dimension bounds (Quest): score = q+ . kmax + q- . kmin >= max_j q . k_j.

Both scores are one inner product between a query vector and a chunk vector, so the torch device
path (`Router`) and FAISS (`faiss_index`) rank with the same arithmetic:
- "mean":  query qg[d]          against mean[d];
- "quest": query [qg+, qg-][2d] against [kmax, kmin][2d].
`qg` is the sum of a GQA group's queries (as in `attention.reference.route`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("mean", "quest")


@dataclass
class ChunkSummaries:
    """Per-chunk summaries of one layer's shared keys; all float32 `[C, Hkv, d]`."""

    mean: torch.Tensor
    kmin: torch.Tensor
    kmax: torch.Tensor
    chunk_size: int
    num_tokens: int

    def __post_init__(self) -> None:
        assert self.mean.shape == self.kmin.shape == self.kmax.shape, "summary shapes differ"
        assert self.mean.shape[0] == num_chunks_for(self.num_tokens, self.chunk_size)

    @property
    def num_chunks(self) -> int:
        return self.mean.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.mean.shape[1]

    @property
    def head_dim(self) -> int:
        return self.mean.shape[2]

    def vectors(self, kind: str) -> torch.Tensor:
        """The chunk side of the router's inner product: `[C, Hkv, d]` (mean) or `[C, Hkv, 2d]` (quest)."""
        if kind == "mean":
            return self.mean
        if kind == "quest":
            return torch.cat([self.kmax, self.kmin], dim=-1)
        raise ValueError(f"unknown router kind {kind!r}; expected one of {KINDS}")

    def to(self, device: torch.device | str) -> ChunkSummaries:
        return ChunkSummaries(
            self.mean.to(device),
            self.kmin.to(device),
            self.kmax.to(device),
            self.chunk_size,
            self.num_tokens,
        )


def num_chunks_for(num_tokens: int, chunk_size: int) -> int:
    """Chunks needed for `num_tokens` shared tokens (the last one may be partial)."""
    return (num_tokens + chunk_size - 1) // chunk_size


def chunk_summaries(
    keys: torch.Tensor, chunk_size: int, block_chunks: int = 4096
) -> ChunkSummaries:
    """Mean, min and max key of every chunk of one layer's shared keys `[N, Hkv, d]` (after RoPE).

    Computed in float32 over blocks of `block_chunks` chunks, so a bf16 layer of millions of
    tokens never needs a full float32 copy.
    """
    assert keys.dim() == 3, f"keys must be [N, Hkv, d], got {tuple(keys.shape)}"
    assert chunk_size > 0
    n, hkv, d = keys.shape
    c = num_chunks_for(n, chunk_size)
    out = {
        name: torch.empty(c, hkv, d, dtype=torch.float32, device=keys.device)
        for name in ("mean", "kmin", "kmax")
    }
    for c0 in range(0, c, block_chunks):
        c1 = min(c, c0 + block_chunks)
        t0, t1 = c0 * chunk_size, min(n, c1 * chunk_size)
        x = keys[t0:t1].float()
        full = (t1 - t0) // chunk_size  # complete chunks in this block
        if full:
            xb = x[: full * chunk_size].view(full, chunk_size, hkv, d)
            out["mean"][c0 : c0 + full] = xb.mean(dim=1)
            out["kmin"][c0 : c0 + full] = xb.amin(dim=1)
            out["kmax"][c0 : c0 + full] = xb.amax(dim=1)
        if c0 + full < c1:  # the corpus's partial last chunk
            tail = x[full * chunk_size :]
            out["mean"][c1 - 1] = tail.mean(dim=0)
            out["kmin"][c1 - 1] = tail.amin(dim=0)
            out["kmax"][c1 - 1] = tail.amax(dim=0)
    return ChunkSummaries(out["mean"], out["kmin"], out["kmax"], chunk_size, n)


def group_query(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum each GQA group's queries: q[T, Hq, d] -> qg[T, Hkv, d] float32."""
    t, hq, d = q.shape
    assert hq % num_kv_heads == 0, f"{hq} query heads do not split into {num_kv_heads} groups"
    return q.float().view(t, num_kv_heads, hq // num_kv_heads, d).sum(dim=2)


def query_vectors(qg: torch.Tensor, kind: str) -> torch.Tensor:
    """The query side of the router's inner product from group-summed queries qg[..., d].

    "mean": qg itself; "quest": [max(qg, 0), min(qg, 0)] (so its product with [kmax, kmin] is
    Quest's upper bound on qg . k over the chunk's keys).
    """
    if kind == "mean":
        return qg
    if kind == "quest":
        return torch.cat([qg.clamp_min(0), qg.clamp_max(0)], dim=-1)
    raise ValueError(f"unknown router kind {kind!r}; expected one of {KINDS}")
