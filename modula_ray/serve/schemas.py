"""Request and response bodies in OpenAI's shapes (pydantic), plus our one extension, ``routing``.

Requests reject unknown fields (OpenAI answers "Unrecognized request argument"), empty prompts
and messages, and out-of-range numbers; the ingress turns a ``ValidationError`` into 422 with
OpenAI's ``{"error": {...}}`` body (``error_body``). A completion prompt is text or token ids
(one or a list of either), as in OpenAI's API. ``MAX_TOKENS_LIMIT`` is the cap on ``max_tokens``.

What the decoder cannot take is refused here, not found out mid-batch: a ``seed`` outside
``[0, MAX_SEED]`` (``torch.Generator.manual_seed``'s range), a ``temperature`` between 0 (greedy)
and ``MIN_TEMPERATURE`` (below it, ``logits / temperature`` overflows to inf and the softmax to
NaN), text that is not valid Unicode (a lone surrogate such as ``"\ud800"``, which JSON allows
and the tokenizer cannot encode), more than ``MAX_STOP`` stop strings or one longer than
``MAX_STOP_CHARS``. Token ids are checked against the model's vocabulary by the ingress.
Also here: streaming chunks, the tokenizer endpoints lm-eval's remote tokenizer calls
(``/tokenizer_info``, ``/tokenize``, ``/detokenize``) and the admin hot-plug body.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator,
                      model_validator)

MAX_TOKENS_LIMIT = 2048
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_PROMPTS = 32
MAX_SEED = 2 ** 63 - 1
MIN_TEMPERATURE = 0.01
MAX_TOKEN_ID = 2 ** 31 - 1


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode: {error.reason} at character {error.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenIds = list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: StrictInt = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # 2.5, "8" and true are refused
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    routing: bool = False           # modula-ray: also return the mean gate per expert
    ignore_eos: bool = False        # vLLM's extension: decode past EOS to max_tokens or a stop string

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, value):
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if not value or any(p in ("", []) for p in cls._split(value)):
            raise ValueError("prompt must not be empty")
        if len(cls._split(value)) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    @staticmethod
    def _split(prompt) -> list:
        return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)

    @model_validator(mode="after")
    def _not_streamed_with_logprobs(self):
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError("echo and logprobs are answered without streaming: set stream to false")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        return self._split(self.prompt)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text
    name: Text | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)

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


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape lm-eval reads: one entry per token (prompt first with echo)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class _Response(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _new_id(prefix: str):
    return Field(default_factory=lambda: new_id(prefix))


class CompletionResponse(_Response):
    id: str = _new_id("cmpl")
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    routing: list[dict[str, float] | None] | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    id: str = _new_id("chatcmpl")
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    routing: dict[str, float] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None


class _Chunk(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None


class ChatCompletionChunk(_Chunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Chunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TokenizeRequest(_Strict):
    prompt: Text
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(_Strict):
    tokens: TokenIds
    model: str | None = None


class HotPlugRequest(_Strict):
    """``POST /v1/admin/experts``: reload a run folder (after ``modula-ray add-domain``)."""
    run_dir: str = Field(min_length=1)
    model: str | None = None        # default: the folder's name


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
    param = _field(first.get("loc", ())) or None
    message = "; ".join(f"{_field(e.get('loc', ()))}: {e.get('msg')}" for e in errors) or "invalid request"
    return error_body(message, param=param, code="invalid_value")


def _field(loc) -> str:
    """``prompt.0`` from pydantic's ``("body", "prompt", "function-after[...]", 0)``: the request's own
    field names and list indices, without the union member pydantic tried."""
    return ".".join(str(part) for part in loc if part != "body" and (isinstance(part, int) or str(part).isidentifier()))
