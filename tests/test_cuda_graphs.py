"""Decode steps replayed from CUDA graphs (kb/engine/cuda_graphs.py) compute what the eager step
computes: same logits for dense, routed and per-request shared attention, padded batches included.
The input layout is checked on the CPU; replays need a GPU (marked `gpu`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from kb.engine.block_manager import BlockManager
from kb.engine.cuda_graphs import DecodeGraphs
from kb.engine.engine import Engine, EngineConfig
from kb.engine.runner import ModelRunner
from kb.engine.scheduler import Batch
from kb.engine.sequence import SamplingParams, SeqStatus, Sequence
from kb.engine.shared_kv import SharedKV
from kb.model.loader import LoadedModel
from tests.conftest import DigitTokenizer

_spec = importlib.util.spec_from_file_location(
    "bench_serve", os.path.join(os.path.dirname(__file__), "..", "bench", "serve.py")
)
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

N, CHUNK, BS, POOL = 256, 16, 16, 96
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _runner(device: str, dtype: torch.dtype) -> tuple[ModelRunner, BlockManager, SharedKV]:
    """A runner with corpus "corpus" (and its copy "copy", other pages, for per-request copies)."""
    model = serve.build_model(serve.tiny(), device, dtype, seed=3, std=0.2)
    runner = ModelRunner(model, POOL, BS, device, shared_blocks=2 * N // BS)
    serve.fill_(runner.k_cache + runner.v_cache, seed=5)
    runner.reserve_shared("copy", N)
    k, v = runner.reserve_shared("corpus", N)
    return runner, BlockManager(POOL, BS), SharedKV("corpus", k, v, chunk_size=CHUNK, pos_offset=N)


def _tiny_lm(device: str, dtype: torch.dtype) -> LoadedModel:
    model = serve.build_model(serve.tiny(), device, dtype, seed=3, std=0.2)
    return LoadedModel(model, DigitTokenizer(), model.config, Path("."), "tiny", "digits")


def _decoding(
    blocks: BlockManager, prompts: list[int], key: str | None | list, seed: int = 0
) -> Batch:
    """Sequences whose prompts are in the cache but for the last token: the next step decodes it.
    `key`: every sequence's corpus, or a list of one per sequence."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    keys = key if isinstance(key, list) else [key] * len(prompts)
    for n, kk in zip(prompts, keys):
        s = Sequence(
            torch.randint(0, 256, (n,), generator=g).tolist(),
            SamplingParams(max_tokens=4),
            corpus_key=kk,
            pos_offset=N if kk else 0,
        )
        blocks.allocate(s, n)
        s.num_computed, s.status = n - 1, SeqStatus.RUNNING
        seqs.append(s)
    return Batch(seqs, [1] * len(seqs))


