"""OpenAI chat messages as kb's prompt: content as a string or text parts (joined by newlines),
`system` and `developer` messages as system turns after the corpus's documents, and the last
message as the question. What cannot be read is a 400 naming the message or part."""

from __future__ import annotations

from dataclasses import dataclass

from kb.api.schemas import ChatMessage
from kb.errors import KBError


@dataclass(frozen=True)
class Conversation:
    question: str
    history: list[dict]  # {"role": "system" | "user" | "assistant", "content": str}


def message_text(msg: ChatMessage, i: int) -> str:
    """The text of message i; a part that is not text, or a missing content, is refused."""
    content = msg.content
    if content is None:
        if msg.role == "assistant":
            return ""
        raise KBError(
            f"messages[{i}].content is required for a {msg.role} message",
            param=f"messages.{i}.content",
            code="missing_required_parameter",
        )
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if part.type != "text":
            raise KBError(
                f"messages[{i}].content[{j}]: content parts of type {part.type!r} are not "
                "supported; kb reads parts of type 'text'",
                param=where,
                code="unsupported_content_part",
            )
        if part.text is None:
            raise KBError(
                f"messages[{i}].content[{j}]: a text part needs `text`",
                param=f"{where}.text",
                code="missing_required_parameter",
            )
        texts.append(part.text)
    return "\n".join(texts)


def conversation(messages: list[ChatMessage]) -> Conversation:
    """The question (the last message, the user's) and the turns before it."""
    last = len(messages) - 1
    if messages[last].role != "user":
        raise KBError(
            f"messages[{last}]: the last message must be the user's question "
            f"(it is the {messages[last].role}'s)",
            param=f"messages.{last}.role",
            code="invalid_value",
        )
    texts = [message_text(m, i) for i, m in enumerate(messages)]
    if not texts[last].strip():
        raise KBError(
            f"messages[{last}].content: the question is empty",
            param=f"messages.{last}.content",
            code="invalid_value",
        )
    history = [
        {"role": "system" if m.role in ("system", "developer") else m.role, "content": t}
        for m, t in zip(messages[:last], texts[:last])
        if t.strip()
    ]
    return Conversation(texts[last], history)
