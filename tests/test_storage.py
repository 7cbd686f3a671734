"""Storage: the KV store's atomic, checksummed files, and the models on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from storage.db import Database
from storage.kvstore import KVCorruptError, read_kv, write_kv
from storage.models import Corpus, Document, Segment


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32]
)
def test_kv_roundtrip_and_checksum(tmp_path, dtype):
    k = torch.randn(3, 17, 2, 8).to(dtype)
    v = torch.randn(3, 17, 2, 8).to(dtype)
    stored = write_kv(tmp_path / "a" / "seg.safetensors", k, v)
    k2, v2 = read_kv(stored.path, stored.checksum)
    assert k2.dtype == dtype and torch.equal(k2.view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(v2.view(torch.uint8), v.view(torch.uint8))
    assert not [p for p in stored.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_or_missing_kv_is_detected(tmp_path):
    stored = write_kv(
        tmp_path / "seg.safetensors", torch.randn(1, 4, 1, 4), torch.randn(1, 4, 1, 4)
    )
    data = bytearray(stored.path.read_bytes())
    data[-3] ^= 0xFF
    stored.path.write_bytes(bytes(data))
    with pytest.raises(KVCorruptError, match="checksum"):
        read_kv(stored.path, stored.checksum)
    with pytest.raises(KVCorruptError, match="cannot be read"):
        read_kv(tmp_path / "gone.safetensors", stored.checksum)


@pytest.fixture
def db(db_url):
    database = Database(db_url)
    yield database
    database.close()


def test_models_roundtrip_and_cascade(db):
    with db.session() as s:
        c = Corpus(name="law", model="m", settings={"chunk_size": 64})
        d = Document(corpus=c, filename="a.pdf", content_hash="h1", media_type="pdf")
        d.segments.append(
            Segment(
                seq=0,
                char_start=0,
                char_end=10,
                num_tokens=3,
                text="abc",
                token_ids=[1, 2, 3],
                page_start=1,
                page_end=2,
            )
        )
        s.add(c)
    with db.session() as s:
        c = s.scalar(select(Corpus).where(Corpus.name == "law"))
        assert c.settings == {"chunk_size": 64}
        assert c.documents[0].segments[0].token_ids == [1, 2, 3]
        assert c.documents[0].segments[0].page_end == 2
        s.delete(c)
    with db.session() as s:
        assert s.scalar(select(Segment)) is None and s.scalar(select(Document)) is None


def test_duplicate_document_and_corpus_names_are_refused(db):
    with db.session() as s:
        c = Corpus(name="dup", model="m")
        s.add(Document(corpus=c, filename="a", content_hash="same"))
    with pytest.raises(IntegrityError):
        with db.session() as s:
            c = s.scalar(select(Corpus).where(Corpus.name == "dup"))
            s.add(Document(corpus=c, filename="b", content_hash="same"))
    with pytest.raises(IntegrityError):
        with db.session() as s:
            s.add(Corpus(name="dup", model="m"))