def test_inputs_layout_pads_to_the_scratch_page():
    runner, blocks, _ = _runner("cpu", torch.float32)
    graphs = DecodeGraphs(runner, scratch_page=POOL + N // BS)
    batch = _decoding(blocks, [5, 20, 33], "corpus")
    rows, width = 4, 16
    host = torch.zeros(4 * rows + rows * width, dtype=torch.long)
    graphs._fill(host, batch.seqs, rows, width, [[]] * 3)
    ids, pos, slots, lens = host[:16].view(4, rows).tolist()
    seqs = batch.seqs
    assert ids[:3] == [s.prompt_ids[-1] for s in seqs] and ids[3] == 0
    assert pos == [N + 4, N + 19, N + 32, 0]
    assert slots[:3] == [
        s.block_table[(s.num_computed) // BS] * BS + s.num_computed % BS for s in seqs
    ]
    assert slots[3] == graphs.scratch * BS and lens == [5, 20, 33, 1]
    table = host[16:].view(rows, width)
    for i, s in enumerate(seqs):
        assert table[i, : len(s.block_table)].tolist() == s.block_table
        assert not table[i, len(s.block_table) :].any()
    assert table[3].tolist() == [graphs.scratch] + [0] * (width - 1)
    # per_request: the corpus's shared pages head every real row; lengths count them
    prefix = runner.shared_pages["corpus"].tolist()
    host = torch.zeros(4 * rows + rows * 32, dtype=torch.long)
    graphs._fill(host, seqs, rows, 32, [prefix] * 3)
    table = host[16:].view(rows, 32)
    assert table[1, : len(prefix)].tolist() == prefix
    assert table[1, len(prefix) : len(prefix) + 2].tolist() == seqs[1].block_table
    assert host[12:16].tolist() == [N + 5, N + 20, N + 33, 1]
    # copies: each row its own corpus's pages (here: the first row none)
    graphs._fill(host, seqs, rows, 32, [[], prefix[:3], prefix])
    table = host[16:].view(rows, 32)
    assert table[0, :1].tolist() == seqs[0].block_table[:1] and table[1, :3].tolist() == prefix[:3]
    assert table[2, : len(prefix)].tolist() == prefix and host[12:16].tolist() == [
        5,
        3 * BS + 20,
        N + 33,
        1,
    ]


def test_cpu_engine_has_no_graphs():
    engine = Engine(
        _tiny_lm("cpu", torch.float32), EngineConfig(cuda_graphs=True, unique_kv_tokens=256)
    )
    assert engine.runner.graphs is None


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "mode", ["ours_dense", "ours_routed", "per_request", "copies", "no_corpus"]
)
def test_replayed_decode_equals_eager(mode):
    runner, blocks, sh = _runner("cuda", torch.bfloat16)
    corpora = {"corpus": serve.with_router(sh, 0.25) if mode == "ours_routed" else sh}
    runner.shared_mode = "per_request" if mode in ("per_request", "copies") else "moska"
    for i, prompts in enumerate(([7], [9, 30, 17], [3, 50, 12, 40, 8])):  # 1 row; 3 and 5 padded
        key = None if mode == "no_corpus" else "corpus"
        if mode == "copies":  # requests of different corpora (and one of none) in one graph
            key = ["copy", "corpus", None, "copy", "corpus"][: len(prompts)]
        batch = _decoding(blocks, prompts, key, seed=i)
        runner.graphs = None
        want, idx = runner.run(batch, corpora)
        want = want.clone()
        runner.enable_cuda_graphs()
        for _ in range(2):  # the capture, then a replay
            got, gidx = runner.run(batch, corpora)
            assert gidx == idx == list(range(len(prompts)))
            # the graph's paged kernel may split the keys differently (its grid is sized for the
            # table's capacity): bf16 rounding differs, amplified by random weights; a wrong input
            # (a stale table, length or row) moves logits by their whole scale
            err = (got - want).abs().max().item()
            assert err <= 0.05 * want.abs().max().item(), (mode, prompts, err)
        assert runner.graphs.replays == 2 and len(runner.graphs.graphs) == 1
        assert all(g is not None for g in runner.graphs.graphs.values())
        for s in batch.seqs:
            blocks.release(s)


@pytest.mark.gpu
@cuda
def test_graphs_of_several_modes_and_registrations_share_one_pool():
    """Switching shared modes keeps every graph; re-registering a corpus drops only its own."""
    runner, blocks, sh = _runner("cuda", torch.bfloat16)
    runner.enable_cuda_graphs()
    again = SharedKV("corpus", sh.k, sh.v, chunk_size=CHUNK, pos_offset=N)  # a new registration
    for mode, corpus in (("moska", sh), ("per_request", sh), ("moska", again), ("moska", sh)):
        runner.shared_mode = mode
        batch = _decoding(blocks, [5, 9], "corpus")
        runner.run(batch, {"corpus": corpus})
        for s in batch.seqs:
            blocks.release(s)
    live = [k for k, g in runner.graphs.graphs.items() if g is not None]
    assert len(live) == 2 and runner.graphs.replays == 4  # per_request's and the last moska one
    assert {k[2] for k in live} == {"moska", "per_request"}


@pytest.mark.gpu
@cuda
def test_engine_generates_through_graphs():
    lm = _tiny_lm("cuda", torch.bfloat16)
    outs = {}
    for graphs in (False, True):
        engine = Engine(
            lm,
            EngineConfig(
                device="cuda", unique_kv_tokens=1024, cuda_graphs=graphs, citation_layers=0
            ),
        )
        hs = [
            engine.add_request(
                list(range(3 + i, 9 + 2 * i)), SamplingParams(max_tokens=12, ignore_eos=True)
            )
            for i in range(5)
        ]
        engine.run_until_done()
        outs[graphs] = [h.seq.output_ids for h in hs]
        if graphs:
            assert engine.runner.graphs.replays >= 10
    # the same kernels on the same inputs (one key split at these lengths): the same tokens
    assert outs[True] == outs[False] and all(len(o) == 12 for o in outs[True])
