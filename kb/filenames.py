"""The one way an uploaded file's name is cleaned, shared by the ingestor, the API and the web
app: so a document's stored name, its upload's name and the web app's progress rows agree."""

from __future__ import annotations

import re
from pathlib import Path


def safe_filename(name: str) -> str:
    """The base name of `name` (either slash), other characters than word, '.', '-' and space
    replaced by '_', at most 120 characters; "document" when nothing is left."""
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^\w.\- ]", "_", base).strip(" .") or "document"
    return base[:120]
