"""The serving step with the shared KV on other ranks.

`DistributedServeAttention` is `ServeAttention` with one change: a corpus registered through a
`ShardLink` (its SharedKV view carries a `corpus_id`) is attended by the shared ranks, not here.
Unique attention, routing (on this rank: the router holds only chunk summaries) and the
log-sum-exp merge stay as they are. Corpora without a corpus id are attended locally as before.

The engine needs no change: `distributed_engine` hands it a `LoadedModel` whose model is
`ShardedModel`, which swaps each step's `ServeAttention` for the distributed one (same fields, same
`mass` dict) before the decoder runs.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

import attention
from kb.engine.attention_backend import ServeAttention, _unique
from kb.engine.distributed.protocol import ShardLink
from kb.engine.engine import Engine, EngineConfig
from kb.engine.shared_kv import SharedKV
from kb.model.llama import AttentionBackend, Transformer
from kb.model.loader import LoadedModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DistributedServeAttention(ServeAttention):
    link: ShardLink | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # ServeAttention.attend, step for step, with the shared partial taken from `_shared`
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        hkv, d = kc.shape[2], kc.shape[3]
        kc.view(-1, hkv, d).index_copy_(0, self.slot_mapping, k.to(kc.dtype))
        vc.view(-1, hkv, d).index_copy_(0, self.slot_mapping, v.to(vc.dtype))
        o, lse = _unique(q, kc, vc, self.block_table, self.seq_lens, self.cu_seqlens_q,
                         self.max_seqlen_q, self.max_seqlen_k)
        for g in self.groups:
            sh = g.shared
            qg = q if g.rows is None else q.index_select(0, g.rows)
            idx = sh.router.route(layer, qg, sh.top_k) if sh.routed else None
            o_s, lse_s = self._shared(sh, layer, qg, idx)
            if g.rows is None:
                o_m, lse_m = attention.merge(o_s, lse_s, o, lse)
                o = o_m.to(o.dtype)
            else:
                o_m, lse_m = attention.merge(o_s, lse_s, o.index_select(0, g.rows), lse.index_select(0, g.rows))
                o.index_copy_(0, g.rows, o_m.to(o.dtype))
            if layer in self.citation_layers and not is_remote(sh):
                self._accumulate_mass(qg, sh, layer, g.seq_of_row, lse_m)
        return o

    def _shared(self, sh: SharedKV, layer: int, q: torch.Tensor, idx: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial (o, lse) of q over a corpus's shared KV: from the shared ranks when it is sharded,
        else here, as ServeAttention does."""
        if is_remote(sh):
            assert self.link is not None, f"corpus {sh.key} is sharded but this step has no link"
            return self.link.shared_attention(sh, layer, q, idx)
        k_scale, v_scale = sh.meta.get("k_scale"), sh.meta.get("v_scale")  # fp8 KV: per layer
        return attention.shared_attention(q, sh.k[layer], sh.v[layer], idx, sh.chunk_size,
                                          k_scale=None if k_scale is None else k_scale[layer],
                                          v_scale=None if v_scale is None else v_scale[layer])


def is_remote(shared: SharedKV) -> bool:
    """True for the view of a corpus whose KV lives on the shared ranks."""
    return "corpus_id" in shared.meta


class ShardedModel(nn.Module):
    """The decoder, with each serving step's attention routed through the link. Prefill of corpus
    segments (any other backend) passes through untouched."""

    def __init__(self, model: Transformer, link: ShardLink):
        super().__init__()
        self.inner = model
        self.link = link
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        if type(attn) is ServeAttention:
            fields = {f.name: getattr(attn, f.name) for f in dataclasses.fields(ServeAttention)}
            attn = DistributedServeAttention(**fields, link=self.link)  # `mass` is the same dict object
        return self.inner(input_ids, positions, attn)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(hidden)


def distributed_engine(loaded: LoadedModel, link: ShardLink, config: EngineConfig | None = None) -> Engine:
    """An Engine on the unique rank whose sharded corpora (`link.register`) are attended remotely.

    Citation mass needs every shared key on this rank, so it is off here (citation_layers=0).
    """
    config = dataclasses.replace(config or EngineConfig(), citation_layers=0)
    return Engine(dataclasses.replace(loaded, model=ShardedModel(loaded.model, link)), config)
