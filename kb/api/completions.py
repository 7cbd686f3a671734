"""The legacy `/v1/completions`: a raw prompt continued by the served model alone (no chat
template, no corpus as context), streaming over SSE and not. `model` is a model of `/v1/models`
the caller may read, or the base model's name."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from kb.api.auth import current_user, require
from kb.api.chat import closing_chunks, sampling
from kb.api.deps import get_kb
from kb.api.openapi import STREAM_RESPONSE
from kb.api.responses import Completion, usage
from kb.api.schemas import CompletionRequest
from kb.api.streaming import finished_result, sse
from kb.auth import Principal
from kb.engine.request import Finished
from kb.errors import KBError, NotFound
from kb.service import Answer, KnowledgeBase

router = APIRouter(tags=["completions"])


def base_model_id(kb: KnowledgeBase) -> str:
    return Path(kb.settings.model).name


async def _check_model(kb: KnowledgeBase, user: Principal, model: str) -> None:
    if model == base_model_id(kb):
        return
    try:
        await require(kb, user, model.removeprefix("kb:"))
    except NotFound as e:
        raise NotFound(
            f"the model {model!r} does not exist", param="model", code="model_not_found"
        ) from e


@router.post("/v1/completions", response_model=Completion, responses={200: STREAM_RESPONSE})
async def completions(
    body: CompletionRequest,
    request: Request,
    kb: KnowledgeBase = Depends(get_kb),
    user: Principal = Depends(current_user),
):
    """Continue `prompt` with the model alone (OpenAI's legacy completions; `echo` prepends the
    prompt). With `stream`, server-sent events of `text_completion` chunks."""
    prompt = body.prompt_text()
    if not prompt:
        raise KBError("prompt: the prompt is empty", param="prompt", code="invalid_value")
    await _check_model(kb, user, body.model)
    sp = sampling(kb, body, body.max_tokens)
    loop = asyncio.get_running_loop()
    await run_in_threadpool(lambda: kb.engine.start())
    answer: Answer = await run_in_threadpool(kb.generate, prompt, sp, loop)
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    echoed = prompt if body.echo else ""

    def choice(text: str, finish: str | None = None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    if body.stream:

        def finish(ev: Finished) -> list[dict]:
            return closing_chunks(body, head, {**head, "choices": [choice("", ev.reason)]}, ev)

        return sse(
            request,
            kb,
            answer,
            rid,
            first={**head, "choices": [choice(echoed)]} if echoed else None,
            delta=lambda text: {**head, "choices": [choice(text)]},
            finish=finish,
        )
    res = await finished_result(kb, answer, request, rid)
    if not isinstance(res, Finished):
        return res
    return {
        **head,
        "choices": [choice(echoed + res.text, res.reason)],
        "usage": usage(res.prompt_tokens, res.completion_tokens),
    }
