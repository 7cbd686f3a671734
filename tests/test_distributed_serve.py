"""`kb serve --shared-ranks S` (issue 21): the service itself on a job of S + 1 processes over
gloo, rank 0 serving the API and the web app, ranks 1..S holding the stored corpora's shared KV.

Each job is the real entry (`python -m kb.cli serve --shared-ranks S`): in the two-process test
once per rank with the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as
torchrun starts it; in the three-process test started once, as on one host, starting its
shared ranks itself and starting again the one the fault test kills (torchrun's own agent would
tear the whole job down instead). The reference is the one-process service over the same stored
corpus (the module's `handbook`), answering first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from tests.conftest import FACT_ANSWER, FACT_QUESTION, MODELS_DIR, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
MODEL = "kb:handbook"
ASK = [{"role": "user", "content": FACT_QUESTION}]
LONG = [{"role": "user", "content": "Write a long essay about every module described above."}]
TIMEOUT_S = 10  # the job's KB_SHARED_RANK_TIMEOUT_S: a dead rank surfaces within it
ROUTED = 0.5  # KB_DENSITY of the routed job
START_S = 120  # rank 0 imports the web app and loads the demo model on a loaded 2-core box
RESTART_S = 30  # KB_SHARED_RANK_RESTART_S of the killed-rank job: rank 2 is away meanwhile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    url: str
    procs: list[subprocess.Popen]
    logs: list[Path]
    children: dict[int, int] = field(default_factory=dict)  # rank -> pid, started by rank 0

    def tails(self) -> str:
        return "\n".join(f"== rank {r}\n{p.read_text()[-3000:]}" for r, p in enumerate(self.logs))


def _children(pid: int) -> dict[int, int]:
    """The shared ranks a rank 0 started: rank -> pid (from each child's RANK). Every thread's
    children: a restarted rank is the supervisor thread's child."""
    out, kids = {}, []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += (task / "children").read_text().split()
        except FileNotFoundError:
            continue
    for c in kids:
        try:
            env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        ranks = [e[len(b"RANK=") :] for e in env if e.startswith(b"RANK=")]
        if ranks and _alive(int(c)):
            out[int(ranks[0])] = int(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@contextmanager
def serve_job(
    home: Path, world: int, tmp: Path, spawn: bool = False, env: dict | None = None
) -> Iterator[Job]:
    """`kb serve --shared-ranks world-1` on `world` processes over the stored `home` (`spawn`:
    one command that starts the shared ranks); every process is killed on the way out."""
    port, master = _free_port(), _free_port()
    extra, env = env or {}, {k: v for k, v in os.environ.items() if not k.startswith("KB_")}
    env.update(
        **extra,
        KB_HOME=str(home),
        KB_MODELS_DIR=str(MODELS_DIR),
        KB_UNIQUE_KV_TOKENS="8192",
        KB_SHARED_RANK_TIMEOUT_S=str(TIMEOUT_S),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master),
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "kb.cli", "serve", "--shared-ranks", str(world - 1)]
    cmd += ["--port", str(port)]
    logs = [tmp / f"rank{r}.log" for r in range(1 if spawn else world)]
    procs = []
    if spawn:  # no RANK: the process is rank 0 and starts the others
        env = {k: v for k, v in env.items() if k not in ("MASTER_PORT", "WORLD_SIZE")}
    for r in range(len(logs)):
        with open(logs[r], "w") as out:
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env if spawn else {**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    job = Job(f"http://127.0.0.1:{port}", procs, logs)
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert all(p.poll() is None for p in procs), f"a rank exited:\n{job.tails()}"
            assert time.monotonic() < deadline, f"the job did not start:\n{job.tails()}"
            try:
                if httpx.get(f"{job.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        if spawn:
            job.children = _children(procs[0].pid)
            assert len(job.children) == world - 1, job.tails()
        yield job
    finally:
        if spawn and procs[0].poll() is None:  # restarted ranks included
            job.children.update(_children(procs[0].pid))
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
        for pid in job.children.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _chat(url: str, messages: list[dict], max_tokens: int = 24) -> dict:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _answers(url: str, stream: bool = True) -> dict:
    """What the comparison reads: greedy text, token counts and citations over HTTP, and the
    openai client's answer, whole and (with `stream`) streamed."""
    body = _chat(url, ASK)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, temperature=0)
    got = {
        "http": body["choices"][0]["message"]["content"],
        "usage": body["usage"],
        "citations": [(c["document"], c["page"], c["text"], c["score"]) for c in body["citations"]],
        "openai": whole.choices[0].message.content,
    }
    if stream:
        events = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=24, temperature=0, stream=True
        )
        got["stream"] = "".join(c.choices[0].delta.content or "" for c in events if c.choices)
    return got


def _same(got: dict, want: dict) -> bool:
    """The same answers and the same citations (document, page, passage), their scores
    (rounded to 4 places) within a rounding step: the sharded mass is within float32
    summation order and 16-bit partials of one process's."""
    a, b = dict(got), dict(want)
    cited, wanted = a.pop("citations"), b.pop("citations")
    return (
        a == b
        and [c[:3] for c in cited] == [c[:3] for c in wanted]
        and all(abs(x[3] - y[3]) <= 2e-4 for x, y in zip(cited, wanted))
    )


@pytest.fixture(scope="module")
def reference(handbook) -> dict:
    """The one-process service's answers over the stored handbook corpus: dense (its 1,817
    tokens are within the model's positions: no passage selection) and at density 0.5 (routed:
    every query attends half the chunks its router picks)."""
    from kb.server import create_app

    with serve_in_thread(create_app(handbook, warm=False, ui=False)) as url:
        dense = _answers(url)
        handbook.settings.density = ROUTED
        try:
            routed = _answers(url)
        finally:
            handbook.settings.density = 1.0
    assert FACT_ANSWER in dense["http"], dense
    for want in (dense, routed):  # what the sharded jobs' answers must cite too
        assert want["citations"] and want["citations"][0][0] == "handbook.txt", want
    for want in (dense, routed):
        assert want["openai"] == want["http"] == want["stream"]
    return {"dense": dense, "routed": routed}


def _cache_op(url: str, name: str, op: str) -> dict:
    """Run an admin cache operation and wait for its result."""
    r = httpx.post(f"{url}/v1/cache/{name}/{op}", timeout=60)
    assert r.status_code == 202, r.text
    for _ in range(600):
        ev = httpx.get(f"{url}/v1/cache/events/{r.json()['event_id']}", timeout=30).json()
        if ev["status"] in ("done", "failed"):
            assert ev["status"] == "done", ev
            return ev["result"]
        time.sleep(0.1)
    raise AssertionError(f"cache {op} of {name} did not finish: {ev}")


def _shards(url: str, name: str) -> list[dict]:
    rows = httpx.get(f"{url}/v1/cache", params={"name": name}, timeout=30).json()
    return rows[0]["shards"]


def test_admin_tab_says_what_each_shared_rank_holds():
    from kb.service import SharedRanks
    from ui.admin import shared_ranks_text

    per_rank = [
        {"rank": 1, "corpora": 1, "tokens": 896, "bytes": 41287680},
        {"rank": 2, "corpora": 1, "tokens": 921, "bytes": 42439680},
    ]
    ok = shared_ranks_text(SharedRanks(2, True, "shared ranks", None, per_rank))
    assert ok.startswith("**shared ranks** 2, answering")
    assert "**rank 1** 39.4 MiB (896 tokens, 1 corpora)" in ok and "**rank 2**" in ok
    lost = "shared rank 2 stopped responding during attention of layer 2 on corpus handbook@x"
    bad = shared_ranks_text(SharedRanks(2, False, "rank 0", lost, per_rank))
    assert "degraded, " + lost in bad and "served from rank 0" in bad
    assert shared_ranks_text(None) == ""


def test_two_processes_answer_as_one_and_take_new_documents(reference, handbook, tmp_path):
    routed = {"KB_DENSITY": str(ROUTED)}  # the router runs on rank 0, its chunk ids travel
    with serve_job(handbook.settings.resolved_home, 2, tmp_path, env=routed) as job:
        got = _answers(job.url)
        assert _same(got, reference["routed"]), (got, reference["routed"], job.tails())
        health = httpx.get(f"{job.url}/healthz").json()
        assert health["status"] == "ok" and health["shared_ranks"]["healthy"]
        (shard,) = _shards(job.url, "handbook")  # rank 1 holds every chunk, rank 0 none
        tokens = httpx.get(f"{job.url}/v1/cache", params={"name": "handbook"}).json()[0]["tokens"]
        assert shard["rank"] == 1 and shard["tokens"] == tokens and shard["bytes"] > 0
        assert shard["loaded_from"] == "kv store"  # rank 1 read its slice from the files
        metrics = dict(
            line.rsplit(" ", 1)
            for line in httpx.get(f"{job.url}/metrics").text.splitlines()
            if line and not line.startswith("#")
        )
        assert float(metrics['kb_shared_rank_kv_bytes{rank="1"}']) == shard["bytes"]
        assert float(metrics["kb_shared_ranks_healthy"]) == 1.0
        assert httpx.get(f"{job.url}/", timeout=60).status_code == 200  # the web app

        # a corpus made and grown while serving: each version reaches the shared rank
        assert httpx.post(f"{job.url}/v1/corpora", json={"name": "notes"}).status_code == 201
        docs = [
            (
                "depot.txt",
                "The Orlan depot opens at dawn. The door code of the Orlan depot is 5826.",
            ),
            ("mill.txt", "The Tessary mill grinds rye. The Tessary mill's miller is Ada Quell."),
        ]
        seen = []
        for filename, text in docs:
            r = httpx.post(
                f"{job.url}/v1/corpora/notes/documents",
                files=[("files", (filename, text.encode(), "text/plain"))],
                timeout=300,
            )
            assert r.status_code == 200, r.text
            ask = [{"role": "user", "content": "What is the door code of the Orlan depot?"}]
            r = httpx.post(
                f"{job.url}/v1/chat/completions",
                json={"model": "kb:notes", "messages": ask, "max_tokens": 24, "temperature": 0},
                timeout=300,
            )
            assert r.status_code == 200, r.text
            assert "5826" in r.json()["choices"][0]["message"]["content"]
            (shard,) = _shards(job.url, "notes")
            seen.append(shard["tokens"])
        assert 0 < seen[0] < seen[1]  # the second document's tokens are on rank 1

        # admin operations reach the shared rank: evict drops the handbook's slice there, the
        # next question sends it again; delete drops the notes' slice
        def held() -> int:
            return httpx.get(f"{job.url}/healthz").json()["shared_ranks"]["per_rank"][0]["bytes"]

        assert held() == shard["bytes"] + _shards(job.url, "handbook")[0]["bytes"]
        assert _cache_op(job.url, "handbook", "evict") == {"tier": "disk"}
        assert _shards(job.url, "handbook") == [] and held() == shard["bytes"]
        answer = _chat(job.url, ASK)["choices"][0]["message"]["content"]
        assert answer == reference["routed"]["http"]
        assert _shards(job.url, "handbook")[0]["tokens"] == tokens
        assert _cache_op(job.url, "notes", "delete") == {"deleted": "notes"}
        assert held() == _shards(job.url, "handbook")[0]["bytes"]

        # a clean stop: rank 0 tells the shared rank to exit (uvicorn ends by raising SIGTERM)
        job.procs[0].send_signal(signal.SIGTERM)
        assert job.procs[0].wait(timeout=60) in (0, -signal.SIGTERM), job.tails()
        assert job.procs[1].wait(timeout=30) == 0, job.tails()
        assert "rank 0 is gone" not in job.tails()  # it exited on rank 0's word


def _stream_until_killed(url: str, victim: int) -> tuple[str, list[dict]]:
    """Stream a long answer, SIGKILL process `victim` after its first words; text and events."""
    text, events, killed = "", [], False
    body = {"model": MODEL, "messages": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[len("data: ") :])
            events.append(ev)
            for choice in ev.get("choices", []):
                text += choice["delta"].get("content") or ""
            if text and not killed:
                os.kill(victim, signal.SIGKILL)
                killed = True
    return text, events


def _health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=30).json()


