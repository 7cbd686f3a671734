"""Parity of the grouped routed kernel (attention/shared_routed_grouped.py) with the reference.

Same set-up as tests/test_attention.py: without a GPU the kernel runs under Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported; if triton came first, the in-process tests
skip and test_attention.py's subprocess test covers the interpreter suite of that file, while
this file's own subprocess test re-runs it). With CUDA the grid runs compiled and the `gpu`
tests add the Llama-3.1-8B layer shape, persistent grids, spans and graph capture.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_helpers import (
    DEV,
    check,
    gen,
    gpu,
    kernels,
    make_kv,
    needs_cuda,
    run_interpreter_suite,
)

# isort: split
import attention  # noqa: E402  (after kernel_helpers: it sets TRITON_INTERPRET first)
from attention import reference as ref  # noqa: E402


def make_selection(t, hkv, num_chunks, top_k, mode, seed, requests=None):
    """chunk_idx[T, Hkv, k]. 'token': every (token, head) draws its own chunks; 'request': each
    request (a run of consecutive tokens) draws one set, the same for all its tokens and heads;
    'runs': per request, contiguous runs of chunks (passages). Zipf-like popularity."""
    g = gen(seed)
    w = 1.0 / torch.arange(1, num_chunks + 1) ** 1.1
    if mode == "token":
        return (
            torch.multinomial(w.expand(t * hkv, num_chunks), top_k, replacement=False, generator=g)
            .view(t, hkv, top_k)
            .int()
        )
    requests = requests or max(1, t // 2)
    owner = torch.arange(t) * requests // t  # token -> request, in runs
    if mode == "request":
        sets = torch.multinomial(
            w.expand(requests, num_chunks), top_k, replacement=False, generator=g
        )
    else:
        starts = torch.randint(0, max(1, num_chunks - top_k), (requests, 1), generator=g)
        sets = (starts + torch.arange(top_k)) % num_chunks
    return sets[owner].int().unsqueeze(1).expand(t, hkv, top_k).contiguous()


GRID = [
    # (T, Hq, Hkv, d, N, chunk, k, kv, selection, span)
    (3, 4, 4, 64, 100, 16, 2, "fp16", "token", 1),
    (6, 8, 2, 64, 200, 16, 5, "bf16", "token", 2),
    (5, 8, 2, 32, 300, 16, 7, "bf16", "request", 4),
    (8, 8, 2, 64, 256, 16, 6, "fp16", "runs", 4),  # passages: spans fill up
    (4, 6, 2, 32, 90, 24, 3, "bf16", "token", 2),  # chunk not a multiple of the key tile, G=3
    (7, 3, 1, 128, 64, 8, 3, "bf16", "request", 1),
    (5, 8, 2, 64, 100, 16, 3, "fp8h", "token", 1),
    (6, 4, 1, 64, 120, 16, 4, "fp8c", "request", 2),
    (2, 8, 2, 64, 48, 64, 1, "bf16", "token", 1),  # one partial chunk only
]


@kernels
@pytest.mark.parametrize("t,hq,hkv,d,n,chunk,top_k,kv,mode,span", GRID)
def test_grouped_matches_reference(t, hq, hkv, d, n, chunk, top_k, kv, mode, span):
    from attention import shared_routed_grouped as grouped

    dtype = torch.float16 if kv in ("fp16", "fp8c") else torch.bfloat16
    c = (n + chunk - 1) // chunk
    q = torch.randn(t, hq, d, generator=gen(n)).to(DEV, dtype)
    k, v, ks, vs = make_kv(n, hkv, d, kv, dtype, chunk, seed=t + n)
    idx = make_selection(t, hkv, c, min(top_k, c), mode, seed=t).to(DEV)
    o, lse = grouped.shared_attention_grouped(
        q, k, v, idx, chunk, None, ks, vs, config=dict(span=span)
    )
    check(o, lse, *ref.shared_attention(q, k, v, idx, chunk, None, ks, vs), dtype)


@kernels
@pytest.mark.parametrize(
    "t,hq,hkv,d,n,chunk,top_k,kv,rt",
    [
        (6, 8, 2, 64, 200, 16, 5, "fp16", 2),
        (9, 8, 2, 32, 300, 16, 7, "fp8c", 4),
        (4, 6, 2, 32, 90, 24, 3, "bf16", 3),  # chunk shorter than the key tile, G=3
    ],
)
def test_stationary_kernel_matches_reference(t, hq, hkv, d, n, chunk, top_k, kv, rt):
    """K/V-stationary variant: a chunk's K/V loaded once for up to RT row tiles."""
    from attention import shared_routed_grouped as grouped

    dtype = torch.float16 if kv in ("fp16", "fp8c") else torch.bfloat16
    c = (n + chunk - 1) // chunk
    q = torch.randn(t, hq, d, generator=gen(n)).to(DEV, dtype)
    k, v, ks, vs = make_kv(n, hkv, d, kv, dtype, chunk, seed=t)
    idx = make_selection(t, hkv, c, top_k, "token", seed=n).to(DEV)
    o, lse = grouped.shared_attention_grouped(
        q, k, v, idx, chunk, None, ks, vs, config=dict(rt=rt, BLOCK_N=32)
    )
    check(o, lse, *ref.shared_attention(q, k, v, idx, chunk, None, ks, vs), dtype)


