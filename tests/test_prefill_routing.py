"""Request-level prefill routing (EngineConfig.prefill_routing = "request", the CPU's default):
one chunk selection per request and KV head for all its prefill tokens. It equals per-token routing when
every token would choose the same chunks, decode tokens still choose alone, and greedy answers
still find the planted fact."""

from __future__ import annotations

import pytest
import torch

import attention
from attention import reference as ref
from index import CorpusRouter
from kb.engine.engine import Engine, EngineConfig
from kb.engine.runner import default_prefill_routing
from kb.engine.sequence import SamplingParams
from kb.engine.shared_kv import SharedKV
from kb.ingest.precompute import prefill_preamble, prefill_segments
from tests.conftest import FACT_QUESTION, planted_text


def test_spans_share_one_selection_and_single_rows_route_alone():
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(640, 2, 16, generator=g) for _ in range(2)]
    r = CorpusRouter(keys, chunk_size=32, always=1, kind="quest")
    q = torch.randn(7, 4, 16, generator=g)
    per_token = r.route(1, q, top_k=5)
    idx = r.route(1, q, top_k=5, spans=[(0, 4), (4, 1), (5, 2)])
    assert idx.shape == per_token.shape == (7, 2, 5)
    assert (idx[..., 0] == 0).all()  # the preamble chunk, always
    want = (r.request_scores(1, q[:4]).topk(4, dim=-1).indices + 1).to(idx.dtype)  # [Hkv, 4]
    assert torch.equal(idx[:4, :, 1:], want.expand(4, 2, 4))
    assert torch.equal(idx[4], per_token[4])  # a span of one row is per-token routing
    assert (idx[5] == idx[6]).all()


def _corpus(lm, chosen: list[int]) -> tuple[SharedKV, list[int]]:
    """A real prefilled corpus of the planted text (chunks of 16) whose router prefers `chosen`
    chunks for every query: their quest bounds are made huge."""
    tok = lm.tokenizer
    preamble = tok(
        "<|im_start|>system\nAnswer from the text.\n", add_special_tokens=False
    ).input_ids
    text = tok(planted_text(), add_special_tokens=False).input_ids[:600]
    pk, pv = prefill_preamble(lm.model, preamble)
    [(_, k, v)] = list(prefill_segments(lm.model, preamble, [text]))
    k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    sh = SharedKV(
        "c",
        list(k.unbind(0)),
        list(v.unbind(0)),
        chunk_size=16,
        pos_offset=len(preamble) + len(text),
        preamble_len=len(preamble),
    )
    router = CorpusRouter(sh.k, sh.chunk_size, sh.always_chunks, "quest")
    d = k.shape[-1]
    for vec in router.router.vectors:  # [C_routed, Hkv, 2d] = [kmax, kmin]
        vec[[c - router.always for c in chosen], :, :d] = 1e4
        vec[[c - router.always for c in chosen], :, d:] = -1e4
    sh.router, sh.top_k = router, router.always + len(chosen)
    question = tok(
        f"<|im_end|>\n<|im_start|>user\n{FACT_QUESTION}<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    ).input_ids
    return sh, question


def test_request_routing_equals_token_routing_when_tokens_agree(demo_model, monkeypatch):
    """Every token's own choice is the request's: request-level routing (the CPU path's one
    gather) gives the tokens per-token routing gives through the masking reference."""
    calls: list[tuple[str, object]] = []
    route = CorpusRouter.route

    def spy(self, layer, q, top_k, spans=None):
        idx = route(self, layer, q, top_k, spans)
        if layer == 0:
            calls.append((mode, spans))
            chosen = idx.sort(dim=-1).values
            assert (chosen == chosen[:1]).all()  # all rows chose the same chunks
        return idx

    monkeypatch.setattr(CorpusRouter, "route", spy)
    outs = {}
    for mode in ("request", "token"):
        if mode == "token":
            monkeypatch.setattr(attention.cpu_shared, "shared_attention", ref.shared_attention)
        sh, question = _corpus(demo_model, chosen=[5, 9, 10, 20, 30])
        assert sh.routed
        engine = Engine(
            demo_model, EngineConfig(unique_kv_tokens=1024, citation_layers=0, prefill_routing=mode)
        )
        engine.register_corpus(sh)
        h = engine.add_request(
            question, SamplingParams(max_tokens=6, ignore_eos=True), "c", sh.pos_offset
        )
        engine.run_until_done()
        outs[mode] = h.seq.output_ids
    assert outs["request"] == outs["token"]
    n = len(question)
    assert calls[0] == ("request", [(0, n)]) and all(
        s is None for m, s in calls[1:] if m == "request"
    )
    assert all(s is None for m, s in calls if m == "token")


def test_prefill_routing_is_checked_and_auto_follows_the_device(demo_model):
    with pytest.raises(ValueError):
        Engine(demo_model, EngineConfig(unique_kv_tokens=64, prefill_routing="chunk"))
    assert Engine(demo_model, EngineConfig(unique_kv_tokens=64)).runner.prefill_routing == "request"
    assert (
        Engine(
            demo_model, EngineConfig(unique_kv_tokens=64, prefill_routing="token")
        ).runner.prefill_routing
        == "token"
    )
    assert (
        default_prefill_routing("cuda:0") == "token" and default_prefill_routing("cpu") == "request"
    )
