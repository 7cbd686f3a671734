"""The one error type ingest raises for bad input, so the API can show it to the user as is."""

from __future__ import annotations


class IngestError(Exception):
    """A document that cannot be ingested.

    `str(e)` is a one-line message fit for the user; `code` is a short stable slug for the API and
    metrics: "empty_file", "too_large", "unsupported_type", "binary_file", "undecodable", "no_text",
    "corrupt_pdf", "encrypted_pdf", "corrupt_docx", "corrupt_html".
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"IngestError({self.code!r}, {str(self)!r})"
