"""The OpenAI-compatible HTTP API (FastAPI), the ingress of the Serve application.

``build_api`` makes the FastAPI app from handles to the model deployments; :class:`OpenAIIngress` is
the Serve deployment that builds it inside its replica (``__serve_build_asgi_app__``), so nothing
unpicklable travels from the driver. Every error leaves as OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 4xx for client mistakes (a 400, never FastAPI's
422, for any invalid body), 5xx when the server fails — a generation that fails is a 500 (or an
``error`` event in a stream), its cause logged here and never shown to the client. ``/openapi.json``
documents exactly these bodies and statuses, and the 200 bodies of every endpoint.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.model_server import ChoiceDelta, TokenLogprob
from serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    FieldError,
    HealthResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    unix_time,
)

HEALTH_TIMEOUT_S = 10.0
DONE = b"data: [DONE]\n\n"
GENERATION_FAILED = "The model failed while generating this answer; the cause is in the server's log. Try again."
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ApiSettings:
    max_context: dict[str, int]  # served model name -> context length (for /v1/models)
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    # Per API key (per client address without keys), counted by each ingress replica on its own: with
    # N ingress replicas a caller may get up to N times this.
    rate_limit_per_minute: int | None = None
    versions: dict[str, str] = field(default_factory=dict)  # served name -> weights version (/v1/models)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, ErrorBody(message=message, type=type, param=param,
                                                                 code=code), headers


def error_response(status: int, body: ErrorBody, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status, headers=headers)


@dataclass
class RateLimiter:
    """A sliding one-minute window of request times per caller."""

    per_minute: int
    calls: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))

    def allow(self, caller: str, now: float | None = None) -> tuple[bool, float]:
        now = time.monotonic() if now is None else now
        window = self.calls[caller]
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= self.per_minute:
            return False, 60.0 - (now - window[0])
        window.append(now)
        return True, 0.0


def _validation_message(err: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) of the first problem, worded like OpenAI's errors. Of a union's alternatives
    (``prompt`` as text, token ids, ...), the one that failed on a constraint rather than on its type says most."""
    errors = err.errors()
    first = errors[0]
    same_field = [e for e in errors if e.get("loc", ())[:2] == first.get("loc", ())[:2]]
    first = next((e for e in same_field if not str(e.get("type", "")).endswith("_type")), first)
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None, "invalid_json"
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # a check across fields names the one to blame
        return f"Invalid value for '{cause.field}': {str(cause).split(': ', 1)[1]}", cause.field, "invalid_value"
    if not loc:
        return "The request body must be a JSON object.", None, "invalid_value"
    # Drop pydantic's union-branch names ("str", "list[int]", "constrained-str") so the param reads like the field.
    param = ".".join(p for p in loc if (p.isdigit() or p.isidentifier()) and p not in ("str", "int", "float", "bool"))
    kind = first.get("type")
    if kind == "extra_forbidden":
        return (f"Unsupported parameter: '{param}' is not supported by this server.", param,
                "unsupported_parameter")
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return f"Invalid value for '{param}': {message}", param, "invalid_value"


def _sse(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


# ---- log-probabilities in OpenAI's two shapes ----------------------------------------------------------
def completion_logprobs(records: list[TokenLogprob], offset: int = 0) -> dict[str, list]:
    """The legacy completions object; ``text_offset`` counts characters from ``offset`` (the choice's start)."""
    offsets = []
    for record in records:
        offsets.append(offset)
        offset += record.text_length
    tops = []
    for record in records:
        if record.top is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for text, _, value in record.top:  # most likely first; keep the first of tokens that read alike
            top.setdefault(text, value)
        tops.append(top)
    return {"tokens": [r.token for r in records], "token_logprobs": [r.logprob for r in records],
            "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(records: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{"token": r.token, "logprob": r.logprob, "bytes": list(r.bytes),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, b, v in r.top or ()]}
                        for r in records], "refusal": None}


