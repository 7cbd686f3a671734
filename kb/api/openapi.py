"""What the served OpenAPI schema says beyond the routes: the error envelope on every operation
(validation errors as 400, not FastAPI's 422), server-sent events beside a JSON 200, and the
bearer scheme of API keys (optional with KB_AUTH=off)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kb.api.errors import ErrorResponse

STREAM_RESPONSE = {
    "description": "The answer; with `stream`, server-sent events (one JSON chunk per `data:` "
    "line, then `data: [DONE]`)",
    # before OpenAPI 3.2 (no `itemSchema`) a text/event-stream `schema` describes one event
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "properties": {
                    "data": {"type": "string", "description": "one JSON chunk, or [DONE]"},
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                    "retry": {"type": "integer"},
                },
            }
        }
    },
}

ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "Bad request: the field at fault is `error.param`"),
        (401, "Missing or wrong credentials (with KB_AUTH=on)"),
        (403, "Not allowed"),
        (404, "No such corpus, model, document or route"),
        (409, "Conflict, or the corpus is not ready"),
        (413, "The request body is too large"),
        (429, "Too many requests waiting (see Retry-After)"),
        (500, "Internal error (its request id is logged for the admin)"),
        (503, "The server is shutting down"),
    )
}


def install(app: FastAPI) -> None:
    """Serve the schema with the bearer scheme and without FastAPI's 422 validation answer."""

    def schema() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for path in spec.get("paths", {}).values():
            for op in path.values():
                if isinstance(op, dict) and "responses" in op:
                    op["responses"].pop("422", None)
        schemas = spec.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        spec.setdefault("components", {})["securitySchemes"] = {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key (kb_...); optional with KB_AUTH=off",
            }
        }
        spec["security"] = [{"bearerAuth": []}, {}]
        app.openapi_schema = spec
        return spec

    app.openapi = schema
