"""Per-request chunk selections of a step, planned once for every layer (plan/run split).

A request that chose its chunks (attention retrieval: `Sequence.selection.chunks`, fixed for
many decode steps, the same for every layer and KV head) reads only those. The routed kernel
groups the step's queries by chunk through a plan (CSR per chunk and KV head,
`attention.plan_routed`) that depends on the selection only, so it is built once per step,
before the first layer, and every layer's `attention.shared_attention(..., plan=)` reuses it,
as FlashInfer's plan/run wrappers do. Built from device tensors without a host sync, so it is
captured inside the decode step's CUDA graph (kb/engine/cuda_graphs.py) and rebuilt by every
replay from the selections staged into the graph's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import attention
from kb.engine.shared_kv import SharedKV


@dataclass
class StepSelection:
    """The step's rows' chunk ids and the plan built from them (None off the CUDA path)."""

    chunk_idx: torch.Tensor  # [T, Hkv, K] int32, -1 = padding; rows of a request share ids
    plan: object | None
    dense_layers: int = 0  # layers below this attend every chunk (CorpusRouter.dense_layers)
    # [T, Hkv, K] int64 position shift of each listed chunk (virtual positions,
    # kb/engine/selection.py), None: chunks at their stored positions
    chunk_shift: torch.Tensor | None = None
    # CPU: each request's rows and its copied passages (kb/engine/selected_kv.py), attended
    # instead of the per-step gather; None: the per-step path
    gathered: list | None = None
    store: object | None = None  # the runner's SelectedKV holding those copies
    num_chunks: int = 0  # what the plan is built for (plan_step fills them in)
    group_size: int = 0
    chunk_size: int = 0

    def for_layer(self, layer: int) -> tuple[torch.Tensor | None, object | None]:
        """(chunk_idx, plan) of `layer`; (None, None) where the layer attends every chunk. With
        shifts set after planning, the plan is rebuilt once (the first layer), carrying them."""
        if layer < self.dense_layers:
            return None, None
        if self.chunk_shift is not None and self.plan is not None and self.plan.shifts is None:
            self.plan = attention.plan_routed(
                self.chunk_idx,
                self.num_chunks,
                self.group_size,
                self.chunk_size,
                chunk_shift=self.chunk_shift,
            )
        return self.chunk_idx, self.plan


def seq_chunks(seq) -> torch.Tensor | None:
    """The chunk ids a sequence chose (`seq.selection.chunks`), or None: it routes per token."""
    sel = getattr(seq, "selection", None)
    return None if sel is None else sel.chunks


def stage_rows(
    chunks: list[torch.Tensor | None], rows: int, width: int, fill: int = -1
) -> torch.Tensor:
    """Host int64 [rows, width]: each sequence's chunk ids (or shifts), `fill` padded (padding
    rows: all `fill`)."""
    out = torch.full((rows, width), fill, dtype=torch.long)
    for i, c in enumerate(chunks):
        if c is not None and c.numel():
            c = c[:width]
            out[i, : c.numel()] = c.to("cpu", torch.long)
    return out


def plan_step(
    rows_chunks: torch.Tensor,
    shared: SharedKV,
    num_q_heads: int,
    rows_shift: torch.Tensor | None = None,
) -> StepSelection:
    """StepSelection of rows_chunks[T, K] (device, -1 padded): one id list per row for all KV
    heads; `rows_shift[T, K]` their virtual-position shifts, or None. Torch ops and the plan
    kernel's prologue only: graph-capturable."""
    hkv = shared.k[0].shape[1]
    idx = rows_chunks.to(torch.int32)[:, None, :].expand(-1, hkv, -1).contiguous()
    g = num_q_heads // hkv
    shift = None if rows_shift is None else rows_shift[:, None, :].expand(-1, hkv, -1)
    plan = attention.plan_routed(idx, shared.num_chunks, g, shared.chunk_size, chunk_shift=shift)
    dense = getattr(shared.router, "dense_layers", 0) if shared.router is not None else 0
    return StepSelection(
        idx,
        plan,
        dense,
        chunk_shift=shift,
        num_chunks=shared.num_chunks,
        group_size=g,
        chunk_size=shared.chunk_size,
    )
