"""Helpers shared by the job tests: settings for a small, fast ingestion and Redis set-up."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis

from tests.conftest import MODELS_DIR

REDIS_URL = os.environ.get("KB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# small segments, one per prefill batch: many quick steps between which a job can stop or die
SMALL = {"segment_len": 64, "prefill_batch_tokens": 64}


def redis_or_skip() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} unreachable: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} unreachable: {exc}")


def new_prefix() -> str:
    return f"kbtest:{uuid.uuid4().hex[:12]}:"


def delete_prefix(prefix: str) -> int:
    """Delete every key under `prefix`: what a restart of this (diskless) Redis does to them."""
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    n = client.delete(*keys) if keys else 0
    client.close()
    return n


def paragraphs(topic: str, n: int) -> str:
    """Distinct prose of about 40 tokens a paragraph, so each document cuts into several segments."""
    return "\n\n".join(
        f"Note {i} on {topic}: the {topic} ledger for week {i} records {i * 7 + 3} crates "
        f"shipped from the northern depot, checked twice by the night clerk."
        for i in range(n)
    )


def make_settings(home: Path, **over):
    from kb.settings import Settings

    return Settings(home=home, models_dir=MODELS_DIR, **{**SMALL, **over})
