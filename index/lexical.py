"""A lexical index of a corpus's chunks: which token unigrams and bigrams each chunk holds.

Attention retrieval (kb/engine/selection.py) scores chunks with the model's own attention. A soft
match confuses near-identical strings (two invented keys that share two of their three sub-word
pieces, common among thousands of them), where the exact token sequence is unambiguous. This is
the exact half of a hybrid retriever: per chunk the IDF-weighted count of the question's distinct
unigrams and bigrams it contains (BM25 without length normalisation: chunks have one length),
combined with the attention ranking: `rerank` (the attention's best candidates ordered by their
exact matches, the served default) or `fuse_ranks` (reciprocal-rank fusion).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def grams(ids: Sequence[int], vocab: int) -> set[int]:
    """The distinct unigrams and bigrams of `ids`, a bigram (a, b) as the id vocab + a * vocab + b."""
    out = set(ids)
    out.update(vocab + a * vocab + b for a, b in zip(ids, ids[1:]))
    return out


@dataclass
class LexicalIndex:
    """Postings of every gram (chunk ids holding it) and its inverse document frequency."""

    postings: dict[int, torch.Tensor]  # gram -> [n] int64 chunk ids
    idf: dict[int, float]
    num_chunks: int
    vocab: int

    @classmethod
    def build(cls, chunk_ids: Sequence[Sequence[int]], vocab: int) -> LexicalIndex:
        """From the token ids of every chunk (an empty list where a chunk has none to match,
        e.g. the preamble's)."""
        holders: dict[int, list[int]] = {}
        for c, ids in enumerate(chunk_ids):
            for g in grams(ids, vocab):
                holders.setdefault(g, []).append(c)
        n = len(chunk_ids)
        idf = {g: math.log((n + 1) / (len(cs) + 0.5)) for g, cs in holders.items()}
        postings = {g: torch.tensor(cs, dtype=torch.long) for g, cs in holders.items()}
        return cls(postings, idf, n, vocab)

    def scores(self, ids: Sequence[int]) -> torch.Tensor:
        """[C] the IDF-weighted count of the distinct grams of `ids` that each chunk holds."""
        out = torch.zeros(self.num_chunks)
        for g in grams(ids, self.vocab):
            cs = self.postings.get(g)
            if cs is not None and self.idf[g] > 0:
                out.index_add_(0, cs, torch.full((cs.numel(),), self.idf[g]))
        return out


def competition_ranks(scores: torch.Tensor) -> torch.Tensor:
    """[C] float ranks from 0 (best), ties sharing the best rank of their group."""
    order = scores.argsort(descending=True, stable=True)
    s = scores[order]
    first = torch.ones_like(s, dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    pos = torch.arange(s.numel(), dtype=torch.float32)
    group_start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    ranks = torch.empty_like(pos)
    ranks[order] = group_start
    return ranks


def fuse_ranks(attention: torch.Tensor, lexical: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """[C] reciprocal-rank fusion of two chunk scorings: 1 / (k + rank) summed over both, a chunk
    with no lexical match (score 0) taking nothing from the lexical side. Small k: a chunk first
    in either ranking leads, the other ranking breaks the tie; an exact tie (first in one,
    second in the other, and the converse) goes to the larger lexical score, the exact evidence."""
    fused = 1.0 / (k + competition_ranks(attention))
    lex = 1.0 / (k + competition_ranks(lexical))
    return fused + torch.where(lexical > 0, lex, torch.zeros_like(lex)) + 1e-4 * _of_best(lexical)


def rerank(attention: torch.Tensor, lexical: torch.Tensor, top: int = 10) -> torch.Tensor:
    """[C] an order key: the attention's `top` best chunks first, ordered among themselves by
    their lexical score (near-equal ones, and those with no match, by attention), then every
    other chunk in attention order. Attention retrieves; the exact matches only reorder what it
    found, so a chunk the attention ignores is never promoted by a common word."""
    ranks = competition_ranks(attention)
    base = 1.0 / (1.0 + ranks)  # (0, 1], attention order
    return torch.where(ranks < top, 1.0 + _of_best(lexical) + 1e-3 * base, 1e-3 * base)


def _of_best(lexical: torch.Tensor) -> torch.Tensor:
    """Lexical scores as a share of the best one, in [0, 1] (all 0 when nothing matches)."""
    best = float(lexical.max()) if lexical.numel() else 0.0
    return lexical / best if best > 0 else torch.zeros_like(lexical)
