"""Ingest job endpoints: list, inspect, cancel, retry (per document). A job is visible to
whoever may read its corpus; cancelling or retrying it needs write access to the corpus."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from kb.api.auth import current_user, require
from kb.api.deps import get_kb
from kb.auth import Principal
from kb.errors import KBError
from kb.jobs import JobInfo
from kb.service import KnowledgeBase

router = APIRouter(tags=["jobs"])


async def _job(kb: KnowledgeBase, user: Principal, job_id: str, write: bool = False) -> JobInfo:
    info = await run_in_threadpool(kb.jobs.queue.get, job_id)
    if info.corpus is not None:
        await require(kb, user, info.corpus, write=write)
    return info


@router.get("/v1/jobs")
async def list_jobs(
    corpus: str | None = None,
    kb: KnowledgeBase = Depends(get_kb),
    user: Principal = Depends(current_user),
):
    """Newest first, with each document's stage, percent, ETA and k/n segments prefilled."""
    if corpus is not None:
        await require(kb, user, corpus)
    rows = await run_in_threadpool(kb.jobs.queue.list, corpus)
    readable: dict[str, bool] = {}
    out = []
    for r in rows:
        if r.corpus is not None and r.corpus not in readable:
            try:
                await require(kb, user, r.corpus)
                readable[r.corpus] = True
            except KBError:
                readable[r.corpus] = False
        if r.corpus is None or readable[r.corpus]:
            out.append(r.to_dict())
    return out


@router.get("/v1/jobs/{job_id}")
async def get_job(
    job_id: str, kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)
):
    return (await _job(kb, user, job_id)).to_dict()


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(
    job_id: str, kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)
):
    await _job(kb, user, job_id, write=True)
    return (await run_in_threadpool(kb.jobs.queue.cancel, job_id)).to_dict()


@router.post("/v1/jobs/{job_id}/retry", status_code=202)
async def retry_job(
    job_id: str, kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)
):
    """Queue the job's document again as a new job (returned); it resumes from its stored segments."""
    await _job(kb, user, job_id, write=True)
    jobs = kb.jobs
    info = await run_in_threadpool(jobs.queue.retry, job_id)
    if jobs.in_process:
        jobs.start_local_worker()
    return info.to_dict()
