"""Next-token choice per sequence: greedy, or temperature with top-k / top-p, seeded per request.

Each sequence is sampled on its own: an error in one request's sampling (a seed torch cannot
take, say) becomes that request's `SamplingFailed`, and the other rows of the step go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kb.engine.sequence import Sequence


@dataclass(frozen=True)
class SamplingFailed:
    """Why one sequence could not be sampled this step (its request finishes with this reason)."""

    reason: str


def _generator(seq: Sequence) -> torch.Generator:
    if seq.generator is None:
        gen = torch.Generator(device="cpu")
        if seq.sampling.seed is not None:
            gen.manual_seed(seq.sampling.seed)
        else:
            gen.seed()
        seq.generator = gen
    return seq.generator


def _sample_row(row: torch.Tensor, greedy: int, seq: Sequence) -> int:
    sp = seq.sampling
    if sp.temperature < 1e-5:  # below this, logits / temperature overflow: it is greedy
        return greedy
    row = row / sp.temperature
    if sp.top_k > 0:
        kth = torch.topk(row, min(sp.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sp.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:  # degenerate: fall back to greedy
        return greedy
    return int(torch.multinomial(probs.cpu(), 1, generator=_generator(seq)).item())


def sample_each(logits: torch.Tensor, seqs: list[Sequence]) -> list[int | SamplingFailed]:
    """logits[S, V] (float32), one row per sequence -> a token id, or why that row failed."""
    out: list[int | SamplingFailed] = []
    greedy = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        try:
            out.append(_sample_row(logits[i], greedy[i], seq))
        except (RuntimeError, ValueError, OverflowError, TypeError) as e:
            out.append(SamplingFailed(f"sampling failed: {type(e).__name__}: {e}"))
    return out


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """As `sample_each`, for callers that want ids only: the first failed row raises."""
    out = sample_each(logits, seqs)
    for t in out:
        if isinstance(t, SamplingFailed):
            raise RuntimeError(t.reason)
    return out  # type: ignore[return-value]
