"""A corpus's cache key: what its stored KV depends on (the model's hashes, the KV dtype, the
segment and chunk sizes, the preamble's tokens, the prefill scheme). The ingestor records it on
what it builds; the service and the corpus cache compare it to tell a stale corpus."""

from __future__ import annotations

import hashlib
from typing import Protocol

from kb.settings import Settings


class ModelHashes(Protocol):
    """What the key needs of a model: a loaded one or only its identity (`ModelIdentity`)."""

    weights_hash: str
    tokenizer_hash: str

    def preamble_tokens(self, system_prompt: str) -> list[int]: ...


def corpus_settings(settings: Settings, model: ModelHashes) -> dict:
    """The settings a corpus built now records (Corpus.settings) and is keyed by."""
    preamble = model.preamble_tokens(settings.system_prompt)
    cfg = {
        "weights": model.weights_hash,
        "tokenizer": model.tokenizer_hash,
        "kv_dtype": settings.kv_dtype,
        "segment_len": settings.segment_len,
        "chunk_size": settings.chunk_size,
        "preamble": preamble,
    }
    if (
        settings.pic != "shared"
    ):  # the default scheme leaves the keys of existing corpora as they were
        cfg["pic"], cfg["link_tokens"] = settings.pic, settings.pic_link_tokens
    return cfg


def _digest(obj: object) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:32]


def corpus_key(cfg: dict) -> str:
    """The key of a corpus (and its preamble's KV) built with `cfg`."""
    return _digest(cfg)


def segment_key(cfg: dict, pos_start: int, tokens: list[int], link: list[int]) -> str:
    """What a segment's stored KV depends on: the corpus settings, its position, its tokens and,
    when linked, the tokens it was prefilled after."""
    return _digest((cfg, pos_start, tokens, link) if link else (cfg, pos_start, tokens))


def settings_key(settings: Settings, model: ModelHashes) -> str:
    """The cache key a corpus built now gets: a corpus whose stored key differs is stale."""
    return corpus_key(corpus_settings(settings, model))
