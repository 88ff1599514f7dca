"""OpenAI request bodies (pydantic, strict types) and response builders.

Only what lorakit honours is accepted with a non-default value: ``max_tokens``, ``temperature``,
``top_p``, ``n``, ``stop``, ``seed``, ``stream`` (+ ``stream_options.include_usage``). Options
that would change the result but are not implemented (``logprobs``, penalties, ``logit_bias``,
``echo``, tools) are refused with a 400 instead of being silently ignored; unknown fields are
ignored, as OpenAI-compatible servers do.

What one request may ask for is bounded (see the constants below): numbers must be finite and in
the range the sampler can use, a seed must fit in 64 bits, and text must be valid Unicode (a lone
surrogate such as ``"\\ud83d"`` is refused with 400: it cannot be tokenized or encoded as UTF-8).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "AdapterLoadRequest", "LoraLoadRequest",
           "Unsupported",
           "error_body", "completion_body", "chat_body", "completion_chunk", "chat_chunk",
           "model_card", "new_id", "MAX_STOP", "MAX_STOP_CHARS", "MAX_CHOICES", "SEED_MIN", "SEED_MAX"]

MAX_STOP = 16           # stop strings per request
MAX_STOP_CHARS = 256    # characters per stop string
MAX_CHOICES = 64        # prompts x n per request (each is one row of the decode batch)
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch's generator accepts (negative seeds wrap modulo 2**64)


class Unsupported(Exception):
    """A request option lorakit does not implement (answered with 400)."""

    def __init__(self, param: str) -> None:
        super().__init__(f"'{param}' is not supported by this server")
        self.param = param


def _surrogate(value, where: str = "") -> str | None:
    """Where (``messages.0.content``) the first string holding a lone surrogate is, or None."""
    if isinstance(value, str):
        return None if value.isascii() or _encodable(value) else where or "body"
    pairs = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in pairs:
        path = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and not _encodable(key):
            return path
        if hit := _surrogate(item, path):
            return hit
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = _surrogate(data)
        if where:
            raise PydanticCustomError("unicode_surrogate", "{where}: the text contains a lone UTF-16 surrogate "
                                      "(not valid Unicode); send UTF-8 text", {"where": where})
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings (got {len(stop)})")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ValueError(f"each stop string may have at most {MAX_STOP_CHARS} characters "
                             f"(got {max(len(s) for s in stop)})")
        return tuple(s for s in stop if s)

    def check_unsupported(self) -> None:
        for param in ("presence_penalty", "frequency_penalty"):
            if getattr(self, param):
                raise Unsupported(param)
        if self.logit_bias:
            raise Unsupported("logit_bias")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        for param in ("echo", "logprobs", "suffix"):
            if getattr(self, param):
                raise Unsupported(param)
        if self.best_of not in (None, 1, self.n or 1):
            raise Unsupported("best_of")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    tools: list | None = None
    response_format: dict | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs:
            raise Unsupported("logprobs")
        if self.tools:
            raise Unsupported("tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise Unsupported("response_format")


class AdapterLoadRequest(_Strict):
    """``POST /v1/adapters``: ``path`` relative to the adapter root; ``name`` defaults to its last part."""

    path: str = Field(min_length=1)
    name: str | None = None


class LoraLoadRequest(_Strict):
    """vLLM's ``POST /v1/load_lora_adapter`` / ``unload_lora_adapter`` body. The fields are checked by
    the endpoint, not here: like vLLM, a missing, empty or mistyped field is a 400, not a 422."""

    lora_name: object = None
    lora_path: object = None
    load_inplace: object = None   # load: replace the adapter loaded under lora_name
    lora_int_id: object = None    # unload: the adapter's id (the load answer's X-Lora-Int-Id, /v1/models)


# -- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(rid: str, model: str, choices: list[tuple[str, str]], prompt: int, completion: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": _usage(prompt, completion)}


def chat_body(rid: str, model: str, choices: list[tuple[str, str]], prompt: int, completion: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
            "usage": _usage(prompt, completion)}


def completion_chunk(rid: str, model: str, index: int, text: str, reason: str | None,
                     usage: tuple[int, int] | None = None) -> dict:
    choices = [] if usage else [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    return {**body, "usage": _usage(*usage)} if usage else body


def chat_chunk(rid: str, model: str, index: int, delta: dict, reason: str | None,
               usage: tuple[int, int] | None = None) -> dict:
    choices = [] if usage else [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    return {**body, "usage": _usage(*usage)} if usage else body


def model_card(name: str, parent: str | None = None, **extra) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lorakit", "root": name,
            "parent": parent, **extra}
