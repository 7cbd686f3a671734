"""Prefill corpus segments through the model and return their keys and values per layer.

Each segment is prefilled after the corpus preamble, in batches of about `max_batch_tokens`
tokens to keep the device busy. How a segment is made position-independent is the `pic` scheme
(compared in docs/QUALITY.md):

- ``shared`` (b, the default): the preamble's KV is stored once; each segment is prefilled after
  a copy of it, at positions `starts[j]`.., and that copy's KV is dropped.
- ``own`` (a): each segment is prefilled from position 0 with its own preamble copy (its own
  BOS), and the copy's KV is kept with the segment's: every segment carries its own sink.
  Positions restart in every segment; `starts` is ignored. Yields len(preamble) + n rows.
- ``linked`` (c, EPIC/LegoLink-style): like ``shared``, but the last `link_tokens` tokens of the
  previous segment in `segments` are prefilled between the preamble and the segment, so the
  segment's first tokens see real context and are not attention sinks; only the segment's own
  KV is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kb.model.llama import Transformer

PIC_SCHEMES = ("shared", "own", "linked")


@dataclass
class SegmentPrefill:
    """The prefill backend: causal attention inside each packed sequence, recording the keys and
    values of each sequence from `keep_from` on (what a segment stores)."""

    cu_seqlens: list[int]  # packed sequence boundaries, len B+1
    keep_from: list[int]  # per sequence: first token whose k/v is recorded
    k_out: list[torch.Tensor] = field(default_factory=list)  # per layer [sum kept, Hkv, d]
    v_out: list[torch.Tensor] = field(default_factory=list)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        keep_k, keep_v = [], []
        for b in range(len(self.cu_seqlens) - 1):
            s, e = self.cu_seqlens[b], self.cu_seqlens[b + 1]
            # [1, H, S, d] layout for SDPA; GQA heads expand inside SDPA. The batch dimension
            # matters on the CPU: 3-D inputs take the math path (the S x S scores in memory),
            # 4-D ones the flash kernel, 3.7x faster at 1024 tokens (docs/INGEST.md)
            o = F.scaled_dot_product_attention(
                q[None, s:e].transpose(1, 2),
                k[None, s:e].transpose(1, 2),
                v[None, s:e].transpose(1, 2),
                is_causal=True,
                enable_gqa=True,
            )
            out[s:e] = o[0].transpose(0, 1)
            keep_k.append(k[s + self.keep_from[b] : e])
            keep_v.append(v[s + self.keep_from[b] : e])
        self.k_out.append(torch.cat(keep_k))
        self.v_out.append(torch.cat(keep_v))
        return out


@dataclass(frozen=True)
class _Packed:
    """One segment's prefill sequence: its token ids, their positions, and where its kept KV starts."""

    ids: list[int]
    pos: list[int]
    keep_from: int


def _pack(
    preamble: list[int],
    segments: list[list[int]],
    j: int,
    start: int,
    pic: str,
    link_tokens: int,
    links: list[list[int]] | None,
) -> _Packed:
    """The prefill sequence of segment j under scheme `pic` (see the module docstring)."""
    p, seg = len(preamble), segments[j]
    if pic == "shared":
        return _Packed(preamble + seg, [*range(p), *range(start, start + len(seg))], p)
    if pic == "own":
        return _Packed(preamble + seg, list(range(p + len(seg))), 0)
    if pic == "linked":
        before = links[j] if links is not None else (segments[j - 1] if j > 0 else [])
        tail = before[-link_tokens:] if link_tokens > 0 else []
        tail = tail[len(tail) - min(len(tail), start) :] if tail else []  # positions stay >= 0
        m = len(tail)
        return _Packed(
            preamble + tail + seg, [*range(p), *range(start - m, start + len(seg))], p + m
        )
    raise ValueError(
        f"unknown position-independence scheme {pic!r}; one of {', '.join(PIC_SCHEMES)}"
    )


@torch.inference_mode()
def prefill_segments(
    model: Transformer,
    preamble: list[int],
    segments: list[list[int]],
    max_batch_tokens: int = 4096,
    device: str = "cpu",
    starts: list[int] | None = None,
    *,
    pic: str = "shared",
    link_tokens: int = 32,
    links: list[list[int]] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (segment index, k[L, n', Hkv, d], v[L, n', Hkv, d]) for each segment, in order.

    Segment j's tokens take positions starts[j].. (default: right after the preamble); the
    preamble always sits at 0..P-1, so RoPE sees a gap, never an overlap, between the two.
    n' is the segment's length, plus the preamble's under ``pic="own"``. Under ``pic="linked"``,
    `links[j]` (its last `link_tokens` tokens) is what precedes segment j; by default the previous
    entry of `segments`, which is wrong for the first segment of a resumed build: pass `links`.
    """
    p = len(preamble)
    packed = [
        _pack(preamble, segments, j, p if starts is None else starts[j], pic, link_tokens, links)
        for j in range(len(segments))
    ]
    i = 0
    while i < len(segments):
        batch = [i]
        size = len(packed[i].ids)
        while (
            batch[-1] + 1 < len(segments)
            and size + len(packed[batch[-1] + 1].ids) <= max_batch_tokens
        ):
            batch.append(batch[-1] + 1)
            size += len(packed[batch[-1]].ids)
        ids, pos, cu = [], [], [0]
        for j in batch:
            ids.extend(packed[j].ids)
            pos.extend(packed[j].pos)
            cu.append(cu[-1] + len(packed[j].ids))
        attn = SegmentPrefill(cu_seqlens=cu, keep_from=[packed[j].keep_from for j in batch])
        model(torch.tensor(ids, device=device), torch.tensor(pos, device=device), attn)
        k_all = torch.stack(attn.k_out)  # [L, sum n', Hkv, d]
        v_all = torch.stack(attn.v_out)
        off = 0
        for j in batch:
            n = len(packed[j].ids) - packed[j].keep_from
            yield j, k_all[:, off : off + n], v_all[:, off : off + n]
            off += n
        i = batch[-1] + 1


@torch.inference_mode()
def prefill_preamble(
    model: Transformer, preamble: list[int], device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [L, P, Hkv, d] of the preamble alone (positions 0..P-1)."""
    attn = SegmentPrefill(cu_seqlens=[0, len(preamble)], keep_from=[0])
    model(torch.tensor(preamble, device=device), torch.arange(len(preamble), device=device), attn)
    return torch.stack(attn.k_out), torch.stack(attn.v_out)
