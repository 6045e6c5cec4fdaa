"""OpenAI-compatible request/response schemas (pydantic v2) plus the SLO extension.

Clients of the official ``openai`` package send the extension fields through ``extra_body``:
``tpot_slo_ms``, ``ttft_slo_ms`` (absolute targets) or ``slo_class`` (a named class from serve_config.yaml).
Responses carry the outcome in an extra top-level ``slo`` object (in the final chunk for streams), which the
openai client keeps as an extra attribute.

A request that sets a field this server does not implement (``tools``, ``response_format``, ``logit_bias``, a
non-zero penalty, ``n`` > 1, non-text content parts, or a field OpenAI's API does not have) is rejected with a 400
naming the field, never silently served as if it had not asked. Fields that change nothing about the output
(``store``, ``metadata``, ``service_tier``) are accepted and ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.engine.config import MAX_TOP_LOGPROBS  # light: dataclasses only, no torch


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


# OpenAI fields this server does not implement, with the values that ask for nothing (accepted: clients often send
# the default explicitly). Any other value is a 400 naming the field.
NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
    "tool_choice": ("none",), "parallel_tool_calls": (True, False), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "best_of": (1,), "echo": (False,), "suffix": ("",),
    "modalities": (["text"],), "prediction": (), "audio": (), "reasoning_effort": (), "web_search_options": (),
}
IGNORED_FIELDS = frozenset({"store", "metadata", "service_tier"})  # bookkeeping only: the output is the same
MAX_INT64 = 2**63 - 1
MAX_TOKENS_LIMIT = 2**31 - 1  # beyond any context window; the replica then checks prompt + max_tokens exactly


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked by unsupported_field(), not dropped

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-MAX_INT64 - 1, le=MAX_INT64)
    user: str | None = Field(default=None, max_length=256)
    # Extensions (vLLM-style top_k / ignore_eos, and the SLO fields).
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    ignore_eos: bool = False
    tpot_slo_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    ttft_slo_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    slo_class: str | None = Field(default=None, max_length=256)

    def unsupported_field(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something this server does not implement, else None."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS or value is None:
                continue
            if name in NOOP_VALUES:
                if value in NOOP_VALUES[name]:
                    continue
                return name, f"{name} is not supported by this server"
            return name, f"Unrecognized request argument supplied: {name}"
        return None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n = 1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else list(stop)
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for app.engine.config.SamplingParams (absent fields keep the engine defaults)."""
        kw: dict[str, Any] = {"ignore_eos": self.ignore_eos}
        if self.effective_max_tokens() is not None:
            kw["max_tokens"] = self.effective_max_tokens()
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        if self.top_p is not None:
            kw["top_p"] = self.top_p
        if self.top_k is not None:
            kw["top_k"] = self.top_k
        if self.seed is not None:
            kw["seed"] = self.seed
        if self.stop:
            kw["stop"] = tuple(self.stop)
        if self.num_top_logprobs() is not None:
            kw["logprobs"] = self.num_top_logprobs()
        return kw

    def num_top_logprobs(self) -> int | None:
        """None: no logprobs; k: each token's logprob and the k most likely alternatives."""
        return None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part type {part.type!r} is not supported; only text")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top_logprobs

    def num_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as the tokenizer's chat template expects them ("developer" is OpenAI's new "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)  # OpenAI's legacy limit

    def num_top_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt is empty")
        return prompt


# ---- responses ----------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SLOReport(BaseModel):
    """The extension field: the targets the request ran under and what it achieved."""

    slo_class: str = Field(serialization_alias="class")
    tpot_slo_ms: float | None = None
    ttft_slo_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    attained: bool | None = None  # both TTFT and TPOT met; None when the request had no SLO
    missed: list[str] | None = None  # which were missed: "ttft", "tpot" (empty when attained)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str  # the token's text; "bytes:\\x.." for a piece of a multi-byte character
    logprob: float  # the target's raw log-probability (before temperature / top-k / top-p)
    bytes: list[int] | None


class ChatLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # each token's character offset in the completion's text


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    slo: SLOReport | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    slo: SLOReport | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    slo: SLOReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "adaserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "tpot_slo_ms", "ttft_slo_ms")


def param_from_message(message: str) -> str | None:
    """Best-effort OpenAI ``param`` for a validation message from SamplingParams or the engine."""
    if "maximum context length" in message:  # prompt + max_tokens beyond the window (OpenAI's wording)
        return "max_tokens"
    for name in _PARAMS:
        if name in message:
            return name
    return "prompt" if "prompt" in message or "context window" in message else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict with aliases (``slo.class``) and without unset optional extension noise."""
    return model.model_dump(by_alias=True, exclude_none=False)
