"""429 and 503 through the openai SDK, and a streaming error after the first chunk (an error chunk,
then [DONE]: the SDK raises while iterating). The server runs in this process (uvicorn on a thread,
real TCP) so the test can stop its engine mid-request."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvicorn

from alora_core import Engine
from alora_core.fixtures import DemoPaths
from service.app import create_app
from service.settings import Settings
from tests.alora_core.conftest import random_ids
from tests.service.conftest import free_port


class InProcessServer:
    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        deadline = time.monotonic() + 180
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def engine(self) -> Engine:
        engine: Engine = self.app.state.service.engine
        return engine

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="EMPTY", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def one_slot(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """One running sequence and one waiting place: the third concurrent request is refused."""
    settings = Settings(
        model=str(demo.model),
        adapters_dir=demo.root / "adapters",
        port=free_port(),
        max_num_seqs=1,
        max_waiting=1,
        kv_cache_bytes="16MiB",
        cache_dir=Path(tmp_path_factory.mktemp("cache")),
    )
    with InProcessServer(settings) as server:
        yield server


def long_stream(client: openai.OpenAI) -> openai.Stream:
    return client.completions.create(
        model="model",
        prompt=random_ids(8, seed=1801),
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )


def test_full_queue_is_429_rate_limit_error(one_slot: InProcessServer) -> None:
    client = one_slot.sdk()
    stream = long_stream(client)  # holds the one running slot
    next(iter(stream))
    queued = threading.Thread(
        target=client.completions.create, kwargs={"model": "model", "prompt": [5, 6, 7], "max_tokens": 1}
    )
    queued.start()  # takes the one waiting place
    deadline = time.monotonic() + 30
    while one_slot.engine.scheduler.num_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="model", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert caught.value.status_code == 429
    assert caught.value.body["code"] == "overloaded" and "param" in caught.value.body
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    stream.close()  # the client goes away: the engine request is cancelled, the queue drains
    queued.join(60)
    assert not queued.is_alive()


def test_a_client_that_goes_away_cancels_its_request(one_slot: InProcessServer) -> None:
    client = openai.OpenAI(base_url=f"{one_slot.url}/v1", api_key="EMPTY", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):  # 3000 tokens take far longer than a second
        client.completions.create(
            model="model",
            prompt=random_ids(8, seed=1802),
            max_tokens=3000,
            n=2,
            extra_body={"ignore_eos": True},
        )
    deadline = time.monotonic() + 20
    while one_slot.engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not one_slot.engine.scheduler.running  # both choices stopped within a few steps


def test_error_after_the_first_chunk_then_503(one_slot: InProcessServer) -> None:
    """Runs last in this module: it stops the engine."""
    client = one_slot.sdk()
    stream = long_stream(client)
    chunks = iter(stream)
    assert next(chunks).choices[0].text is not None
    one_slot.engine.scheduler.stop()  # the running request fails with 503 after its first chunk
    with pytest.raises(openai.APIError) as caught:
        for _ in chunks:
            pass
    assert "shut down" in caught.value.message
    assert caught.value.body["code"] == "kv_cache_exhausted"  # 503's code: retry on another replica
    with pytest.raises(openai.InternalServerError) as refused:  # the SDK's class for 5xx
        client.completions.create(model="model", prompt=[5, 6, 7], max_tokens=1)
    assert refused.value.status_code == 503
