"""IBM's intrinsic clients, unchanged, against a running server on the offline demo (random weights:
constrained decoding is what makes every output valid): the openai SDK with structured outputs and
top_logprobs 10, granite-common's rewriter -> SDK -> processor, and Mellea 0.8's OpenAIBackend with
adapter_source = the directory alora-adapter-index writes. Each result is checked for a value in
its declared range, and the native /intrinsic's `result` against both processors."""

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import granite_common
import httpx
import jsonschema
import mellea.formatters.granite as mellea_granite
import openai
import pytest
from mellea.backends.openai import OpenAIBackend
from mellea.stdlib.components import Document, Message
from mellea.stdlib.components.intrinsic import core, rag
from mellea.stdlib.context import ChatContext

from alora_core.fixtures import DemoPaths
from service.intrinsics.config import IO_CONFIG_FILE
from tests.service.conftest import ServerProcess

SERVED = "alora-demo"
QUESTION = "Which of my pets have fleas?"
ANSWER = "Rex has fleas."
CHAT = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
DOCS = [{"text": "Rex is a dog. Rex has fleas since May.", "doc_id": "1"}]


@pytest.fixture(scope="module")
def demo_server(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = [
        "--model",
        str(demo.model),
        "--adapters-dir",
        str(demo.root / "adapters"),
        "--served-model-name",
        SERVED,
    ]
    proc = ServerProcess(args, tmp_path_factory.mktemp("logs") / "clients.log").start()
    yield proc.url
    proc.stop()


@pytest.fixture(scope="module")
def sdk(demo_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server}/v1", api_key="EMPTY", max_retries=0)


def io_yaml(demo: DemoPaths, name: str) -> Path:
    return demo.adapters[name] / IO_CONFIG_FILE


def schema_of(demo: DemoPaths, name: str) -> Any:
    return granite_common.IntrinsicsRewriter(config_file=io_yaml(demo, name)).config["response_format"]


@pytest.mark.parametrize("name", ["uncertainty", "answerability", "query_rewrite"])
def test_openai_sdk_structured_outputs_with_top_logprobs(
    sdk: openai.OpenAI, demo: DemoPaths, name: str
) -> None:
    schema = schema_of(demo, name)
    by_extension = sdk.chat.completions.create(
        model=name,
        messages=CHAT,  # type: ignore[arg-type]
        max_completion_tokens=64,
        temperature=0,
        logprobs=True,
        top_logprobs=10,
        extra_body={"structured_outputs": {"json": schema}, "documents": DOCS},
    )
    by_openai = sdk.chat.completions.create(
        model=SERVED,
        messages=CHAT,  # type: ignore[arg-type]
        max_completion_tokens=64,
        temperature=0,
        logprobs=True,
        top_logprobs=10,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
        extra_body={"chat_template_kwargs": {"adapter_name": name}},
    )
    for response in (by_extension, by_openai):
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(e.top_logprobs) == 10 for e in choice.logprobs.content)


@pytest.mark.parametrize(("name", "key"), [("uncertainty", "certainty"), ("answerability", "answerability")])
def test_granite_common_rewriter_sdk_processor(
    sdk: openai.OpenAI, demo: DemoPaths, name: str, key: str
) -> None:
    rewriter = granite_common.IntrinsicsRewriter(config_file=io_yaml(demo, name), model_name=name)
    processor = granite_common.IntrinsicsResultProcessor(config_file=io_yaml(demo, name))
    request = {"messages": CHAT, "extra_body": {"documents": DOCS}}
    rewritten = rewriter.transform(request)
    response = sdk.chat.completions.create(**rewritten.model_dump(exclude_none=True))
    result = json.loads(processor.transform(response.model_dump(), rewritten).choices[0].message.content)
    assert 0.0 <= result[key] <= 1.0


def test_mellea_check_certainty_and_answerability(demo_server: str, tmp_path: Path) -> None:
    index = tmp_path / "adapters"
    cli = [sys.executable, "-m", "service.intrinsics.index", demo_server, str(index)]
    assert subprocess.run(cli, capture_output=True, text=True).returncode == 0
    backend = OpenAIBackend(
        model_id=SERVED, base_url=f"{demo_server}/v1", api_key="EMPTY", adapter_source=str(index)
    )
    context = ChatContext().add(Message("user", QUESTION)).add(Message("assistant", ANSWER))
    certainty = core.check_certainty(context, backend)
    assert 0.0 <= certainty <= 1.0
    answerable = rag.check_answerability(QUESTION, [Document(DOCS[0]["text"])], ChatContext(), backend)
    assert 0.0 <= float(answerable) <= 1.0


@pytest.mark.parametrize("name", ["uncertainty", "answerability", "query_rewrite"])
def test_native_result_is_valid_and_equals_both_processors(
    demo_server: str, demo: DemoPaths, name: str
) -> None:
    body = {"messages": CHAT, "documents": DOCS, "logprobs": True}
    out = httpx.post(f"{demo_server}/intrinsic/{name}", json=body, timeout=120).json()
    assert out["result_error"] is None, out
    jsonschema.validate(json.loads(out["text"]), schema_of(demo, name))
    if name == "uncertainty":
        assert 0.0 <= out["result"]["certainty"] <= 1.0
    elif name == "answerability":
        assert 0.0 <= out["result"]["answerability"] <= 1.0
    else:
        assert isinstance(out["result"]["rewritten_question"], str)
    request = {"messages": CHAT, "extra_body": {"documents": DOCS}}
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": out["text"]},
        "logprobs": {"content": out["logprobs"]},
    }
    for library in (granite_common, mellea_granite):
        rewritten = library.IntrinsicsRewriter(config_file=io_yaml(demo, name)).transform(request)
        processed = library.IntrinsicsResultProcessor(config_file=io_yaml(demo, name)).transform(
            {"choices": [choice]}, rewritten
        )
        expected = json.loads(processed.choices[0].message.content)
        for key, value in expected.items():
            got = out["result"][key]
            assert math.isclose(got, value, abs_tol=1e-6) if isinstance(value, float) else got == value