class ChunkWriter:
    """The server-sent events of one streamed response, written as JSON text directly.

    Building and dumping a pydantic model per chunk cost more CPU than decoding the token it carries, so
    the constant head (id, object, created, model) is rendered once per response. The bytes are exactly
    ``_sse(<the schema model>.model_dump())`` with unset delta fields and a None usage left out (the tests
    compare the two), i.e. OpenAI's chunk format.
    """

    def __init__(self, object_name: str, response_id: str, created: int, model: str):
        self._head = (f'data: {{"id":{json.dumps(response_id)},"object":{json.dumps(object_name)},'
                      f'"created":{int(created)},"model":{json.dumps(model)},"choices":[')

    def event(self, choices: list[str], usage: Usage | None = None) -> bytes:
        """One SSE event from rendered choices (see :meth:`text_choice` and :meth:`delta_choice`)."""
        tail = "]}" if usage is None else (
            f'],"usage":{{"prompt_tokens":{usage.prompt_tokens},"completion_tokens":{usage.completion_tokens},'
            f'"total_tokens":{usage.total_tokens}}}}}')
        return f"{self._head}{','.join(choices)}{tail}\n\n".encode()

    @staticmethod
    def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> str:
        """A completions choice: ``{"index", "text", "logprobs", "finish_reason"}``."""
        return (f'{{"index":{int(index)},"text":{json.dumps(text)},"logprobs":{_json(logprobs)},'
                f'"finish_reason":{json.dumps(finish_reason)}}}')

    @staticmethod
    def delta_choice(index: int, content: str | None, finish_reason: str | None, role: str | None = None,
                     logprobs: dict | None = None) -> str:
        """A chat chunk choice; like OpenAI, delta fields that are unset are left out."""
        delta = ",".join(part for part in (role is not None and f'"role":{json.dumps(role)}',
                                           content is not None and f'"content":{json.dumps(content)}') if part)
        return (f'{{"index":{int(index)},"delta":{{{delta}}},"logprobs":{_json(logprobs)},'
                f'"finish_reason":{json.dumps(finish_reason)}}}')


def _json(value) -> str:
    return "null" if value is None else json.dumps(value, separators=(",", ":"))


