"""A request as the engine sees it: token ids, sampling parameters, its unique-KV blocks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

_ids = itertools.count()
# text-generation-webui's and llama.cpp's default DRY sequence breakers
DRY_BREAKERS: tuple[str, ...] = ("\n", ":", '"', "*")
DRY_MAX_BREAKERS, DRY_MAX_BREAKER_CHARS, DRY_MAX_ALLOWED_LENGTH = 16, 16, 256


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    # over the request's generated tokens (kb/engine/sampler.py): OpenAI's additive penalties
    # (-2..2, 0 = off) and the multiplicative repetition penalty of HF and vLLM (1 = off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # DRY ("don't repeat yourself", kb/engine/sampler.py): a token that would continue a repeat
    # of an earlier run of the answer, the repeat L tokens long so far, loses
    # multiplier * base ** (L - allowed length) when L >= allowed length; a run never spans a
    # sequence breaker (multiplier 0 = off)
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: tuple[str, ...] = DRY_BREAKERS

    def validate(self) -> None:
        if not (self.temperature >= 0 and self.temperature <= 10):
            raise ValueError("temperature must be between 0 and 10")
        if not (0 < self.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError("repetition_penalty must be in (0, 10]")
        if not 0.0 <= self.dry_multiplier <= 10.0:
            raise ValueError("dry_multiplier must be between 0 and 10")
        if not 1.0 <= self.dry_base <= 10.0:
            raise ValueError("dry_base must be between 1 and 10")
        if not 1 <= self.dry_allowed_length <= DRY_MAX_ALLOWED_LENGTH:
            raise ValueError(f"dry_allowed_length must be between 1 and {DRY_MAX_ALLOWED_LENGTH}")
        breakers = self.dry_sequence_breakers
        if (
            not isinstance(breakers, (tuple, list))
            or len(breakers) > DRY_MAX_BREAKERS
            or not all(
                isinstance(b, str) and 1 <= len(b) <= DRY_MAX_BREAKER_CHARS for b in breakers
            )
        ):
            raise ValueError(
                f"dry_sequence_breakers must be at most {DRY_MAX_BREAKERS} strings of 1 to "
                f"{DRY_MAX_BREAKER_CHARS} characters"
            )

    @property
    def penalised(self) -> bool:
        """Whether any penalty changes this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.dry_multiplier) or (
            self.repetition_penalty != 1.0
        )


class SeqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)  # identity: the scheduler's membership tests must not compare token lists
class Sequence:
    """One request. Its unique tokens (prompt, then answer) sit at positions `pos_offset + i`."""

    prompt_ids: list[int]
    sampling: SamplingParams
    corpus_key: str | None = None  # which shared KV this request attends; None = no shared context
    pos_offset: int = 0
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the unique cache
    finish_reason: str | None = None
    chunk_mass: torch.Tensor | None = None  # attention mass per shared chunk, for citations
    # attention retrieval (kb/engine/selection.py): whether this request chooses its passages, the
    # [start, end) of its question's tokens in the prompt, those of its earlier user turns (oldest
    # first), and the selection once made at prefill
    select: bool = False
    select_span: tuple[int, int] | None = None
    history_spans: tuple[tuple[int, int], ...] = ()
    selection: object | None = None
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, i: int) -> int:
        """Token i of prompt + answer, without building `all_ids`."""
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    def slot(self, i: int, block_size: int) -> int:
        """Flat unique-KV slot of token i: its page in `block_table`, its offset in the page."""
        return self.block_table[i // block_size] * block_size + i % block_size

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is not yet computed: the prompt at first, then the last sampled token."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
