"""The FastAPI app: `/v1/chat/completions` and `/v1/models` in OpenAI's shapes (a corpus is a
model named `kb:NAME`), corpus and document endpoints, `/metrics` and `/healthz`."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kb.api.schemas import ChatRequest, CorpusCreate
from kb.engine.request import Delta, Finished
from kb.engine.sequence import SamplingParams
from kb.errors import KBError
from kb.service import Answer, KnowledgeBase

log = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def create_app(kb: KnowledgeBase | None = None, warm: bool = True) -> FastAPI:
    kb = kb or KnowledgeBase()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm:  # load the model in the background so the first question is fast
            threading.Thread(target=lambda: kb.engine.start(), daemon=True, name="kb-warm").start()
        yield
        kb.close()

    app = FastAPI(title="kb", version="0.1.0", lifespan=lifespan,
                  description="Shared-context knowledge base: chat over corpora whose KV cache is computed once.")
    app.state.kb = kb

    @app.exception_handler(KBError)
    async def _kb_error(request: Request, exc: KBError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return _error(exc.status, exc.message, type(exc).__name__, headers)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model_loaded": kb._loaded is not None}

    @app.get("/v1/models")
    async def models():
        rows = await run_in_threadpool(kb.list_corpora)
        return {"object": "list", "data": [
            {"id": f"kb:{c.name}", "object": "model", "created": int(c.created_at.timestamp()) if c.created_at else 0,
             "owned_by": "kb"} for c in rows if c.status == "ready"]}

    @app.get("/v1/corpora")
    async def corpora():
        return [c.to_dict() for c in await run_in_threadpool(kb.list_corpora)]

    @app.post("/v1/corpora", status_code=201)
    async def create_corpus(body: CorpusCreate):
        return (await run_in_threadpool(kb.create_corpus, body.name)).to_dict()

    @app.get("/v1/corpora/{name}")
    async def corpus(name: str):
        return (await run_in_threadpool(kb.corpus_info, name)).to_dict()

    @app.delete("/v1/corpora/{name}", status_code=204)
    async def delete_corpus(name: str):
        await run_in_threadpool(kb.delete_corpus, name)

    @app.get("/v1/corpora/{name}/documents")
    async def documents(name: str):
        return await run_in_threadpool(kb.documents, name)

    @app.post("/v1/corpora/{name}/documents")
    async def upload(name: str, files: list[UploadFile] = File(...)):
        await run_in_threadpool(kb.corpus_info, name)
        limit = int(kb.settings.max_upload_mb * 2**20)
        with tempfile.TemporaryDirectory(dir=kb.home) as tmp:
            paths = []
            for f in files:
                safe = Path((f.filename or "upload").replace("\\", "/")).name or "upload"
                dest = Path(tmp) / str(len(paths)) / safe  # one folder each: names may repeat
                dest.parent.mkdir()
                with open(dest, "wb") as out:  # copy at most limit+1 bytes: the size check needs no more
                    copied = 0
                    while chunk := await f.read(1 << 20):
                        copied += len(chunk)
                        if copied > limit + 1:
                            break
                        out.write(chunk)
                paths.append(dest)
            results = await run_in_threadpool(kb.ingest, name, paths)
        out = [r.__dict__ for r in results]
        status = 200 if any(r.status != "failed" for r in results) else 422
        return JSONResponse({"documents": out}, status_code=status)

    @app.get("/metrics")
    async def metrics():
        registry = kb._engine.metrics.registry if kb._engine is not None else CollectorRegistry()
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        msgs = [m.model_dump() for m in body.messages]
        if msgs[-1]["role"] != "user":
            raise KBError("the last message must be the user's question")
        history = [m for m in msgs[:-1] if m["role"] in ("user", "assistant")]
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        max_tokens = body.max_completion_tokens or body.max_tokens or kb.settings.max_tokens
        sp = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            max_tokens=max_tokens, stop=stop, seed=body.seed)
        name = body.corpus_name()
        loop = asyncio.get_running_loop()
        await run_in_threadpool(lambda: kb.engine.start())
        answer: Answer = await run_in_threadpool(kb.ask, name, msgs[-1]["content"], sp, history, loop)
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), f"kb:{name}"
        if body.stream:
            return StreamingResponse(_sse(kb, answer, request, rid, created, model), media_type="text/event-stream")
        try:
            async for _ in answer.handle:
                if await request.is_disconnected():
                    kb.engine.abort(answer.handle)
                    return _error(499, "client closed the request")
        except asyncio.CancelledError:
            kb.engine.abort(answer.handle)
            raise
        res = answer.handle.result
        if res.reason == "error":
            return _error(500, f"generation failed: {res.error}", "server_error")
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                         "finish_reason": res.reason}],
            "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                      "total_tokens": res.prompt_tokens + res.completion_tokens},
            "citations": answer.citations(),
        }

    return app


async def _sse(kb: KnowledgeBase, answer: Answer, request: Request, rid: str, created: int, model: str):
    """Server-sent events in OpenAI's chunk format; the last chunk carries citations and usage."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in answer.handle:
            if isinstance(ev, Delta):
                yield chunk({"content": ev.text})
            elif isinstance(ev, Finished):
                finished = True
                usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                         "total_tokens": ev.prompt_tokens + ev.completion_tokens}
                if ev.reason == "error":
                    yield f"data: {json.dumps({'error': {'message': f'generation failed: {ev.error}'}})}\n\n"
                else:
                    yield chunk({}, ev.reason, usage=usage, citations=answer.citations())
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: free its KV now
            kb.engine.abort(answer.handle)
            log.info("stream %s closed by the client; request aborted", rid)
