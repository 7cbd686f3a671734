"""The engine: exact against transformers on a one-segment corpus, batching-invariant, and
careful with unique-KV blocks."""

from __future__ import annotations

import pytest
import torch

from kb.engine.block_manager import BlockManager
from kb.engine.engine import Engine, EngineConfig
from kb.engine.request import Finished
from kb.engine.scheduler import RequestTooLong, Scheduler
from kb.engine.sequence import SamplingParams, Sequence
from kb.engine.shared_kv import SharedKV
from kb.ingest.precompute import prefill_preamble, prefill_segments


def _shared(lm, preamble, segment) -> SharedKV:
    pk, pv = prefill_preamble(lm.model, preamble)
    [(_, k, v)] = list(prefill_segments(lm.model, preamble, [segment]))
    k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    return SharedKV(
        "c",
        list(k.unbind(0)),
        list(v.unbind(0)),
        chunk_size=16,
        pos_offset=len(preamble) + len(segment),
    )


def _greedy_hf(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids) :].tolist()


def test_shared_plus_unique_equals_one_contiguous_prompt(demo_model_dir, demo_model):
    """With one segment, [preamble ; segment ; question] in the engine is the same sequence
    transformers sees in one piece, so greedy tokens must agree."""
    from transformers import AutoModelForCausalLM

    lm = demo_model
    tok = lm.tokenizer
    preamble = tok("<|im_start|>system\nRead this.\n", add_special_tokens=False).input_ids
    segment = tok(
        "Otters hold hands while sleeping so they do not drift apart. " * 4,
        add_special_tokens=False,
    ).input_ids
    question = tok(
        "<|im_end|>\n<|im_start|>user\nWhy do otters hold hands?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    ).input_ids
    engine = Engine(lm, EngineConfig(unique_kv_tokens=1024, citation_layers=0))
    engine.register_corpus(_shared(lm, preamble, segment))
    h = engine.add_request(
        question, SamplingParams(max_tokens=12, ignore_eos=True), "c", len(preamble) + len(segment)
    )
    engine.run_until_done()
    hf = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    ref = _greedy_hf(hf, preamble + segment + question, 12)
    assert h.seq.output_ids == ref
    assert engine.runner.forward_tokens == len(question) + 11  # the corpus was never run again


def test_concurrent_requests_equal_sequential(demo_model):
    lm = demo_model
    tok = lm.tokenizer
    preamble = tok("<|im_start|>system\nFacts:\n", add_special_tokens=False).input_ids
    segment = tok(
        "The river Wend flows north. The tower of Ilsa is 90 metres tall.", add_special_tokens=False
    ).input_ids
    qs = [
        tok(
            f"<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        ).input_ids
        for q in ("Where does the Wend flow?", "How tall is the tower?", "Name a river.", "Hi")
    ]
    shared = _shared(lm, preamble, segment)

    def run(together: bool) -> list[list[int]]:
        engine = Engine(lm, EngineConfig(unique_kv_tokens=2048, block_size=8, citation_layers=0))
        engine.register_corpus(shared)
        sp = lambda: SamplingParams(max_tokens=8, ignore_eos=True)  # noqa: E731
        if together:
            hs = [engine.add_request(q, sp(), "c", shared.pos_offset) for q in qs]
            engine.run_until_done()
            assert engine.metrics.max_batch_size == len(qs)
            return [h.seq.output_ids for h in hs]
        outs = []
        for q in qs:
            h = engine.add_request(q, sp(), "c", shared.pos_offset)
            engine.run_until_done()
            outs.append(h.seq.output_ids)
        return outs

    assert run(True) == run(False)


def test_late_arrival_joins_running_batch(demo_model):
    lm = demo_model
    engine = Engine(lm, EngineConfig(unique_kv_tokens=1024, citation_layers=0))
    a = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=6, ignore_eos=True))
    engine.step()
    engine.step()
    b = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    assert engine.metrics.last_batch_size == 2  # b was prefilled in the same step a decoded
    engine.run_until_done()
    assert len(a.seq.output_ids) == 6 and len(b.seq.output_ids) == 3


