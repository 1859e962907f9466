"""Request and response bodies of the OpenAI-compatible API (the subset this server implements).

Requests are validated strictly at the edge, as OpenAI validates them: a string where a number belongs
is an error, every number has its range (``seed`` is a signed 64-bit integer, as OpenAI's), and a field
this server does not implement (``tools``, ``response_format``, ...) is a 400 naming it rather than
being silently ignored. Extensions beyond OpenAI's API are vLLM's spellings: ``top_k``, ``min_p``,
``repetition_penalty``, ``use_beam_search``, ``length_penalty``, ``ignore_eos``.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from model.generate import DEFAULT_STOP_IDS, MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_N = 128  # per field; the server's max_choices_per_request bounds a request's total (prompts x n)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# Constraints live in the types, so that /openapi.json states them too (a schema-driven client then sends
# only what the server accepts, apart from limits of the model: its context and vocabulary).


def _integral(value):
    """JSON has one number type: 5.0 is the integer 5 (as JSON Schema's "integer" says); 5.5 stays an error."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
StopString = Annotated[str, Field(min_length=1)]
TokenId = Annotated[Int, Field(ge=0)]
TokenPrompt = Annotated[list[TokenId], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", protected_namespaces=())


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with the request's token usage")


class _Request(_Strict):
    model: str
    max_tokens: Int | None = Field(None, ge=0, description="default: up to the server's default_max_tokens, "
                                   "capped by the context; 0 only with echo (score the prompt)")
    max_completion_tokens: Int | None = Field(None, ge=1, description="OpenAI's current name for max_tokens "
                                              "(wins when both are given)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 (or below 1e-5): greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1, description="extension: 0 or -1 mean no top-k cut")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="extension: drop tokens less likely than min_p "
                         "times the most likely one")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension (CTRL's penalty)")
    n: Int = Field(1, ge=1, le=MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-turn (benchmarks)")

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def top_logprobs_wanted(self) -> int | None:
        """Alternatives per token in the answer's log-probs; None: no log-probs asked for."""
        return None

    def sampling_params(self, max_new_tokens: int, sample: int) -> SamplingParams:
        """The core's settings for sample ``sample`` of a prompt (seeds differ per sample so that n > 1
        gives n different answers; any integer is a valid seed there)."""
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=max(self.top_k, 0),
            top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty, stop=self.stop_list,
            stop_token_ids=() if self.ignore_eos else DEFAULT_STOP_IDS,
            seed=None if self.seed is None else self.seed + sample,
            top_logprobs=self.top_logprobs_wanted or 0,
        )


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenPrompt | Annotated[list[TokenPrompt], Field(min_length=1)]
    echo: bool = Field(False, description="return the prompt before the completion (with its log-probs)")
    logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="log-probs of each token and this many most likely alternatives")
    best_of: Int | None = Field(None, ge=1, le=MAX_N, description="sample (or with use_beam_search, keep) this "
                                "many answers per prompt and return the n most likely")
    use_beam_search: bool = Field(False, description="extension (vLLM): beam search with best_of (or n) beams")
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0,
                                  description="extension: beam scores are divided by length**length_penalty")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("token prompts must not be empty")
        return value

    @model_validator(mode="after")
    def _check_strategy(self):
        if self.max_tokens == 0 and not self.echo:
            raise _field_error("max_tokens", "0 is only allowed with echo (scoring the prompt)")
        if self.best_of is not None and self.best_of < self.n:
            raise _field_error("best_of", f"must be at least n ({self.n})")
        if self.stream and (self.use_beam_search or (self.best_of or self.n) > self.n):
            raise _field_error("stream", "cannot stream with use_beam_search or best_of > n: the best answers "
                                         "are known only at the end")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    @property
    def samples_per_prompt(self) -> int:
        """Sequences generated per prompt: best_of (or beams) if given, else n."""
        return max(self.n, self.best_of or 0)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, value):
        if isinstance(value, list):
            for index, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind is not None and kind != "text":
                    raise ValueError(f"part {index} has type {kind!r}; this server accepts only 'text' parts")
        return value

    def for_template(self) -> dict[str, str]:
        """``{"role", "content"}`` for the chat template: parts joined, developer read as system."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = Field(False, description="log-probs of each token of the reply")
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="most likely alternatives per token (needs logprobs)")

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "needs logprobs: true")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def samples_per_prompt(self) -> int:
        return self.n


class FieldError(ValueError):
    """A check across fields that names the field to blame (serving.api reports it as the error's param)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


_field_error = FieldError


# ---- responses ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def unix_time() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions log-probs: one entry per token (the first prompt token has none)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "groundup"
    max_model_len: int | None = None
    version: str | None = Field(None, description="extension: short hash of the served weights")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    models: dict[str, str] = Field(description="each served model's state: 'ok', or why it cannot answer")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
