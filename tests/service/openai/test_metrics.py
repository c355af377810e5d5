"""The OpenAI routes in /metrics: the `endpoint` label has `chat` and `completion`, series exist from
start-up, and an n-choice request counts its prompt once."""

import re

import httpx
import openai
import pytest

from tests.service.conftest import ServerProcess
from tests.service.openai.conftest import SERVED


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the series `name{labels...}` (labels in any order), 0 if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.rindex("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()) and len(found) == len(labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def scrape(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics").text


def test_chat_and_completion_endpoints_are_labelled(sdk: openai.OpenAI, openai_server: ServerProcess) -> None:
    before = scrape(openai_server)
    assert (
        'alora_request_success_total{adapter="uncertainty",endpoint="chat",finished_reason="length"}'
        in before
    )
    assert 'alora_prompt_tokens_total{adapter="base",endpoint="completion"}' in before
    chat = sdk.chat.completions.create(
        model="certainty",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        n=2,
        extra_body={"ignore_eos": True},
    )
    sdk.completions.create(model=SERVED, prompt=[5, 6, 7], max_tokens=2, extra_body={"ignore_eos": True})
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="nope", prompt="x", max_tokens=1)
    after = scrape(openai_server)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert (
        grew("alora_request_success_total", endpoint="chat", adapter="uncertainty", finished_reason="length")
        == 2
    )
    assert (
        grew("alora_prompt_tokens_total", endpoint="chat", adapter="uncertainty") == chat.usage.prompt_tokens
    )
    assert grew("alora_generation_tokens_total", endpoint="chat", adapter="uncertainty") == 6
    assert (
        grew("alora_request_success_total", endpoint="completion", adapter="base", finished_reason="length")
        == 1
    )
    assert (
        grew("alora_request_rejected_total", endpoint="completion", status="404", reason="model_not_found")
        == 1
    )
