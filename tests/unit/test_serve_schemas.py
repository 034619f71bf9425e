"""OpenAI-shaped request validation: what the ingress will answer 422 for, and what it accepts."""
import pytest
from pydantic import ValidationError

from modula_ray.serve.schemas import (ChatCompletionRequest, CompletionRequest, CompletionResponse, Usage,
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
    ({"prompt": 7}, "prompt"), ({"model": "", "prompt": "x"}, "model")])
def test_bad_completion_requests_name_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**({"model": "tiny"} | body))
    error = validation_error_body(info.value.errors())["error"]
    assert error["param"].split(".")[0] == field and error["type"] == "invalid_request_error"
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
