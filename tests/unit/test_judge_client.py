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
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status != 200:
            self.send_header("retry-after-ms", "10")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.statuses, server.requests = [], []
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
    assert client.stats == {"calls": 1, "cache_hits": 0, "retries": 2}
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
