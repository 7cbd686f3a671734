"""OpenAI compatibility (issue 19) with real clients, unchanged, against a running server: the
`openai` package (sync, async, streaming, errors), LangChain's ChatOpenAI, and raw HTTP for what
the clients hide (headers, keep-alive comments, disconnects). Each test backs a row of the
conformance table in docs/API.md. One served app for the module, the planted-fact corpus, short
answers."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import FACT_ANSWER, FACT_QUESTION, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
MODEL = "kb:handbook"
ASK = [{"role": "user", "content": FACT_QUESTION}]


@pytest.fixture(scope="module")
def server(handbook):
    from kb.server import create_app

    app = create_app(handbook, warm=False, ui=False)
    app.state.sse_ping_s = 0.02  # keep-alive comments often enough to be seen in one answer
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def _wait_kv_free(engine) -> None:
    for _ in range(400):  # the server notices the closed socket at its next write
        if not engine.scheduler.running and engine.blocks.num_free == engine.blocks.num_blocks:
            return
        time.sleep(0.05)


# -- models -----------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model" and m.owned_by == "kb"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("kb:nope")
    assert "does not exist" in e.value.message and e.value.code == "model_not_found"


# -- chat: messages ---------------------------------------------------------------------------


def test_chat_with_system_message_and_text_parts(client):
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=24,
        messages=[
            {"role": "system", "content": "Answer in as few words as possible."},
            {"role": "user", "content": [{"type": "text", "text": FACT_QUESTION}]},
        ],
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert FACT_ANSWER in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_system_and_developer_messages_reach_the_prompt(client, handbook):
    """An instruction is a system turn after the documents: the prompt grows by exactly that
    turn's tokens (it was dropped before)."""
    from kb.prompt import build_prompt, encode

    tok, system = handbook.loaded.tokenizer, handbook.settings.system_prompt
    rule = "Reply with the single word BANANA and nothing else."
    turn = [{"role": "system", "content": rule}]
    with_rule = build_prompt(tok, system, turn, FACT_QUESTION).suffix
    assert rule in with_rule
    grows = len(encode(tok, with_rule)) - len(
        encode(tok, build_prompt(tok, system, [], FACT_QUESTION).suffix)
    )
    plain = client.chat.completions.create(model=MODEL, max_tokens=4, messages=ASK)
    for role in ("system", "developer"):
        told = client.chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": role, "content": rule}, *ASK]
        )
        assert told.usage.prompt_tokens - plain.usage.prompt_tokens == grows > 0, role


def test_an_image_part_is_refused_naming_the_part(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ],
        )
    assert e.value.param == "messages.0.content.1" and "image_url" in e.value.message


def test_last_message_must_be_the_users(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, max_tokens=4, messages=[*ASK, {"role": "assistant", "content": "7"}]
        )
    assert e.value.param == "messages.1.role" and "last message" in e.value.message


# -- chat: parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"messages": []}, "messages"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
    ],
)
def test_bad_and_unsupported_parameters_are_400_naming_them(client, kwargs, param):
    body = {"model": MODEL, "max_tokens": 4, "messages": ASK, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert param in e.value.message and e.value.type == "invalid_request_error"


def test_accepted_parameters(client):
    """n=1, response_format text, tool_choice none, user, metadata and the penalties (OpenAI's
    and the extra repetition_penalty) are taken."""
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=24,
        messages=ASK,
        n=1,
        response_format={"type": "text"},
        tool_choice="none",
        user="someone",
        presence_penalty=0.5,
        frequency_penalty=0.5,
        metadata={"k": "v"},
        store=False,
        parallel_tool_calls=False,
        extra_body={"repetition_penalty": 1.1, "top_k": 40, "an_unknown_field": 1},
    )
    assert r.choices[0].message.content and r.usage.completion_tokens > 0


def test_default_temperature_is_greedy(client):
    """kb's default temperature is 0 (OpenAI's is 1): the same question, the same answer."""
    a, b = (
        client.chat.completions.create(model=MODEL, max_tokens=16, messages=ASK)
        .choices[0]
        .message.content
        for _ in range(2)
    )
    assert a == b
    hot = {
        client.chat.completions.create(
            model=MODEL, max_tokens=16, messages=ASK, temperature=2.0, seed=s
        )
        .choices[0]
        .message.content
        for s in range(4)
    }
    assert len(hot) > 1  # sampling does vary with the seed at temperature 2


