"""Fixtures for the service tests: the tiny demo model (built once), a real `alora-serve` process on a
free loopback port, HTTP clients per tenant, and the PEFT oracle every output is checked against."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from alora_core.fixtures import DemoPaths, write_demo
from tests.alora_core.conftest import PeftOracle

KEY_A = "key-tenant-a"
KEY_B = "key-tenant-b"
KEY_C = "key-tenant-c"  # the HTTP API page's replay (tests/service/test_readme.py)
MAX_MODEL_LEN = 512
MAX_REQUEST_BYTES = 64 * 1024
STARTUP_TIMEOUT_S = 180.0
# An intrinsic request that asks for free text: compared with PEFT's unconstrained greedy output
# (the demo adapters' io.yaml schemas would otherwise constrain it).
FREE_TEXT = {"type": "text"}


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without ALORA_* settings, offline, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALORA_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(extra or {})}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVE = [sys.executable, "-m", "service.cli"]  # this checkout's service, in the test's interpreter


@dataclass
class ServerProcess:
    """`COMMAND ARGS` (default `python -m service.cli ARGS`) on 127.0.0.1:<free port>, its output in
    a log file."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    command: list[str] = field(default_factory=lambda: list(SERVE))
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        env = server_env(self.env)
        cmd = [*self.command, "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding the demo where the offline default looks for it (ALORA_CACHE_DIR)."""
    return tmp_path_factory.mktemp("alora-cache")


@pytest.fixture(scope="session")
def demo(demo_cache: Path) -> DemoPaths:
    return write_demo(demo_cache / "demo", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def oracle(demo: DemoPaths) -> PeftOracle:
    return PeftOracle(demo)


def server_args(demo: DemoPaths) -> list[str]:
    """The shared server's flags: three tenants (API keys), small request and model-length limits."""
    return [
        "--model",
        str(demo.model),
        "--adapters-dir",
        str(demo.root / "adapters"),
        "--api-key",
        KEY_A,
        "--api-key",
        KEY_B,
        "--api-key",
        KEY_C,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--kv-cache-bytes",
        "64MiB",
    ]


@pytest.fixture(scope="session")
def server(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server (its KV index sees every test's requests)."""
    proc = ServerProcess(server_args(demo), tmp_path_factory.mktemp("logs") / "server.log").start()
    yield proc
    proc.stop()


def tenant_client(server: ServerProcess, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60.0)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    """Tenant A."""
    with tenant_client(server, KEY_A) as c:
        yield c


@pytest.fixture
def client_b(server: ServerProcess) -> Iterator[httpx.Client]:
    with tenant_client(server, KEY_B) as c:
        yield c


@pytest.fixture
def anonymous(server: ServerProcess) -> Iterator[httpx.Client]:
    with tenant_client(server, None) as c:
        yield c


def chat_ids(oracle: PeftOracle, messages: list[dict[str, str]], generation_prompt: bool = True) -> list[int]:
    """What the server makes of `messages`: the chat template, then tokens without added specials."""
    text = oracle.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert isinstance(text, str)
    return list(oracle.tokenizer.encode(text, add_special_tokens=False))


def invocation_ids(client: httpx.Client, name: str) -> list[int]:
    adapters = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    return list(adapters[name]["invocation_tokens"] or [])
