"""OpenAI chat-completions wire protocol (the subset we honour) plus tellerloop's extras.

Unknown request fields are refused with a 400 naming the field (as OpenAI does), so a typo such as
`max_token` fails loudly instead of being silently ignored. What clients send as a matter of course
and that means nothing here is accepted: message content as a list of text parts (joined),
`response_format` {"type": "text"}, `metadata`, `store`, `service_tier`, `parallel_tool_calls`, an
empty `tools` list, `tool_choice` "none". What would change behaviour and is not supported (image or
audio parts, tools with entries, JSON mode, n > 1, penalties) is refused with the field named.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.core.text import Text, no_nul
from gateway.knowledge.schemas import (
    SearchHit as Source,  # a knowledge-base entry the model was shown
)


def text_of(content: object) -> object:
    """A list of content parts → its text parts joined by newlines; a non-text part is refused."""
    if not isinstance(content, list):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"part {i} is {kind or type(part).__name__!r}: only text content parts "
                             "({'type': 'text', 'text': ...}) are supported by this model")
        texts.append(part["text"])
    return "\n".join(texts)


MAX_STOP_CHARS = 200  # a stop string longer than any answer can never match; refusing it bounds the work


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: Text  # a list of text parts is accepted and joined (`text_of`)
    name: str | None = Field(None, max_length=64)

    _parts = field_validator("content", mode="before")(classmethod(lambda cls, v: text_of(v)))


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"'{value}' is not supported: this model cannot guarantee JSON output; "
                             "send {'type': 'text'} or leave response_format out")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None  # within what a torch generator takes (`_seed_fits`)
    user: Text | None = Field(None, max_length=200)
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    # accepted, meaning nothing here (what SDKs and UIs send by default)
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=32)
    parallel_tool_calls: bool | None = None
    tools: list[dict] | None = None  # an empty list only: no tool calling
    tool_choice: Literal["none"] | None = None

    @field_validator("seed")
    @classmethod
    def _seed_fits(cls, value: int | None) -> int | None:
        if value is not None and not -(2**63) <= value < 2**64:
            raise ValueError("seed must fit in 64 bits (from -2^63 to 2^64 - 1)")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict] | None) -> list[dict] | None:
        if value:
            raise ValueError("tool calling is not supported by this model; send no tools (or an empty list)")
        return value
    # tellerloop extras: ground the answer in the knowledge base (default: rag.enabled_by_default),
    # and how many entries to retrieve (default: rag.top_k). Not `top_k`: vLLM uses that for sampling.
    rag: bool | None = None
    rag_top_k: Annotated[int, Field(ge=1)] | None = None
    # vLLM's sampling extension (default: model.repetition_penalty), so a gateway in front of this
    # one (engine.backend = "openai") can pass its own setting through
    repetition_penalty: Annotated[float, Field(ge=1.0, le=2.0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop accepts at most 4 non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string may have at most {MAX_STOP_CHARS} characters")
        for s in stops:
            no_nul(s)
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages must contain at least one user message")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens




ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object; also sent as an SSE event when a stream fails after it started."""
    return {
        "error": {
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "message": message,
            "param": param,
            "code": code,
        }
    }


# ---- responses -------------------------------------------------------------------------------------
# The OpenAI chat.completion / chat.completion.chunk / model list objects, plus tellerloop's extras.
# Responses are serialised without unset fields (`PydanticPlugin(exclude_unset=True)` in the app), so
# optional source metadata that an entry does not have is left out, as before.
class TopLogprob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    message: AssistantMessage
    finish_reason: str = Field(description="stop | length | cancelled")
    logprobs: ChoiceLogprobs | None


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ExchangeExtras(BaseModel):
    """What tellerloop adds to a completion (and to a stream's last chunk)."""

    model_config = ConfigDict(extra="forbid")
    exchange_id: str = Field(description="the logged exchange: rate it at /v1/exchanges/{exchange_id}/feedback")
    confidence: float | None = Field(description="0..1; below review.confidence_threshold the answer is queued for review; "
                                     "null when the engine reported no token log-probabilities (an upstream without logprobs)")
    flagged: bool
    variant: str = Field(description="the adapter version (or 'base') that answered")
    sources: list[Source]
    retrieval: Literal["ok", "unavailable", "no_match"] | None = Field(
        None, description="unavailable: the knowledge base could not be searched and the answer is ungrounded; "
                          "no_match: nothing retrieved was relevant enough (rag.fallback_min_similarity), so the "
                          "answer is rag.fallback_answer")
    fallback: bool | None = Field(None, description="true when the answer is the configured fallback, not generated")


class ChatCompletion(ExchangeExtras):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    message: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail
