"""PDF: text per page with pypdf, so every character knows its page."""

from __future__ import annotations

import io
import logging

from kb.ingest.document import PageSpan, ParsedDocument, normalize_newlines
from kb.ingest.errors import IngestError

log = logging.getLogger(__name__)

# More pages than this is refused rather than parsed for minutes.
MAX_PDF_PAGES = 10_000
PAGE_SEPARATOR = "\n\n"  # a paragraph break, so the segmenter prefers cutting between pages


def _open(data: bytes, filename: str):
    """A PdfReader for `data`, decrypted with the empty password when encrypted."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
    except DependencyError as e:
        raise IngestError(
            "encrypted_pdf", f"{filename} is encrypted in a way we cannot open ({e})."
        ) from e
    except Exception as e:  # pypdf raises many types on malformed input
        raise IngestError(
            "corrupt_pdf", f"{filename} is not a readable PDF ({type(e).__name__})."
        ) from e
    if reader.is_encrypted:
        try:
            ok = reader.decrypt("")
        except DependencyError as e:
            raise IngestError(
                "encrypted_pdf", f"{filename} is encrypted in a way we cannot open ({e})."
            ) from e
        except (PdfReadError, Exception) as e:
            raise IngestError(
                "encrypted_pdf", f"{filename} is encrypted and could not be opened."
            ) from e
        if not ok:
            raise IngestError(
                "encrypted_pdf", f"{filename} is password-protected; upload it without a password."
            )
    return reader


def _title(reader) -> str | None:
    try:
        meta = reader.metadata
        title = meta.title if meta is not None else None
    except Exception:
        return None
    title = " ".join(str(title).split()) if title else ""
    return title or None


def parse_pdf(
    data: bytes, filename: str, max_pages: int | None = None, max_chars: int | None = None
) -> ParsedDocument:
    """A PDF: the text of each page in order, pages joined by a blank line; empty pages get no span.
    More than `max_pages` pages is refused before any is read; extraction stops as soon as the
    text passes `max_chars`."""
    max_pages = MAX_PDF_PAGES if max_pages is None else max_pages
    reader = _open(data, filename)
    try:
        pages = reader.pages
        n = len(pages)
    except Exception as e:
        raise IngestError(
            "corrupt_pdf", f"{filename} has an unreadable page tree ({type(e).__name__})."
        ) from e
    if n > max_pages:
        raise IngestError(
            "too_large",
            f"{filename} has {n} pages; the limit is {max_pages} (KB_MAX_DOCUMENT_PAGES).",
        )
    parts: list[str] = []
    spans: list[PageSpan] = []
    pos = 0
    failed = 0
    for number in range(1, n + 1):
        try:
            raw = pages[number - 1].extract_text() or ""
        except Exception as e:  # one broken content stream should not lose the whole document
            log.warning("%s: page %d: text extraction failed: %r", filename, number, e)
            failed += 1
            continue
        text = normalize_newlines(raw).replace("\x00", "").strip()
        if not text:
            continue
        if parts:
            parts.append(PAGE_SEPARATOR)
            pos += len(PAGE_SEPARATOR)
        parts.append(text)
        spans.append(PageSpan(number, pos, pos + len(text)))
        pos += len(text)
        if max_chars is not None and pos > max_chars:
            raise IngestError(
                "too_much_text",
                f"{filename} holds more text than one document may "
                f"(stopped at page {number} of {n}; KB_MAX_DOCUMENT_TOKENS).",
            )
    if n and failed == n:
        raise IngestError("corrupt_pdf", f"No page of {filename} could be read.")
    return ParsedDocument(text="".join(parts), pages=spans, media_type="pdf", title=_title(reader))
