"""Ingest: uploaded files -> text with a source map (parse) -> token segments (segment)."""

from kb.ingest.document import PageSpan, ParsedDocument, page_of
from kb.ingest.errors import IngestError
from kb.ingest.parse import ALL_TYPES, MIME_TYPES, detect_type, parse_bytes, parse_file
from kb.ingest.segment import SegmentPlan, cut_segments

__all__ = [
    "IngestError",
    "ALL_TYPES",
    "MIME_TYPES",
    "PageSpan",
    "ParsedDocument",
    "SegmentPlan",
    "cut_segments",
    "detect_type",
    "page_of",
    "parse_bytes",
    "parse_file",
]