@dataclass
class _Answer:
    """One choice's answer collected from its deltas (non-streamed responses)."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.completion_tokens = max(self.completion_tokens, delta.completion_tokens)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class GenerationError(Exception):
    """A choice ended with an error (the model server logged why)."""


# ---- OpenAPI: the statuses and bodies the app really returns --------------------------------------
def _errors(*statuses: int) -> dict[int, dict]:
    described = {400: "the request is invalid: a field is missing, out of range or not supported (the error "
                      "names it), or it does not fit the model's context or the server's per-request limits",
                 401: "no API key, or a wrong one (only when the server requires keys)",
                 404: "no such model",
                 429: "too many requests for this key in the last minute (Retry-After says when to retry)",
                 500: "the server failed, e.g. while generating (the cause is in the server's log)",
                 503: "the model is not ready or is restarting"}
    return {status: {"model": ErrorResponse, "description": described[status]} for status in statuses}


def _with_stream(model: type, chunk: type, description: str) -> dict:
    """A 200 that is ``model`` as JSON, or with ``stream: true`` server-sent events: each event's ``data``
    is a ``chunk`` object, an error object (a failure mid-stream), or ``[DONE]`` last."""
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}},
    ]}}}
    return {"model": model, "description": description, "content": {"text/event-stream": {"schema": event}}}


STREAM_CHUNKS = (CompletionResponse, ChatCompletionChunk, ErrorResponse)


def _truthful_openapi(app: FastAPI, model_names: list[str]) -> Callable[[], dict]:
    """FastAPI documents a 422 for every body; this API answers invalid bodies with a 400 (documented), so
    the 422s go. The served models' names are stated where a model is named (other names are a 404)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
                    for parameter in operation.get("parameters", []):
                        if parameter.get("name") == "name" and parameter.get("in") == "path":
                            parameter["schema"]["enum"] = model_names
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for model in STREAM_CHUNKS:  # what streamed events hold, though no route returns them as JSON
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
                for name, nested in definition.pop("$defs", {}).items():
                    components.setdefault(name, nested)
                components.setdefault(model.__name__, definition)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                if name in components:
                    components[name]["properties"]["model"]["enum"] = model_names
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def build_api(models: dict[str, Any], settings: ApiSettings) -> FastAPI:
    """The FastAPI app; ``models`` maps a served name to a handle of its ModelServer deployment."""
    app = FastAPI(title="groundup", version="1", description="OpenAI-compatible API for groundup models")
    app.openapi = _truthful_openapi(app, sorted(models))
    limiter = RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err.status, err.body, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        message, param, code = _validation_message(err)
        return error_response(400, ErrorBody(message=message, type="invalid_request_error", param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(err.status_code, ErrorBody(message=str(err.detail), type="invalid_request_error",
                                                         code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, ErrorBody(message="The server had an internal error; it is logged there.",
                                             type="server_error", code="internal_error"))

    async def guard(request: Request) -> None:
        """Bearer key check (when keys are configured) and the per-key rate limit."""
        caller = request.client.host if request.client else "unknown"
        if settings.api_keys:
            header = request.headers.get("authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
            key = key.strip()
            if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
                raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
            caller = key
        if limiter is not None:
            allowed, retry_after = limiter.allow(caller)
            if not allowed:
                raise ApiError(429, f"Rate limit reached: {limiter.per_minute} requests per minute.",
                               type="requests", code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, round(retry_after)))})

    def handle_for(name: str):
        if name not in models:
            raise ApiError(404, f"The model '{name}' does not exist. Served models: {', '.join(sorted(models))}.",
                           param="model", code="model_not_found")
        return models[name]

    async def model_state(handle) -> str:
        try:
            info = await asyncio.wait_for(handle.info.remote(), HEALTH_TIMEOUT_S)
        except Exception:  # not ready, being replaced, or its replica is gone
            logger.warning("health: a model deployment did not answer", exc_info=True)
            return "unavailable"
        return "ok" if info.get("engine_alive", True) else "engine stopped"

    @app.get("/health", response_model=HealthResponse,
             responses={503: {"model": HealthResponse, "description": "a model cannot answer (its state says why)"}})
    async def health():
        """Whether every served model can answer now: each model's engine, not only this proxy."""
        states = dict(zip(models, await asyncio.gather(*(model_state(h) for h in models.values()))))
        ok = all(state == "ok" for state in states.values())
        body = HealthResponse(status="ok" if ok else "unavailable", models=states)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    def card(name: str, created: int) -> ModelCard:
        return ModelCard(id=name, created=created, max_model_len=settings.max_context.get(name),
                         version=settings.versions.get(name) or None)

    @app.get("/v1/models", dependencies=[Depends(guard)], response_model=ModelList,
             responses=_errors(401, 429, 500))
    async def list_models() -> ModelList:
        created = unix_time()
        return ModelList(data=[card(name, created) for name in sorted(models)])

    @app.get("/v1/models/{name}", dependencies=[Depends(guard)], response_model=ModelCard,
             responses=_errors(401, 404, 429, 500))
    async def get_model(name: str) -> ModelCard:
        handle_for(name)
        return card(name, unix_time())

    async def open_stream(request: CompletionRequest | ChatCompletionRequest):
        """Start generation; returns (header, the rest of the stream) or raises ApiError."""
        stream = handle_for(request.model).options(stream=True).generate.remote(request)
        try:
            header = await stream.__anext__()
        except Exception:
            stream.cancel()
            logger.exception("model %s failed to start generating", request.model)
            raise ApiError(503, f"The model '{request.model}' could not start generating; try again.",
                           type="server_error", code="model_unavailable") from None
        if hasattr(header, "message"):  # RequestRejected
            raise ApiError(header.status, header.message, type="invalid_request_error" if header.status < 500
                           else "server_error", param=header.param, code=header.code)
        return header, stream

    async def collect(header, stream) -> list[_Answer]:
        answers = [_Answer() for _ in range(header.choices)]
        try:
            async for batch in stream:
                for choice, delta in batch:
                    if delta.finish_reason == "error":
                        raise ApiError(500, GENERATION_FAILED, type="server_error", code="generation_failed")
                    answers[choice].add(delta)
        finally:
            stream.cancel()  # a no-op once finished; on an error, frees the other choices' rows
        return answers

    def usage(header, completion_tokens: int) -> Usage:
        prompt = sum(header.prompt_tokens)
        return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens,
                     total_tokens=prompt + completion_tokens)

    async def stream_events(request, header, stream, writer: ChunkWriter,
                            render_choice: Callable[[int, ChoiceDelta], str]) -> AsyncIterator[bytes]:
        """The SSE events of a streamed completion or chat: ``render_choice(choice, delta)`` is the one part
        that differs. With ``stream_options.include_usage`` a last chunk (no choices) carries the usage. The
        last choice's final chunk, the usage and ``[DONE]`` go out in one write: every write is a message
        through Serve's proxy, which costs more CPU than the tokens in it."""
        tokens: dict[int, int] = {}
        open_choices = header.choices
        async for batch in stream:
            events = []  # one write per batch from the model: fewer messages to Serve's proxy
            for choice, delta in batch:
                if delta.finish_reason == "error":
                    raise GenerationError()
                tokens[choice] = delta.completion_tokens
                open_choices -= delta.finish_reason is not None
                if delta.text or delta.finish_reason or delta.logprobs:
                    events.append(writer.event([render_choice(choice, delta)]))
            if open_choices == 0:
                if request.include_usage:
                    events.append(writer.event([], usage(header, sum(tokens.values()))))
                events.append(DONE)
            if events:
                yield b"".join(events)
        if open_choices > 0:  # the model's stream ended before every choice did
            raise GenerationError()

    def streaming(chunks: AsyncIterator[bytes], stream) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield chunk
                return  # the last chunk ended with [DONE]
            except GenerationError:  # mid-stream failure: tell the client in-band, then end cleanly
                pass
            except Exception:
                logger.exception("a streamed response failed")
            finally:
                stream.cancel()
            yield _sse({"error": ErrorBody(message=GENERATION_FAILED, type="server_error",
                                           code="generation_failed").model_dump()}) + DONE

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    generation_errors = _errors(400, 401, 404, 429, 500, 503)

    @app.post("/v1/completions", dependencies=[Depends(guard)], response_model=None,
              responses={200: _with_stream(CompletionResponse, CompletionResponse,
                                           "the completion, or (stream: true) its chunks"),
                         **generation_errors})
    async def completions(request: CompletionRequest):
        header, stream = await open_stream(request)
        response_id, created = new_id("cmpl"), unix_time()
        wants_logprobs = request.logprobs is not None
        if not request.stream:
            answers = await collect(header, stream)
            return CompletionResponse(
                id=response_id, created=created, model=request.model,
                usage=usage(header, sum(a.completion_tokens for a in answers)),
                choices=[CompletionChoice(index=i, text=a.text, finish_reason=a.finish_reason,
                                          logprobs=completion_logprobs(a.logprobs or []) if wants_logprobs else None)
                         for i, a in enumerate(answers)])

        writer = ChunkWriter("text_completion", response_id, created, request.model)
        offsets: dict[int, int] = defaultdict(int)

        def render(choice: int, delta: ChoiceDelta) -> str:
            logprobs = None
            if wants_logprobs:
                logprobs = completion_logprobs(delta.logprobs or [], offsets[choice])
                offsets[choice] += sum(r.text_length for r in delta.logprobs or [])
            return writer.text_choice(choice, delta.text, delta.finish_reason, logprobs)

        return streaming(stream_events(request, header, stream, writer, render), stream)

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)], response_model=None,
              responses={200: _with_stream(ChatCompletionResponse, ChatCompletionChunk,
                                           "the reply, or (stream: true) its chunks"),
                         **generation_errors})
    async def chat_completions(request: ChatCompletionRequest):
        header, stream = await open_stream(request)
        response_id, created = new_id("chatcmpl"), unix_time()
        if not request.stream:
            answers = await collect(header, stream)
            return ChatCompletionResponse(
                id=response_id, created=created, model=request.model,
                usage=usage(header, sum(a.completion_tokens for a in answers)),
                choices=[ChatChoice(index=i, message=AssistantMessage(content=a.text), finish_reason=a.finish_reason,
                                    logprobs=chat_logprobs(a.logprobs or []) if request.logprobs else None)
                         for i, a in enumerate(answers)])

        writer = ChunkWriter("chat.completion.chunk", response_id, created, request.model)

        def render(choice: int, delta: ChoiceDelta) -> str:
            logprobs = chat_logprobs(delta.logprobs or []) if request.logprobs else None
            return writer.delta_choice(choice, delta.text or None, delta.finish_reason, logprobs=logprobs)

        async def chunks():
            # The opening chunk (the role) rides with the first tokens: one write fewer.
            opening = writer.event([writer.delta_choice(i, "", None, role="assistant") for i in range(header.choices)])
            async for events in stream_events(request, header, stream, writer, render):
                yield opening + events
                opening = b""

        return streaming(chunks(), stream)

    return app


