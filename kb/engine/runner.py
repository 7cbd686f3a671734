"""One forward step for all scheduled sequences: packs their new tokens, builds the attention
metadata once, runs the model, and returns logits for the sequences that sample this step.

Two ways to attend a corpus's shared KV (`shared_mode`):
- "moska" (the service): per layer, the queries of all requests of a corpus meet its shared KV
  together (one GEMM, dense or routed), merged by log-sum-exp with each request's unique KV.
- "per_request" (the baseline of prefix caching, for benchmarks): the shared KV lives in pages of
  the unique-KV pool (`reserve_shared`), each request's block table starts with those pages, and
  the paged kernel reads them once per request. Same attention, no sharing of the reads.

How a routed corpus chooses chunks for a prefill (`prefill_routing`; by default "request" on
the CPU, where it is what makes routed prefill cheap, and "token" on the GPU, whose routed kernel
serves per-token choices at little cost and which answers a little better: docs/SERVE.md):
- "request": all new tokens of one request share one selection per KV head (the
  chunks its tokens call for most, `CorpusRouter.request_scores`), so its shared attention is
  one gather of top-k chunks and dense GEMMs over them (block-sparse prefill, as MoBA- or
  FlexPrefill-style selection does). Decode tokens (one per request) still choose alone.
- "token": every token chooses its own chunks (the paper's per-token routing).
"""

from __future__ import annotations

import torch

from kb.engine.attention_backend import CorpusGroup, ServeAttention
from kb.engine.cuda_graphs import DecodeGraphs
from kb.engine.routed_plan import StepSelection, plan_step
from kb.engine.scheduler import Batch
from kb.engine.selected_kv import GatheredRequest, SelectedKV
from kb.engine.selection import select_for
from kb.engine.shared_kv import SharedKV
from kb.model.llama import Transformer

SHARED_MODES = ("moska", "per_request")
PREFILL_ROUTING = ("request", "token")


