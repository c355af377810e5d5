"""Batching at the HTTP layer: fan-out (POST /intrinsics), 429 with Retry-After, client disconnects."""

import threading
import time
from pathlib import Path

import httpx
import pytest

from alora_core.fixtures import DemoPaths
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.service.conftest import FREE_TEXT, ServerProcess


def invocation(client: httpx.Client, name: str) -> list[int]:
    adapters = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    return list(adapters[name]["invocation_tokens"] or [])


def test_fan_out_equals_single_intrinsics_and_peft(client: httpx.Client, oracle: PeftOracle) -> None:
    history = random_ids(60, seed=900)
    turn = client.post("/generate", json={"conversation_id": "fan", "input_ids": history, "max_tokens": 3})
    assert turn.status_code == 200
    full = history + turn.json()["token_ids"]
    items = ["certainty", {"name": "answerability", "max_tokens": 3}, "rewrite", "certainty"]

    fan = client.post(
        "/intrinsics",
        json={"conversation_id": "fan", "intrinsics": items, "max_tokens": 5, "response_format": FREE_TEXT},
    )

    assert fan.status_code == 200, fan.text
    results = fan.json()["results"]
    assert [r["name"] for r in results] == ["certainty", "answerability", "rewrite", "certainty"]
    for item, result in zip(items, results, strict=True):
        name = item if isinstance(item, str) else item["name"]
        max_tokens = 5 if isinstance(item, str) else item["max_tokens"]
        single = client.post(
            f"/intrinsic/{name}",
            json={"conversation_id": "fan", "max_tokens": max_tokens, "response_format": FREE_TEXT},
        )
        assert single.json()["token_ids"] == result["token_ids"]
        context = full + invocation(client, name) if name != "rewrite" else full
        expected, _ = oracle.generate(name, context, max_tokens)
        assert result["token_ids"] == expected
    assert results[0]["usage"]["cached_tokens"] == len(full) - 1  # the aLoRAs reused the cached prefix
    assert results[2]["usage"]["cached_tokens"] == 0  # the plain LoRA recomputed
    conv = client.get("/conversations/fan").json()
    assert conv["num_tokens"] == len(full)  # unchanged by the fan-out


def test_fan_out_with_an_unknown_adapter_is_404_before_any_work(client: httpx.Client) -> None:
    client.post("/generate", json={"conversation_id": "fan404", "input_ids": [5, 6, 7], "max_tokens": 1})
    response = client.post(
        "/intrinsics", json={"conversation_id": "fan404", "intrinsics": ["certainty", "nope"]}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_adapter"


@pytest.mark.parametrize(
    "body",
    [
        {"conversation_id": "x", "intrinsics": []},
        {"conversation_id": "x", "intrinsics": ["certainty"] * 17},
        {"conversation_id": "x", "intrinsics": [{"name": "certainty", "bogus": 1}]},
        {"conversation_id": "x", "intrinsics": [{"max_tokens": 2}]},
        {"intrinsics": ["certainty"]},
    ],
)
def test_bad_fan_out_bodies_are_400(client: httpx.Client, body: dict) -> None:
    response = client.post("/intrinsics", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.fixture
def small_queue_server(demo: DemoPaths, tmp_path: Path) -> ServerProcess:
    args = ["--model", str(demo.model), "--adapters-dir", str(demo.root / "adapters")]
    args += ["--max-num-seqs", "1", "--max-waiting", "1", "--kv-cache-bytes", "16MiB"]
    proc = ServerProcess(args, tmp_path / "server.log").start()
    yield proc
    proc.stop()


def test_full_queue_is_429_with_retry_after_and_a_disconnect_cancels_the_turn(
    small_queue_server: ServerProcess,
) -> None:
    url = small_queue_server.url
    with httpx.Client(base_url=url, timeout=60) as client:
        assert (
            client.post(
                "/generate", json={"conversation_id": "c", "input_ids": [5, 6, 7], "max_tokens": 2}
            ).status_code
            == 200
        )
        before = client.get("/conversations/c").json()["num_tokens"]

        # a long streaming turn occupies the only running slot; the client drops it after one event
        first_event = threading.Event()
        hang_up = threading.Event()

        def long_turn() -> None:
            body = {
                "conversation_id": "c",
                "input_ids": [5, 6, 7, 8],
                "max_tokens": 4000,
                "ignore_eos": True,
                "stream": True,
            }
            with (
                httpx.Client(base_url=url, timeout=60) as own,
                own.stream("POST", "/generate", json=body) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        first_event.set()
                        hang_up.wait(60)
                        return  # closing the stream closes the connection

        streamer = threading.Thread(target=long_turn)
        streamer.start()
        assert first_event.wait(60)
        queued = threading.Thread(
            target=client.post,
            args=("/generate",),
            kwargs={"json": {"input_ids": random_ids(8, seed=910), "max_tokens": 1}},
        )
        queued.start()  # takes the one waiting place behind the running turn
        time.sleep(1.0)  # (ordering only: its submission takes milliseconds)
        refused = client.post(
            "/generate", json={"input_ids": random_ids(8, seed=911), "max_tokens": 1}, timeout=10
        )
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["Retry-After"]) >= 1

        hang_up.set()
        streamer.join(60)
        queued.join(60)
        # the dropped turn was cancelled: the conversation is free again within a step (its 4000
        # tokens would take far longer than this timeout) and it never committed
        assert client.delete("/conversations/c", timeout=5).status_code == 204
        assert (
            client.post(
                "/generate", json={"conversation_id": "c", "input_ids": [5, 6, 7], "max_tokens": 2}
            ).status_code
            == 200
        )
        assert client.get("/conversations/c").json()["num_tokens"] == before
        ok = client.post(
            "/generate", json={"conversation_id": "c", "input_ids": [5, 6, 7, 8], "max_tokens": 2}
        )
        assert ok.status_code == 200
        assert ok.json()["usage"]["cached_tokens"] == 3  # the cache of the committed history is intact
