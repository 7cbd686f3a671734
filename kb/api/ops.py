"""Operations: `/healthz` and `/metrics` (Prometheus: the engine's figures, then the service's)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kb.api.auth import require_admin
from kb.api.deps import get_kb
from kb.api.service_metrics import service_registry
from kb.engine.metrics import EngineMetrics
from kb.service import KnowledgeBase

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz(kb: KnowledgeBase = Depends(get_kb)):
    """ok, or degraded while a shared rank is missing (the survivors serve, or rank 0 when none
    can); with shared ranks, their state (`shared_ranks`: health, the current members, where
    corpora are served, per rank state and bytes)."""
    body = {"status": "ok", "model_loaded": kb._loaded is not None}
    ranks = kb.shared_ranks()
    if ranks is not None:
        body["shared_ranks"] = ranks.to_dict()
        if not ranks.healthy:
            body["status"] = "degraded"
    return body


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(require_admin)],
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(kb: KnowledgeBase = Depends(get_kb)):
    """Prometheus text: vLLM's engine figures under `kb_` (docs/API.md lists them). Carries
    corpus names as labels, so with KB_AUTH=on it needs the admin role (scrape with its key)."""
    engine = kb._engine.metrics if kb._engine is not None else EngineMetrics()
    service = await run_in_threadpool(lambda: generate_latest(service_registry(kb)))
    return PlainTextResponse(
        generate_latest(engine.registry) + service, media_type=CONTENT_TYPE_LATEST
    )
