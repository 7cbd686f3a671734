"""Next-token choice per sequence: greedy, or temperature with top-k / top-p, seeded per request,
after the request's penalties on the tokens it has generated.

Penalties are applied to the whole batch at once (`apply_penalties`): OpenAI's presence and
frequency penalties (`logit - frequency * count - presence * (count > 0)`) and the
multiplicative repetition penalty of HF and vLLM (a seen token's logit divided by the penalty
when positive, multiplied when negative). Only generated tokens count: the prompt is a corpus
whose facts an answer must be free to repeat.

Each sequence is then sampled on its own: an error in one request's sampling (a seed torch cannot
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


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits[S, V] with each row's penalties applied over its sequence's generated tokens, in
    one batched pass over the penalised rows (the input is left as it was)."""
    rows = [i for i, s in enumerate(seqs) if s.sampling.penalised and s.output_ids]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    longest = max(len(seqs[i].output_ids) for i in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    ones = torch.zeros(len(rows), longest, dtype=logits.dtype)
    for r, i in enumerate(rows):
        out = seqs[i].output_ids
        ids[r, : len(out)] = torch.tensor(out, dtype=torch.long)
        ones[r, : len(out)] = 1
    ids = ids.clamp_(0, vocab - 1).to(dev)
    counts = torch.zeros(len(rows), vocab, dtype=logits.dtype, device=dev)
    counts.scatter_add_(1, ids, ones.to(dev))
    seen = counts > 0

    def col(name: str) -> torch.Tensor:
        vals = [float(getattr(seqs[i].sampling, name)) for i in rows]
        return torch.tensor(vals, dtype=logits.dtype, device=dev).unsqueeze(1)

    index = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, index)
    rep = col("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - col("frequency_penalty") * counts - col("presence_penalty") * seen
    return logits.index_copy(0, index, sub)


def sample_each(logits: torch.Tensor, seqs: list[Sequence]) -> list[int | SamplingFailed]:
    """logits[S, V] (float32), one row per sequence -> a token id, or why that row failed."""
    out: list[int | SamplingFailed] = []
    logits = apply_penalties(logits, seqs)
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
