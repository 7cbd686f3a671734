"""Shared pieces of the API routers: the knowledge base of the app, and error bodies."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from kb.service import KnowledgeBase


def get_kb(request: Request) -> KnowledgeBase:
    return request.app.state.kb


def error(
    status: int, message: str, kind: str = "invalid_request_error", headers=None
) -> JSONResponse:
    """An error body in OpenAI's shape: {"error": {"message", "type"}}."""
    return JSONResponse(
        {"error": {"message": message, "type": kind}}, status_code=status, headers=headers
    )
