"""The CPU path of shared attention (attention/cpu_shared.py) against the torch reference:
dense and routed, GQA ratios, chunk sizes, a corpus that ends inside a chunk, 16-bit and fp8
KV, rows that share a selection and rows that do not, padding and repeated chunks."""

from __future__ import annotations

import pytest
import torch

import attention
from attention import cpu_shared, cpu_unique
from attention import reference as ref


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kv(n: int, hkv: int, d: int, kv: str, chunk: int, g: torch.Generator):
    """k, v in format `kv` ('fp32', 'fp16', 'bf16', 'fp8h', 'fp8c') with their scales."""
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    if not kv.startswith("fp8"):
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[kv]
        return k.to(dt), v.to(dt), None, None
    shape = (hkv,) if kv == "fp8h" else (-(-n // chunk), hkv)
    ks = torch.rand(shape, generator=g) * 0.02 + 0.01
    vs = torch.rand(shape, generator=g) * 0.02 + 0.01
    k8 = (k / ref.dequantize(torch.ones_like(k), ks, chunk)).to(torch.float8_e4m3fn)
    v8 = (v / ref.dequantize(torch.ones_like(v), vs, chunk)).to(torch.float8_e4m3fn)
    return k8, v8, ks, vs


def _idx(
    kind: str, t: int, hkv: int, top_k: int, c: int, g: torch.Generator
) -> torch.Tensor | None:
    """chunk_idx of a kind: None (dense), 'token' (each row its own), 'request' (one shared row),
    'mixed' (two requests' prefills and a decode token), 'messy' (repeats and -1 padding)."""
    if kind == "dense":
        return None

    def pick(rows: int) -> torch.Tensor:
        return torch.stack(
            [torch.randperm(c, generator=g)[:top_k] for _ in range(rows * hkv)]
        ).view(rows, hkv, -1)

    if kind == "token":
        return pick(t).int()
    if kind == "request":
        return pick(1).expand(t, hkv, -1).int()
    if kind == "mixed":
        a, b = t // 2, t - t // 2 - 1
        return torch.cat([pick(1).expand(a, hkv, -1), pick(1).expand(b, hkv, -1), pick(1)]).int()
    idx = torch.randint(-1, c, (t, hkv, top_k), generator=g)
    idx[0] = -1  # a row that attends nothing
    return idx.int()


CASES = [  # t, hq, hkv, d, n, chunk, top_k
    (5, 8, 2, 16, 300, 32, 3),
    (7, 9, 3, 64, 1000, 64, 5),
    (1, 4, 4, 8, 70, 16, 9),
    (6, 8, 1, 32, 129, 64, 2),
    (4, 6, 3, 16, 257, 16, 17),
]


@pytest.mark.parametrize("t,hq,hkv,d,n,chunk,top_k", CASES)
@pytest.mark.parametrize("kind", ["dense", "token", "request", "mixed", "messy"])
@pytest.mark.parametrize("kv", ["fp32", "fp16", "bf16", "fp8h", "fp8c"])
@pytest.mark.parametrize("block", [None, 64])
def test_cpu_path_matches_reference(t, hq, hkv, d, n, chunk, top_k, kind, kv, block):
    g = _gen(n * 7 + t)
    q = torch.randn(t, hq, d, generator=g)
    k, v, ks, vs = _kv(n, hkv, d, kv, chunk, g)
    c = -(-n // chunk)
    if kind == "mixed" and t < 3:
        pytest.skip("needs three rows")
    idx = _idx(kind, t, hkv, min(top_k, c), c, g)
    o, lse = cpu_shared.shared_attention(q, k, v, idx, chunk, None, ks, vs, block=block)
    ro, rlse = ref.shared_attention(q, k, v, idx, chunk, None, ks, vs)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    assert o.shape == ro.shape and lse.shape == rlse.shape
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=1e-4)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    torch.testing.assert_close(lse, rlse, atol=2e-5, rtol=1e-5)


def test_rows_with_one_chunk_set_are_one_group():
    """Order, repeats and -1 padding do not split a group; a different set does."""
    a = torch.tensor([[3, 1, -1], [0, 2, 2]])
    b = torch.tensor([[1, 3, 3], [2, -1, 0]])
    other = torch.tensor([[1, 4, -1], [0, 2, -1]])
    one = cpu_shared.selection_groups(torch.stack([a, b, a]))
    assert len(one) == 1 and one[0][0] is None
    assert one[0][1].tolist() == [[-1, 1, 3], [-1, 0, 2]]
    two = cpu_shared.selection_groups(torch.stack([a, other, b]))
    assert sorted(r.tolist() for r, _, _ in two) == [[0, 2], [1]]


def test_block_size_is_whole_chunks_within_bounds():
    for rows, chunk in ((69, 64), (3, 64), (10_000, 128), (1, 16)):
        b = cpu_shared.block_size(rows, 3, chunk)
        assert b % chunk == 0 and chunk <= b <= max(chunk, cpu_shared.MAX_BLOCK)


def test_public_api_takes_the_cpu_path():
    g = _gen(3)
    q = torch.randn(4, 8, 32, generator=g, dtype=torch.float32).half()
    k, v = torch.randn(200, 2, 32, generator=g).half(), torch.randn(200, 2, 32, generator=g).half()
    idx = _idx("request", 4, 2, 3, 7, g)
    for chunk_idx in (None, idx):
        got = attention.shared_attention(q, k, v, chunk_idx, 32)
        want = cpu_shared.shared_attention(q, k, v, chunk_idx, 32)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


INV = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))


