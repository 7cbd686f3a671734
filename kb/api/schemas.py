"""Request bodies of the HTTP API (OpenAI's shapes where OpenAI has one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from kb.inputs import Name, Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(BaseModel):
    model: Name = Field(description='the corpus as "kb:NAME" (or NAME), unless `corpus` is given')
    messages: list[ChatMessage] = Field(min_length=1)
    corpus: Name | None = Field(default=None, description="corpus name; overrides `model`")
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, le=100000)
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**63 - 1, description="a signed 64-bit integer"
    )
    presence_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        allow_inf_nan=False,
        description="accepted as OpenAI defines it; kb applies no penalty, so only 0",
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        allow_inf_nan=False,
        description="accepted as OpenAI defines it; kb applies no penalty, so only 0",
    )
    stop: Text | list[Text] | None = None
    dense: bool = Field(
        default=False,
        description="attend the whole corpus densely instead of the passages "
        "the question chooses (attention retrieval, the default beyond the model's context)",
    )

    def corpus_name(self) -> str:
        name = self.corpus or self.model
        return name.removeprefix("kb:")


class CorpusCreate(BaseModel):
    name: Name = Field(min_length=1, max_length=64)
    visibility: Literal["private", "public", "shared"] | None = Field(
        default=None, description="default: private for a signed-in user, public for anonymous use"
    )
    share_with: list[Name] = Field(
        default_factory=list, description="user names, for visibility shared"
    )
