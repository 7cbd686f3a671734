"""Parsing each supported format into text with a source map, and every bad input's error."""

from __future__ import annotations

import io
import os
import random
import zipfile

import docx
import pytest
from pypdf import PdfReader, PdfWriter

from kb.ingest import IngestError, PageSpan, detect_type, page_of, parse_bytes, parse_file


def _pdf_string(s: str) -> str:
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A valid PDF whose page i shows the lines pages[i] in Helvetica (an empty list: a blank page)."""
    n = len(pages)
    objs: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, lines in enumerate(pages):
        shows = " ".join(f"({_pdf_string(line)}) Tj T*" for line in lines)
        content = f"BT /F1 12 Tf 14 TL 72 720 Td {shows} ET".encode("latin-1")
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    info = ""
    if title is not None:
        objs.append(f"<< /Title ({_pdf_string(title)}) >>".encode("latin-1"))
        info = f" /Info {len(objs)} 0 R"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def encrypt_pdf(data: bytes, user_password: str, owner_password: str = "owner") -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def make_docx() -> bytes:
    d = docx.Document()
    d.add_heading("Quarterly Report", level=1)
    d.add_paragraph("Revenue grew in the third quarter.")
    d.add_paragraph("")
    d.add_paragraph("Costs were flat.")
    table = d.add_table(rows=2, cols=2)
    for r, row in enumerate([["Region", "Sales"], ["North", "42"]]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    d.add_paragraph("After the table.")
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


def error_code(data: bytes, filename: str, **kw) -> str:
    with pytest.raises(IngestError) as info:
        parse_bytes(data, filename, **kw)
    message = str(info.value)
    assert message and "\n" not in message
    return info.value.code


# --- type detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "head", "kind"),
    [
        ("report.pdf", b"%PDF-1.7\n", "pdf"),
        ("misnamed.txt", b"%PDF-1.4\n", "pdf"),  # magic bytes win over the name
        ("notes.docx", b"PK\x03\x04rest", "docx"),
        ("page.HTML", b"<p>hi</p>", "html"),
        ("noext", b"  <!DOCTYPE html><html>", "html"),
        ("noext", b"just words", "text"),
        ("readme.md", b"# Title", "markdown"),
        ("data.csv", b"a,b\n1,2\n", "text"),
        ("u16.txt", "hello".encode("utf-16"), "text"),
    ],
)
def test_detect_type(filename: str, head: bytes, kind: str) -> None:
    assert detect_type(filename, head) == kind


@pytest.mark.parametrize(
    ("filename", "head", "code"),
    [
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary_file"),
        ("blob.txt", bytes(range(256)), "binary_file"),
        ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "unsupported_type"),
        ("program.exe", b"MZ\x90\x00", "unsupported_type"),
        ("sheet.xyz", b"plain words", "unsupported_type"),
        ("old.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "unsupported_type"),
        ("archive.zip", b"PK\x03\x04", "unsupported_type"),
    ],
)
def test_detect_type_refuses(filename: str, head: bytes, code: str) -> None:
    with pytest.raises(IngestError) as info:
        detect_type(filename, head)
    assert info.value.code == code


# --- plain text -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]
)
def test_text_unicode_encodings_exact(encoding: str) -> None:
    text = "Grüße, 世界! Ελληνικά and emoji 😀.\nSecond line."
    doc = parse_bytes(text.encode(encoding), "notes.txt")
    assert doc.text == text
    assert doc.pages == [PageSpan(None, 0, len(text))]
    assert doc.media_type == "text"


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_text_legacy_encoding_detected(encoding: str) -> None:
    text = (
        "Les élèves français étudient à l'école. Grüße aus Köln, schöne Straße und Bäume überall. "
        * 3
    )
    doc = parse_bytes(text.encode(encoding), "notes.txt")
    assert doc.text == text


def test_text_newlines_normalized_and_page_of() -> None:
    doc = parse_bytes(b"one\r\ntwo\rthree\n", "a.log")
    assert doc.text == "one\ntwo\nthree\n"
    assert page_of(doc, 0) is None and page_of(doc, len(doc.text)) is None
    with pytest.raises(ValueError):
        page_of(doc, len(doc.text) + 1)


# --- markdown ---------------------------------------------------------------------------------

MARKDOWN = b"""# Install Guide

