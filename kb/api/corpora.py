"""Corpus and document endpoints: create, list, inspect, delete, upload."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, File, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from kb.api.deps import get_kb
from kb.api.schemas import CorpusCreate
from kb.service import KnowledgeBase

router = APIRouter(tags=["corpora"])


@router.get("/v1/corpora")
async def corpora(kb: KnowledgeBase = Depends(get_kb)):
    return [c.to_dict() for c in await run_in_threadpool(kb.list_corpora)]

@router.post("/v1/corpora", status_code=201)
async def create_corpus(body: CorpusCreate, kb: KnowledgeBase = Depends(get_kb)):
    return (await run_in_threadpool(kb.create_corpus, body.name)).to_dict()

@router.get("/v1/corpora/{name}")
async def corpus(name: str, kb: KnowledgeBase = Depends(get_kb)):
    return (await run_in_threadpool(kb.corpus_info, name)).to_dict()

@router.delete("/v1/corpora/{name}", status_code=204)
async def delete_corpus(name: str, kb: KnowledgeBase = Depends(get_kb)):
    await run_in_threadpool(kb.delete_corpus, name)

@router.get("/v1/corpora/{name}/documents")
async def documents(name: str, kb: KnowledgeBase = Depends(get_kb)):
    return await run_in_threadpool(kb.documents, name)

@router.post("/v1/corpora/{name}/documents")
async def upload(name: str, files: list[UploadFile] = File(...), kb: KnowledgeBase = Depends(get_kb)):
    await run_in_threadpool(kb.corpus_info, name)
    limit = int(kb.settings.max_upload_mb * 2**20)
    with tempfile.TemporaryDirectory(dir=kb.home) as tmp:
        paths = []
        for f in files:
            safe = Path((f.filename or "upload").replace("\\", "/")).name or "upload"
            dest = Path(tmp) / str(len(paths)) / safe  # one folder each: names may repeat
            dest.parent.mkdir()
            with open(dest, "wb") as out:  # copy at most limit+1 bytes: the size check needs no more
                copied = 0
                while chunk := await f.read(1 << 20):
                    out.write(chunk[: limit + 1 - copied])
                    copied += len(chunk)
                    if copied > limit:
                        break
            paths.append(dest)
        results = await run_in_threadpool(kb.ingest, name, paths)
    out = [r.__dict__ for r in results]
    status = 200 if any(r.status != "failed" for r in results) else 422
    return JSONResponse({"documents": out}, status_code=status)

