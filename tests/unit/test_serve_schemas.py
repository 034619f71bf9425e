"""OpenAI-shaped request validation: what the ingress will answer 422 for, and what it accepts."""
import pytest
from pydantic import ValidationError

from modula_ray.serve.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, CompletionResponse, Usage,
                                      validation_error_body)


def test_a_minimal_completion_and_chat_request_are_accepted():
    request = CompletionRequest(model="tiny", prompt="2 + 2 =", max_tokens=4, stop="\n", seed=3)
    assert request.prompts() == ["2 + 2 ="] and request.stops() == ["\n"] and request.temperature == 1.0
    chat = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
                                 routing=True)
    assert chat.messages[0].role == "user" and chat.stream and chat.routing


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"), ({"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10 ** 6}, "max_tokens"), ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"), ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": 7}, "prompt"), ({"model": "", "prompt": "x"}, "model"), ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"), ({"prompt": "x", "stream": True, "echo": True}, "stream"),
    ({"prompt": ["x"] * 33}, "prompt"),
    # what once reached the decoder and took the replica down (issue 25)
    ({"prompt": "x", "seed": 2 ** 64, "temperature": 0.7}, "seed"), ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "temperature": 1e-39}, "temperature"), ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": ["ok", "a\udfffb"]}, "prompt"), ({"prompt": [2 ** 40]}, "prompt"),
    ({"prompt": "x", "stop": "\ud800"}, "stop"), ({"prompt": "x", "stop": "s" * 65}, "stop")])
def test_bad_completion_requests_name_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**({"model": "tiny"} | body))
    error = validation_error_body(info.value.errors())["error"]
    assert (error["param"] or field).split(".")[0] == field and error["type"] == "invalid_request_error"
    assert field in error["message"]


@pytest.mark.parametrize("messages", [[], [{"role": "user", "content": ""}], [{"role": "robot", "content": "hi"}],
                                      [{"role": "user"}]])
def test_bad_chat_messages_are_refused(messages):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="tiny", messages=messages)
    assert validation_error_body(info.value.errors())["error"]["param"].startswith("messages")


def test_a_response_carries_usage_in_openai_shape():
    body = CompletionResponse(model="tiny", choices=[{"index": 0, "text": "4", "finish_reason": "length"}],
                              usage=Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)).model_dump()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_prompts_may_be_token_ids_as_in_openai():
    assert CompletionRequest(model="t", prompt=[5, 6, 7]).prompts() == [[5, 6, 7]]
    assert CompletionRequest(model="t", prompt=[[5], [6, 7]]).prompts() == [[5], [6, 7]]
    assert CompletionRequest(model="t", prompt=["a", "b"]).prompts() == ["a", "b"]


def test_serve_config_errors_name_the_field(tmp_path):
    from modula_ray.errors import ConfigError
    from modula_ray.serve.config import ServeArgs, deployment_options, load_serve_config, parse_args

    with pytest.raises(ConfigError, match="args.max_batch_size"):
        parse_args({"runs": ["r"], "max_batch_size": 0})
    with pytest.raises(ConfigError, match="args.bogus"):
        parse_args({"runs": ["r"], "bogus": 1})
    with pytest.raises(ConfigError, match="run folder"):
        parse_args({})
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        deployment_options(ServeArgs(runs=["r"], max_batch_size=8, max_queued_requests=8), {"max_ongoing_requests": 10})
    assert deployment_options(ServeArgs(runs=["r"]), None)["max_ongoing_requests"] == 8 + 32 + 8
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications: []\n")
    with pytest.raises(ConfigError, match="exactly one application"):
        load_serve_config(bad)


def test_the_cluster_serve_config_parses_and_starts_with_its_command():
    from pathlib import Path

    from modula_ray.serve.config import deployment_options, load_serve_config, parse_args

    path = Path(__file__).resolve().parents[2] / "cluster" / "serve.yaml"
    assert path.read_text().startswith("# serve deploy")
    http, args, deployment = load_serve_config(path)
    served = parse_args(args)
    options = deployment_options(served, deployment)
    assert http["port"] == 8000 and options["max_ongoing_requests"] > served.capacity()
    assert options["autoscaling_config"]["max_replicas"] >= 1 and "name" not in options


def test_the_limits_that_remain_are_accepted():
    request = CompletionRequest(model="tiny", prompt="x", seed=2 ** 63 - 1, temperature=0.01, stop="s" * 64)
    assert request.seed == 2 ** 63 - 1 and CompletionRequest(model="tiny", prompt="x", temperature=0).temperature == 0
    with pytest.raises(ValidationError, match="not valid Unicode"):
        ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi \ud83d"}])
    with pytest.raises(ValidationError):
        DetokenizeRequest(tokens=[2 ** 40])
