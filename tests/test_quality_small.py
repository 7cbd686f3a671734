"""A tiny run of the answer-quality harness (bench/quality.py): its data generators are
deterministic and answerable, and routing that selects every chunk answers exactly like dense."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

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
            full = AllChunksRouted(**{**fields, "key": f"{shared.key}#all-{kind}", "top_k": shared.num_chunks})
            kb.engine.register_corpus(full)
            handles = []
            for q in qs:
                ids = encode(kb.loaded.tokenizer, build_prompt(kb.loaded.tokenizer, kb.settings.system_prompt,
                                                               [], q.question).suffix)
                handles.append(kb.engine.add_request(ids, SamplingParams(max_tokens=10), full.key, full.pos_offset))
            routed = quality._collect(kb.engine, handles)
            kb.engine.unregister_corpus(full.key)
            assert routed == dense, kind

        # and the harness's metric is substring match
        assert quality.score(f"It is {qs[0].expected}.", qs[0].expected)
        assert not quality.score("I do not know.", qs[0].expected)
    finally:
        kb.close()
