"""DOCX: paragraphs and tables in document order with python-docx. Word files have no pages."""

from __future__ import annotations

import io
import zipfile

from kb.ingest.errors import IngestError
from kb.ingest.document import ParsedDocument, normalize_newlines, single_page

# A .docx is a zip: refuse one that inflates past this (a zip bomb) before python-docx reads it.
MAX_DOCX_UNCOMPRESSED = 512 * 1024 * 1024


def _check_zip(data: bytes, filename: str, max_inflated: int | None = None) -> None:
    """Inflate every member as a stream, counting the bytes that really come out (a member's
    declared size may lie), and stop at the limit: a 354 KB file that inflates to 100 MB is
    refused after reading the limit's worth, before python-docx builds a tree of it."""
    limit = MAX_DOCX_UNCOMPRESSED if max_inflated is None else max_inflated
    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
            if "word/document.xml" not in names:
                raise IngestError("corrupt_docx", f"{filename} is a zip file but not a Word document.")
            for info in zf.infolist():
                if total + info.file_size > limit:  # declared sizes alone already say too much
                    total += info.file_size
                    break
                with zf.open(info) as member:
                    while chunk := member.read(1 << 20):
                        total += len(chunk)
                        if total > limit:
                            break
                if total > limit:
                    break
    except IngestError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, RuntimeError,
            NotImplementedError) as e:  # zlib.error is an Exception subclass caught below
        raise IngestError("corrupt_docx", f"{filename} is not a readable .docx file.") from e
    except Exception as e:  # zlib.error on a damaged stream
        raise IngestError("corrupt_docx", f"{filename} is not a readable .docx file ({type(e).__name__}).") from e
    if total > limit:
        raise IngestError("too_large", f"{filename} inflates past {limit} bytes (the limit of decompressed "
                          "size, KB_MAX_INFLATED_MB); save it smaller or split it.")


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


def parse_docx(data: bytes, filename: str, max_inflated: int | None = None) -> ParsedDocument:
    """A Word document: each non-empty paragraph or table a block, blocks joined by a blank line.
    `max_inflated` bounds its decompressed size (default MAX_DOCX_UNCOMPRESSED)."""
    _check_zip(data, filename, max_inflated)
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