def test_abort_frees_blocks(demo_model):
    engine = Engine(
        demo_model, EngineConfig(unique_kv_tokens=256, block_size=16, citation_layers=0)
    )
    free0 = engine.blocks.num_free
    h = engine.add_request(list(range(1, 40)), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.blocks.num_free < free0
    engine.abort(h)
    engine.step()
    assert engine.blocks.num_free == free0
    assert isinstance(h.result, Finished) and h.result.reason == "abort"


def test_preemption_recomputes_and_finishes():
    blocks = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(blocks, max_running=8, max_batch_tokens=64)
    a = Sequence(list(range(6)), SamplingParams(max_tokens=8))
    b = Sequence(list(range(6)), SamplingParams(max_tokens=8))
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new == [6, 6]
    sched.postprocess(batch)
    for s in (a, b):
        s.output_ids.append(0)
    # a and b hold 2 blocks each; decoding token 7 and 8 fits, token 9 needs a third block
    for _ in range(2):
        batch = sched.schedule()
        sched.postprocess(batch)
        for s in batch.seqs:
            s.output_ids.append(0)
    batch = sched.schedule()
    assert b not in sched.running and sched.waiting[0] is b  # the newest was preempted
    assert b.num_computed == 0 and b.block_table == []
    assert blocks.num_free + sum(len(s.block_table) for s in sched.running) == 4


def test_request_that_can_never_fit_is_refused():
    sched = Scheduler(BlockManager(num_blocks=2, block_size=4))
    with pytest.raises(RequestTooLong):
        sched.add(Sequence(list(range(6)), SamplingParams(max_tokens=8)))


def test_two_corpora_share_one_step(demo_model):
    lm = demo_model
    tok = lm.tokenizer
    pre = tok("<|im_start|>system\nFacts:\n", add_special_tokens=False).input_ids
    a = _shared(lm, pre, tok("Cats purr.", add_special_tokens=False).input_ids)
    b = _shared(lm, pre, tok("Dogs bark loudly at night.", add_special_tokens=False).input_ids)
    a.key, b.key = "a", "b"
    q = tok(
        "<|im_end|>\n<|im_start|>user\nWhat do they do?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    ).input_ids

    def answer(together: bool) -> list[list[int]]:
        engine = Engine(lm, EngineConfig(unique_kv_tokens=1024, citation_layers=0))
        engine.register_corpus(a)
        engine.register_corpus(b)
        sp = lambda: SamplingParams(max_tokens=6, ignore_eos=True)  # noqa: E731
        if together:
            hs = [engine.add_request(q, sp(), k.key, k.pos_offset) for k in (a, b)]
            engine.run_until_done()
            assert engine.metrics.max_batch_size == 2
            return [h.seq.output_ids for h in hs]
        out = []
        for k in (a, b):
            h = engine.add_request(q, sp(), k.key, k.pos_offset)
            engine.run_until_done()
            out.append(h.seq.output_ids)
        return out

    together = answer(True)
    assert together == answer(False)
    assert together[0] != together[1]  # each request saw its own corpus


def test_python_api_chat_and_generate_without_a_corpus(handbook):
    """The same engine answers plain chats and raw prompts; a corpus chat equals `answer`."""
    from kb.engine.sequence import SamplingParams
    from tests.conftest import FACT_ANSWER, FACT_QUESTION

    sp = lambda: SamplingParams(max_tokens=12)  # noqa: E731
    plain = handbook.wait(
        handbook.chat(
            [{"role": "user", "content": "What is the capital of France?"}], sampling=sp()
        )
    )
    assert "Paris" in plain["answer"] and plain["citations"] == []
    raw = handbook.wait(handbook.generate("The capital of France is", sp()))
    assert raw["usage"]["completion_tokens"] > 0
    over = handbook.wait(
        handbook.chat(
            [{"role": "user", "content": FACT_QUESTION}],
            corpus="handbook",
            sampling=SamplingParams(max_tokens=24),
        )
    )
    assert FACT_ANSWER in over["answer"] and over["citations"]
    assert over == handbook.answer("handbook", FACT_QUESTION, SamplingParams(max_tokens=24))


def test_tiny_temperature_is_greedy_and_a_failing_step_never_stops_the_engine(demo_model):
    """A fuzzer found temperature=1e-300: logits/temperature overflowed, multinomial raised, and
    the engine thread died with every stream waiting on it."""
    engine = Engine(demo_model, EngineConfig(unique_kv_tokens=1024, citation_layers=0))
    engine.start()
    try:
        greedy = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=4, ignore_eos=True))
        tiny = engine.add_request(
            [1, 2, 3, 4], SamplingParams(max_tokens=4, ignore_eos=True, temperature=1e-300)
        )
        for h in (greedy, tiny):
            assert list(h)[-1].reason == "length"
        assert tiny.seq.output_ids == greedy.seq.output_ids

        def broken(*_a, **_k):
            raise RuntimeError("planted failure")

        run = engine.runner.run
        engine.runner.run = broken  # one step fails: its requests end with an error
        failed = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3))
        assert list(failed)[-1].reason == "error" and "planted failure" in failed.result.error
        engine.runner.run = run
        after = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=4, ignore_eos=True))
        assert list(after)[-1].reason == "length" and after.seq.output_ids == greedy.seq.output_ids
    finally:
        engine.shutdown()
