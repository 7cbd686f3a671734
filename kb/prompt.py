"""Where a corpus meets a chat template: the shared preamble and each request's unique tokens.

The chat template is rendered once with a sentinel where the documents go. What precedes the
sentinel is the corpus preamble (stored once, positions from 0); the documents' segments follow
it; what follows the sentinel (the end of the system turn, history, the question, the assistant
header) is the request's unique part, placed after the longest segment.
"""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL = "\u2063KB-DOCUMENTS\u2063"


@dataclass(frozen=True)
class PromptParts:
    preamble: str
    suffix: str  # unique text after the documents


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(tokenizer, system_prompt: str, history: list[dict], question: str) -> PromptParts:
    """Split the rendered chat into preamble (shared) and suffix (unique)."""
    turns = [*history, {"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = _render(
                tokenizer,
                [
                    {"role": "system", "content": f"{system_prompt}\n\nDocuments:\n{SENTINEL}"},
                    *turns,
                ],
            )
        except Exception:  # templates without a system role: documents go in the first user turn
            turns = _fold_system(turns)
            first = {
                "role": "user",
                "content": f"{system_prompt}\n\nDocuments:\n{SENTINEL}\n\n{turns[0]['content']}",
            }
            text = _render(tokenizer, [first, *turns[1:]])
    else:
        convo = "".join(f"\n{t['role'].capitalize()}: {t['content']}" for t in turns)
        text = f"{system_prompt}\n\nDocuments:\n{SENTINEL}\n{convo}\nAssistant:"
    pre, _, post = text.partition(SENTINEL)
    return PromptParts(preamble=pre, suffix=post)


def _fold_system(turns: list[dict]) -> list[dict]:
    """System turns of the history (a client's instructions) folded into the next user turn,
    for templates that take no system role."""
    out, pending = [], []
    for t in turns:
        if t["role"] == "system":
            pending.append(t["content"])
        elif t["role"] == "user" and pending:
            out.append({"role": "user", "content": "\n\n".join([*pending, t["content"]])})
            pending = []
        else:
            out.append(t)
    return out


def preamble_text(tokenizer, system_prompt: str) -> str:
    """The corpus preamble: independent of any question, so it can be stored once."""
    return build_prompt(tokenizer, system_prompt, [], "?").preamble


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered template text (its special tokens written out as text)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def preamble_tokens(tokenizer, system_prompt: str) -> list[int]:
    """The corpus preamble's token ids: what every corpus's shared KV starts with."""
    return encode(tokenizer, preamble_text(tokenizer, system_prompt))


def question_span(tokenizer, text: str, question: str) -> tuple[int, int] | None:
    """[start, end) of the tokens of `encode(text)` that spell the last occurrence of `question`
    (the question itself, not the chat template around it: what selection scores with); None
    when the question is not found."""
    q = question.strip()
    at = text.rfind(q) if q else -1
    return _token_span(_offsets(tokenizer, text), at, len(q)) if at >= 0 else None


def turn_spans(tokenizer, text: str, questions: list[str]) -> tuple[tuple[int, int], ...]:
    """Token spans of earlier user turns' texts in `encode(text)`, searched in order (each after
    the previous one), oldest first; turns not found are left out. Selection gives each of them
    a passage, so a conversation keeps reading what its earlier questions read."""
    spans, start, offsets = [], 0, None
    for q in questions:
        q = q.strip()
        at = text.find(q, start) if q else -1
        if at < 0:
            continue
        start = at + len(q)
        offsets = offsets if offsets is not None else _offsets(tokenizer, text)  # once per text
        span = _token_span(offsets, at, len(q))
        if span is not None:
            spans.append(span)
    return tuple(spans)


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """The character range of each token of `encode(text)`."""
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def _token_span(offsets: list[tuple[int, int]], at: int, length: int) -> tuple[int, int] | None:
    """[start, end) of the tokens covering characters [at, at + length) (None for no token)."""
    end = at + length
    toks = [i for i, (a, b) in enumerate(offsets) if b > at and a < end]
    return (toks[0], toks[-1] + 1) if toks else None
