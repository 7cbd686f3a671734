"""`/v1/chat/completions` (streaming over SSE and not) and `/v1/models`, in OpenAI's shapes.
A corpus is a model named `kb:NAME` (or named by the extra field `corpus`)."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from kb.api.auth import current_user
from kb.api.deps import get_kb
from kb.api.messages import conversation
from kb.api.openapi import STREAM_RESPONSE
from kb.api.responses import ChatCompletion, Model, ModelList, trim_citation, usage
from kb.api.schemas import ChatRequest, SamplingFields
from kb.api.streaming import finished_result, sse
from kb.auth import Principal
from kb.engine.request import Finished
from kb.engine.sequence import SamplingParams
from kb.errors import NotFound, NotReady
from kb.service import Answer, KnowledgeBase

router = APIRouter(tags=["chat"])


def _model(c) -> dict:
    created = int(c.created_at.timestamp()) if c.created_at else 0
    return {"id": f"kb:{c.name}", "object": "model", "created": created, "owned_by": "kb"}


@router.get("/v1/models", response_model=ModelList)
async def models(kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)):
    """The ready corpora the caller may read, each a model `kb:NAME`."""
    rows = await run_in_threadpool(lambda: kb.list_corpora(user=user))
    return {"object": "list", "data": [_model(c) for c in rows if c.status == "ready"]}


@router.get("/v1/models/{model_id}", response_model=Model)
async def model(
    model_id: str, kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)
):
    """One model of `/v1/models` (`client.models.retrieve("kb:NAME")`)."""
    rows = await run_in_threadpool(lambda: kb.list_corpora(user=user))
    for c in rows:
        if c.status == "ready" and model_id in (f"kb:{c.name}", c.name):
            return _model(c)
    raise NotFound(f"the model {model_id!r} does not exist", param="model", code="model_not_found")


def sampling(kb: KnowledgeBase, body: SamplingFields, max_tokens: int) -> SamplingParams:
    """The engine's sampling parameters for a request (kb's defaults where it sends none)."""
    rep, freq = body.repetition_penalty, body.frequency_penalty
    served = kb.settings

    def dry(name: str):
        sent = getattr(body, name)
        return getattr(served, name) if sent is None else sent

    return SamplingParams(
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_tokens=max_tokens,
        stop=body.stops(),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=kb.settings.frequency_penalty if freq is None else freq,
        repetition_penalty=kb.settings.repetition_penalty if rep is None else rep,
        dry_multiplier=dry("dry_multiplier"),
        dry_base=dry("dry_base"),
        dry_allowed_length=dry("dry_allowed_length"),
        dry_sequence_breakers=tuple(dry("dry_sequence_breakers")),
    )


def include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def closing_chunks(body: SamplingFields, head: dict, last: dict, ev: Finished) -> list[dict]:
    """A stream's closing chunks: `last` (the one with the finish reason), then, where the request
    asked for it (`stream_options.include_usage`), one with no choices and the usage."""
    out = [last]
    if include_usage(body):
        out.append({**head, "choices": [], "usage": usage(ev.prompt_tokens, ev.completion_tokens)})
    return out


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: STREAM_RESPONSE},
)
async def chat(
    body: ChatRequest,
    request: Request,
    kb: KnowledgeBase = Depends(get_kb),
    user: Principal = Depends(current_user),
):
    """A chat turn over a corpus: the last message is the question, earlier ones the history
    (system and developer messages are instructions). With `stream`, server-sent events in
    OpenAI's chunk format; citations come on the finishing chunk."""
    convo = conversation(body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens or kb.settings.max_tokens
    sp = sampling(kb, body, max_tokens)
    name = body.corpus_name()
    loop = asyncio.get_running_loop()
    await run_in_threadpool(lambda: kb.engine.start())
    try:
        answer: Answer = await run_in_threadpool(
            kb.ask, name, convo.question, sp, convo.history, loop, user=user, dense=body.dense
        )
    except (NotFound, NotReady) as e:
        param = "corpus" if body.corpus else "model"
        code = "model_not_found" if isinstance(e, NotFound) else "model_not_ready"
        raise type(e)(e.message, param=param, code=code) from e
    rid, created, model_id = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), f"kb:{name}"
    segment = body.citation_text == "segment"

    def cites() -> list[dict]:
        return [trim_citation(c, segment) for c in answer.citations()]

    if body.stream:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id}

        def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], **extra}

        def finish(ev: Finished) -> list[dict]:
            return closing_chunks(body, head, chunk({}, ev.reason, citations=cites()), ev)

        return sse(
            request,
            kb,
            answer,
            rid,
            first=chunk({"role": "assistant", "content": ""}),
            delta=lambda text: chunk({"content": text}),
            finish=finish,
        )
    res = await finished_result(kb, answer, request, rid)
    if not isinstance(res, Finished):
        return res
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": res.text},
                "finish_reason": res.reason,
            }
        ],
        "usage": usage(res.prompt_tokens, res.completion_tokens),
        "citations": cites(),
    }