def test_citations_are_the_passage_unless_the_segment_is_asked_for(client):
    r = client.chat.completions.create(model=MODEL, max_tokens=24, messages=ASK)
    cite = r.model_extra["citations"][0]
    assert cite["document"] == "handbook.txt" and FACT_ANSWER in cite["text"]
    assert cite.get("segment_text") is None
    r = client.chat.completions.create(
        model=MODEL, max_tokens=24, messages=ASK, extra_body={"citation_text": "segment"}
    )
    cite = r.model_extra["citations"][0]
    a, b = cite["highlight"]
    assert len(cite["segment_text"]) > len(cite["text"]) and cite["text"] in cite["segment_text"]
    assert cite["segment_text"][a:b].strip() == cite["text"]


# -- chat: streaming --------------------------------------------------------------------------


def test_stream_without_usage_unless_asked(client):
    chunks = list(
        client.chat.completions.create(model=MODEL, max_tokens=24, stream=True, messages=ASK)
    )
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert FACT_ANSWER in text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["citations"]

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            messages=ASK,
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_stream_headers_and_keep_alive_comments(server):
    body = {"model": MODEL, "max_tokens": 24, "stream": True, "messages": ASK}
    with httpx.Client(base_url=server, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-accel-buffering"] == "no"
            lines = [line for line in r.iter_lines() if line]
    assert any(line.startswith(":") for line in lines)  # comments: ignored by clients
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert [json.loads(d)["object"] for d in data[:-1]] == ["chat.completion.chunk"] * (
        len(data) - 1
    )


def test_async_client_and_async_stream(server):
    async def run():
        aclient = AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        r = await aclient.chat.completions.create(model=MODEL, max_tokens=24, messages=ASK)
        stream = await aclient.chat.completions.create(
            model=MODEL, max_tokens=24, stream=True, messages=ASK
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        with pytest.raises(openai.NotFoundError):
            await aclient.chat.completions.create(model="kb:nope", max_tokens=4, messages=ASK)
        await aclient.close()
        return r.choices[0].message.content, "".join(parts)

    whole, streamed = asyncio.run(run())
    assert FACT_ANSWER in whole and FACT_ANSWER in streamed


# -- legacy completions -----------------------------------------------------------------------


def test_legacy_completions(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text  # greedy: the same text
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, best_of=3)
    assert e.value.param == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=4)
    assert e.value.param == "prompt"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="kb:nope", prompt=prompt, max_tokens=4)


def test_legacy_completions_stream_disconnect_frees_its_kv(server, handbook):
    engine = handbook.engine
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    with httpx.Client(base_url=server, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            data = 0
            for line in r.iter_lines():  # keep-alive comments come between the events
                data += line.startswith("data: ")
                if data == 3:
                    break
            assert data == 3 and engine.scheduler.running  # generating now
    _wait_kv_free(engine)
    assert not engine.scheduler.running
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_client_gone_before_a_whole_answer_aborts_it(server, handbook):
    """Not streaming: the client gives up (a read timeout closes its connection) long before
    2000 tokens; the server aborts the request and its unique KV is free again."""
    engine = handbook.engine
    aborted = lambda: engine.metrics.finished_count("abort")  # noqa: E731
    before = aborted()
    body = {"model": MODEL, "max_tokens": 2000, "messages": [{"role": "user", "content": "Go on."}]}
    # an answer that cannot end on its own before the server sees the client gone: no
    # end-of-sequence token (with the served frequency penalty the demo model ended "Go on." in a
    # few seconds, after the client had left and before the server noticed)
    eos, engine.eos_ids = engine.eos_ids, frozenset()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=1))
        _wait_kv_free(engine)
    finally:
        engine.eos_ids = eos
    assert (aborted() or 0) == before + 1
    assert not engine.scheduler.running
    assert engine.blocks.num_free == engine.blocks.num_blocks


# -- errors -----------------------------------------------------------------------------------


