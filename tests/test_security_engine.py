"""Issue 15, points 2 and 3: a request whose parameters cannot run fails alone; any disconnect
aborts its request and frees its KV; shutdown ends every request within a bound; the gauges
follow aborts."""

from __future__ import annotations

import math
import socket
import threading
import time

import httpx
import pytest

from kb.engine.engine import Engine, EngineConfig, check_sampling
from kb.engine.request import Finished
from kb.engine.sequence import SamplingParams
from tests.conftest import FACT_QUESTION, serve_in_thread

LONG = "Write a very long story about a lighthouse keeper, with many chapters."


def _prompt(tok, q: str) -> list[int]:
    return tok(
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    ).input_ids


def test_parameters_that_cannot_run_are_refused_before_the_batch():
    for bad in (
        SamplingParams(temperature=0.5, seed=2**64),
        SamplingParams(seed=-(2**63) - 1),
        SamplingParams(temperature=math.nan),
        SamplingParams(top_p=math.inf),
        SamplingParams(temperature=math.inf),
    ):
        with pytest.raises(ValueError):
            bad.validate()
            check_sampling(bad)
    check_sampling(SamplingParams(temperature=0.5, seed=2**64 - 1))


def test_a_sampling_error_fails_its_request_alone(demo_model):
    """The probe's seed 2**64 reached the step ("Overflow when unpacking long long") and failed
    every request in it. Slipped past validation here on purpose, it fails only its own."""
    tok = demo_model.tokenizer
    ids = _prompt(tok, "Name three colours.")
    sp = dict(temperature=0.5, top_p=0.9, max_tokens=6, seed=7, ignore_eos=True)

    solo = Engine(
        demo_model, EngineConfig(unique_kv_tokens=1024, citation_layers=0, cuda_graphs=False)
    )
    ref = solo.add_request(ids, SamplingParams(**sp))
    solo.run_until_done()

    engine = Engine(
        demo_model, EngineConfig(unique_kv_tokens=1024, citation_layers=0, cuda_graphs=False)
    )
    good = engine.add_request(ids, SamplingParams(**sp))
    bad = engine.add_request(ids, SamplingParams(**sp))
    other = engine.add_request(
        _prompt(tok, "Say hi."), SamplingParams(max_tokens=4, ignore_eos=True)
    )
    bad.seq.sampling.seed = 2**64  # as if an edge had let it through
    engine.run_until_done()
    assert bad.result.reason == "error" and "sampling failed" in bad.result.error
    assert good.result.reason == "length" and good.seq.output_ids == ref.seq.output_ids
    assert other.result.reason == "length" and len(other.seq.output_ids) == 4
    assert engine.blocks.usage == 0  # the failed request's unique KV is free as well


def test_shutdown_ends_running_requests(demo_model):
    """Shutdown with requests running: each ends (finished or aborted) and none is left open."""
    tok = demo_model.tokenizer
    engine = Engine(
        demo_model, EngineConfig(unique_kv_tokens=4096, citation_layers=0, cuda_graphs=False)
    )
    engine.start()
    handles = [
        engine.add_request(_prompt(tok, LONG), SamplingParams(max_tokens=2000, ignore_eos=True))
        for _ in range(2)
    ]
    first = handles[0].get()  # generation is under way
    assert not isinstance(first, Finished)
    engine.shutdown(grace_s=0.2)
    for h in handles:
        assert h.result is not None and h.result.reason in ("abort", "length")
        assert h.result.reason == "abort" and "shutting down" in (h.result.error or "")
    assert engine.blocks.usage == 0
    with pytest.raises(RuntimeError):
        engine.add_request(_prompt(tok, "hi"), SamplingParams(max_tokens=2))


@pytest.fixture(scope="module")
def served(handbook):
    from kb.server import create_app

    handbook.engine.start()
    with serve_in_thread(create_app(handbook, warm=False)) as url:
        yield {"url": url, "kb": handbook}


def _body(**kw) -> dict:
    return {
        "model": "kb:handbook",
        "messages": [{"role": "user", "content": kw.pop("q", FACT_QUESTION)}],
        **kw,
    }


def test_bad_seed_is_refused_at_the_edge_and_others_go_on(served):
    """The probe's seed 2**64 with temperature 0.5: refused by the schema (400, as every value
    out of its range, naming the field) before it reaches the engine; a request running beside
    it finishes normally."""
    url, results = served["url"], {}

    def good():
        results["good"] = httpx.post(
            f"{url}/v1/chat/completions", json=_body(max_tokens=8), timeout=120
        )

    t = threading.Thread(target=good)
    t.start()
    r = httpx.post(
        f"{url}/v1/chat/completions", json=_body(seed=2**64, temperature=0.5), timeout=60
    )
    t.join()
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed" and "seed" in r.json()["error"]["message"]
    assert (
        results["good"].status_code == 200
        and results["good"].json()["choices"][0]["finish_reason"] != "error"
    )


def _metric(kb, reason: str) -> float:
    return kb.engine.metrics.finished_count(reason)


def _until(pred, what: str, tries: int = 400) -> None:
    for _ in range(tries):
        if pred():
            return
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


def test_non_streaming_disconnect_aborts_at_once(served):
    """A client that drops a non-streaming request (max_tokens 4000: minutes on the CPU; the web
    app mounted, as `kb serve` runs it) frees
    its KV and the running gauge at once, not after generating to max_tokens."""
    kb, url = served["kb"], served["url"]
    aborted = _metric(kb, "abort")
    host, port = url.removeprefix("http://").split(":")
    body = httpx.Request(
        "POST",
        f"{url}/v1/chat/completions",
        json=_body(q=LONG, max_tokens=4000, temperature=1.0, seed=3),
    )
    raw = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body.content)}\r\n\r\n"
    ).encode() + body.content
    with socket.create_connection((host, int(port))) as s:
        s.sendall(raw)
        _until(lambda: kb.engine.scheduler.running, "the request to run")
    _until(lambda: _metric(kb, "abort") == aborted + 1, "the request to be aborted")
    _until(
        lambda: not kb.engine.scheduler.running and kb.engine.blocks.usage == 0,
        "its KV to be freed",
    )
    _until(
        lambda: kb.engine.metrics.running._value.get() == 0, "the running gauge to follow the abort"
    )


def test_streaming_disconnect_aborts(served):
    kb, url = served["kb"], served["url"]
    aborted = _metric(kb, "abort")
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        timeout=60,
        json=_body(q=LONG, max_tokens=4000, temperature=1.0, seed=4, stream=True),
    ) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first token: go away
    _until(lambda: _metric(kb, "abort") == aborted + 1, "the stream to be aborted")
    _until(
        lambda: not kb.engine.scheduler.running and kb.engine.blocks.usage == 0,
        "its KV to be freed",
    )
    _until(
        lambda: kb.engine.metrics.running._value.get() == 0, "the running gauge to follow the abort"
    )
