"""SQLAlchemy 2.0 models: corpora, their documents and segments (the KV artifacts' metadata)."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Corpus(Base):
    """A named collection of documents sharing one model and one stored shared KV."""

    __tablename__ = "corpora"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    model: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), default="empty")  # empty|building|ready|stale|failed
    settings: Mapped[dict] = mapped_column(JSON, default=dict)  # segment_len, chunk_size, kv_dtype, ...
    cache_key: Mapped[str | None] = mapped_column(String(64))
    preamble_kv_file: Mapped[str | None] = mapped_column(String(512))
    preamble_checksum: Mapped[str | None] = mapped_column(String(64))
    preamble_len: Mapped[int] = mapped_column(Integer, default=0)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    documents: Mapped[list["Document"]] = relationship(
        back_populates="corpus", cascade="all, delete-orphan", order_by="Document.id")


class Document(Base):
    """One uploaded file; its stage tells how far ingestion got."""

    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("corpus_id", "content_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    corpus_id: Mapped[int] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    media_type: Mapped[str] = mapped_column(String(32), default="text")
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    file_path: Mapped[str | None] = mapped_column(String(1024))
    stage: Mapped[str] = mapped_column(String(16), default="stored")  # stored|parsed|prefilled|ready|failed
    error: Mapped[str | None] = mapped_column(Text)
    num_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    corpus: Mapped[Corpus] = relationship(back_populates="documents")
    segments: Mapped[list["Segment"]] = relationship(
        back_populates="document", cascade="all, delete-orphan", order_by="Segment.seq")


class Segment(Base):
    """A run of at most segment_len tokens of one document, prefilled on its own from position 0."""

    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("document_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)
    page_start: Mapped[int | None] = mapped_column(Integer)
    page_end: Mapped[int | None] = mapped_column(Integer)
    num_tokens: Mapped[int] = mapped_column(Integer)
    pos_start: Mapped[int] = mapped_column(Integer, default=0)  # RoPE position of its first token
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list] = mapped_column(JSON)
    kv_file: Mapped[str | None] = mapped_column(String(512))
    kv_checksum: Mapped[str | None] = mapped_column(String(64))
    cache_key: Mapped[str | None] = mapped_column(String(64))

    document: Mapped[Document] = relationship(back_populates="segments")
