"""Next-token choice per sequence: greedy, or temperature with top-k / top-p, seeded per request,
after the request's penalties on the tokens it has generated.

Penalties are applied to the whole batch at once (`apply_penalties`): OpenAI's presence and
frequency penalties (`logit - frequency * count - presence * (count > 0)`) and the
multiplicative repetition penalty of HF and vLLM (a seen token's logit divided by the penalty
when positive, multiplied when negative), then DRY ("don't repeat yourself", the sampler of
text-generation-webui, llama.cpp and koboldcpp): a token that would continue a repeat of an
earlier run of the answer is penalised by how long that repeat already is (`dry_penalties`).
Only generated tokens count: the prompt is a corpus whose facts an answer must be free to repeat.

Each sequence is then sampled on its own: an error in one request's sampling (a seed torch cannot
take, say) becomes that request's `SamplingFailed`, and the other rows of the step go on.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
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


# (breaker strings, vocabulary size) -> bool[vocabulary]: which token ids are DRY breakers
BreakerMask = Callable[[tuple[str, ...], int], torch.Tensor]
DRY_MAX_PENALTY = 1e30  # a DRY penalty is capped here: finite in float32, far past any logit


class BreakerMasks:
    """Which vocabulary ids are DRY sequence breakers, for a tuple of breaker strings: a token is
    one when its text contains one of them (so a newline breaker makes the tokens of two newlines
    or of a period and a newline breakers too). The vocabulary is decoded once; the masks of the
    most recent 256 strings and tuples are kept."""

    def __init__(self, tokenizer, keep: int = 256):
        self.tokenizer = tokenizer
        self.keep = keep
        self._texts: list[str] | None = None
        self._masks: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._sets: OrderedDict[tuple[tuple[str, ...], int], torch.Tensor] = OrderedDict()

    def _vocab_texts(self, vocab: int) -> list[str]:
        if self._texts is None or len(self._texts) < vocab:
            tok = self.tokenizer
            n = min(vocab, len(tok)) if hasattr(tok, "__len__") else vocab
            ids = [[i] for i in range(n)]
            backend = getattr(tok, "backend_tokenizer", None)  # a fast tokenizer's: 10x faster
            if backend is not None:
                texts = list(backend.decode_batch(ids))
            elif hasattr(tok, "batch_decode"):
                texts = list(tok.batch_decode(ids, skip_special_tokens=True))
            else:
                texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
            self._texts = texts + [""] * (vocab - n)  # ids past the tokenizer's: never breakers
        return self._texts[:vocab]

    def _mask(self, breaker: str, vocab: int) -> torch.Tensor:
        def make() -> torch.Tensor:
            return torch.tensor([breaker in t for t in self._vocab_texts(vocab)], dtype=torch.bool)

        return self._kept(self._masks, (breaker, vocab), make)

    def __call__(self, breakers: tuple[str, ...], vocab: int) -> torch.Tensor:
        def make() -> torch.Tensor:
            out = torch.zeros(vocab, dtype=torch.bool)
            for b in breakers:
                out |= self._mask(b, vocab)
            return out

        return self._kept(self._sets, (breakers, vocab), make)

    def _kept(
        self, cache: OrderedDict, key: tuple, make: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """cache[key], made on a miss; beyond `keep` entries, the least recently used go."""
        value = cache.get(key)
        if value is None:
            value = cache[key] = make()
            while len(cache) > self.keep:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return value


def dry_match_lengths(ids: torch.Tensor, breaker: torch.Tensor) -> torch.Tensor:
    """For each row's generated tokens `ids[R, N]`, right-aligned (left padding -1, which
    `breaker[R, N]` must mark as a breaker, as it marks each sequence breaker), L[R, N]: for
    the token at column j, the length of the longest run of tokens ending at column j - 1 that
    equals the run ending at the last column (the answer's suffix), containing no breaker; 0
    where the token at j is a breaker. Choosing ids[r, j] next would make that a repeat of
    L + 1 tokens.

    This is the suffix-match (Z) array of the reversed answer, extended one token of the suffix
    at a time for the whole batch at once: step m keeps the (row, column) pairs whose (m+1)-th
    token back still equals the suffix's, and stops when none does. After the first step only
    the columns after an earlier occurrence of the last token are left, so a step costs what
    is still matching, and the whole O(R * N + matches * (longest L + 1))."""
    rows, n = ids.shape
    length = torch.zeros(rows, n, dtype=torch.long, device=ids.device)
    r, j = (~breaker[:, 1:]).nonzero(as_tuple=True)  # a breaker is never penalised
    j = j + 1  # a candidate column has a column before it
    for m in range(n - 1):
        back = j - 1 - m
        keep = back >= 0
        keep &= ids[r, back.clamp(min=0)] == ids[r, n - 1 - m]
        keep &= ~breaker[r, n - 1 - m]
        r, j = r[keep], j[keep]
        if r.numel() == 0:
            break
        length[r, j] += 1
    return length


def dry_penalties(
    seqs: list[Sequence], vocab: int, device: torch.device, breakers: BreakerMask | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What DRY subtracts from each sequence's logits, as (row, token id, penalty) triples, each
    (row, token) once: for each token t, with L the longest run of the answer's suffix that,
    followed by t, repeats an earlier run of the answer (no sequence breaker in it;
    `dry_match_lengths`), `multiplier * base ** (L - allowed_length)` when L >= allowed_length
    (capped at DRY_MAX_PENALTY); tokens under the allowed length are not listed. Breaker strings
    become token ids through `breakers` (without it, nothing breaks a run)."""
    longest = max(len(s.output_ids) for s in seqs)
    ids = torch.full((len(seqs), longest), -1, dtype=torch.long)
    for r, s in enumerate(seqs):
        out = s.output_ids
        ids[r, longest - len(out) :] = torch.tensor(out, dtype=torch.long)
    ids = ids.clamp_(max=vocab - 1)
    brk = ids < 0
    if breakers is not None:
        masks = torch.stack(
            [breakers(tuple(s.sampling.dry_sequence_breakers), vocab) for s in seqs]
        )
        brk |= masks.gather(1, ids.clamp(min=0))
    length = dry_match_lengths(ids, brk)  # on the host, where the answers are: [R, N] is small

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    sps = [s.sampling for s in seqs]
    allowed = torch.tensor([sp.dry_allowed_length for sp in sps], dtype=torch.long)
    r, j = (length >= allowed.unsqueeze(1)).nonzero(as_tuple=True)
    tokens = ids[r, j]
    # the exponent past which multiplier * base ** e exceeds the cap (base 1: never)
    top = col(
        [
            1e4
            if sp.dry_base <= 1.0
            else math.log(DRY_MAX_PENALTY / sp.dry_multiplier) / math.log(sp.dry_base)
            for sp in sps
        ]
    )
    over = (length[r, j] - allowed[r]).to(torch.float64)
    mult, base = col([sp.dry_multiplier for sp in sps]), col([sp.dry_base for sp in sps])
    pen = (mult[r] * base[r].pow(torch.minimum(over, top[r]))).clamp(max=DRY_MAX_PENALTY)
    # one value per (row, token): the longest match's, which is the largest
    keys, where = torch.unique(r * vocab + tokens, return_inverse=True)
    best = torch.zeros(len(keys), dtype=torch.float64).scatter_reduce_(0, where, pen, "amax")
    return (keys // vocab).to(device), (keys % vocab).to(device), best.to(device)


def apply_penalties(
    logits: torch.Tensor, seqs: list[Sequence], breakers: BreakerMask | None = None
) -> torch.Tensor:
    """logits[S, V] with each row's penalties applied over its sequence's generated tokens, in
    one batched pass over the penalised rows (the input is left as it was); `breakers` maps
    DRY's breaker strings to token ids (`BreakerMasks`)."""
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
    dry = [r for r, i in enumerate(rows) if seqs[i].sampling.dry_multiplier > 0]
    if dry:
        at, tokens, pen = dry_penalties([seqs[rows[r]] for r in dry], vocab, dev, breakers)
        at = torch.tensor(dry, device=dev)[at]  # rows of `sub`
        sub[at, tokens] = sub[at, tokens] - pen.to(sub.dtype)
    return logits.index_copy(0, index, sub)


def sample_each(
    logits: torch.Tensor, seqs: list[Sequence], breakers: BreakerMask | None = None
) -> list[int | SamplingFailed]:
    """logits[S, V] (float32), one row per sequence -> a token id, or why that row failed;
    `breakers` maps DRY's breaker strings to token ids (`BreakerMasks`; None: no breakers)."""
    out: list[int | SamplingFailed] = []
    logits = apply_penalties(logits, seqs, breakers)
    greedy = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        try:
            out.append(_sample_row(logits[i], greedy[i], seq))
        except (RuntimeError, ValueError, OverflowError, TypeError) as e:
            out.append(SamplingFailed(f"sampling failed: {type(e).__name__}: {e}"))
    return out


def sample(
    logits: torch.Tensor, seqs: list[Sequence], breakers: BreakerMask | None = None
) -> list[int]:
    """As `sample_each`, for callers that want ids only: the first failed row raises."""
    out = sample_each(logits, seqs, breakers)
    for t in out:
        if isinstance(t, SamplingFailed):
            raise RuntimeError(t.reason)
    return out  # type: ignore[return-value]