@pytest.mark.parametrize("t,hq,hkv,d,n,chunk,top_k", CASES)
@pytest.mark.parametrize("kv", ["fp32", "fp16", "bf16", "fp8h", "fp8c"])
@pytest.mark.parametrize("shifted", [False, True])
def test_gathered_copy_matches_reference(t, hq, hkv, d, n, chunk, top_k, kv, shifted):
    """A request's own copy of its chosen chunks (keys at their virtual positions) attends as the
    reference attends the stored KV through chunk_idx and chunk_shift; the corpus's last, partial
    chunk included."""
    g = _gen(n * 5 + t)
    q = torch.randn(t, hq, d, generator=g)
    k, v, ks, vs = _kv(n, hkv, d, kv, chunk, g)
    c = -(-n // chunk)
    chunks = torch.randperm(c, generator=g)[: min(top_k, c)].sort().values
    chunks[-1] = c - 1  # the partial last chunk
    chunks = chunks.unique()
    inv = INV[: d // 2].float()
    shift = torch.randint(-500, 500, (chunks.numel(),), generator=g) if shifted else None
    kt, vv = attention.gather_chunks(k, v, chunks, chunk, shift, inv, ks, vs)
    assert kt.dtype == vv.dtype == torch.float32 and kt.shape[-1] == vv.shape[1]
    o, lse = attention.attend_gathered(q, kt, vv)
    idx = chunks.int()[None, None].expand(t, hkv, -1)
    sh = None if shift is None else shift[None, None].expand(t, hkv, -1)
    ro, rlse = ref.shared_attention(
        q, k, v, idx, chunk, None, ks, vs, chunk_shift=sh, rope_inv_freq=inv
    )
    torch.testing.assert_close(o, ro, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=2e-5, rtol=1e-5)


def _pages(lens, q_lens, hq, hkv, d, bs, dtype, g):
    """A paged cache holding requests of KV lengths `lens` in shuffled pages, and their queries."""
    need = [-(-n // bs) for n in lens]
    ids = torch.randperm(sum(need) + 3, generator=g).int()
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    off = 0
    for b, m in enumerate(need):
        table[b, :m] = ids[off : off + m]
        off += m
    kc = torch.randn(sum(need) + 3, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(sum(need) + 3, bs, hkv, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=g).to(dtype)
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32), cu


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 16), (8, 1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lens,q_lens",
    [([37], [1]), ([1, 300, 64, 17], [1, 1, 1, 1]), ([5, 90], [1, 0]), ([40, 12], [3, 1])],
)
def test_cpu_unique_attention_matches_reference(hq, hkv, d, dtype, lens, q_lens):
    """Decode rows (one new token each, some requests with none) and a step with a prefill in it
    attend their pages as the reference does."""
    g = _gen(sum(lens) + hq)
    args = _pages(lens, q_lens, hq, hkv, d, 16, dtype, g)
    o, lse = cpu_unique.unique_attention(*args)
    ro, rlse = ref.unique_attention(*args)
    assert o.dtype == dtype and lse.dtype == torch.float32
    tol = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(o, ro, **tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    torch.testing.assert_close(lse, rlse, atol=2e-5, rtol=1e-5)
    got = attention.unique_attention(*args)  # the facade takes this path on the CPU
    assert torch.equal(got[0], o) and torch.equal(got[1], lse)


@pytest.mark.parametrize("kv", ["fp32", "bf16", "fp8c"])
def test_stacked_copies_attend_as_each_alone(kv):
    """The decode step of several selecting requests (copies of unequal lengths, stacked and
    padded) gives each request what its own copy alone gives."""
    g = _gen(17)
    n, hkv, hq, d, cs = 700, 3, 9, 64, 64
    k, v, ks, vs = _kv(n, hkv, d, kv, cs, g)
    inv = INV.float()
    lists = [torch.tensor([0, 2, 5]), torch.tensor([0, 10]), torch.tensor([0, 1, 3, 7, 10])]
    copies = [
        attention.gather_chunks(k, v, c, cs, torch.arange(c.numel()) * cs - c * cs, inv, ks, vs)
        for c in lists
    ]
    q = torch.randn(len(lists), hq, d, generator=g)
    o, lse = attention.attend_gathered_batch(q, *attention.stack_gathered(copies))
    for i, (kt, vv) in enumerate(copies):
        o_i, lse_i = attention.attend_gathered(q[i : i + 1], kt, vv)
        torch.testing.assert_close(o[i : i + 1], o_i, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[i : i + 1], lse_i, atol=2e-5, rtol=1e-5)


def test_cpu_unique_decode_ignores_unwritten_slots():
    """Pages hold whatever memory held past a request's length (the pool is torch.empty): NaN or
    infinity there must not reach the batched decode's output."""
    g = _gen(5)
    lens = [5, 40, 17]
    q, kc, vc, table, seq_lens, cu = _pages(lens, [1, 1, 1], 9, 3, 64, 16, torch.float32, g)
    want = ref.unique_attention(q, kc, vc, table, seq_lens, cu)
    written = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    for b, n in enumerate(lens):
        for j in range(n):
            written[int(table[b, j // 16]) * 16 + j % 16] = True
    flat_k, flat_v = kc.view(-1, 3, 64), vc.view(-1, 3, 64)
    flat_k[~written], flat_v[~written] = float("nan"), float("inf")
    o, lse = cpu_unique.unique_attention(q, kc, vc, table, seq_lens, cu)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o, want[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want[1], atol=2e-5, rtol=1e-5)
