"""Issue 15, point 4: an upload inside the size limit cannot exhaust memory, CPU or disk. The
decompressed size of a DOCX, the pages and text of one document are checked while parsing
(stopping early), and tokens per document, per corpus and per user are quotas."""

from __future__ import annotations

import io
import tracemalloc
import zipfile

import pytest

from kb.ingest.errors import IngestError
from kb.ingest.parse import ParseLimits, parse_bytes
from tests.conftest import MODELS_DIR
from tests.test_parse import make_docx, make_pdf

MiB = 2**20


def docx_bomb(inflated_mb: int) -> bytes:
    """A valid .docx whose document.xml inflates to about `inflated_mb` MiB of paragraphs (the
    probe's was 354 KB inflating to 100 MB)."""
    src = zipfile.ZipFile(io.BytesIO(make_docx()))
    out = io.BytesIO()
    para = b"<w:p><w:r><w:t>" + b"lorem ipsum dolor sit amet " * 20 + b"</w:t></w:r></w:p>"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "word/document.xml":
                data = data.replace(
                    b"</w:body>", para * (inflated_mb * MiB // len(para)) + b"</w:body>"
                )
            dst.writestr(info.filename, data)
    return out.getvalue()


def _refused(data: bytes, name: str, limits: ParseLimits) -> tuple[str, int]:
    """(error code, peak bytes Python allocated while parsing)."""
    tracemalloc.start()
    try:
        with pytest.raises(IngestError) as info:
            parse_bytes(data, name, limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value) and "\n" not in str(info.value)
    return info.value.code, peak


def test_docx_bomb_is_refused_while_inflating():
    """A DOCX inflating to 40 MiB under a 4 MiB limit: refused having held about one 1 MiB read
    chunk, never the document (python-docx used to build a tree of all of it)."""
    data = docx_bomb(40)
    assert len(data) < MiB  # well inside any upload limit
    code, peak = _refused(data, "bomb.docx", ParseLimits(max_inflated_bytes=4 * MiB))
    assert code == "too_large"
    assert peak < 12 * MiB, peak


def test_docx_xml_budget_holds_on_its_own():
    """The XML parts have their own, smaller budget (their trees take ~100 times their size)."""
    code, _ = _refused(
        docx_bomb(12),
        "xml.docx",
        ParseLimits(max_inflated_bytes=64 * MiB, max_inflated_xml_bytes=4 * MiB),
    )
    assert code == "too_large"


def test_docx_within_the_limit_still_parses():
    doc = parse_bytes(docx_bomb(2), "fine.docx", limits=ParseLimits(max_inflated_bytes=8 * MiB))
    assert "lorem ipsum" in doc.text


def test_pdf_pages_and_text_budgets():
    pdf = make_pdf([[f"page {i} " + "word " * 30] for i in range(12)])
    assert _refused(pdf, "long.pdf", ParseLimits(max_pages=10))[0] == "too_large"
    assert _refused(pdf, "wordy.pdf", ParseLimits(max_chars=500))[0] == "too_much_text"
    assert (
        len(parse_bytes(pdf, "ok.pdf", limits=ParseLimits(max_pages=12, max_chars=10_000)).pages)
        == 12
    )


def test_long_text_is_refused_before_it_is_decoded():
    """The probe's 50 MB text (12.2M tokens) in miniature: past the budget, refused without
    decoding the whole file."""
    data = b"All work and no play makes Jack a dull boy.\n" * 200_000  # 8.8 MB
    code, peak = _refused(data, "jack.txt", ParseLimits(max_chars=100_000))
    assert code == "too_much_text" and peak < 2 * MiB, peak


def test_budgets_come_from_settings():
    from kb.settings import Settings

    lim = ParseLimits.from_settings(
        Settings(
            max_inflated_mb=3, max_inflated_xml_mb=1, max_document_pages=7, max_document_tokens=100
        )
    )
    assert lim.max_inflated_bytes == 3 * MiB and lim.max_inflated_xml_bytes == MiB
    assert lim.max_pages == 7 and lim.max_chars == 100 * 12


@pytest.fixture
def make_kb(tmp_path, demo_model_dir):
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    made = []

    def make(**kw):
        kb = KnowledgeBase(
            Settings(home=tmp_path / f"home{len(made)}", models_dir=MODELS_DIR, **kw)
        )
        made.append(kb)
        return kb

    yield make
    for kb in made:
        kb.close()


def _doc(tmp_path, name: str, words: int):
    p = tmp_path / name
    p.write_text(
        f"{name}: " + " ".join(f"word{i % 97}" for i in range(words)) + "\n"
    )  # unique bytes
    return p


def test_token_limit_per_document(make_kb, tmp_path):
    kb = make_kb(max_document_tokens=200)
    kb.create_corpus("c")
    (r,) = kb.ingest(
        "c", [_doc(tmp_path, "long.txt", 300)]
    )  # ~2100 characters: tokenized, then refused
    assert (
        r.status == "failed" and r.code == "too_many_tokens" and "KB_MAX_DOCUMENT_TOKENS" in r.error
    )
    (ok,) = kb.ingest("c", [_doc(tmp_path, "short.txt", 20)])
    assert ok.status == "ready"


def test_corpus_and_user_quotas(make_kb, tmp_path):
    from kb.auth import create_user

    kb = make_kb(corpus_token_quota=800, user_token_quota=1100)
    ann = create_user(kb.db, "ann", "pw-ann-1234")
    kb.create_corpus("a1", owner=ann.id, visibility="private")
    kb.create_corpus("a2", owner=ann.id, visibility="private")
    first = kb.ingest("a1", [_doc(tmp_path, "one.txt", 150)])[0]
    assert first.status == "ready" and first.tokens > 300, first
    second = kb.ingest("a1", [_doc(tmp_path, "two.txt", 150)])[0]  # past a1's 800 tokens
    assert second.status == "failed" and second.code == "corpus_quota", second
    third = kb.ingest("a2", [_doc(tmp_path, "three.txt", 150)])[0]  # a2 has room
    assert third.status == "ready", third
    fourth = kb.ingest("a2", [_doc(tmp_path, "four.txt", 100)])[0]  # a2 has room, ann's 1100 do not
    assert fourth.status == "failed" and fourth.code == "user_quota", fourth
