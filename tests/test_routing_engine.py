"""Routing inside a loaded corpus: the preamble is always attended, and routing to every chunk
is exactly dense attention."""

from __future__ import annotations

import torch

from attention.reference import shared_attention
from index import CorpusRouter
from tests.conftest import FACT_ANSWER, FACT_QUESTION


def test_router_keeps_preamble_and_all_chunks_equals_dense():
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(300, 2, 16, generator=g) for _ in range(2)]
    vals = torch.randn(300, 2, 16, generator=g)
    r = CorpusRouter(keys, chunk_size=32, always=2)
    q = torch.randn(5, 4, 16, generator=g)
    idx = r.route(1, q, top_k=4)
    assert idx.shape == (5, 2, 4)
    assert (idx[..., :2] == torch.tensor([0, 1])).all()  # preamble chunks first, always
    assert ((idx[..., 2:] >= 2) & (idx[..., 2:] < r.num_chunks)).all()
    full = r.route(1, q, top_k=r.num_chunks)
    assert sorted(full[0, 0].tolist()) == list(range(r.num_chunks))
    o_r, lse_r = shared_attention(q, keys[1], vals, full, 32)
    o_d, lse_d = shared_attention(q, keys[1], vals, None, 32)
    torch.testing.assert_close(o_r, o_d)
    torch.testing.assert_close(lse_r, lse_d)


def test_dense_first_layers_route_only_the_later_ones():
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(300, 2, 16, generator=g) for _ in range(4)]
    r = CorpusRouter(keys, chunk_size=32, always=1, dense_layers=2)
    q = torch.randn(3, 4, 16, generator=g)
    assert (
        r.route(0, q, top_k=3) is None and r.route(1, q, top_k=3, spans=[(0, 3)]) is None
    )  # dense
    assert r.route(2, q, top_k=3).shape == (3, 2, 3) and r.route(3, q, top_k=3).shape == (3, 2, 3)


def test_routed_answer_at_half_density(handbook):
    from kb.engine.sequence import SamplingParams

    dense = handbook.answer("handbook", FACT_QUESTION, SamplingParams(max_tokens=20))
    handbook.settings.density = 0.5  # (the handbook has 29 chunks: at 25% routing misses the fact)
    try:
        assert handbook.engine.runner.prefill_routing == "request"  # "auto" on the CPU
        routed = handbook.answer("handbook", FACT_QUESTION, SamplingParams(max_tokens=20))
        shared = handbook.cache.loaded["handbook"].shared
        assert shared.routed and shared.top_k < shared.num_chunks
        assert (
            shared.router.dense_layers == handbook.settings.routed_dense_layers == 0
        )  # the setting's
    finally:
        handbook.settings.density = 1.0
    assert FACT_ANSWER in dense["answer"] and FACT_ANSWER in routed["answer"]


def test_chunk_index_is_stored_once_per_layout_and_rebuilt_when_damaged(handbook):
    from pathlib import Path

    from sqlalchemy import select

    from index import store as index_store
    from kb.engine.sequence import SamplingParams
    from storage.models import ChunkIndex

    def stamp(path: str):
        return index_store.read_manifest(path).files, [
            p.stat().st_mtime_ns for p in sorted(Path(path).iterdir())
        ]

    handbook.cache.drop("handbook")
    loaded = handbook.load_corpus("handbook")
    with handbook.db.session() as s:
        rows = s.scalars(select(ChunkIndex)).all()
        assert len(rows) == 1 and rows[0].version == loaded.version
        path, num_chunks = rows[0].path, rows[0].num_chunks
    assert num_chunks == loaded.shared.num_chunks
    before = stamp(path)

    handbook.cache.drop("handbook")  # a reload of the same layout reads the stored summaries
    handbook.load_corpus("handbook")
    assert stamp(path) == before

    summaries = Path(path) / index_store.SUMMARIES
    summaries.write_bytes(summaries.read_bytes()[:-8] + b"XXXXXXXX")  # damage it
    handbook.cache.drop("handbook")
    again = handbook.load_corpus("handbook")
    index_store.load_summaries(path)  # rebuilt: verifies again
    out = handbook.answer("handbook", FACT_QUESTION, SamplingParams(max_tokens=20))
    assert FACT_ANSWER in out["answer"] and again.shared.router is not None
