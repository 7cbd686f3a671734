"""Parity of the Triton attention kernels with their torch references (attention/reference.py).

Without a GPU the kernels run under Triton's interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported, so this module sets it at import (pytest imports test modules before
running any test). If something imported triton earlier in this process, the in-process kernel
tests skip and `test_interpreter_suite_in_subprocess` runs this file again in a fresh
interpreter-mode process. With CUDA the same small grid runs compiled, and the `gpu` tests add
larger shapes.

Tolerances: the references compute in float32 from the same stored inputs. Kernel outputs are
rounded to q's dtype (and on the GPU the probabilities are rounded to it before the P @ V
product), so o is compared at about 2 ulps of its dtype relative to values of order 1; lse is a
float32 reduction and is compared at 1e-3 (bf16 products are exact in float32 accumulators).
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

# ---------------------------------------------------------------- shared attention, dense

DENSE_GRID = [
    # (T, Hq, Hkv, d, N, kv, splits): GQA ratios 1/3/4/8, d 64/128, N off the tile size
    (1, 4, 4, 64, 37, "fp16", None),
    (3, 6, 2, 64, 100, "bf16", None),
    (5, 8, 2, 128, 77, "fp16", 3),
    (2, 8, 1, 64, 129, "bf16", 1),
    (4, 3, 1, 128, 50, "bf16", 2),
    (7, 8, 2, 64, 90, "fp8h", None),
    (2, 8, 1, 64, 70, "fp8c", 4),
    (3, 4, 1, 128, 65, "fp8c", None),
    (2, 8, 2, 64, 64, "bf16", None),  # N a multiple of the key tile: the unmasked path
    (6, 8, 1, 64, 96, "fp8h", 2),
]


@kernels
@pytest.mark.parametrize("t,hq,hkv,d,n,kv,splits", DENSE_GRID)
def test_shared_dense_matches_reference(t, hq, hkv, d, n, kv, splits):
    from attention.shared_dense import shared_attention_dense

    dtype = torch.float16 if kv in ("fp16", "fp8c") else torch.bfloat16
    chunk = 16
    q = torch.randn(t, hq, d, generator=gen(n)).to(DEV, dtype)
    k, v, ks, vs = make_kv(n, hkv, d, kv, dtype, chunk, seed=t + n)
    o, lse = shared_attention_dense(q, k, v, chunk, None, ks, vs, splits=splits)
    ro, rlse = ref.shared_attention(q, k, v, None, chunk, None, ks, vs)
    check(o, lse, ro, rlse, dtype)


# ---------------------------------------------------------------- shared attention, routed


def make_idx(t, hkv, num_chunks, top_k, skew, seed, pad=True):
    """chunk_idx[T,Hkv,top_k]: distinct chunks per row, uniform or Zipf-popular; a few -1
    paddings and (routed kernel only dedupes) one repeated chunk when there is room."""
    g = gen(seed)
    w = torch.ones(num_chunks) if not skew else 1.0 / torch.arange(1, num_chunks + 1) ** 1.2
    idx = (
        torch.multinomial(w.expand(t * hkv, num_chunks), top_k, replacement=False, generator=g)
        .view(t, hkv, top_k)
        .int()
    )
    if pad and top_k > 1:
        idx[0, 0, -1] = -1
        idx[-1, -1, 0] = -1
    return idx


ROUTED_GRID = [
    # (T, Hq, Hkv, d, N, chunk, top_k ('all' = every chunk), kv, skew)
    (3, 4, 4, 64, 100, 16, 2, "fp16", False),
    (5, 6, 2, 64, 77, 16, "all", "bf16", False),
    (6, 8, 2, 128, 90, 32, 2, "bf16", True),
    (4, 8, 1, 64, 130, 16, 5, "fp16", True),
    (8, 3, 1, 64, 64, 8, 3, "bf16", False),
    (4, 16, 2, 64, 96, 16, "all", "fp16", True),
    (5, 8, 2, 64, 100, 16, 3, "fp8h", False),
    (6, 4, 1, 128, 70, 16, 2, "fp8c", True),
    (2, 8, 2, 64, 48, 64, 1, "bf16", False),  # one partial chunk only
]


@kernels
@pytest.mark.parametrize("impl", ["scatter", "union"])
@pytest.mark.parametrize("t,hq,hkv,d,n,chunk,top_k,kv,skew", ROUTED_GRID)
def test_shared_routed_matches_reference(t, hq, hkv, d, n, chunk, top_k, kv, skew, impl):
    from attention.shared_routed import shared_attention_routed

    dtype = torch.float16 if kv in ("fp16", "fp8c") else torch.bfloat16
    c = (n + chunk - 1) // chunk
    top_k = c if top_k == "all" else top_k
    q = torch.randn(t, hq, d, generator=gen(n + 1)).to(DEV, dtype)
    k, v, ks, vs = make_kv(n, hkv, d, kv, dtype, chunk, seed=n)
    idx = make_idx(t, hkv, c, top_k, skew, seed=t).to(DEV)
    o, lse = shared_attention_routed(q, k, v, idx, chunk, None, ks, vs, impl=impl)
    ro, rlse = ref.shared_attention(q, k, v, idx, chunk, None, ks, vs)
    check(o, lse, ro, rlse, dtype)


@kernels
@pytest.mark.parametrize(
    "t,hq,hkv,d,n,chunk,top_k,order,slices",
    [
        (20, 6, 2, 32, 400, 16, 3, "minhash", None),  # G=3: BLOCK_M % G rows idle per block
        (20, 6, 2, 32, 400, 16, 3, "none", 3),
        (40, 4, 1, 32, 512, 16, 4, "minhash", 2),
        (9, 8, 2, 64, 300, 24, 5, "minhash", 1),  # chunk not a multiple of the key tile
    ],
)
@pytest.mark.parametrize("contig", [True, False])
def test_routed_union_blocks_orders_and_slices(
    t, hq, hkv, d, n, chunk, top_k, order, slices, contig
):
    """Union kernel: several query blocks with different unions, token orders, slices, both
    walks (contiguous range with unused chunks masked; the union lists)."""
    from attention.shared_routed_union import shared_attention_routed_union, union_stats

    c = (n + chunk - 1) // chunk
    q = torch.randn(t, hq, d, generator=gen(1)).to(DEV, torch.bfloat16)
    k, v, _, _ = make_kv(n, hkv, d, "bf16", torch.bfloat16, chunk, seed=2)
    idx = make_idx(t, hkv, c, top_k, True, seed=3).to(DEV)
    o, lse = shared_attention_routed_union(
        q, k, v, idx, chunk, order=order, slices=slices, contig=contig
    )
    check(o, lse, *ref.shared_attention(q, k, v, idx, chunk), torch.bfloat16)
    st = union_stats(idx, c, hq // hkv, 16, order)
    assert 0 < st["union_frac"] <= 1 and 0 < st["useful_frac"] <= 1


@kernels
@pytest.mark.parametrize("impl", ["scatter", "union"])
def test_routed_all_chunks_equals_dense_and_handles_repeats_and_empty_rows(impl):
    from attention.shared_dense import shared_attention_dense
    from attention.shared_routed import shared_attention_routed

    t, hq, hkv, d, n, chunk = 4, 8, 2, 64, 75, 16
    c = (n + chunk - 1) // chunk
    q = torch.randn(t, hq, d, generator=gen(3)).to(DEV, torch.float16)
    k, v, _, _ = make_kv(n, hkv, d, "fp16", torch.float16, chunk, seed=4)
    idx = make_idx(t, hkv, c, c, False, seed=5, pad=False).to(DEV)
    o_r, lse_r = shared_attention_routed(q, k, v, idx, chunk, impl=impl)
    o_d, lse_d = shared_attention_dense(q, k, v, chunk)
    check(o_r, lse_r, o_d, lse_d, torch.float16)
    # a row that repeats a chunk sees it once; a row of padding only sees nothing
    idx2 = idx[:, :, :3].clone()
    idx2[0, 0, 1] = idx2[0, 0, 0]
    idx2[1, 1, :] = -1
    idx2[2, 0, 2] = c + 7  # out of range: ignored like padding
    o, lse = shared_attention_routed(q, k, v, idx2, chunk, impl=impl)
    ref_idx = idx2.clone()
    ref_idx[0, 0, 1] = -1
    ref_idx[2, 0, 2] = -1
    ro, rlse = ref.shared_attention(q, k, v, ref_idx, chunk)
    check(o, lse, ro, rlse, torch.float16)
    assert torch.isinf(lse[1, 4:]).all() and (o[1, 4:] == 0).all()


# ---------------------------------------------------------------- attention mass per chunk


@pytest.mark.parametrize(
    "kv,n,chunk,skip", [("bf16", 5000, 64, 0), ("fp8c", 4100, 128, 300), ("fp8h", 700, 32, 40)]
)
def test_chunk_mass_matches_reference_and_sums_to_heads(kv, n, chunk, skip):
    """attention.chunk_mass (blocked, a few chunks of keys at a time on the CPU) against the
    one-matrix reference; with the shared attention's own lse and nothing skipped, each row's
    mass over all chunks is one per query head."""
    t, hq, hkv, d = 64, 8, 2, 64
    q = torch.randn(t, hq, d, generator=gen(n)).to(DEV, torch.bfloat16)
    k, v, ks, vs = make_kv(n, hkv, d, kv, torch.bfloat16, chunk, seed=n + 1)
    _, lse = ref.shared_attention(q, k, v, None, chunk, None, ks, vs)
    mass = attention.chunk_mass(q, k, lse, chunk, skip=skip, k_scale=ks)
    want = ref.chunk_mass(q, k, lse, chunk, skip=skip, k_scale=ks)
    assert mass.shape == (t, (n + chunk - 1) // chunk)
    torch.testing.assert_close(mass, want, atol=1e-4, rtol=1e-4)
    if skip == 0:
        torch.testing.assert_close(
            mass.sum(1), torch.full((t,), float(hq), device=mass.device), atol=1e-3, rtol=1e-4
        )
    else:
        assert (mass[:, : skip // chunk] == 0).all() and (mass[:, skip // chunk + 1 :] > 0).all()


# ---------------------------------------------------------------- unique (paged) attention


def make_paged(q_lens, kv_lens, hq, hkv, d, page, dtype, seed):
    g = gen(seed)
    blocks = [(n + page - 1) // page for n in kv_lens]
    total = sum(blocks) + 2
    kc = torch.randn(total, page, hkv, d, generator=g).to(DEV, dtype)
    vc = torch.randn(total, page, hkv, d, generator=g).to(DEV, dtype)
    perm = torch.randperm(total, generator=g)  # pages scattered, not in order
    bt = torch.zeros(len(kv_lens), max(blocks) + 1, dtype=torch.int32)
    at = 0
    for i, nb in enumerate(blocks):
        bt[i, :nb] = perm[at : at + nb]
        at += nb
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(cu[-1]), hq, d, generator=g).to(DEV, dtype)
    return q, kc, vc, bt.to(DEV), torch.tensor(kv_lens, dtype=torch.int32).to(DEV), cu.to(DEV)


PAGED_GRID = [
    # (q_lens, kv_lens, Hq, Hkv, d, page, dtype, splits)
    ([1, 1, 1], [5, 40, 17], 8, 2, 64, 16, torch.float16, None),  # decode
    ([3, 1, 7], [5, 40, 17], 12, 4, 64, 8, torch.bfloat16, 3),  # mixed prefill/decode
    ([4, 2], [4, 33], 4, 4, 128, 16, torch.float16, 1),  # prefill = whole sequence
    ([1, 5], [70, 9], 24, 3, 64, 16, torch.bfloat16, 4),  # GQA 8
    ([2, 0, 1], [30, 12, 1], 4, 1, 128, 4, torch.bfloat16, None),  # a request with no new token
]


@kernels
@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,d,page,dtype,splits", PAGED_GRID)
def test_unique_paged_matches_reference(q_lens, kv_lens, hq, hkv, d, page, dtype, splits):
    from attention.paged import unique_attention_paged

    q, kc, vc, bt, seq, cu = make_paged(q_lens, kv_lens, hq, hkv, d, page, dtype, seed=sum(kv_lens))
    o, lse = unique_attention_paged(q, kc, vc, bt, seq, cu, splits=splits)
    ro, rlse = ref.unique_attention(q, kc, vc, bt, seq, cu)
    check(o, lse, ro, rlse, dtype)


# ---------------------------------------------------------------- merge and route


@kernels
@pytest.mark.parametrize("dtype,d", [(torch.float16, 64), (torch.bfloat16, 128)])
def test_merge_matches_reference(dtype, d):
    from attention.lse_merge import merge_triton

    g = gen(d)
    t, h = 9, 6
    o1 = torch.randn(t, h, d, generator=g).to(DEV, dtype)
    o2 = torch.randn(t, h, d, generator=g).to(DEV, dtype)
    l1 = (torch.randn(t, h, generator=g) * 4).to(DEV)
    l2 = (torch.randn(t, h, generator=g) * 4).to(DEV)
    l1[0, 0] = l2[0, 0] = float("-inf")  # both empty
    l2[1, 1] = float("-inf")  # one side empty: its o is garbage and must be ignored
    o2[1, 1] = float("nan")
    o, lse = merge_triton(o1, l1, o2, l2)
    ro, rlse = ref.merge(o1, l1, o2, l2)
    check(o, lse, ro, rlse, dtype)
    assert (o[0, 0] == 0).all() and torch.isinf(lse[0, 0])
    # merging is what split attention needs: two halves of the keys give the whole
    k, v, _, _ = make_kv(50, 2, d, "fp16" if dtype == torch.float16 else "bf16", dtype, 16, 1)
    q = torch.randn(3, 4, d, generator=g).to(DEV, dtype)
    oa, la = ref.shared_attention(q, k[:20], v[:20])
    ob, lb = ref.shared_attention(q, k[20:], v[20:])
    om, lm = merge_triton(oa, la, ob, lb)
    check(om, lm, *ref.shared_attention(q, k, v), dtype)


@pytest.mark.parametrize("t,hq,hkv,c,top_k", [(5, 8, 2, 30, 4), (3, 4, 4, 7, 7), (2, 8, 1, 5, 9)])
def test_route_device_path_matches_reference(t, hq, hkv, c, top_k):
    from attention.routing import route

    g = gen(c)
    q = torch.randn(t, hq, 64, generator=g).to(DEV)
    cent = torch.randn(c, hkv, 64, generator=g).to(DEV)
    got = route(q, cent, top_k)
    want = ref.route(q, cent, top_k)
    assert got.dtype == torch.int32 and got.shape == (t, hkv, min(top_k, c))
    torch.testing.assert_close(got, want)  # random scores: no ties
    assert torch.equal(attention.route(q, cent, top_k), want)


def test_public_api_dispatches_to_reference_off_gpu():
    """CPU tensors (and fp32 queries) take the reference path; outputs are the references'."""
    q = torch.randn(3, 8, 64, generator=gen(0))
    k = torch.randn(40, 2, 64, generator=gen(1))
    v = torch.randn(40, 2, 64, generator=gen(2))
    assert not attention.use_triton(q)
    for got, want in zip(attention.shared_attention(q, k, v), ref.shared_attention(q, k, v)):
        torch.testing.assert_close(got, want)
    idx = torch.tensor([[[0, 2], [1, -1]]] * 3, dtype=torch.int32)
    for got, want in zip(
        attention.shared_attention(q, k, v, idx, 16), ref.shared_attention(q, k, v, idx, 16)
    ):
        torch.testing.assert_close(got, want)
    assert set(attention.__all__) >= {"shared_attention", "unique_attention", "merge", "route"}


