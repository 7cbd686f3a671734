"""Chat tab: pick a corpus, ask, watch the answer stream, read its citations under it.

Handlers are async and hand each question straight to the engine (no Gradio concurrency limit
in front of it: the engine batches every running request into one step). Conversations are
stored per user (`kb.chats`), so they survive a reload.
"""

import asyncio
import html
from typing import Any

import gradio as gr

from kb.auth import Principal
from kb.errors import KBError
from kb.inputs import internal_message, text_problem
from kb.service import Delta, Finished, KnowledgeBase
from kb.uploads import caller_owner
from ui.common import shown_errors, user_of

CONTEXT_CHARS = 240  # passage context shown around the cited part


def citation_message(i: int, c: dict) -> dict:
    """One citation as a collapsible chat message: document, page, the passage with the cited
    part highlighted."""
    page = f", page {c['page']}" if c.get("page") else ""
    seg = c.get("segment_text") or c["text"]
    a, b = c.get("highlight") or (0, len(seg))
    before = seg[max(0, a - CONTEXT_CHARS) : a]
    after = seg[b : b + CONTEXT_CHARS]
    # mark each paragraph of the cited part apart: one <mark> across a blank line would be split
    # by the Markdown renderer and shown as text
    marked = "\n\n".join(
        f"<mark>{html.escape(p)}</mark>" if p.strip() else p for p in seg[a:b].split("\n\n")
    )
    body = (
        ("…" if a > CONTEXT_CHARS else "")
        + html.escape(before)
        + marked
        + html.escape(after)
        + ("…" if b + CONTEXT_CHARS < len(seg) else "")
    )
    score = f" · {c['score'] * 100:.0f}%" if c.get("score") else ""
    return {
        "role": "assistant",
        "content": body,
        "metadata": {"title": f"[{i}] {c['document']}{page}{score}", "status": "done"},
    }


def text_only(messages: list[dict]) -> list[dict]:
    """The chat's messages if each is text only; a file or component part is refused (no
    feature needs one, and a file part naming a server path was issue 15's file-read hole)."""
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        parts = content if isinstance(content, list) else [content]
        for p in parts:
            text = (
                p
                if isinstance(p, str)
                else p.get("text")
                if isinstance(p, dict) and p.get("type") == "text"
                else None
            )
            if isinstance(text, str):
                if (
                    "\x00" in text
                    or text_problem(text) == "contains a lone surrogate (not valid Unicode text)"
                ):
                    raise KBError(f"messages: {text_problem(text)}")
                continue
            raise KBError("the chat takes text only: no files or components in messages")
    return messages


def model_history(messages: list[dict]) -> list[dict]:
    """The turns the model sees: user questions and answers, not the citation messages."""
    out = []
    for m in messages:
        if (m.get("metadata") or {}).get("title"):
            continue
        content = m["content"]
        if isinstance(content, list):  # Gradio 6 hands content back as parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m["role"], "content": str(content)})
    return out


def _ready_corpora(kb: KnowledgeBase, user: Principal) -> list[str]:
    return [c.name for c in kb.list_corpora(user=user) if c.status == "ready"]


def _sessions(
    kb: KnowledgeBase, user: Principal, owner: str, corpus: str | None
) -> list[tuple[str, int]]:
    return [(f"#{c.id} {c.title}", c.id) for c in kb.chats.list(user, owner, corpus)]