def default_prefill_routing(device: str) -> str:
    """ "request" on the CPU, "token" elsewhere (see the module's docstring)."""
    return "request" if str(device).startswith("cpu") else "token"


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        num_blocks: int,
        block_size: int,
        device: str,
        citation_layers: frozenset[int] = frozenset(),
        shared_blocks: int = 0,
        shared_mode: str = "moska",
        prefill_routing: str | None = None,
    ):
        """`num_blocks` pages for unique KV (the block manager's ids 0..num_blocks-1) plus
        `shared_blocks` pages after them that `reserve_shared` hands to corpora. `shared_mode`
        (SHARED_MODES) and `prefill_routing` (PREFILL_ROUTING; None: the device's default) say
        how corpora are attended; ValueError for another value."""
        if shared_mode not in SHARED_MODES:
            raise ValueError(f"shared_mode must be one of {SHARED_MODES}, got {shared_mode!r}")
        if prefill_routing is not None and prefill_routing not in PREFILL_ROUTING:
            raise ValueError(
                f"prefill_routing must be one of {PREFILL_ROUTING}, got {prefill_routing!r}"
            )
        cfg = model.config
        self.model, self.device, self.block_size = model, device, block_size
        dtype = next(model.parameters()).dtype
        # one page past the pool: the scratch page the decode graphs' padding rows write to
        shape = (num_blocks + shared_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        # empty, not zeros: attention never reads past a sequence's length, and on the CPU untouched
        # pages then cost no memory until requests use them
        self.k_cache = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)
        ]
        self.v_cache = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)
        ]
        self.citation_layers = citation_layers
        self.forward_tokens = 0  # tokens run through the model since start (tests read this)
        self.shared_mode = shared_mode
        self.prefill_routing = prefill_routing or default_prefill_routing(device)
        self.shared_pages: dict[str, torch.Tensor] = {}  # corpus key -> its page ids (per_request)
        self._next_shared = num_blocks
        self._end_shared = num_blocks + shared_blocks
        self.graphs: DecodeGraphs | None = None
        self.selected_kv = SelectedKV()  # CPU: selecting requests' copied passages

    def enable_cuda_graphs(self) -> None:
        """Replay decode steps from CUDA graphs (kb/engine/cuda_graphs.py); a no-op off the GPU."""
        if str(self.device).startswith("cuda") and self.graphs is None:
            self.graphs = DecodeGraphs(self, scratch_page=self._end_shared)

    def reserve_shared(
        self, key: str, num_tokens: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Hand `num_tokens` tokens of shared pages to corpus `key`; returns per-layer views
        k, v `[num_tokens, Hkv, d]` into the pool (fill them, then build the SharedKV on them),
        so the same memory serves both shared modes."""
        assert num_tokens % self.block_size == 0, (
            f"per-request shared pages need whole blocks: {num_tokens} % {self.block_size} != 0"
        )
        n = num_tokens // self.block_size
        first = self._next_shared
        assert first + n <= self._end_shared, "not enough shared pages reserved in the pool"
        self._next_shared += n
        self.shared_pages[key] = torch.arange(
            first, first + n, dtype=torch.int32, device=self.device
        )
        hkv, d = self.k_cache[0].shape[2:]
        k = [c[first : first + n].view(num_tokens, hkv, d) for c in self.k_cache]
        v = [c[first : first + n].view(num_tokens, hkv, d) for c in self.v_cache]
        return k, v

    def _block_table(self, batch: Batch, prefix: list[str | None]) -> torch.Tensor:
        """[B, max_blocks] int32 on the device; in per_request mode each row starts with its
        corpus's shared pages."""
        seqs = batch.seqs
        width = max(len(s.block_table) for s in seqs)
        flat = []
        for s in seqs:  # one host list, one copy to the device
            flat.extend(s.block_table)
            flat.extend([0] * (width - len(s.block_table)))
        own = torch.tensor(flat, dtype=torch.int32).view(len(seqs), width).to(self.device)
        if not any(k is not None for k in prefix):
            return own
        pages = [self.shared_pages[k] if k is not None else None for k in prefix]
        lens = {p.shape[0] if p is not None else 0 for p in pages}
        if len(lens) == 1 and None not in pages:  # the usual case: one prefix length for all
            return torch.cat([torch.stack(pages), own], dim=1)
        p_max = max(lens)
        rows = []
        for p, r in zip(pages, own):
            row = r if p is None else torch.cat([p, r])
            rows.append(torch.nn.functional.pad(row, (0, p_max + width - row.shape[0])))
        return torch.stack(rows)

    def _spans(
        self, runs: list[tuple[int, int, int]], all_rows: bool
    ) -> list[tuple[int, int]] | None:
        """Each request's (start, length) within its corpus group's rows (the step's rows when
        `all_rows`), for request-level prefill routing; None when no request prefills several
        tokens or routing is per token."""
        if self.prefill_routing != "request" or all(n == 1 for _, n, _ in runs):
            return None
        spans, off = [], 0
        for r0, n, _ in runs:
            spans.append((r0 if all_rows else off, n))
            off += n
        return spans

    def _select(self, batch: Batch, corpora: dict[str, SharedKV]) -> None:
        """Attention retrieval: each selecting request that starts its prefill chooses its
        passages now (the selection pass over its prompt, kb/engine/selection.py); its citations
        come from the selection's scores."""
        for seq in batch.seqs:
            if not seq.select or seq.selection is not None:
                continue
            shared = corpora.get(seq.corpus_key)
            if shared is None or shared.selector is None:
                seq.select = False
                continue
            seq.selection = select_for(
                shared,
                self.model,
                seq.prompt_ids,
                seq.select_span,
                seq.pos_offset,
                seq.history_spans,
            )
            seq.chunk_mass = seq.selection.scores.to(self.device)

    def _step_selection(
        self, shared: SharedKV, batch: Batch, runs: list[tuple[int, int, int]]
    ) -> StepSelection:
        """The rows' chunk ids (and virtual-position shifts) of a group of selecting requests,
        [T_c, Hkv, K], the same for every layer."""
        seqs = [batch.seqs[i] for _, _, i in runs]
        width = max(s.selection.chunks.shape[0] for s in seqs)
        counts = [n for _, n, _ in runs]
        ids = torch.full((len(seqs), width), -1, dtype=torch.long)
        shift = torch.zeros((len(seqs), width), dtype=torch.long)
        shifted = False
        for j, s in enumerate(seqs):
            c = s.selection.chunks
            ids[j, : c.shape[0]] = c
            if s.selection.shift is not None:
                shift[j, : c.shape[0]] = s.selection.shift
                shifted = True
        reps = torch.tensor(counts)
        hkv = shared.k[0].shape[1]
        rows = ids.repeat_interleave(reps, dim=0).to(self.device)
        if str(self.device).startswith("cuda"):
            step = plan_step(rows, shared, self.model.config.num_heads)
            step.dense_layers = 0
        else:
            idx = rows.to(torch.int32)[:, None, :].expand(-1, hkv, -1).contiguous()
            step = StepSelection(idx, None)
            if not shared.meta.remote:  # a sharded corpus's chunks are attended where they live
                step.gathered = self._gathered(shared, seqs, counts)
                step.store = self.selected_kv
        if shifted:
            step.chunk_shift = (
                shift.repeat_interleave(reps, dim=0)[:, None, :].expand(-1, hkv, -1).to(self.device)
            )
        return step

    def _gathered(
        self, shared: SharedKV, seqs: list, counts: list[int]
    ) -> list[GatheredRequest] | None:
        """The CPU group's requests, each attending its own copy of its passages, if every one
        of them has (or now gets) room for its copy; None: the group takes the per-step path."""
        out, offset = [], 0
        for s, n in zip(seqs, counts):
            need = SelectedKV.footprint(shared, s.selection.chunks.shape[0])
            if not self.selected_kv.admit(s.seq_id, need):
                return None
            out.append(GatheredRequest(offset, n, s.seq_id, s.selection))
            offset += n
        return out

    def release(self, seq) -> None:
        """A request ended: free what the runner holds for it beyond its pages."""
        self.selected_kv.release(seq.seq_id)

    @torch.inference_mode()
    def run(self, batch: Batch, corpora: dict[str, SharedKV]) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits[S, V], indices into batch.seqs of the S sequences that sample)."""
        assert self.shared_mode in SHARED_MODES, self.shared_mode
        self._select(batch, corpora)
        if self.graphs is not None:
            replayed = self.graphs.run(batch, corpora)
            if replayed is not None:
                return replayed
        assert self.prefill_routing in PREFILL_ROUTING, self.prefill_routing
        per_request = self.shared_mode == "per_request"
        bs = self.block_size
        ids, pos, slots, rows_of_corpus = [], [], [], {}
        cu, seq_lens, sample_rows, sample_idx, prefix = [0], [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed
            for j in range(start, start + n):
                ids.append(seq.token_at(j))
                pos.append(seq.pos_offset + j)
                slots.append(seq.slot(j, bs))
            kv_len = start + n
            if seq.corpus_key is not None and per_request:
                prefix.append(seq.corpus_key)
                kv_len += self.shared_pages[seq.corpus_key].shape[0] * bs
            else:
                prefix.append(None)
                if seq.corpus_key is not None:  # selecting requests form their own group
                    group = (seq.corpus_key, seq.selection is not None)
                    rows_of_corpus.setdefault(group, []).append((cu[-1], n, i))
            cu.append(cu[-1] + n)
            seq_lens.append(kv_len)
            if batch.samples(i):
                sample_rows.append(cu[-1] - 1)
                sample_idx.append(i)
        dev = self.device
        t, b = len(ids), len(batch.seqs)
        # all integer metadata in one host tensor and one copy to the device
        packed = torch.tensor(ids + pos + slots + seq_lens + cu + sample_rows, dtype=torch.long).to(
            dev
        )
        ids_d, pos_d, slots_d, lens_d, cu_d, sample_d = packed.split(
            [t, t, t, b, b + 1, len(sample_rows)]
        )
        groups = []
        for (key, selecting), runs in rows_of_corpus.items():
            whole = len(runs) == b and runs[-1][0] + runs[-1][1] == t  # every row, in order
            spans = self._spans(runs, whole and not self.citation_layers)
            sel = self._step_selection(corpora[key], batch, runs) if selecting else None
            if whole and (not self.citation_layers or selecting):
                groups.append(CorpusGroup(corpora[key], None, None, spans, selection=sel))
                continue
            rows = [r for r0, n, _ in runs for r in range(r0, r0 + n)]
            owner = [i for _, n, i in runs for _ in range(n)]
            rt = torch.tensor(rows + owner, dtype=torch.long).to(dev)
            groups.append(
                CorpusGroup(corpora[key], rt[: len(rows)], rt[len(rows) :], spans, selection=sel)
            )
        attn = ServeAttention(
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            slot_mapping=slots_d,
            block_table=self._block_table(batch, prefix),
            seq_lens=lens_d.to(torch.int32),
            cu_seqlens_q=cu_d.to(torch.int32),
            groups=groups,
            citation_layers=self.citation_layers,
            max_seqlen_q=max(batch.num_new),
            max_seqlen_k=max(seq_lens),
            rope_inv_freq=self.model.inv_freq,
        )
        hidden = self.model(ids_d, pos_d, attn)
        self.forward_tokens += t
        for bi, m in attn.mass.items():
            seq = batch.seqs[bi]
            seq.chunk_mass = m if seq.chunk_mass is None else seq.chunk_mass + m
        if len(sample_rows) < t:
            hidden = hidden.index_select(0, sample_d)
        logits = self.model.logits(hidden)
        return logits, sample_idx
