"""A corpus's documents as the web app's table shows them: what is happening to each in words
(queued, parsing, prefilling k of n, verifying, ready, failed), percent from the work done, the
ETA measured by the ingest job (none once ready), pages, size and tokens."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select

from kb.auth import Principal, check_read
from kb.errors import NotFound
from kb.ingest.pipeline import activity
from storage.db import Database
from storage.models import Corpus, Document, Segment


@dataclass
class DocumentRow:
    """One document's row: its id, name, activity in words, percent, ETA, pages, size, error."""

    id: int
    filename: str
    activity: str
    percent: float
    eta_s: float | None
    pages: int | None
    size_bytes: int
    tokens: int
    error: str | None


def document_rows(db: Database, user: Principal, corpus: str) -> list[DocumentRow]:
    """Each document of `corpus` (which `user` may read), oldest first."""
    with db.session() as s:
        c = s.scalar(select(Corpus).where(Corpus.name == corpus))
        if c is None:
            raise NotFound(f"corpus {corpus!r} does not exist")
        check_read(s, user, c)
        counts = {
            did: (int(total), int(done), pages)
            for did, total, done, pages in s.execute(
                select(
                    Segment.document_id,
                    func.count(Segment.id),
                    func.sum(case((Segment.kv_file.is_not(None), 1), else_=0)),
                    func.max(Segment.page_end),
                )
                .join(Document)
                .where(Document.corpus_id == c.id)
                .group_by(Segment.document_id)
            ).all()
        }
        rows = []
        for d in s.scalars(
            select(Document).where(Document.corpus_id == c.id).order_by(Document.id)
        ):
            total, done, pages = counts.get(d.id, (0, 0, None))
            # a stored file no worker has touched yet waits in the queue
            queued = d.stage == "stored" and d.heartbeat_at is None
            words = activity(d.stage, done, total, "queued" if queued else None)
            ready = d.stage == "ready"
            rows.append(
                DocumentRow(
                    d.id,
                    d.filename,
                    words,
                    100.0 if ready else round(d.percent or 0.0, 1),
                    None if ready or d.stage == "failed" else d.eta_s,
                    pages,
                    d.size_bytes or 0,
                    d.num_tokens or 0,
                    d.error,
                )
            )
        return rows
