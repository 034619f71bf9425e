"""Generation results in OpenAI's shapes: usage, logprobs, and server-sent events.

Logprobs name tokens by their own decoded text (``tokenizer.decode([id])``), as OpenAI's
legacy completions do; ``text_offset`` counts characters from the start of the returned text
(the prompt's start with ``echo``). lm-eval's ``local-completions`` reads
``token_logprobs[ctxlen:-1]`` of an echoed prompt, so the last (generated) token is always there,
even when it is EOS.
"""
from __future__ import annotations

import json

from pydantic import BaseModel

from .generation import GenerationResult, TokenLogprob
from .schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob, Usage

DONE = "data: [DONE]\n\n"


def usage(results: list[GenerationResult]) -> Usage:
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def public_reason(result: GenerationResult) -> str:
    """``cancelled`` only happens when nobody is left to read it; report it as ``length``."""
    return "length" if result.finish_reason == "cancelled" else result.finish_reason


def completion_logprobs(tokenizer, entries: list[TokenLogprob], start: int = 0) -> CompletionLogprobs:
    pieces = [tokenizer.decode([e.token_id]) for e in entries]
    offsets, at = [], start
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    top = [None if e.top is None else {tokenizer.decode([t]): v for t, v in e.top.items()} for e in entries]
    return CompletionLogprobs(tokens=pieces, token_logprobs=[e.logprob for e in entries], top_logprobs=top,
                              text_offset=offsets)


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return ChatLogprobs(content=[ChatTokenLogprob(**item(e.token_id, e.logprob),
                                                  top_logprobs=[TopLogprob(**item(t, v)) for t, v in (e.top or {}).items()])
                                 for e in entries])


def sse(chunk: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON object."""
    body = chunk.model_dump_json(exclude_none=True) if isinstance(chunk, BaseModel) else json.dumps(chunk)
    return f"data: {body}\n\n"
