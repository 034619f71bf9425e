"""The Ray Serve application: one deployment, a FastAPI ingress in OpenAI's shapes.

| endpoint | |
|---|---|
| ``POST /v1/completions`` | text or token-id prompts; ``echo``/``logprobs`` (lm-eval's loglikelihood); SSE |
| ``POST /v1/chat/completions`` | the base model's chat template; ``logprobs``; SSE with ``stream: true`` |
| ``GET /v1/models``, ``GET /healthz`` | one entry per served name; health |
| ``GET /tokenizer_info``, ``POST /tokenize``, ``/detokenize`` | lm-eval's remote tokenizer |
| ``POST /v1/admin/experts`` | hot-plug a run folder after ``modula-ray add-domain`` (bearer admin token) |

Requests from different compositions and domains meet in the replica's ``Engine`` (continuous
batching, ``engine.py``): rows join and leave the running batch at every step, and the rows of every
composition over one base (and of that base alone) run one forward per step (``bank.py``), stepped
token by token (so a row can stream), the router mixing the experts for every token of every row.
Compositions live in a ``serve.multiplexed`` LRU per replica and share their base model's weights; a
hot-plug swaps the loaded model between steps, and a request keeps the model it started with, so
nothing in flight is dropped.

Errors are OpenAI's ``{"error": {...}}``: 401 (API key or admin token), 403 (hot-plug outside the
roots), 404 (unknown model; admin without a token configured), 408 (past ``request_timeout_s``),
411/413 (body without a length, or over ``max_body_bytes``), 422 (a bad body: ``schemas`` lists
what is refused; token ids outside the vocabulary), 503 (more than a batch plus
``max_queued_requests`` in this replica). A failure inside one row of a batch is a 500 for that
request alone; the replica stays healthy. A forward pass that fails marks the replica unhealthy,
and Serve replaces it.
"""
import asyncio  # no "from __future__ import annotations": FastAPI must see the body types, not strings
import weakref
from pathlib import Path

from fastapi.responses import StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from ..errors import ModulaError
from ..hooks import hook
from .admission import Admission, in_vocabulary, row_failed
from .config import ServeArgs, deployment_options, parse_args
from .engine import Engine
from .generation import GenerationRequest
from .guards import ERROR_TYPES, make_api
from .hotplug import Composition, Loaded, OutsideRootsError, inside_roots, load, plugged_elsewhere, record_plug
from .names import REFRESH_S, plugged_names
from .responses import DONE, chat_logprobs, completion_logprobs, public_reason, sse, usage
from .schemas import (ChatChoice, ChatChoiceMessage, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                      ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionChunk, CompletionRequest,
                      CompletionResponse, DetokenizeRequest, HotPlugRequest, ModelCard, ModelList, TokenizeRequest,
                      error_body, new_id)

