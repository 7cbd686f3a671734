"""CUDA graphs of the decode step, one per (batch-size bucket, block-table width, corpus).

An eager decode step of an 8B model launches ~1,700 kernels from Python, and at small batches the
host takes 3-9x the GPU's time (bench/results/profile_step.json). A captured graph replays the
whole step (model, shared and unique attention, merge, logits) in one launch. Graphs are captured
lazily, the first time a shape is seen, into one shared memory pool (as nano-vllm and vLLM do).

A step is graphed when every sequence decodes one token and samples, all sequences attend the
same corpus (or none), and the step measures no citations; anything else runs eagerly. Rows past
the real batch are padding: they read and write a scratch page only. When every sequence carries
its own chunk selection (`seq.selection`, attention retrieval), the selections are one more
static input (chunk ids per row, -1 padded to a power-of-two width) and the graph builds the
routing plan from them once per replay, before the first layer, for all layers
(kb/engine/routed_plan.py); virtual positions (`selection.shift`, a position shift per chunk)
are one more such input, carried by the plan into the kernel. With citations on, every
`cite_every`-th decode step runs eagerly and measures them (the mass is a sample of the steps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kb.engine.attention_backend import CorpusGroup, ServeAttention
from kb.engine.routed_plan import plan_step, seq_chunks, stage_rows
from kb.engine.scheduler import Batch
from kb.engine.shared_kv import SharedKV

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_WIDTH = 16  # block-table columns of the narrowest graph (powers of two above it)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    meta: torch.Tensor  # static device input, int64 [4 * rows + rows * width]
    host: torch.Tensor  # pinned staging of the same shape
    logits: torch.Tensor  # static output [rows, vocab]
    cu_seqlens: (
        torch.Tensor
    )  # static [rows + 1]: the graph reads it, so it must outlive the capture
    shared: SharedKV | None  # keeps the captured corpus tensors alive


def _bucket(n: int) -> int | None:
    return next((b for b in BUCKETS if b >= n), None)


def _width(n: int) -> int:
    w = MIN_WIDTH
    while w < n:
        w *= 2
    return w


class DecodeGraphs:
    def __init__(self, runner, scratch_page: int, cite_every: int = 8):
        """`runner`: the ModelRunner whose model, caches and shared pages the graphs use;
        `scratch_page`: a page no sequence owns (padding rows write there)."""
        self.runner = runner
        self.scratch = scratch_page
        self.cite_every = cite_every
        self.graphs: dict[
            tuple, _Graph | None
        ] = {}  # None: capture failed, that shape runs eagerly
        self.pool = None
        self.replays = 0
        self._decode_steps = 0
        self._pages: dict[
            str, list[int]
        ] = {}  # per_request mode: a corpus's shared pages, on the host

    def run(
        self, batch: Batch, corpora: dict[str, SharedKV]
    ) -> tuple[torch.Tensor, list[int]] | None:
        """(logits[B, V], sampled indices) from a graph replay, or None: run the step eagerly."""
        r, seqs = self.runner, batch.seqs
        if any(n != 1 for n in batch.num_new) or not all(
            batch.samples(i) for i in range(len(seqs))
        ):
            return None
        self._decode_steps += 1
        if r.citation_layers and self._decode_steps % self.cite_every == 1:
            return None
        rows = _bucket(len(seqs))
        if rows is None:
            return None
        shared, prefixes, key = None, [[]] * len(seqs), None
        if r.shared_mode == "per_request":
            # the shared pages are only block-table entries: requests of different corpora share
            # one graph, whose key names no corpus
            prefixes = [self._shared_pages(s.corpus_key) if s.corpus_key else [] for s in seqs]
        else:
            keys = {s.corpus_key for s in seqs}
            if len(keys) != 1:
                return None
            key = next(iter(keys))
            shared = corpora[key] if key is not None else None
        width = _width(max(len(s.block_table) + len(p) for s, p in zip(seqs, prefixes)))
        chunks = [seq_chunks(s) for s in seqs] if shared is not None else []
        shifts = [getattr(getattr(s, "selection", None), "shift", None) for s in seqs]
        shifted = any(x is not None for x in shifts)
        sel_width = (
            _width(max(c.numel() for c in chunks))
            if chunks and all(c is not None for c in chunks)
            else 0
        )
        shifted = shifted and sel_width > 0
        # _forget reads [2:4] and [4]
        gkey = (rows, width, r.shared_mode, key, id(shared), sel_width, shifted)
        if gkey not in self.graphs:
            self._forget(gkey)
            self.graphs[gkey] = self._capture(rows, width, shared, sel_width, shifted)
        g = self.graphs[gkey]
        if g is None:
            return None
        self._fill(
            g.host,
            seqs,
            rows,
            width,
            prefixes,
            chunks if sel_width else None,
            sel_width,
            shifts if shifted else None,
        )
        g.meta.copy_(g.host, non_blocking=True)
        g.graph.replay()
        self.replays += 1
        r.forward_tokens += len(seqs)
        return g.logits[: len(seqs)], list(range(len(seqs)))

    # -- capture ------------------------------------------------------------------------------
    def _capture(
        self,
        rows: int,
        width: int,
        shared: SharedKV | None,
        sel_width: int = 0,
        shifted: bool = False,
    ) -> _Graph | None:
        r = self.runner
        table_end = 4 * rows + rows * width
        sel_end = table_end + rows * sel_width
        meta = torch.zeros(
            sel_end + (rows * sel_width if shifted else 0), dtype=torch.long, device=r.device
        )
        host = torch.zeros(meta.shape, dtype=torch.long).pin_memory()
        self._fill(
            host, [], rows, width, [], [] if sel_width else None, sel_width, [] if shifted else None
        )
        meta.copy_(host)
        cu = torch.arange(rows + 1, dtype=torch.int32, device=r.device)

        def forward() -> torch.Tensor:
            groups = []
            if shared is not None:
                # the step's plan: built here, once, for every layer
                shift = meta[sel_end:].view(rows, sel_width) if shifted else None
                sel = (
                    plan_step(
                        meta[table_end:sel_end].view(rows, sel_width),
                        shared,
                        r.model.config.num_heads,
                        shift,
                    )
                    if sel_width
                    else None
                )
                groups = [CorpusGroup(shared, None, None, selection=sel)]
            ids, pos, slots, lens = meta[: 4 * rows].view(4, rows)
            attn = ServeAttention(
                k_cache=r.k_cache,
                v_cache=r.v_cache,
                slot_mapping=slots,
                block_table=meta[4 * rows : table_end].view(rows, width).to(torch.int32),
                seq_lens=lens.to(torch.int32),
                cu_seqlens_q=cu,
                groups=groups,
                max_seqlen_q=1,
                max_seqlen_k=width * r.block_size,
                rope_inv_freq=getattr(r.model, "inv_freq", None),
            )
            return r.model.logits(r.model(ids, pos, attn))

        try:
            side = torch.cuda.Stream(r.device)
            side.wait_stream(torch.cuda.current_stream(r.device))
            with torch.cuda.stream(side):  # warm-up: Triton compiles, the allocator settles
                forward()
            torch.cuda.current_stream(r.device).wait_stream(side)
            if self.pool is None:  # one memory pool for every graph (they never run at once)
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = forward()
        except RuntimeError as e:  # an op that syncs with the host cannot be captured
            log.warning("decode step of %d rows not captured (%s); it runs eagerly", rows, e)
            torch.cuda.synchronize(r.device)
            return None
        log.info(
            "captured the decode step: %d rows, %d block-table columns%s",
            rows,
            width,
            f", corpus {shared.key}" if shared is not None else "",
        )
        return _Graph(graph, meta, host, logits, cu, shared)

    def _forget(self, new: tuple) -> None:
        """Drop graphs of an older registration of corpus `key` in the same shared mode (its
        tensors were replaced). Destroying every graph of the memory pool releases the pool, so
        the next capture then starts a new one."""
        for k in [k for k in self.graphs if k[2:4] == new[2:4] and k[4] != new[4]]:
            del self.graphs[k]
        if not any(g is not None for g in self.graphs.values()):
            self.pool = None

    def _shared_pages(self, key: str) -> list[int]:
        if key not in self._pages:
            self._pages[key] = self.runner.shared_pages[key].tolist()
        return self._pages[key]

    # -- inputs -------------------------------------------------------------------------------
    def _fill(
        self,
        host: torch.Tensor,
        seqs: list,
        rows: int,
        width: int,
        prefixes: list[list[int]],
        chunks: list | None = None,
        sel_width: int = 0,
        shifts: list | None = None,
    ) -> None:
        """Write the step's inputs into `host`: ids, positions, slots, KV lengths, block tables
        (each row's corpus pages first, in per_request mode), then each row's chosen chunks when
        `chunks` is given; padding rows attend one token of the scratch page (and no chunk)."""
        if chunks is not None:
            at = 4 * rows + rows * width
            host[at : at + rows * sel_width].view(rows, sel_width).copy_(
                stage_rows(chunks, rows, sel_width)
            )
            if shifts is not None:  # a row without shifts (or padding) attends at stored positions
                host[at + rows * sel_width :].view(rows, sel_width).copy_(
                    stage_rows(shifts, rows, sel_width, fill=0)
                )
        bs, n = self.runner.block_size, len(seqs)
        ids, pos, slots, lens = [], [], [], []
        for s, pre in zip(seqs, prefixes):
            start = s.num_computed
            ids.append(s.token_at(start))
            pos.append(s.pos_offset + start)
            slots.append(s.slot(start, bs))
            lens.append(len(pre) * bs + start + 1)
        pad = rows - n
        vec = host[: 4 * rows].view(4, rows)
        vec.copy_(
            torch.tensor(
                [
                    ids + [0] * pad,
                    pos + [0] * pad,
                    slots + [self.scratch * bs] * pad,
                    lens + [1] * pad,
                ],
                dtype=torch.long,
            )
        )
        table = host[4 * rows : 4 * rows + rows * width].view(rows, width)
        table.zero_()
        same = n > 1 and all(p is prefixes[0] for p in prefixes)
        if same and prefixes[0]:  # the usual case: one corpus, its pages broadcast to every row
            table[:n, : len(prefixes[0])] = torch.tensor(prefixes[0], dtype=torch.long)
        for i, (s, pre) in enumerate(zip(seqs, prefixes)):
            if pre and not same:
                table[i, : len(pre)] = torch.tensor(pre, dtype=torch.long)
            table[i, len(pre) : len(pre) + len(s.block_table)] = torch.tensor(
                s.block_table, dtype=torch.long
            )
        table[n:, 0] = self.scratch
