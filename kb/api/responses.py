"""Response bodies of the OpenAI-shaped endpoints, typed for the OpenAPI schema (the fields of the
`openai` package's ChatCompletion, ChatCompletionChunk, Completion and Model), plus kb's
`citations`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Citation(BaseModel):
    """kb: where an answer drew on the corpus (heaviest first)."""

    document: str
    document_id: int
    page: int | None = None
    text: str = Field(description="the passage the answer drew on")
    score: float = Field(description="its share of the answer's attention on the corpus")
    segment_text: str | None = Field(
        default=None, description='the whole stored segment (with citation_text "segment")'
    )
    highlight: list[int] | None = Field(
        default=None, description="[start, end) of the passage in segment_text"
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class _CompletionBody(BaseModel):
    """The fields a chat completion and a legacy completion share, in OpenAI's order; each
    subclass narrows `object` and `choices` in place (a redeclared field keeps its position)."""

    id: str
    object: str
    created: int
    model: str
    choices: list
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletion(_CompletionBody):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    citations: list[Citation] = Field(default_factory=list, description="kb's extra")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(_CompletionBody):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class Model(BaseModel):
    id: str = Field(description='"kb:NAME" for corpus NAME')
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kb"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def trim_citation(citation: dict, segment: bool) -> dict:
    """A citation as the API sends it: the passage alone unless the segment was asked for (a
    whole segment was 10 KB of body behind a 24-token answer)."""
    out = {k: citation[k] for k in ("document", "document_id", "page", "text", "score")}
    if segment:
        out["segment_text"] = citation["segment_text"]
        out["highlight"] = list(citation["highlight"])
    return out
