"""Cut a parsed document's tokens into segments of at most `segment_len` tokens.

Each segment's KV cache is prefilled on its own, so a segment should hold whole paragraphs where
it can: we cut at the latest paragraph break in the second half of the window, else at a sentence
end or newline, else between words, else wherever the tokens allow. The text is tokenized once,
so concatenating the segments' token ids gives exactly the tokenization of the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kb.ingest.errors import IngestError
from kb.ingest.parse import ParsedDocument, page_of

# Boundary strength between two tokens, strongest first.
PARAGRAPH, SENTENCE, WORD, ANY, INVALID = 4, 3, 2, 1, 0

_SENTENCE_END = ".!?\u3002\uff01\uff1f\u2026;:"
_CLOSERS = "\"')]}\u201d\u2019\u00bb"


@dataclass
class SegmentPlan:
    """One segment: its tokens and the characters [char_start, char_end) of the text they cover."""

    index: int
    token_ids: list[int]
    char_start: int
    char_end: int
    page_start: int | None
    page_end: int | None
    text: str


def tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`, with no special tokens.

    Accepts a transformers fast tokenizer or a bare `tokenizers.Tokenizer`.
    """
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        enc = tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False, verbose=False)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _boundary_strength(text: str, prev_end: int, start: int) -> int:
    """How good a cut is between a token ending at `prev_end` and the next one starting at `start`."""
    if start < prev_end:
        return INVALID  # the two tokens share characters (a character split into byte tokens)
    # the whitespace run around the cut, wherever the tokenizer put it
    left = start
    while left > 0 and text[left - 1].isspace():
        left -= 1
    right = start
    while right < len(text) and text[right].isspace():
        right += 1
    gap = text[left:right]
    if gap.count("\n") >= 2:
        return PARAGRAPH
    if "\n" in gap:
        return SENTENCE
    if gap:
        k = left
        while k > 0 and text[k - 1] in _CLOSERS:
            k -= 1
        if k > 0 and text[k - 1] in _SENTENCE_END:
            return SENTENCE
        return WORD
    return ANY


def _choose_cut(strength: list[int], begin: int, limit: int) -> int:
    """Index of the first token of the next segment, for a segment starting at token `begin`.

    `strength[j]` rates a cut before token j; the cut lands in (begin, begin + limit].
    """
    hi = begin + limit
    lo = begin + max(1, limit // 2)
    for level in (PARAGRAPH, SENTENCE, WORD, ANY):
        for j in range(hi, lo - 1, -1):
            if strength[j] >= level:
                return j
    for j in range(lo - 1, begin, -1):  # no valid cut in the second half: take any valid one
        if strength[j] > INVALID:
            return j
    return hi  # not even one: cut mid-character (the spans are clamped so they never overlap)


def cut_segments(doc: ParsedDocument, tokenizer: Any, segment_len: int) -> list[SegmentPlan]:
    """Tokenize `doc.text` once and cut it into segments of at most `segment_len` tokens."""
    if segment_len < 1:
        raise ValueError(f"segment_len must be positive, got {segment_len}")
    text = doc.text
    if not text.strip():
        raise IngestError("no_text", "The document has no text.")
    ids, offsets = tokenize_with_offsets(tokenizer, text)
    if not ids:
        raise IngestError("no_text", "The document has no text the tokenizer can read.")
    n = len(ids)
    # strength[j]: cut before token j, using the furthest end of any earlier token
    strength = [INVALID] * (n + 1)
    strength[n] = PARAGRAPH
    furthest = offsets[0][1]
    for j in range(1, n):
        strength[j] = _boundary_strength(text, furthest, offsets[j][0])
        furthest = max(furthest, offsets[j][1])

    segments: list[SegmentPlan] = []
    begin, prev_end = 0, 0
    while begin < n:
        end = n if n - begin <= segment_len else _choose_cut(strength, begin, segment_len)
        spans = [o for o in offsets[begin:end] if o[1] > o[0]] or offsets[begin:end]
        char_start = max(min(s for s, _ in spans), prev_end)
        char_end = max(max(e for _, e in spans), char_start)
        last = max(char_end - 1, char_start)
        segments.append(SegmentPlan(
            index=len(segments),
            token_ids=ids[begin:end],
            char_start=char_start,
            char_end=char_end,
            page_start=page_of(doc, char_start),
            page_end=page_of(doc, min(last, len(text))),
            text=text[char_start:char_end],
        ))
        begin, prev_end = end, char_end
    return segments
