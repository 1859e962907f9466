"""The OpenAI-compatible HTTP API (FastAPI), the ingress of the Serve application.

``build_api`` makes the FastAPI app from handles to the model deployments; :class:`OpenAIIngress` is
the Serve deployment that builds it inside its replica (``__serve_build_asgi_app__``), so nothing
unpicklable travels from the driver. Every error leaves as OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for client mistakes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.schemas import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                             CompletionChoice, CompletionRequest, CompletionResponse, ErrorBody, ErrorResponse,
                             ModelCard, ModelList, Usage, new_id, unix_time)

HEALTH_TIMEOUT_S = 10.0


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


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return "The request body must be a JSON object.", None
    # Drop pydantic's union-branch names ("str", "list[int]") so the param reads like the field.
    param = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool"))
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return message, param or None


def _sse(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


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
    def text_choice(index: int, text: str, finish_reason: str | None) -> str:
        """A completions choice: ``{"index", "text", "logprobs", "finish_reason"}``."""
        return (f'{{"index":{int(index)},"text":{json.dumps(text)},"logprobs":null,'
                f'"finish_reason":{json.dumps(finish_reason)}}}')

    @staticmethod
    def delta_choice(index: int, content: str | None, finish_reason: str | None, role: str | None = None) -> str:
        """A chat chunk choice; like OpenAI, delta fields that are unset are left out."""
        delta = ",".join(part for part in (role is not None and f'"role":{json.dumps(role)}',
                                           content is not None and f'"content":{json.dumps(content)}') if part)
        return (f'{{"index":{int(index)},"delta":{{{delta}}},"logprobs":null,'
                f'"finish_reason":{json.dumps(finish_reason)}}}')


def build_api(models: dict[str, Any], settings: ApiSettings) -> FastAPI:
    """The FastAPI app; ``models`` maps a served name to a handle of its ModelServer deployment."""
    app = FastAPI(title="groundup", description="OpenAI-compatible API for groundup models")
    limiter = RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err.status, err.body, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return error_response(400, ErrorBody(message=message, type="invalid_request_error", param=param,
                                             code="invalid_value" if param else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(err.status_code, ErrorBody(message=str(err.detail), type="invalid_request_error",
                                                         code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return error_response(500, ErrorBody(message=f"internal error: {type(err).__name__}", type="server_error"))

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

    @app.get("/health")
    async def health():
        try:
            await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in models.values())), HEALTH_TIMEOUT_S)
        except Exception as err:
            raise ApiError(503, f"a model deployment is not ready: {type(err).__name__}", type="server_error")
        return {"status": "ok", "models": sorted(models)}

    def card(name: str, created: int) -> ModelCard:
        return ModelCard(id=name, created=created, max_model_len=settings.max_context.get(name),
                         version=settings.versions.get(name) or None)

    @app.get("/v1/models", dependencies=[Depends(guard)])
    async def list_models() -> ModelList:
        created = unix_time()
        return ModelList(data=[card(name, created) for name in sorted(models)])

    @app.get("/v1/models/{name}", dependencies=[Depends(guard)])
    async def get_model(name: str) -> ModelCard:
        handle_for(name)
        return card(name, unix_time())

    async def open_stream(request: CompletionRequest | ChatCompletionRequest):
        """Start generation; returns (header, the rest of the stream) or raises ApiError."""
        stream = handle_for(request.model).options(stream=True).generate.remote(request)
        try:
            header = await stream.__anext__()
        except Exception as err:
            stream.cancel()
            raise ApiError(503, f"model '{request.model}' failed to start generating: {type(err).__name__}",
                           type="server_error") from None
        if hasattr(header, "message"):  # RequestRejected
            raise ApiError(400, header.message, param=header.param, code=header.code)
        return header, stream

    async def collect(stream) -> tuple[dict[int, str], dict[int, str | None], dict[int, int]]:
        texts, finish, tokens = defaultdict(str), {}, defaultdict(int)
        async for batch in stream:
            for choice, event in batch:
                texts[choice] += event.text
                tokens[choice] = event.completion_tokens
                if event.finish_reason is not None:
                    finish[choice] = event.finish_reason
        return texts, finish, tokens

    def usage(header, tokens: dict[int, int]) -> Usage:
        prompt = sum(header.prompt_tokens)
        completion = sum(tokens.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def stream_events(request, header, stream, writer: ChunkWriter, render_choice) -> AsyncIterator[bytes]:
        """The SSE events of a streamed completion or chat: ``render_choice(choice, event)`` is the one part
        that differs. The last choice's chunk carries usage too, so clients that ignore stream_options see it."""
        tokens: dict[int, int] = {}
        open_choices = header.choices
        async for batch in stream:
            events = []  # one write per batch from the model: fewer messages to Serve's proxy
            for choice, event in batch:
                tokens[choice] = event.completion_tokens
                open_choices -= event.finish_reason is not None
                if event.text or event.finish_reason:
                    events.append(writer.event([render_choice(choice, event)],
                                               usage(header, tokens) if open_choices == 0 else None))
            if events:
                yield b"".join(events)
        if (request.stream_options or {}).get("include_usage"):
            yield writer.event([], usage(header, tokens))

    def streaming(chunks: AsyncIterator[bytes], stream) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as err:  # mid-stream failure: tell the client in-band, then end cleanly
                yield _sse({"error": ErrorBody(message=f"generation failed: {type(err).__name__}",
                                               type="server_error").model_dump()})
            finally:
                stream.cancel()
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", dependencies=[Depends(guard)])
    async def completions(request: CompletionRequest):
        header, stream = await open_stream(request)
        response_id, created = new_id("cmpl"), unix_time()
        if not request.stream:
            texts, finish, tokens = await collect(stream)
            return CompletionResponse(
                id=response_id, created=created, model=request.model, usage=usage(header, tokens),
                choices=[CompletionChoice(index=i, text=texts[i], finish_reason=finish.get(i))
                         for i in range(header.choices)])

        writer = ChunkWriter("text_completion", response_id, created, request.model)
        return streaming(stream_events(request, header, stream, writer,
                                       lambda choice, event: writer.text_choice(choice, event.text,
                                                                                event.finish_reason)), stream)

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)])
    async def chat_completions(request: ChatCompletionRequest):
        header, stream = await open_stream(request)
        response_id, created = new_id("chatcmpl"), unix_time()
        if not request.stream:
            texts, finish, tokens = await collect(stream)
            return ChatCompletionResponse(
                id=response_id, created=created, model=request.model, usage=usage(header, tokens),
                choices=[ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=finish.get(i))
                         for i in range(header.choices)])

        writer = ChunkWriter("chat.completion.chunk", response_id, created, request.model)

        async def chunks():
            yield writer.event([writer.delta_choice(i, "", None, role="assistant") for i in range(header.choices)])
            async for events in stream_events(request, header, stream, writer, lambda choice, event:
                                              writer.delta_choice(choice, event.text or None, event.finish_reason)):
                yield events

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

    def __init__(self, name: str, server_args: tuple, settings: ApiSettings):
        from serving.model_server import ModelServer

        self.name, self.settings = name, settings
        self.server = ModelServer(*server_args)

    def check_health(self) -> None:
        self.server.check_health()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api({self.name: LocalModelHandle(self.server)}, self.settings)
