"""The FastAPI app: the routers of `kb/api/`, error handling, and the engine's lifetime."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from kb.api import chat, corpora, ops
from kb.api.deps import error
from kb.errors import KBError
from kb.service import KnowledgeBase

log = logging.getLogger(__name__)

ROUTERS = (chat.router, corpora.router, ops.router)


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
        return error(exc.status, exc.message, type(exc).__name__, headers)

    for router in ROUTERS:
        app.include_router(router)
    return app
