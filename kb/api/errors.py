"""One error envelope for every answer that is not a success, in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}` (the `openai` client raises its exception class
for the status and carries `message`). Validation errors are 400 naming the field, as OpenAI
answers them; FastAPI's own 404/405 and every KBError take the same shape."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from kb.api.schemas import UNSUPPORTED
from kb.errors import KBError

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable_error",
}
CODES = {
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong, for a person")
    type: str = Field(description="the error's class, e.g. invalid_request_error")
    param: str | None = Field(default=None, description="the request field at fault, if one is")
    code: str | None = Field(default=None, description="a short machine-readable reason")


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


def error_body(
    status: int, message: str, kind: str | None = None, param: str | None = None, code=None
) -> dict:
    kind = kind or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(
    status: int,
    message: str,
    kind: str | None = None,
    headers=None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """An error answer in the envelope (`kind` defaults to the status's type)."""
    return JSONResponse(
        error_body(status, message, kind, param, code or CODES.get(status)),
        status_code=status,
        headers=headers,
    )


async def kb_error(request: Request, exc: KBError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return error(exc.status, exc.message, headers=headers, param=exc.param, code=exc.code)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method) in the envelope."""
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return error(exc.status_code, message, headers=getattr(exc, "headers", None))


def _where(loc: tuple) -> str:
    """The field's name as a client wrote it: no "body", no union branch tags like list[str]."""
    parts = [
        str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or "-" in p))
    ]
    return ".".join(parts) or "body"


BAD_INPUT_TYPES = {"finite_number", "bad_text", "string_unicode"}  # named before other errors


def _code(kind: str) -> str:
    if kind == "missing":
        return "missing_required_parameter"
    if kind in ("json_invalid", "model_attributes_type") or kind.startswith("json"):
        return "invalid_json"
    return "invalid_value"


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors as a 400 naming the first bad field, without the bad value
    (a NaN echoed back made a 500: "Out of range float values are not JSON compliant")."""
    errors = [
        {"loc": tuple(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
        for e in exc.errors()
    ]
    bad = [e for e in errors if e["type"] in BAD_INPUT_TYPES]  # a union's other branch fails too
    first = (bad or errors or [{"loc": (), "msg": "invalid request", "type": ""}])[0]
    field = _where(first["loc"])
    code = _code(first["type"])
    if first["type"] == "json_invalid":
        message, field = "the body is not valid JSON", None
    elif field.split(".")[0] in UNSUPPORTED and first["type"] not in BAD_INPUT_TYPES:
        field = field.split(".")[0]  # the parameter, as OpenAI names it
        message = f"{field}: kb does not support this value ({first['msg']})"
        code = "unsupported_parameter"
    else:
        message = f"{field}: {first['msg']}"
    return error(400, message, param=field, code=code)
