"""What every tab needs: the caller as a Principal, and KBError shown as a Gradio error."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import gradio as gr

from kb.api.auth import principal_for
from kb.auth import Forbidden, Principal
from kb.errors import KBError
from kb.service import KnowledgeBase


def user_of(kb: KnowledgeBase, request: gr.Request | None) -> Principal:
    """The signed-in user of this UI event (cookie or bearer key), or anonymous when auth is off."""
    if request is None:  # called from Python, not through the UI
        return principal_for(kb, {}, {})
    return principal_for(kb, request.headers, request.cookies)


def admin_of(kb: KnowledgeBase, request: gr.Request | None) -> Principal:
    user = user_of(kb, request)
    if not user.is_admin:
        raise Forbidden("admins only")
    return user


def shown_errors(fn: Callable) -> Callable:
    """Turn a KBError into gr.Error, so the user reads its one-line message in the UI."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def agen(*args: Any, **kwargs: Any):
            try:
                async for out in fn(*args, **kwargs):
                    yield out
            except KBError as e:
                raise gr.Error(e.message) from e
        return agen
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def coro(*args: Any, **kwargs: Any):
            try:
                return await fn(*args, **kwargs)
            except KBError as e:
                raise gr.Error(e.message) from e
        return coro

    @functools.wraps(fn)
    def sync(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except KBError as e:
            raise gr.Error(e.message) from e
    return sync


def fmt_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
