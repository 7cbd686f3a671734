"""Penalties in the batched sampler against a direct per-token reference (OpenAI's presence and
frequency penalties, HF/vLLM's multiplicative repetition penalty), and their effect on choice."""

from __future__ import annotations

import random

import pytest
import torch

from kb.engine.sampler import apply_penalties, sample_each
from kb.engine.sequence import SamplingParams, Sequence


def _reference(row: list[float], generated: list[int], sp: SamplingParams) -> list[float]:
    """The definitions, one token at a time: counts over the generated tokens only."""
    out = list(row)
    counts: dict[int, int] = {}
    for t in generated:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        x = out[t]
        x = x / sp.repetition_penalty if x > 0 else x * sp.repetition_penalty
        out[t] = x - sp.frequency_penalty * c - sp.presence_penalty
    return out


def _seq(generated: list[int], **sp) -> Sequence:
    seq = Sequence([1, 2, 3], SamplingParams(**sp))
    seq.output_ids = list(generated)
    return seq


def test_batched_penalties_match_the_reference_row_by_row():
    rng = random.Random(7)
    vocab = 50
    seqs = []
    for _ in range(12):
        generated = [rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
        params = {
            "presence_penalty": rng.choice([0.0, 0.5, -1.0, 2.0]),
            "frequency_penalty": rng.choice([0.0, 0.3, -0.7, 1.5]),
            "repetition_penalty": rng.choice([1.0, 1.2, 0.8, 2.0]),
        }
        seqs.append(_seq(generated, **params))
    torch.manual_seed(0)
    logits = torch.randn(len(seqs), vocab) * 4
    before = logits.clone()
    got = apply_penalties(logits, seqs)
    assert torch.equal(logits, before)  # the input is not changed in place
    for i, seq in enumerate(seqs):
        want = _reference(before[i].tolist(), seq.output_ids, seq.sampling)
        assert got[i].tolist() == pytest.approx(want, rel=1e-6, abs=1e-6), i
    untouched = [i for i, s in enumerate(seqs) if not s.sampling.penalised or not s.output_ids]
    for i in untouched:
        assert torch.equal(got[i], before[i])


def test_no_penalty_or_no_generated_token_leaves_the_logits_alone():
    logits = torch.randn(2, 20)
    seqs = [_seq([1, 1, 2]), _seq([], presence_penalty=1.0, repetition_penalty=1.5)]
    assert torch.equal(apply_penalties(logits, seqs), logits)


def test_greedy_choice_moves_off_a_repeated_token():
    """A token already generated three times loses the greedy choice under each penalty, and
    keeps it without one."""
    logits = torch.tensor([[0.0, 5.0, 4.5, 1.0]])
    for sp, want in (
        ({}, 1),
        ({"frequency_penalty": 0.5}, 2),
        ({"presence_penalty": 1.0}, 2),
        ({"repetition_penalty": 1.3}, 2),
    ):
        assert sample_each(logits, [_seq([1, 1, 1], **sp)]) == [want], sp


def test_penalties_are_validated():
    for bad in (
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"repetition_penalty": 0.0},
        {"presence_penalty": float("nan")},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()