def _inv_freq(d: int) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


@kernels
@pytest.mark.parametrize("rt,mode", [(0, "token"), (2, "request")])
def test_virtual_positions_match_reference(rt, mode):
    """chunk_shift: each listed chunk's keys as if RoPE had put them `shift` later (the kernel
    rotates the query by R(-shift) instead); the plan carries the shifts, and one plan serves
    two layers."""
    from attention import shared_routed_grouped as grouped

    cfg = dict(rt=rt, BLOCK_N=32)
    t, hq, hkv, d, n, chunk = 6, 8, 2, 64, 200, 16
    c = (n + chunk - 1) // chunk
    idx = make_selection(t, hkv, c, 5, mode, seed=7).to(DEV)
    idx[0, 0, -1] = -1
    shift = torch.randint(-3000, 3000, idx.shape, generator=gen(8)).to(DEV)
    inv = _inv_freq(d).to(DEV)
    plan = grouped.plan_for(idx, c, hq // hkv, chunk, chunk_shift=shift, config=cfg)
    for layer in range(2):
        q = torch.randn(t, hq, d, generator=gen(layer)).to(DEV, torch.bfloat16)
        k, v, _, _ = make_kv(n, hkv, d, "bf16", torch.bfloat16, chunk, seed=layer)
        o, lse = grouped.shared_attention_grouped(
            q, k, v, idx, chunk, plan=plan, chunk_shift=shift, rope_inv_freq=inv, config=cfg
        )
        want = ref.shared_attention(q, k, v, idx, chunk, chunk_shift=shift, rope_inv_freq=inv)
        check(o, lse, *want, torch.bfloat16)
    # a plan built without the shifts is not used for a shifted call
    bare = grouped.plan_for(idx, c, hq // hkv, chunk, config=cfg)
    o, lse = grouped.shared_attention_grouped(
        q, k, v, idx, chunk, plan=bare, chunk_shift=shift, rope_inv_freq=inv, config=cfg
    )
    check(o, lse, *want, torch.bfloat16)


@kernels
@pytest.mark.parametrize("span", [1, 4])
def test_grouped_padding_repeats_and_empty_rows(span):
    from attention import shared_routed_grouped as grouped

    t, hq, hkv, d, n, chunk = 4, 8, 2, 64, 150, 16
    c = (n + chunk - 1) // chunk
    q = torch.randn(t, hq, d, generator=gen(3)).to(DEV, torch.float16)
    k, v, _, _ = make_kv(n, hkv, d, "fp16", torch.float16, chunk, seed=4)
    idx = make_selection(t, hkv, c, 4, "token", seed=5).to(DEV)
    idx[0, 0, 1] = idx[0, 0, 0]  # a repeat: attended once
    idx[1, 1, :] = -1  # nothing chosen: o = 0, lse = -inf
    idx[2, 0, 2] = c + 7  # out of range: padding
    o, lse = grouped.shared_attention_grouped(q, k, v, idx, chunk, config=dict(span=span))
    want = idx.clone()
    want[0, 0, 1] = -1
    want[2, 0, 2] = -1
    check(o, lse, *ref.shared_attention(q, k, v, want, chunk), torch.float16)
    assert torch.isinf(lse[1, 4:]).all() and (o[1, 4:] == 0).all()


@kernels
def test_plan_built_once_serves_every_layer():
    """The plan depends on the selection only: one plan, several layers' q/K/V."""
    from attention import shared_routed_grouped as grouped

    cfg = dict(span=2)
    t, hq, hkv, d, n, chunk = 6, 8, 2, 32, 160, 16
    c = n // chunk
    idx = make_selection(t, hkv, c, 4, "request", seed=1).to(DEV)
    plan = grouped.plan_for(idx, c, hq // hkv, chunk, config=cfg)
    for layer in range(2):
        q = torch.randn(t, hq, d, generator=gen(10 + layer)).to(DEV, torch.bfloat16)
        k, v, _, _ = make_kv(n, hkv, d, "bf16", torch.bfloat16, chunk, seed=20 + layer)
        o, lse = grouped.shared_attention_grouped(q, k, v, None, chunk, plan=plan, config=cfg)
        check(o, lse, *ref.shared_attention(q, k, v, idx, chunk), torch.bfloat16)


def test_plan_counts_spans_and_masks():
    """Plan bookkeeping (torch only, any device): one entry per chosen span, its mask the
    chunks chosen in it, CSR counts per (span, head)."""
    from attention.shared_routed_grouped import plan_grouped

    idx = torch.tensor([[[0, 1, 5, -1]], [[5, 4, 4, 9]]], dtype=torch.int32)  # T=2, Hkv=1
    p = plan_grouped(idx, num_chunks=8, group_size=2, span=4, block_m=16)
    masks = p.masks.view(2, 1, 4)
    assert masks[0, 0].tolist() == [0b0011, 0b0010, 0, 0]  # chunks {0,1} | {5}
    assert masks[1, 0].tolist() == [0b0011, 0, 0, 0]  # {4,5}; 9 is out of range
    counts = (p.offsets[1:] - p.offsets[:-1]).tolist()
    assert counts == [1, 2]  # span 0: token 0; span 1: both
    assert int(p.total) == 2


def test_interpreter_suite_in_subprocess():
    """Runs this file's kernel tests in a fresh process when this one could not interpret them."""
    run_interpreter_suite(__file__)


# ---------------------------------------------------------------- larger shapes, on the GPU


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "t,top_k,mode,kv,span,persist,rt",
    [
        (1, 8, "token", "bf16", 1, False, 0),
        (128, 16, "request", "bf16", 1, True, 0),
        (64, 40, "token", "fp8c", 2, False, 0),
        (96, 24, "runs", "fp16", 4, True, 0),
        (256, 12, "request", "bf16", 2, False, 0),
        (256, 12, "request", "bf16", 1, False, 4),
        (64, 40, "token", "fp8c", 1, False, 2),
    ],
)
def test_gpu_grouped_llama_shape(t, top_k, mode, kv, span, persist, rt):
    from attention import shared_routed_grouped as grouped

    cfg = dict(span=span, persist=persist, rt=rt)
    dtype = torch.float16 if kv in ("fp16", "fp8c") else torch.bfloat16
    n, chunk = 6000, 128
    c = (n + chunk - 1) // chunk
    q = torch.randn(t, 32, 128, generator=gen(t)).to(DEV, dtype)
    k, v, ks, vs = make_kv(n, 8, 128, kv, dtype, chunk, seed=t)
    idx = make_selection(t, 8, c, min(top_k, c), mode, seed=t, requests=max(1, t // 2)).to(DEV)
    o, lse = grouped.shared_attention_grouped(q, k, v, idx, chunk, None, ks, vs, config=cfg)
    check(o, lse, *ref.shared_attention(q, k, v, idx, chunk, None, ks, vs), dtype)
    o2, lse2 = grouped.shared_attention_grouped(q, k, v, idx, chunk, None, ks, vs, config=cfg)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)  # no race: same inputs, same bits


@gpu
@needs_cuda
def test_gpu_plan_and_run_capture_in_a_cuda_graph():
    """Plan once inside the graph, run two layers from it; replays follow new selections."""
    n, chunk, t = 4096, 128, 48
    c = n // chunk
    q = torch.randn(t, 32, 128, device=DEV, dtype=torch.bfloat16)
    kvs = [make_kv(n, 8, 128, "bf16", torch.bfloat16, chunk, seed=s)[:2] for s in (1, 2)]
    idx = make_selection(t, 8, c, 8, "request", seed=2).to(DEV)

    def step():
        plan = attention.plan_routed(idx, c, 4, chunk)
        return [attention.shared_attention(q, k, v, None, chunk, plan=plan) for k, v in kvs]

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    idx.copy_(make_selection(t, 8, c, 8, "request", seed=3).to(DEV))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    for (o, lse), (k, v) in zip(outs, kvs):
        check(o, lse, *ref.shared_attention(q, k, v, idx, chunk), torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_virtual_positions_through_the_facade():
    n, chunk, t = 6000, 128, 64
    c = (n + chunk - 1) // chunk
    q = torch.randn(t, 32, 128, generator=gen(1)).to(DEV, torch.bfloat16)
    k, v, _, _ = make_kv(n, 8, 128, "bf16", torch.bfloat16, chunk, seed=2)
    idx = make_selection(t, 8, c, 12, "request", seed=3, requests=16).to(DEV)
    shift = torch.randint(-20000, 20000, idx.shape, generator=gen(4)).to(DEV)
    inv = _inv_freq(128).to(DEV)
    o, lse = attention.shared_attention(q, k, v, idx, chunk, chunk_shift=shift, rope_inv_freq=inv)
    check(
        o,
        lse,
        *ref.shared_attention(q, k, v, idx, chunk, chunk_shift=shift, rope_inv_freq=inv),
        torch.bfloat16,
    )
