"""The corpus builder: a document's bytes parsed and cut into segments, the segments placed after
the corpus preamble, and prefilled under the configured position-independence scheme.

The ingest pipeline runs it per stored document (recording each segment as it is stored), the
torchrun launcher (kb/cli/distributed.py) over its text files in memory, and the quality
harness (bench/quality.py) through the service: one way to turn text into a corpus's KV.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kb.ingest.document import ParsedDocument
from kb.ingest.parse import ParseLimits, parse_bytes
from kb.ingest.precompute import prefill_segments
from kb.ingest.segment import SegmentPlan, cut_segments
from kb.model.llama import Transformer
from kb.settings import Settings


def parse_document(data: bytes, filename: str, settings: Settings) -> ParsedDocument:
    """One document's text and page map, parsed under the settings' upload limits and types."""
    allowed = frozenset(t.strip() for t in settings.allowed_types.split(",") if t.strip())
    return parse_bytes(
        data,
        filename,
        max_bytes=int(settings.max_upload_mb * 2**20),
        allowed_types=allowed,
        limits=ParseLimits.from_settings(settings),
    )


def document_segments(
    data: bytes, filename: str, tokenizer: object, settings: Settings
) -> list[SegmentPlan]:
    """One document cut into segments of at most `settings.segment_len` tokens."""
    return cut_segments(parse_document(data, filename, settings), tokenizer, settings.segment_len)


def position_limit(max_position_embeddings: int) -> int:
    """Shared positions end here, leaving room for the unique part (question and answer)."""
    return max_position_embeddings - min(2048, max_position_embeddings // 4)


def place_segments(lengths: list[int], next_pos: int, preamble_len: int, limit: int) -> list[int]:
    """Each segment's first position: segments follow each other like one document while the
    model's context allows (`limit`); past it they wrap to the start, after the preamble
    (position-independent segments overlap)."""
    starts = []
    for n in lengths:
        next_pos = preamble_len if next_pos + n > limit else next_pos
        starts.append(next_pos)
        next_pos += n
    return starts


def prefill_corpus(
    model: Transformer,
    preamble: list[int],
    segments: list[list[int]],
    starts: list[int],
    settings: Settings,
    links: list[list[int]] | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(index, k, v) per segment, prefilled after the preamble under the settings' `pic` scheme;
    `links` (per segment, the tokens it follows) for a resumed "linked" build."""
    scheme = (
        {}
        if settings.pic == "shared"
        else dict(pic=settings.pic, link_tokens=settings.pic_link_tokens, links=links)
    )
    return prefill_segments(
        model,
        preamble,
        segments,
        settings.prefill_batch_tokens,
        settings.device,
        starts=starts,
        **scheme,
    )
