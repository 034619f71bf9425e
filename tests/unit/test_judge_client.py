"""The judge client's retries (the openai client's own) against a scripted stdlib server on
127.0.0.1: 503s retried until answered, a 4xx never retried, the error naming the URL and the
last error; the on-disk cache. tests/integration/test_serve_judges.py does the same against Serve."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modula_ray.evaluation.judges.client import JudgeClient, JudgeConfig, JudgeUnavailableError


class Scripted(BaseHTTPRequestHandler):
    """Answers each POST with the next status of ``server.statuses`` (200 once they run out),
    recording ``(path, Authorization, body)``; an error carries a 10 ms ``retry-after-ms``."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        reply = ({"choices": [{"message": {"role": "assistant", "content": "verdict A"}}]} if status == 200
                 else {"error": {"message": f"scripted {status}"}})
        data = self.server.bodies.pop(0) if status == 200 and self.server.bodies else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status != 200:
            for name, value in (self.server.retry_headers or {"retry-after-ms": "10"}).items():
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.statuses, server.requests, server.bodies, server.retry_headers = [], [], [], None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def client_for(server, tmp_path, **settings) -> JudgeClient:
    config = JudgeConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="scripted", timeout_s=10,
                         **settings)
    return JudgeClient(config, tmp_path)


def test_503s_are_retried_until_answered_and_the_reply_is_cached(judge_server, tmp_path):
    judge_server.statuses[:] = [503, 503]
    client = client_for(judge_server, tmp_path, retries=3, api_key="secret", max_tokens=7)
    assert client.ask("system text", "prompt text", "1") == "verdict A"
    assert client.stats == {"calls": 1, "cache_hits": 0, "retries": 2, "malformed": 0}
    assert len(judge_server.requests) == 3
    path, authorization, body = judge_server.requests[-1]
    assert (path, authorization) == ("/v1/chat/completions", "Bearer secret")
    assert body["model"] == "scripted" and body["temperature"] == 0 and body["max_tokens"] == 7
    assert body["messages"] == [{"role": "system", "content": "system text"},
                                {"role": "user", "content": "prompt text"}]
    assert client.ask("system text", "prompt text", "1") == "verdict A"  # from the cache: no request
    assert client.stats["cache_hits"] == 1 and len(judge_server.requests) == 3


def test_a_4xx_is_not_retried_and_the_error_names_the_url(judge_server, tmp_path):
    judge_server.statuses[:] = [400]
    client = client_for(judge_server, tmp_path, retries=3)
    with pytest.raises(JudgeUnavailableError) as raised:
        client.ask("system", "prompt", "1")
    url = f"http://127.0.0.1:{judge_server.server_port}/v1/chat/completions"
    assert str(raised.value).startswith(f"{url}: HTTP 400: ") and "scripted 400" in str(raised.value)
    assert len(judge_server.requests) == 1 and client.stats["retries"] == 0


def test_a_judge_that_never_answers_fails_with_the_last_error_after_every_try(judge_server, tmp_path):
    judge_server.statuses[:] = [503, 503, 503]
    client = client_for(judge_server, tmp_path, retries=2)
    with pytest.raises(JudgeUnavailableError, match="HTTP 503: .*scripted 503"):
        client.ask("system", "prompt", "1")
    assert len(judge_server.requests) == 3 and client.stats["calls"] == 0


def test_no_server_at_the_url_says_so(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = JudgeClient(JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1/", retries=0, timeout_s=5), tmp_path)
    with pytest.raises(JudgeUnavailableError) as raised:
        client.ask("system", "prompt", "1")
    assert str(raised.value).startswith(f"http://127.0.0.1:{port}/v1/chat/completions: no answer after 1 tries (")


@pytest.mark.parametrize("retry_after, answered", [
    ("1", True), ("soon", True), ("IN 2 S", True),      # honoured (a date 2 s ahead); garbage: the own backoff
    ("3600", False), ("Wed, 21 Oct 2099 07:28:00 GMT", False)])  # over the 60 s cap: fails at once
def test_retry_after_is_honoured_in_both_forms_and_bounded(judge_server, tmp_path, retry_after, answered):
    import email.utils
    import time

    if retry_after == "IN 2 S":
        retry_after = email.utils.formatdate(time.time() + 2, usegmt=True)
    judge_server.statuses[:], judge_server.retry_headers = [429], {"Retry-After": retry_after}
    client = client_for(judge_server, tmp_path, retries=1)
    started = time.monotonic()
    if answered:
        assert client.ask("s", "p", "1") == "verdict A" and client.stats["retries"] == 1
    else:
        with pytest.raises(JudgeUnavailableError, match="HTTP 429"):
            client.ask("s", "p", "1")
    assert time.monotonic() - started < 10


def test_a_malformed_200_is_counted_invalid_and_not_cached(judge_server, tmp_path):
    from modula_ray.evaluation.judges.rubric import judge_answers, load_rubric

    judge_server.bodies[:] = [b'{"id": "x", "object": "chat.completion"}', b'{"choices": []}']
    client = client_for(judge_server, tmp_path)
    result = judge_answers(client, load_rubric("ecommerce_generation"), [{"question": "q", "answer": "a"}] * 2)
    assert result["invalid"] == 2 and client.stats["malformed"] == 2 and not list(tmp_path.glob("*.json"))


def test_the_cache_is_per_judge_url(judge_server, tmp_path):
    first = client_for(judge_server, tmp_path)
    first.ask("s", "p", "1")
    other = JudgeClient(JudgeConfig(base_url=f"http://localhost:{judge_server.server_port}/v1", model="scripted",
                                    timeout_s=10), tmp_path)
    other.ask("s", "p", "1")
    assert (first.stats["calls"], other.stats["calls"], other.stats["cache_hits"]) == (1, 1, 0)
