"""A small async client for an OpenAI-compatible API: the UI's only way to reach models.

It speaks plain HTTP (httpx) exactly as any other client would, so the UI works against
``groundup serve`` and against any remote OpenAI-compatible endpoint alike.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # a long answer from a busy CPU replica can take minutes


class ApiError(RuntimeError):
    """The endpoint refused or failed a request. The message is one line; ``status`` is the HTTP status
    (None when the server could not be reached) and ``code`` the error's code, if it sent one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class ModelInfo:
    id: str
    version: str  # what the endpoint says identifies the weights ("" when it says nothing)
    max_context: int | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # an extension of the OpenAI API; 0 (no cut) is left out of requests
    max_tokens: int = 0  # 0: left out, so the server picks a length that fits the model's context

    def request_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"temperature": float(self.temperature), "top_p": float(self.top_p)}
        if self.max_tokens:
            fields["max_tokens"] = int(self.max_tokens)
        if self.top_k:
            fields["top_k"] = int(self.top_k)
        return fields

    def record(self) -> dict[str, Any]:
        """The settings as stored with a vote (every field, None where the server chose)."""
        return {"temperature": float(self.temperature), "top_p": float(self.top_p), "top_k": int(self.top_k),
                "max_tokens": int(self.max_tokens) or None}


@dataclass
class Completion:
    """An answer as it streams in; ``finish_reason`` is set once it is complete."""

    model: str
    text: str = ""
    finish_reason: str | None = None
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _version_of(card: dict[str, Any]) -> str:
    # No standard field names the weights; use what common servers send, most specific first.
    for key in ("version", "checkpoint", "root"):
        value = card.get(key)
        if value:
            return str(value)
    return ""


def _api_error(response: httpx.Response) -> ApiError:
    message = code = None
    try:
        body = response.json()
        error = body.get("error") or {}
        message, code = error.get("message") or body.get("detail"), error.get("code")
    except (ValueError, AttributeError):
        pass
    return ApiError(f"HTTP {response.status_code}: {message or response.text[:200] or response.reason_phrase}",
                    response.status_code, code)


class OpenAIClient:
    def __init__(self, api_url: str, api_key: str | None = None):
        self.api_url = api_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _client(self) -> httpx.AsyncClient:
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        return httpx.AsyncClient(base_url=self.api_url, headers=self.headers, timeout=timeout)

    def list_models_sync(self) -> list[ModelInfo]:
        try:
            response = httpx.get(f"{self.api_url}/models", headers=self.headers, timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as err:
            raise ApiError(f"cannot reach {self.api_url}: {type(err).__name__}") from None
        return self._models_from(response)

    async def list_models(self) -> list[ModelInfo]:
        try:
            async with self._client() as client:
                response = await client.get("/models")
        except httpx.HTTPError as err:
            raise ApiError(f"cannot reach {self.api_url}: {type(err).__name__}") from None
        return self._models_from(response)

    @staticmethod
    def _models_from(response: httpx.Response) -> list[ModelInfo]:
        if response.status_code != 200:
            raise _api_error(response)
        cards = response.json().get("data", [])
        return [ModelInfo(id=c["id"], version=_version_of(c), max_context=c.get("max_model_len"))
                for c in cards]

    async def stream_chat(self, model: str, messages: list[dict[str, str]], sampling: Sampling,
                          version: str = "") -> AsyncIterator[Completion]:
        """POST /chat/completions with ``stream: true``; yields the growing answer after every chunk."""
        body = {"model": model, "messages": messages, "stream": True, **sampling.request_fields()}
        answer = Completion(model=model, version=version)
        try:
            async with self._client() as client:
                async with client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise _api_error(response)
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[len("data:"):].strip()
                        if payload == "[DONE]":
                            break
                        chunk = json.loads(payload)
                        if "error" in chunk:  # a failure after the stream started is reported in-band
                            error = chunk["error"] or {}
                            raise ApiError(error.get("message", "generation failed"), 500, error.get("code"))
                        if chunk.get("system_fingerprint") and not answer.version:
                            answer.version = str(chunk["system_fingerprint"])
                        for choice in chunk.get("choices", []):
                            answer.text += (choice.get("delta") or {}).get("content") or ""
                            answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                        yield answer
        except httpx.HTTPError as err:
            raise ApiError(f"request to {self.api_url} failed: {type(err).__name__}") from None
        if answer.finish_reason is None:
            answer.finish_reason = "unknown"  # the stream ended without saying why
        yield answer
