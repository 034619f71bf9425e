"""Batched generation over a composed model, held to Hugging Face ``generate`` as the reference."""
import pytest
import torch

from modula_ray.experts import inject, set_stage
from modula_ray.models import tiny_model
from modula_ray.serve.generation import Decoder, GenerationRequest, _cut_at_stop, _held_back, generate_batch
from tests.helpers import randomise_experts

PROMPTS = ["What is 3 + 4?", "the patient takes a dose", "def add(a, b): return", "organic apples aisle",
           "1 2 3", "the market price of the product is", "answer the question", "x"]


@pytest.fixture(scope="module")
def composed():
    """A tiny Llama with 3 randomised modula_res experts and a random router: the full mixture."""
    model, tokenizer = tiny_model()
    inject(model, "modula_res", ["math", "code", "medicine"], universal_rank=4, domain_rank=2)
    randomise_experts(model, seed=1, scale=0.3)
    set_stage(model, "router")
    return model.eval(), tokenizer


def encode(tokenizer, prompt):
    return tokenizer(prompt).input_ids


def hf_greedy(model, tokenizer, prompt, n):
    """Hugging Face greedy ``generate``: at most ``n`` new tokens, ending with the first EOS of the
    model's generation config (kept), as ours ends."""
    ids = torch.tensor([encode(tokenizer, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture
def stops_early(composed, monkeypatch):
    """The third greedy token of ``PROMPTS[2]`` made an extra EOS, so that row ends on EOS after 3
    tokens (the random model never picks the real one); ``PROMPTS[6]`` picks it after 10."""
    model, tokenizer = composed
    stopper = hf_greedy(model, tokenizer, PROMPTS[2], 3)[-1]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, stopper])
    return stopper


def test_greedy_matches_hf_generate_for_each_prompt(composed, stops_early):
    model, tokenizer = composed
    for prompt, reason in zip(PROMPTS[:3], ["length", "length", "stop"]):
        ours = generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, prompt), max_tokens=12)])[0]
        reference = hf_greedy(model, tokenizer, prompt, 12)  # the whole of it: both stop at EOS or at 12
        assert ours.token_ids == reference, prompt
        assert ours.finish_reason == reason and len(reference) == (3 if reason == "stop" else 12), prompt
        assert ours.prompt_tokens == len(encode(tokenizer, prompt)) and ours.completion_tokens == len(reference)
    assert reference[-1] == stops_early and ours.text == tokenizer.decode(reference[:-1])  # EOS is not text


def test_ignore_eos_decodes_past_eos_to_max_tokens(composed, stops_early):
    model, tokenizer = composed
    ours = generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, PROMPTS[2]), max_tokens=12,
                                                                ignore_eos=True)])[0]
    reference = hf_greedy(model, tokenizer, PROMPTS[2], 3)
    assert ours.finish_reason == "length" and ours.completion_tokens == 12 and ours.token_ids[:3] == reference
    assert stops_early in ours.token_ids and ours.text == tokenizer.decode(
        [t for t in ours.token_ids if t != stops_early], skip_special_tokens=True)


def test_greedy_alone_equals_greedy_in_a_batch_of_8(composed, stops_early):
    model, tokenizer = composed
    requests = [GenerationRequest(encode(tokenizer, p), max_tokens=10 + i) for i, p in enumerate(PROMPTS)]
    batched = generate_batch(model, tokenizer, requests)
    for request, result in zip(requests, batched):
        alone = generate_batch(model, tokenizer, [request])[0]
        assert alone.token_ids == result.token_ids and alone.finish_reason == result.finish_reason
        if result.finish_reason == "length":
            assert result.completion_tokens == request.max_tokens and stops_early not in result.token_ids
        else:
            assert result.token_ids.index(stops_early) == result.completion_tokens - 1 < request.max_tokens
    reasons = [result.finish_reason for result in batched]
    assert reasons == ["length", "length", "stop", "length", "length", "length", "stop", "length"]  # both kinds
    assert [result.completion_tokens for result in batched] == [10, 11, 3, 13, 14, 15, 10, 17]


