"""The server: the HTTP API and the web app side by side in one FastAPI app (the API's routes
match first). The API and the web app do not import each other; this module wires them."""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse

from kb import auth
from kb.api.app import create_api
from kb.service import KnowledgeBase
from kb.uploads import GradioFileGuard, UploadRegistry, caller_owner

_PRIVATE = ("kb.sqlite3", "session.secret", "kv", "files", "models")  # never served by Gradio


def create_app(kb: KnowledgeBase | None = None, warm: bool = True, ui: bool = True) -> FastAPI:
    """The API; with `ui`, the Gradio app at "/" beside it."""
    kb = kb or KnowledgeBase()
    app = create_api(kb, warm)
    if ui:
        mount_ui(app, kb)
    return app


def mount_ui(app: FastAPI, kb: KnowledgeBase) -> None:
    """The Gradio app at "/" of `app`, behind the file guard and, with sign-in on, the login."""
    import gradio as gr

    from ui.app import CSS, build_ui  # the web app (gradio) only where it is mounted

    # Gradio's uploads go to our own folder (never a shared /tmp/gradio), and only files its
    # upload route wrote there, for the caller who uploaded them, reach an event or /file=
    upload_dir = kb.home / "ui-uploads"
    upload_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(upload_dir)
    uploads = UploadRegistry(upload_dir)

    def owner_of(headers, cookies) -> str:
        return caller_owner(kb, headers, cookies)

    def ui_user(request: Request) -> str | None:
        """Gradio's guard: with auth on, only signed-in users (cookie or API key) reach the UI."""
        user = auth.resolve(kb, request.headers, request.cookies)
        return user.name if user is not None else None

    @app.middleware("http")
    async def _login_first(request: Request, call_next):
        if (
            request.method == "GET"
            and request.url.path == "/"
            and auth.auth_on(kb)
            and await run_in_threadpool(auth.resolve, kb, request.headers, request.cookies) is None
        ):
            return RedirectResponse("login", status_code=303)
        return await call_next(request)

    blocks = build_ui(kb, uploads)
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        footer_links=["api"],
        css=CSS,
        auth_dependency=ui_user if auth.auth_on(kb) else None,
        max_file_size=int(kb.settings.max_upload_mb * 2**20),
        run_history=False,
        allowed_paths=[],
        blocked_paths=[str(kb.home / n) for n in _PRIVATE],
    )
    # mounted, the Blocks are never "launched": Gradio's check that an event's file was really
    # uploaded (processing_utils._check_allowed) would return early. Mark them as launch() does.
    blocks.has_launched = True
    blocks.is_running = True
    app.add_middleware(
        GradioFileGuard, registry=uploads, owner_of=owner_of, browser_keys=not auth.auth_on(kb)
    )
