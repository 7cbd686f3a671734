"""Chat tab: the caller's conversations in a list (open, rename, delete), the answer streaming in
with inline [n] markers tied to its citations, and a source viewer that opens a cited page with
the passage highlighted.

Conversations are stored per user (`kb.chats`; with sign-in off per browser, by its cookie), so
they survive a reload; the stored turns are the truth and the chat is drawn from them. Handlers
are async and hand each question straight to the engine (no Gradio concurrency limit in front of
it: the engine batches every running request into one step).
"""

from __future__ import annotations

import asyncio
from typing import Any

import gradio as gr

from kb.service import (
    ChatHistory,
    Delta,
    Finished,
    KBError,
    KnowledgeBase,
    Principal,
    caller_owner,
    internal_message,
)
from ui.common import shown_errors, user_of
from ui.render import (
    MARKS,
    STOPPED,
    TOKEN_LIMIT,
    answer_markdown,
    cite_label,
    plain_markdown,
    source_html,
    split_mark,
)

NO_SOURCE = "<p class='kb-muted'>Click a marker [n] or a source to open it here.</p>"


def _ready_corpora(kb: KnowledgeBase, user: Principal) -> list[str]:
    return [c.name for c in kb.list_corpora(user=user) if c.status == "ready"]


def refs_of(history: ChatHistory) -> list[tuple[str, str, dict]]:
    """Every citation of a conversation as (source-list value, label, citation), answer by
    answer: the value "k-n" is citation n of answer k."""
    out, k = [], 0
    answers = sum(m.role == "assistant" for m in history.messages)
    for m in history.messages:
        if m.role != "assistant":
            continue
        k += 1
        for n, c in enumerate(m.citations, 1):
            label = cite_label(n, c) + (f" · answer {k}" if answers > 1 else "")
            out.append((f"{k}-{n}", label, c))
    return out


def chat_messages(history: ChatHistory) -> list[dict]:
    """The conversation drawn: questions as typed, answers with their markers and marks."""
    out, k = [], 0
    for m in history.messages:
        if m.role == "user":
            out.append({"role": "user", "content": plain_markdown(m.content)})
            continue
        k += 1
        refs = [f"{k}-{n}" for n in range(1, len(m.citations) + 1)]
        out.append({"role": "assistant", "content": answer_markdown(m.content, m.citations, refs)})
    return out


def model_history(history: ChatHistory) -> list[dict]:
    """The turns the model sees: questions and answers as written, without stop marks."""
    return [{"role": m.role, "content": split_mark(m.content)[0]} for m in history.messages]


