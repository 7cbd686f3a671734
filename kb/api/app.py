"""The FastAPI app of the HTTP API: the routers of `kb/api/`, error handling, and the engine's
lifetime. `kb.server` mounts the web app beside it."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from kb.api import auth, cache, chat, completions, corpora, errors, inputs, jobs, openapi, ops
from kb.api.streaming import PING_S
from kb.errors import KBError
from kb.service import KnowledgeBase

log = logging.getLogger(__name__)

ROUTERS = (
    auth.router,
    chat.router,
    completions.router,
    corpora.router,
    ops.router,
    cache.router,
    jobs.router,
)


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
        responses=openapi.ERROR_RESPONSES,
    )
    app.state.kb = kb
    app.state.sse_ping_s = PING_S
    app.add_middleware(inputs.RequestIdMiddleware)
    # one error envelope for every error (kb/api/errors.py)
    app.add_exception_handler(RequestValidationError, errors.validation_error)
    app.add_exception_handler(HTTPException, errors.http_error)
    app.add_exception_handler(KBError, errors.kb_error)
    for router in ROUTERS:
        app.include_router(router)
    openapi.install(app)
    return app
