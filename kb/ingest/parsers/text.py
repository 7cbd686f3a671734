"""Plain text in any encoding: UTF-8 and BOMs exactly, anything else detected by charset-normalizer."""

from __future__ import annotations

import codecs

from kb.ingest.document import (
    ParsedDocument,
    garbled,
    normalize_newlines,
    single_page,
    utf16_without_bom,
)
from kb.ingest.errors import IngestError

_BOM_CODECS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_text(data: bytes, filename: str = "file") -> tuple[str, str]:
    """Decode `data` to (text, encoding); raises IngestError("undecodable") when nothing fits."""
    for bom, encoding in _BOM_CODECS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError:
                break  # a BOM followed by garbage: let detection try
    try:
        return data.decode("utf-8"), "utf-8"  # the common case, and exact: no guessing
    except UnicodeDecodeError:
        pass
    encoding = utf16_without_bom(data[:8192])
    if encoding is not None:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None or best.encoding is None:
        raise IngestError("undecodable", f"Could not detect the text encoding of {filename}.")
    text = str(best)
    if garbled(text):
        raise IngestError("undecodable", f"{filename} does not decode to readable text.")
    return text, best.encoding


def parse_text(data: bytes, filename: str) -> ParsedDocument:
    """A plain-text file: decoded text with newlines normalized, one page-less span."""
    text, _ = decode_text(data, filename)
    text = normalize_newlines(text)
    if "\x00" in text:
        raise IngestError("binary_file", f"{filename} contains NUL characters; it looks binary.")
    return ParsedDocument(text=text, pages=single_page(text), media_type="text", title=None)
