"""Schemathesis over the served OpenAPI spec of create_app(handbook, warm=False, ui=False): no
5xx on any operation and no answer that breaks the schema (status codes, content types and
bodies as documented), then the planted fact is still answered. Answers are kept short
(kb.settings.max_tokens = 4 and any generated max_tokens capped at 4) so the run stays bounded."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import FACT_ANSWER, FACT_QUESTION, serve_in_thread

pytestmark = pytest.mark.slow

MAX_TOKENS = 4
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def served(handbook):
    from kb.server import create_app

    handbook.settings.max_tokens = MAX_TOKENS
    handbook.create_corpus("fuzz")
    with serve_in_thread(create_app(handbook, warm=False, ui=False)) as url:
        yield url


def _bounded(m):
    if not isinstance(m, dict):
        return m
    content = m.get("content")
    if isinstance(content, str):
        return {**m, "content": content[:400]}
    if isinstance(content, list):
        parts = [
            {**p, "text": p["text"][:100]}
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else p
            for p in content[:4]
        ]
        return {**m, "content": parts}
    return m


def _steer(case) -> None:
    """Bound what the chat and completions endpoints may generate (the schema allows up to 32768
    tokens), and aim every other chat and completion at the ready corpus and every other upload
    at corpus 'fuzz', so that generation and ingestion run rather than stopping at 404."""
    alternate = zlib.crc32(repr((case.body, case.path_parameters, case.query)).encode()) % 2
    if (
        case.operation.label in ("POST /v1/chat/completions", "POST /v1/completions")
        and isinstance(case.body, dict)
        and alternate
    ):
        case.body["model"] = "kb:handbook"
        case.body.pop("corpus", None)
        msgs = case.body.get("messages")
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
            # end on a user's question, so that the model answers
            last = msgs[-1].get("content")
            text = last if isinstance(last, str) and last.strip() else "What is in the documents?"
            msgs[-1] = {"role": "user", "content": text}
    if case.operation.label == "POST /v1/corpora/{name}/documents" and alternate:
        case.path_parameters = {**(case.path_parameters or {}), "name": "fuzz"}
    if isinstance(case.body, dict) and isinstance(case.body.get("messages"), list):
        # bound the prompt too: at most 8 messages of 400 characters each (in at most 4 parts)
        case.body["messages"] = [_bounded(m) for m in case.body["messages"][-8:]]
    if isinstance(case.body, dict) and isinstance(case.body.get("prompt"), str):
        case.body["prompt"] = case.body["prompt"][:400]
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                case.body[key] = MAX_TOKENS


def test_no_server_error_on_any_operation(served):
    """Every operation of the served spec, up to 25 valid and 15 invalid requests each (schemathesis's
    pytest plugin does not load under this pytest, so the operations are driven here)."""
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    failures, calls, statuses = [], {}, {}

    for op, mode in [(op, mode) for op in operations for mode in GenerationMode]:
        calls.setdefault(op.label, 0)

        @given(case=op.as_strategy(mode))
        # no shrinking: a failing case is reported as found (each call may run the model, and a
        # shrink of a slow case could outlast CI)
        @settings(
            max_examples=25 if mode == GenerationMode.POSITIVE else 15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def no_5xx(case):
            _steer(case)
            response = case.call(timeout=120)
            calls[case.operation.label] += 1
            key = f"{case.method}{case.operation.path}={response.status_code}"
            statuses[key] = statuses.get(key, 0) + 1
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
                f"{case.as_curl_command()}"
            )
            case.validate_response(response, checks=CHECKS)

        try:
            no_5xx()
        except Unsatisfiable:  # nothing in this operation can be made invalid (no parameters)
            assert mode == GenerationMode.NEGATIVE, op.label
        except Exception as e:  # keep going: report every operation that fails
            failures.append(f"{op.label} ({mode.value}): {e}")
    print("\nFUZZ " + " ".join(f"{label}={n}" for label, n in calls.items()))
    print("FUZZ statuses " + " ".join(f"{k}:{v}" for k, v in sorted(statuses.items())))
    assert not failures, "\n\n".join(failures)
    assert all(calls.values()), calls


_HOSTILE_TEXT = st.text(min_size=1, max_size=20).flatmap(
    lambda t: st.sampled_from(["\x00", "\ud800", "\udfff", "\x07", "\x1b", "\x7f"]).map(
        lambda bad: t[: len(t) // 2] + bad + t[len(t) // 2 :]
    )
)
_HOSTILE_FLOAT = st.sampled_from([math.nan, math.inf, -math.inf])
_FIELDS = {
    "temperature": _HOSTILE_FLOAT,
    "top_p": _HOSTILE_FLOAT,
    "presence_penalty": _HOSTILE_FLOAT,
    "frequency_penalty": _HOSTILE_FLOAT,
    "repetition_penalty": _HOSTILE_FLOAT,
    "model": _HOSTILE_TEXT,
    "corpus": _HOSTILE_TEXT,
    "stop": _HOSTILE_TEXT,
    "messages.0.content": _HOSTILE_TEXT,
}


@st.composite
def _hostile_chat(draw):
    field = draw(st.sampled_from(sorted(_FIELDS)))
    body = {
        "model": "kb:handbook",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}],
    }
    value = draw(_FIELDS[field])
    if field == "messages.0.content":
        body["messages"][0]["content"] = value
    else:
        body[field] = value
    return field, body


def test_hostile_values_in_chat_fields_are_400_naming_the_field(served):
    """NaN/Infinity, lone surrogates, NUL bytes and control characters (issue 15, point 6): each
    in any field of a chat request is a 400 whose error names that field, never a 5xx."""
    import httpx

    with httpx.Client(base_url=served, timeout=60) as client:

        @given(_hostile_chat())
        @settings(
            max_examples=60,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            field, body = case
            raw = json.dumps(body, allow_nan=True).encode()  # NaN literals and \ud800 escapes
            r = client.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
            assert r.status_code == 400, (field, r.status_code, r.text[:300])
            assert (
                r.json()["error"].get("param", field) == field
                or field in r.json()["error"]["message"]
            )

        check()


def test_hostile_path_and_query_values_are_400(served):
    """The same values in path and query parameters (a NUL on PostgreSQL was a driver 500)."""
    import urllib.parse

    import httpx

    with httpx.Client(base_url=served, timeout=60) as client:

        @given(
            _HOSTILE_TEXT.filter(lambda t: "/" not in t and "\ud800" not in t and "\udfff" not in t)
        )
        @settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(value):
            q = urllib.parse.quote(value, safe="")
            for method, path in (
                ("GET", f"/v1/corpora/{q}"),
                ("GET", f"/v1/corpora/{q}/documents"),
                ("DELETE", f"/v1/corpora/{q}"),
                ("GET", f"/v1/jobs?corpus={q}"),
                ("GET", f"/v1/jobs/{q}"),
                ("POST", f"/v1/cache/{q}/pin"),
            ):
                r = client.request(method, path)
                assert r.status_code == 400, (method, path, r.status_code, r.text[:300])

        check()


def test_service_still_answers_after_fuzzing(served, handbook):
    import httpx

    r = httpx.post(
        f"{served}/v1/chat/completions",
        timeout=300,
        json={
            "model": "kb:handbook",
            "max_tokens": 24,
            "messages": [{"role": "user", "content": FACT_QUESTION}],
        },
    )
    assert r.status_code == 200, r.text
    assert FACT_ANSWER in r.json()["choices"][0]["message"]["content"]
