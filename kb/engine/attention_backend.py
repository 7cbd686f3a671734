"""Per-step attention backends handed to the model (`attend(layer, q, k, v) -> o`).

- `SegmentPrefill`: causal attention inside each packed sequence, recording keys and values:
  how a corpus's segments are precomputed.
- `ServeAttention`: the serving step. New tokens' k/v go into each request's unique pages; the
  unique attention runs for all requests at once; then, per corpus, the queries of all its
  requests meet the corpus's shared KV together (one GEMM, routed or dense), and the two partial
  results merge by log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import attention
from kb.engine.shared_kv import SharedKV


@dataclass
class SegmentPrefill:
    cu_seqlens: list[int]  # packed sequence boundaries, len B+1
    keep_from: list[int]  # per sequence: first token whose k/v is recorded
    k_out: list[torch.Tensor] = field(default_factory=list)  # per layer [sum kept, Hkv, d]
    v_out: list[torch.Tensor] = field(default_factory=list)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        keep_k, keep_v = [], []
        for b in range(len(self.cu_seqlens) - 1):
            s, e = self.cu_seqlens[b], self.cu_seqlens[b + 1]
            # [H, S, d] layout for SDPA; GQA heads expand inside SDPA
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                               v[s:e].transpose(0, 1), is_causal=True, enable_gqa=True)
            out[s:e] = o.transpose(0, 1)
            keep_k.append(k[s + self.keep_from[b]:e])
            keep_v.append(v[s + self.keep_from[b]:e])
        self.k_out.append(torch.cat(keep_k))
        self.v_out.append(torch.cat(keep_v))
        return out


@dataclass
class CorpusGroup:
    """The rows of a step's packed tokens that attend one corpus's shared KV."""

    shared: SharedKV
    rows: torch.Tensor  # [T_c] token indices into the step
    seq_of_row: torch.Tensor  # [T_c] index of the owning sequence within the batch


@dataclass
class ServeAttention:
    k_cache: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, d]
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [T] flat slot of each new token
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] KV length after this step
    cu_seqlens_q: torch.Tensor  # [B+1]
    groups: list[CorpusGroup]
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # batch index -> mass per chunk
    citation_layers: frozenset[int] = frozenset()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        hkv, d = kc.shape[2], kc.shape[3]
        kc.view(-1, hkv, d).index_copy_(0, self.slot_mapping, k.to(kc.dtype))
        vc.view(-1, hkv, d).index_copy_(0, self.slot_mapping, v.to(vc.dtype))
        o, lse = attention.unique_attention(q, kc, vc, self.block_table, self.seq_lens, self.cu_seqlens_q)
        for g in self.groups:
            sh = g.shared
            qg = q.index_select(0, g.rows)
            idx = None
            if sh.routed:
                idx = sh.router.route(layer, qg, sh.top_k)
            o_s, lse_s = attention.shared_attention(qg, sh.k[layer], sh.v[layer], idx, sh.chunk_size)
            o_m, lse_m = attention.merge(o_s, lse_s, o.index_select(0, g.rows), lse.index_select(0, g.rows))
            o.index_copy_(0, g.rows, o_m.to(o.dtype))
            if layer in self.citation_layers:
                self._accumulate_mass(qg, sh, layer, g.seq_of_row, lse_m)
        return o

    def _accumulate_mass(self, q: torch.Tensor, sh: SharedKV, layer: int, seq_of_row: torch.Tensor,
                         lse_total: torch.Tensor) -> None:
        """Add each row's softmax mass on every shared chunk (summed over heads) to its sequence."""
        t, hq, d = q.shape
        k = sh.k[layer].float().repeat_interleave(hq // sh.k[layer].shape[1], dim=1)
        s = torch.einsum("thd,nhd->thn", q.float(), k) / math.sqrt(d)
        p = torch.exp(s - lse_total.unsqueeze(-1)).sum(dim=1)  # [T, N]
        p[:, : sh.preamble_len] = 0  # the preamble soaks up attention (a sink); it is no source
        n = p.shape[1]
        pad = sh.num_chunks * sh.chunk_size - n
        per_chunk = F.pad(p, (0, pad)).view(t, sh.num_chunks, sh.chunk_size).sum(-1)
        for b in seq_of_row.unique().tolist():
            rows = (seq_of_row == b).nonzero().squeeze(1)
            m = per_chunk.index_select(0, rows).sum(0)
            self.mass[b] = self.mass[b] + m if b in self.mass else m
