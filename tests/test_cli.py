"""The vertical slice through the `kb` command: corpora, ingestion, answers with citations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import FACT_ANSWER, FACT_QUESTION, planted_text


def kb(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "kb.cli", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_planted_fact_through_the_cli(kb_env, tmp_path):
    doc = tmp_path / "handbook.txt"
    doc.write_text(planted_text())
    assert "created corpus handbook" in kb("corpus", "create", "handbook").stdout
    out = kb("ingest", "handbook", str(doc)).stdout
    assert "handbook.txt: ready" in out
    listed = json.loads(kb("corpus", "list", "--json").stdout)
    assert (
        listed[0]["name"] == "handbook"
        and listed[0]["status"] == "ready"
        and listed[0]["tokens"] > 1000
    )
    answer = json.loads(kb("ask", "handbook", FACT_QUESTION, "--json", "--max-tokens", "24").stdout)
    assert FACT_ANSWER in answer["answer"]
    assert answer["usage"]["completion_tokens"] > 0
    assert any("Velmora" in c["text"] for c in answer["citations"]), answer["citations"]
    streamed = kb("ask", "handbook", FACT_QUESTION, "--max-tokens", "24").stdout
    assert FACT_ANSWER in streamed
    kb("corpus", "delete", "handbook")
    assert "no corpora" in kb("corpus", "list").stdout
    assert not any((kb_env / "kv").iterdir())


def test_failures_exit_nonzero_with_one_line(kb_env, tmp_path):
    done = kb("ask", "nope", "hello?", check=False)
    assert done.returncode == 1 and done.stderr.strip().startswith(
        "kb: corpus 'nope' does not exist"
    )
    assert len(done.stderr.strip().splitlines()) == 1
    kb("corpus", "create", "c1")
    done = kb("corpus", "create", "c1", check=False)
    assert done.returncode == 1 and "already exists" in done.stderr
    done = kb("corpus", "create", "bad/name", check=False)
    assert done.returncode == 1 and "corpus name" in done.stderr
    good = tmp_path / "good.md"
    good.write_text("# Notes\n\nThe ferry leaves at nine.\n")
    done = kb("ingest", "c1", str(tmp_path / "missing.txt"), str(good), check=False)
    assert done.returncode == 1
    assert "missing.txt: failed: cannot read missing.txt" in done.stderr
    assert "good.md: ready" in done.stdout  # one bad file does not stop the others
    done = kb("ask", "c1", "   ", check=False)
    assert done.returncode == 1 and "empty" in done.stderr
    kb("corpus", "create", "c2")
    done = kb("ask", "c2", "anything?", check=False)
    assert done.returncode == 1 and "not ready" in done.stderr


def test_answers_reuse_the_stored_kv(handbook):
    """Asking runs only the question's tokens (and the answer's) through the model, twice over."""
    from kb.engine.sequence import SamplingParams

    engine = handbook.engine
    corpus_tokens = handbook.corpus_info("handbook").tokens
    for _ in range(2):
        before = engine.runner.forward_tokens
        out = handbook.answer("handbook", FACT_QUESTION, SamplingParams(max_tokens=24))
        assert FACT_ANSWER in out["answer"]
        ran = engine.runner.forward_tokens - before
        assert ran == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] - 1
        assert ran < corpus_tokens / 10
    assert len(handbook.cache.loaded) == 1  # loaded from disk once, then kept