def test_sampling_is_reproducible_per_request_seed_whatever_the_batch(composed):
    model, tokenizer = composed
    seeded = GenerationRequest(encode(tokenizer, PROMPTS[0]), max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    others = [GenerationRequest(encode(tokenizer, p), max_tokens=8, temperature=1.0, seed=i)
              for i, p in enumerate(PROMPTS[1:4])]
    alone = generate_batch(model, tokenizer, [seeded])[0]
    in_batch = generate_batch(model, tokenizer, others + [seeded])[-1]
    assert alone.token_ids == in_batch.token_ids
    different = generate_batch(model, tokenizer, [GenerationRequest(seeded.prompt_ids, max_tokens=8,
                                                                    temperature=1.0, top_p=0.9, seed=8)])[0]
    greedy = generate_batch(model, tokenizer, [GenerationRequest(seeded.prompt_ids, max_tokens=8)])[0]
    assert alone.token_ids != different.token_ids and alone.token_ids != greedy.token_ids


def test_stop_strings_cut_the_text_and_finish_the_request(composed):
    model, tokenizer = composed
    request = GenerationRequest(encode(tokenizer, PROMPTS[1]), max_tokens=12)
    full = generate_batch(model, tokenizer, [request])[0]
    assert len(full.text) > 3
    stop = full.text[2:4]
    cut = generate_batch(model, tokenizer, [GenerationRequest(request.prompt_ids, max_tokens=12, stop=[stop])])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert stop not in cut.text and cut.completion_tokens <= full.completion_tokens


def test_routing_reports_the_mean_gate_over_generated_tokens(composed):
    model, tokenizer = composed
    results = generate_batch(model, tokenizer, [
        GenerationRequest(encode(tokenizer, PROMPTS[0]), max_tokens=6, routing=True),
        GenerationRequest(encode(tokenizer, PROMPTS[2]), max_tokens=6)])
    routing = results[0].routing
    assert list(routing) == ["math", "code", "medicine"] and sum(routing.values()) == pytest.approx(1.0, abs=1e-4)
    assert results[1].routing is None
    # the first generated token's gates are those of the prompt's last position in a plain forward
    model(torch.tensor([encode(tokenizer, PROMPTS[0])]))
    from modula_ray.experts import last_position_gates
    first = last_position_gates(model)[0]
    single = generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, PROMPTS[0]), max_tokens=1,
                                                                 routing=True)])[0]
    assert single.finish_reason == "length" and single.completion_tokens == 1  # one step: one position's gates
    assert list(single.routing.values()) == pytest.approx(first.tolist(), abs=1e-5)


def stream(model, tokenizer, requests):
    """Every row's deltas, step by step, and its final result."""
    decoder, deltas, results = Decoder(model, tokenizer), {id(r): [] for r in requests}, {}
    events = decoder.step(requests)
    while events:
        for request, event in events:
            deltas[id(request)].append(event.delta)
            results[id(request)] = event.result or results.get(id(request))
        events = decoder.step() if decoder.running else []
    return [deltas[id(r)] for r in requests], [results[id(r)] for r in requests]


def test_streamed_deltas_add_up_to_the_final_text_and_never_take_back_a_stop_string(composed):
    model, tokenizer = composed
    full = generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, p), max_tokens=12)
                                             for p in PROMPTS[:3]])
    stop = full[1].text[3:6]
    requests = [GenerationRequest(encode(tokenizer, PROMPTS[0]), max_tokens=12),
                GenerationRequest(encode(tokenizer, PROMPTS[1]), max_tokens=12, stop=[stop]),
                GenerationRequest(encode(tokenizer, PROMPTS[2]), max_tokens=5)]
    deltas, results = stream(model, tokenizer, requests)
    for row, result in enumerate(results):
        assert "".join(deltas[row]) == result.text
    assert results[1].text == full[1].text[:full[1].text.find(stop)] and results[0].text == full[0].text
    assert all(stop not in "".join(deltas[1][:i]) for i in range(len(deltas[1]) + 1))


def test_the_stop_search_starts_where_new_text_could_complete_one():
    assert _cut_at_stop("ab\nc\n", ["\n"], start=3) == ("ab\nc", True)
    assert _cut_at_stop("ab\nc", ["\n"], start=3) == ("ab\nc", False)  # before start: found at an earlier step
    assert _cut_at_stop("xENDyEND", ["END", "y"], start=2) == ("xEND", True)  # the first that begins at 2 or later


def test_held_back_tail_covers_stop_prefixes_and_unfinished_characters():
    assert _held_back("abc\n", ["\n\n"]) == 1 and _held_back("abc", ["\n\n"]) == 0
    assert _held_back("the end", ["endgame", "d"]) == 3 and _held_back("caf\ufffd", []) == 1


def test_echoed_logprobs_match_a_plain_forward_and_do_not_depend_on_the_batch(composed):
    model, tokenizer = composed
    ids = encode(tokenizer, PROMPTS[5])
    request = GenerationRequest(ids, max_tokens=2, logprobs=3, echo=True)
    alone = generate_batch(model, tokenizer, [request])[0]
    batched = generate_batch(model, tokenizer, [GenerationRequest(encode(tokenizer, PROMPTS[7]), max_tokens=2),
                                                GenerationRequest(ids, max_tokens=2, logprobs=3, echo=True)])[1]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    scores = alone.logprobs
    assert [s.token_id for s in scores] == ids + alone.token_ids and scores[0].logprob is None
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert [s.logprob for s in scores[1:len(ids)]] == pytest.approx(expected, abs=1e-4)
    assert [s.logprob for s in batched.logprobs[1:]] == pytest.approx([s.logprob for s in scores[1:]], abs=1e-4)
    for entry in scores[len(ids):]:  # greedy: the chosen token is the most likely one
        assert max(entry.top, key=entry.top.get) == entry.token_id and len(entry.top) == 3
        assert entry.top[entry.token_id] == pytest.approx(entry.logprob)


