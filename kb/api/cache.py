"""Cache admin endpoints: where corpora's shared KV lives, and operations on it by event id.

- `GET /v1/cache` (`?name=`): per corpus tokens, bytes per tier, hits, last use, state.
- `POST /v1/cache/{name}/{op}` (`?tier=` for move): pin, unpin, evict, move, rebuild, delete;
  answers 202 with `{"event_id"}` at once.
- `GET /v1/cache/events/{id}`: the operation's status.

These act on this server's own KV. With `KB_AUTH=on` they need the admin role (403 otherwise).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from kb.api.auth import require_admin
from kb.api.deps import get_kb
from kb.service import KnowledgeBase

router = APIRouter(tags=["cache"], dependencies=[Depends(require_admin)])


@router.get("/v1/cache")
async def cache_list(name: str | None = None, kb: KnowledgeBase = Depends(get_kb)):
    return [r.to_dict() for r in await run_in_threadpool(kb.cache_admin.lookup, name)]


@router.post("/v1/cache/{name}/{op}", status_code=202)
async def cache_op(
    name: str, op: str, tier: str | None = None, kb: KnowledgeBase = Depends(get_kb)
):
    return {"event_id": await run_in_threadpool(kb.cache_admin.submit, op, name, tier)}


@router.get("/v1/cache/events/{event_id}")
async def cache_event(event_id: str, kb: KnowledgeBase = Depends(get_kb)):
    return (await run_in_threadpool(kb.cache_admin.event, event_id)).to_dict()
