"""index/: summaries, device routing against FAISS exact search, IVF recall, storage, search."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import attention
from attention.reference import route as reference_route
from attention.routing import route as device_route
from index import store
from index.faiss_index import IndexSettings, build_layer, build_layers, is_ivf
from index.router import Router, top_k_for
from index.search import find_chunks, find_documents, passage_query
from index.summaries import chunk_summaries, group_query, query_vectors

# FAISS builds indexes on CPU hosts; the GPU serving machine may lack it (the router never needs it)
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="no faiss")


def _direct_summaries(keys: torch.Tensor, cs: int) -> tuple[torch.Tensor, ...]:
    """Chunk by chunk, the obvious way."""
    chunks = [keys[i : i + cs].double() for i in range(0, keys.shape[0], cs)]
    return tuple(
        torch.stack([f(x) for x in chunks])
        for f in (lambda x: x.mean(0), lambda x: x.amin(0), lambda x: x.amax(0))
    )


@pytest.mark.parametrize(
    "n,cs,block", [(1000, 64, 4096), (1000, 64, 3), (64 * 5, 64, 2), (1, 16, 4096), (130, 128, 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summaries_match_direct(n: int, cs: int, block: int, dtype: torch.dtype) -> None:
    keys = torch.randn(n, 4, 32, generator=torch.Generator().manual_seed(n)).to(dtype)
    s = chunk_summaries(keys, cs, block_chunks=block)
    mean, kmin, kmax = _direct_summaries(keys, cs)
    assert s.num_chunks == (n + cs - 1) // cs and s.num_tokens == n
    assert s.mean.dtype == s.kmin.dtype == s.kmax.dtype == torch.float32
    torch.testing.assert_close(s.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.kmin.double(), kmin, rtol=0, atol=0)
    torch.testing.assert_close(s.kmax.double(), kmax, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(), n=st.integers(1, 90), cs=st.integers(1, 20), group=st.sampled_from([1, 2, 4])
)
def test_quest_bound_bounds_every_key(data: st.DataObject, n: int, cs: int, group: int) -> None:
    """q+ . kmax + q- . kmin >= max_j qg . k_j for every chunk, and >= the mean's score."""
    hkv, d = 2, 8
    el = st.floats(-100, 100, allow_nan=False, width=32)
    keys = torch.from_numpy(data.draw(arrays(np.float32, (n, hkv, d), elements=el)))
    q = torch.from_numpy(data.draw(arrays(np.float32, (3, hkv * group, d), elements=el)))
    s = chunk_summaries(keys, cs)
    qg = group_query(q, hkv)  # [T, Hkv, d]
    bound = torch.einsum(
        "thd,chd->thc", query_vectors(qg, "quest").double(), s.vectors("quest").double()
    )
    exact = torch.einsum("thd,nhd->thn", qg.double(), keys.double())  # [T, Hkv, N]
    pad = s.num_chunks * cs - n
    exact = torch.nn.functional.pad(exact, (0, pad), value=float("-inf"))
    best = exact.view(*exact.shape[:2], s.num_chunks, cs).amax(dim=-1)  # [T, Hkv, C]
    mean_score = torch.einsum("thd,chd->thc", qg.double(), s.mean.double())
    tol = 1e-5 * (1 + qg.double().abs().sum(-1, keepdim=True) * 100)
    assert (bound >= best - tol).all()
    assert (bound >= mean_score - tol).all()