def test_a_cancelled_row_stops_at_the_next_step_and_the_others_go_on(composed):
    model, tokenizer = composed
    requests = [GenerationRequest(encode(tokenizer, p), max_tokens=30) for p in PROMPTS[:2]]
    decoder = Decoder(model, tokenizer)
    decoder.step(requests)
    requests[0].cancel()
    events = dict((id(r), e) for r, e in decoder.step())
    assert events[id(requests[0])].result.finish_reason == "cancelled"
    assert events[id(requests[0])].result.completion_tokens == 1 and decoder.running == 1  # its slot is free
    while decoder.running:
        assert all(request is requests[1] for request, _ in decoder.step())


@pytest.mark.parametrize("kwargs, message", [({"prompt_ids": []}, "empty prompt"),
                                             ({"max_tokens": 0}, "max_tokens"),
                                             ({"temperature": -1}, "temperature"),
                                             ({"top_p": 0}, "top_p")])
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**({"prompt_ids": [1, 2]} | kwargs))


def test_a_row_that_fails_ends_alone_and_the_batch_decodes_on(composed):
    """What the schemas refuse, given to the decoder directly: a seed torch cannot take fails at the
    start, a temperature that overflows the softmax fails at its first draw; the greedy rows beside
    them give exactly what they give alone."""
    model, tokenizer = composed
    greedy = [GenerationRequest(encode(tokenizer, p), max_tokens=6) for p in PROMPTS[:2]]
    bad_seed = GenerationRequest(encode(tokenizer, PROMPTS[2]), max_tokens=6, temperature=0.7, seed=2 ** 64)
    bad_temperature = GenerationRequest(encode(tokenizer, PROMPTS[3]), max_tokens=6, temperature=1e-39)
    results = generate_batch(model, tokenizer, [greedy[0], bad_seed, greedy[1], bad_temperature])
    assert [r.finish_reason for r in results] == ["length", "error", "length", "error"]
    assert "Overflow" in results[1].error or "Runtime" in results[1].error
    assert results[3].error and results[3].completion_tokens == 0
    assert [r.token_ids for r in (results[0], results[2])] == [r.token_ids for r in generate_batch(model, tokenizer, greedy)]
    [alone] = generate_batch(model, tokenizer, [bad_seed])  # every row failed at the start: still answered
    assert alone.finish_reason == "error"


def test_only_the_needed_logits_are_computed(composed, monkeypatch):
    """The vocabulary projection sees each new row's last prompt position (every position only for a
    row that echoes logprobs) and one position per running row per decode step."""
    model, tokenizer = composed
    seen = []
    decoder = Decoder(model, tokenizer)
    head = decoder.head
    decoder.head = lambda hidden: seen.append(tuple(hidden.shape[:-1])) or head(hidden)
    ids = encode(tokenizer, PROMPTS[0])
    decoder.step([GenerationRequest(ids, max_tokens=2), GenerationRequest(ids, max_tokens=2, logprobs=1, echo=True)])
    assert seen == [(2,), (len(ids) - 1,), (2,)]  # prefill: 2 last positions, then the echo row's prompt; decode


@pytest.mark.parametrize("grow", [256, 4])
def test_rows_join_a_running_batch_and_leave_it_with_the_same_tokens_as_alone(composed, grow, monkeypatch):
    """Continuous batching: with 3 slots for 8 requests of different lengths, rows join as others
    finish (slots are reused, a moved row keeps its cache), and every row decodes what it decodes alone;
    with ``grow`` 4 the slot tensors are reallocated many times on the way."""
    from modula_ray.serve import slots

    monkeypatch.setattr(slots, "GROW", grow)
    model, tokenizer = composed
    requests = [GenerationRequest(encode(tokenizer, p), max_tokens=3 + 2 * i) for i, p in enumerate(PROMPTS)]
    alone = [generate_batch(model, tokenizer, [r])[0] for r in requests]
    three_slots = generate_batch(model, tokenizer, requests, slots=3)
    assert [r.token_ids for r in three_slots] == [r.token_ids for r in alone]
    decoder, late = Decoder(model, tokenizer), GenerationRequest(encode(tokenizer, PROMPTS[5]), max_tokens=6)
    decoder.step(requests[:2])
    decoder.step()
    tokens = [event.result for _, event in decoder.step([late]) if event.result]  # joins at step 3
    while decoder.running:
        tokens += [event.result for request, event in decoder.step() if event.result and request is late]
    assert [r for r in tokens if r.prompt_tokens == len(late.prompt_ids)][-1].token_ids == alone[5].token_ids[:6]