def test_interpreter_suite_in_subprocess():
    """Runs the kernel tests in a fresh process when this one could not interpret them."""
    run_interpreter_suite(__file__)


# ---------------------------------------------------------------- larger shapes, on the GPU


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "t,kv", [(1, "bf16"), (64, "bf16"), (300, "fp16"), (16, "fp8c"), (200, "fp8h")]
)
def test_gpu_shared_dense_llama_shape(t, kv):
    dtype = torch.float16 if kv in ("fp16", "fp8c") else torch.bfloat16
    n, chunk = 5000, 128
    q = torch.randn(t, 32, 128, generator=gen(t)).to(DEV, dtype)
    k, v, ks, vs = make_kv(n, 8, 128, kv, dtype, chunk, seed=t)
    o, lse = attention.shared_attention(q, k, v, None, chunk, None, ks, vs)
    check(o, lse, *ref.shared_attention(q, k, v, None, chunk, None, ks, vs), dtype)
    o2, lse2 = attention.shared_attention(q, k, v, None, chunk, None, ks, vs)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)  # no race: same inputs, same bits


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "t,top_k,skew,kv",
    [
        (1, 8, False, "bf16"),
        (128, 16, True, "bf16"),
        (64, 40, False, "fp8c"),
        (33, 40, True, "fp16"),
    ],
)
@pytest.mark.parametrize("impl", ["scatter", "union"])
def test_gpu_shared_routed_llama_shape(t, top_k, skew, kv, impl):
    from attention.shared_routed import shared_attention_routed

    dtype = torch.float16 if kv in ("fp16", "fp8c") else torch.bfloat16
    n, chunk = 5000, 128
    c = (n + chunk - 1) // chunk
    q = torch.randn(t, 32, 128, generator=gen(t)).to(DEV, dtype)
    k, v, ks, vs = make_kv(n, 8, 128, kv, dtype, chunk, seed=t)
    idx = make_idx(t, 8, c, min(top_k, c), skew, seed=t).to(DEV)
    o, lse = shared_attention_routed(q, k, v, idx, chunk, None, ks, vs, impl=impl)
    check(o, lse, *ref.shared_attention(q, k, v, idx, chunk, None, ks, vs), dtype)


