"""The FastAPI app of the HTTP API: the routers of `kb/api/`, error handling, and the engine's
lifetime. `kb.server` mounts the web app beside it."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline

from kb.api import auth, cache, chat, corpora, inputs, jobs, ops
from kb.api.deps import error
from kb.errors import KBError
from kb.service import KnowledgeBase

log = logging.getLogger(__name__)

ROUTERS = (auth.router, chat.router, corpora.router, ops.router, cache.router, jobs.router)


def create_api(kb: KnowledgeBase | None = None, warm: bool = True) -> FastAPI:
    """The HTTP API alone (`kb.server.create_app` mounts the web app beside it)."""
    kb = kb or KnowledgeBase()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm:  # load the model in the background so the first question is fast
            threading.Thread(target=lambda: kb.engine.start(), daemon=True, name="kb-warm").start()
        yield
        kb.close()

    # /docs and /redoc load Swagger UI and ReDoc from the fastapi-offline package, not a CDN
    app = FastAPIOffline(
        title="kb",
        version="0.1.0",
        lifespan=lifespan,
        description="Shared-context knowledge base: chat over corpora whose KV cache is computed once.",
        dependencies=[Depends(inputs.check_params)],
    )
    app.state.kb = kb
    app.add_middleware(inputs.RequestIdMiddleware)
    app.add_exception_handler(RequestValidationError, inputs.validation_error)

    @app.exception_handler(KBError)
    async def _kb_error(request: Request, exc: KBError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return error(exc.status, exc.message, type(exc).__name__, headers)

    for router in ROUTERS:
        app.include_router(router)
    return app
