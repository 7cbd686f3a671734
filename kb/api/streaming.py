"""How an answer in flight reaches the client: server-sent events through sse-starlette (keep-alive
comments, `Cache-Control: no-cache`, `X-Accel-Buffering: no`), or one body once it is finished.
Either way a client that goes away aborts its request, so its unique KV is freed at the engine's
next step rather than at max_tokens."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from kb.api.errors import error, error_body
from kb.engine.request import Delta, Finished
from kb.inputs import internal_message
from kb.service import Answer, KnowledgeBase

log = logging.getLogger(__name__)

PING_S = 15.0  # keep-alive comment interval; app.state.sse_ping_s overrides it
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def failure(res: Finished) -> tuple[int, dict] | None:
    """(status, error body) for an answer that did not finish normally, else None. A shared
    rank that stopped mid-answer is a 503 that says so (later requests are served without it)."""
    if res.reason == "error" and res.error_type == "SharedRankError":
        what = (res.error or "").split(";")[0]  # "shared rank N stopped responding during ..."
        msg = internal_message(f"{what}; this answer failed, retry", res.error)
        return 503, error_body(503, msg, code="shared_rank_failed")
    if res.reason == "error":
        msg = internal_message("generation failed", res.error)
        return 500, error_body(500, msg, code="internal_error")
    if res.reason == "abort":
        msg = "the server is shutting down; retry"
        return 503, error_body(503, msg, code="service_unavailable")
    return None


def _data(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False)


def sse(
    request: Request,
    kb: KnowledgeBase,
    answer: Answer,
    rid: str,
    *,
    first: dict | None,
    delta: Callable[[str], dict],
    finish: Callable[[Finished], list[dict]],
) -> EventSourceResponse:
    """`first`, then `delta(text)` per piece of text, then the bodies `finish(result)` returns,
    then `[DONE]`, each as one `data:` event."""

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            if first is not None:
                yield _data(first)
            async for ev in answer.handle:
                if isinstance(ev, Delta):
                    yield _data(delta(ev.text))
                elif isinstance(ev, Finished):
                    finished = True
                    failed = failure(ev)
                    for body in [failed[1]] if failed else finish(ev):
                        yield _data(body)
            yield "[DONE]"
        finally:
            if not finished:  # the client went away mid-stream: free its KV now
                kb.engine.abort(answer.handle)
                log.info("stream %s closed by the client; request aborted", rid)

    ping = getattr(request.app.state, "sse_ping_s", PING_S)
    return EventSourceResponse(events(), ping=ping, headers=HEADERS, sep="\n")


async def _until_disconnect(request: Request) -> None:
    """Return when the client has gone (its connection closed), however long that takes."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def finished_or_gone(kb: KnowledgeBase, answer: Answer, request: Request, rid: str) -> bool:
    """Wait for the answer to finish (True) or the client to disconnect (False, the request is
    aborted). A watcher waits on the connection itself: polling `is_disconnected` between tokens
    missed the disconnect behind the app's middleware, and none came while a request waited."""

    async def drain() -> None:
        async for _ in answer.handle:
            pass

    done, gone = asyncio.create_task(drain()), asyncio.create_task(_until_disconnect(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finished = done.done() and answer.handle.result is not None
    except asyncio.CancelledError:  # the server cancelled the handler (shutdown past its grace)
        kb.engine.abort(answer.handle)
        raise
    finally:
        for t in (done, gone):
            t.cancel()
    if not finished:
        kb.engine.abort(answer.handle)  # the client went away: free its KV now, not at max_tokens
        log.info("request %s: the client closed the connection; aborted", rid)
    return finished


async def finished_result(
    kb: KnowledgeBase, answer: Answer, request: Request, rid: str
) -> Finished | JSONResponse:
    """The finished answer of a request answered in one body, or the error response to send
    instead: 499 when the client went away first (the request is aborted), else the status and
    error of an answer that did not finish normally (`failure`)."""
    if not await finished_or_gone(kb, answer, request, rid):
        return error(499, "client closed the request")
    res = answer.handle.result
    failed = failure(res)
    if failed:
        return error(failed[0], failed[1]["error"]["message"], code=failed[1]["error"]["code"])
    return res
