"""The serving step with the shared KV on other ranks.

`DistributedServeAttention` is `ServeAttention` with one change: a corpus registered through a
`ShardLink` (its SharedKV view carries a `corpus_id`) is attended by the shared ranks, not here.
Unique attention, routing (on this rank: the router holds only chunk summaries) and the
log-sum-exp merge stay as they are; a layer's requests to the shared ranks are sent before its
unique attention and collected after it, so the two run at the same time (`ShardLink.overlap`).
Corpora without a corpus id are attended locally as before. At a citation layer, a sharded
corpus's citation mass comes from the shared ranks too (`AttentionBatch.chunk_mass`: each
measures its slice with the q of the layer's ATTEND and the merged lse rank 0 sends), so its
answers cite the same chunks as one process's.

The engine needs no change: `distributed_engine` hands it a `LoadedModel` whose model is
`ShardedModel`, which swaps each step's `ServeAttention` for the distributed one (same fields, same
`mass` dict) before the decoder runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

from kb.engine.attention_backend import MassAsk, ServeAttention, SharedAsk
from kb.engine.distributed.protocol import Attend, AttentionBatch, ShardLink
from kb.engine.engine import Engine, EngineConfig
from kb.engine.shared_kv import SharedKV
from kb.model.llama import AttentionBackend, Transformer
from kb.model.loader import LoadedModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DistributedServeAttention(ServeAttention):
    link: ShardLink | None = None

    _batch: AttentionBatch | None = dataclasses.field(default=None, init=False, repr=False)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ServeAttention's layer, inside one exchange with the shared ranks when a corpus of the
        step is sharded: its ATTENDs are sent before the unique attention and collected after."""
        if not any(is_remote(g.shared) for g in self.groups):
            return super().attend(layer, q, k, v)
        assert self.link is not None, "a corpus is sharded but this step has no link"
        with self.link.attention_batch() as batch:
            self._batch = batch
            try:
                return super().attend(layer, q, k, v)
            finally:
                self._batch = None

    def _start_shared(self, ask: SharedAsk) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """From the shared ranks when the corpus is sharded (a selecting request's chunk shifts
        travel with its chunk ids): sent now, collected after the unique attention (at once
        when the link's `overlap` is off); else here, as ServeAttention does."""
        if is_remote(ask.shared):
            # a selecting request's chunk ids and shifts are the same at every layer of a step
            steady = ask.plan is not None or ask.shift is not None
            pending = self._batch.start(
                Attend(
                    ask.shared,
                    ask.layer,
                    ask.q,
                    ask.idx,
                    ask.shift,
                    self.rope_inv_freq,
                    steady,
                    ask.cites,
                )
            )
            if not self.link.overlap:
                result = pending.wait()
                return lambda: result
            return pending.wait
        return super()._start_shared(ask)

    def _accumulate_mass(self, ask: MassAsk) -> None:
        """ServeAttention's, for a sharded corpus measured by the shared ranks (its keys are
        there): one MASS exchange, each rank summing its slice's mass per sequence."""
        if not is_remote(ask.shared):
            return super()._accumulate_mass(ask)
        seqs, owner = ask.seq_of_row.unique(return_inverse=True)
        sh, layer = ask.shared, ask.layer
        per_seq = self._batch.chunk_mass(sh, layer, ask.lse_total, owner, len(seqs))  # [U, C]
        for b, m in zip(seqs.tolist(), per_seq):
            self.mass[b] = self.mass[b] + m if b in self.mass else m


def is_remote(shared: SharedKV) -> bool:
    """True for the view of a corpus whose KV lives on the shared ranks."""
    return shared.meta.remote


class ShardedModel(nn.Module):
    """The decoder, with each serving step's attention routed through the link. Prefill of corpus
    segments (any other backend) passes through untouched."""

    def __init__(self, model: Transformer, link: ShardLink):
        super().__init__()
        self.inner = model
        self.link = link
        self.config = model.config

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        if type(attn) is ServeAttention:
            self.link.begin_step()
            fields = {f.name: getattr(attn, f.name) for f in dataclasses.fields(ServeAttention)}
            attn = DistributedServeAttention(
                **fields, link=self.link
            )  # `mass` is the same dict object
        return self.inner(input_ids, positions, attn)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(hidden)

    @property
    def model(self) -> nn.Module:
        """The decoder's embedding and layers: the selection pass of a request over a sharded
        corpus runs them here, attending only the preamble (kb/engine/selection.py)."""
        return self.inner.model

    @property
    def inv_freq(self) -> torch.Tensor:
        """The decoder's RoPE frequencies (the serving step hands them to attention)."""
        return self.inner.inv_freq


def distributed_engine(
    loaded: LoadedModel, link: ShardLink, config: EngineConfig | None = None
) -> Engine:
    """An Engine on the unique rank whose sharded corpora (`link.register`) are attended remotely,
    their citation mass measured there (one MASS exchange per citation layer and corpus).

    CUDA graphs are off: each layer's exchange starts with a header the shared ranks read on the
    host, which a replayed graph would not send anew.
    """
    config = dataclasses.replace(config or EngineConfig(), cuda_graphs=False)
    return Engine(dataclasses.replace(loaded, model=ShardedModel(loaded.model, link)), config)
