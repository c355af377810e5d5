"""`stream: true`: SSE token chunks, then the final body, then `data: [DONE]`; same tokens and text
as the same request without streaming."""

import json
from typing import Any

import httpx

from service.streaming import IncrementalText
from tests.alora_core.conftest import PeftOracle

PROMPT = "Explain the memory of the model and the data of the request."


def read_events(client: httpx.Client, body: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    """The response and its SSE data payloads in order (JSON decoded; '[DONE]' kept as a string)."""
    events: list[Any] = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            return response, events
        buffer = ""
        for text in response.iter_text():
            buffer += text
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                assert event.startswith("data: "), event
                data = event[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
        assert buffer == ""
    return response, events


def check_stream_matches(events: list[Any], plain: dict[str, Any]) -> None:
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["type"] == "final"
    tokens = events[:-2]
    assert tokens and all(e["type"] == "token" for e in tokens)
    assert all(e["conversation_id"] == final["conversation_id"] for e in tokens)
    assert [t for e in tokens for t in e["token_ids"]] == final["token_ids"]
    assert "".join(e["text"] for e in tokens) == final["text"]
    for field in ("token_ids", "text", "finish_reason"):
        assert final[field] == plain[field], field
    assert final["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert final["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_stream_matches_non_streaming(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True}
    plain = client.post("/generate", json={**body, "conversation_id": "plain-1"}).json()
    response, events = read_events(client, {**body, "conversation_id": "stream-1"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    check_stream_matches(events, plain)
    assert plain["finish_reason"] == "length" and len(plain["token_ids"]) == 12
    # the streamed turn was committed like a plain one
    info = client.get("/conversations/stream-1").json()
    assert info["num_tokens"] == plain["usage"]["prompt_tokens"] + 12


def test_stream_with_stop_string_matches_non_streaming(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True}
    full = client.post("/generate", json=body).json()["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters from the middle of the output
    assert len(stop.strip()) > 0
    body["stop"] = [stop]
    plain = client.post("/generate", json=body).json()
    assert plain["finish_reason"] == "stop"
    assert plain["text"] == full[: full.find(stop)]
    _, events = read_events(client, body)
    check_stream_matches(events, plain)


def test_stream_error_before_first_token_is_a_plain_http_error(client: httpx.Client) -> None:
    response, events = read_events(client, {"input_ids": [5] * 600, "max_tokens": 2})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "context_too_long"
    assert events == []


def test_stream_continues_a_conversation(client: httpx.Client, oracle: PeftOracle) -> None:
    first = client.post(
        "/generate", json={"conversation_id": "stream-2", "prompt": PROMPT, "max_tokens": 4}
    ).json()
    history = list(oracle.tokenizer.encode(PROMPT)) + first["token_ids"]
    _, events = read_events(client, {"conversation_id": "stream-2", "input_ids": history, "max_tokens": 5})
    final = events[-2]
    assert final["usage"]["cached_tokens"] == len(history) - 1
    assert final["token_ids"] == oracle.generate(None, history, 5)[0]


def test_incremental_text_holds_back_partial_characters_and_stop_prefixes(oracle: PeftOracle) -> None:
    tokenizer = oracle.tokenizer
    text = "héllo wörld, the river"
    ids = tokenizer.encode(text, add_special_tokens=False)
    plain = IncrementalText(tokenizer, [])
    assert "".join(plain.add([t]) for t in ids) == text  # one token at a time, no � half characters
    stopping = IncrementalText(tokenizer, ["the river"])
    deltas = "".join(stopping.add([t]) for t in ids)
    assert deltas == "héllo wörld, "  # nothing of the stop string was released
