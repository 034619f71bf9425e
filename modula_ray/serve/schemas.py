"""Request and response bodies in OpenAI's shapes (pydantic), plus our one extension, ``routing``.

Requests reject unknown fields (OpenAI answers "Unrecognized request argument"), empty prompts
and messages, and out-of-range numbers; the ingress turns a ``ValidationError`` into 422 with
OpenAI's ``{"error": {...}}`` body (``error_body``). ``MAX_TOKENS_LIMIT`` is the default cap on
``max_tokens``; the Serve config can lower it.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

MAX_TOKENS_LIMIT = 2048
MAX_STOP = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: StrictInt = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # 2.5, "8" and true are refused
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None
    routing: bool = False           # modula-ray: also return the mean gate per expert

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _has_content(cls, value):
        if all(not m.content for m in value):
            raise ValueError("messages must not all be empty")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: dict | None = None


class _Response(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage


def _new_id(prefix: str):
    return Field(default_factory=lambda: f"{prefix}-{uuid.uuid4().hex[:24]}")


class CompletionResponse(_Response):
    id: str = _new_id("cmpl")
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    routing: list[dict[str, float] | None] | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(_Response):
    id: str = _new_id("chatcmpl")
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    routing: dict[str, float] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "modula-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error_body(errors: list[dict]) -> dict:
    """A pydantic error list as one OpenAI error naming the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
                        for e in errors) or "invalid request"
    return error_body(message, param=param, code="invalid_value")
