"""Corpora tab: create a corpus, drop many files at once, watch each document's stage, percent,
ETA and error live; delete a document; rebuild a stale corpus.

Ingestion runs as jobs when `kb.jobs` is there (progress persisted on the Document rows);
otherwise in a background thread of this process, whose progress callback is tracked here.
"""

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from kb.auth import Principal
from kb.errors import Conflict, KBError
from kb.filenames import safe_filename
from kb.service import KnowledgeBase
from kb.uploads import UploadRegistry, caller_owner
from ui.common import shown_errors, user_of

log = logging.getLogger(__name__)
DOC_COLUMNS = ["id", "document", "stage", "percent", "ETA", "tokens", "error"]


@dataclass
class Live:
    """What the ingest callback last said about one file."""

    stage: str = "queued"
    frac: float = 0.0
    started: float = field(default_factory=time.monotonic)
    prefill_started: float | None = None
    error: str | None = None

    def eta_s(self) -> float | None:
        """Seconds left from this run's prefill rate (None before the rate is known)."""
        if self.stage != "prefilled" or self.prefill_started is None or self.frac <= 0:
            return None
        elapsed = time.monotonic() - self.prefill_started
        return elapsed * (1 - self.frac) / self.frac


class Tracker:
    """Live progress of the ingestions this process runs in threads, per (corpus, filename)."""

    def __init__(self) -> None:
        self._live: dict[tuple[str, str], Live] = {}
        self._lock = threading.Lock()

    def queued(self, corpus: str, names: list[str]) -> None:
        with self._lock:
            for n in names:
                self._live[(corpus, safe_filename(n))] = Live()

    def update(self, corpus: str, filename: str, stage: str, frac: float) -> None:
        with self._lock:
            live = self._live.setdefault((corpus, safe_filename(filename)), Live())
            if stage == "prefilled" and live.prefill_started is None:
                live.prefill_started = time.monotonic()
            live.stage, live.frac = stage, frac

    def done(self, corpus: str, names: list[str]) -> None:
        with self._lock:
            for n in names:
                self._live.pop((corpus, safe_filename(n)), None)

    def of(self, corpus: str) -> dict[str, Live]:
        with self._lock:
            return {f: live for (c, f), live in self._live.items() if c == corpus}


def _writable(kb: KnowledgeBase, user: Principal) -> list[str]:
    return kb.writable_corpora(user)


def _pct(stage: str, db_percent: float, live: Live | None) -> float:
    if stage == "ready":
        return 100.0
    if db_percent:
        return round(db_percent, 1)
    if live is not None and live.stage == "prefilled":
        return round(100 * live.frac, 1)
    return 0.0


def document_rows(kb: KnowledgeBase, tracker: Tracker, user: Principal, name: str) -> list[list]:
    """One row per document (and per file still waiting): stage, percent, ETA, error."""
    docs = [
        (d.id, d.filename, d.stage, d.percent, d.eta_s, d.tokens, d.error)
        for d in kb.document_progress(name, user=user)
    ]
    live = tracker.of(name)
    rows = []
    for did, fname, stage, pct, eta, toks, err in docs:
        lv = live.pop(fname, None)
        if lv is not None and stage not in ("ready", "failed"):
            stage = lv.stage if lv.stage != "queued" else stage
            eta = eta if eta is not None else lv.eta_s()
        rows.append(
            [
                did,
                fname,
                stage,
                _pct(stage, pct, lv),
                "" if eta is None else f"{eta:.0f} s",
                toks,
                err or "",
            ]
        )
    for fname, lv in live.items():  # not yet stored
        rows.append(["", fname, lv.stage, 0.0, "", 0, lv.error or ""])
    return rows


def _ingest_in_thread(
    kb: KnowledgeBase, tracker: Tracker, name: str, folder: Path, paths: list[Path]
) -> None:
    names = [p.name for p in paths]

    def run() -> None:
        try:
            kb.ingest(name, paths, lambda f, stage, frac: tracker.update(name, f, stage, frac))
        except Exception:
            log.exception("ingest into %s failed", name)
        finally:
            tracker.done(name, names)
            shutil.rmtree(folder, ignore_errors=True)

    tracker.queued(name, names)
    threading.Thread(target=run, daemon=True, name=f"kb-ui-ingest-{name}").start()


def start_ingest(
    kb: KnowledgeBase, tracker: Tracker, user: Principal, name: str, files: list[str]
) -> str:
    """Queue the files for ingestion and return at once; progress shows in the document table."""
    kb.check_write(name, user)
    if not files:
        raise KBError("drop one or more files first")
    folder = Path(tempfile.mkdtemp(prefix="ui-upload-", dir=kb.home))
    paths = []
    for i, f in enumerate(
        files
    ):  # copy: Gradio's cache may be cleaned before the ingest reaches it
        src = Path(f)
        dest = folder / str(i) / src.name
        dest.parent.mkdir()
        shutil.copyfile(src, dest)
        paths.append(dest)
    try:
        from kb.jobs import jobs_for
    except ImportError:
        _ingest_in_thread(kb, tracker, name, folder, paths)
        return f"ingesting {len(paths)} file(s) into {name}"
    try:
        subs = jobs_for(kb).submit(name, paths)  # stores each file before it returns
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    failed = [f"{s.filename}: {s.error}" for s in subs if s.status == "failed"]
    return f"queued {len(subs) - len(failed)} file(s) into {name}" + (
        "; " + "; ".join(failed) if failed else ""
    )


def delete_document(kb: KnowledgeBase, user: Principal, name: str, doc_id: int) -> str:
    """Remove a document, its stored file and its KV; the next question loads the new layout."""
    fname = kb.delete_document(name, doc_id, user=user)
    return f"deleted {fname} from {name}"


def rebuild(kb: KnowledgeBase, tracker: Tracker, user: Principal, name: str) -> str:
    """Recompute a corpus's KV from its stored files (after a model or settings change, or a
    damaged KV file): segments whose cache key no longer matches are prefilled again."""
    kb.check_write(name, user)
    try:
        import kb.cache_admin as cache_admin
    except ImportError:
        cache_admin = None
    if cache_admin is not None and hasattr(cache_admin, "submit"):  # the tier manager's rebuild job
        return f"rebuilding {name} (event {cache_admin.submit(kb, 'rebuild', name)})"
    paths = kb.reset_for_rebuild(name)  # refuses while it answers questions
    folder = Path(tempfile.mkdtemp(prefix="ui-rebuild-", dir=kb.home))
    _ingest_in_thread(kb, tracker, name, folder, paths)
    return f"rebuilding {name} from {len(paths)} stored file(s)"


def create_corpus(
    kb: KnowledgeBase, user: Principal, name: str, visibility: str, share_with: str
) -> str:
    if user.anonymous and visibility != "public":
        raise KBError(
            "anonymous users make public corpora only; sign in for private or shared ones"
        )
    name = (name or "").strip()
    try:  # one transaction with its shares: an unknown user leaves no corpus behind
        kb.create_corpus(
            name,
            owner=user.id,
            visibility=visibility,
            share_with=share_with.split(",") if visibility == "shared" else None,
        )
    except (
        Conflict
    ) as e:  # the same answer whether or not the caller may see the corpus of that name
        raise Conflict(f"the corpus name {name!r} is not available; choose another") from e
    return f"created corpus {name} ({visibility})"


def own_uploads(uploads: UploadRegistry, owner: str, files: list[str]) -> list[str]:
    """The files, if every one is the caller's own upload in our upload folder (no link out of
    it); else KBError, naming no path (the web app's file-read hole of issue 15)."""
    for f in files:
        if not uploads.allowed(str(f), owner):
            log.warning("upload event refused a file not uploaded by %s: %.200s", owner, f)
            raise KBError("that file was not uploaded through this app by you: drop it again")
    return files


