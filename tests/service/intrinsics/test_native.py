"""The native /intrinsic with io.yaml, on a running server: the prompt it builds equals what
granite-common's IntrinsicsRewriter makes of the same request, rendered by the model's chat
template; io.yaml parameters are sampling defaults; discovery shows each io.yaml; the
alora-adapter-index CLI writes the directory Mellea reads."""

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from granite_common import IntrinsicsRewriter
from mellea.backends.adapters.adapter import EmbeddedIntrinsicAdapter

from alora_core.fixtures import ALIASES_FILE, DemoPaths
from service.intrinsics.config import IO_CONFIG_FILE
from tests.alora_core.conftest import PeftOracle
from tests.service.conftest import ServerProcess
from tests.service.intrinsics.test_processing import CHAT, DOCUMENTS

DATA = Path(__file__).parent / "data"
EXTRA = {"citations": "answerability", "requirement_check": "uncertainty"}  # io.yaml -> weights reused


@pytest.fixture(scope="module")
def adapters_dir(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's adapters, plus two with reference io.yaml files (instruction, sentence boundaries)."""
    root = tmp_path_factory.mktemp("io-adapters")
    shutil.copytree(demo.root / "adapters", root, dirs_exist_ok=True)
    for name, weights in EXTRA.items():
        shutil.copytree(demo.adapters[weights], root / name)
        (root / name / IO_CONFIG_FILE).write_text((DATA / f"{name}.yaml").read_text())
    return root


@pytest.fixture(scope="module")
def io_server(demo: DemoPaths, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = ["--model", str(demo.model), "--adapters-dir", str(adapters_dir), "--kv-cache-bytes", "64MiB"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("logs") / "io.log").start()
    yield proc.url
    proc.stop()


def expected_prompt(
    oracle: PeftOracle, io_yaml: Path, kind: str, invocation: list[int], request: dict[str, Any], **args: str
) -> list[int]:
    """granite-common's rewrite, rendered as /v1/chat/completions renders it (independently here)."""
    rewritten = IntrinsicsRewriter(config_file=io_yaml).transform(request, **args)
    messages = [m.model_dump(exclude_none=True) for m in rewritten.messages]
    docs = rewritten.extra_body.documents if rewritten.extra_body else None
    text = oracle.tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=kind == "lora",
        documents=[d.model_dump(exclude_none=True) for d in docs] if docs else None,
    )
    ids = list(oracle.tokenizer.encode(text, add_special_tokens=False))
    return ids + invocation if kind == "alora" else ids


@pytest.mark.parametrize(
    ("name", "documents", "args"),
    [
        ("uncertainty", None, {}),
        ("answerability", DOCUMENTS, {}),
        ("query_rewrite", None, {}),
        ("citations", DOCUMENTS, {}),  # instruction turn + sentence markers in the last turn and documents
        ("requirement_check", None, {"requirement": "Name every pet."}),  # instruction with an argument
    ],
)
def test_native_prompt_equals_granite_common_rewrite(
    io_server: str,
    adapters_dir: Path,
    oracle: PeftOracle,
    name: str,
    documents: list[dict[str, str]] | None,
    args: dict[str, str],
) -> None:
    adapter = next(a for a in httpx.get(f"{io_server}/adapters").json()["adapters"] if a["name"] == name)
    body: dict[str, Any] = {"messages": CHAT, "return_prompt_token_ids": True, "logprobs": True}
    if documents is not None:
        body["documents"] = documents
    if args:
        body["instruction_args"] = args
    response = httpx.post(f"{io_server}/intrinsic/{name}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    out = response.json()
    request: dict[str, Any] = {"messages": CHAT}
    if documents is not None:
        request["extra_body"] = {"documents": documents}
    io_yaml = adapters_dir / name / IO_CONFIG_FILE
    invocation = adapter["invocation_tokens"] or []
    assert out["prompt_token_ids"] == expected_prompt(
        oracle, io_yaml, adapter["kind"], invocation, request, **args
    )
    config = yaml.safe_load(io_yaml.read_text())
    limit = config["parameters"]["max_completion_tokens"]  # the io.yaml's default, as no max_tokens was sent
    assert 1 <= out["usage"]["completion_tokens"] <= limit
    needs = any(t["type"] == "likelihood" for t in config["transformations"] or ())
    assert all(len(e["top_logprobs"]) == (10 if needs else 0) for e in out["logprobs"])
    assert len(out["logprobs"]) == out["usage"]["completion_tokens"]
    assert (out["result"] is None) == (out["result_error"] is not None)


def test_rewriter_inputs_need_messages(io_server: str) -> None:
    response = httpx.post(f"{io_server}/intrinsic/citations", json={"prompt": "Rex has fleas."})
    assert response.status_code == 400
    assert "give the input as `messages`" in response.json()["error"]["message"]
    missing = httpx.post(f"{io_server}/intrinsic/requirement_check", json={"messages": CHAT})
    assert missing.status_code == 400
    assert "requirement" in missing.json()["error"]["message"]


def test_discovery_shows_io_yaml_and_aliases(io_server: str, adapters_dir: Path) -> None:
    adapters = {a["name"]: a for a in httpx.get(f"{io_server}/adapters").json()["adapters"]}
    assert adapters["citations"]["io"]["transformations"] == [
        "explode",
        "decode_sentences",
        "decode_sentences",
        "project",
    ]
    assert adapters["citations"]["io_yaml"] == (adapters_dir / "citations" / IO_CONFIG_FILE).read_text()
    assert adapters["certainty"]["alias_of"] == "uncertainty"
    models = {m["id"]: m for m in httpx.get(f"{io_server}/v1/models").json()["data"]}
    assert models["uncertainty"]["io"]["response_format"] == {"type": "integer", "enum": list(range(10))}
    assert models["uncertainty"]["io"]["needs_logprobs"] is True
    assert models["certainty"]["alias_of"] == "uncertainty"
    aliases = (adapters_dir / ALIASES_FILE).read_text()
    assert '"certainty": "uncertainty"' in aliases


def test_adapter_index_cli_writes_what_mellea_reads(
    io_server: str, adapters_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mellea-adapters"
    done = subprocess.run(
        [sys.executable, "-m", "service.intrinsics.index", io_server, str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    loaded = {a.intrinsic_name: a for a in EmbeddedIntrinsicAdapter.from_model_directory(out)}
    assert {"uncertainty", "answerability", "query_rewrite", "citations", "certainty"} <= set(loaded)
    assert loaded["uncertainty"].technology == "alora"
    assert loaded["query_rewrite"].technology == "lora"
    for name in ("uncertainty", "citations"):
        written = (out / "io_configs" / name / IO_CONFIG_FILE).read_text()
        assert written == (adapters_dir / name / IO_CONFIG_FILE).read_text()
