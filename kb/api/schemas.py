"""Request bodies of the HTTP API, in OpenAI's shapes where OpenAI has one (the fields of its chat
and legacy completions requests, typed as the `openai` package types them), plus kb's extras.

Parameters kb cannot honour are in the schema with only the values kb takes (n: 1, tools: none,
response_format: text, ...), so that a request asking for more is refused with a 400 that names
the parameter (code `unsupported_parameter`), never silently ignored, and the served OpenAPI
schema says what a valid request is. Fields OpenAI accepts without effect on an answer (user,
metadata, store, ...) are accepted and ignored, and unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kb.engine.sequence import DRY_MAX_ALLOWED_LENGTH, DRY_MAX_BREAKER_CHARS, DRY_MAX_BREAKERS
from kb.inputs import Name, Text

PENALTY = {"ge": -2.0, "le": 2.0, "allow_inf_nan": False}
# top-level fields whose other values OpenAI honours and kb does not (errors.py names them so)
UNSUPPORTED = {
    "n",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "modalities",
    "audio",
    "prediction",
    "best_of",
    "suffix",
    "stop",
}


def _factor(description: str, **low: float) -> Any:
    """One of kb's multiplicative sampling knobs: unset by default (the request then gets the
    server's KB_ setting), else finite, at most 10 and above its lower bound `low` (ge or gt)."""
    return Field(default=None, **low, le=10.0, allow_inf_nan=False, description=description)


class ContentPart(BaseModel):
    """A part of a message's content: kb reads parts of type `text`; any other type (image_url,
    input_audio, file) is refused with a 400 naming the part."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})
    type: Name = Field(description='"text" (other types are refused)')
    text: Text | None = None


class ChatMessage(BaseModel):
    """One message. `system` and `developer` messages are instructions placed in the prompt after
    the corpus's documents; `tool` and `function` messages are refused (no tools)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = Field(
        default=None, description="a string or a list of text parts"
    )
    name: Name | None = Field(default=None, description="accepted and ignored")


class StreamOptions(BaseModel):
    include_usage: bool = Field(
        default=False,
        description="send usage in one last chunk whose `choices` is empty, before [DONE]",
    )
    include_obfuscation: bool | None = Field(default=None, description="accepted and ignored")


class ResponseFormat(BaseModel):
    type: Literal["text"] = Field(description='only "text" (no JSON mode or schema)')


