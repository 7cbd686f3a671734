"""A cited passage in its source: the document's page (or, without pages, the text around it)
with the passage's place in it, and for a PDF the page drawn as an image when pypdfium2 is
installed. The web app's source viewer shows it; the stored file is parsed again, so what is
shown is what was read."""

from __future__ import annotations

import importlib.util
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from kb.auth import Principal, check_read
from kb.errors import NotFound
from kb.ingest.parse import ParseLimits, parse_file
from kb.settings import Settings
from storage.db import Database
from storage.models import Corpus, Document

log = logging.getLogger(__name__)

WINDOW_CHARS = 6000  # text shown around the passage of a document without pages
PAGE_IMAGE_SCALE = 1.5  # 108 dpi: readable, and small enough to send


@dataclass
class SourcePage:
    """What the source viewer shows: the document, its page, the page's text and where in it
    the passage is (None when the stored text no longer holds it)."""

    document: str
    page: int | None
    pages: int | None  # the document's pages (None: a format without pages)
    text: str
    highlight: tuple[int, int] | None
    media_type: str
    clipped_before: bool = False  # the text starts inside the document (a window around it)
    clipped_after: bool = False


def _find(text: str, passage: str, lo: int = 0, hi: int | None = None) -> tuple[int, int] | None:
    """The passage's span in text[lo:hi], by its exact words (spacing may differ)."""
    passage = passage.strip()
    if not passage:
        return None
    i = text.find(passage, lo, hi)
    if i >= 0:
        return i, i + len(passage)
    words = passage.split()
    head = " ".join(words[:8])
    flat = text.replace("\n", " ")
    i = flat.find(head, lo, hi)
    return (i, min(len(text), i + len(passage))) if i >= 0 else None


def _readable_document(
    s: Session, user: Principal, corpus: str, document_id: int
) -> Document | None:
    """Document `document_id` if it belongs to `corpus`, else None; NotFound for a corpus that
    does not exist, and check_read's refusal where `user` may not read it."""
    c = s.scalar(select(Corpus).where(Corpus.name == corpus))
    if c is None:
        raise NotFound(f"corpus {corpus!r} does not exist")
    check_read(s, user, c)
    d = s.get(Document, document_id)
    return d if d is not None and d.corpus_id == c.id else None


def source_page(
    db: Database,
    settings: Settings,
    user: Principal,
    corpus: str,
    document_id: int,
    page: int | None,
    passage: str,
) -> SourcePage:
    """The page `page` of a document of `corpus` (which `user` may read) with `passage` located
    in it; NotFound for a document that is gone or not in that corpus."""
    with db.session() as s:
        d = _readable_document(s, user, corpus, document_id)
        if d is None or not d.file_path or not Path(d.file_path).exists():
            raise NotFound("that document is no longer in the corpus")
        filename, path = d.filename, d.file_path
    doc = parse_file(path, filename=filename, limits=ParseLimits.from_settings(settings))
    spans = [p for p in doc.pages if p.page is not None]
    if spans:
        span = next((p for p in spans if p.page == page), None)
        found = None
        if span is not None:
            found = _find(doc.text, passage, span.start, span.end)
        if found is None:  # the passage may run over into the next page, or the page be unknown
            hit = _find(doc.text, passage)
            if hit is not None:
                span = next((p for p in spans if p.start <= hit[0] < p.end), span)
                found = hit if span is not None and span.start <= hit[0] < span.end else None
        span = span or spans[0]
        text = doc.text[span.start : span.end]
        hl = (found[0] - span.start, min(found[1], span.end) - span.start) if found else None
        return SourcePage(filename, span.page, len(spans), text, hl, doc.media_type)
    hit = _find(doc.text, passage)
    centre = hit[0] if hit else 0
    lo = max(0, centre - WINDOW_CHARS // 2)
    hi = min(len(doc.text), lo + WINDOW_CHARS)
    lo = max(0, min(lo, hi - WINDOW_CHARS))
    hl = (hit[0] - lo, min(hit[1], hi) - lo) if hit else None
    return SourcePage(
        filename, None, None, doc.text[lo:hi], hl, doc.media_type, lo > 0, hi < len(doc.text)
    )


def can_draw_pages() -> bool:
    """Whether PDF pages can be drawn here (pypdfium2 is installed)."""
    return importlib.util.find_spec("pypdfium2") is not None


def page_image(
    db: Database, user: Principal, corpus: str, document_id: int, page: int
) -> bytes | None:
    """PNG bytes of page `page` (1-based) of a stored PDF, or None where it cannot be drawn."""
    if not can_draw_pages():
        return None
    import pypdfium2

    with db.session() as s:
        d = _readable_document(s, user, corpus, document_id)
        if d is None or d.media_type != "pdf" or not d.file_path:
            return None
        path = d.file_path
    try:
        pdf = pypdfium2.PdfDocument(path)
        try:
            if not 1 <= page <= len(pdf):
                return None
            image = pdf[page - 1].render(scale=PAGE_IMAGE_SCALE).to_pil()
        finally:
            pdf.close()
    except Exception as e:  # a damaged file: the page's text is still shown
        log.warning("page %s of document %s not drawn: %s", page, document_id, e)
        return None
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
