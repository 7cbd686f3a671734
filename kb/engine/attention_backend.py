"""The serving step's attention backend handed to the model (`attend(layer, q, k, v) -> o`;
prefill of corpus segments has its own, `kb.ingest.precompute.SegmentPrefill`).

- `ServeAttention`: the serving step. New tokens' k/v go into each request's unique pages; the
  unique attention runs for all requests at once; then, per corpus, the queries of all its
  requests meet the corpus's shared KV together (one GEMM, routed or dense), and the two partial
  results merge by log-sum-exp. Each corpus's partial is started before the unique attention and
  collected after it (`_start_shared`), so a backend whose shared KV is elsewhere overlaps them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import attention
from kb.engine.shared_kv import SharedKV


@dataclass
class CorpusGroup:
    """The rows of a step's packed tokens that attend one corpus's shared KV (None: all rows, in
    order, so no gather or scatter is needed)."""

    shared: SharedKV
    rows: torch.Tensor | None  # [T_c] token indices into the step
    seq_of_row: torch.Tensor | None  # [T_c] index of the owning sequence within the batch
    # (start, length) of each request's run within the group's rows, when a request's prefill
    # shares one chunk selection (prefill_routing "request"); None: every token routes alone
    spans: list[tuple[int, int]] | None = None
    # per-request chunk selections of these rows, planned once for all layers
    # (kb.engine.routed_plan.StepSelection); None: the corpus router chooses per layer
    selection: object | None = None


@dataclass(frozen=True)
class SharedAsk:
    """One corpus group's request for its shared partial at one layer: q[T_c, Hq, d] and the
    chunk ids it reads (None: dense), with their routing plan (routed_plan.py) and per-chunk
    position shifts (virtual positions) where there are any."""

    shared: SharedKV
    layer: int
    q: torch.Tensor
    idx: torch.Tensor | None = None
    plan: object | None = None
    shift: torch.Tensor | None = None
    cites: bool = False  # this layer measures the group's citation mass (`_cites`)


@dataclass(frozen=True)
class MassAsk:
    """One corpus group's citation mass to measure at one layer: the group's q[T_c, Hq, d], the
    sequence owning each row and the merged (unique + shared) lse of each row."""

    shared: SharedKV
    layer: int
    q: torch.Tensor
    seq_of_row: torch.Tensor  # [T_c] index of the owning sequence within the batch
    lse_total: torch.Tensor


@dataclass
class ServeAttention:
    """The serving step. Also the per-request baseline: when the runner puts a corpus's shared
    pages at the head of each request's block table (`ModelRunner.shared_mode = "per_request"`)
    and passes no groups, the paged kernel reads the shared KV once per request, as prefix
    caching does."""

    k_cache: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, d]
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [T] flat slot of each new token
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] KV length after this step
    cu_seqlens_q: torch.Tensor  # [B+1]
    groups: list[CorpusGroup]
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # batch index -> mass per chunk
    citation_layers: frozenset[int] = frozenset()
    max_seqlen_q: int | None = None  # longest run of new tokens (host-known: avoids a sync)
    max_seqlen_k: int | None = None  # longest KV length after this step
    rope_inv_freq: torch.Tensor | None = None  # the model's RoPE frequencies (virtual positions)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        hkv, d = kc.shape[2], kc.shape[3]
        kc.view(-1, hkv, d).index_copy_(0, self.slot_mapping, k.to(kc.dtype))
        vc.view(-1, hkv, d).index_copy_(0, self.slot_mapping, v.to(vc.dtype))
        # each corpus's shared partial is asked for before the unique attention and collected
        # after it (`_start_shared`): here it is computed when collected, as before; the
        # distributed backend's shared ranks work on it meanwhile
        started = [self._start_group(layer, q, g) for g in self.groups]
        # the lengths the runner already knows: no layer reads them back (a host sync)
        o, lse = attention.unique_attention(
            q,
            kc,
            vc,
            self.block_table,
            self.seq_lens,
            self.cu_seqlens_q,
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=self.max_seqlen_k,
        )
        for g, (qg, collect) in zip(self.groups, started):
            sh = g.shared
            o_s, lse_s = collect()
            if g.rows is None:
                o_m, lse_m = attention.merge(o_s, lse_s, o, lse)
                o = o_m.to(o.dtype)
            else:
                o_m, lse_m = attention.merge(
                    o_s, lse_s, o.index_select(0, g.rows), lse.index_select(0, g.rows)
                )
                o.index_copy_(0, g.rows, o_m.to(o.dtype))
            if self._cites(layer, g):
                self._accumulate_mass(MassAsk(sh, layer, qg, g.seq_of_row, lse_m))
        return o

    def _start_group(
        self, layer: int, q: torch.Tensor, g: CorpusGroup
    ) -> tuple[torch.Tensor, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
        """One corpus group's rows of q and what collects their shared partial (o, lse): the
        chunk ids of this layer (the selection's, or the router's) are chosen now."""
        sh = g.shared
        qg = q if g.rows is None else q.index_select(0, g.rows)
        idx = plan = shift = None
        if g.selection is not None:
            idx, plan = g.selection.for_layer(layer)
            shift = getattr(g.selection, "chunk_shift", None) if idx is not None else None
        elif sh.routed:
            idx = sh.router.route(layer, qg, sh.top_k, g.spans)
        gathered = getattr(g.selection, "gathered", None) if idx is not None else None
        if gathered is not None:  # CPU: each request's own copy of its passages
            store, inv = g.selection.store, self.rope_inv_freq
            return qg, lambda: store.partial(gathered, layer, sh, qg, inv)
        cites = self._cites(layer, g)
        return qg, self._start_shared(SharedAsk(sh, layer, qg, idx, plan, shift, cites))

    def _start_shared(self, ask: SharedAsk) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """Start the partial (o, lse) of ask.q over one corpus's shared KV; the callable returned
        collects it. Here nothing runs until it is collected (after the unique attention, as it
        always ran); the distributed backend sends the request to the shared ranks now."""
        sh, layer = ask.shared, ask.layer
        k_scale, v_scale = sh.meta.k_scale, sh.meta.v_scale  # fp8 KV: per layer
        extra = {} if ask.plan is None else {"plan": ask.plan}
        if ask.shift is not None:  # virtual positions: the facade's chunk_shift
            extra = {"chunk_shift": ask.shift, "rope_inv_freq": self.rope_inv_freq, **extra}
        return lambda: attention.shared_attention(
            ask.q,
            sh.k[layer],
            sh.v[layer],
            ask.idx,
            sh.chunk_size,
            k_scale=None if k_scale is None else k_scale[layer],
            v_scale=None if v_scale is None else v_scale[layer],
            **extra,
        )

    def _cites(self, layer: int, g: CorpusGroup) -> bool:
        """Whether this layer measures the group's attention mass on the corpus's chunks; a
        selecting request cites from its selection's scores, not from attention mass."""
        return layer in self.citation_layers and g.selection is None

    def _accumulate_mass(self, ask: MassAsk) -> None:
        """Add each row's softmax mass on every shared chunk (summed over heads) to its sequence."""
        sh, layer, seq_of_row = ask.shared, ask.layer, ask.seq_of_row
        # the preamble soaks up attention (a sink); it is no source
        k_scale = sh.meta.k_scale  # an fp8 layout: per-layer [C, Hkv] scales
        per_chunk = attention.chunk_mass(
            ask.q,
            sh.k[layer],
            ask.lse_total,
            sh.chunk_size,
            skip=sh.preamble_len,
            k_scale=None if k_scale is None else k_scale[layer],
        )
        for b in seq_of_row.unique().tolist():
            rows = (seq_of_row == b).nonzero().squeeze(1)
            m = per_chunk.index_select(0, rows).sum(0)
            self.mass[b] = self.mass[b] + m if b in self.mass else m
