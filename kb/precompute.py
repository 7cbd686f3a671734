"""Prefill corpus segments through the model and return their keys and values per layer.

Each segment is prefilled after the corpus preamble (positions restart after it in every
segment), in batches of about `max_batch_tokens` tokens to keep the device busy; the preamble's
own copies are dropped, since the preamble's KV is stored once.
"""

from __future__ import annotations

from typing import Iterator

import torch

from kb.engine.attention_backend import SegmentPrefill
from kb.model.llama import Transformer


@torch.inference_mode()
def prefill_segments(model: Transformer, preamble: list[int], segments: list[list[int]],
                     max_batch_tokens: int = 4096, device: str = "cpu", starts: list[int] | None = None
                     ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (segment index, k[L, n, Hkv, d], v[L, n, Hkv, d]) for each segment, in order.

    Segment j's tokens take positions starts[j].. (default: right after the preamble); the
    preamble always sits at 0..P-1, so RoPE sees a gap, never an overlap, between the two.
    """
    p = len(preamble)
    i = 0
    while i < len(segments):
        batch = [i]
        size = p + len(segments[i])
        while batch[-1] + 1 < len(segments) and size + p + len(segments[batch[-1] + 1]) <= max_batch_tokens:
            batch.append(batch[-1] + 1)
            size += p + len(segments[batch[-1]])
        ids, pos, cu = [], [], [0]
        for j in batch:
            seq = preamble + segments[j]
            ids.extend(seq)
            start = p if starts is None else starts[j]
            pos.extend([*range(p), *range(start, start + len(segments[j]))])
            cu.append(cu[-1] + len(seq))
        attn = SegmentPrefill(cu_seqlens=cu, keep_from=[p] * len(batch))
        model(torch.tensor(ids, device=device), torch.tensor(pos, device=device), attn)
        k_all = torch.stack(attn.k_out)  # [L, sum n, Hkv, d]
        v_all = torch.stack(attn.v_out)
        off = 0
        for j in batch:
            n = len(segments[j])
            yield j, k_all[:, off:off + n], v_all[:, off:off + n]
            off += n
        i = batch[-1] + 1


@torch.inference_mode()
def prefill_preamble(model: Transformer, preamble: list[int], device: str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [L, P, Hkv, d] of the preamble alone (positions 0..P-1)."""
    attn = SegmentPrefill(cu_seqlens=[0, len(preamble)], keep_from=[0])
    model(torch.tensor(preamble, device=device), torch.arange(len(preamble), device=device), attn)
    return torch.stack(attn.k_out), torch.stack(attn.v_out)
