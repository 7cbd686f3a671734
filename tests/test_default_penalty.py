"""The served frequency penalty (KB_FREQUENCY_PENALTY, chosen on the quality harness in
docs/QUALITY.md): what a request that sends none gets, from the service, the API and the CLI,
and that it breaks a greedy loop where a single repeat does not change the choice."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kb.api.chat import sampling
from kb.api.schemas import ChatRequest
from kb.engine.sampler import apply_penalties
from kb.engine.sequence import SamplingParams, Sequence
from kb.settings import Settings


def test_the_served_default_and_where_it_applies(tmp_path, monkeypatch):
    monkeypatch.delenv("KB_FREQUENCY_PENALTY", raising=False)
    assert Settings(home=tmp_path).frequency_penalty == 0.3
    assert SamplingParams().frequency_penalty == 0.0  # the engine's own default stays off
    monkeypatch.setenv("KB_FREQUENCY_PENALTY", "0.25")
    s = Settings(home=tmp_path)
    assert s.frequency_penalty == 0.25
    kb = SimpleNamespace(settings=s)
    ask = {"model": "kb:x", "messages": [{"role": "user", "content": "hi"}]}
    assert sampling(kb, ChatRequest(**ask), 16).frequency_penalty == 0.25
    sent = ChatRequest(**ask, frequency_penalty=0.0)
    assert sampling(kb, sent, 16).frequency_penalty == 0.0  # what a request sends wins


def test_the_knowledge_base_and_the_cli_send_it(tmp_path, monkeypatch):
    from kb.cli import answering
    from kb.service import KnowledgeBase

    kb = KnowledgeBase.__new__(KnowledgeBase)
    kb.settings = Settings(home=tmp_path, frequency_penalty=0.7, repetition_penalty=1.05)
    sp = kb.default_sampling()
    assert (sp.frequency_penalty, sp.repetition_penalty) == (0.7, 1.05)

    asked = []
    kb.ask = lambda corpus, q, sp, history, dense=False: asked.append(sp)
    kb.wait = lambda answer, on_text: {}
    local = answering.LocalAnswerer.__new__(answering.LocalAnswerer)
    local.kb, local.corpus, local.dense, local.max_tokens, local.temperature = (
        kb,
        "c",
        False,
        9,
        0.0,
    )
    local.answer("q", [], None)
    assert [(a.max_tokens, a.frequency_penalty, a.repetition_penalty) for a in asked] == [
        (9, 0.7, 1.05)
    ]


def test_it_breaks_a_loop_not_a_single_repeat():
    """Token 1 leads token 2 by 0.75: under the served 0.3 a greedy answer that has said 1 once
    or twice still says it (a repeated digit in a number survives), after three it moves on."""
    logits = torch.zeros(1, 8)
    logits[0, 1], logits[0, 2] = 5.0, 4.25

    def choice(generated: list[int]) -> int:
        seq = Sequence([0], SamplingParams(frequency_penalty=Settings().frequency_penalty))
        seq.output_ids.extend(generated)
        return int(apply_penalties(logits.clone(), [seq]).argmax())

    assert choice([1]) == 1
    assert choice([1, 1]) == 1
    assert choice([1, 1, 1]) == 2
