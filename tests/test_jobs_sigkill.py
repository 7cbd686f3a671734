"""SIGKILL a `kb worker` in the middle of a multi-document ingestion on real Redis, start
another: the corpus completes, the killed document resumes from its stored segments, and every
segment's KV checksum equals a clean run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MODELS_DIR
from tests.jobs_helpers import (
    REDIS_URL,
    SMALL,
    delete_prefix,
    make_settings,
    new_prefix,
    paragraphs,
    redis_or_skip,
)

pytestmark = pytest.mark.redis

TOPICS = ("harbour", "orchard", "quarry")


def write_docs(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in TOPICS:
        p = root / f"{t}.md"
        p.write_text(f"# {t.title()}\n\n" + paragraphs(t, 10))
        paths.append(p)
    return paths


def checksums(kb) -> dict[tuple[str, int], str]:
    from sqlalchemy import select

    from storage.models import Document, Segment

    with kb.db.session() as s:
        rows = s.execute(
            select(Document.filename, Segment.seq, Segment.kv_checksum).join(Segment)
        ).all()
    return {(f, seq): c for f, seq, c in rows}


def stored_files(kb) -> dict[int, tuple[int, int]]:
    """Segment id -> (inode, mtime) of its KV file, for the segments stored so far."""
    from sqlalchemy import select

    from storage.models import Segment

    with kb.db.session() as s:
        rows = s.execute(
            select(Segment.id, Segment.kv_file).where(Segment.kv_file.is_not(None))
        ).all()
    out = {}
    for sid, path in rows:
        st = os.stat(path)
        out[sid] = (st.st_ino, st.st_mtime_ns)
    return out


def start_worker(home: Path, prefix: str, name: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "KB_HOME": str(home),
        "KB_MODELS_DIR": str(MODELS_DIR),
        "KB_REDIS_URL": REDIS_URL,
        "KB_REDIS_PREFIX": prefix,
        "KB_SEGMENT_LEN": str(SMALL["segment_len"]),
        "KB_PREFILL_BATCH_TOKENS": str(SMALL["prefill_batch_tokens"]),
    }
    for var in ("KB_DATABASE_URL", "KB_MODEL", "KB_DEVICE", "KB_CONFIG"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "kb.cli",
        "worker",
        "--name",
        name,
        "--heartbeat-s",
        "0.3",
        "--stale-s",
        "2",
        "--backoff-s",
        "0.2",
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_sigkill_mid_ingestion_resumes_to_a_clean_runs_checksums(tmp_path):
    from sqlalchemy import func, select

    from kb.jobs import JobService
    from kb.service import KnowledgeBase
    from storage.models import Segment

    redis_or_skip()
    docs = write_docs(tmp_path / "docs")

    # the clean run: same settings, one in-process worker
    clean = KnowledgeBase(make_settings(tmp_path / "clean"))
    clean_jobs = JobService(clean)
    clean.create_corpus("c")
    subs = clean_jobs.submit("c", docs)
    assert all(i.status == "done" for i in clean_jobs.wait([s.job_id for s in subs], timeout_s=300))
    expected = checksums(clean)
    clean_jobs.close()
    clean.close()
    total = len(expected)
    assert total >= 4 * len(TOPICS) and all(expected.values())

    prefix = new_prefix()
    home = tmp_path / "crash"
    kb = KnowledgeBase(make_settings(home, redis_url=REDIS_URL, redis_prefix=prefix))
    jobs = JobService(kb)
    first = second = None
    try:
        kb.create_corpus("c")
        subs = jobs.submit("c", docs)
        ids = [s.job_id for s in subs]
        first = start_worker(home, prefix, "first")
        stored = 0
        deadline = time.monotonic() + 240
        while stored < total // 2:  # kill it halfway: the first document done, the second half done
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first worker made no progress"
            time.sleep(0.02)
            with kb.db.session() as s:
                stored = s.scalar(
                    select(func.count(Segment.id)).where(Segment.kv_file.is_not(None))
                )
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = stored_files(kb)
        states = {i.id: i for i in (jobs.queue.get(j) for j in ids)}
        killed = [i for i in states.values() if i.status == "running"]
        assert len(killed) == 1 and 0 < killed[0].segments_done < killed[0].segments_total, states
        assert any(i.status == "queued" for i in states.values())  # documents not started yet

        second = start_worker(home, prefix, "second")
        infos = {i.id: i for i in jobs.wait(ids, timeout_s=240)}
        assert all(i.status == "done" and i.stage == "ready" for i in infos.values()), infos
        assert infos[killed[0].id].attempts == 2  # taken over by the second worker
        assert kb.corpus_info("c").status == "ready"
        assert checksums(kb) == expected
        after = stored_files(kb)
        # segments stored before the kill were kept, not recomputed
        assert all(after[sid] == stat for sid, stat in before.items())
        assert jobs.broker.dead_letters("ingest") == []
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        jobs.close()
        kb.close()
        delete_prefix(prefix)
