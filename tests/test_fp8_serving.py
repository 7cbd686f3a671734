"""An fp8 corpus served in e4m3 with per-(layer, chunk, head) scales (kb/corpus_cache.py) answers as
its dequantized 16-bit twin: the same decode logits through the engine's runner, dense and routed,
on the CPU path and (marked `gpu`) through the Triton kernels."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from attention.reference import dequantize
from kb.engine.block_manager import BlockManager
from kb.engine.runner import ModelRunner
from kb.engine.scheduler import Batch
from kb.engine.sequence import SamplingParams, SeqStatus, Sequence
from kb.engine.shared_kv import KVMeta, SharedKV
from storage.kvstore import quantize_fp8_chunks

_spec = importlib.util.spec_from_file_location(
    "bench_serve", os.path.join(os.path.dirname(__file__), "..", "bench", "serve.py")
)
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

N, CHUNK, BS = 200, 16, 16


def _corpora(cfg, device: str, dtype: torch.dtype) -> tuple[SharedKV, SharedKV]:
    """The fp8 corpus and its dequantized twin (the exact values the fp8 one stands for)."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.num_layers, N, cfg.num_kv_heads, cfg.head_dim)
    (kq, ks), (vq, vs) = (
        quantize_fp8_chunks(torch.randn(shape, generator=g) * 2, CHUNK) for _ in range(2)
    )
    k16 = [dequantize(kq[i], ks[i], CHUNK).to(device, dtype) for i in range(cfg.num_layers)]
    v16 = [dequantize(vq[i], vs[i], CHUNK).to(device, dtype) for i in range(cfg.num_layers)]
    fp8 = SharedKV(
        "c",
        list(kq.to(device).unbind(0)),
        list(vq.to(device).unbind(0)),
        CHUNK,
        N,
        meta=KVMeta(list(ks.to(device).unbind(0)), list(vs.to(device).unbind(0))),
    )
    return fp8, SharedKV("c", k16, v16, CHUNK, N)


def _logits(runner: ModelRunner, corpus: SharedKV) -> torch.Tensor:
    """Decode logits of three requests whose prompts sit in the same (randomly filled) pages."""
    blocks = BlockManager(32, BS)  # a fresh manager hands out the same pages every time
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n in (5, 9, 3):
        s = Sequence(
            torch.randint(0, 256, (n,), generator=g).tolist(),
            SamplingParams(max_tokens=2),
            corpus_key="c",
            pos_offset=N,
        )
        blocks.allocate(s, n)
        s.num_computed, s.status = n - 1, SeqStatus.RUNNING
        seqs.append(s)
    out, _ = runner.run(Batch(seqs, [1] * len(seqs)), {"c": corpus})
    return out.float()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
@pytest.mark.parametrize("routed", [False, True])
def test_fp8_corpus_answers_as_its_dequantized_twin(device, routed):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cfg = serve.tiny()
    model = serve.build_model(cfg, device, dtype, seed=3, std=0.2)
    runner = ModelRunner(model, 32, BS, device)
    serve.fill_(runner.k_cache + runner.v_cache, seed=5)
    fp8, twin = _corpora(cfg, device, dtype)
    if routed:  # the same chunks for both: the router sees the twin's (16-bit) keys
        twin = serve.with_router(twin, 0.5)
        fp8 = SharedKV(
            "c", fp8.k, fp8.v, CHUNK, N, router=twin.router, top_k=twin.top_k, meta=fp8.meta
        )
    want, got = _logits(runner, twin), _logits(runner, fp8)
    tol = 1e-4 if device == "cpu" else 0.05
    assert (got - want).abs().max() <= tol * want.abs().max(), (got - want).abs().max()
