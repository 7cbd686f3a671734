"""Ingestion tells the truth: what is happening (queued, parsing, prefilling k of n, verifying,
ready), percent from tokens prefilled, an ETA from measured throughput (checked against a clock
the test controls), pages and size per document, and unsupported files refused up front."""

from __future__ import annotations

import random

import httpx
import pytest

from kb.ingest.errors import IngestError
from kb.ingest.pipeline import StageUpdate, accepted_types, activity, refuse_unsupported
from kb.jobs.progress import ProgressWriter, Throughput
from tests.conftest import serve_in_thread
from tests.jobs_helpers import make_settings, paragraphs
from tests.test_parse import make_pdf

PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _document_row(tmp_path):
    from storage.db import Database
    from storage.models import Corpus, Document

    db = Database(f"sqlite:///{tmp_path / 'kb.sqlite3'}")
    with db.session() as s:
        c = Corpus(name="c", model="m", status="building", settings={})
        s.add(c)
        s.flush()
        d = Document(
            corpus_id=c.id, filename="spec.pdf", content_hash="x", size_bytes=1, stage="stored"
        )
        s.add(d)
        s.flush()
        return db, d.id


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eta_is_within_a_quarter_of_the_truth_once_a_tenth_is_done(tmp_path, seed):
    """Segments of very different lengths, prefilled in batches whose segments all land at
    once (as prefill_segments yields them), at a steady cost per token with +-10% noise."""
    from storage.models import Document

    rng = random.Random(seed)
    db, doc_id = _document_row(tmp_path)
    clock = FakeClock()
    writer = ProgressWriter(db, None, "c", "job", min_interval_s=0.0, clock=clock)
    sizes = [rng.choice([40, 120, 512, 512, 512]) for _ in range(60)]
    total, s_per_token = sum(sizes), 0.004
    batches, batch = [], []
    for i in range(
        len(sizes)
    ):  # batches of about 2048 tokens, as KB_PREFILL_BATCH_TOKENS cuts them
        batch.append(i)
        if sum(sizes[j] for j in batch) >= 2048:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    cost = [sum(sizes[j] for j in b) * s_per_token * rng.uniform(0.9, 1.1) for b in batches]

    writer(StageUpdate(doc_id, "spec.pdf", "prefilled", 0, len(sizes), 0, total))
    done_segs = done_tokens = 0
    checked = 0
    for k, b in enumerate(batches):
        clock.t += cost[k]
        for j in b:
            done_segs += 1
            done_tokens += sizes[j]
            writer(
                StageUpdate(
                    doc_id, "spec.pdf", "prefilled", done_segs, len(sizes), done_tokens, total
                )
            )
        truth = sum(cost[k + 1 :])
        with db.session() as s:
            eta = s.get(Document, doc_id).eta_s
        if done_tokens >= 0.1 * total and truth > 0:
            assert eta is not None and abs(eta - truth) <= 0.25 * truth, (k, eta, truth)
            checked += 1
    assert checked >= len(batches) - 3
    writer(StageUpdate(doc_id, "spec.pdf", "ready", len(sizes), len(sizes), total, total))
    with db.session() as s:
        doc = s.get(Document, doc_id)
        assert (
            doc.stage == "ready" and doc.percent == 100.0 and doc.eta_s is None
        )  # no "ETA 0 s" on ready rows
    db.close()


def test_throughput_gives_no_eta_before_work_is_seen():
    clock = FakeClock()
    t = Throughput(clock)
    assert t.eta_s() is None
    t.observe(0, 100)
    clock.t += 5
    t.observe(0, 100)
    assert t.eta_s() is None  # nothing done yet: no rate, no guess
    clock.t += 5
    t.observe(25, 100)
    assert t.eta_s() == pytest.approx(30.0)


def test_activity_says_what_is_happening():
    assert activity("stored", status="queued") == "queued"
    assert activity("stored", status="running") == "parsing"
    assert activity("tokenized", 0, 12) == "prefilling 0 of 12"
    assert activity("prefilled", 5, 12) == "prefilling 5 of 12"
    assert activity("prefilled", 12, 12) == "verifying"
    assert activity("ready") == "ready" and activity("failed") == "failed"
    u = StageUpdate(1, "a.txt", "prefilled", 3, 4, 300, 1000)
    assert u.percent == pytest.approx(5.0 + 94.0 * 0.3)  # by tokens, not by segments (3 of 4)


