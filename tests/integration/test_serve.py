"""The Serve endpoint on 127.0.0.1 over the tiny pipeline's run: the official `openai` client
(completions, chat, streaming), plain HTTP and curl for the bad-input matrix, and the command
itself with Ctrl-C. Every loop is bounded; every call has a timeout."""
import json
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.integration.conftest import API_KEY, call, free_port

pytestmark = pytest.mark.slow


def client(url: str, key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=60, max_retries=0)


def test_health_and_models(served):
    status, health = call(served.url, "/healthz")
    assert status == 200 and health["status"] == "ok" and health["models"] == ["hot", "plug", "tiny", "tiny-llama"]
    assert isinstance(health["replica"], str) and health["replica"]
    status, models = call(served.url, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["hot", "plug", "tiny", "tiny-llama"]


def test_the_openai_client_completes_and_chats(served):
    openai = client(served.url)
    completion = openai.completions.create(model=served.name, prompt="What is 3 + 4?", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    chat = openai.chat.completions.create(model=served.name, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    base = openai.completions.create(model="tiny-llama", prompt="hello", max_tokens=3, temperature=0)
    assert base.model == "tiny-llama"


def test_streamed_chat_and_completions_add_up_to_the_unstreamed_answer(served):
    openai = client(served.url)
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    whole = openai.chat.completions.create(model=served.name, messages=messages, max_tokens=12, temperature=0)
    chunks = list(openai.chat.completions.create(model=served.name, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    prompts = ["def f(x):", "the patient takes"]
    plain = openai.completions.create(model="hot", prompt=prompts, max_tokens=8, temperature=0)
    texts = {0: "", 1: ""}
    for chunk in openai.completions.create(model="hot", prompt=prompts, max_tokens=8, temperature=0, stream=True):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[0], texts[1]] == [c.text for c in sorted(plain.choices, key=lambda c: c.index)]


def greedy_routing(run_dir, prompt: str, steps: int) -> tuple[str, dict[str, float]]:
    """Reference, without Serve or a KV cache: greedy decoding by full forwards of the composition;
    the mean gate per expert over the positions that produced each token, averaged over routers.
    EOS is decoded past, as the request asks (``ignore_eos``)."""
    from modula_ray.compose import load_composition
    from modula_ray.evaluation.routing import captured_gates

    model, tokenizer = load_composition(run_dir)
    ids, total = tokenizer(prompt).input_ids, 0
    with torch.no_grad(), captured_gates(model) as captured:
        for _ in range(steps):
            captured.clear()
            logits = model(torch.tensor([ids])).logits
            total = total + torch.stack([calls[-1][0, -1] for calls in captured.values()]).mean(dim=0)
            ids = ids + [int(logits[0, -1].argmax())]
    return tokenizer.decode(ids[-steps:], skip_special_tokens=True), dict(zip(["math", "code"], (total / steps).tolist()))


def test_routing_is_reported_per_choice(served, tiny_run):
    prompts = ["1 + 1", "def f():"]
    status, body = call(served.url, "/v1/completions", {"model": served.name, "prompt": prompts,
                                                        "max_tokens": 3, "temperature": 0, "routing": True,
                                                        "ignore_eos": True})
    assert status == 200 and len(body["routing"]) == 2
    for prompt, choice, routing in zip(prompts, sorted(body["choices"], key=lambda c: c["index"]), body["routing"]):
        text, expected = greedy_routing(tiny_run[0], prompt, 3)
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert routing == pytest.approx(expected, abs=1e-4)


def test_greedy_output_is_the_same_alone_and_batched_across_compositions(served):
    prompts = ["What is 3 + 4?", "the patient takes", "def add(a, b):", "organic apples", "7 * 8 =",
               "the market price", "answer:", "x y z"]
    models = [served.name, "hot", "tiny-llama", served.name] * 2

    def text(pair):
        model, prompt = pair
        status, body = call(served.url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 6,
                                                            "temperature": 0})
        assert status == 200, body
        return body["choices"][0]["text"]

    alone = [text(pair) for pair in zip(models, prompts)]
    ids = {tuple(call(served.url, "/tokenize", {"model": model, "prompt": prompt})[1]["tokens"]): model
           for model, prompt in zip(models, prompts)}
    logged = len(served.batches.read_text().splitlines())
    start = threading.Barrier(8)

    def at_once(pair):
        start.wait(timeout=30)
        return text(pair)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(at_once, zip(models, prompts)))
    assert together == alone
    # the main app logs the prompts that join the running batch at each step (decode_hook): the 8
    # requests joined together, and rows of different compositions joined one step (one forward)
    batches = [json.loads(line) for line in served.batches.read_text().splitlines()[logged:]]
    ours = [[ids[tuple(row)] for row in batch if tuple(row) in ids] for batch in batches]
    assert sum(map(len, ours)) == 8 and max(map(len, ours)) >= 2, batches
    assert any(len(set(models_in)) >= 2 for models_in in ours), ours


def test_a_short_request_overtakes_a_long_one_continuous_batching(served):
    """Rows join and leave the running batch at every step: a 2-token request sent while a long
    generation streams is answered long before that generation ends (a static batch would hold it
    until the long row finished, or run it to the long row's length)."""
    import urllib.request

    body = {"model": served.name, "prompt": "the market price", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    request = urllib.request.Request(served.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as long_stream:
        assert next(line for line in long_stream if line.startswith(b"data: "))  # the long row is decoding
        status, short = call(served.url, "/v1/completions", {"model": served.name, "prompt": "x", "max_tokens": 2,
                                                            "temperature": 0, "ignore_eos": True})
        short_done = time.monotonic()
        rest = [line for line in long_stream if line.startswith(b"data: ")]
        long_done = time.monotonic()
    assert status == 200 and short["usage"]["completion_tokens"] == 2
    assert rest[-1].strip() == b"data: [DONE]" and len(rest) > 100  # the long one went on streaming after it
    assert long_done - short_done > 0.05, (long_done, short_done)


def test_echoed_logprobs_are_the_models_own(served):
    """What lm-eval's loglikelihood reads: prompt tokens scored, the first with none, top-1 present."""
    status, tokens = call(served.url, "/tokenize", {"prompt": "the market price", "add_special_tokens": False})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) > 1
    status, body = call(served.url, "/v1/completions", {"model": served.name, "prompt": tokens["tokens"],
                                                        "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True})
    logprobs = body["choices"][0]["logprobs"]
    assert status == 200 and len(logprobs["token_logprobs"]) == len(tokens["tokens"]) + 1
    assert logprobs["token_logprobs"][0] is None and all(v < 0 for v in logprobs["token_logprobs"][1:])
    assert body["choices"][0]["text"].startswith(call(served.url, "/detokenize", {"tokens": tokens["tokens"]})[1]["prompt"])
    last_top = logprobs["top_logprobs"][-1]
    assert max(last_top.values()) == pytest.approx(logprobs["token_logprobs"][-1])  # greedy picks the top-1


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": ""}, 422, "prompt"), ({"prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 422, "max_tokens"), ({"prompt": "x", "bogus": 1}, 422, "bogus"),
    ({"prompt": "x", "model": "nope"}, 404, None), ({"prompt": [10 ** 6]}, 422, None),
    ({"prompt": "x", "max_tokens": 2000}, 422, None), ({"prompt": "x", "stream": True, "echo": True}, 422, None)])
def test_bad_requests_get_4xx_with_an_openai_error_body(served, body, status, param):
    code, reply = call(served.url, "/v1/completions", {"model": served.name} | body)
    assert code == status and set(reply["error"]) >= {"message", "type", "param", "code"}
    if param:
        assert reply["error"]["param"].startswith(param)
    elif status == 404:
        assert served.name in reply["error"]["message"] and "tiny-llama" in reply["error"]["message"]


def test_the_inputs_that_once_took_a_replica_down_get_4xx_and_it_serves_on(served):
    """Each reached the decoder and raised there, marking the replica broken (issue 25): a seed over
    2^64 with sampling, a temperature that overflows the softmax, a lone surrogate, a token id of 2^40."""
    replica = call(served.url, "/healthz")[1]["replica"]
    sampled = {"model": served.name, "prompt": "1 + 1 =", "max_tokens": 2}
    for path, body, param in [("/v1/completions", sampled | {"seed": 2 ** 64, "temperature": 0.7}, "seed"),
                              ("/v1/completions", sampled | {"temperature": 1e-39}, "temperature"),
                              ("/v1/completions", sampled | {"prompt": "\ud800"}, "prompt"),
                              ("/v1/chat/completions", {"model": served.name, "messages": [
                                  {"role": "user", "content": "hi \udfff"}]}, "messages"),
                              ("/detokenize", {"model": served.name, "tokens": [2 ** 40]}, "tokens"),
                              ("/detokenize", {"model": served.name, "tokens": [10 ** 6]}, None)]:
        code, reply = call(served.url, path, raw=json.dumps(body).encode())  # JSON escapes the surrogate
        assert 400 <= code < 500 and set(reply["error"]) >= {"message", "type", "param", "code"}, (body, reply)
        assert param is None or reply["error"]["param"].startswith(param), reply
    assert "outside the vocabulary" in reply["error"]["message"]
    code, reply = call(served.url, "/v1/completions", sampled | {"seed": 2 ** 63 - 1, "temperature": 0.7})
    assert code == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert call(served.url, "/healthz")[1]["replica"] == replica


def test_malformed_json_oversized_and_unsized_bodies_are_refused(served):
    code, reply = call(served.url, "/v1/completions", raw=b'{"model": "x", "prompt": ')
    assert code == 422 and "error" in reply
    code, reply = call(served.url, "/v1/completions", {"model": served.name, "prompt": "x" * (2 << 20)})
    assert code == 413 and reply["error"]["code"] == "request_too_large"
    code, reply = call(served.tight, "/v1/completions", {"model": served.name, "prompt": "x" * 5000}, token=API_KEY)
    assert code == 413  # the tight application's own limit: 4 KiB (without its key: 401, before the size)
    code, reply = call(served.url, "/v1/chat/completions", {"model": served.name, "messages": []})
    assert code == 422 and reply["error"]["param"].startswith("messages")
    import http.client

    connection = http.client.HTTPConnection(served.url.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/completions", body=iter([b'{"model": "tiny", "prompt": "x"}']),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 411 and json.loads(response.read())["error"]["code"] == "length_required"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_answers_and_json_errors(served):
    def curl(*args):
        out = subprocess.run(["curl", "-s", "-m", "60", "-w", "\n%{http_code}", *args], capture_output=True,
                             text=True, timeout=90, check=True).stdout
        body, status = out.rsplit("\n", 1)
        return int(status), json.loads(body)

    status, body = curl("-H", "Content-Type: application/json", "-d",
                        json.dumps({"model": served.name, "prompt": "1 + 1 =", "max_tokens": 2}),
                        f"{served.url}/v1/completions")
    assert status == 200 and body["object"] == "text_completion"
    status, body = curl("-H", "Content-Type: application/json", "-d", "{not json", f"{served.url}/v1/completions")
    assert status == 422 and body["error"]["type"] == "invalid_request_error"


def test_the_serve_command_answers_and_stops_cleanly_on_ctrl_c(tiny_run, tmp_path):
    import os
    import signal
    import sys
    import time
    from pathlib import Path

    run_dir, _ = tiny_run
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text("# modula-ray serve RUN --config serve.yaml\napplications:\n  - name: modula-ray\n"
                      "    import_path: modula_ray.serve.app:app_builder\n    args: {max_batch_size: 4}\n")
    cli = Path(sys.executable).with_name("modula-ray")
    process = subprocess.Popen([str(cli), "serve", str(run_dir), "--port", str(port), "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RAY_ADDRESS": ""})
    try:
        status, body, deadline = None, None, time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:  # bounded wait for the endpoint
            try:
                status, body = call(f"http://127.0.0.1:{port}", "/healthz", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert (body["status"], body["models"]) == ("ok", [run_dir.name]) and body["replica"]
        status, reply = call(f"http://127.0.0.1:{port}", "/v1/completions",
                             {"model": run_dir.name, "prompt": "1 + 1 =", "max_tokens": 2, "temperature": 0})
        assert status == 200 and reply["usage"]["completion_tokens"] <= 2
        status, reply = call(f"http://127.0.0.1:{port}", "/v1/admin/experts", {"run_dir": str(run_dir)})
        assert status == 404 and "no admin token" in reply["error"]["message"]
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    assert "shutting down" in output


def test_a_mode_run_is_served_like_any_other(served, mode_run):
    """A MoDE composition as its own Serve application beside the others: the openai client's greedy
    answer equals in-process generation, and the gates' routing (backbone first) comes back."""
    from ray import serve

    from modula_ray.compose import load_composition
    from modula_ray.serve.app import build_app
    from modula_ray.serve.generation import GenerationRequest, generate_batch

    run_dir = mode_run[0]
    serve.run(build_app([run_dir], deployment={"ray_actor_options": {"num_cpus": 0.25}}), name="mode",
              route_prefix="/mode")
    try:
        url = served.url + "/mode"
        answer = client(url).completions.create(model=run_dir.name, prompt="What is 3 + 4?", max_tokens=6,
                                                temperature=0).choices[0].text
        model, tokenizer = load_composition(run_dir)
        [local] = generate_batch(model, tokenizer, [GenerationRequest(tokenizer("What is 3 + 4?").input_ids,
                                                                        max_tokens=6)])
        assert answer == local.text
        status, body = call(url, "/v1/completions", {"model": run_dir.name, "prompt": "1 + 1", "max_tokens": 2,
                                                     "temperature": 0, "routing": True})
        assert status == 200 and list(body["routing"][0]) == ["backbone", "math", "code"]
    finally:
        serve.delete("mode")
