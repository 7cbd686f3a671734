"""Which files the mounted web app may take in and hand out: only those this caller uploaded
through Gradio's `/gradio_api/upload` in this server's life, kept in our own upload folder.

`mount_gradio_app` never marks the Blocks as launched, so Gradio's own "was it uploaded?" check
returns early and an event handed `{"path": "/etc/passwd"}` reads the server's file (issue 15).
`GradioFileGuard` sits in front of every Gradio route: it records each upload's owner, refuses
any event body that names a file the caller did not upload (at any depth, file parts of chat
messages included), serves `/gradio_api/file=` only for the caller's own uploads, and closes
the generic routes this app does not use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kb.auth import AuthContext, principal_for

log = logging.getLogger(__name__)

API = "/gradio_api"
BROWSER_COOKIE = "kb_browser"  # random key of an anonymous visitor's browser (sign-in off)
MAX_EVENT_BODY = 16 * 2**20  # an event's JSON body; uploads go through /upload, not here
# Gradio routes this app has no use for: each can read or write files or others' state
CLOSED = (
    "/deep_link",
    "/process_recording",
    "/proxy=",
    "/vibe-edit",
    "/undo-vibe-edit",
    "/vibe-code",
    "/run-history",
    "/runs",
    "/dev/reload",
    "/custom_component",
)
FILE_ROUTES = ("/file=", "/file/")
NOT_UI = ("/v1/", "/metrics", "/healthz", "/docs", "/redoc", "/openapi.json", "/login", "/logout")


def new_browser_key() -> str:
    """A fresh anonymous browser key (the cookie's value): random, never sequential."""
    return secrets.token_urlsafe(24)


def browser_owner(key: str) -> str:
    """The owner key stored for an anonymous browser: a hash, so a leaked row names no cookie."""
    return "anon:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def caller_owner(kb: AuthContext, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str:
    """The owner key of a request: "user:ID" when signed in; with sign-in off, the anonymous
    browser's key from its cookie ("nobody" without one). Raises Unauthorized with sign-in on
    and no credentials."""
    user = principal_for(kb, headers, cookies)
    if not user.anonymous:
        return f"user:{user.id}"
    key = cookies.get(BROWSER_COOKIE)
    return browser_owner(key) if key else "nobody"


class UploadRegistry:
    """Paths that Gradio's upload route wrote, each with the owner key of who uploaded it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(os.path.realpath(folder))
        self._owner: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, path: str, owner: str) -> None:
        with self._lock:
            self._owner[os.path.abspath(path)] = owner

    def inside(self, path: str) -> bool:
        """In the upload folder, with no symlink on the way (the real path is the path)."""
        abs_path = os.path.abspath(path)
        real = os.path.realpath(abs_path)
        if real != abs_path:
            return False
        try:
            Path(real).relative_to(self.folder)
        except ValueError:
            return False
        return real != str(self.folder)

    def allowed(self, path: str, owner: str) -> bool:
        """May `owner` hand this path to an event or fetch it: inside our folder, no link, a
        regular file, and uploaded by `owner`."""
        if not isinstance(path, str) or not path or "\x00" in path or not self.inside(path):
            return False
        with self._lock:
            if self._owner.get(os.path.abspath(path)) != owner:
                return False
        return os.path.isfile(path) and not os.path.islink(path)


def file_paths(data: Any) -> list[str]:
    """Every file object's path in an event body, at any depth: a dict with a "path" key (what
    Gradio's FileData and chat file parts look like), or a component part carrying a value."""
    out: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            p = x.get("path")
            if p is not None:
                out.append(p if isinstance(p, str) else repr(p))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data)
    return out


def _cookie(scope: Scope, name: str) -> str | None:
    raw = Headers(scope=scope).get("cookie")
    return cookie_parser(raw).get(name) if raw else None


