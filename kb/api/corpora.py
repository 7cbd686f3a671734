"""Corpus and document endpoints: create, list, inspect, delete, upload."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, File, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from kb.api.auth import current_user, require
from kb.api.deps import get_kb
from kb.api.schemas import CorpusCreate
from kb.auth import Forbidden, Principal
from kb.errors import Conflict
from kb.filenames import safe_filename
from kb.ingest.pipeline import accepted_types
from kb.service import KnowledgeBase

router = APIRouter(tags=["corpora"])


@router.get("/v1/corpora")
async def corpora(kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)):
    return [c.to_dict() for c in await run_in_threadpool(lambda: kb.list_corpora(user=user))]


@router.post("/v1/corpora", status_code=201)
async def create_corpus(
    body: CorpusCreate, kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)
):
    visibility = body.visibility or ("public" if user.anonymous else "private")
    if user.anonymous and visibility != "public":
        raise Forbidden(
            "anonymous users make public corpora only; sign in for private or shared ones"
        )
    try:  # one transaction with its shares: an unknown user leaves no corpus behind
        info = await run_in_threadpool(
            lambda: kb.create_corpus(
                body.name, owner=user.id, visibility=visibility, share_with=body.share_with
            )
        )
    except (
        Conflict
    ) as e:  # the same answer whether or not the caller may see the corpus of that name
        raise Conflict(f"the corpus name {body.name!r} is not available; choose another") from e
    return info.to_dict()


@router.get("/v1/corpora/{name}")
async def corpus(
    name: str, kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)
):
    await require(kb, user, name)
    return (await run_in_threadpool(kb.corpus_info, name)).to_dict()


@router.delete("/v1/corpora/{name}", status_code=204)
async def delete_corpus(
    name: str, kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)
):
    await require(kb, user, name, write=True)
    await run_in_threadpool(kb.delete_corpus, name)


@router.get("/v1/corpora/{name}/documents")
async def documents(
    name: str, kb: KnowledgeBase = Depends(get_kb), user: Principal = Depends(current_user)
):
    await require(kb, user, name)

    def listing() -> list[dict]:  # with each document's pages (PDF) and size in bytes
        docs = kb.documents(name)
        facts = kb.ingestor.document_facts([d["id"] for d in docs])
        return [{**d, **facts.get(d["id"], {})} for d in docs]

    return await run_in_threadpool(listing)


@router.post(
    "/v1/corpora/{name}/documents",
    responses={
        202: {"description": "queued (`?wait=false`): the job ids"},
        415: {"description": "every file is of a type kb does not read"},
        422: {"description": "every file failed (each document's error and code)"},
    },
)
async def upload(
    name: str,
    files: list[UploadFile] = File(...),
    wait: bool = True,
    kb: KnowledgeBase = Depends(get_kb),
    user: Principal = Depends(current_user),
):
    """Store the files and queue one ingest job each. By default wait for the jobs and answer
    with each document's result (200, or 422 when all failed); with `?wait=false` answer 202
    at once with the job ids (follow them at /v1/jobs/{id}). A file of a type kb does not read
    is refused before it is stored (code `unsupported_type`, the accepted types named); when
    every file is refused so, the answer is 415."""
    await require(kb, user, name, write=True)
    await run_in_threadpool(kb.corpus_info, name)
    limit = int(kb.settings.max_upload_mb * 2**20)
    with tempfile.TemporaryDirectory(dir=kb.home) as tmp:
        paths = []
        for f in files:
            # the ingest's own sanitiser: no separators, no "..", no control characters, at most
            # 120 characters (a bare Path().name let ".." and 300-character names through: 500)
            safe = safe_filename(f.filename or "upload")
            dest = Path(tmp) / str(len(paths)) / safe  # one folder each: names may repeat
            dest.parent.mkdir()
            with open(
                dest, "wb"
            ) as out:  # copy at most limit+1 bytes: the size check needs no more
                copied = 0
                while chunk := await f.read(1 << 20):
                    out.write(chunk[: limit + 1 - copied])
                    copied += len(chunk)
                    if copied > limit:
                        break
            paths.append(dest)
        jobs = kb.jobs
        subs = await run_in_threadpool(jobs.submit, name, paths)  # copies the files: tmp may go
    if subs and all(s.code == "unsupported_type" for s in subs):
        return JSONResponse(
            {
                "documents": [s.to_dict() for s in subs],
                "jobs": [],
                "accepted_types": accepted_types(kb.settings.allowed_types),
            },
            status_code=415,
        )
    if not wait:
        accepted = any(s.status != "failed" for s in subs)
        return JSONResponse(
            {
                "documents": [s.to_dict() for s in subs],
                "jobs": [s.job_id for s in subs if s.job_id],
            },
            status_code=202 if accepted else 422,
        )
    infos = {
        i.id: i for i in await run_in_threadpool(jobs.wait, [s.job_id for s in subs if s.job_id])
    }
    out = []
    for s in subs:
        info = infos.get(s.job_id) if s.job_id else None
        if info is None:
            out.append(
                {
                    "filename": s.filename,
                    "status": s.status,
                    "document_id": s.document_id,
                    "segments": s.segments,
                    "tokens": s.tokens,
                    "error": s.error,
                    "code": s.code,
                    "job_id": None,
                }
            )
        else:
            ok = info.status == "done"
            out.append(
                {
                    "filename": s.filename,
                    "status": "ready" if ok else "failed",
                    "document_id": info.document_id,
                    "segments": info.segments_total,
                    "tokens": info.tokens,
                    "error": None if ok else (info.error or info.status),
                    "code": info.code,
                    "job_id": info.id,
                }
            )
    status = 200 if any(d["status"] != "failed" for d in out) else 422
    return JSONResponse({"documents": out}, status_code=status)