def test_unsupported_types_are_refused_with_the_accepted_types_named():
    allowed = "pdf,docx,html,markdown,text"
    assert refuse_unsupported("notes.md", b"# hi", allowed) == "markdown"
    with pytest.raises(IngestError) as e:
        refuse_unsupported("photo.png", PNG, allowed)
    assert e.value.code == "unsupported_type"
    assert "accepted: PDF (.pdf), Word (.docx), HTML (.html, .htm), Markdown (.md)" in str(e.value)
    with pytest.raises(
        IngestError, match="spec.pdf: pdf files are not accepted here; accepted: text"
    ):
        refuse_unsupported("spec.pdf", b"%PDF-1.4 ...", "text")
    with pytest.raises(IngestError) as e:
        refuse_unsupported("program.txt", bytes(range(256)) * 8, allowed)
    assert e.value.code == "binary_file" and "Accepted: PDF (.pdf)" in str(e.value)
    assert accepted_types("pdf,text") == "PDF (.pdf), text (.txt and other plain text)"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, demo_model_dir):
    """A knowledge base with a two-page PDF and a text file ingested, and the hook's updates."""
    from kb.service import KnowledgeBase

    root = tmp_path_factory.mktemp("progress")
    kb = KnowledgeBase(make_settings(root / "home"))
    kb.create_corpus("docs")
    pdf = root / "spec.pdf"
    pdf.write_bytes(make_pdf([[paragraphs("ferry", 3)], [paragraphs("orchard", 3)]]))
    txt = root / "notes.txt"
    txt.write_text(paragraphs("harbour", 8))
    corpus_id = kb.ingestor.corpus_id("docs")
    updates: dict[str, list[StageUpdate]] = {}
    for path in (pdf, txt):
        stored = kb.ingestor.store(corpus_id, path)
        kb.ingestor.build(
            stored.document_id, hook=lambda u, n=path.name: updates.setdefault(n, []).append(u)
        )
    kb.ingestor.refresh_status(corpus_id)
    yield kb, {"spec.pdf": pdf, "notes.txt": txt}, updates
    kb.close()


def test_a_build_reports_stages_and_tokens(ingested):
    kb, paths, updates = ingested
    for name, seen in updates.items():
        stages = [u.stage for u in seen]
        assert stages[:3] == ["stored", "parsed", "tokenized"] and stages[-1] == "ready", stages
        assert "indexed" not in stages  # nothing is indexed: no stage says so
        prefill = [u for u in seen if u.stage == "prefilled"]
        assert (
            prefill[0].tokens_done == 0 and prefill[-1].tokens_done == prefill[-1].tokens_total > 0
        )
        assert [u.tokens_done for u in prefill] == sorted(u.tokens_done for u in prefill)
        assert [u.percent for u in seen] == sorted(u.percent for u in seen) and seen[
            -1
        ].percent == 100.0
        assert seen[0].activity == "parsing" and prefill[0].activity.startswith("prefilling 0 of ")
        assert prefill[-1].activity == "verifying" and seen[-1].activity == "ready"
        assert all(u.size_bytes == paths[name].stat().st_size for u in seen)
        docs = {d["filename"]: d for d in kb.documents("docs")}
        assert prefill[-1].tokens_total == docs[name]["tokens"]


def test_pages_and_sizes_per_document(ingested):
    kb, paths, _ = ingested
    docs = {d["filename"]: d for d in kb.documents("docs")}
    facts = kb.ingestor.document_facts([d["id"] for d in docs.values()])
    assert facts[docs["spec.pdf"]["id"]] == {
        "pages": 2,
        "size_bytes": paths["spec.pdf"].stat().st_size,
    }
    assert facts[docs["notes.txt"]["id"]]["pages"] is None
    assert facts[docs["notes.txt"]["id"]]["size_bytes"] == paths["notes.txt"].stat().st_size


def test_refused_before_store_in_the_pipeline_the_cli_and_the_api(
    ingested, tmp_path, capsys, monkeypatch
):
    from kb.cli import main

    kb, _, _ = ingested
    png = tmp_path / "photo.png"
    png.write_bytes(PNG)
    before = len(kb.documents("docs"))
    sub = kb.jobs.submit("docs", [png], start_worker=False)[0]
    assert (
        sub.status == "failed" and sub.code == "unsupported_type" and "accepted: PDF" in sub.error
    )
    assert len(kb.documents("docs")) == before  # not counted as a document

    monkeypatch.setenv("KB_HOME", str(kb.settings.resolved_home))
    monkeypatch.setenv("KB_MODELS_DIR", str(kb.settings.resolved_models_dir))
    assert main(["ingest", "docs", str(png)]) == 1
    err = capsys.readouterr().err
    assert (
        "photo.png: refused: photo.png is not a kind of file kb reads; accepted: PDF (.pdf)" in err
    )

    from kb.server import create_app

    with (
        serve_in_thread(create_app(kb, warm=False, ui=False)) as url,
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        r = c.post("/v1/corpora/docs/documents", files=[("files", ("photo.png", PNG, "image/png"))])
        assert r.status_code == 415 and "Markdown (.md)" in r.json()["accepted_types"], r.text
        assert r.json()["documents"][0]["code"] == "unsupported_type"
        listed = {d["filename"]: d for d in c.get("/v1/corpora/docs/documents").json()}
        assert listed["spec.pdf"]["pages"] == 2 and listed["spec.pdf"]["size_bytes"] > 0
        assert len(listed) == before
