"""The Serve endpoint on 127.0.0.1 over the tiny pipeline's run, called by the official `openai`
client and by plain HTTP for the bad-input matrix. Every loop is bounded; every call has a timeout."""
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_run):
    from ray import serve

    from modula_ray.serve.app import build_app

    run_dir, _ = tiny_run
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app([str(run_dir)], base_models=["tiny-llama"]), name="modula-ray-test", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", run_dir.name
    finally:
        serve.shutdown()


def call(url: str, path: str, body=None, *, raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_health_and_models(endpoint):
    url, name = endpoint
    assert call(url, "/healthz") == (200, {"status": "ok", "models": sorted([name, "tiny-llama"])})
    status, models = call(url, "/v1/models")
    assert status == 200 and {m["id"] for m in models["data"]} == {name, "tiny-llama"}


def test_the_openai_client_completes_and_chats(endpoint):
    openai = pytest.importorskip("openai")
    url, name = endpoint
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    completion = client.completions.create(model=name, prompt="What is 3 + 4?", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    base = client.completions.create(model="tiny-llama", prompt="hello", max_tokens=3, temperature=0)
    assert base.model == "tiny-llama"


def test_routing_is_reported_per_choice(endpoint):
    url, name = endpoint
    status, body = call(url, "/v1/completions", {"model": name, "prompt": ["1 + 1", "def f():"], "max_tokens": 3,
                                                 "temperature": 0, "routing": True})
    assert status == 200 and len(body["routing"]) == 2
    for routing in body["routing"]:
        assert set(routing) == {"math", "code"} and sum(routing.values()) == pytest.approx(1.0, abs=1e-3)


def test_greedy_output_is_the_same_alone_and_batched(endpoint):
    url, name = endpoint
    prompts = ["What is 3 + 4?", "the patient takes", "def add(a, b):", "organic apples", "7 * 8 =",
               "the market price", "answer:", "x y z"]
    body = lambda p: {"model": name, "prompt": p, "max_tokens": 6, "temperature": 0}  # noqa: E731
    alone = [call(url, "/v1/completions", body(p))[1]["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: call(url, "/v1/completions", body(p))[1]["choices"][0]["text"], prompts))
    assert together == alone


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": ""}, 422, "prompt"), ({"prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 422, "max_tokens"), ({"prompt": "x", "bogus": 1}, 422, "bogus"),
    ({"prompt": "x", "model": "nope"}, 404, None), ({"prompt": "x", "stream": True}, 400, None)])
def test_bad_requests_get_4xx_with_an_openai_error_body(endpoint, body, status, param):
    url, name = endpoint
    code, reply = call(url, "/v1/completions", {"model": name} | body)
    assert code == status and set(reply["error"]) >= {"message", "type", "param", "code"}
    if param:
        assert reply["error"]["param"].startswith(param)
    elif status == 404:
        assert name in reply["error"]["message"] and "tiny-llama" in reply["error"]["message"]
    else:
        assert "not supported" in reply["error"]["message"]


def test_malformed_json_and_oversized_bodies_are_refused(endpoint):
    url, name = endpoint
    code, reply = call(url, "/v1/completions", raw=b'{"model": "x", "prompt": ')
    assert code == 422 and "error" in reply
    code, reply = call(url, "/v1/completions", {"model": name, "prompt": "x" * (2 << 20)})
    assert code == 413 and reply["error"]["code"] == "request_too_large"
    code, reply = call(url, "/v1/chat/completions", {"model": name, "messages": []})
    assert code == 422 and reply["error"]["param"].startswith("messages")


def test_the_serve_command_answers_and_stops_cleanly_on_ctrl_c(tiny_run):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_dir, _ = tiny_run
    port = free_port()
    cli = Path(sys.executable).with_name("modula-ray")
    process = subprocess.Popen([str(cli), "serve", str(run_dir), "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        status, body, deadline = None, None, time.monotonic() + 240
        while time.monotonic() < deadline:  # bounded wait for the endpoint
            try:
                status, body = call(f"http://127.0.0.1:{port}", "/healthz", timeout=5)
                if status == 200:
                    break
            except OSError:
                time.sleep(1)
        assert body == {"status": "ok", "models": [run_dir.name]}
        status, reply = call(f"http://127.0.0.1:{port}", "/v1/completions",
                             {"model": run_dir.name, "prompt": "1 + 1 =", "max_tokens": 2, "temperature": 0})
        assert status == 200 and reply["usage"]["completion_tokens"] <= 2
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    assert "shutting down" in output