def _agree_with_exact(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> float:
    """Assert two top-k selections are the same set wherever the k-th and (k+1)-th exact scores
    are apart by more than float32 rounding, and both valid top-k elsewhere; returns the tied share."""
    k = a.shape[-1]
    srt = exact.sort(dim=-1, descending=True).values
    kth = srt[..., k - 1]
    gap = kth - srt[..., k] if srt.shape[-1] > k else torch.full_like(kth, float("inf"))
    tol = 1e-5 * exact.abs().amax(dim=-1)
    clear = gap > tol
    sa, sb = a.long().sort(-1).values, b.long().sort(-1).values
    assert torch.equal(sa[clear], sb[clear])
    for sel in (a, b):  # on near-ties: every chosen chunk is within rounding of the k-th score
        assert (exact.gather(-1, sel.long()) >= (kth - tol).unsqueeze(-1)).all()
    return 1.0 - clear.double().mean().item()


@needs_faiss
@pytest.mark.parametrize("kind", ["mean", "quest"])
@pytest.mark.parametrize(
    "t,hq,hkv,d,n,cs,k",
    [(16, 8, 2, 64, 20000, 64, 8), (5, 4, 4, 32, 3000, 16, 17), (9, 32, 8, 128, 7000, 128, 4)],
)
def test_router_selects_what_faiss_exact_selects(
    kind: str, t: int, hq: int, hkv: int, d: int, n: int, cs: int, k: int
) -> None:
    g = torch.Generator().manual_seed(n + k)
    keys = torch.randn(n, hkv, d, generator=g) + torch.randn(1, hkv, d, generator=g)
    q = torch.randn(t, hq, d, generator=g)
    s = chunk_summaries(keys, cs)
    router = Router.from_summaries([s], kind)
    layer = build_layer(s, kind, IndexSettings(use_gpu=False))
    assert not is_ivf(layer.indexes[0])
    ours = router.route(0, q, k)
    theirs, _ = layer.search(q, k)
    assert ours.shape == theirs.shape == (t, hkv, min(k, s.num_chunks))
    assert ours.dtype == theirs.dtype == torch.int32
    exact = torch.einsum(
        "thd,chd->thc", query_vectors(group_query(q, hkv), kind).double(), s.vectors(kind).double()
    )
    tied = _agree_with_exact(ours, theirs, exact)
    assert tied < 0.02


@needs_faiss
@pytest.mark.parametrize(
    "impl",
    [attention.route, reference_route, device_route],
    ids=["attention.route", "reference", "routing(bmm)"],
)
def test_attention_route_selects_what_faiss_exact_selects(impl) -> None:
    """The engine's routing entry points (CUDA's bmm path run here on CPU) against IndexFlatIP."""
    g = torch.Generator().manual_seed(11)
    q, keys = torch.randn(12, 32, 128, generator=g), torch.randn(64 * 800, 8, 128, generator=g)
    s = chunk_summaries(keys, 64)
    ours = impl(q, s.mean, 24)
    theirs, _ = build_layer(s, "mean", IndexSettings(use_gpu=False)).search(q, 24)
    exact = torch.einsum("thd,chd->thc", group_query(q, 8).double(), s.mean.double())
    assert _agree_with_exact(ours, theirs, exact) < 0.02


def test_router_mean_is_reference_route() -> None:
    g = torch.Generator().manual_seed(0)
    keys, q = torch.randn(4000, 4, 64, generator=g), torch.randn(7, 16, 64, generator=g)
    s = chunk_summaries(keys, 64)
    got = Router.from_summaries([s, s], "mean").route(1, q, 10)
    assert torch.equal(got, reference_route(q, s.mean, 10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mean", "quest"])
def test_router_on_cuda_selects_what_cpu_selects(kind: str) -> None:
    g = torch.Generator().manual_seed(5)
    keys, q = torch.randn(64 * 3000, 8, 128, generator=g), torch.randn(32, 32, 128, generator=g)
    s = chunk_summaries(keys.cuda(), 64)  # summaries built on the device too
    cpu = Router.from_summaries([s.to("cpu")], kind).route(0, q, 16)
    gpu = Router.from_summaries([s], kind, device="cuda").route(0, q.cuda(), 16)
    exact = torch.einsum(
        "thd,chd->thc",
        query_vectors(group_query(q, 8), kind).double(),
        s.to("cpu").vectors(kind).double(),
    )
    assert _agree_with_exact(gpu.cpu(), cpu, exact) < 0.02


def test_top_k_larger_than_corpus_and_density() -> None:
    s = chunk_summaries(torch.randn(100, 2, 16), 32)  # 4 chunks, last partial
    for kind in ("mean", "quest"):
        got = Router.from_summaries([s], kind).route(0, torch.randn(3, 4, 16), 10)
        assert got.shape == (3, 2, 4)
        assert torch.equal(got.sort(-1).values, torch.arange(4, dtype=torch.int32).expand(3, 2, 4))
    assert top_k_for(0.1, 1000) == 100
    assert top_k_for(0.001, 10) == 1
    assert top_k_for(1.0, 7) == 7
    assert top_k_for(0.34, 3) == 2


def _clustered(c: int, d: int, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)  # overlapping clusters: IVF must probe
    x = centers[torch.randint(clusters, (c,), generator=g)] + torch.randn(c, d, generator=g)
    q = centers[torch.randint(clusters, (64,), generator=g)] + torch.randn(64, d, generator=g)
    return x, q


IVF_RECALL_BOUND = 0.9  # default nprobe=32 of nlist=round(sqrt(C)) on clustered data


@needs_faiss
def test_ivf_recall_on_clustered_data() -> None:
    c, d, k = 20000, 64, 16
    x, q = _clustered(c, d, 256, 1)
    s = chunk_summaries(x.view(c, 1, d), 1)  # one key per chunk: the chunk vectors are x
    cfg = IndexSettings(ivf_threshold=1000, use_gpu=False)
    ivf, flat = build_layer(s, "mean", cfg), build_layer(s, "mean", cfg, ivf=False)
    assert is_ivf(ivf.indexes[0]) and ivf.indexes[0].nlist == round(c**0.5)
    assert ivf.indexes[0].nprobe == cfg.nprobe
    got, _ = ivf.search(q.view(64, 1, d), k)
    want, _ = flat.search(q.view(64, 1, d), k)
    recall = np.mean(
        [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(got[:, 0], want[:, 0])]
    )
    assert recall >= IVF_RECALL_BOUND, recall
    ivf.set_nprobe(ivf.indexes[0].nlist)  # every list: exact again
    got_all, _ = ivf.search(q.view(64, 1, d), k)
    assert torch.equal(got_all.sort(-1).values, want.sort(-1).values)


def _corpus(layers: int = 2, n: int = 3000, hkv: int = 2, d: int = 32, cs: int = 64):
    g = torch.Generator().manual_seed(7)
    return [chunk_summaries(torch.randn(n, hkv, d, generator=g), cs) for _ in range(layers)]


@needs_faiss
def test_save_load_round_trip(tmp_path) -> None:
    summaries = _corpus()
    cfg = IndexSettings(ivf_threshold=40, nlist=4, nprobe=3, use_gpu=False)  # 47 chunks: IVF
    layers = build_layers(summaries, ("mean",), cfg)
    layers["quest"] = build_layers(summaries, ("quest",), cfg, ivf=False)["quest"]
    folder = tmp_path / "corpus" / "index"
    m = store.save(folder, summaries, layers)
    assert (m.format_version, m.num_layers, m.num_chunks, m.chunk_size) == (1, 2, 47, 64)
    assert m.index_types == {"mean": ["ivf", "ivf"], "quest": ["flat", "flat"]}
    assert m.nprobe["mean"] == 3

    back = store.load(folder, use_gpu=False)
    q = torch.randn(5, 4, 32)
    for a, b in zip(summaries, back.summaries):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.kmin, b.kmin)
        assert torch.equal(a.kmax, b.kmax) and a.num_tokens == b.num_tokens
    for kind in ("mean", "quest"):
        for a, b in zip(layers[kind], back.layers[kind]):
            assert torch.equal(a.search(q, 6)[0], b.search(q, 6)[0])
    assert back.layers["mean"][0].indexes[0].nprobe == 3
    r = Router.load(folder, "quest")
    assert torch.equal(r.route(1, q, 6), Router.from_summaries(summaries, "quest").route(1, q, 6))

    store.save(folder, summaries[:1])  # rebuild in place: replaces the whole folder
    assert store.read_manifest(folder).kinds == [] and not list((folder / "faiss").iterdir())
    with pytest.raises(store.IndexFormatError, match="no FAISS indexes"):
        store.load(folder, ["mean"])


@needs_faiss
def test_unknown_version_and_corruption_are_refused(tmp_path) -> None:
    summaries = _corpus(layers=1)
    store.save(tmp_path / "ix", summaries, build_layers(summaries, ("mean",)))
    path = tmp_path / "ix" / store.MANIFEST
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(store.IndexFormatError, match="format version 99.*reads version 1"):
        store.load_summaries(tmp_path / "ix")
    path.write_text(json.dumps(raw))
    store.load_summaries(tmp_path / "ix")
    with open(tmp_path / "ix" / "faiss" / "mean.L0.H1.faiss", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(store.IndexFormatError, match="checksum"):
        store.load(tmp_path / "ix")
    with pytest.raises(store.IndexFormatError, match="no index manifest"):
        store.read_manifest(tmp_path / "nowhere")


def test_device_path_never_imports_faiss() -> None:
    code = (
        "import sys, torch; from index import Router, chunk_summaries; import index.store, "
        "index.search, index.faiss_index; s = chunk_summaries(torch.randn(300, 2, 16), 64); "
        "Router.from_summaries([s], 'quest').route(0, torch.randn(2, 4, 16), 3); "
        "assert 'faiss' not in sys.modules, 'faiss imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_find_passage_and_documents() -> None:
    g = torch.Generator().manual_seed(3)
    L, n, hkv, d, cs = 3, 64 * 40, 2, 32, 64
    keys = [torch.randn(n, hkv, d, generator=g) for _ in range(L)]
    summaries = [chunk_summaries(k, cs) for k in keys]
    target = 23
    passage = [k[target * cs + 5 : target * cs + 50] for k in keys]  # most of chunk 23's tokens
    hits = find_chunks(summaries, passage_query(passage), 3, metric="cos")
    assert hits.ids[0].item() == target and hits.scores[0] > hits.scores[1]

    query = torch.randn(L, hkv, d, generator=g)
    chunk_doc = torch.arange(40) // 7  # 6 documents, the last one short
    docs = find_documents(summaries, query, chunk_doc, 4, layers=[0, 2])
    scores = sum(torch.einsum("chd,hd->c", summaries[li].mean, query[li]) for li in (0, 2))
    best = torch.stack([scores[chunk_doc == doc].max() for doc in range(6)])
    want = best.topk(4)
    assert torch.equal(docs.ids, want.indices)
    torch.testing.assert_close(docs.scores, want.values)
