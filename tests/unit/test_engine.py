"""The replica's engine (``serve/engine.py``) without Ray: continuous batching across compositions,
held to each request decoded alone."""
import asyncio
from types import SimpleNamespace

import pytest

from modula_ray.serve.engine import Engine
from modula_ray.serve.generation import GenerationRequest, generate_batch
from tests.helpers import compositions_over_one_base

PROMPTS = ["What is 3 + 4?", "the patient takes a dose", "def add(a, b): return", "organic apples aisle",
           "the market price of the product is", "x", "answer the question", "1 2 3"]


@pytest.fixture(scope="module")
def served():
    return compositions_over_one_base()


async def collect(engine: Engine, loaded, requests):
    queue, results = engine.submit(loaded, requests), [None] * len(requests)
    while any(r is None for r in results):
        index, event = await asyncio.wait_for(queue.get(), 60)
        if isinstance(event, Exception):
            raise event
        results[index] = event.result or results[index]
    return results


def test_requests_arriving_at_different_times_share_steps_within_max_rows_and_decode_as_alone(served):
    base, tokenizer, models = served
    owners = [models[i % 3] if i % 4 else base for i in range(len(PROMPTS))]
    requests = [GenerationRequest(tokenizer(p).input_ids, max_tokens=3 + 2 * i, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
    alone = [generate_batch(owner, tokenizer, [r])[0].token_ids for owner, r in zip(owners, requests)]
    engine, most = Engine(max_rows=3, prefill_tokens=12), []
    step = engine._step

    def watched(joining):
        out = step(joining)
        most.append(engine.running)
        return out

    engine._step = watched

    async def scenario():
        loaded = [SimpleNamespace(model=m, tokenizer=tokenizer) for m in owners]
        first = [asyncio.ensure_future(collect(engine, loaded[i], [requests[i]])) for i in range(4)]
        await asyncio.sleep(0.05)  # the rest arrive while the first decode
        rest = [asyncio.ensure_future(collect(engine, loaded[i], [requests[i]])) for i in range(4, len(requests))]
        return [r for task in first + rest for r in await task]

    results = asyncio.run(scenario())
    assert [r.token_ids for r in results] == alone
    assert max(most) <= 3 and engine.iterations < sum(r.completion_tokens for r in results)
    assert len(engine.banks) == 1 and not engine.decoders  # one forward per step for all of them; idle now


def test_a_failing_forward_fails_its_rows_and_marks_the_engine_broken(served):
    base, tokenizer, models = served
    engine = Engine(max_rows=4, hook=lambda requests: (_ for _ in ()).throw(RuntimeError("injected")))
    request = GenerationRequest(tokenizer("x").input_ids, max_tokens=3)
    with pytest.raises(RuntimeError, match="injected"):
        asyncio.run(collect(engine, SimpleNamespace(model=models[0], tokenizer=tokenizer), [request]))
    assert engine.broken == "RuntimeError: injected"