class OpenAIIngress:
    """The Serve ingress deployment (decorated in serving.app): builds the FastAPI app in its replica."""

    def __init__(self, models: dict[str, Any], settings: ApiSettings):
        self.models, self.settings = models, settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.models, self.settings)


class _LocalCall:
    """``.remote(...)`` on a method of a model server living in this replica: a coroutine, or a stream."""

    def __init__(self, method, stream: bool):
        self.method, self.stream = method, stream

    def remote(self, *args):
        if self.stream:
            return _LocalStream(self.method(*args))
        return self._call(*args)

    async def _call(self, *args):
        return self.method(*args)


class _LocalStream:
    """An async generator behind the streaming-response interface build_api uses (iterate, ``cancel``)."""

    def __init__(self, generator):
        self.generator = generator

    def __aiter__(self):
        return self

    def __anext__(self):
        return self.generator.__anext__()

    def cancel(self) -> None:  # closing runs the generator's finally: the engine frees its rows
        asyncio.ensure_future(self.generator.aclose())


class LocalModelHandle:
    """A ModelServer in the ingress's own replica, shaped like its deployment handle (one Ray hop fewer)."""

    def __init__(self, server):
        self.server = server

    def options(self, **_ignored) -> LocalModelHandle:  # generate always streams, info never does
        return self

    @property
    def generate(self) -> _LocalCall:
        return _LocalCall(self.server.generate, stream=True)

    @property
    def info(self) -> _LocalCall:
        return _LocalCall(self.server.info, stream=False)


class ColocatedIngress:
    """One model and the API in one deployment: the HTTP request is handled in the replica that decodes it.

    Replicas (and autoscaling) then scale API and model together; used when one model is served.
    """

    def __init__(self, name: str, path: str, server_settings, settings: ApiSettings):
        from serving.model_server import ModelServer

        self.name, self.settings = name, settings
        self.server = ModelServer(name, path, server_settings)

    def check_health(self) -> None:
        self.server.check_health()

    def info(self) -> dict:
        return self.server.info()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api({self.name: LocalModelHandle(self.server)}, self.settings)
