"""Turn an uploaded file into plain text plus a source map (page -> character span).

Citations point back through the source map: a segment's character span gives its pages, and
a passage's page is `page_of(doc, char_pos)`. Every failure a user can cause raises `IngestError`
with a one-line message; library exceptions never escape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from kb.ingest.document import ParsedDocument, utf16_without_bom
from kb.ingest.errors import IngestError
from kb.ingest.parsers.docx import parse_docx
from kb.ingest.parsers.html import parse_html
from kb.ingest.parsers.markdown import parse_markdown
from kb.ingest.parsers.pdf import parse_pdf
from kb.ingest.parsers.text import parse_text

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
TEXT_EXTS = frozenset(
    {
        ".txt",
        ".text",
        ".log",
        ".csv",
        ".tsv",
        ".rst",
        ".org",
        ".tex",
        ".json",
        ".jsonl",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".conf",
        ".xml",
        ".srt",
        ".vtt",
        ".py",
        ".js",
        ".ts",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".java",
        ".go",
        ".rs",
        ".sh",
        ".sql",
    }
)

# Magic bytes of common binary formats: such a file is never parsed as text.
_BINARY_MAGIC = (
    b"\x89PNG",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ\x00",
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!",
    b"\x7fELF",
    b"MZ",
    b"\xca\xfe\xba\xbe",
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
    b"OggS",
    b"RIFF",
    b"ID3",
    b"fLaC",
    b"\x00\x00\x01\x00",
    b"SQLite format 3\x00",
    b"wOFF",
    b"\x00asm",
)
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")  # utf-32 BOMs start with a utf-16 one


def _ext(filename: str) -> str:
    return PurePath(filename).suffix.lower()


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
        raise IngestError(
            "unsupported_type", f"Unsupported file type {ext}: save it as PDF or .docx."
        )
    raise IngestError("unsupported_type", f"Unsupported file type: {filename!s}.")


_PARSERS = {
    "pdf": parse_pdf,
    "docx": parse_docx,
    "html": parse_html,
    "markdown": parse_markdown,
    "text": parse_text,
}


@dataclass(frozen=True)
class ParseLimits:
    """Budgets checked while a document is parsed (each stops the parse as soon as it is passed):
    pages (PDF), decompressed bytes (DOCX and other ZIP-based formats), characters of text."""

    max_pages: int | None = None  # None: the parser's own default
    max_inflated_bytes: int | None = None
    max_inflated_xml_bytes: int | None = None
    max_chars: int | None = None

    @classmethod
    def from_settings(cls, s: Any) -> ParseLimits:
        """From KB_MAX_DOCUMENT_PAGES, KB_MAX_INFLATED_MB, KB_MAX_INFLATED_XML_MB and
        KB_MAX_DOCUMENT_TOKENS (a document
        with more than CHARS_PER_TOKEN characters per token allowed cannot fit the token limit)."""
        tokens = getattr(s, "max_document_tokens", 0) or 0
        return cls(
            max_pages=getattr(s, "max_document_pages", None),
            max_inflated_bytes=int(s.max_inflated_mb * 2**20)
            if getattr(s, "max_inflated_mb", None)
            else None,
            max_inflated_xml_bytes=(
                int(s.max_inflated_xml_mb * 2**20)
                if getattr(s, "max_inflated_xml_mb", None)
                else None
            ),
            max_chars=tokens * CHARS_PER_TOKEN if tokens else None,
        )


# No tokenizer kb serves averages more characters per token than this over a document's text,
# so text past tokens * CHARS_PER_TOKEN characters is refused before it is tokenized.
CHARS_PER_TOKEN = 12


def _too_much_text(filename: str) -> IngestError:
    return IngestError(
        "too_much_text",
        f"{filename} holds more text than one document may (KB_MAX_DOCUMENT_TOKENS); split it.",
    )


def parse_bytes(
    data: bytes,
    filename: str,
    *,
    max_bytes: int | None = None,
    allowed_types: frozenset[str] | None = None,
    limits: ParseLimits | None = None,
) -> ParsedDocument:
    """Parse an uploaded file's bytes; `filename` gives the extension when the magic bytes don't."""
    limits = limits or ParseLimits()
    if max_bytes is not None and len(data) > max_bytes:
        raise IngestError(
            "too_large", f"{filename} is {len(data)} bytes; the limit is {max_bytes}."
        )
    if not data:
        raise IngestError("empty_file", f"{filename} is empty.")
    kind = detect_type(filename, data[:HEAD_BYTES])
    if allowed_types is not None and kind not in allowed_types:
        raise IngestError("unsupported_type", f"{kind} files are not accepted here ({filename}).")
    if kind == "pdf":
        doc = parse_pdf(data, filename, max_pages=limits.max_pages, max_chars=limits.max_chars)
    elif kind == "docx":
        doc = parse_docx(
            data,
            filename,
            max_inflated=limits.max_inflated_bytes,
            max_xml=limits.max_inflated_xml_bytes,
        )
    else:
        # text and Markdown: no encoding spends more than four bytes on a character, so bytes past
        # four per allowed character cannot be within budget: refuse before decoding
        if kind != "html" and limits.max_chars is not None and len(data) > 4 * limits.max_chars:
            raise _too_much_text(filename)
        doc = _PARSERS.get(kind, parse_text)(data, filename)
    if limits.max_chars is not None and len(doc.text) > limits.max_chars:
        raise _too_much_text(filename)
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
    limits: ParseLimits | None = None,
) -> ParsedDocument:
    """Parse a stored file; its size is checked before it is read, so huge uploads cost nothing."""
    name = filename if filename is not None else os.path.basename(os.fspath(path))
    size = os.stat(path).st_size
    if max_bytes is not None and size > max_bytes:
        raise IngestError("too_large", f"{name} is {size} bytes; the limit is {max_bytes}.")
    with open(path, "rb") as f:
        # read at most one byte past the limit: the file may have grown since stat
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    return parse_bytes(data, name, max_bytes=max_bytes, allowed_types=allowed_types, limits=limits)
