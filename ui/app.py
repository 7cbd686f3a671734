"""The web app: a Gradio Blocks app with tabs Chat, Corpora and Admin (admins, and with sign-in
off the local user), mounted at "/" of the FastAPI app by `kb.server.create_app`."""

import asyncio

import gradio as gr

from kb.service import KnowledgeBase, UploadRegistry
from ui.admin import build_admin_tab
from ui.chat import build_chat_tab
from ui.common import local_user, may_administer, user_of
from ui.corpora import build_corpora_tab

CSS = """  /* passed to mount_gradio_app (Gradio 6 takes css at launch/mount) */
#whoami { text-align: right; }
.kb-cite { color: #2563eb; cursor: pointer; font-weight: 600; }
sup.kb-cite { padding: 0 .1em; }
.kb-sources { font-size: .85em; margin-top: .4em; }
.kb-stopped { display: inline-block; font-size: .85em; color: #92400e; background: #fef3c7;
  border-radius: 4px; padding: 0 .4em; }
#source-view mark { background: #fde68a; padding: 0 .1em; border-radius: 3px; }
#source-view .kb-page { max-width: 100%; border: 1px solid #ddd; margin-bottom: .5em; }
#source-view .kb-page-text { white-space: pre-wrap; max-height: 420px; overflow: auto;
  font-size: .85em; }
"""


def build_ui(kb: KnowledgeBase, uploads: UploadRegistry | None = None) -> gr.Blocks:
    """The Blocks app; each event resolves its user from the request (cookie or API key).
    `uploads` names the files each caller uploaded (kb.uploads); without it no event
    accepts a file."""
    uploads = uploads or UploadRegistry(kb.home / "ui-uploads")
    with gr.Blocks(title="kb: shared-context knowledge base", analytics_enabled=False) as demo:
        with gr.Row():
            gr.Markdown("## kb · chat over shared corpora")
            whoami = gr.Markdown(elem_id="whoami")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab:
                chat = build_chat_tab(kb)
            with gr.Tab("Corpora", id="corpora", elem_id="tab-corpora") as corpora_tab:
                corpora = build_corpora_tab(kb, uploads)
            with gr.Tab("Admin", id="admin", visible=False, elem_id="tab-admin") as admin_tab:
                admin = build_admin_tab(kb)

        async def on_load(request: gr.Request):
            user = await asyncio.to_thread(user_of, kb, request)
            if user.anonymous and local_user(kb):
                who = "local user (sign-in is off)"
            else:
                role = " (admin)" if user.is_admin else ""
                who = f"signed in as **{user.name}**{role} · [Sign out](logout)"
            return who, gr.Tab(visible=may_administer(kb, user))

        demo.load(on_load, None, [whoami, admin_tab], api_name="whoami")
        demo.load(None, None, None, js=chat["js"])
        demo.load(
            chat["list"], [chat["session_id"]], [chat["conversations"]], api_name="conversations"
        )
        demo.load(chat["load"], [chat["corpus"]], [chat["corpus"]], api_name="chat_corpora")
        demo.load(corpora["load"], [corpora["corpus"]], [corpora["corpus"]], api_name="corpora")
        # opening a tab refreshes its corpus picker (a corpus may have become ready meanwhile)
        chat_tab.select(chat["load"], [chat["corpus"]], [chat["corpus"]], api_name=False)
        corpora_tab.select(
            corpora["load"], [corpora["corpus"]], [corpora["corpus"]], api_name=False
        )
        admin_tab.select(
            admin["load"], [admin["corpus"]], [admin["table"], admin["corpus"]], api_name=False
        )
    demo.queue(default_concurrency_limit=None)
    return demo
