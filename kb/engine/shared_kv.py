"""A corpus's shared KV as the engine holds it: contiguous per layer on the serving device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class ChunkRouter(Protocol):
    def route(
        self, layer: int, q: torch.Tensor, top_k: int, spans: list[tuple[int, int]] | None = None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class KVMeta:
    """What a SharedKV carries beside its keys and values: the per-layer scales of an fp8 layout,
    and for the view of a corpus sharded over other ranks, the id and placement it has there."""

    k_scale: list[torch.Tensor] | None = None  # per layer [C, Hkv]: fp8 keys' chunk scales
    v_scale: list[torch.Tensor] | None = None
    corpus_id: int | None = None  # the shard protocol's name of a remote corpus
    placement: object | None = None  # kb.engine.distributed.placement.Placement of its chunks

    @property
    def remote(self) -> bool:
        """True for the view of a corpus whose KV lives on the shared ranks."""
        return self.corpus_id is not None


@dataclass
class SharedKV:
    key: str  # identifies the corpus and its cache version
    k: list[torch.Tensor]  # per layer [N, Hkv, d], after RoPE
    v: list[torch.Tensor]
    chunk_size: int
    pos_offset: int  # unique tokens of a request start at this position
    router: ChunkRouter | None = None
    top_k: int | None = None  # chunks per query; None = dense
    preamble_len: int = (
        0  # leading tokens of the preamble: an attention sink, never a source to cite
    )
    positions: torch.Tensor | None = (
        None  # [N] int64 stored position of every token (the layout's RoPE)
    )
    selector: object | None = (
        None  # kb.engine.selection.PassageSelector: requests choose their passages
    )

    @property
    def always_chunks(self) -> int:
        """Leading chunks every routed query attends: those holding the preamble."""
        return -(-self.preamble_len // self.chunk_size)

    meta: KVMeta = field(default_factory=KVMeta)

    @property
    def num_tokens(self) -> int:
        return self.k[0].shape[0]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def routed(self) -> bool:
        return self.router is not None and self.top_k is not None and self.top_k < self.num_chunks
