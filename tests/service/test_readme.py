"""The documented demo responses are what the offline demo really returns: replay each curl call of
the README's Quickstart, of docs/index.md (the walkthrough) and of docs/api.md (its JSON calls, errors
included) against the test server (same demo model) and compare, timings aside. tests/ops/test_install.py replays the README's calls against
freshly installed packages too."""

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from alora_core.fixtures import DemoPaths
from tests.service.conftest import KEY_A, KEY_B, KEY_C, ServerProcess, server_args, tenant_client

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = {"ttft_s", "total_s"}
Call = tuple[str, str, str | None, dict[str, Any]]
NOT_PLAIN = {"-X", "-i", "-o", "-w", "-N", "-sN", "|", ";"}  # streams, status codes, headers, pipes


def documented_calls(path: Path, section: str | None = None) -> list[Call]:
    """(method, path, raw body, expected response) of every plain `$ curl` call (one JSON response
    line) in a page's console blocks (of the `## section` only, when given)."""
    text = path.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    calls = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        for command, expected in re.findall(r"^\$ (curl .*)\n(.*)$", block, flags=re.M):
            args = shlex.split(command)
            if any(a in NOT_PLAIN or a.endswith(";") for a in args) or not expected.startswith("{"):
                continue
            url = next(a for a in args if a.startswith("localhost:8000"))
            body = args[args.index("-d") + 1] if "-d" in args else None
            calls.append(
                (
                    "POST" if body is not None else "GET",
                    url.removeprefix("localhost:8000"),
                    body,
                    json.loads(expected),
                )
            )
    return calls


def front_page_calls() -> list[Call]:
    """The README's one example: a first turn and an intrinsic on it."""
    return documented_calls(ROOT / "README.md", "Quickstart")


def without_timings(body: Any) -> Any:
    """The body without its timings, at any depth (a fan-out's results carry their own)."""
    if isinstance(body, dict):
        return {k: without_timings(v) for k, v in body.items() if k not in TIMINGS}
    if isinstance(body, list):
        return [without_timings(v) for v in body]
    return body


def as_documented(expected: dict[str, Any]) -> dict[str, Any]:
    """What a response must equal: the documented body, timings aside, its floats (an intrinsic's
    probability-weighted result, from logprobs) within float32 rounding, since the same KV computed
    in another step shape or with another thread count may differ in its last bits."""
    return dict(approx_floats(without_timings(expected)))


def approx_floats(value: Any) -> Any:
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-5, abs=1e-7)
    if isinstance(value, dict):
        return {k: approx_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [approx_floats(v) for v in value]
    return value


@pytest.fixture(scope="module")
def fresh_server(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A fresh server, as after `make serve`: the shared one's KV index holds other tests' prefixes
    (the same chat prompt among them), so a first turn there is no longer uncached."""
    server = ServerProcess(server_args(demo), tmp_path_factory.mktemp("readme") / "server.log").start()
    yield server
    server.stop()


@pytest.fixture
def client(fresh_server: ServerProcess) -> Iterator[httpx.Client]:
    with tenant_client(fresh_server, KEY_A) as c:
        yield c


@pytest.fixture
def client_b(fresh_server: ServerProcess) -> Iterator[httpx.Client]:
    with tenant_client(fresh_server, KEY_B) as c:
        yield c


def replay(client: httpx.Client, calls: list[Call]) -> None:
    """Each call as curl sends it (the body as written, malformed or not); a documented error must come
    back as a 4xx with that body, everything else as a 200."""
    for method, path, body, expected in calls:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        response = client.request(method, path, content=body, headers=headers)
        if "error" in expected:
            assert 400 <= response.status_code < 500, (path, response.text)
        else:
            assert response.status_code == 200, (path, response.text)
        assert without_timings(response.json()) == as_documented(expected), path


def test_readme_example_responses_are_real(client: httpx.Client) -> None:
    calls = front_page_calls()
    assert [path for _, path, _, _ in calls] == ["/generate", "/intrinsic/uncertainty"]
    replay(client, calls)


def test_getting_started_responses_are_real(client_b: httpx.Client) -> None:
    """Another tenant than the README's: the same conversation id is its own conversation there."""
    calls = documented_calls(ROOT / "docs" / "index.md")
    assert len(calls) >= 5  # a conversation, two intrinsics, the next turn, its state
    assert front_page_calls() == calls[:2]  # the README shows the walkthrough's beginning
    replay(client_b, calls)


@pytest.fixture
def client_c(fresh_server: ServerProcess) -> Iterator[httpx.Client]:
    with tenant_client(fresh_server, KEY_C) as c:
        yield c


def test_api_page_responses_are_real(client_c: httpx.Client) -> None:
    """docs/api.md continues the walkthrough's conversation (demo-1): its tenant replays both pages."""
    calls = documented_calls(ROOT / "docs" / "api.md")
    assert len(calls) >= 10  # the intrinsic, fan-out and adapters calls, and the JSON errors
    assert any("error" in expected for *_, expected in calls)
    replay(client_c, documented_calls(ROOT / "docs" / "index.md") + calls)
