"""Where a corpus's shared KV lives across shared ranks: contiguous chunk ranges, balanced by tokens.

Contiguous ranges keep each rank's slice one dense `[n, Hkv, d]` tensor per layer (the same layout
the one-GPU kernels read), and make a routed chunk id's owner a range lookup: global chunk `c` is
local chunk `c - chunk_start` on the rank whose range holds it. Every rank computes the same
placement from (tokens, chunk size, ranks), so only those three numbers travel.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from kb.engine.selection import preamble_kv
from kb.engine.shared_kv import SharedKV
from storage.kvstore import read_kv


@dataclass(frozen=True)
class ShardRange:
    """One shared rank's slice: chunks [chunk_start, chunk_end), tokens [token_start, token_end)."""

    rank: int
    chunk_start: int
    chunk_end: int
    token_start: int
    token_end: int

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def num_chunks(self) -> int:
        return self.chunk_end - self.chunk_start


@dataclass(frozen=True)
class Placement:
    num_tokens: int
    chunk_size: int
    shards: tuple[ShardRange, ...]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_size)

    def shard(self, rank: int) -> ShardRange:
        for s in self.shards:
            if s.rank == rank:
                return s
        raise KeyError(f"rank {rank} holds no slice of this corpus")

    def locate(self, chunk: int) -> tuple[int, int]:
        """(rank, local chunk id) of global chunk `chunk`."""
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} is outside 0..{self.num_chunks - 1}")
        for s in self.shards:
            if s.chunk_start <= chunk < s.chunk_end:
                return s.rank, chunk - s.chunk_start
        raise AssertionError("placement ranges do not cover every chunk")

    def local_chunk_idx(self, chunk_idx: torch.Tensor, rank: int) -> torch.Tensor:
        """Routed chunk ids [T, Hkv, k] as the given rank's local ids; -1 where another rank holds them
        (the attention contract ignores -1 entries)."""
        s = self.shard(rank)
        inside = (chunk_idx >= s.chunk_start) & (chunk_idx < s.chunk_end)
        return torch.where(inside, chunk_idx - s.chunk_start, torch.full_like(chunk_idx, -1))


def place(num_tokens: int, chunk_size: int, ranks: list[int]) -> Placement:
    """Split the chunks into len(ranks) contiguous ranges of about equal tokens (the last chunk may
    be short, so token counts, not chunk counts, are balanced). With fewer chunks than ranks, some
    ranks get empty ranges."""
    assert num_tokens > 0 and chunk_size > 0 and ranks
    num_chunks = -(-num_tokens // chunk_size)
    bounds = [0]
    for i in range(1, len(ranks)):
        target = num_tokens * i / len(ranks)  # token boundary to aim for, rounded to a chunk edge
        bounds.append(min(num_chunks, max(bounds[-1], round(target / chunk_size))))
    bounds.append(num_chunks)
    shards = tuple(
        ShardRange(r, a, b, min(a * chunk_size, num_tokens), min(b * chunk_size, num_tokens))
        for r, a, b in zip(ranks, bounds[:-1], bounds[1:])
    )
    return Placement(num_tokens, chunk_size, shards)


def slice_kv(shared: SharedKV, shard: ShardRange) -> Iterator[torch.Tensor]:
    """A shard's keys and values in the order they travel: layer 0's k [n, Hkv, d], its v, layer 1's
    k, ... (one layer at a time, so a corpus larger than a GPU's free memory never stacks); nothing
    for an empty shard."""
    a, b = shard.token_start, shard.token_end
    if b <= a:
        return
    for k, v in zip(shared.k, shared.v):
        yield k[a:b].contiguous()
        yield v[a:b].contiguous()


def read_slice(kv: torch.Tensor, shard: ShardRange, spec: dict) -> int:
    """Fill kv [2, L, n, Hkv, d] with the shard's tokens from the corpus's KV files (`spec`:
    LOAD's file list), reading and verifying only the files that overlap it; each file's
    tokens are laid out in `via`, then in kv's dtype, as rank 0's layout is. Returns the number
    of files read; raises on a file that cannot be read or does not match its checksum. The
    shared ranks read their slices so; rank 0 reads a slice so for a rank that could not."""
    via = getattr(torch, spec["via"])
    start, read = 0, 0
    for path, checksum, tokens in spec["files"]:
        a, b = max(start, shard.token_start), min(start + tokens, shard.token_end)
        if a < b:
            k, v = read_kv(path, checksum, dequantize=True)
            if k.shape[1] != tokens:
                raise ValueError(f"KV file {path} holds {k.shape[1]} tokens, not {tokens}")
            for j, x in enumerate((k, v)):
                part = x[:, a - start : b - start].to(via).to(kv.dtype)
                kv[j, :, a - shard.token_start : b - shard.token_start] = part
            read += 1
        start += tokens
    return read


def keep_preamble(shared: SharedKV) -> None:
    """Give a corpus's passage selector its own copy of the preamble's KV (dequantized), once: the
    selection pass attends the preamble on the unique rank, where a sharded corpus's KV is not."""
    if shared.selector is not None and shared.selector.preamble is None:
        shared.selector.preamble = tuple([x.clone() for x in part] for part in preamble_kv(shared))


def remote_view(shared: SharedKV, placement: Placement, corpus_id: int) -> SharedKV:
    """What the unique rank keeps of a sharded corpus: shapes (on the meta device, no memory), the
    router, positions, the passage selector (its re-based keys of the selecting layers, its
    calibration and the preamble's KV that `keep_preamble` gave it) and the corpus id the
    protocol names it by; never the keys and values. A pure view: `shared` is not changed."""
    meta_k = [torch.empty(k.shape, dtype=k.dtype, device="meta") for k in shared.k]
    meta_v = [torch.empty(v.shape, dtype=v.dtype, device="meta") for v in shared.v]
    meta = replace(shared.meta, corpus_id=corpus_id, placement=placement)
    return replace(shared, k=meta_k, v=meta_v, meta=meta)
