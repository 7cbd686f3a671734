"""Load: 200 concurrent streaming chats over HTTP on loopback with the demo model on CPU, every
stream complete and its own; then, past the queue limit, 429 with Retry-After instead of a
timeout. Figures print on one line each ("LOAD ...") and go to docs/RELIABILITY.md ("Load")."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest

from tests.conftest import MODELS_DIR, serve_in_thread

pytestmark = pytest.mark.slow

STREAMS = 200
MAX_TOKENS = 8
OVERALL_S = 600  # fail, never hang


def question(i: int) -> str:
    # different lengths as well as numbers, so usage.prompt_tokens tells whose usage a stream got
    return f"Question {i}:{' please' * (i % 7)} what is the access code of the Velmora vault?"


def prompt_tokens(kb, q: str) -> int:
    from kb.prompt import build_prompt, encode

    return len(
        encode(
            kb.loaded.tokenizer,
            build_prompt(kb.loaded.tokenizer, kb.settings.system_prompt, [], q).suffix,
        )
    )


async def stream_chat(client: httpx.AsyncClient, i: int) -> dict:
    """One streaming chat; returns its status, headers, parsed events and timings."""
    body = {
        "model": "kb:handbook",
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": question(i)}],
    }
    t0 = time.perf_counter()
    first = None
    raw = b""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for part in r.aiter_bytes():
            raw += part
            if first is None and r.status_code == 200:  # time to the first content delta
                for ev in raw.split(b"\n\n")[1:-1]:
                    choices = json.loads(ev[6:])["choices"] if ev.startswith(b"data: {") else []
                    if choices and choices[0]["delta"].get("content"):
                        first = time.perf_counter()
                        break
    end = time.perf_counter()
    return {
        "i": i,
        "status": r.status_code,
        "headers": r.headers,
        "raw": raw.decode(),
        "latency": end - t0,
        "ttft": (first or end) - t0,
    }


def check_stream(res: dict, expected_prompt_tokens: int) -> tuple[str, str]:
    """One well-formed SSE sequence: role chunk, content chunks, the finishing chunk (with
    citations), the usage chunk (choices [], as include_usage asks), [DONE]; keep-alive comments
    anywhere, even after [DONE] (sse-starlette's ping task may fire while the response closes, and
    SSE clients ignore comments); one id throughout. Returns (id, content)."""
    assert res["status"] == 200, res
    assert res["headers"]["content-type"].startswith("text/event-stream")
    raw = res["raw"]
    assert raw.endswith("\n\n"), raw[-300:]
    events = [e for e in raw.split("\n\n") if not e.startswith(":")]  # keep-alive comments
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1]), raw
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all("error" not in c for c in chunks), raw
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1, ids  # never a chunk of another stream
    assert all(
        c["object"] == "chat.completion.chunk" and c["model"] == "kb:handbook" for c in chunks
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final, last = chunks[-2], chunks[-1]
    middle = chunks[1:-2]
    assert last["choices"] == [] and "usage" not in final
    assert (
        final["choices"][0]["finish_reason"] in ("stop", "length")
        and final["choices"][0]["delta"] == {}
    )
    assert all(
        c["choices"][0]["finish_reason"] is None and set(c["choices"][0]["delta"]) == {"content"}
        for c in middle
    ), raw
    deltas = [c["choices"][0]["delta"]["content"] for c in middle]
    usage = last["usage"]
    # each content delta carries the text of at least one generated token (a token that ends mid
    # UTF-8 character or is EOS adds none); a "length" finish generated exactly max_tokens
    assert all(deltas) and 1 <= len(deltas) <= usage["completion_tokens"] <= MAX_TOKENS, (
        deltas,
        usage,
    )
    if final["choices"][0]["finish_reason"] == "length":
        assert usage["completion_tokens"] == MAX_TOKENS
    assert usage["prompt_tokens"] == expected_prompt_tokens, (res["i"], usage)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert final["citations"], "no citations"
    return ids.pop(), "".join(deltas)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def fire(url: str, n: int) -> list:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(OVERALL_S), limits=limits
    ) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(stream_chat(client, i) for i in range(n)), return_exceptions=True),
            OVERALL_S,
        )


def test_200_concurrent_streams_all_complete_and_stay_apart(handbook):
    from kb.server import create_app

    engine = handbook.engine
    expected = {i: prompt_tokens(handbook, question(i)) for i in range(STREAMS)}
    assert len(set(expected.values())) > 1
    with serve_in_thread(create_app(handbook, warm=False, ui=False)) as url:
        t0 = time.perf_counter()
        results = asyncio.run(fire(url, STREAMS))
        wall = time.perf_counter() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert len(results) == STREAMS
    ids, texts = set(), []
    for r in results:
        rid, text = check_stream(r, expected[r["i"]])
        ids.add(rid)
        texts.append(text)
    assert len(ids) == STREAMS  # unique across streams: none lost, none duplicated
    with engine._lock:
        assert not engine.scheduler.running and not engine.scheduler.waiting
        assert engine.blocks.num_free == engine.blocks.num_blocks
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    print(
        f"\nLOAD streams={STREAMS} max_tokens={MAX_TOKENS} wall_s={wall:.1f} errors={len(errors)} "
        f"latency_p50_s={statistics.median(lat):.2f} latency_p99_s={pct(lat, 99):.2f} "
        f"ttft_p50_s={statistics.median(ttft):.2f} ttft_p99_s={pct(ttft, 99):.2f} "
        f"max_batch={engine.metrics.max_batch_size} "
        f"with_7341={sum('7341' in t for t in texts)}"
    )


def test_past_the_queue_limit_429_with_retry_after_not_a_timeout(handbook):
    """max_running 2, max_queue 20: 80 concurrent streams; the excess is refused at once with 429
    and Retry-After, every accepted one completes."""
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    n = 80
    kb = KnowledgeBase(
        Settings(
            home=handbook.settings.resolved_home, models_dir=MODELS_DIR, max_running=2, max_queue=20
        )
    )
    try:
        expected = {i: prompt_tokens(kb, question(i)) for i in range(n)}
        with serve_in_thread(create_app(kb, warm=False, ui=False)) as url:
            t0 = time.perf_counter()
            results = asyncio.run(fire(url, n))
            wall = time.perf_counter() - t0
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        busy = [r for r in results if r["status"] == 429]
        ok = [r for r in results if r["status"] == 200]
        assert len(busy) + len(ok) == n, sorted({r["status"] for r in results})
        assert busy and len(ok) >= 20
        for r in busy:
            assert r["headers"].get("retry-after") == "1"
            assert "already waiting" in json.loads(r["raw"])["error"]["message"]
        assert len({check_stream(r, expected[r["i"]])[0] for r in ok}) == len(ok)
        assert kb.engine.metrics.max_batch_size <= 2
        busy_lat = [r["latency"] for r in busy]
        print(
            f"\nLOAD-429 requests={n} max_running=2 max_queue=20 wall_s={wall:.1f} ok={len(ok)} "
            f"refused_429={len(busy)} refusal_p50_s={statistics.median(busy_lat):.3f} "
            f"refusal_max_s={max(busy_lat):.3f} ok_latency_p50_s={statistics.median([r['latency'] for r in ok]):.2f}"
        )
    finally:
        kb.close()
