"""What every tab needs: the caller as a Principal, and KBError shown as a Gradio error."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from kb.service import (
    Forbidden,
    KBError,
    KnowledgeBase,
    Principal,
    auth_on,
    check_text,
    new_request_id,
    principal_for,
)

log = logging.getLogger(__name__)


def user_of(kb: KnowledgeBase, request: gr.Request | None) -> Principal:
    """The signed-in user of this UI event (cookie or bearer key), or anonymous when auth is off."""
    if request is None:  # called from Python, not through the UI
        return principal_for(kb, {}, {})
    return principal_for(kb, request.headers, request.cookies)


def local_user(kb: KnowledgeBase) -> bool:
    """Sign-in off: one local user, who may do everything (the admin API answers them too)."""
    return not auth_on(kb)


def may_administer(kb: KnowledgeBase, user: Principal) -> bool:
    """Admins, and with sign-in off the local user."""
    return user.is_admin or local_user(kb)


def admin_of(kb: KnowledgeBase, request: gr.Request | None) -> Principal:
    user = user_of(kb, request)
    if not may_administer(kb, user):
        raise Forbidden("admins only")
    return user


def _checked(fn: Callable, args: tuple, kwargs: dict) -> None:
    """Every text argument of a UI event is checked before the handler runs: a NUL byte, lone
    surrogate or control character is a one-line error naming the parameter (a NUL reached
    PostgreSQL and the user read the SQL statement). Chat history is checked by the chat
    handlers themselves (answers may hold control characters the model wrote)."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    for name, value in bound.items():
        if name in ("self", "messages") or isinstance(value, gr.Request):
            continue
        check_text(value, name)


def _shown(e: Exception) -> gr.Error:
    """What the user reads: a KBError's message, or for anything else an id for the admin's log
    (never SQL, a path or a traceback)."""
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, KBError):
        return gr.Error(e.message)
    rid = new_request_id()
    log.error("web app event %s failed", rid, exc_info=e)
    return gr.Error(f"internal error (request id {rid}); the administrator's log has the details")


def error_words(e: Exception) -> str:
    """What the user reads of an error said in a status line instead of a toast (no error
    badge is then left on the form's fields once the input is fixed)."""
    return _shown(e).message


def shown_errors(fn: Callable) -> Callable:
    """Check the event's text arguments, and turn errors into gr.Error: a KBError's one-line
    message, anything else an internal error with a request id (logged with its traceback)."""
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def agen(*args: Any, **kwargs: Any):
            try:
                _checked(fn, args, kwargs)
                async for out in fn(*args, **kwargs):
                    yield out
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                raise _shown(e) from e

        return agen
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def coro(*args: Any, **kwargs: Any):
            try:
                _checked(fn, args, kwargs)
                return await fn(*args, **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                raise _shown(e) from e

        return coro

    @functools.wraps(fn)
    def sync(*args: Any, **kwargs: Any):
        try:
            _checked(fn, args, kwargs)
            return fn(*args, **kwargs)
        except Exception as e:
            raise _shown(e) from e

    return sync


def fmt_bytes(n: int | float) -> str:
    """A size in words: "512 B", "1.5 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
