"""The kinds of file kb reads, as the upload widgets name them: the file-name endings of the
accepted kinds (KB_ALLOWED_TYPES) and their names in words, so a drop zone refuses the rest
before anything is uploaded."""

from __future__ import annotations

from kb.ingest.parse import DOCX_EXTS, HTML_EXTS, MARKDOWN_EXTS, PDF_EXTS, TEXT_EXTS
from kb.ingest.pipeline import accepted_types

EXTENSIONS = {
    "pdf": PDF_EXTS,
    "docx": DOCX_EXTS,
    "html": HTML_EXTS,
    "markdown": MARKDOWN_EXTS,
    "text": TEXT_EXTS,
}


def accepted_suffixes(allowed: str) -> list[str]:
    """The file-name endings of the kinds in `allowed` ("pdf,docx,..."), sorted: ".docx", ..."""
    kinds = [k.strip() for k in allowed.split(",") if k.strip()]
    return sorted({ext for k in kinds for ext in EXTENSIONS.get(k, ())})


def accepted_names(allowed: str) -> str:
    """The accepted kinds in words: "PDF (.pdf), Word (.docx), HTML (.html, .htm), ..."."""
    return accepted_types(allowed)
