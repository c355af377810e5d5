"""Fixtures of the OpenAI-compatible API tests: one server per package (a copy of the demo model whose
chat template also renders `documents`, a `greeting` template variable, assistant `tool_calls`, and
`adapter_name` were it ever to reach it; served under two names), the real `openai` SDK per tenant,
and the copy's tokenizer."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alora_core.fixtures import DemoPaths
from tests.service.conftest import KEY_A, KEY_B, ServerProcess

SERVED = "granite-test"  # the base model's first served name
ALIAS = "ibm-granite/granite-4.0-micro"  # a second one (what Mellea's captured requests send)
MAX_MODEL_LEN = 256
MAX_REQUEST_BYTES = 64 * 1024
CHAT_TEMPLATE = (
    "{%- if documents -%}<|start_of_role|>documents<|end_of_role|>"
    "{%- for d in documents -%}{{ d['text'] }}\n{%- endfor -%}<|end_of_text|>\n{%- endif -%}"
    "{%- if greeting is defined -%}<|start_of_role|>system<|end_of_role|>{{ greeting }}<|end_of_text|>\n"
    "{%- endif -%}"
    "{%- if adapter_name is defined -%}ADAPTER {{ adapter_name }}{%- endif -%}"
    "{%- for message in messages -%}<|start_of_role|>{{ message['role'] }}<|end_of_role|>"
    "{{ message['content'] or '' }}{%- if message.tool_calls -%}{{ message.tool_calls | tojson }}{%- endif -%}"
    "{{ '<|end_of_text|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start_of_role|>assistant<|end_of_role|>{%- endif -%}"
)


@pytest.fixture(scope="package")
def model_dir(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model (same weights: the PEFT oracle applies) with the richer chat template."""
    target = tmp_path_factory.mktemp("openai-model") / "model"
    shutil.copytree(demo.model, target)
    (target / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return target


@pytest.fixture(scope="package")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="package")
def openai_server(
    model_dir: Path, demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    args = ["--model", str(model_dir), "--adapters-dir", str(demo.root / "adapters")]
    args += ["--served-model-name", SERVED, "--served-model-name", ALIAS]
    args += ["--api-key", KEY_A, "--api-key", KEY_B, "--max-model-len", str(MAX_MODEL_LEN)]
    args += ["--max-request-bytes", str(MAX_REQUEST_BYTES), "--kv-cache-bytes", "64MiB"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("openai-logs") / "server.log").start()
    yield proc
    proc.stop()


def sdk_client(server: ServerProcess, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "EMPTY", max_retries=0, timeout=120)


@pytest.fixture
def sdk(openai_server: ServerProcess) -> Iterator[openai.OpenAI]:
    """Tenant A through the real openai SDK (no retries: every status reaches the test)."""
    with sdk_client(openai_server, KEY_A) as client:
        yield client


@pytest.fixture
def sdk_b(openai_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with sdk_client(openai_server, KEY_B) as client:
        yield client


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = True, **kwargs: object
) -> list[int]:
    """What the server makes of a chat: the template, then tokens without added specials."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
    )
    assert isinstance(text, str)
    return list(tokenizer.encode(text, add_special_tokens=False))


def invocation(server: ServerProcess, name: str) -> list[int]:
    """An aLoRA's invocation token ids (native GET /adapters)."""
    adapters = httpx.get(f"{server.url}/adapters", headers={"Authorization": f"Bearer {KEY_A}"}).json()
    return list(next(a for a in adapters["adapters"] if a["name"] == name)["invocation_tokens"] or [])
