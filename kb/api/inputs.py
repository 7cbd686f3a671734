"""The API's side of the input checks (the checks themselves are kb/inputs.py): finite numbers,
and text with no NUL byte, no lone surrogate and no control character (tab and newlines aside in
free text). A bad field is a 400 that names it; the answer never echoes the bad value (a NaN
echoed in FastAPI's 422 made it a 500: "Out of range float values are not JSON compliant").
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kb.errors import KBError
from kb.inputs import new_request_id, request_id, text_problem

log = logging.getLogger(__name__)

BAD_INPUT_TYPES = {
    "finite_number",
    "bad_text",
    "string_unicode",
}  # validation errors answered 400, not 422


def _where(loc: tuple) -> str:
    """The field's name as a client wrote it: no "body", no union branch tags like list[str]."""
    parts = [
        str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or "-" in p))
    ]
    return ".".join(parts) or "body"


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors without the bad values: 400 for non-finite numbers and bad
    text (naming the field), else 422 as before; OpenAI's error shape plus `detail`."""
    errors = exc.errors()
    detail = [
        {
            "loc": list(e.get("loc", ())),
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]
    bad = [d for d in detail if d["type"] in BAD_INPUT_TYPES]  # a union's other branch fails too
    first = (bad or detail or [{"loc": [], "msg": "invalid request", "type": ""}])[0]
    field = _where(tuple(first["loc"]))
    status = 400 if bad else 422
    return JSONResponse(
        {
            "error": {
                "message": f"{field}: {first['msg']}",
                "type": "invalid_request_error",
                "param": field,
            },
            "detail": detail,
        },
        status_code=status,
    )


async def check_params(request: Request) -> None:
    """App-wide dependency: path and query parameters hold no NUL, control character or lone
    surrogate (on PostgreSQL a NUL in a name was a 500 from the driver)."""
    for where, params in (("path", request.path_params), ("query", request.query_params)):
        for key, value in params.items():
            if isinstance(value, str):
                problem = text_problem(value, single_line=True)
                if problem:
                    raise KBError(f"{where} parameter {key!r} {problem}")


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
                        "request_id": rid,
                    }
                },
                status_code=500,
            )
            await resp(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
