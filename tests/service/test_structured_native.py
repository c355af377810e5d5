"""`response_format` on the native /generate, /intrinsic and /intrinsics endpoints (running server,
random demo model): outputs validate against their constraint, bad constraints are 400s and the
server stays exact."""

import json
import re
import uuid

import httpx
import jsonschema
import pytest

from service.schemas import GenerateResponse, Usage

SCHEMA = {
    "type": "object",
    "properties": {
        "certainty": {"type": "number"},
        "labels": {"type": "array", "items": {"enum": ["a", "b"]}},
    },
    "required": ["certainty", "labels"],
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}}


def test_generate_and_intrinsics_follow_response_format(client: httpx.Client) -> None:
    cid = f"structured-{uuid.uuid4().hex}"
    for seed in range(4):
        body = {"prompt": "the river", "max_tokens": 120, "temperature": 1.0, "seed": seed}
        r = client.post("/generate", json={**body, "response_format": JSON_SCHEMA})
        assert r.status_code == 200, r.text
        assert r.json()["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r.json()["text"]), SCHEMA)
    client.post(
        "/generate", json={"conversation_id": cid, "prompt": "the river", "max_tokens": 3}
    ).raise_for_status()
    for name, fmt, check in [
        ("certainty", {"type": "regex", "regex": "0\\.[0-9]{1,3}"}, lambda t: re.fullmatch(r"0\.[0-9]{1,3}", t)),
        ("rewrite", JSON_SCHEMA, lambda t: jsonschema.validate(json.loads(t), SCHEMA) or True),
        ("answerability", {"type": "choice", "choice": ["answerable", "unanswerable"]}, lambda t: t in ("answerable", "unanswerable")),
        ("certainty", {"type": "grammar", "grammar": 'start: "low" | "high"'}, lambda t: t in ("low", "high")),
    ]:  # fmt: skip
        r = client.post(
            f"/intrinsic/{name}", json={"conversation_id": cid, "max_tokens": 60, "response_format": fmt}
        )
        assert r.status_code == 200, r.text
        assert r.json()["finish_reason"] == "stop" and check(r.json()["text"]), r.json()
    fan = client.post(
        "/intrinsics",
        json={"conversation_id": cid, "intrinsics": [{"name": "certainty", "max_tokens": 60, "response_format": JSON_SCHEMA}]},
    )  # fmt: skip
    assert fan.status_code == 200, fan.text  # a fan-out item's own sampling fields hold its format
    jsonschema.validate(json.loads(fan.json()["results"][0]["text"]), SCHEMA)


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema", "json_schema": {"schema": {"type": "strange"}}},
        {"type": "json_schema"},
        {"type": "regex", "regex": "(unclosed"},
        {"type": "grammar", "grammar": "start: nothing_defined"},
        {"type": "choice", "choice": []},
        {"type": "regex", "regex": "a" * 40000},
        {"type": "xml"},
    ],
)
def test_bad_response_formats_are_400_and_the_server_stays_exact(client: httpx.Client, fmt: dict) -> None:
    body = {"prompt": "the river", "max_tokens": 6}
    before = client.post("/generate", json=body).json()["token_ids"]
    r = client.post("/generate", json={**body, "response_format": fmt})
    assert r.status_code == 400, r.text
    assert client.post("/generate", json=body).json()["token_ids"] == before


def test_a_dead_end_result_serializes_with_its_error_field() -> None:
    """Native routes cannot reach a dead end (no min_tokens there), but an engine result that has one
    must still serialize: finish_reason "error" and the reason, `error` absent otherwise."""
    usage = Usage(prompt_tokens=1, completion_tokens=1, cached_tokens=0)
    common = {
        "conversation_id": "c",
        "text": "x",
        "token_ids": [5],
        "usage": usage,
        "ttft_s": 0.0,
        "total_s": 0.0,
    }
    dead = json.loads(
        GenerateResponse(**common, finish_reason="error", error="no token allowed").model_dump_json()
    )
    assert dead["finish_reason"] == "error" and dead["error"] == "no token allowed"
    assert "error" not in json.loads(GenerateResponse(**common, finish_reason="stop").model_dump_json())