def _text_of(content: Any) -> str | None:
    """A drawn message's text (Gradio 6 hands content back as parts); None for a file or a
    component part, which no feature sends (a file part naming a server path was issue 15's
    file-read hole)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def with_mark(messages: list[dict], mark: str) -> list[dict]:
    """The drawn chat, text only, with a stop mark under its last answer if that was still
    streaming (what Stop shows at once; the stored answer carries the same mark)."""
    out = [
        {"role": m["role"], "content": text}
        for m in messages
        if isinstance(m, dict)
        and m.get("role") in ("user", "assistant")
        and (text := _text_of(m.get("content"))) is not None
    ]
    for m in reversed(out):
        if m["role"] == "assistant":
            if "kb-stopped" not in m["content"] and "kb-done" not in m["content"]:
                m["content"] += f'\n\n<span class="kb-stopped">⏹ {mark}</span>'
            break
    return out


class ChatHandlers:
    """The Chat tab's event handlers, bound to one KnowledgeBase."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb

    def caller(self, request: gr.Request | None) -> tuple[Principal, str]:
        """Who asks, and the owner key their chats are stored under (kb.uploads)."""
        user = user_of(self.kb, request)
        if request is None:
            return user, f"user:{user.id}" if not user.anonymous else "nobody"
        return user, caller_owner(self.kb, request.headers, request.cookies)

    def _list(self, request: gr.Request, selected: int | None) -> gr.Radio:
        user, owner = self.caller(request)
        rows = [(f"{c.title} · {c.corpus}", c.id) for c in self.kb.chats.list(user, owner)]
        ids = [sid for _, sid in rows]
        return gr.Radio(choices=rows, value=selected if selected in ids else None)

    def _history(self, request: gr.Request, session_id: int) -> ChatHistory:
        user, owner = self.caller(request)
        return self.kb.chats.load(user, owner, int(session_id))

    def _sources(self, history: ChatHistory | None) -> gr.Radio:
        refs = refs_of(history) if history else []
        return gr.Radio(choices=[(label, ref) for ref, label, _ in refs], value=None)

    @shown_errors
    async def corpora(self, current: str | None, request: gr.Request):
        user = user_of(self.kb, request)
        names = await asyncio.to_thread(_ready_corpora, self.kb, user)
        return gr.Dropdown(
            choices=names, value=current if current in names else (names[0] if names else None)
        )

    @shown_errors
    async def conversations(self, session_id: int | None, request: gr.Request):
        """The caller's conversations, newest first (the one open stays selected)."""
        return await asyncio.to_thread(self._list, request, session_id)

    @shown_errors
    async def open(self, session_id: int | None, request: gr.Request):
        """Show a stored conversation: its turns, its corpus, its sources and its title."""
        if session_id is None:
            return (gr.skip(),) * 6
        history = await asyncio.to_thread(self._history, request, session_id)
        user, owner = await asyncio.to_thread(self.caller, request)
        listed = await asyncio.to_thread(self.kb.chats.list, user, owner)
        title = next((c.title for c in listed if c.id == int(session_id)), "")
        return (
            chat_messages(history),
            int(session_id),
            history.corpus,
            self._sources(history),
            NO_SOURCE,
            title,
        )

    async def new_chat(self):
        return [], None, "", self._sources(None), NO_SOURCE, "", gr.Radio(value=None)

    @shown_errors
    async def rename(self, session_id: int | None, title: str, request: gr.Request):
        if session_id is None:
            raise KBError("open a conversation first")
        title = (title or "").strip()
        if not title:
            raise KBError("the new title is empty")
        user, owner = await asyncio.to_thread(self.caller, request)
        await asyncio.to_thread(self.kb.chats.rename, user, owner, int(session_id), title)
        return await asyncio.to_thread(self._list, request, int(session_id))

    async def ask_delete(self, session_id: int | None):
        """Deleting asks first: the confirmation row shows with the conversation named."""
        if session_id is None:
            raise gr.Error("open a conversation first")
        return gr.Row(visible=True)

    async def keep(self):
        return gr.Row(visible=False)

    @shown_errors
    async def delete(self, session_id: int | None, request: gr.Request):
        if session_id is None:
            raise KBError("open a conversation first")
        user, owner = await asyncio.to_thread(self.caller, request)
        await asyncio.to_thread(self.kb.chats.delete, user, owner, int(session_id))
        listed = await asyncio.to_thread(self._list, request, None)
        return [], None, self._sources(None), NO_SOURCE, "", listed, gr.Row(visible=False)

    @shown_errors
    async def open_source(self, ref: str | None, session_id: int | None, request: gr.Request):
        """The cited page of source `ref` ("k-n"), the passage highlighted; a PDF page drawn."""
        if not ref or session_id is None:
            return NO_SOURCE
        history = await asyncio.to_thread(self._history, request, session_id)
        cite = next((c for r, _, c in refs_of(history) if r == ref), None)
        if cite is None or cite.get("document_id") is None:
            raise KBError("that source is no longer stored with this conversation")
        user = user_of(self.kb, request)
        page = await asyncio.to_thread(
            self.kb.source_page,
            user,
            history.corpus,
            int(cite["document_id"]),
            cite.get("page"),
            cite["text"],
        )
        image = None
        if page.media_type == "pdf" and page.page:
            image = await asyncio.to_thread(
                self.kb.page_image, user, history.corpus, int(cite["document_id"]), page.page
            )
        return source_html(page, image)

    @shown_errors
    async def send(
        self, question: str, corpus: str | None, session_id: int | None, request: gr.Request
    ):
        """Stream one answer: yields (chat, session id, question box, sources, conversations,
        title)."""
        kb = self.kb
        user, owner = await asyncio.to_thread(self.caller, request)
        question = (question or "").strip()
        if not corpus:
            raise KBError("pick a corpus first")
        if not question:
            raise KBError("the question is empty")
        if session_id is None:
            session_id = await asyncio.to_thread(kb.chats.create, user, owner, corpus, question)
            before = ChatHistory(corpus, [])
        else:
            before = await asyncio.to_thread(kb.chats.load, user, owner, int(session_id))
            corpus = before.corpus
        await asyncio.to_thread(kb.chats.append, user, owner, session_id, "user", question)
        shown = chat_messages(before) + [
            {"role": "user", "content": plain_markdown(question)},
            {"role": "assistant", "content": ""},
        ]
        listed = await asyncio.to_thread(self._list, request, session_id)
        title = question if not before.messages else gr.skip()
        yield shown, session_id, "", gr.skip(), listed, title
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(kb.engine.start)
        history = model_history(before)
        answer = await asyncio.to_thread(
            lambda: kb.ask(corpus, question, None, history, loop, user=user)
        )
        text, finished = "", None
        try:
            async for ev in answer.handle:
                if isinstance(ev, Delta):
                    text += ev.text
                    shown[-1] = {"role": "assistant", "content": plain_markdown(text)}
                    yield shown, session_id, "", gr.skip(), gr.skip(), gr.skip()
                elif isinstance(ev, Finished):
                    finished = ev
        finally:
            if finished is None:  # stopped (cancelled) or the page went away: free its KV now
                kb.engine.abort(answer.handle)
                await asyncio.shield(
                    asyncio.to_thread(
                        kb.chats.append, user, owner, session_id, "assistant", text + STOPPED
                    )
                )
        if finished.reason == "error":
            content = f"⚠️ {internal_message('generation failed', finished.error)}"
            await asyncio.to_thread(kb.chats.append, user, owner, session_id, "assistant", content)
            cites: list[dict] = []
        else:
            cites = await asyncio.to_thread(answer.citations)
            content = finished.text + (TOKEN_LIMIT if finished.reason == "length" else "")
            await asyncio.to_thread(
                kb.chats.append, user, owner, session_id, "assistant", content, cites
            )
        after = await asyncio.to_thread(kb.chats.load, user, owner, int(session_id))
        listed = await asyncio.to_thread(self._list, request, session_id)
        yield chat_messages(after), session_id, "", self._sources(after), listed, gr.skip()

    @shown_errors
    async def retry(self, corpus: str | None, session_id: int | None, request: gr.Request):
        """Ask the last question again, replacing its answer."""
        if session_id is None:
            raise KBError("nothing to retry yet")
        history = await asyncio.to_thread(self._history, request, session_id)
        questions = [m.content for m in history.messages if m.role == "user"]
        if not questions:
            raise KBError("nothing to retry yet")
        user, owner = await asyncio.to_thread(self.caller, request)
        await asyncio.to_thread(self.kb.chats.drop_last_turn, user, owner, int(session_id))
        async for out in self.send(questions[-1], corpus, session_id, request):
            yield out

    async def stopped(self, messages: list[dict] | None):
        """Stop: the answer so far stays, marked as stopped (stored with the same mark)."""
        return with_mark(messages or [], MARKS[STOPPED])

    async def redraw_stopped(self, session_id: int | None, request: gr.Request):
        """After Stop: the chat drawn again from storage once the cancelled answer is stored with
        its mark, so an update the answer streamed before the cancel cannot replace the marked one."""
        if session_id is None:
            return gr.skip()
        for _ in range(40):  # the cancelled send stores the answer as it unwinds
            history = await asyncio.to_thread(self._history, request, session_id)
            last = history.messages[-1] if history.messages else None
            if last is not None and last.role == "assistant" and last.content.endswith(STOPPED):
                return chat_messages(history)
            await asyncio.sleep(0.05)
        return gr.skip()  # nothing was cancelled: the answer had ended (its own mark stands)


