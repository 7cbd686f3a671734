"""The API's side of the input checks (the checks themselves are kb/inputs.py): path and query
parameters with no NUL byte, no lone surrogate and no control character, and the request id of
every answer. A bad body field is a 400 that names it (kb/api/errors.py).
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kb.errors import KBError
from kb.inputs import new_request_id, request_id, text_problem

log = logging.getLogger(__name__)


async def check_params(request: Request) -> None:
    """App-wide dependency: path and query parameters hold no NUL, control character or lone
    surrogate (on PostgreSQL a NUL in a name was a 500 from the driver)."""
    for where, params in (("path", request.path_params), ("query", request.query_params)):
        for key, value in params.items():
            if isinstance(value, str):
                problem = text_problem(value, single_line=True)
                if problem:
                    raise KBError(f"{where} parameter {key!r} {problem}", param=key)


class RequestIdMiddleware:
    """Every HTTP answer carries `X-Request-ID`; an unexpected error is logged for the admin with
    its traceback under that id, and the caller reads only the id (no SQL, path or traceback).
    Ids a caller sends are ignored: they could forge another's."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        token = request_id.set(rid)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.error(
                "request %s: %s %s failed",
                rid,
                scope.get("method"),
                scope.get("path"),
                exc_info=exc,
            )
            if started:
                raise
            resp = JSONResponse(
                {
                    "error": {
                        "message": f"internal error (request id {rid})",
                        "type": "server_error",
                        "param": None,
                        "code": "internal_error",
                        "request_id": rid,
                    }
                },
                status_code=500,
            )
            await resp(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
