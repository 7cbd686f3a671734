"""Cut a parsed document's tokens into segments of at most `segment_len` tokens.

Each segment's KV cache is prefilled on its own, so a segment should hold whole paragraphs where
it can: we cut at the latest paragraph break in the second half of the window, else at a sentence
end or newline, else between words, else wherever the tokens allow. The text is tokenized once,
so concatenating the segments' token ids gives exactly the tokenization of the whole text.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from kb.ingest.document import ParsedDocument
from kb.ingest.errors import IngestError

# Boundary strength between two tokens, strongest first.
PARAGRAPH, SENTENCE, WORD, ANY, INVALID = 4, 3, 2, 1, 0

_SENTENCE_END = ".!?\u3002\uff01\uff1f\u2026;:"
_WHITESPACE = re.compile(r"\s+")
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
    if hasattr(tokenizer, "encode_batch") and hasattr(
        tokenizer, "get_vocab_size"
    ):  # tokenizers.Tokenizer
        enc = tokenizer.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
    else:
        enc = tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,
        )
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n = len(text)  # some normalizers report offsets a little past the end
    return list(ids), [(min(s, n), min(e, n)) for s, e in offsets]


def _boundary_strengths(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """strength[j] rates a cut before token j (strength[n]: the end of the text, always best).

    A cut is judged by the whole whitespace run around the next token's start, wherever the
    tokenizer put that whitespace; it is invalid where tokens share characters (a character
    split into byte tokens). Linear in the text: runs are found once by a regex.
    """
    n = len(offsets)
    runs = [(m.start(), m.end()) for m in _WHITESPACE.finditer(text)]
    run_starts = [r[0] for r in runs]
    strength = [INVALID] * (n + 1)
    strength[n] = PARAGRAPH
    furthest = offsets[0][1] if n else 0  # the furthest end of any earlier token
    for j in range(1, n):
        start = offsets[j][0]
        if start >= furthest:
            i = bisect.bisect_right(run_starts, start) - 1
            left, right = runs[i] if i >= 0 and runs[i][1] >= start else (start, start)
            gap = text[left:right]
            if gap.count("\n") >= 2:
                strength[j] = PARAGRAPH
            elif "\n" in gap:
                strength[j] = SENTENCE
            elif gap:
                k = left
                while k > 0 and text[k - 1] in _CLOSERS:
                    k -= 1
                strength[j] = SENTENCE if k > 0 and text[k - 1] in _SENTENCE_END else WORD
            else:
                strength[j] = ANY
        furthest = max(furthest, offsets[j][1])
    return strength


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
    strength = _boundary_strengths(text, offsets)
    starts = [p.start for p in doc.pages]

    def page(pos: int) -> int | None:  # page_of without rebuilding the index per segment
        if not doc.pages:
            return None
        return doc.pages[max(bisect.bisect_right(starts, pos) - 1, 0)].page

    segments: list[SegmentPlan] = []
    begin, prev_end = 0, 0
    while begin < n:
        end = n if n - begin <= segment_len else _choose_cut(strength, begin, segment_len)
        spans = [o for o in offsets[begin:end] if o[1] > o[0]] or offsets[begin:end]
        char_start = max(min(s for s, _ in spans), prev_end)
        char_end = max(max(e for _, e in spans), char_start)
        last = max(char_end - 1, char_start)
        segments.append(
            SegmentPlan(
                index=len(segments),
                token_ids=ids[begin:end],
                char_start=char_start,
                char_end=char_end,
                page_start=page(char_start),
                page_end=page(min(last, len(text))),
                text=text[char_start:char_end],
            )
        )
        begin, prev_end = end, char_end
    return segments
