"""index/lexical.py: the exact half of attention retrieval's hybrid ranking."""

from __future__ import annotations

import math

import torch

from index.lexical import LexicalIndex, competition_ranks, fuse_ranks, grams, rerank

VOCAB = 100


def test_grams_are_unigrams_and_bigrams_kept_apart():
    g = grams([1, 2, 1], VOCAB)
    assert g == {1, 2, VOCAB + 1 * VOCAB + 2, VOCAB + 2 * VOCAB + 1}
    assert grams([], VOCAB) == set()


def test_scores_weigh_rare_grams_and_the_exact_sequence_wins():
    # chunk 1 holds the question's key (7 8 9) in order; chunk 2 the same pieces scattered,
    # chunk 3 two of the three; 5 is in nearly every chunk (a stopword: a small weight)
    chunks = [[], [5, 7, 8, 9, 5], [9, 5, 8, 5, 7], [5, 7, 8, 4], [5, 4, 4]]
    lex = LexicalIndex.build(chunks, VOCAB)
    s = lex.scores([5, 7, 8, 9])
    assert int(s.argmax()) == 1
    assert s[1] > s[2] > 0 and s[1] > s[3] > 0  # bigrams: only chunk 1 has 8-9
    assert s[0] == 0  # no tokens (the preamble's chunk)
    assert math.isclose(float(s[4]), lex.idf[5], rel_tol=1e-6)  # the stopword alone
    assert lex.idf[5] < lex.idf[9] / 2
    n = len(chunks)
    assert math.isclose(lex.idf[9], math.log((n + 1) / 2.5))
    # a question whose grams the corpus lacks scores nothing
    assert lex.scores([42, 43]).abs().sum() == 0


def test_competition_ranks_share_ties():
    r = competition_ranks(torch.tensor([0.5, 2.0, 0.5, 1.0, 0.0]))
    assert r.tolist() == [2.0, 0.0, 2.0, 1.0, 4.0]


def test_fusion_leads_with_either_ranking_and_ignores_absent_matches():
    att = torch.tensor([0.9, 0.8, 0.1, 0.0])
    lex = torch.tensor([0.0, 3.0, 0.0, 0.0])
    f = fuse_ranks(att, lex)
    assert int(f.argmax()) == 1  # second by attention, first by exact match
    assert f[0] > f[2] > f[3]  # no lexical match: the attention order stands
    # no lexical signal at all: the attention ranking unchanged
    same = fuse_ranks(att, torch.zeros(4))
    assert same.argsort(descending=True).tolist() == att.argsort(descending=True).tolist()


def test_rerank_orders_the_attention_candidates_by_exact_matches_only():
    att = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.0])
    lex = torch.tensor([0.0, 1.0, 5.0, 9.0, 0.0])
    order = rerank(att, lex, top=3).argsort(descending=True).tolist()
    # candidates 0-2 by lexical score (no match last among them), then the rest by attention:
    # chunk 3's strong match does not lift it past the candidates
    assert order == [2, 1, 0, 3, 4]
    # no lexical signal: the attention's order
    none = rerank(att, torch.zeros(5), top=3).argsort(descending=True).tolist()
    assert none == [0, 1, 2, 3, 4]
