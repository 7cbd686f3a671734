"""Next-token choice per sequence: greedy, or temperature with top-k / top-p, seeded per request."""

from __future__ import annotations

import torch

from kb.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits[S, V] (float32), one row per sequence -> one token id each."""
    out: list[int] = []
    greedy = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        sp = seq.sampling
        if sp.temperature < 1e-5:  # below this, logits / temperature overflow: it is greedy
            out.append(greedy[i])
            continue
        row = logits[i] / sp.temperature
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
            out.append(greedy[i])
            continue
        if seq.generator is None:
            seq.generator = torch.Generator(device="cpu")
            if sp.seed is not None:
                seq.generator.manual_seed(sp.seed)
            else:
                seq.generator.seed()
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=seq.generator).item()))
    return out
