"""The judge client against real HTTP on 127.0.0.1: this project's own Serve endpoint (the tiny
base model, whose random replies are malformed verdicts; the tight application, whose overload
503s are retried), and a scripted stdlib server for a well-formed verdict and a 4xx."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modula_ray.evaluation.judges.client import JudgeClient, JudgeConfig, JudgeUnavailableError
from modula_ray.evaluation.judges.rubric import judge_answers, judge_pairwise, load_rubric
from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.slow
ITEMS = [{"question": f"Optimise this product title: Organic Apples {i} lb", "answer": f"Fresh Organic Apples, {i} lb Bag"}
         for i in range(3)]


def test_malformed_verdicts_are_counted_invalid_and_a_second_run_is_served_from_the_cache(served, tmp_path):
    rubric = load_rubric("ecommerce_generation")
    client = JudgeClient(JudgeConfig(base_url=f"{served.url}/v1", model="tiny-llama", max_tokens=24), tmp_path)
    first = judge_answers(client, rubric, ITEMS)
    assert first["judged"] == 3 and first["invalid"] == 3 and first["total"] is None  # random weights: no JSON
    assert client.stats == {"calls": 3, "cache_hits": 0, "retries": 0, "malformed": 0}
    again = judge_answers(client, rubric, ITEMS)
    assert client.stats["cache_hits"] == 3 and client.stats["calls"] == 3
    assert [i["reply"] for i in again["items"]] == [i["reply"] for i in first["items"]]
    bumped = JudgeClient(client.config, tmp_path)
    judge_answers(bumped, load_rubric("ecommerce_generation").__class__(**{**rubric.__dict__, "version": "9"}), ITEMS)
    assert bumped.stats["calls"] == 3  # a new rubric version is judged again


def test_overload_503s_are_retried_until_answered(served, tmp_path):
    """The tight application holds 4 generations; 12 judges at once overflow it."""
    config = JudgeConfig(base_url=f"{served.tight}/v1", model=served.name, api_key=API_KEY, concurrency=12,
                         retries=8, max_tokens=48)
    client = JudgeClient(config, tmp_path)
    replies = client.ask_all("system", [f"prompt {i}" for i in range(12)], "1")
    assert len(replies) == 12 and client.stats["calls"] == 12 and client.stats["retries"] >= 1


class Scripted(BaseHTTPRequestHandler):
    """Answers chat completions with the verdict the prompt asks for (or a 400)."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        if "REFUSE" in prompt:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad"}}')
            return
        if "Answer B" in prompt:  # pairwise: prefer the answer that mentions "Fresh", in either position
            a_part = prompt.split("Answer A")[1].split("Answer B")[0]
            reply = "A" if "Fresh" in a_part else "B"
        else:
            reply = 'Scores: {"helpfulness": 2, "relevance": 2, "accuracy": 1, "readability": 2, "fluency": 2}'
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_well_formed_verdict_is_scored_pairwise_cancels_position_and_a_4xx_is_not_retried(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rubric = load_rubric("ecommerce_generation")
        client = JudgeClient(JudgeConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="scripted",
                                         retries=3), tmp_path)
        scored = judge_answers(client, rubric, ITEMS)
        assert scored["valid"] == 3 and scored["total"] == pytest.approx(9.0) and scored["out_of"] == 10
        pairs = [{"question": "q", "a": "Fresh Apples", "b": "apples"}, {"question": "q", "a": "apples", "b": "Fresh"}]
        assert judge_pairwise(client, rubric, pairs) == {"a": 1, "b": 1, "tie": 0, "invalid": 0, "judged": 2}
        with pytest.raises(JudgeUnavailableError, match="HTTP 400"):
            client.ask("system", "REFUSE this", "1")
        assert client.stats["retries"] == 0
    finally:
        server.shutdown()


def test_the_judge_suite_answers_judges_and_reports_which_judge_scored(served, tiny_run, tmp_path, monkeypatch):
    from modula_ray.cli import main
    from tests.integration.conftest import copy_run

    run_dir = copy_run(tiny_run[0], tmp_path / "judged")
    monkeypatch.setenv("MODULA_RAY_JUDGE_URL", f"{served.url}/v1")  # the environment; the flag wins over it
    monkeypatch.setenv("MODULA_RAY_JUDGE_MODEL", "nonexistent")
    assert main(["eval", str(run_dir), "--suite", "judge", "--limit", "2", "--judge-model", "tiny-llama"]) == 0
    entry = json.loads((run_dir / "eval" / "results.json").read_text())["suites"]["judge"]
    assert entry["judge"] == f"tiny-llama at {served.url}/v1" and entry["rubric"] == "ecommerce_generation v1.1"
    assert entry["composition"]["judged"] == 2 and entry["composition"]["invalid"] == 2  # random judge: no JSON
    assert entry["pairwise"]["judged"] == 2 and entry["pairwise"]["invalid"] + entry["pairwise"]["tie"] == 2
    from modula_ray.evaluation.report import write_report

    report = write_report([run_dir]).read_text()
    assert f"Judge: tiny-llama at {served.url}/v1" in report and "0 / 2" in report
