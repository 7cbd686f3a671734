"""The record every parser returns: a document's plain text and its source map (page -> character
span), with the text helpers the parsers share. Citations go back through `page_of`."""

from __future__ import annotations

import bisect
import codecs
import unicodedata
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PageSpan:
    """Characters [start, end) of `ParsedDocument.text` came from `page` (1-based; None: no pages)."""

    page: int | None
    start: int
    end: int


@dataclass
class ParsedDocument:
    """A document's plain text and where each part of it came from.

    `pages` are ordered and disjoint; characters between spans (page separators) belong to no page,
    and `page_of` counts them to the page before. Formats without pages have one span, page None.
    """

    text: str
    pages: list[PageSpan] = field(default_factory=list)
    media_type: str = "text"  # the kind: "pdf", "docx", "html", "markdown" or "text"
    title: str | None = None


def garbled(text: str) -> bool:
    """True when over 5% of `text` is replacement, control or unassigned characters: a wrong decoding."""
    if not text:
        return False
    bad = sum(
        1
        for ch in text
        if ch == "\ufffd"
        or (unicodedata.category(ch) in ("Cc", "Cn", "Co", "Cs") and ch not in "\t\n\r\f\v")
    )
    return bad > 0.05 * len(text)


def utf16_without_bom(head: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when `head` is UTF-16 text without a BOM (NULs mostly on one side)."""
    n = len(head) - len(head) % 2
    if n < 4:
        return None
    even, odd = head[0:n:2], head[1:n:2]
    for encoding, zeros, other in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if zeros.count(0) >= 0.2 * len(zeros) and other.count(0) <= 0.05 * len(other):
            try:  # the head may end inside a surrogate pair: decode it as a prefix
                text = codecs.getincrementaldecoder(encoding)().decode(head[:n], final=False)
            except UnicodeDecodeError:
                continue
            if "\x00" not in text and not garbled(text):
                return encoding
    return None


def page_of(doc: ParsedDocument, char_pos: int) -> int | None:
    """The page `doc.text[char_pos]` came from; separators between pages count to the page before."""
    if not 0 <= char_pos <= len(doc.text):
        raise ValueError(f"char_pos {char_pos} outside text of length {len(doc.text)}")
    if not doc.pages:
        return None
    starts = [p.start for p in doc.pages]
    i = bisect.bisect_right(starts, char_pos) - 1
    return doc.pages[max(i, 0)].page


def single_page(text: str) -> list[PageSpan]:
    """The source map of a format without pages: all of the text, page None."""
    return [PageSpan(None, 0, len(text))]


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR become LF, and a leading BOM goes, so offsets mean the same everywhere."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")
