"""Property tests: parsing random text in random encodings never crashes and keeps Unicode text exact."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kb.ingest import IngestError, PageSpan, ParsedDocument, page_of, parse_bytes

# Control characters other than tab and newlines make a file binary, by design; CR is normalized.
_text_chars = st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\ufeff")
readable = st.text(
    alphabet=st.one_of(_text_chars, st.sampled_from("\n\t ")), min_size=1, max_size=300
).filter(lambda t: t.strip() != "")


def check_document(doc: ParsedDocument) -> None:
    assert doc.text.strip()
    for span in doc.pages:
        assert 0 <= span.start <= span.end <= len(doc.text)
    for pos in (0, len(doc.text) // 2, len(doc.text)):
        page_of(doc, pos)


@settings(max_examples=200, deadline=None)
@given(text=readable, encoding=st.sampled_from(["utf-8", "utf-16", "utf-8-sig", "utf-32"]))
def test_unicode_encodings_round_trip(text: str, encoding: str) -> None:
    doc = parse_bytes(text.encode(encoding), "random.txt")
    assert doc.text == text
    assert doc.pages == [PageSpan(None, 0, len(text))]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        alphabet=st.characters(max_codepoint=0xFF, blacklist_categories=("Cc",))
        | st.sampled_from("\n\t "),
        min_size=1,
        max_size=300,
    ),
    encoding=st.sampled_from(["latin-1", "cp1252", "utf-8", "utf-16"]),
)
def test_legacy_encodings_never_crash(text: str, encoding: str) -> None:
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        return  # a character cp1252 lacks: not a file anyone could have written
    try:
        doc = parse_bytes(data, "random.txt")
    except IngestError as e:
        assert e.code in {"no_text", "undecodable", "binary_file", "empty_file"}
        return
    check_document(doc)
    if encoding in ("utf-8", "utf-16"):
        assert doc.text == text


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=2000),
    filename=st.sampled_from(["a.txt", "a.md", "a.html", "a.pdf", "a.docx", "a", "a.bin", "a.csv"]),
)
def test_random_bytes_never_crash(data: bytes, filename: str) -> None:
    try:
        doc = parse_bytes(data, filename)
    except IngestError as e:
        assert str(e) and "\n" not in str(e) and e.code
        return
    check_document(doc)


@settings(max_examples=100, deadline=None)
@given(text=readable)
def test_markdown_and_html_never_crash(text: str) -> None:
    for name in ("r.md", "r.html"):
        try:
            check_document(parse_bytes(text.encode("utf-8"), name))
        except IngestError as e:
            assert e.code == "no_text"


@pytest.mark.parametrize("prefix", [b"%PDF-1.4\n", b"PK\x03\x04"])
@settings(max_examples=50, deadline=None)
@given(tail=st.binary(max_size=500))
def test_garbage_behind_magic_bytes(prefix: bytes, tail: bytes) -> None:
    with pytest.raises(IngestError) as info:
        parse_bytes(prefix + tail, "upload.docx" if prefix.startswith(b"PK") else "upload.pdf")
    assert info.value.code in {"corrupt_pdf", "corrupt_docx", "no_text", "encrypted_pdf"}