class GradioFileGuard:
    """ASGI middleware for the app that mounts Gradio at `prefix` (see the module docstring).

    `owner_of(headers, cookies)` names the caller ("user:ID" or an anonymous browser's key);
    it is sync (it may read the database) and runs in a thread.
    """

    def __init__(
        self,
        app: ASGIApp,
        registry: UploadRegistry,
        owner_of: Callable[[Headers, dict], str],
        prefix: str = "",
        browser_keys: bool = True,
    ):
        self.app, self.registry, self.owner_of = app, registry, owner_of
        self.api = prefix.rstrip("/") + API
        self.browser_keys = browser_keys  # sign-in off: anonymous visitors need a browser key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope, send = self._browser_cookie(scope, send)
        path: str = scope["path"]
        if not path.startswith(self.api + "/"):
            return await self.app(scope, receive, send)
        sub = path[len(self.api) :]
        if sub.startswith(CLOSED):
            return await _refuse(scope, receive, send, 404, "not found")
        method = scope["method"]
        if sub.startswith(FILE_ROUTES) and method in ("GET", "HEAD"):
            target = unquote(
                sub[len("/file=") :] if sub.startswith("/file=") else sub[len("/file/") :]
            )
            if not self.registry.allowed(target, await self._owner(scope)):
                return await _refuse(scope, receive, send, 404, "no such file")
            return await self.app(scope, receive, send)
        if method == "POST" and sub.rstrip("/") == "/upload":
            return await self._upload(scope, receive, send)
        if method == "POST":
            return await self._event(scope, receive, send)
        return await self.app(scope, receive, send)

    def _browser_cookie(self, scope: Scope, send: Send) -> tuple[Scope, Send]:
        """Give a browser without one its random key: in this request's cookies (so this very
        request is owned by it) and in the response's Set-Cookie."""
        if (
            not self.browser_keys
            or scope["path"].startswith(NOT_UI)
            or _cookie(scope, BROWSER_COOKIE)
        ):
            return scope, send
        key = new_browser_key()
        headers = [(k, v) for k, v in scope["headers"] if k != b"cookie"]
        old = Headers(scope=scope).get("cookie")
        headers.append(
            (
                b"cookie",
                (f"{old}; " if old else "").encode("latin-1") + f"{BROWSER_COOKIE}={key}".encode(),
            )
        )
        scope = {**scope, "headers": headers}
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        set_cookie = (
            f"{BROWSER_COOKIE}={key}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax{secure}"
        )

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"set-cookie", set_cookie.encode("latin-1")),
                    ],
                }
            await send(message)

        return scope, send_with_cookie

    async def _owner(self, scope: Scope) -> str:
        from starlette.concurrency import run_in_threadpool

        headers = Headers(scope=scope)
        cookies = cookie_parser(headers.get("cookie") or "")
        try:
            return await run_in_threadpool(self.owner_of, headers, cookies)
        except Exception:  # unauthenticated: Gradio's own login check answers 401 next
            return "nobody"

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Let Gradio store the files (it enforces max_file_size), then record their owner."""
        owner = await self._owner(scope)
        start: Message = {}
        body = bytearray()

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if message.get("more_body"):
                    return
                if start.get("status") == 200:
                    try:
                        paths = json.loads(body)
                    except ValueError:
                        paths = []
                    for p in paths if isinstance(paths, list) else []:
                        if isinstance(p, str):
                            self.registry.add(p, owner)
                await send(start)
                await send({"type": "http.response.body", "body": bytes(body)})
                return
            await send(message)

        await self.app(scope, receive, capture)

    async def _event(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the whole JSON body; refuse it if it names a file that is not the caller's."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_EVENT_BODY:
                return await _refuse(scope, None, send, 413, "the request body is too large")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        ctype = Headers(scope=scope).get("content-type") or ""
        if raw and "json" in ctype:
            try:
                data = json.loads(raw)
            except ValueError:
                return await _refuse(scope, None, send, 400, "the body is not valid JSON")
            paths = file_paths(data)
            if paths:
                owner = await self._owner(scope)
                foreign = [p for p in paths if not self.registry.allowed(p, owner)]
                if foreign:
                    log.warning(
                        "refused an event naming %d file(s) not uploaded by %s: %s",
                        len(foreign),
                        owner,
                        [p[:200] for p in foreign[:5]],
                    )
                    return await _refuse(
                        scope,
                        None,
                        send,
                        403,
                        "files must be uploaded through this app by you first",
                    )
        elif raw and "multipart" in ctype:
            return await _refuse(scope, None, send, 415, "upload files through /gradio_api/upload")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(
    scope: Scope, receive: Receive | None, send: Send, status: int, message: str
) -> None:
    resp = JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large" if status == 413 else None,
            },
            "detail": message,
        },
        status_code=status,
    )
    await resp(scope, receive or _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
