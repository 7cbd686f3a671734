"""Per-request chunk selections planned once per step (kb/engine/routed_plan.py) and carried
through the decode graphs (kb/engine/cuda_graphs.py). The input layout and the plan's shape run
on the CPU; replays need a GPU (marked `gpu`): a selection of the first chunks must decode as a
dense corpus cut to those chunks, and a selection of every chunk as the whole corpus."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

from kb.engine.cuda_graphs import DecodeGraphs
from kb.engine.routed_plan import StepSelection, plan_step, seq_chunks, stage_rows
from kb.engine.shared_kv import SharedKV
from tests.test_cuda_graphs import BS, CHUNK, POOL, N, _decoding, _runner

_spec = importlib.util.spec_from_file_location(
    "bench_serve", os.path.join(os.path.dirname(__file__), "..", "bench", "serve.py")
)
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclass
class _Chosen:
    """What attention retrieval leaves on a sequence: its chunk ids (kb.engine.selection)."""

    chunks: torch.Tensor
    shift: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def test_stage_rows_pads_and_plan_step_expands_over_heads():
    rows = stage_rows([torch.tensor([3, 1]), None, torch.tensor([0, 2, 5])], 4, 4)
    assert rows.tolist() == [[3, 1, -1, -1], [-1] * 4, [0, 2, 5, -1], [-1] * 4]
    runner, _, sh = _runner("cpu", torch.float32)
    sel = plan_step(rows, sh, runner.model.config.num_heads)
    hkv = sh.k[0].shape[1]
    assert sel.chunk_idx.shape == (4, hkv, 4) and sel.chunk_idx.dtype == torch.int32
    assert (sel.chunk_idx[:, 0] == sel.chunk_idx[:, -1]).all()  # one list for every KV head
    assert sel.plan is None  # nothing to plan off the CUDA path: the CPU kernels read chunk_idx
    idx, plan = StepSelection(sel.chunk_idx, None, dense_layers=1).for_layer(0)
    assert idx is None and plan is None
    assert torch.equal(StepSelection(sel.chunk_idx, None, 1).for_layer(1)[0], sel.chunk_idx)


def test_graph_inputs_carry_the_selections():
    runner, blocks, _ = _runner("cpu", torch.float32)
    graphs = DecodeGraphs(runner, scratch_page=POOL + N // BS)
    batch = _decoding(blocks, [5, 20, 33], "corpus")
    for i, s in enumerate(batch.seqs):
        s.selection = _Chosen(torch.arange(i + 1))
    rows, width, sw = 4, 16, 16
    host = torch.zeros(4 * rows + rows * width + rows * sw, dtype=torch.long)
    chunks = [seq_chunks(s) for s in batch.seqs]
    graphs._fill(host, batch.seqs, rows, width, [[]] * 3, chunks, sw)
    sel = host[4 * rows + rows * width :].view(rows, sw)
    assert sel[2, :3].tolist() == [0, 1, 2] and (sel[2, 3:] == -1).all()
    assert (sel[3] == -1).all()  # a padding row chooses nothing
    assert host[4 * rows : 4 * rows + width].tolist()[:1] == batch.seqs[0].block_table[:1]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kept", [N // CHUNK // 2, N // CHUNK])
def test_replayed_selection_equals_the_corpus_cut_to_it(kept):
    runner, blocks, sh = _runner("cuda", torch.bfloat16)
    cut = SharedKV(
        "corpus",
        [k[: kept * CHUNK] for k in sh.k],
        [v[: kept * CHUNK] for v in sh.v],
        chunk_size=CHUNK,
        pos_offset=N,
    )
    batch = _decoding(blocks, [9, 30, 17], "corpus", seed=1)
    runner.graphs = None
    want, _ = runner.run(batch, {"corpus": cut})  # eager, dense over the kept chunks only
    want = want.clone()
    for s in batch.seqs:  # every request chose the kept chunks (in some order)
        s.selection = _Chosen(torch.randperm(kept))
    runner.enable_cuda_graphs()
    for _ in range(2):  # the capture, then a replay
        got, _ = runner.run(batch, {"corpus": sh})
        err = (got - want).abs().max().item()
        assert err <= 0.05 * want.abs().max().item(), (kept, err)
    assert runner.graphs.replays == 2
    for s in batch.seqs:
        blocks.release(s)


def test_graph_inputs_carry_the_shifts():
    """Virtual positions: the shifts follow the chunk ids in the graph's inputs (0: stored)."""
    runner, blocks, _ = _runner("cpu", torch.float32)
    graphs = DecodeGraphs(runner, scratch_page=POOL + N // BS)
    batch = _decoding(blocks, [5, 9], "corpus")
    rows, width, sw = 4, 16, 16
    chunks = [torch.arange(2), torch.arange(3)]
    shifts = [torch.tensor([3, 4]), None]
    host = torch.zeros(4 * rows + rows * width + 2 * rows * sw, dtype=torch.long)
    graphs._fill(host, batch.seqs, rows, width, [[]] * 2, chunks, sw, shifts)
    at = 4 * rows + rows * width + rows * sw
    sh = host[at:].view(rows, sw)
    assert sh[0, :3].tolist() == [3, 4, 0] and not sh[1:].any()


@pytest.mark.gpu
@cuda
def test_replayed_shifted_selection_equals_the_eager_step():
    runner, blocks, sh = _runner("cuda", torch.bfloat16)
    batch = _decoding(blocks, [9, 30, 17], "corpus", seed=2)
    g = torch.Generator().manual_seed(0)
    for s in batch.seqs:
        c = torch.randperm(N // CHUNK, generator=g)[:5].sort().values
        s.selection = _Chosen(c, shift=torch.randint(-200, 200, (5,), generator=g))
    runner.graphs = None
    want, _ = runner.run(batch, {"corpus": sh})
    want = want.clone()
    runner.enable_cuda_graphs()
    for _ in range(2):
        got, _ = runner.run(batch, {"corpus": sh})
        err = (got - want).abs().max().item()
        assert err <= 0.05 * want.abs().max().item(), err
    assert runner.graphs.replays == 2
    for s in batch.seqs:
        blocks.release(s)
