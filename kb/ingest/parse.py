"""Turn an uploaded file into plain text plus a source map (page -> character span).

Citations point back through the source map: a segment's character span gives its pages, and
a passage's page is `page_of(doc, char_pos)`. Every failure a user can cause raises `IngestError`
with a one-line message; library exceptions never escape.
"""

from __future__ import annotations

import bisect
import codecs
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePath

from kb.ingest.errors import IngestError

# Bytes of the file's head that `detect_type` looks at.
HEAD_BYTES = 8192

# The kinds `detect_type` returns (stored as ParsedDocument.media_type) and their MIME types.
MIME_TYPES: dict[str, str] = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "html": "text/html",
    "markdown": "text/markdown",
    "text": "text/plain",
}
ALL_TYPES: frozenset[str] = frozenset(MIME_TYPES)

PDF_EXTS = frozenset({".pdf"})
DOCX_EXTS = frozenset({".docx"})
HTML_EXTS = frozenset({".html", ".htm", ".xhtml"})
MARKDOWN_EXTS = frozenset({".md", ".markdown", ".mdown", ".mkd"})
TEXT_EXTS = frozenset({
    ".txt", ".text", ".log", ".csv", ".tsv", ".rst", ".org", ".tex", ".json", ".jsonl",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".xml", ".srt", ".vtt",
    ".py", ".js", ".ts", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".go", ".rs", ".sh", ".sql",
})

# Magic bytes of common binary formats: such a file is never parsed as text.
_BINARY_MAGIC = (
    b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b",
    b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c", b"Rar!", b"\x7fELF", b"MZ", b"\xca\xfe\xba\xbe",
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", b"OggS", b"RIFF", b"ID3", b"fLaC", b"\x00\x00\x01\x00",
    b"SQLite format 3\x00", b"wOFF", b"\x00asm",
)
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")  # utf-32 BOMs start with a utf-16 one


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


def _ext(filename: str) -> str:
    return PurePath(filename).suffix.lower()


def garbled(text: str) -> bool:
    """True when over 5% of `text` is replacement, control or unassigned characters: a wrong decoding."""
    if not text:
        return False
    bad = sum(
        1 for ch in text
        if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cn", "Co", "Cs") and ch not in "\t\n\r\f\v")
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


def looks_binary(head: bytes) -> bool:
    """True for content no text encoding explains: known binary magic, NUL bytes, control bytes."""
    if head.startswith(_BOMS):
        return False
    if head.startswith(_BINARY_MAGIC):
        return True
    if b"\x00" in head:
        return utf16_without_bom(head) is None
    controls = sum(1 for b in head if b < 0x20 and b not in b"\t\n\r\f\v\x1b")
    return controls > 0.1 * max(len(head), 1)


def detect_type(filename: str, head: bytes) -> str:
    """Return "pdf", "docx", "html", "markdown" or "text": magic bytes first, then the extension.

    Raises IngestError("binary_file") for binary content under a text name and
    IngestError("unsupported_type") for anything else we cannot parse.
    """
    ext = _ext(filename)
    if b"%PDF-" in head[:1024]:
        return "pdf"
    if head.startswith(b"PK\x03\x04") and (ext in DOCX_EXTS or b"word/" in head):
        return "docx"
    if ext in PDF_EXTS:
        return "pdf"  # no PDF header: the PDF parser reports it as corrupt
    if ext in DOCX_EXTS:
        return "docx"
    textual_name = ext in TEXT_EXTS or ext in HTML_EXTS or ext in MARKDOWN_EXTS or ext == ""
    if looks_binary(head):
        if textual_name:
            raise IngestError("binary_file", f"{filename!s} looks like a binary file, not text.")
        raise IngestError("unsupported_type", f"Unsupported file type: {filename!s}.")
    if ext in HTML_EXTS:
        return "html"
    if ext in MARKDOWN_EXTS:
        return "markdown"
    if ext in TEXT_EXTS:
        return "text"
    if ext == "":
        sniff = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:64].lower()
        if sniff.startswith((b"<!doctype html", b"<html")):
            return "html"
        return "text"
    if ext in (".doc", ".ppt", ".xls", ".pptx", ".xlsx", ".odt", ".rtf"):
        raise IngestError("unsupported_type", f"Unsupported file type {ext}: save it as PDF or .docx.")
    raise IngestError("unsupported_type", f"Unsupported file type: {filename!s}.")


def parse_bytes(
    data: bytes,
    filename: str,
    *,
    max_bytes: int | None = None,
    allowed_types: frozenset[str] | None = None,
) -> ParsedDocument:
    """Parse an uploaded file's bytes; `filename` gives the extension when the magic bytes don't."""
    if max_bytes is not None and len(data) > max_bytes:
        raise IngestError("too_large", f"{filename} is {len(data)} bytes; the limit is {max_bytes}.")
    if not data:
        raise IngestError("empty_file", f"{filename} is empty.")
    kind = detect_type(filename, data[:HEAD_BYTES])
    if allowed_types is not None and kind not in allowed_types:
        raise IngestError("unsupported_type", f"{kind} files are not accepted here ({filename}).")
    if kind == "pdf":
        from kb.ingest.parsers.pdf import parse_pdf as parser
    elif kind == "docx":
        from kb.ingest.parsers.docx import parse_docx as parser
    elif kind == "html":
        from kb.ingest.parsers.html import parse_html as parser
    elif kind == "markdown":
        from kb.ingest.parsers.markdown import parse_markdown as parser
    else:
        from kb.ingest.parsers.text import parse_text as parser
    doc = parser(data, filename)
    if not doc.text.strip():
        raise IngestError("no_text", f"No text could be extracted from {filename}.")
    assert all(0 <= p.start <= p.end <= len(doc.text) for p in doc.pages)
    return doc


def parse_file(
    path: str | os.PathLike,
    *,
    filename: str | None = None,
    max_bytes: int | None = None,
    allowed_types: frozenset[str] | None = None,
) -> ParsedDocument:
    """Parse a stored file; its size is checked before it is read, so huge uploads cost nothing."""
    name = filename if filename is not None else os.path.basename(os.fspath(path))
    size = os.stat(path).st_size
    if max_bytes is not None and size > max_bytes:
        raise IngestError("too_large", f"{name} is {size} bytes; the limit is {max_bytes}.")
    with open(path, "rb") as f:
        # read at most one byte past the limit: the file may have grown since stat
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    return parse_bytes(data, name, max_bytes=max_bytes, allowed_types=allowed_types)


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
