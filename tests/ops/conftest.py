"""Fixtures of the operations tests: one real `alora-serve` (the offline demo, an API key, a small KV
pool) shared by the metrics, dashboard and load tests, and a scrape of its /metrics.

Test-only tools (helm-python-sdk, kubernetes-validate, locust, ...) come with `pip install -e .[test]`;
a missing one skips its tests locally and fails them under CI (CI=true)."""

import importlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.alora_core.redis_server import RedisServer
from tests.service.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "ops-test-key-7f3a"
MAX_REQUEST_BYTES = 64 * 1024
KV_CACHE_BYTES = 2 << 20  # 256 blocks of 16 tokens with the tiny demo model


def require(module: str) -> ModuleType:
    """Import a test-only tool: skip without it locally, fail without it in CI."""
    require_installed(module)
    return importlib.import_module(module)


def require_installed(module: str) -> None:
    """Check that a tool is installed without importing it (locust monkey-patches the process it is
    imported in: it runs in a subprocess)."""
    if importlib.util.find_spec(module) is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{module} is missing in CI: install the test extra (pip install -e '.[test]')")
    pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class Scrape:
    """One /metrics text, parsed: sample name -> samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, list[Sample]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples.setdefault(s.name, []).append(Sample(s.name, dict(s.labels), s.value))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(
            s.value
            for s in self.samples.get(name, [])
            if all(s.labels.get(k) == v for k, v in labels.items())
        )


def start_ops_server(tmp_path_factory: pytest.TempPathFactory, redis_url: str | None = None) -> ServerProcess:
    """The offline demo (no --model), built into a fresh ALORA_CACHE_DIR, with one API key."""
    cache = tmp_path_factory.mktemp("ops-cache")
    args = [
        "--api-key",
        API_KEY,
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--kv-cache-bytes",
        str(KV_CACHE_BYTES),
    ]
    if redis_url is not None:
        args += ["--redis-url", redis_url]
    log = tmp_path_factory.mktemp("ops-logs") / "server.log"
    return ServerProcess(args, log, env={"ALORA_CACHE_DIR": str(cache)}).start()


@pytest.fixture(scope="session")
def ops_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server the metrics and load tests share (and send traffic to)."""
    proc = start_ops_server(tmp_path_factory)
    yield proc
    proc.stop()


@pytest.fixture
def fresh_ops_server(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[ServerProcess]:
    """A server of its own that has served nothing yet (what a dashboard sees right after a deploy),
    with a Redis tier (the dashboards' Redis panels: errors by kind, latency per node)."""
    proc = start_ops_server(tmp_path_factory, redis_server.url)
    yield proc
    proc.stop()


def ops_client_of(server: ServerProcess) -> httpx.Client:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60.0)


@pytest.fixture
def ops_client(ops_server: ServerProcess) -> Iterator[httpx.Client]:
    with ops_client_of(ops_server) as client:
        yield client


def scrape(client: httpx.Client) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    return Scrape(response.text)
