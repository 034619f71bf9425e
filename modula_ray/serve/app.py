"""The Ray Serve application: one deployment, a FastAPI ingress in OpenAI's shapes.

``POST /v1/completions``, ``POST /v1/chat/completions`` (the base model's chat template),
``GET /v1/models`` (one entry per composition: the run folder's name), ``GET /healthz``.
Requests from different compositions and domains meet in ``@serve.batch``: one
``generate_batch`` call per composition over the whole batch, the router mixing the experts
for every token of every request. Every error body is OpenAI's ``{"error": {...}}``: 422 for a
bad body (malformed JSON included), 404 for an unknown model, 413 for a body over the limit,
400 for what is not built yet (streaming, echo, logprobs).
"""
import asyncio  # no "from __future__ import annotations": FastAPI must see the body types, not strings
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from .generation import GenerationRequest, generate_batch
from .schemas import (ChatChoice, ChatChoiceMessage, ChatCompletionRequest, ChatCompletionResponse,
                      CompletionChoice, CompletionRequest, CompletionResponse, ModelCard, ModelList, Usage,
                      error_body, validation_error_body)

MAX_BODY_BYTES = 1 << 20
api = FastAPI(title="modula-ray", description="OpenAI-compatible endpoint for mixtures of LoRA experts")


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error_body(exc.errors()), status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kinds = {404: "not_found_error", 413: "invalid_request_error", 503: "server_overloaded"}
    return JSONResponse(error_body(str(exc.detail), type_=kinds.get(exc.status_code, "invalid_request_error")),
                        status_code=exc.status_code)


@api.middleware("http")
async def _body_limit(request: Request, call_next):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return JSONResponse(error_body(f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}",
                                       code="request_too_large"), status_code=413)
    return await call_next(request)


def _usage(results) -> Usage:
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@serve.deployment(max_ongoing_requests=32, health_check_period_s=10)
@serve.ingress(api)
class CompositionServer:
    """Serves finished run folders (``compositions``: ``{name: run dir}``) and, optionally, a base
    model alone (``base_models``: ``{name: registered name or folder}``)."""

    def __init__(self, compositions: dict[str, str], base_models: dict | None = None):
        from ..compose import load_composition
        from ..models import load_base

        self.models = {name: load_composition(run_dir) for name, run_dir in compositions.items()}
        self.models.update({name: load_base(base) for name, base in (base_models or {}).items()})

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising marks the replica unhealthy."""
        if not self.models:
            raise RuntimeError("no model loaded")

    def _model(self, name: str):
        if name not in self.models:
            raise HTTPException(404, f"unknown model {name!r}; served: {sorted(self.models)}")
        return self.models[name]

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "models": sorted(self.models)}

    @api.get("/v1/models")
    def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in sorted(self.models)])

    def _request(self, ids: list[int], body) -> GenerationRequest:
        return GenerationRequest(ids, max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                 seed=body.seed, stop=body.stops(), routing=body.routing)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> CompletionResponse:
        if body.stream or body.echo or body.logprobs is not None:
            raise HTTPException(400, "stream, echo and logprobs are not supported by this server yet")
        _, tokenizer = self._model(body.model)
        requests = [self._request(tokenizer(p).input_ids, body) for p in body.prompts()]
        results = await asyncio.gather(*[self._generate((body.model, r)) for r in requests])
        choices = [CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)]
        return CompletionResponse(model=body.model, choices=choices, usage=_usage(results),
                                  routing=[r.routing for r in results] if body.routing else None)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> ChatCompletionResponse:
        from ..data.formatting import chat_ids

        if body.stream:
            raise HTTPException(400, "stream: true is not supported by this server yet")
        _, tokenizer = self._model(body.model)
        ids = chat_ids(tokenizer, [{"role": m.role, "content": m.content} for m in body.messages])
        result = await self._generate((body.model, self._request(ids, body)))
        choice = ChatChoice(index=0, message=ChatChoiceMessage(content=result.text), finish_reason=result.finish_reason)
        return ChatCompletionResponse(model=body.model, choices=[choice], usage=_usage([result]),
                                      routing=result.routing)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate(self, items: list[tuple[str, GenerationRequest]]):
        """One ``generate_batch`` per composition over every request of the batch, off the event loop."""
        results = [None] * len(items)
        for name in dict.fromkeys(name for name, _ in items):
            rows = [i for i, (n, _) in enumerate(items) if n == name]
            model, tokenizer = self.models[name]
            done = await asyncio.to_thread(generate_batch, model, tokenizer, [items[i][1] for i in rows])
            for i, result in zip(rows, done):
                results[i] = result
        return results


def build_app(run_dirs: list[str], *, base_models: list[str] = ()):
    """The bound application: compositions are named after their run folders (must be distinct)."""
    compositions = {}
    for run_dir in run_dirs:
        name = Path(run_dir).resolve().name
        if name in compositions:
            raise ValueError(f"two run folders are both named {name!r}: {compositions[name]} and {run_dir}")
        compositions[name] = str(Path(run_dir).resolve())
    return CompositionServer.bind(compositions, {name: name for name in base_models})