class SamplingFields(BaseModel):
    """Fields shared by chat and legacy completions."""

    model_config = ConfigDict(extra="ignore")

    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description="default 0 (greedy: answers from documents should not vary); OpenAI's is 1",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: Literal[1] | None = Field(default=None, description="only 1")
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**63 - 1, description="a signed 64-bit integer"
    )
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = Field(
        default=None, description="up to 4 strings"
    )
    presence_penalty: float = Field(
        default=0.0, **PENALTY, description="minus this from a generated token's logit (OpenAI)"
    )
    frequency_penalty: float | None = Field(
        default=None,
        **PENALTY,
        description="minus this times the token's count so far from its logit (OpenAI); "
        "default KB_FREQUENCY_PENALTY",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=0, description="not supported"
    )
    user: Name | None = Field(default=None, description="accepted and ignored")
    # kb's extras (vLLM has top_k and repetition_penalty too)
    top_k: int = Field(default=0, ge=0, le=100000, description="kb: 0 = no limit")
    repetition_penalty: float | None = _factor(
        "kb (as vLLM): a generated token's logit divided by this when positive, "
        "multiplied when negative; 1 = off, default KB_REPETITION_PENALTY",
        gt=0.0,
    )
    # DRY, as text-generation-webui, llama.cpp and koboldcpp name its parameters
    dry_multiplier: float | None = _factor(
        "kb (DRY): a token that would continue a repeat of an earlier run of the "
        "answer, the repeat L tokens long so far, loses dry_multiplier * dry_base ** (L - "
        "dry_allowed_length) from its logit when L >= dry_allowed_length; 0 = off, default "
        "KB_DRY_MULTIPLIER",
        ge=0.0,
    )
    dry_base: float | None = _factor(
        "kb (DRY): how fast the penalty grows with the repeat; default KB_DRY_BASE", ge=1.0
    )
    dry_allowed_length: int | None = Field(
        default=None,
        ge=1,
        le=DRY_MAX_ALLOWED_LENGTH,
        description="kb (DRY): repeats this long go free; default KB_DRY_ALLOWED_LENGTH",
    )
    dry_sequence_breakers: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=DRY_MAX_BREAKER_CHARS)]],
            Field(max_length=DRY_MAX_BREAKERS),
        ]
        | None
    ) = Field(
        default=None,
        description="kb (DRY): a token whose text contains one of these strings ends a repeated "
        'run; default KB_DRY_SEQUENCE_BREAKERS (["\\n", ":", "\\"", "*"])',
    )

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(SamplingFields):
    model: Name = Field(description='the corpus as "kb:NAME" (or NAME), unless `corpus` is given')
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    logprobs: Literal[False] | None = Field(default=None, description="not supported: false")
    top_logprobs: Literal[0] | None = Field(default=None, description="not supported: 0")
    response_format: ResponseFormat | None = Field(default=None, description='only "text"')
    tools: list[dict[str, Any]] | None = Field(
        default=None, max_length=0, description="not supported (no tool calling): empty"
    )
    tool_choice: Literal["none", "auto"] | None = Field(
        default=None, description='"none" (or "auto" with no tools)'
    )
    parallel_tool_calls: bool | None = Field(default=None, description="accepted and ignored")
    functions: list[dict[str, Any]] | None = Field(
        default=None, max_length=0, description="not supported: empty"
    )
    function_call: Literal["none", "auto"] | None = Field(
        default=None, description='"none" (or "auto" with no functions)'
    )
    modalities: list[Literal["text"]] | None = Field(default=None, description='only ["text"]')
    audio: None = Field(default=None, description="not supported")
    prediction: None = Field(default=None, description="not supported")
    metadata: dict[str, Any] | None = Field(default=None, description="accepted and ignored")
    store: bool | None = Field(default=None, description="accepted and ignored")
    service_tier: Name | None = Field(default=None, description="accepted and ignored")
    reasoning_effort: Name | None = Field(default=None, description="accepted and ignored")
    # kb's extras
    corpus: Name | None = Field(default=None, description="kb: corpus name; overrides `model`")
    dense: bool = Field(
        default=False,
        description="kb: attend the whole corpus densely instead of the passages "
        "the question chooses (attention retrieval, the default beyond the model's context)",
    )
    citation_text: Literal["passage", "segment"] = Field(
        default="passage",
        description="kb: each citation carries the passage the answer drew on; with "
        '"segment", also the whole stored segment and the passage\'s span in it',
    )

    def corpus_name(self) -> str:
        name = self.corpus or self.model
        return name.removeprefix("kb:")


class CompletionRequest(SamplingFields):
    """The legacy completions request: a raw prompt, continued by the served model alone."""

    model: Name = Field(description='a model of GET /v1/models ("kb:NAME") or the base model')
    prompt: (
        Annotated[Text, Field(min_length=1)]
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="one prompt (a list holds exactly one)")
    max_tokens: int = Field(default=16, ge=1, le=32768, description="default 16, as OpenAI's")
    echo: bool = Field(default=False, description="prepend the prompt to the text")
    logprobs: Literal[0] | None = Field(default=None, description="not supported: 0")
    best_of: Literal[1] | None = Field(default=None, description="only 1")
    suffix: None = Field(default=None, description="not supported (no insertion)")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt[:1])


class CorpusCreate(BaseModel):
    name: Name = Field(min_length=1, max_length=64)
    visibility: Literal["private", "public", "shared"] | None = Field(
        default=None, description="default: private for a signed-in user, public for anonymous use"
    )
    share_with: list[Name] = Field(
        default_factory=list, description="user names, for visibility shared"
    )
