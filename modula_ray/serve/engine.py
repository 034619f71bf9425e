"""Continuous batching in a replica: one ``Decoder`` per base model (a bank), all stepped in one loop.

``submit(loaded, requests)`` queues rows as requests arrive and returns the queue their events come
on. One asyncio task runs while any row runs or waits; each iteration, off the event loop:

- **admission**: waiting rows join their model's decoder, in arrival order, while the replica runs
  fewer than ``max_rows`` rows and the joining rows' padded prompts stay within
  ``prefill_tokens`` (at least one row joins whenever a slot is free);
- **prefill first**: the joining rows are prefilled at the start of the iteration and pick their
  first token in it, so a request's time to first token is its wait for a slot plus one iteration;
  the running rows' decode step waits for that prefill (vLLM's default order: new prompts first);
- **one forward per base**: the rows of every composition over one base model, and of that base
  served alone, advance one token per iteration in one forward (``bank.py``: the base's weights,
  each row with its own composition's adapters and routers); a model that cannot join a bank
  (``mode``, a folded W0) runs its rows in a forward of its own in the same iteration;
- rows leave the moment they finish, and their slots are taken in the next iteration.

``hook`` (tests: ``ServeArgs.decode_hook``) is called with the requests that join in an iteration,
before their prefill; if it raises, that iteration fails as a forward would.

A request keeps the ``Loaded`` it was submitted with: after a hot-plug the old model's decoder
finishes its rows and is then dropped, while new requests start on the new one. A forward that
fails fails the rows of its decoder (their requests get the exception) and sets ``broken``.
"""
from __future__ import annotations

import asyncio
import weakref
from collections import deque

from .bank import Bank, bank_key
from .generation import Decoder, GenerationRequest, GenerationResult, StepEvent


class Engine:
    def __init__(self, max_rows: int, prefill_tokens: int = 2048, hook=None):
        self.max_rows, self.prefill_tokens, self.hook = max_rows, prefill_tokens, hook
        self.waiting: deque = deque()                 # (loaded, request), in arrival order
        self.decoders: dict[int, Decoder] = {}            # per bank (base weights) or per model
        self.banks: dict[int, Bank] = {}                   # kept while the replica lives: cheap to hold
        self.keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its bank (or None)
        self.routes: dict[int, tuple[asyncio.Queue, int]] = {}
        self.task: asyncio.Future | None = None
        self.broken: str | None = None
        self.iterations = 0

    @property
    def running(self) -> int:
        return sum(decoder.running for decoder in self.decoders.values())

    def submit(self, loaded, requests: list[GenerationRequest]) -> asyncio.Queue:
        """Queue ``requests`` on ``loaded``'s model; the queue gets ``(index, StepEvent)`` per row per
        step (the last with ``result``), or ``(index, exception)`` if its forward failed."""
        queue: asyncio.Queue = asyncio.Queue()
        for index, request in enumerate(requests):
            self.routes[id(request)] = (queue, index)
            self.waiting.append((loaded, request))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())
        return queue

    async def _run(self) -> None:
        try:
            while self.waiting or self.running:
                joining = self._admit()
                for request, event in await asyncio.to_thread(self._step, joining):
                    self._deliver(request, event)
        except Exception as error:  # noqa: BLE001 - the loop itself failed: nobody is left waiting forever
            self.broken = f"{type(error).__name__}: {error}"
            for queue, index in list(self.routes.values()):
                queue.put_nowait((index, error))
            self.routes.clear()
            self.waiting.clear()
            self.decoders.clear()

    def _admit(self) -> dict[int, list[tuple[GenerationRequest, object]]]:
        """Move waiting rows into their decoders' next step (on the loop, between steps):
        ``{decoder key: [(request, its model)]}``."""
        joining: dict[int, list[tuple[GenerationRequest, object]]] = {}
        free, budget, widest, taken = self.max_rows - self.running, self.prefill_tokens, 0, 0
        while self.waiting and free > 0:
            loaded, request = self.waiting[0]
            if request.cancelled:  # its client left while it waited
                self.waiting.popleft()
                self._deliver(request, StepEvent("", GenerationResult([], "", "cancelled", len(request.prompt_ids), 0)))
                continue
            wider = max(widest, len(request.prompt_ids))
            if taken and wider * (taken + 1) > budget:
                break
            self.waiting.popleft()
            key = self._decoder_for(loaded)
            joining.setdefault(key, []).append((request, loaded.model))
            free, widest, taken = free - 1, wider, taken + 1
        return joining

    def _decoder_for(self, loaded) -> int:
        if loaded.model not in self.keys:  # bank_key walks the model's modules: once per model, not per request
            self.keys[loaded.model] = bank_key(loaded.model)
        key = self.keys[loaded.model]
        if key is None:
            key = id(loaded.model)
            if key not in self.decoders:
                self.decoders[key] = Decoder(loaded.model, loaded.tokenizer, self.max_rows)
        elif key not in self.decoders:
            if key not in self.banks:
                self.banks[key] = Bank(loaded.model)
            self.decoders[key] = Decoder(None, loaded.tokenizer, self.max_rows, bank=self.banks[key])
        return key

    def _step(self, joining: dict[int, list[tuple[GenerationRequest, object]]]) -> list[tuple[GenerationRequest, object]]:
        """One iteration of every decoder that has rows (in a worker thread)."""
        self.iterations += 1
        events: list[tuple[GenerationRequest, object]] = []
        if self.hook and joining:
            try:
                self.hook([request for rows in joining.values() for request, _ in rows])
            except Exception as error:  # noqa: BLE001 - a failed step fails the rows in it
                return self._fail(list(joining), joining, error)
        for key, decoder in list(self.decoders.items()):
            new = joining.get(key, [])
            try:
                if decoder.bank is not None:
                    for _, model in new:
                        decoder.bank.join(model)
                events += decoder.step([request for request, _ in new], [model for _, model in new])
                if decoder.bank is not None:              # a member whose last row left (a swapped-out one)
                    for model in set(decoder.bank.adapters) - {row.member for row in decoder.rows}:
                        decoder.bank.leave(model)
            except Exception as error:  # noqa: BLE001
                events += self._fail([key], joining, error)
            if key in self.decoders and not decoder.running:
                del self.decoders[key]                    # idle: its KV slots go (a bank stays in self.banks)
        return events

    def _fail(self, keys, joining, error: Exception) -> list:
        self.broken = f"{type(error).__name__}: {error}"
        failed = []
        for key in keys:
            decoder = self.decoders.pop(key, None)
            rows = [row.request for row in decoder.rows] if decoder else []
            failed += [(request, error) for request in rows + [request for request, _ in joining.get(key, [])]]
        return failed

    def _deliver(self, request: GenerationRequest, event) -> None:
        route = self.routes.get(id(request))
        if route is None:
            return
        queue, index = route
        if isinstance(event, Exception) or event.result is not None:
            del self.routes[id(request)]
        queue.put_nowait((index, event))
