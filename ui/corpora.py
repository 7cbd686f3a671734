"""Corpora tab: create a corpus, drop many files at once (only kinds kb reads: the drop zone
names them and refuses the rest before upload), watch each document's stage in words, percent
from the work done and ETA from the measured throughput, its pages and size; delete a document
from its row, after a confirmation; rebuild a stale corpus.

Ingestion runs as jobs (KnowledgeBase.jobs): progress is persisted on the Document rows, so the
table says the truth after a reload or a restart. With sign-in off there is one local user and no
choice of who may read a corpus; with sign-in on, "Shared with" shows only for shared corpora.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path, PurePath
from typing import Any

import gradio as gr
import pandas as pd

from kb.service import (
    Conflict,
    DocumentRow,
    KBError,
    KnowledgeBase,
    Principal,
    UploadRegistry,
    accepted_names,
    accepted_suffixes,
    caller_owner,
)
from ui.common import error_words, fmt_bytes, local_user, shown_errors, user_of

log = logging.getLogger(__name__)
DOC_COLUMNS = ["#", "document", "stage", "percent", "ETA", "pages", "size", "tokens", "error", ""]
DELETE_CELL = "delete"
NO_DOCUMENTS = pd.DataFrame([], columns=DOC_COLUMNS)


def _files(n: int) -> str:
    return "1 file" if n == 1 else f"{n} files"


def eta_words(seconds: float | None) -> str:
    """An ETA as a person reads it: "", "12 s", "3 min 5 s"."""
    if seconds is None:
        return ""
    s = max(1, round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"


def row_cells(r: DocumentRow) -> list:
    return [
        r.id,
        r.filename,
        r.activity,
        f"{r.percent:.0f}%",
        eta_words(r.eta_s),
        "" if r.pages is None else r.pages,
        fmt_bytes(r.size_bytes),
        r.tokens or "",
        r.error or "",
        DELETE_CELL,
    ]


def start_ingest(kb: KnowledgeBase, user: Principal, name: str, files: list[str]) -> str:
    """Queue the files' ingest jobs and return at once; progress shows in the document table."""
    kb.check_write(name, user)
    if not files:
        raise KBError("drop one or more files first")
    suffixes = accepted_suffixes(kb.settings.allowed_types)
    refused = [PurePath(f).name for f in files if PurePath(f).suffix.lower() not in suffixes]
    if refused:  # the drop zone refuses these; a client that skips it is told the same
        raise KBError(
            f"not a kind of file kb reads: {', '.join(refused)}; "
            f"accepted: {accepted_names(kb.settings.allowed_types)}"
        )
    folder = Path(tempfile.mkdtemp(prefix="ui-upload-", dir=kb.home))
    try:
        paths = []
        for i, f in enumerate(files):  # copy: Gradio's cache may be cleaned before the job runs
            src = Path(f)
            dest = folder / str(i) / src.name
            dest.parent.mkdir()
            shutil.copyfile(src, dest)
            paths.append(dest)
        subs = kb.jobs.submit(name, paths)  # stores each file before it returns
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    queued = [s for s in subs if s.status == "queued"]
    dupes = [s.filename for s in subs if s.status == "duplicate"]
    failed = [f"{s.filename}: {s.error}" for s in subs if s.status == "failed"]
    said = [f"queued {_files(len(queued))} for {name}"] if queued else []
    if dupes:
        said.append(f"already in {name}: {', '.join(dupes)}")
    return "; ".join(said + failed)


def rebuild(kb: KnowledgeBase, user: Principal, name: str) -> str:
    """Recompute a corpus's KV from its stored files (after a model or settings change, or a
    damaged KV file): a cache job; the document table shows its progress."""
    kb.check_write(name, user)
    kb.cache_admin.submit("rebuild", name)
    return f"rebuilding {name}: its documents are prefilled again (progress below)"


