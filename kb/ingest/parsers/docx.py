"""DOCX: paragraphs and tables in document order with python-docx. Word files have no pages."""

from __future__ import annotations

import io
import zipfile

from kb.ingest.document import ParsedDocument, normalize_newlines, single_page
from kb.ingest.errors import IngestError

# A .docx is a zip: refuse one that inflates past this (a zip bomb) before python-docx reads it.
MAX_DOCX_UNCOMPRESSED = 512 * 1024 * 1024
MAX_DOCX_XML = 64 * 1024 * 1024  # of that, the XML parts (defaults; settings pass their own)


def _check_zip(
    data: bytes, filename: str, max_inflated: int | None = None, max_xml: int | None = None
) -> None:
    """Inflate every member as a stream, counting the bytes that really come out, and stop at
    the limits: all members together (`max_inflated`), and the XML parts python-docx builds
    trees of (`max_xml`: a tree takes ~100 times its text). A 354 KB file inflating to 100 MB
    of XML is refused having read the limit's worth, before python-docx sees it."""
    limits = {
        "all": MAX_DOCX_UNCOMPRESSED if max_inflated is None else max_inflated,
        "xml": MAX_DOCX_XML if max_xml is None else max_xml,
    }
    used = {"all": 0, "xml": 0}

    def over() -> str | None:
        return next((k for k in used if used[k] > limits[k]), None)

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
            if "word/document.xml" not in names:
                raise IngestError(
                    "corrupt_docx", f"{filename} is a zip file but not a Word document."
                )
            for info in zf.infolist():
                kinds = ("all", "xml") if info.filename.endswith((".xml", ".rels")) else ("all",)
                with zf.open(info) as member:
                    while not over() and (chunk := member.read(1 << 20)):
                        for k in kinds:
                            used[k] += len(chunk)
                if over():
                    break
    except IngestError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, NotImplementedError on odd members
        raise IngestError(
            "corrupt_docx", f"{filename} is not a readable .docx file ({type(e).__name__})."
        ) from e
    kind = over()
    if kind:
        what = "its XML parts inflate" if kind == "xml" else "it inflates"
        raise IngestError(
            "too_large",
            f"{filename}: {what} past {limits[kind]} bytes (KB_MAX_INFLATED_"
            f"{'XML_' if kind == 'xml' else ''}MB); save it smaller or split it.",
        )


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


def parse_docx(
    data: bytes, filename: str, max_inflated: int | None = None, max_xml: int | None = None
) -> ParsedDocument:
    """A Word document: each non-empty paragraph or table a block, blocks joined by a blank line.
    `max_inflated` and `max_xml` bound its decompressed size (all parts, XML parts)."""
    _check_zip(data, filename, max_inflated, max_xml)
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
        raise IngestError(
            "corrupt_docx", f"{filename} is not a readable .docx file ({type(e).__name__})."
        ) from e
    text = "\n\n".join(blocks)
    return ParsedDocument(text=text, pages=single_page(text), media_type="docx", title=title)
