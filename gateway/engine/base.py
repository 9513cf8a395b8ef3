"""The narrow engine interface every backend implements.

Callers hand over chat messages plus sampling parameters and get back an async stream of
`TokenEvent`s ending with one `Finished`. Messages (not token ids) cross the boundary so a remote
OpenAI-compatible backend (vLLM), which applies the chat template itself, fits unchanged; the
`adapter` field names a LoRA adapter the same way vLLM addresses LoRA requests by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0  # alternatives to report per token (0..20)
    repetition_penalty: float = 1.0  # >1: already *generated* tokens get their logits scaled down
    no_repeat_ngram_size: int = 0  # >0: a generated token n-gram of this size may not occur twice


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[dict[str, str]]
    params: SamplingParams
    adapter: str | None = None  # None → the base model


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the new visible text (may be empty while a multi-byte
    character or a possible stop string is held back)."""

    token_id: int  # -1 where the engine does not say (an upstream's stream)
    token: str
    logprob: float | None  # None: the engine reported no log-probability (confidence is then unavailable)
    text: str
    top_logprobs: tuple[tuple[str, float], ...] = ()
    entropy: float | None = None  # of the model's next-token distribution here (nats); None: not known


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # any text still held back at the end
    extra: dict = field(default_factory=dict)


class EngineError(Exception):
    """Base class for errors an engine reports to callers (mapped to HTTP errors by the API)."""


class ContextLengthExceeded(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        super().__init__(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} "
            "in the completion). Please reduce the length of the messages or the completion."
        )


class EngineOverloaded(EngineError):
    """The bounded wait queue is full; the caller should retry later."""


class UnknownAdapter(EngineError):
    pass


class EngineFailure(EngineError):
    """Generation failed inside the engine (the request cannot be completed)."""


class EngineUnavailable(EngineError):
    """The engine cannot take requests now (an upstream that is down); the caller should retry later."""


class EngineRejected(EngineError):
    """The engine refused the request as invalid (an upstream's 400): the client must change it."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        self.code = code
        super().__init__(message)


@runtime_checkable
class Engine(Protocol):
    name: str
    max_context_tokens: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    def unready(self) -> tuple[str, str] | None:
        """Why requests are refused now, as (error code, message), or None when ready."""
        ...

    def variants(self) -> list[str]:
        """Names servable through `GenerationRequest.adapter` (the base model is "base")."""
        ...

    def stats(self) -> dict[str, int]:
        """Queue depth, active sequences, memory (KV cache, resident adapters): for /metrics and /ready."""
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter folder as variant `name`, without stopping the others."""
        ...

    async def unload_adapter(self, name: str) -> bool:
        """Stop routing new requests to `name`; requests already submitted finish on it."""
        ...

    def weight_bytes(self) -> dict[str, int]:
        """Weight memory per served variant, for /v1/adapters and /metrics."""
        ...

    async def check(self, request: GenerationRequest) -> None:
        """What `submit` refuses before queueing (ContextLengthExceeded, UnknownAdapter), without
        queueing: for an answer that will not be generated (the fallback), so whether a request is
        valid never depends on what retrieval found."""
        ...

    async def submit(self, request: GenerationRequest) -> "TokenStream":
        """Validate and enqueue; raises ContextLengthExceeded / EngineOverloaded / UnknownAdapter
        before anything is generated. The returned stream yields TokenEvents then one Finished;
        closing it early (client gone) cancels the generation."""
        ...


class TokenStream(Protocol):
    def __aiter__(self) -> AsyncIterator[TokenEvent | Finished]: ...

    async def __anext__(self) -> TokenEvent | Finished: ...

    async def aclose(self) -> None: ...