class CorporaHandlers:
    def __init__(self, kb: KnowledgeBase, uploads: UploadRegistry | None = None):
        self.kb, self.tracker = kb, Tracker()
        self.uploads = uploads or UploadRegistry(kb.home / "ui-uploads")

    async def _run(self, fn, request: gr.Request, *args):
        return await asyncio.to_thread(fn, self.kb, user_of(self.kb, request), *args)

    @shown_errors
    async def corpora(self, current: str | None, request: gr.Request):
        names = await self._run(_writable, request)
        return gr.Dropdown(
            choices=names, value=current if current in names else (names[0] if names else None)
        )

    @shown_errors
    async def create(self, name: str, visibility: str, share_with: str, request: gr.Request):
        msg = await self._run(create_corpus, request, name, visibility, share_with or "")
        names = await self._run(_writable, request)
        return msg, gr.Dropdown(choices=names, value=name.strip()), ""

    @shown_errors
    async def upload(self, name: str | None, files: list[str] | None, request: gr.Request):
        if not name:
            raise KBError("pick or create a corpus first")
        user = user_of(self.kb, request)
        owner = await asyncio.to_thread(caller_owner, self.kb, request.headers, request.cookies)
        paths = own_uploads(self.uploads, owner, [str(f) for f in files or []])
        msg = await asyncio.to_thread(start_ingest, self.kb, self.tracker, user, name, paths)
        return msg, None

    @shown_errors
    async def documents(self, name: str | None, request: gr.Request):
        if not name:
            return pd.DataFrame([], columns=DOC_COLUMNS), ""
        rows = await asyncio.to_thread(
            document_rows, self.kb, self.tracker, user_of(self.kb, request), name
        )
        info = await asyncio.to_thread(self.kb.corpus_info, name)
        summary = (
            f"**{info.name}**: {info.status} · {info.documents} documents · {info.tokens} tokens"
        )
        return pd.DataFrame(rows, columns=DOC_COLUMNS), summary

    @shown_errors
    async def delete(self, name: str | None, doc_id: float | None, request: gr.Request):
        if not name or not doc_id:
            raise KBError("pick a corpus and a document id")
        return await self._run(delete_document, request, name, int(doc_id))

    @shown_errors
    async def rebuild(self, name: str | None, request: gr.Request):
        if not name:
            raise KBError("pick a corpus first")
        return await asyncio.to_thread(
            rebuild, self.kb, self.tracker, user_of(self.kb, request), name
        )


def build_corpora_tab(kb: KnowledgeBase, uploads: UploadRegistry | None = None) -> dict[str, Any]:
    h = CorporaHandlers(kb, uploads)
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### New corpus")
            new_name = gr.Textbox(label="Name", placeholder="handbook", elem_id="new-corpus-name")
            visibility = gr.Radio(
                ["private", "public", "shared"],
                value="private",
                label="Who may read it",
                elem_id="new-corpus-visibility",
            )
            share_with = gr.Textbox(
                label="Shared with (user names, comma-separated)", elem_id="share-with"
            )
            create_btn = gr.Button("Create", elem_id="create-corpus")
        with gr.Column(scale=2):
            corpus = gr.Dropdown(
                label="Corpus", choices=[], elem_id="corpora-corpus", allow_custom_value=True
            )
            files = gr.File(
                label="Drop files here (PDF, DOCX, HTML, Markdown, text)",
                file_count="multiple",
                elem_id="upload",
            )
            status = gr.Markdown(elem_id="corpora-status")
    summary = gr.Markdown(elem_id="corpus-summary")
    table = gr.Dataframe(headers=DOC_COLUMNS, interactive=False, elem_id="documents", wrap=True)
    with gr.Row():
        doc_id = gr.Number(label="Document id", precision=0, elem_id="doc-id", scale=1)
        delete_btn = gr.Button(
            "Delete document", variant="stop", elem_id="delete-document", scale=0
        )
        rebuild_btn = gr.Button("Rebuild corpus", elem_id="rebuild-corpus", scale=0)
    timer = gr.Timer(1.0)

    create_btn.click(
        h.create,
        [new_name, visibility, share_with],
        [status, corpus, new_name],
        api_name="create_corpus",
    )
    files.upload(h.upload, [corpus, files], [status, files], api_name="upload")
    corpus.change(h.documents, [corpus], [table, summary], api_name="documents")
    timer.tick(h.documents, [corpus], [table, summary], api_name=False, show_progress="hidden")
    delete_btn.click(h.delete, [corpus, doc_id], [status], api_name="delete_document")
    rebuild_btn.click(h.rebuild, [corpus], [status], api_name="rebuild")
    return {"corpus": corpus, "load": h.corpora, "tracker": h.tracker}
