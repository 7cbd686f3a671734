"""Who is calling, as FastAPI dependencies (the resolving itself is kb/auth.py, shared with the
web app): `Authorization: Bearer <API key>` or the session cookie; sign-in pages.

With KB_AUTH=on a request without valid credentials gets 401 (the UI page redirects to
/login). With KB_AUTH=off valid credentials still name the user (so an admin can sign in),
and everyone else is the anonymous user, who reads public corpora and makes public ones.
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Depends, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from kb.api.deps import get_kb
from kb.auth import (
    SESSION_COOKIE,
    SESSION_TTL_S,
    Forbidden,
    Principal,
    auth_on,
    authenticate,
    check_read,
    check_write,
    make_session_token,
    principal_for,
    secret_of,
)
from kb.errors import NotFound
from kb.inputs import text_problem
from kb.service import KnowledgeBase
from storage.models import Corpus

router = APIRouter(tags=["auth"])


async def current_user(request: Request, kb: KnowledgeBase = Depends(get_kb)) -> Principal:
    """FastAPI dependency: the Principal making this request."""
    return await run_in_threadpool(principal_for, kb, request.headers, request.cookies)


_LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>Sign in · kb</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;display:grid;place-items:center;height:90vh;background:#f6f7f9}}
form{{background:#fff;padding:2rem 2.5rem;border-radius:12px;box-shadow:0 2px 12px #0002;
  display:grid;gap:.7rem;min-width:18rem}}
input{{padding:.55rem;font-size:1rem;border:1px solid #ccd;border-radius:6px}}
button{{padding:.6rem;font-size:1rem;background:#f97316;color:#fff;border:0;border-radius:6px;cursor:pointer}}
.err{{color:#b91c1c}}</style></head><body>
<form method="post" action="login"><h2 style="margin:0">Sign in to kb</h2>{error}
<label>User <input name="name" id="name" autocomplete="username" required autofocus></label>
<label>Password <input name="password" id="password" type="password" autocomplete="current-password" required></label>
<button type="submit" id="signin">Sign in</button></form></body></html>"""


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
async def login_page(error: str = ""):
    msg = f'<p class="err">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(_LOGIN.format(error=msg))


@router.post("/login", include_in_schema=False)
async def login(
    request: Request,
    name: str = Form(...),
    password: str = Form(...),
    kb: KnowledgeBase = Depends(get_kb),
):
    bad = text_problem(name, single_line=True) or text_problem(password)  # never to the database
    user = None if bad else await run_in_threadpool(authenticate, kb.db, name, password)
    if user is None:
        return HTMLResponse(
            _LOGIN.format(error='<p class="err">Wrong user name or password.</p>'), status_code=401
        )
    token = await run_in_threadpool(make_session_token, kb.db, secret_of(kb), user)
    resp = RedirectResponse("./", status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_TTL_S,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return resp


@router.api_route("/logout", methods=["GET", "POST"], include_in_schema=False)
async def logout():
    resp = RedirectResponse("login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE)
    return resp


@router.get("/v1/me")
async def me(user: Principal = Depends(current_user)):
    """Who the credentials name: {"name", "admin", "anonymous"}."""
    return {"name": user.name, "admin": user.is_admin, "anonymous": user.anonymous}


def _check(kb: KnowledgeBase, user: Principal, name: str, write: bool) -> None:
    with kb.db.session() as s:
        corpus = s.scalar(select(Corpus).where(Corpus.name == name))
        if corpus is None:
            raise NotFound(f"corpus {name!r} does not exist")
        (check_write if write else check_read)(s, user, corpus)


async def require(kb: KnowledgeBase, user: Principal, name: str, write: bool = False) -> None:
    """Raise unless `user` may read (or, with write, change) corpus `name`."""
    await run_in_threadpool(_check, kb, user, name, write)


async def require_admin(
    user: Principal = Depends(current_user), kb: KnowledgeBase = Depends(get_kb)
) -> Principal:
    """FastAPI dependency for admin operations: with sign-in on, only admins pass; with
    KB_AUTH=off the single local user administers the service."""
    if auth_on(kb) and not user.is_admin:
        raise Forbidden("this operation needs the admin role")
    return user