def test_three_processes_answer_as_one_then_survive_a_killed_rank(reference, handbook, tmp_path):
    """One command on one host: rank 0 starts ranks 1 and 2. SIGKILL of rank 2 mid-stream ends
    that stream with the clear error; rank 1 then holds the whole corpus and the answers are
    the one-process ones; rank 0 starts rank 2 again, takes it back, /healthz is ok and the
    corpus is over both ranks again."""
    restart = {"KB_SHARED_RANK_RESTART_S": str(RESTART_S)}
    with serve_job(handbook.settings.resolved_home, 3, tmp_path, spawn=True, env=restart) as job:
        got = _answers(job.url)
        assert _same(got, reference["dense"]), (got, reference["dense"], job.tails())
        shards = _shards(job.url, "handbook")
        assert [(s["rank"], s["loaded_from"]) for s in shards] == [(1, "kv store"), (2, "kv store")]
        tokens = sum(s["tokens"] for s in shards)

        t0 = time.monotonic()
        text, events = _stream_until_killed(job.url, job.children[2])
        assert text and time.monotonic() - t0 < 60  # it ended, well before any hang would
        error = events[-1].get("error")
        assert error is not None and error["code"] == "shared_rank_failed", events[-3:]
        assert "shared rank 2 stopped responding" in error["message"]

        # served by the survivor (rank 2 is started again only after RESTART_S): rank 1 holds
        # every chunk and the answers are the one-process ones
        ranks = _health(job.url)["shared_ranks"]
        assert ranks["members"] == [1] and ranks["serving"] == "shared ranks", ranks
        assert "shared rank 2 stopped responding" in ranks["error"]
        assert [r["state"] for r in ranks["per_rank"]] == ["serving", "lost"]
        (shard,) = _shards(job.url, "handbook")
        assert shard["rank"] == 1 and shard["tokens"] == tokens, job.tails()
        after = _answers(job.url, stream=False)
        want = {k: v for k, v in reference["dense"].items() if k != "stream"}
        assert _same(after, want), (after, want, job.tails())
        health = _health(job.url)  # still without rank 2: the answers came from rank 1 alone
        assert health["status"] == "degraded" and health["shared_ranks"]["members"] == [1]

        # rank 0 starts rank 2 again and takes it back
        deadline = time.monotonic() + START_S
        while _health(job.url)["status"] != "ok":
            assert time.monotonic() < deadline, f"rank 2 did not come back:\n{job.tails()}"
            time.sleep(0.5)
        restarted = _children(job.procs[0].pid)
        assert restarted[2] != job.children[2], job.tails()
        job.children.update(restarted)
        health = _health(job.url)
        assert (
            health["shared_ranks"]["members"] == [1, 2] and health["shared_ranks"]["error"] is None
        )
        assert _chat(job.url, ASK)["choices"][0]["message"]["content"] == want["http"]
        shards = _shards(job.url, "handbook")
        assert [s["rank"] for s in shards] == [1, 2] and all(s["tokens"] for s in shards)
        assert sum(s["tokens"] for s in shards) == tokens


