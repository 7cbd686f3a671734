"""What the web app's Corpora table and source viewer read from the service, on stored rows and
files with no model: kb/document_rows.py (activity in words, percent, ETA, pages, size),
kb/sources.py (a cited passage located in its page, a PDF page drawn) and kb/file_types.py."""

from __future__ import annotations

import pytest

from kb.auth import ANONYMOUS, create_user
from kb.document_rows import document_rows
from kb.errors import NotFound
from kb.file_types import accepted_names, accepted_suffixes
from kb.service import KnowledgeBase
from kb.settings import Settings
from kb.sources import page_image, source_page
from storage.models import Corpus, Document, Segment
from tests.test_parse import make_pdf

PAGES = [
    ["Brannock Point is a cape on the northern coast.", "Boats shelter in its bay."],
    ["The lighthouse of Brannock Point was built in 1873.", "Ida Morrow kept it."],
]


@pytest.fixture
def kb(tmp_path):
    k = KnowledgeBase(Settings(home=tmp_path / "home", auth="off"))
    yield k
    k.close()


def _document(kb, corpus: str, name: str, path, media_type: str, stage: str, **kw) -> int:
    with kb.db.session() as s:
        c = s.query(Corpus).filter_by(name=corpus).one()
        d = Document(
            corpus_id=c.id,
            filename=name,
            media_type=media_type,
            content_hash=name,
            size_bytes=path.stat().st_size,
            file_path=str(path),
            stage=stage,
            **kw,
        )
        s.add(d)
        s.flush()
        return d.id


def _segments(kb, doc_id: int, stored: list[bool], pages: list[int | None]) -> None:
    with kb.db.session() as s:
        for i, (kv, page) in enumerate(zip(stored, pages)):
            s.add(
                Segment(
                    document_id=doc_id,
                    seq=i,
                    char_start=0,
                    char_end=1,
                    page_start=page,
                    page_end=page,
                    num_tokens=10,
                    text="x",
                    token_ids=[1],
                    kv_file=f"kv-{i}" if kv else None,
                )
            )


def test_document_rows_say_what_is_happening(kb, tmp_path):
    kb.create_corpus("c")
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(make_pdf(PAGES))
    txt = tmp_path / "b.txt"
    txt.write_text("hello")
    ready = _document(kb, "c", "a.pdf", pdf, "pdf", "ready", percent=100.0, num_tokens=20)
    _segments(kb, ready, [True, True], [1, 2])
    waiting = _document(kb, "c", "b.txt", txt, "text", "stored")
    from datetime import UTC, datetime

    busy = _document(
        kb, "c", "c.txt", txt, "text", "prefilled", percent=52.0, eta_s=12.5,
        heartbeat_at=datetime.now(UTC),
    )  # fmt: skip
    _segments(kb, busy, [True, False], [None, None])
    rows = {r.id: r for r in document_rows(kb.db, ANONYMOUS, "c")}
    assert (rows[ready].activity, rows[ready].percent, rows[ready].eta_s) == ("ready", 100.0, None)
    assert rows[ready].pages == 2 and rows[ready].size_bytes == pdf.stat().st_size
    assert rows[waiting].activity == "queued" and rows[waiting].pages is None
    assert rows[busy].activity == "prefilling 1 of 2" and rows[busy].eta_s == 12.5
    assert rows[busy].percent == 52.0


def test_document_rows_of_a_corpus_the_caller_may_not_read(kb):
    ann = create_user(kb.db, "ann", "pw-ann-123")
    kb.create_corpus("mine", owner=ann.id, visibility="private")
    with pytest.raises(NotFound):
        document_rows(kb.db, ANONYMOUS, "mine")


def test_source_page_of_a_pdf_finds_the_passage_on_its_page(kb, tmp_path):
    kb.create_corpus("c")
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(make_pdf(PAGES))
    did = _document(kb, "c", "a.pdf", pdf, "pdf", "ready")
    passage = "The lighthouse of Brannock Point was built in 1873."
    # the citation says page 1 (its segment's first page): the passage is found on page 2
    page = source_page(kb.db, kb.settings, ANONYMOUS, "c", did, 1, passage)
    assert (page.document, page.page, page.pages) == ("a.pdf", 2, 2)
    a, b = page.highlight
    assert page.text[a:b] == passage
    png = page_image(kb.db, ANONYMOUS, "c", did, 2)
    assert png is not None and png.startswith(b"\x89PNG")
    assert page_image(kb.db, ANONYMOUS, "c", did, 3) is None  # no such page


def test_source_page_of_text_shows_a_window_around_the_passage(kb, tmp_path):
    kb.create_corpus("c")
    txt = tmp_path / "long.txt"
    txt.write_text("filler line.\n" * 2000 + "The vault code is 5521.\n" + "more.\n" * 2000)
    did = _document(kb, "c", "long.txt", txt, "text", "ready")
    page = source_page(kb.db, kb.settings, ANONYMOUS, "c", did, None, "The vault code is 5521.")
    assert page.page is None and page.clipped_before and page.clipped_after
    a, b = page.highlight
    assert page.text[a:b] == "The vault code is 5521."
    gone = source_page(kb.db, kb.settings, ANONYMOUS, "c", did, None, "not in the file")
    assert gone.highlight is None
    txt.unlink()
    with pytest.raises(NotFound):
        source_page(kb.db, kb.settings, ANONYMOUS, "c", did, None, "x")


def test_accepted_file_types_are_named():
    assert ".pdf" in accepted_suffixes("pdf,text") and ".txt" in accepted_suffixes("pdf,text")
    assert ".docx" not in accepted_suffixes("pdf,text")
    assert accepted_names("pdf,docx") == "PDF (.pdf), Word (.docx)"