@gpu
@needs_cuda
def test_gpu_unique_paged_and_merge():
    q_lens = [1] * 12 + [37, 300]
    kv_lens = [int(x) for x in torch.randint(1, 3000, (12,), generator=gen(9))] + [37, 1000]
    q, kc, vc, bt, seq, cu = make_paged(q_lens, kv_lens, 32, 8, 128, 16, torch.bfloat16, 9)
    o_u, lse_u = attention.unique_attention(q, kc, vc, bt, seq, cu)
    check(o_u, lse_u, *ref.unique_attention(q, kc, vc, bt, seq, cu), torch.bfloat16)
    k, v, _, _ = make_kv(2000, 8, 128, "bf16", torch.bfloat16, 128, 3)
    o_s, lse_s = attention.shared_attention(q, k, v)
    o, lse = attention.merge(o_s, lse_s, o_u, lse_u)
    check(o, lse, *ref.merge(o_s, lse_s, o_u, lse_u), torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_shared_attention_captures_in_a_cuda_graph():
    """No host sync on the shared paths (the routed CSR is built on the device): the engine can
    capture a decode step, and replays recompute from the current inputs."""
    n, chunk, t = 4096, 128, 48
    c = n // chunk
    q = torch.randn(t, 32, 128, device=DEV, dtype=torch.bfloat16)
    k, v, _, _ = make_kv(n, 8, 128, "bf16", torch.bfloat16, chunk, seed=1)
    idx = make_idx(t, 8, c, 8, True, seed=2).to(DEV)
    for chunk_idx in (None, idx):
        attention.shared_attention(q, k, v, chunk_idx, chunk)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, lse = attention.shared_attention(q, k, v, chunk_idx, chunk)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        check(o, lse, *ref.shared_attention(q, k, v, chunk_idx, chunk), torch.bfloat16)