Run the *installer* and follow [the wizard](https://example.com/wizard).
It takes a minute.

## Steps

- download
- run **setup**
  - accept the licence

1. first
2. second

```sh
make install
```

| Option | Default |
|--------|---------|
| port   | 8080    |

<div>Raw <b>HTML</b> block</div>
"""


def test_markdown_renders_plain_text() -> None:
    doc = parse_bytes(MARKDOWN, "guide.md")
    assert doc.title == "Install Guide"
    assert doc.media_type == "markdown"
    assert doc.text.startswith(
        "Install Guide\n\nRun the installer and follow the wizard.\nIt takes a minute.\n\nSteps\n\n"
    )
    assert "- download\n- run setup\n  - accept the licence" in doc.text
    assert "1. first\n2. second" in doc.text
    assert "make install" in doc.text
    assert "Option | Default\nport | 8080" in doc.text
    assert "Raw HTML block" in doc.text
    for markup in ("https://", "**", "```", "<div>", "](", "|---"):
        assert markup not in doc.text
    assert doc.pages == [PageSpan(None, 0, len(doc.text))]


# --- HTML -------------------------------------------------------------------------------------

HTML = """<!doctype html><html><head><meta charset="windows-1252"><title>Caf\xe9 Menu</title>
<style>p { color: red }</style><script>var secret = "do not index";</script></head>
<body><nav><a href="/">Home</a><a href="/about">About us</a></nav>
<h1>Our Caf\xe9</h1><p>Fresh <b>coffee</b>
 every day.</p><p>Open<br>Mon\u2013Fri</p>
<ul><li>Espresso</li><li>Latte <i>with oat milk</i></li></ul>
<table><tr><th>Item</th><th>Price</th></tr><tr><td>Tea</td><td>2</td></tr></table>
<pre>  indented
    code</pre><!-- a comment --><noscript>enable js</noscript></body></html>"""


def test_html_visible_text_with_blocks() -> None:
    doc = parse_bytes(HTML.encode("cp1252"), "menu.html")
    assert doc.title == "Caf\xe9 Menu"
    assert doc.media_type == "html"
    assert doc.text == (
        "Our Caf\xe9\n\nFresh coffee every day.\n\nOpen\nMon\u2013Fri\n\n- Espresso\n- Latte with oat milk"
        "\n\nItem | Price\nTea | 2\n\n  indented\n    code"
    )
    for hidden in ("secret", "Home", "About us", "comment", "enable js", "color"):
        assert hidden not in doc.text


def test_html_deep_nesting_does_not_overflow() -> None:
    html = "<div>" * 5000 + "deep text" + "</div>" * 5000
    assert parse_bytes(html.encode(), "deep.html").text == "deep text"


# --- PDF --------------------------------------------------------------------------------------


def test_pdf_pages_map_to_their_text() -> None:
    data = make_pdf(
        [["Alpha page one.", "Second line."], [], ["Gamma page three."]], title="Greek Letters"
    )
    doc = parse_bytes(data, "letters.pdf")
    assert doc.media_type == "pdf"
    assert doc.title == "Greek Letters"
    assert [p.page for p in doc.pages] == [1, 3]  # the blank page has no span
    first, third = (doc.text[p.start : p.end] for p in doc.pages)
    assert "Alpha page one." in first and "Second line." in first
    assert "Gamma page three." in third
    assert page_of(doc, doc.text.index("Second")) == 1
    assert page_of(doc, doc.text.index("Gamma")) == 3
    assert page_of(doc, doc.pages[0].end) == 1  # the separator counts to the page before


def test_pdf_with_empty_user_password_opens() -> None:
    data = encrypt_pdf(make_pdf([["Readable by anyone."]]), user_password="")
    doc = parse_bytes(data, "open.pdf")
    assert "Readable by anyone." in doc.text


def test_pdf_encrypted_is_refused() -> None:
    data = encrypt_pdf(make_pdf([["Top secret."]]), user_password="secret")
    assert error_code(data, "locked.pdf") == "encrypted_pdf"


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.4\nthis is not really a pdf at all",
        make_pdf([["Cut short."]])[:60],
        b"not a pdf, only named like one",
        random.Random(0).randbytes(2000),
    ],
    ids=["header-only", "truncated", "text", "random"],
)
def test_pdf_corrupt(data: bytes) -> None:
    assert error_code(data, "broken.pdf") == "corrupt_pdf"


def test_pdf_without_text() -> None:
    assert error_code(make_pdf([[], []]), "scan.pdf") == "no_text"


# --- DOCX -------------------------------------------------------------------------------------


def test_docx_paragraphs_and_tables_in_order() -> None:
    doc = parse_bytes(make_docx(), "report.docx")
    assert doc.title == "Quarterly Report"
    assert doc.text == (
        "Quarterly Report\n\nRevenue grew in the third quarter.\n\nCosts were flat.\n\n"
        "Region | Sales\nNorth | 42\n\nAfter the table."
    )
    assert doc.pages == [PageSpan(None, 0, len(doc.text))]
    assert doc.media_type == "docx"
    assert page_of(doc, 5) is None


def test_docx_corrupt() -> None:
    assert error_code(b"PK\x03\x04 this zip is cut short", "bad.docx") == "corrupt_docx"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("hello.txt", "a zip, but no word/document.xml")
    assert error_code(buf.getvalue(), "fake.docx") == "corrupt_docx"


# --- limits and bad input ---------------------------------------------------------------------


def test_empty_file() -> None:
    assert error_code(b"", "empty.txt") == "empty_file"


def test_whitespace_only_has_no_text() -> None:
    assert error_code(b" \n\t\r\n ", "blank.txt") == "no_text"
    assert error_code(b"<html><script>x()</script></html>", "blank.html") == "no_text"


def test_too_large_bytes() -> None:
    assert error_code(b"x" * 101, "big.txt", max_bytes=100) == "too_large"
    assert parse_bytes(b"x" * 100, "ok.txt", max_bytes=100).text == "x" * 100


def test_parse_file_checks_size_before_reading(tmp_path) -> None:
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(64 * 1024**3)  # sparse: 64 GiB that reading would never finish
    with pytest.raises(IngestError) as info:
        parse_file(huge, max_bytes=1024)
    assert info.value.code == "too_large"


def test_parse_file_reads_with_given_name(tmp_path) -> None:
    path = tmp_path / "upload-1234"
    path.write_bytes(MARKDOWN)
    assert parse_file(path, filename="guide.md").title == "Install Guide"
    assert parse_file(path).media_type == "text"  # no extension, no HTML: plain text
    assert parse_file(os.fspath(path), filename="x.md", allowed_types=frozenset({"markdown"})).text


def test_binary_named_txt() -> None:
    data = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256))
    assert error_code(data, "program.txt") == "binary_file"


def test_undecodable_text() -> None:
    data = random.Random(1).randbytes(300).replace(b"\x00", b"\x80")  # no NULs, no encoding fits
    assert error_code(data, "mystery.txt") in ("undecodable", "binary_file")
    assert error_code(bytes(range(128, 256)) * 2, "high.txt") == "undecodable"


def test_unsupported_extension_and_allowed_types() -> None:
    assert error_code(b"plain words", "notes.xyz") == "unsupported_type"
    assert (
        error_code(b"# Title", "a.md", allowed_types=frozenset({"pdf", "text"}))
        == "unsupported_type"
    )


def test_docx_inflating_past_the_limit(monkeypatch) -> None:
    from kb.ingest.parsers import docx as docx_parser

    data = make_docx()
    monkeypatch.setattr(
        docx_parser, "MAX_DOCX_UNCOMPRESSED", len(data)
    )  # any real docx inflates past its size
    assert error_code(data, "bomb.docx") == "too_large"


def test_pdf_with_too_many_pages(monkeypatch) -> None:
    from kb.ingest.parsers import pdf as pdf_parser

    monkeypatch.setattr(pdf_parser, "MAX_PDF_PAGES", 2)
    assert error_code(make_pdf([["a"], ["b"], ["c"]]), "long.pdf") == "too_large"
    assert parse_bytes(make_pdf([["a"], ["b"]]), "short.pdf").text == "a\n\nb"
