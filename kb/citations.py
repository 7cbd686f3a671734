"""Map the attention mass an answer put on shared chunks back to documents, pages and passages."""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SegmentRef:
    """Where a stored segment sits in the corpus layout, and where it came from."""

    layout_start: int  # first token of the segment in the shared KV
    num_tokens: int
    document: str
    document_id: int
    page_start: int | None
    page_end: int | None
    char_start: int
    text: str


@dataclass
class Citation:
    document: str
    document_id: int
    page: int | None
    text: str  # the passage the answer drew on
    segment_text: str  # the whole segment, for context
    highlight: tuple[int, int]  # [start, end) of `text` inside `segment_text`
    score: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["highlight"] = list(self.highlight)
        return d


class CitationMap:
    """Chunk index -> (segment, token span) for one loaded corpus layout."""

    def __init__(self, segments: list[SegmentRef], chunk_size: int, tokenizer):
        self.segments = segments
        self.starts = [s.layout_start for s in segments]
        self.chunk_size = chunk_size
        self.tokenizer = tokenizer
        self._offsets: dict[int, list[tuple[int, int]]] = {}

    def _token_offsets(self, i: int) -> list[tuple[int, int]]:
        if i not in self._offsets:
            enc = self.tokenizer(
                self.segments[i].text, add_special_tokens=False, return_offsets_mapping=True
            )
            self._offsets[i] = [tuple(o) for o in enc["offset_mapping"]]
        return self._offsets[i]

    def chunk_tokens(self, num_chunks: int) -> list[list[int]]:
        """The token ids of every chunk of the layout ([] where no segment lies: the preamble's),
        from the segments' text tokenized again (as the citation offsets are): what the lexical
        index of attention retrieval matches (index/lexical.py)."""
        out: list[list[int]] = [[] for _ in range(num_chunks)]
        for s in self.segments:
            ids = self.tokenizer(s.text, add_special_tokens=False)["input_ids"][: s.num_tokens]
            for k, tid in enumerate(ids):
                c = (s.layout_start + k) // self.chunk_size
                if c < num_chunks:
                    out[c].append(tid)
        return out

    def cite(
        self, chunk_mass: list[tuple[int, float]], top: int = 3, min_share: float = 0.05
    ) -> list[Citation]:
        """The heaviest passages, merged per segment, strongest first."""
        total = sum(m for _, m in chunk_mass) or 1.0
        per_segment: dict[int, list[tuple[int, int, float]]] = {}
        for chunk, mass in chunk_mass:
            lo, hi = chunk * self.chunk_size, (chunk + 1) * self.chunk_size
            i = bisect.bisect_right(self.starts, lo) - 1
            while i < len(self.segments) and (i < 0 or self.starts[i] < hi):
                if i >= 0:
                    s = self.segments[i]
                    a, b = max(lo, s.layout_start), min(hi, s.layout_start + s.num_tokens)
                    if a < b:
                        share = mass * (b - a) / (hi - lo)
                        per_segment.setdefault(i, []).append(
                            (a - s.layout_start, b - s.layout_start, share)
                        )
                i += 1
        ranked = sorted(per_segment.items(), key=lambda kv: -max(x[2] for x in kv[1]))
        out = []
        for i, spans in ranked[:top]:
            a, b, share = max(spans, key=lambda x: x[2])
            if share / total < min_share and out:
                break
            seg = self.segments[i]
            offs = self._token_offsets(i)
            if offs:
                ca = offs[min(a, len(offs) - 1)][0]
                cb = offs[min(b, len(offs)) - 1][1]
            else:
                ca, cb = 0, len(seg.text)
            ca, cb = _widen_to_sentences(seg.text, ca, cb)
            out.append(
                Citation(
                    seg.document,
                    seg.document_id,
                    seg.page_start,
                    seg.text[ca:cb].strip(),
                    seg.text,
                    (ca, cb),
                    round(share / total, 4),
                )
            )
        return out


def _widen_to_sentences(text: str, a: int, b: int) -> tuple[int, int]:
    """Grow [a, b) to whole sentences, so a passage never starts or ends mid-word."""
    starts = [text.rfind(p, 0, a) for p in (". ", "\n", "? ", "! ")]
    a2 = max(starts)
    a = 0 if a2 < 0 else a2 + 1
    ends = [e for e in (text.find(p, b) for p in (". ", "\n", "? ", "! ")) if e >= 0]
    b = min(ends) + 1 if ends else len(text)
    return a, b