def _load_session(
    kb: KnowledgeBase, user: Principal, owner: str, session_id: int
) -> tuple[str, list[dict]]:
    history = kb.chats.load(user, owner, session_id)
    out: list[dict] = []
    for m in history.messages:
        out.append({"role": m.role, "content": m.content})
        out.extend(citation_message(i, c) for i, c in enumerate(m.citations, 1))
    return history.corpus, out


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

    @shown_errors
    async def corpora(self, current: str | None, request: gr.Request):
        user = user_of(self.kb, request)
        names = await asyncio.to_thread(_ready_corpora, self.kb, user)
        return gr.Dropdown(
            choices=names, value=current if current in names else (names[0] if names else None)
        )

    @shown_errors
    async def sessions(self, corpus: str | None, request: gr.Request):
        user, owner = await asyncio.to_thread(self.caller, request)
        rows = await asyncio.to_thread(_sessions, self.kb, user, owner, corpus)
        return gr.Dropdown(choices=rows, value=None)

    @shown_errors
    async def open(self, session_id: int | None, request: gr.Request):
        if session_id is None:
            return gr.skip(), gr.skip(), gr.skip()
        user, owner = await asyncio.to_thread(self.caller, request)
        corpus, messages = await asyncio.to_thread(
            _load_session, self.kb, user, owner, int(session_id)
        )
        return messages, int(session_id), corpus

    async def new_chat(self):
        return [], None, ""

    @shown_errors
    async def send(
        self,
        question: str,
        messages: list[dict] | None,
        corpus: str | None,
        session_id: int | None,
        request: gr.Request,
    ):
        """Stream one answer: yields (chat messages, session id, cleared question box)."""
        kb = self.kb
        user, owner = await asyncio.to_thread(self.caller, request)
        question = (question or "").strip()
        if not corpus:
            raise KBError("pick a corpus first")
        if not question:
            raise KBError("the question is empty")
        messages = text_only(list(messages or []))
        history = model_history(messages)
        if session_id is None:
            session_id = await asyncio.to_thread(kb.chats.create, user, owner, corpus, question)
        await asyncio.to_thread(kb.chats.append, user, owner, session_id, "user", question)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield messages, session_id, ""
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(kb.engine.start)
        answer = await asyncio.to_thread(
            lambda: kb.ask(corpus, question, None, history, loop, user=user)
        )
        text, finished = "", None
        try:
            async for ev in answer.handle:
                if isinstance(ev, Delta):
                    text += ev.text
                    messages[-1] = {"role": "assistant", "content": text}
                    yield messages, session_id, ""
                elif isinstance(ev, Finished):
                    finished = ev
        finally:
            if finished is None:  # stopped (cancelled) or the page went away: free its KV now
                kb.engine.abort(answer.handle)
                await asyncio.shield(
                    asyncio.to_thread(
                        kb.chats.append, user, owner, session_id, "assistant", text + " …(stopped)"
                    )
                )
        if finished.reason == "error":
            messages[-1] = {
                "role": "assistant",
                "content": f"⚠️ {internal_message('generation failed', finished.error)}",
            }
            await asyncio.to_thread(
                kb.chats.append, user, owner, session_id, "assistant", messages[-1]["content"]
            )
            yield messages, session_id, ""
            return
        cites = await asyncio.to_thread(answer.citations)
        await asyncio.to_thread(
            kb.chats.append, user, owner, session_id, "assistant", finished.text, cites
        )
        messages[-1] = {"role": "assistant", "content": finished.text}
        messages += [citation_message(i, c) for i, c in enumerate(cites, 1)]
        yield messages, session_id, ""

    @shown_errors
    async def retry(
        self,
        messages: list[dict] | None,
        corpus: str | None,
        session_id: int | None,
        request: gr.Request,
    ):
        """Ask the last question again, replacing its answer."""
        messages = text_only(list(messages or []))
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is None:
            raise KBError("nothing to retry yet")
        question = model_history([messages[last]])[0]["content"]
        if session_id is not None:
            user, owner = await asyncio.to_thread(self.caller, request)
            await asyncio.to_thread(self.kb.chats.drop_last_turn, user, owner, int(session_id))
        async for out in self.send(question, messages[:last], corpus, session_id, request):
            yield out


def build_chat_tab(kb: KnowledgeBase) -> dict[str, Any]:
    """Lay out the Chat tab and wire its events; returns the components app.py loads."""
    h = ChatHandlers(kb)
    session_id = gr.State(None)
    with gr.Row():
        corpus = gr.Dropdown(
            label="Corpus", choices=[], elem_id="chat-corpus", scale=2, allow_custom_value=True
        )
        sessions = gr.Dropdown(
            label="Conversation",
            choices=[],
            elem_id="chat-sessions",
            scale=2,
            allow_custom_value=True,
        )
        new_btn = gr.Button("New chat", elem_id="new-chat", scale=0)
    chatbot = gr.Chatbot(
        label="Answers",
        elem_id="chatbot",
        height=520,
        buttons=["copy"],
        placeholder="Pick a corpus and ask a question.",
    )
    with gr.Row():
        question = gr.Textbox(
            placeholder="Ask a question about the corpus…",
            show_label=False,
            elem_id="question",
            scale=6,
            autofocus=True,
        )
        send_btn = gr.Button("Send", variant="primary", elem_id="send", scale=0)
        stop_btn = gr.Button("Stop", elem_id="stop", scale=0)
        retry_btn = gr.Button("Retry", elem_id="retry", scale=0)

    io = dict(outputs=[chatbot, session_id, question], concurrency_limit=None)
    ev_send = send_btn.click(h.send, [question, chatbot, corpus, session_id], api_name="send", **io)
    ev_submit = question.submit(
        h.send, [question, chatbot, corpus, session_id], api_name=False, **io
    )
    ev_retry = retry_btn.click(h.retry, [chatbot, corpus, session_id], api_name="retry", **io)
    stop_btn.click(None, None, None, cancels=[ev_send, ev_submit, ev_retry], api_name=False)
    new_btn.click(h.new_chat, None, [chatbot, session_id, question], api_name="new_chat")
    corpus.change(h.sessions, [corpus], [sessions], api_name="chat_sessions")
    sessions.input(h.open, [sessions], [chatbot, session_id, corpus], api_name="open_chat")
    for ev in (ev_send, ev_submit, ev_retry):
        ev.then(h.sessions, [corpus], [sessions], api_name=False)
    return {"corpus": corpus, "load": h.corpora}
