"""One forward step for all scheduled sequences: packs their new tokens, builds the attention
metadata once, runs the model, and returns logits for the sequences that sample this step."""

from __future__ import annotations

import torch

from kb.engine.attention_backend import CorpusGroup, ServeAttention
from kb.engine.scheduler import Batch
from kb.engine.shared_kv import SharedKV
from kb.model.llama import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, device: str,
                 citation_layers: frozenset[int] = frozenset()):
        cfg = model.config
        self.model, self.device, self.block_size = model, device, block_size
        dtype = next(model.parameters()).dtype
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.citation_layers = citation_layers
        self.forward_tokens = 0  # tokens run through the model since start (tests read this)

    @torch.inference_mode()
    def run(self, batch: Batch, corpora: dict[str, SharedKV]) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits[S, V], indices into batch.seqs of the S sequences that sample)."""
        ids, pos, slots, rows_of_corpus = [], [], [], {}
        cu, seq_lens, sample_rows, sample_idx = [0], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed
            all_ids = seq.all_ids
            for j in range(start, start + n):
                ids.append(all_ids[j])
                pos.append(seq.pos_offset + j)
                slots.append(seq.block_table[j // self.block_size] * self.block_size + j % self.block_size)
            if seq.corpus_key is not None:
                rows_of_corpus.setdefault(seq.corpus_key, []).extend((r, i) for r in range(cu[-1], cu[-1] + n))
            cu.append(cu[-1] + n)
            seq_lens.append(start + n)
            if batch.samples(i):
                sample_rows.append(cu[-1] - 1)
                sample_idx.append(i)
        dev = self.device
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        table = torch.zeros(len(batch.seqs), max_blocks, dtype=torch.int32)
        for i, s in enumerate(batch.seqs):
            table[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
        groups = []
        for key, pairs in rows_of_corpus.items():
            rows = torch.tensor([r for r, _ in pairs], dtype=torch.long, device=dev)
            owner = torch.tensor([i for _, i in pairs], dtype=torch.long, device=dev)
            groups.append(CorpusGroup(corpora[key], rows, owner))
        attn = ServeAttention(
            k_cache=self.k_cache, v_cache=self.v_cache,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_table=table.to(dev), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev), groups=groups,
            citation_layers=self.citation_layers)
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), attn)
        self.forward_tokens += len(ids)
        for b, m in attn.mass.items():
            seq = batch.seqs[b]
            seq.chunk_mass = m if seq.chunk_mass is None else seq.chunk_mass + m
        logits = self.model.logits(hidden.index_select(0, torch.tensor(sample_rows, device=dev)))
        return logits, sample_idx
