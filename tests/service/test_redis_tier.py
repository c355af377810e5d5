"""The Redis cache tier behind the HTTP API, against a real redis-server: a second server process
resumes a conversation the first one created; /ready stays 200 and says "degraded" while Redis is
down, requests still succeed, and Redis is used again when it returns, without a restart."""

import time
from pathlib import Path

import httpx
import pytest

from alora_core.fixtures import DemoPaths
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.redis_server import RedisServer, redis_binary
from tests.service.conftest import FREE_TEXT, KEY_A, ServerProcess, free_port, invocation_ids

pytestmark = pytest.mark.redis


def serve(demo: DemoPaths, redis_url: str, log: Path) -> ServerProcess:
    """Caches live in Redis only (device budget 0, no host tier): every turn writes, every request reads."""
    args = ["--model", str(demo.model), "--adapters-dir", str(demo.root / "adapters"), "--api-key", KEY_A]
    args += ["--kv-cache-bytes", "64MiB", "--device-cache-bytes", "0", "--host-cache-bytes", "0"]
    args += ["--redis-url", redis_url, "--max-model-len", "512"]
    return ServerProcess(args, log).start()


def client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120)


def generate(http: httpx.Client, input_ids: list[int], n: int) -> dict:
    body = {"conversation_id": "chat", "input_ids": input_ids, "max_tokens": n, "ignore_eos": True}
    response = http.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_ready(http: httpx.Client, cache: str) -> None:
    deadline = time.monotonic() + 30
    while (ready := http.get("/ready")).json().get("cache") != cache:
        assert ready.status_code == 200
        if time.monotonic() > deadline:
            pytest.fail(f"/ready never reported cache {cache!r}: {ready.json()}")
        time.sleep(0.1)


def test_a_second_server_resumes_the_conversation(
    demo: DemoPaths, oracle: PeftOracle, redis_server: RedisServer, tmp_path: Path
) -> None:
    history = random_ids(150, seed=60)
    first = serve(demo, redis_server.url, tmp_path / "first.log")
    try:
        turn1 = generate(client(first), history, 4)
    finally:
        first.stop()  # the engine finishes its Redis writes on shutdown

    second = serve(demo, redis_server.url, tmp_path / "second.log")
    try:
        http = client(second)
        info = http.get("/conversations/chat").json()
        assert info["cache_location"] == "redis" and info["cached_tokens"] == len(history) + 3
        turn = history + turn1["token_ids"] + random_ids(10, seed=61)
        turn2 = generate(http, turn, 6)
        assert turn2["usage"]["cached_tokens"] == len(history) + 3
        assert turn2["token_ids"] == oracle.generate(None, turn, 6)[0]  # equals a fresh recompute

        intrinsic = http.post(
            "/intrinsic/certainty",
            json={"conversation_id": "chat", "max_tokens": 5, "response_format": FREE_TEXT},
        )
        assert intrinsic.status_code == 200, intrinsic.text
        context = turn + turn2["token_ids"] + invocation_ids(http, "certainty")
        assert intrinsic.json()["token_ids"] == oracle.generate("certainty", context, 5)[0]
        assert intrinsic.json()["usage"]["cached_tokens"] == len(turn) + 5
    finally:
        second.stop()


def test_ready_reports_redis_down_and_requests_still_succeed(
    demo: DemoPaths, oracle: PeftOracle, tmp_path: Path
) -> None:
    redis_server = RedisServer(redis_binary(), free_port())  # down when the server starts
    server = serve(demo, redis_server.url, tmp_path / "server.log")
    try:
        http = client(server)
        history = random_ids(60, seed=62)
        turn1 = generate(http, history, 4)  # served, by recompute
        assert turn1["token_ids"] == oracle.generate(None, history, 4)[0]
        wait_ready(http, "degraded")
        assert http.get("/ready").status_code == 200
        assert "alora_redis_degraded 1.0" in http.get("/metrics").text

        redis_server.start()
        wait_ready(http, "ok")  # no restart
        turn = history + turn1["token_ids"] + random_ids(5, seed=63)
        turn2 = generate(http, turn, 4)
        assert turn2["token_ids"] == oracle.generate(None, turn, 4)[0]
        deadline = time.monotonic() + 30
        while not redis_server.client().keys("alora:*"):  # the conversation was written behind
            assert time.monotonic() < deadline, "nothing was written to Redis after it came back"
            time.sleep(0.1)
    finally:
        server.stop()
        redis_server.kill()