def test_every_error_is_the_envelope(server, client, handbook):
    with httpx.Client(base_url=server, timeout=60) as c:
        for r in (
            c.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "a/json"}),
            c.post(
                "/v1/chat/completions",
                content=b"{nope",
                headers={"content-type": "application/json"},
            ),
            c.get("/v1/no-such-route"),
            c.delete("/v1/models"),
            c.get("/v1/corpora/never"),
        ):
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"}, r.text
            assert r.status_code in (400, 404, 405), r.text
    engine, limit = handbook.engine, handbook.engine.config.max_queue
    engine.config.max_queue = 0  # every request now finds the queue full
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, max_tokens=4, messages=ASK)
    finally:
        engine.config.max_queue = limit
    assert e.value.response.headers["retry-after"] and e.value.code == "rate_limit_exceeded"
    assert "waiting" in e.value.message


def test_openapi_schema_is_typed_and_documents_errors(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    ok = chat["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert "text/event-stream" in ok
    for status in ("400", "401", "404", "429"):
        assert chat["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
    assert "422" not in chat["responses"]
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "/v1/completions" in spec["paths"] and "/v1/models/{model_id}" in spec["paths"]


# -- tools built on the client ----------------------------------------------------------------


def test_langchain_chat_openai(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = langchain_openai.ChatOpenAI(
        base_url=f"{server}/v1", api_key="unused", model=MODEL, max_tokens=24, temperature=0
    )
    msgs = [SystemMessage("Answer briefly."), HumanMessage(FACT_QUESTION)]
    assert FACT_ANSWER in llm.invoke(msgs).content
    assert FACT_ANSWER in "".join(c.content for c in llm.stream(msgs))
    llm_usage = langchain_openai.ChatOpenAI(
        base_url=f"{server}/v1", api_key="unused", model=MODEL, max_tokens=8, stream_usage=True
    )
    last = None
    for chunk in llm_usage.stream(msgs):
        last = chunk if last is None else last + chunk
    assert last.usage_metadata["output_tokens"] > 0


# -- metrics ----------------------------------------------------------------------------------


def _scrape(server) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server}/metrics").text
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, [])
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_metrics_vllm_set_with_corpus_labels(server, client):
    client.chat.completions.create(model=MODEL, max_tokens=4, messages=ASK)
    got = _scrape(server)
    for name in (
        "kb_prompt_tokens_total",
        "kb_generation_tokens_total",
        "kb_request_queue_time_seconds_count",
        "kb_request_prefill_time_seconds_count",
        "kb_request_decode_time_seconds_count",
        "kb_request_inference_time_seconds_count",
        "kb_request_prompt_tokens_count",
        "kb_request_generation_tokens_count",
        "kb_time_to_first_token_seconds_count",
        "kb_e2e_request_latency_seconds_count",
        "kb_shared_cache_hits_total",
        "kb_shared_cache_queries_total",
    ):
        by_corpus = {s.labels.get("corpus"): s.value for s in got[name]}
        assert by_corpus.get("handbook", 0) > 0, (name, by_corpus)
    assert "kb_num_preemptions_total" in got and "kb_unique_kv_usage_ratio" in got
    assert not [n for n in got if n.endswith("_perc")]
    kv = {(s.labels["corpus"], s.labels["tier"]): s.value for s in got["kb_shared_kv_bytes"]}
    assert kv[("handbook", "disk")] > 0 and kv[("handbook", "gpu")] > 0  # stored, and loaded
    assert {s.labels["state"] for s in got["kb_ingest_jobs"]} >= {"queued", "running", "done"}
    assert got["kb_ingest_prefill_tokens_per_second"][0].value >= 0
    hits = {s.labels["corpus"]: s.value for s in got["kb_corpus_cache_hits_total"]}
    assert hits["handbook"] > 0


def test_grafana_dashboard_names_only_served_metrics(server, client):
    client.chat.completions.create(model=MODEL, max_tokens=4, messages=ASK)
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    names = {n for e in exprs for n in re.findall(r"\bkb_[a-z0-9_]+", e)}
    assert len(names) >= 20, names
    served = _scrape(server)
    missing = sorted(n for n in names if n not in served)
    assert not missing, missing