def test_rank_zero_reads_a_sharded_corpus_without_stacking_it(handbook):
    """What rank 0 reads of a sharded corpus (`CorpusCache._read_view`): the preamble's KV and,
    for a corpus that selects its passages, the selecting layers' keys, never the layout (its k
    and v are meta tensors). The router's summaries streamed from the files, the passage
    selector and its calibration equal the one-process ones made from the whole stacked layout
    (the handbook's 1,817 tokens select at a usable length of 512 positions)."""
    from sqlalchemy import select

    from index.summaries import chunk_summaries
    from kb.engine.selection import attach_selector, preamble_kv
    from kb.engine.shared_kv import SharedKV
    from storage.models import Corpus

    cache, usable = handbook.cache, 512
    with handbook.db.session() as s:
        corpus = s.scalar(select(Corpus).where(Corpus.name == "handbook"))
        full = cache._read("handbook", corpus)  # not sharded: every file, stacked
        view = cache._read_view("handbook", corpus, usable=usable)
    layers, n = full.k.shape[0], full.k.shape[1]
    assert view.k.is_meta and view.v.is_meta and view.k.shape == full.k.shape
    assert view.files == full.files and view.refs == full.refs
    assert torch.equal(view.positions, full.positions) and view.max_end == full.max_end
    p = full.files[0].tokens  # the preamble file
    for part, whole in zip(view.preamble, (full.k, full.v)):
        assert all(torch.equal(part[i], whole[i, :p]) for i in range(layers))
    config = cache._selection_config(n, -(-n // full.chunk_size), 1, usable)
    assert config is not None and 0 < len(config.layers) < layers
    for i in range(layers):
        kept = view.keys[i]
        assert torch.equal(kept, full.k[i]) if i in config.layers else kept.is_meta

    # the router's summaries, streamed file by file (a chunk cut by a file edge joined)
    for i, got in enumerate(cache._summaries_from_files(view)):
        want = chunk_summaries(full.k[i], full.chunk_size)
        assert got.num_tokens == want.num_tokens == n
        for f in ("mean", "kmin", "kmax"):
            assert torch.allclose(getattr(got, f), getattr(want, f), atol=1e-6), (i, f)

    def shared_of(layout, tensors) -> SharedKV:
        return SharedKV(
            "handbook@test",
            list(tensors[0].unbind(0)),
            list(tensors[1].unbind(0)),
            chunk_size=layout.chunk_size,
            pos_offset=layout.max_end,
            preamble_len=layout.preamble_len,
            positions=layout.positions,
        )

    one = shared_of(full, cache._serving(full))  # as one process holds it
    assert attach_selector(one, list(full.k.unbind(0)), cache.model, handbook.settings, usable)
    sharded = shared_of(view, [view.k.float(), view.v.float()])  # the view's meta tensors
    cache._attach_view_selector(sharded, view, usable=usable)
    a, b = one.selector, sharded.selector
    assert b is not None and sorted(a.keys) == sorted(b.keys) == sorted(config.layers)
    assert all(torch.equal(a.keys[i], b.keys[i]) for i in config.layers)
    assert torch.allclose(a.calibration, b.calibration, atol=1e-5)
    for x, y in zip(preamble_kv(one), b.preamble):
        assert all(torch.equal(u, w) for u, w in zip(x, y))
