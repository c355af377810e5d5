"""Errors on the OpenAI routes: OpenAI's body `{"error": {"message", "type", "param", "code"}}`, the
right status, and the openai SDK's matching exception class; unimplemented fields refused by name;
the requests Mellea, granite-common and the SDK really send (captured on the wire) accepted."""

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.alora_core.conftest import random_ids
from tests.service.conftest import KEY_A, ServerProcess
from tests.service.openai.conftest import ALIAS, MAX_MODEL_LEN, MAX_REQUEST_BYTES, SERVED, sdk_client

# recorded by a mock server from Mellea 0.8.0, granite-common 0.4.1 and openai 3.57 (see data/README.md)
CAPTURED = Path(__file__).parent / "data" / "captured_wire_requests.jsonl"
CHAT = [{"role": "user", "content": "hello"}]


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    return body


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"n": 17}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs"),  # invalid schema
        ({"guided_json": {"type": "integer"}, "guided_regex": "[0-9]"}, "guided_regex"),  # two constraints
        ({"response_format": {"type": "json_schema"}}, "response_format"),  # no schema
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"skip_special_tokens": False}, "skip_special_tokens"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),  # does not fit the context with the prompt
        ({"max_completion_tokens": MAX_MODEL_LEN}, "max_completion_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"chat_template_kwargs": {"tokenize": True}}, None),
    ],
)
def test_bad_chat_requests_are_400_bad_request_naming_the_field(
    sdk: openai.OpenAI, extra: dict[str, Any], param: str | None
) -> None:
    body = {"model": SERVED, "messages": CHAT, "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(**{k: body.pop(k) for k in ("model", "messages")}, extra_body=body)
    error = error_of(caught.value)
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if param in ("structured_outputs", "guided_regex", "response_format", "tools", "skip_special_tokens"):
        assert param in error["message"]


def test_bad_completion_requests_are_400(sdk: openai.OpenAI) -> None:
    for extra, param in [
        ({"prompt": [600, 601]}, None),  # token ids outside the vocabulary
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "max_tokens": 0}, None),  # 0 needs echo
        ({"prompt": "x", "stream": True, "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": [], "max_tokens": 1}, "prompt"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.completions.create(model=SERVED, prompt=extra.pop("prompt"), extra_body=extra)
        if param is not None:
            assert error_of(caught.value)["param"].startswith(param)


def test_unknown_model_or_adapter_is_404_naming_it(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1)
    assert error_of(caught.value)["param"] == "model" and "`gpt-4o`" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(
            model=SERVED,
            messages=CHAT,
            max_tokens=1,
            extra_body={"chat_template_kwargs": {"adapter_name": "nope"}},
        )
    assert "`nope`" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nope")


def test_missing_or_wrong_api_key_is_401(openai_server: ServerProcess) -> None:
    for key in (None, "wrong-key"):
        with sdk_client(openai_server, key) as client, pytest.raises(openai.AuthenticationError) as caught:
            client.models.list()
        assert error_of(caught.value)["code"] == "unauthorized"


def test_too_large_body_and_too_long_prompt_are_413(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "x" * MAX_REQUEST_BYTES}], max_tokens=1
        )
    assert caught.value.status_code == 413 and error_of(caught.value)["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.completions.create(model=SERVED, prompt=random_ids(MAX_MODEL_LEN, seed=1), max_tokens=1)
    assert caught.value.status_code == 413 and error_of(caught.value)["code"] == "context_too_long"


def test_alora_without_its_invocation_where_none_is_added_is_422(sdk: openai.OpenAI) -> None:
    invocation_text = "<|start_of_role|>certainty<|end_of_role|>"
    calls = [
        lambda: sdk.completions.create(model="certainty", prompt="no invocation here", max_tokens=1),
        lambda: sdk.chat.completions.create(
            model="certainty", messages=CHAT, max_tokens=1, extra_body={"add_generation_prompt": False}
        ),
        lambda: sdk.chat.completions.create(
            model="certainty",
            messages=[*CHAT, {"role": "assistant", "content": "Sure"}],
            max_tokens=1,
            extra_body={"continue_final_message": True},
        ),
    ]
    for call in calls:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            call()
        assert error_of(caught.value)["code"] == "invocation_missing"
        assert invocation_text in caught.value.message
    # a plain LoRA needs none, and a chat with the generation prompt gets it in its place
    sdk.completions.create(model="rewrite", prompt="no invocation here", max_tokens=1)
    sdk.chat.completions.create(model="certainty", messages=CHAT, max_tokens=1)


def captured_requests() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CAPTURED.read_text().splitlines() if line.strip()]


def schema_of(body: dict[str, Any]) -> dict[str, Any] | None:
    if "structured_outputs" in body:
        return body["structured_outputs"]["json"]
    if "response_format" in body and body["response_format"]["type"] == "json_schema":
        return body["response_format"]["json_schema"]["schema"]
    return None


def test_captured_client_requests_are_accepted(openai_server: ServerProcess) -> None:
    """Mellea 0.8, granite-common and the openai SDK on the wire: each is accepted as sent (200), and
    a structured output that completes validates against the schema it asked for. Their models map
    onto this server: the base under ALIAS, `uncertainty` -> our `certainty`."""
    names = {"my-base": ALIAS, "uncertainty": "certainty"}
    seen = 0
    with httpx.Client(
        base_url=openai_server.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60
    ) as client:
        for captured in captured_requests():
            if captured["method"] == "GET":
                response = client.get(captured["path"])
                assert response.status_code == 200 and response.json()["version"]
                continue
            body = dict(captured["body"])
            body["model"] = names.get(body["model"], body["model"])
            kwargs = body.get("chat_template_kwargs")
            if kwargs and kwargs.get("adapter_name") in names:
                body["chat_template_kwargs"] = {**kwargs, "adapter_name": names[kwargs["adapter_name"]]}
            response = client.post(captured["path"], json=body)
            assert response.status_code == 200, (captured, response.text)
            result = response.json()
            schema = schema_of(body)
            for choice in result["choices"] if schema is not None else []:
                if choice["finish_reason"] == "stop":
                    text = choice["message"]["content"] if "message" in choice else choice["text"]
                    jsonschema.validate(json.loads(text), schema)
            assert result["choices"] and result["usage"]["prompt_tokens"] > 0
            if body.get("logprobs"):
                content = result["choices"][0]["logprobs"]["content"]
                assert all(len(c["top_logprobs"]) == body["top_logprobs"] for c in content)
            seen += 1
    assert seen == 6
