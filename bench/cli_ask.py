"""`kb ask` through a running server vs in this process: seconds to the first character of the
answer and to its end, on a corpus of about 24K tokens (the repository's docs/*.md).

    .venv/bin/python bench/cli_ask.py [--runs 3] [--out bench/results/cli_ask.json]

Each `kb ask` is a new process, as a user runs it: the server case pays the CLI's start, the
probe and the HTTP round trip; the local case loads the model and the corpus's KV first.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KB = [sys.executable, "-m", "kb.cli"]
QUESTIONS = [
    "How does a worker know that a job was cancelled?",
    "What does the cache tier cpu mean?",
    "Which metrics does the server export?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_ask(env: dict, question: str, *extra: str) -> dict:
    """Run `kb ask` once; seconds to its first byte of answer on stdout and to its exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [*KB, "ask", "bench", question, "--max-tokens", "32", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = p.stdout.read()
    err = p.stderr.read().decode()
    p.wait()
    assert p.returncode == 0 and first, err
    return {
        "first_char_s": round(t_first, 3),
        "total_s": round(time.perf_counter() - t0, 3),
        "chars": len(first + rest),
        "source": "server" if "the server at" in err else "local",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cli_ask.json"))
    args = ap.parse_args()
    models = os.environ.get("KB_MODELS_DIR") or str(Path.home() / ".cache" / "kb-moska" / "models")
    home = tempfile.mkdtemp(prefix="kb-bench-cli-")
    port = free_port()
    env = {
        **os.environ,
        "KB_HOME": home,
        "KB_MODELS_DIR": models,
        "KB_PORT": str(port),
        "KB_SERVER": "",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("KB_DATABASE_URL", None)
    env.pop("KB_REDIS_URL", None)
    subprocess.run([*KB, "corpus", "create", "bench"], env=env, check=True, capture_output=True)
    t0 = time.perf_counter()
    files = sorted(glob.glob(str(ROOT / "docs" / "*.md")))
    subprocess.run([*KB, "ingest", "bench", *files, "-q"], env=env, check=True, capture_output=True)
    ingest_s = time.perf_counter() - t0
    listed = json.loads(
        subprocess.run(
            [*KB, "corpus", "list", "--json"], env=env, check=True, capture_output=True, text=True
        ).stdout
    )
    tokens = listed[0]["tokens"]

    local = [timed_ask(env, QUESTIONS[0], "--local")]
    server = subprocess.Popen(
        [*KB, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (
                    "the server did not start"
                )
                time.sleep(0.5)
        warm = timed_ask(env, QUESTIONS[0])  # the server loads the model and the corpus's KV once
        runs = [timed_ask(env, QUESTIONS[i % len(QUESTIONS)]) for i in range(args.runs)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert all(r["source"] == "server" for r in runs) and local[0]["source"] == "local"
    out = {
        "bench": "cli_ask",
        "corpus_tokens": tokens,
        "documents": len(files),
        "ingest_s": round(ingest_s, 1),
        "max_tokens": 32,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "server_first_ask": warm,
        "server": runs,
        "local": local,
        "server_first_char_s_median": sorted(r["first_char_s"] for r in runs)[len(runs) // 2],
        "notes": "each ask is a new `kb ask` process; server: `kb serve` on the same machine, already "
        "holding the corpus after one warm-up ask; local: --local, loads model and KV itself",
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