def create_corpus(
    kb: KnowledgeBase, user: Principal, name: str, visibility: str, share_with: str
) -> str:
    """A new corpus of the caller's; with sign-in off (or anonymous) a public one, the only
    kind an unowned corpus can be."""
    name = (name or "").strip()
    if user.anonymous:
        visibility = "public"
    try:  # one transaction with its shares: an unknown user leaves no corpus behind
        kb.create_corpus(
            name,
            owner=user.id,
            visibility=visibility,
            share_with=share_with.split(",") if visibility == "shared" else None,
        )
    except Conflict as e:  # the same answer whether or not the caller may see that corpus
        raise Conflict(f"the corpus name {name!r} is not available; choose another") from e
    who = {
        "private": "only you may read it",
        "public": "everyone may read it",
        "shared": f"shared with {share_with.strip()}",
    }
    return f"created corpus {name}: {who[visibility]}; drop files into it"


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
        self.kb = kb
        self.uploads = uploads or UploadRegistry(kb.home / "ui-uploads")

    async def _run(self, fn, request: gr.Request, *args):
        return await asyncio.to_thread(fn, self.kb, user_of(self.kb, request), *args)

    @shown_errors
    async def corpora(self, current: str | None, request: gr.Request):
        names = await self._run(lambda kb, u: kb.writable_corpora(u), request)
        return gr.Dropdown(
            choices=names, value=current if current in names else (names[0] if names else None)
        )

    async def create(self, name: str, visibility: str, share_with: str, request: gr.Request):
        """Create; an error is said in the status line (no error badge left on the form)."""
        try:
            msg = await self._run(create_corpus, request, name, visibility, share_with or "")
        except Exception as e:
            return f"⚠️ {error_words(e)}", gr.skip(), gr.skip()
        names = await self._run(lambda kb, u: kb.writable_corpora(u), request)
        return msg, gr.Dropdown(choices=names, value=name.strip()), ""

    @shown_errors
    async def upload(self, name: str | None, files: list[str] | None, request: gr.Request):
        if not name:
            raise KBError("pick or create a corpus first")
        user = user_of(self.kb, request)
        owner = await asyncio.to_thread(caller_owner, self.kb, request.headers, request.cookies)
        paths = own_uploads(self.uploads, owner, [str(f) for f in files or []])
        msg = await asyncio.to_thread(start_ingest, self.kb, user, name, paths)
        return msg, None

    @shown_errors
    async def documents(self, name: str | None, request: gr.Request):
        if not name:
            return NO_DOCUMENTS, ""
        user = user_of(self.kb, request)
        rows = await asyncio.to_thread(self.kb.document_rows, user, name)
        info = await asyncio.to_thread(self.kb.corpus_info, name)
        docs = "1 document" if info.documents == 1 else f"{info.documents} documents"
        summary = f"**{info.name}**: {info.status} · {docs} · {info.tokens} tokens"
        return pd.DataFrame([row_cells(r) for r in rows], columns=DOC_COLUMNS), summary

    async def pick(self, name: str | None, evt: gr.SelectData):
        """A click on a row's delete cell asks for a confirmation naming the document."""
        row = evt.row_value or []
        if not name or len(row) < len(DOC_COLUMNS) or evt.value != DELETE_CELL:
            return gr.skip(), gr.skip(), gr.skip()
        return (
            int(row[0]),
            f"Delete **{row[1]}** from {name}? Its stored file and KV go too.",
            gr.Row(visible=True),
        )

    async def keep(self):
        return None, "", gr.Row(visible=False)

    @shown_errors
    async def delete(self, name: str | None, doc_id: int | None, request: gr.Request):
        if not name or doc_id is None:
            raise KBError("click the delete cell of a document's row first")
        user = user_of(self.kb, request)
        fname = await asyncio.to_thread(self.kb.delete_document, name, int(doc_id), user=user)
        return f"deleted {fname} from {name}", None, gr.Row(visible=False)

    @shown_errors
    async def rebuild(self, name: str | None, request: gr.Request):
        if not name:
            raise KBError("pick a corpus first")
        return await self._run(rebuild, request, name)


def build_corpora_tab(kb: KnowledgeBase, uploads: UploadRegistry | None = None) -> dict[str, Any]:
    h = CorporaHandlers(kb, uploads)
    local = local_user(kb)
    kinds = accepted_names(kb.settings.allowed_types)
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### New corpus")
            new_name = gr.Textbox(
                label="Name",
                placeholder="handbook",
                elem_id="new-corpus-name",
                info="letters, digits, '.', '_' or '-'",
            )
            visibility = gr.Radio(
                ["private", "public", "shared"],
                value="public" if local else "private",
                label="Who may read it",
                elem_id="new-corpus-visibility",
                visible=not local,
            )
            share_with = gr.Textbox(
                label="Shared with (user names, comma-separated)",
                elem_id="share-with",
                visible=False,
            )
            if local:
                gr.Markdown(
                    "Sign-in is off: you are the local user, and every corpus is open to "
                    "whoever reaches this server.",
                    elem_id="local-note",
                )
            create_btn = gr.Button("Create", elem_id="create-corpus")
        with gr.Column(scale=2):
            corpus = gr.Dropdown(
                label="Corpus", choices=[], elem_id="corpora-corpus", allow_custom_value=True
            )
            files = gr.File(
                label=f"Drop files here: {kinds}",
                file_count="multiple",
                file_types=accepted_suffixes(kb.settings.allowed_types),
                elem_id="upload",
            )
            status = gr.Markdown(elem_id="corpora-status")
    summary = gr.Markdown(elem_id="corpus-summary")
    table = gr.Dataframe(
        value=NO_DOCUMENTS,
        headers=DOC_COLUMNS,
        interactive=False,
        elem_id="documents",
        wrap=True,
    )
    # the document whose deletion waits for a confirmation (a value API clients may send too)
    pending = gr.Number(None, precision=0, visible=False, elem_id="pending-document")
    with gr.Row(visible=False, elem_id="confirm-delete-document") as confirm:
        question = gr.Markdown(elem_id="confirm-delete-text")
        yes_btn = gr.Button("Delete it", variant="stop", elem_id="confirm-delete-yes", scale=0)
        no_btn = gr.Button("Keep it", elem_id="confirm-delete-no", scale=0)
    rebuild_btn = gr.Button("Rebuild corpus", elem_id="rebuild-corpus", size="sm")
    timer = gr.Timer(1.0)

    visibility.change(
        lambda v: gr.Textbox(visible=v == "shared"), [visibility], [share_with], api_name=False
    )
    new_name.input(lambda: "", None, [status], api_name=False, show_progress="hidden")
    create_btn.click(
        h.create,
        [new_name, visibility, share_with],
        [status, corpus, new_name],
        api_name="create_corpus",
        show_progress="hidden",
    )
    files.upload(
        h.upload, [corpus, files], [status, files], api_name="upload", show_progress="hidden"
    )
    corpus.change(h.documents, [corpus], [table, summary], api_name="documents")
    timer.tick(h.documents, [corpus], [table, summary], api_name=False, show_progress="hidden")
    table.select(h.pick, [corpus], [pending, question, confirm], api_name=False)
    no_btn.click(h.keep, None, [pending, question, confirm], api_name=False)
    yes_btn.click(
        h.delete, [corpus, pending], [status, pending, confirm], api_name="delete_document"
    )
    rebuild_btn.click(h.rebuild, [corpus], [status], api_name="rebuild")
    return {"corpus": corpus, "load": h.corpora}
