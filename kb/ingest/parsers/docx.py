"""DOCX: paragraphs and tables in document order with python-docx. Word files have no pages."""

from __future__ import annotations

import io
import zipfile

from kb.ingest.errors import IngestError
from kb.ingest.document import ParsedDocument, normalize_newlines, single_page

# A .docx is a zip: refuse one that inflates past this (a zip bomb) before python-docx reads it.
MAX_DOCX_UNCOMPRESSED = 512 * 1024 * 1024


def _check_zip(data: bytes, filename: str) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            total = sum(info.file_size for info in zf.infolist())
            names = set(zf.namelist())
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise IngestError("corrupt_docx", f"{filename} is not a readable .docx file.") from e
    if total > MAX_DOCX_UNCOMPRESSED:
        raise IngestError("too_large", f"{filename} inflates to {total} bytes; the limit is {MAX_DOCX_UNCOMPRESSED}.")
    if "word/document.xml" not in names:
        raise IngestError("corrupt_docx", f"{filename} is a zip file but not a Word document.")


def _table_text(table) -> str:
    """Rows on their own lines, cells joined by " | "; a merged cell is written once."""
    lines: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        seen: set[int] = set()
        for cell in row.cells:
            if id(cell._tc) in seen:
                continue
            seen.add(id(cell._tc))
            cells.append(" ".join(cell.text.split()))
        if any(cells):
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def parse_docx(data: bytes, filename: str) -> ParsedDocument:
    """A Word document: each non-empty paragraph or table a block, blocks joined by a blank line."""
    _check_zip(data, filename)
    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
        blocks: list[str] = []
        title = (document.core_properties.title or "").strip() or None
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                text = _table_text(item)
            else:
                text = normalize_newlines(item.text).strip()
                style = item.style.name if item.style is not None else ""
                if text and title is None and style in ("Title", "Heading 1"):
                    title = " ".join(text.split())
            if text:
                blocks.append(text)
    except IngestError:
        raise
    except Exception as e:  # python-docx and lxml raise many types on malformed parts
        raise IngestError("corrupt_docx", f"{filename} is not a readable .docx file ({type(e).__name__}).") from e
    text = "\n\n".join(blocks)
    return ParsedDocument(text=text, pages=single_page(text), media_type="docx", title=title)