# marker clicks open their source: a click on [n] (in an answer or its list of sources) picks
# that source in the Sources list, whose change event opens the viewer
MARKER_JS = """
() => {
  if (window.kbCiteClicks) return;
  window.kbCiteClicks = true;
  document.addEventListener("click", (e) => {
    const el = e.target.closest && e.target.closest(".kb-cite");
    if (!el) return;
    const cls = [...el.classList].find((c) => c.startsWith("kb-ref-"));
    if (!cls) return;
    const ref = cls.slice("kb-ref-".length);
    const input = [...document.querySelectorAll("#sources input[type=radio]")].find(
      (i) => i.value === ref
    );
    if (input) input.click();
  });
}
"""


def build_chat_tab(kb: KnowledgeBase) -> dict[str, Any]:
    """Lay out the Chat tab and wire its events; returns the components app.py loads."""
    h = ChatHandlers(kb)
    session_id = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=220, elem_id="conversations-panel"):
            new_btn = gr.Button("New chat", elem_id="new-chat", size="sm")
            conversations = gr.Radio(
                label="Conversations", choices=[], elem_id="conversations", interactive=True
            )
            title = gr.Textbox(label="Title", elem_id="chat-title", max_lines=1)
            with gr.Row():
                rename_btn = gr.Button("Rename", elem_id="rename-chat", size="sm")
                delete_btn = gr.Button("Delete", elem_id="delete-chat", size="sm", variant="stop")
            with gr.Row(visible=False, elem_id="confirm-delete-chat") as confirm:
                gr.Markdown("Delete this conversation?")
                yes_btn = gr.Button("Delete it", elem_id="confirm-delete-chat-yes", size="sm")
                no_btn = gr.Button("Keep it", elem_id="confirm-delete-chat-no", size="sm")
        with gr.Column(scale=3):
            corpus = gr.Dropdown(
                label="Corpus", choices=[], elem_id="chat-corpus", allow_custom_value=True
            )
            chatbot = gr.Chatbot(
                label="Answers",
                elem_id="chatbot",
                height=520,
                buttons=["copy"],
                placeholder="Pick a corpus and ask a question.",
                latex_delimiters=[],
                feedback_options=None,
            )
            question = gr.Textbox(
                placeholder="Ask a question about the corpus… (Enter sends)",
                show_label=False,
                elem_id="question",
                autofocus=True,
            )
            with gr.Row():
                send_btn = gr.Button("Send", variant="primary", elem_id="send", size="sm")
                stop_btn = gr.Button("Stop", elem_id="stop", size="sm")
                retry_btn = gr.Button("Retry", elem_id="retry", size="sm")
        with gr.Column(scale=2, min_width=260):
            sources = gr.Radio(label="Sources", choices=[], elem_id="sources")
            viewer = gr.HTML(NO_SOURCE, elem_id="source-view")

    io = dict(
        outputs=[chatbot, session_id, question, sources, conversations, title],
        concurrency_limit=None,
    )
    ev_send = send_btn.click(h.send, [question, corpus, session_id], api_name="send", **io)
    ev_submit = question.submit(h.send, [question, corpus, session_id], api_name=False, **io)
    ev_retry = retry_btn.click(h.retry, [corpus, session_id], api_name="retry", **io)
    stop_btn.click(
        h.stopped, [chatbot], [chatbot], cancels=[ev_send, ev_submit, ev_retry], api_name=False
    ).then(h.redraw_stopped, [session_id], [chatbot], api_name=False)
    new_btn.click(
        h.new_chat,
        None,
        [chatbot, session_id, question, sources, viewer, title, conversations],
        api_name="new_chat",
    )
    conversations.input(
        h.open,
        [conversations],
        [chatbot, session_id, corpus, sources, viewer, title],
        api_name="open_chat",
    )
    rename_btn.click(h.rename, [session_id, title], [conversations], api_name="rename_chat")
    delete_btn.click(h.ask_delete, [session_id], [confirm], api_name=False)
    no_btn.click(h.keep, None, [confirm], api_name=False)
    yes_btn.click(
        h.delete,
        [session_id],
        [chatbot, session_id, sources, viewer, title, conversations, confirm],
        api_name="delete_chat",
    )
    sources.change(h.open_source, [sources, session_id], [viewer], api_name="open_source")
    return {
        "corpus": corpus,
        "load": h.corpora,
        "conversations": conversations,
        "session_id": session_id,
        "list": h.conversations,
        "js": MARKER_JS,
    }
