"""`/v1/chat/completions` (streaming over SSE and not) and `/v1/models`, in OpenAI's shapes.
A corpus is a model named `kb:NAME` (or named by the extra field `corpus`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from kb.api.auth import current_user
from kb.api.deps import error as _error
from kb.api.deps import get_kb
from kb.api.schemas import ChatRequest
from kb.auth import Principal
from kb.engine.request import Delta, Finished
from kb.engine.sequence import SamplingParams
from kb.errors import KBError
from kb.inputs import internal_message
from kb.service import Answer, KnowledgeBase

log = logging.getLogger(__name__)
router = APIRouter(tags=["chat"])


@router.get("/v1/models")
async def models(kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)):
    rows = await run_in_threadpool(lambda: kb.list_corpora(user=user))
    return {
        "object": "list",
        "data": [
            {
                "id": f"kb:{c.name}",
                "object": "model",
                "created": int(c.created_at.timestamp()) if c.created_at else 0,
                "owned_by": "kb",
            }
            for c in rows
            if c.status == "ready"
        ],
    }


@router.post("/v1/chat/completions")
async def chat(
    body: ChatRequest,
    request: Request,
    kb: KnowledgeBase = Depends(get_kb),
    user: Principal = Depends(current_user),
):
    msgs = [m.model_dump() for m in body.messages]
    if msgs[-1]["role"] != "user":
        raise KBError("the last message must be the user's question")
    history = [m for m in msgs[:-1] if m["role"] in ("user", "assistant")]
    for penalty in ("presence_penalty", "frequency_penalty"):
        if getattr(body, penalty):
            raise KBError(f"{penalty}: kb applies no penalties; send 0 or leave it out")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    max_tokens = body.max_completion_tokens or body.max_tokens or kb.settings.max_tokens
    sp = SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_tokens=max_tokens,
        stop=stop,
        seed=body.seed,
    )
    name = body.corpus_name()
    loop = asyncio.get_running_loop()
    await run_in_threadpool(lambda: kb.engine.start())
    answer: Answer = await run_in_threadpool(
        kb.ask, name, msgs[-1]["content"], sp, history, loop, user=user, dense=body.dense
    )
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), f"kb:{name}"
    if body.stream:
        return StreamingResponse(
            _sse(kb, answer, request, rid, created, model), media_type="text/event-stream"
        )
    try:
        finished = await _finished_or_gone(answer, request)
    except asyncio.CancelledError:  # the server cancelled the handler (shutdown past its grace)
        kb.engine.abort(answer.handle)
        raise
    if not finished:
        kb.engine.abort(answer.handle)  # the client went away: free its KV now, not at max_tokens
        log.info("request %s: the client closed the connection; aborted", rid)
        return _error(499, "client closed the request")
    res = answer.handle.result
    if res.reason == "error":
        return _error(500, internal_message("generation failed", res.error), "server_error")
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": res.text},
                "finish_reason": res.reason,
            }
        ],
        "usage": {
            "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens,
        },
        "citations": answer.citations(),
    }


async def _until_disconnect(request: Request) -> None:
    """Return when the client has gone (its connection closed), however long that takes."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finished_or_gone(answer: Answer, request: Request) -> bool:
    """Wait for the answer to finish (True) or the client to disconnect (False). A watcher
    waits on the connection itself: polling `is_disconnected` between tokens missed the
    disconnect behind the app's middleware, and none came while a request waited in the queue."""

    async def drain() -> None:
        async for _ in answer.handle:
            pass

    done, gone = asyncio.create_task(drain()), asyncio.create_task(_until_disconnect(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        return done.done() and answer.handle.result is not None
    finally:
        for t in (done, gone):
            t.cancel()


async def _sse(
    kb: KnowledgeBase, answer: Answer, request: Request, rid: str, created: int, model: str
):
    """Server-sent events in OpenAI's chunk format; the last chunk carries citations and usage."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in answer.handle:
            if isinstance(ev, Delta):
                yield chunk({"content": ev.text})
            elif isinstance(ev, Finished):
                finished = True
                usage = {
                    "prompt_tokens": ev.prompt_tokens,
                    "completion_tokens": ev.completion_tokens,
                    "total_tokens": ev.prompt_tokens + ev.completion_tokens,
                }
                if ev.reason == "error":
                    msg = internal_message("generation failed", ev.error)
                    yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
                else:
                    yield chunk({}, ev.reason, usage=usage, citations=answer.citations())
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: free its KV now
            kb.engine.abort(answer.handle)
            log.info("stream %s closed by the client; request aborted", rid)