api = make_api()


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class CompositionServer:
    """Serves run folders (``args.runs``, named by folder) and base models alone (``args.base``)."""

    async def __init__(self, args: dict):
        self.args = ServeArgs(**args)
        self.sources = {Path(r).name: (r, True) for r in self.args.runs} | {b: (b, False) for b in self.args.base}
        self.roots = [*self.args.runs, *self.args.admin_roots]
        self.known: weakref.WeakValueDictionary[str, Composition] = weakref.WeakValueDictionary()
        self.in_flight, self.background = 0, set()
        self.engine = Engine(self.args.max_batch_size, self.args.prefill_tokens, hook(self.args.decode_hook))
        # Serve ships this class by value, with its own copy of ``api``; the guards run from the
        # imported module (guards.py), so set what they read there.
        from modula_ray.serve import guards

        guards.STATE.update(max_body_bytes=self.args.max_body_bytes, api_key=self.args.api_key,
                            admin_token=self.args.admin_token)

        async def load_by_name(name: str) -> Composition:
            source, is_run = self.sources[name]
            loaded = await asyncio.to_thread(load, source, is_run=is_run, fold=self.args.fold_universal)
            composition = Composition(name, loaded)
            self.known[name] = composition  # weakly: the multiplexed LRU decides what stays loaded
            return composition

        self._compositions = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(
            load_by_name)
        self.plugged, self.plugged_read_at = plugged_names(serve.get_replica_context().app_name), 0.0
        await self._read_plugged()  # names plugged before this replica started
        for name in list(self.sources)[:self.args.max_models_per_replica]:
            await self._compositions(name)

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising makes Serve replace the replica."""
        if self.engine.broken:
            raise RuntimeError(f"a decode failed on this replica: {self.engine.broken}")

    # -- guards (who may call: the _authorize middleware) -------------------------------------------
    async def _read_plugged(self) -> None:
        """Add the names other replicas plugged (run folders still under this server's roots)."""
        self.plugged_read_at = asyncio.get_running_loop().time()
        for name, run_dir in (await self.plugged.all.remote()).items():
            if name not in self.sources:
                try:
                    self.sources[name] = (str(inside_roots(run_dir, self.roots)), True)
                except OutsideRootsError:
                    print(f"plugged name {name!r} ignored: {run_dir} is outside this server's roots", flush=True)

    async def _loaded(self, name: str | None) -> Loaded:
        name = name or next(iter(self.sources))
        if name not in self.sources and asyncio.get_running_loop().time() - self.plugged_read_at >= REFRESH_S:
            await self._read_plugged()
        if name not in self.sources:
            raise HTTPException(404, f"unknown model {name!r}; served: {sorted(self.sources)}")
        composition = await self._compositions(name)
        if composition.due() and await asyncio.to_thread(plugged_elsewhere, composition, self.args.admin_token):
            # this request runs on what is loaded; the next ones on the new
            composition.reloading = True
            task = asyncio.ensure_future(self._follow(composition))
            self.background.add(task)  # asyncio keeps only a weak reference to a running task
            task.add_done_callback(self.background.discard)
        return composition.current

    async def _follow(self, composition: Composition) -> None:
        """Load what another replica hot-plugged, and swap it in; on failure keep serving the old."""
        try:
            composition.swap(await asyncio.to_thread(load, composition.current.source, is_run=True,
                                                    fold=self.args.fold_universal))
        except Exception as error:  # noqa: BLE001 - a bad folder must not take the replica down
            print(f"could not follow the hot-plug of {composition.name}: {error}", flush=True)
        finally:
            composition.reloading = False

    def _admit(self, requests: list[GenerationRequest]) -> Admission:
        """Take the rows' slots now, checked and counted in one step (no await between), or 503. One
        request may hold at most ``max_batch_size`` rows, so that no client takes the queue alone."""
        share = self.args.max_batch_size
        if len(requests) > share:
            raise HTTPException(422, f"prompt: {len(requests)} prompts in one request; this server takes at most "
                                     f"{share} (max_batch_size) per request")
        if self.in_flight + len(requests) > self.args.capacity():
            raise HTTPException(503, f"overloaded: {self.in_flight} requests in this replica, room for "
                                     f"{self.args.capacity()}; retry later", headers={"Retry-After": "1"})
        return Admission(self, requests)

    def _generation(self, loaded: Loaded, ids: list[int], body, logprobs: int | None = None,
                    echo: bool = False) -> GenerationRequest:
        window = getattr(loaded.model.config, "max_position_embeddings", None)
        in_vocabulary(ids, len(loaded.tokenizer), "prompt")
        if window and len(ids) + body.max_tokens > window:
            raise HTTPException(422, f"prompt ({len(ids)} tokens) + max_tokens ({body.max_tokens}) is over the "
                                     f"model's context of {window} tokens")
        return GenerationRequest(ids, max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                 seed=body.seed, stop=body.stops(), routing=body.routing, logprobs=logprobs, echo=echo,
                                 ignore_eos=body.ignore_eos)

    # -- generation ------------------------------------------------------------------------------
    async def _events(self, loaded: Loaded, requests: list[GenerationRequest]):
        """``(index, StepEvent)`` of every request as they come, from the replica's engine (continuous
        batching); past ``request_timeout_s`` a 408, raised here, between events (never inside a
        caller's await). A forward that failed raises its error."""
        deadline = asyncio.get_running_loop().time() + self.args.request_timeout_s
        queue, left = self.engine.submit(loaded, requests), len(requests)
        while left:
            index, event = await self._next(queue, deadline)
            if isinstance(event, Exception):
                raise event
            left -= event.result is not None
            yield index, event

    async def _next(self, queue: asyncio.Queue, deadline: float):
        try:
            return await asyncio.wait_for(queue.get(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except TimeoutError:
            raise HTTPException(408, f"generation took longer than request_timeout_s="
                                     f"{self.args.request_timeout_s}") from None

    async def _results(self, loaded: Loaded, requests: list[GenerationRequest]):
        results = [None] * len(requests)
        admission = self._admit(requests)
        try:
            async for index, event in self._events(loaded, requests):
                results[index] = event.result or results[index]
        finally:
            admission.release()
        for result in results:
            if failed := row_failed(result):
                raise failed
        return results

    def _stream(self, loaded: Loaded, requests: list[GenerationRequest], chunks, include_usage: bool):
        """SSE of ``chunks(index, event)``; overload is a status (the slots are taken before the
        response starts), a timeout an event, and every stream ends with ``[DONE]``."""
        admission = self._admit(requests)

        async def body():
            results = [None] * len(requests)
            try:
                try:
                    async for index, event in self._events(loaded, requests):
                        results[index] = event.result or results[index]
                        if failed := row_failed(event.result):
                            yield sse(error_body(str(failed.detail), type_=ERROR_TYPES[500]))
                            continue
                        for chunk in chunks(index, event):
                            yield sse(chunk)
                    if include_usage:
                        yield sse({"choices": [], "usage": usage(results).model_dump()})
                except HTTPException as error:
                    yield sse(error_body(str(error.detail), type_=ERROR_TYPES.get(error.status_code), code="timeout"))
                yield DONE
            finally:
                admission.release()

        stream = body()
        weakref.finalize(stream, admission.release)  # a response that never started still gives its slots back
        return StreamingResponse(stream, media_type="text/event-stream")

    # -- endpoints -------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "models": sorted(self.sources),
                "replica": serve.get_replica_context().replica_id.unique_id}

    @api.get("/v1/models")
    def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in sorted(self.sources)])

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        loaded = await self._loaded(body.model)
        prompts = [p if isinstance(p, list) else loaded.tokenizer(p).input_ids for p in body.prompts()]
        requests = [self._generation(loaded, ids, body, body.logprobs, body.echo) for ids in prompts]
        cid = new_id("cmpl")

        if body.stream:
            def chunks(index, event):
                if event.delta or event.result:
                    yield CompletionChunk(id=cid, model=body.model, choices=[CompletionChoice(
                        index=index, text=event.delta, finish_reason=public_reason(event.result) if event.result else None)])
            return self._stream(loaded, requests, chunks, bool(body.stream_options and body.stream_options.include_usage))
        results = await self._results(loaded, requests)
        choices = []
        for index, (request, result) in enumerate(zip(requests, results)):
            prompt_text = loaded.tokenizer.decode(request.prompt_ids)
            logprobs = None
            if result.logprobs is not None:  # with echo: the prompt's tokens too, offsets from its start
                entries = result.logprobs if body.echo else result.logprobs[len(result.logprobs) - result.completion_tokens:]
                logprobs = completion_logprobs(loaded.tokenizer, entries, 0 if body.echo else len(prompt_text))
            choices.append(CompletionChoice(index=index, text=(prompt_text if body.echo else "") + result.text,
                                            finish_reason=public_reason(result), logprobs=logprobs))
        return CompletionResponse(id=cid, model=body.model, usage=usage(results), choices=choices,
                                  routing=[r.routing for r in results] if body.routing else None)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        from ..data.formatting import chat_ids

        loaded = await self._loaded(body.model)
        ids = chat_ids(loaded.tokenizer, [{"role": m.role, "content": m.content} for m in body.messages])
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = [self._generation(loaded, ids, body, logprobs)]
        cid = new_id("chatcmpl")
        if body.stream:
            first = [True]

            def chunks(index, event):
                if event.delta or event.result or first[0]:
                    role, first[0] = ("assistant" if first[0] else None), False
                    yield ChatCompletionChunk(id=cid, model=body.model, choices=[ChatChunkChoice(
                        index=0, delta=ChatDelta(role=role, content=event.delta),
                        finish_reason=public_reason(event.result) if event.result else None)])
            return self._stream(loaded, requests, chunks, bool(body.stream_options and body.stream_options.include_usage))
        [result] = await self._results(loaded, requests)
        scored = None if result.logprobs is None else chat_logprobs(loaded.tokenizer, result.logprobs)
        choice = ChatChoice(index=0, message=ChatChoiceMessage(content=result.text),
                            finish_reason=public_reason(result), logprobs=scored)
        return ChatCompletionResponse(id=cid, model=body.model, choices=[choice], usage=usage([result]),
                                      routing=result.routing)

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, model: str | None = None) -> dict:
        tokenizer = (await self._loaded(model)).tokenizer
        return {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": tokenizer.chat_template, "model_max_length": tokenizer.model_max_length}

    @api.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> dict:
        tokens = (await self._loaded(body.model)).tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens.input_ids, "count": len(tokens.input_ids)}

    @api.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> dict:
        tokenizer = (await self._loaded(body.model)).tokenizer
        in_vocabulary(body.tokens, len(tokenizer), "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @api.post("/v1/admin/experts")
    async def hot_plug(self, body: HotPlugRequest) -> dict:
        """Load ``run_dir`` again (its new expert and retrained router) and swap it in."""
        try:
            run_dir = inside_roots(body.run_dir, self.roots)
        except OutsideRootsError as error:
            raise HTTPException(403, str(error)) from None
        name = body.model or run_dir.name
        if name in self.sources and not self.sources[name][1]:
            raise HTTPException(409, f"{name!r} is a base model served alone; name another model")
        held, before = self.known.get(name), self.sources.get(name)
        try:
            if held is not None:  # loaded on this replica: load the new one beside it, then swap
                previous = held.swap(await asyncio.to_thread(load, str(run_dir), is_run=True,
                                                                    fold=self.args.fold_universal))
            else:                 # not loaded here (new, or evicted): the multiplexed cache loads it
                self.sources[name], previous = (str(run_dir), True), None
                held = await self._compositions(name)
        except (ModulaError, OSError) as error:
            if before is None:
                self.sources.pop(name, None)
            raise HTTPException(422, f"run_dir: {error}") from None
        self.sources[name] = (str(run_dir), True)
        held.followed = await asyncio.to_thread(record_plug, held.current, self.args.admin_token)
        await self.plugged.put.remote(name, str(run_dir))  # every replica of this application, now and after restarts
        return {"model": name, "run_dir": str(run_dir), "experts": held.current.experts,
                "previous_experts": previous.experts if previous else [],
                "replica": serve.get_replica_context().replica_id.unique_id}


def app_builder(args: dict):
    """Serve's application builder (``import_path: modula_ray.serve.app:app_builder``): ``args``
    are ``ServeArgs``; ``deployment`` (optional) the Serve options of ``CompositionServer``."""
    args = dict(args)
    options = args.pop("deployment", None)
    served = parse_args(args).resolved()
    names = [Path(r).name for r in served.runs]
    if len(set(names)) != len(names):
        raise ModulaError(f"two run folders share a name; each is served under its folder name: {served.runs}")
    return CompositionServer.options(**deployment_options(served, options)).bind(served.model_dump())


def build_app(run_dirs: list[str], *, base_models: list[str] = (), **args):
    """The bound application for ``run_dirs`` (and base models alone); ``args``: more ``ServeArgs``."""
    return app_builder({"runs": [str(r) for r in run_dirs], "base": list(base_models), **args})
