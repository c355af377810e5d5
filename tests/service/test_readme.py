"""The README's quickstart responses are what the offline demo really returns: replay each curl call
of that section against the test server (same demo model) and compare, timings aside."""

import json
import re
import shlex
from pathlib import Path
from typing import Any

import httpx

README = Path(__file__).resolve().parents[2] / "README.md"
TIMINGS = {"ttft_s", "total_s"}


def quickstart_calls() -> list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]]:
    """(method, path, body, expected response) of every `$ curl` in the Quickstart section."""
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    calls = []
    for block in re.findall(r"```console\n(.*?)```", section, flags=re.S):
        for command, expected in re.findall(r"^\$ (curl .*)\n(.*)$", block, flags=re.M):
            args = shlex.split(command)
            url = next(a for a in args if a.startswith("localhost:8000"))
            body = json.loads(args[args.index("-d") + 1]) if "-d" in args else None
            calls.append(
                (
                    "POST" if body is not None else "GET",
                    url.removeprefix("localhost:8000"),
                    body,
                    json.loads(expected),
                )
            )
    return calls


def without_timings(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in TIMINGS}


def test_quickstart_responses_are_real(client: httpx.Client) -> None:
    calls = quickstart_calls()
    assert len(calls) >= 4  # a conversation and two intrinsics at least
    for method, path, body, expected in calls:
        response = client.request(method, path, json=body)
        assert response.status_code == 200, (path, response.text)
        assert without_timings(response.json()) == without_timings(expected), path


def front_page_calls() -> list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]]:
    return quickstart_calls()
