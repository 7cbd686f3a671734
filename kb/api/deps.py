"""Shared pieces of the API routers: the knowledge base of the app, and error answers."""

from __future__ import annotations

from fastapi import Request

from kb.api.errors import error
from kb.service import KnowledgeBase

__all__ = ["error", "get_kb"]


def get_kb(request: Request) -> KnowledgeBase:
    return request.app.state.kb
