"""Operations: `/healthz` and `/metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kb.api.deps import get_kb
from kb.service import KnowledgeBase

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz(kb: KnowledgeBase = Depends(get_kb)):
    return {"status": "ok", "model_loaded": kb._loaded is not None}


@router.get("/metrics")
async def metrics(kb: KnowledgeBase = Depends(get_kb)):
    registry = kb._engine.metrics.registry if kb._engine is not None else CollectorRegistry()
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
