"""A tiny run of the answer-quality harness (bench/quality.py): its data generators are
deterministic and answerable, and routing that selects every chunk answers exactly like dense."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import MODELS_DIR

ROOT = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


quality = _quality()


@pytest.mark.parametrize("task", sorted(quality.GENERATORS))
def test_generators_are_deterministic_and_answerable(task):
    a = quality.generate(task, seed=3, n=5, size=quality.QUICK_SIZES[task])
    b = quality.generate(task, seed=3, n=5, size=quality.QUICK_SIZES[task])
    c = quality.generate(task, seed=4, n=5, size=quality.QUICK_SIZES[task])
    assert a == b
    assert a.text != c.text
    assert len(a.questions) == 5
    assert len({q.question for q in a.questions}) == 5
    for q in a.questions:
        assert q.expected in a.text
        assert q.expected not in q.question


def test_vartrace_chain_resolves_to_its_value():
    data = quality.generate("vartrace", seed=1, n=3, size=3000)
    assigned = {}
    for line in data.text.split("\n\n"):
        if line.startswith("VAR "):
            lhs, rhs = line[4:].rstrip(".").split(" = ")
            assigned[lhs] = assigned.get(rhs, rhs)  # chains are written in order
    for q in data.questions:
        var = q.question.rstrip("?").split()[-1]
        assert assigned[var] == q.expected


def test_kv_is_valid_json_holding_the_answers():
    import json

    data = quality.generate("kv", seed=2, n=4, size=50)
    obj = json.loads(data.text)
    for q in data.questions:
        key = q.question.split('"')[1]
        assert obj[key] == q.expected
        assert len(q.history) == 2  # worked examples on other keys, answered with their JSON line
        for ask, answer in q.history:
            shown = ask.split('"')[1]
            assert shown != key and answer == f'"{shown}": "{obj[shown]}"'


def _tiny_model():
    from kb.model.config import ModelConfig
    from kb.model.llama import Transformer

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return Transformer(cfg).eval().requires_grad_(False)


def _prefill(model, preamble, segments, **kw):
    from kb.ingest.precompute import prefill_segments

    return {
        j: (k, v)
        for j, k, v in prefill_segments(model, preamble, segments, max_batch_tokens=64, **kw)
    }


def test_position_independence_schemes():
    from kb.ingest.precompute import prefill_preamble

    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    preamble = [1, 2, 3, 4, 5]
    segments = [torch.randint(6, 97, (n,), generator=g).tolist() for n in (20, 30, 12)]
    starts = [5, 25, 55]
    shared = _prefill(model, preamble, segments, starts=starts)
    assert shared.keys() == {0, 1, 2}
    for j, seg in enumerate(segments):
        assert shared[j][0].shape[1] == len(seg)

    # (a) own: every segment keeps its own preamble copy, prefilled from position 0
    own = _prefill(model, preamble, segments, starts=starts, pic="own")
    pk, _ = prefill_preamble(model, preamble)
    for j, seg in enumerate(segments):
        assert own[j][0].shape[1] == len(preamble) + len(seg)
        torch.testing.assert_close(own[j][0][:, : len(preamble)], pk)
    # positions restart: the first segment (right after the preamble) is the same in both schemes
    torch.testing.assert_close(own[0][0][:, len(preamble) :], shared[0][0])

    # (c) linked: the first segment has nothing before it; later ones see the previous tail
    linked = _prefill(model, preamble, segments, starts=starts, pic="linked", link_tokens=8)
    torch.testing.assert_close(linked[0][0], shared[0][0])
    for j in (1, 2):
        assert linked[j][0].shape == shared[j][0].shape
        assert not torch.allclose(linked[j][0][:, :4], shared[j][0][:, :4])
        # the segment's own prefill with the tail in front gives the same keys
        alone = _prefill(
            model, preamble, [segments[j - 1][-8:] + segments[j]], starts=[starts[j] - 8]
        )
        torch.testing.assert_close(linked[j][0], alone[0][0][:, 8:])
    # explicit links (a resumed build): the same as the previous segments, and resume-safe
    resumed = _prefill(
        model,
        preamble,
        segments[1:],
        starts=starts[1:],
        pic="linked",
        link_tokens=8,
        links=segments[:2],
    )
    for j in (1, 2):
        torch.testing.assert_close(resumed[j - 1][0], linked[j][0])
    none = _prefill(model, preamble, segments, starts=starts, pic="linked", link_tokens=0)
    for j in range(3):
        torch.testing.assert_close(none[j][0], shared[j][0])

    with pytest.raises(ValueError):
        _prefill(model, preamble, segments, pic="nope")


def test_harness_runs_every_scheme(tmp_path, demo_model_dir):
    args = quality.parse_args(
        [
            "--tasks",
            "needle",
            "--modes",
            "dense",
            "--pic",
            "a,b,c",
            "--n",
            "2",
            "--size",
            "1200",
            "--segment-len",
            "128",
            "--max-tokens",
            "4",
            "--models-dir",
            str(MODELS_DIR),
            "--out",
            str(tmp_path / "q.json"),
        ]
    )
    assert args.pic == ["own", "shared", "linked"] and args.threads == 1
    result = quality.run(args)
    assert result["complete"]
    assert [r["pic"] for r in result["rows"]] == ["own", "shared", "linked"]
    assert all(r["mode"] == "dense" and r["n"] == 2 for r in result["rows"])
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["rows"] == result["rows"]
    assert "pic" in quality.table(result["rows"])


def test_dense_and_full_routing_give_identical_answers(tmp_path, demo_model_dir):
    from kb.engine.sequence import SamplingParams
    from kb.engine.shared_kv import SharedKV
    from kb.prompt import build_prompt, encode
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    data = quality.generate("needle", seed=0, n=2, size=1500)
    path = tmp_path / "needle.txt"
    path.write_text(data.text)
    kb = KnowledgeBase(Settings(home=tmp_path / "home", models_dir=MODELS_DIR))
    try:
        meta = quality.build_corpus(kb, "needle", path, segment_len=128, chunk_size=16)
        assert meta["segments"] > 1
        qs = data.questions

        kb.settings.density = 1.0
        dense = quality.ask_all(kb, "needle", qs, 10)

        # through the service: density 1.0 with a router set is dense by definition
        loaded = quality.use_router(kb, "needle", "quest")
        assert loaded.shared.router is not None
        assert quality.ask_all(kb, "needle", qs, 10) == dense

        # the routed kernel path, selecting every chunk (the engine takes it whenever `routed`)
        class AllChunksRouted(SharedKV):
            @property
            def routed(self) -> bool:
                return True

        for kind in ("mean", "quest"):
            shared = quality.use_router(kb, "needle", kind).shared
            fields = {f.name: getattr(shared, f.name) for f in dataclasses.fields(shared)}
            full = AllChunksRouted(
                **{**fields, "key": f"{shared.key}#all-{kind}", "top_k": shared.num_chunks}
            )
            kb.engine.register_corpus(full)
            handles = []
            for q in qs:
                ids = encode(
                    kb.loaded.tokenizer,
                    build_prompt(
                        kb.loaded.tokenizer, kb.settings.system_prompt, [], q.question
                    ).suffix,
                )
                handles.append(
                    kb.engine.add_request(
                        ids, SamplingParams(max_tokens=10), full.key, full.pos_offset
                    )
                )
            routed = quality._collect(kb.engine, handles)
            kb.engine.unregister_corpus(full.key)
            assert routed == dense, kind

        # and the harness's metric is substring match
        assert quality.score(f"It is {qs[0].expected}.", qs[0].expected)
        assert not quality.score("I do not know.", qs[0].expected)
    finally:
        kb.close()


def test_harness_asks_with_the_served_penalties(monkeypatch):
    """The small grid's requests carry the service's default sampling (KB_REPETITION_PENALTY, as
    the web app's and the CLI's answers do) at the harness's length, plus --frequency-penalty."""
    from kb.engine.sequence import SamplingParams

    asked = []

    class Handle:
        pass

    class FakeKB:
        engine = None

        def default_sampling(self):
            return SamplingParams(max_tokens=256, repetition_penalty=1.3)

        def ask(self, name, question, sampling, history=None):
            asked.append(sampling)
            return type("A", (), {"handle": Handle()})()

    monkeypatch.setattr(quality, "_collect", lambda engine, handles: ["x"] * len(handles))
    qs = quality.generate("needle", seed=0, n=2, size=quality.QUICK_SIZES["needle"]).questions
    assert quality.ask_all(FakeKB(), "c", qs, 24, frequency_penalty=0.2) == ["x", "x"]
    assert [(s.max_tokens, s.repetition_penalty, s.frequency_penalty) for s in asked] == [
        (24, 1.3, 0.2)
    ] * 2
    args = quality.parse_args(["--repetition-penalty", "1.1", "--frequency-penalty", "0.3"])
    assert (args.repetition_penalty, args.frequency_penalty) == (1.1, 0.3)
    assert quality.parse_args([]).repetition_penalty is None  # the service's default
