"""The `alora-serve` process: the offline default (no --model), a failed startup, and graceful
shutdown: on SIGTERM readiness turns 503 at once while a request is in flight, that request still
completes, then the process exits 0."""

import json
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from alora_core.fixtures import DemoPaths
from service.app import create_app
from service.settings import Settings, parse_settings
from tests.service.conftest import ServerProcess, server_env


@pytest.fixture
def offline_server(demo: DemoPaths, demo_cache: Path, tmp_path: Path) -> ServerProcess:
    """No --model, no key: the demo from ALORA_CACHE_DIR (already built there by the `demo` fixture)."""
    assert demo.root == demo_cache / "demo"
    return ServerProcess([], tmp_path / "server.log", env={"ALORA_CACHE_DIR": str(demo_cache)})


def send_partial_request(url: str, path: str, body: bytes, sent: int) -> socket.socket:
    """An HTTP request whose body is only partly sent: it stays in flight until the rest arrives."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + body[:sent])
    return sock


def wait_in_flight(url: str, count: int) -> None:
    """Until the server has started serving `count` requests (so a partial one is known to it)."""
    for _ in range(600):
        metrics = httpx.get(f"{url}/metrics").text
        line = next(m for m in metrics.splitlines() if m.startswith("alora_http_requests_in_flight "))
        if float(line.split()[1]) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the partial request never reached the app")


def read_response(sock: socket.socket) -> tuple[int, dict[str, object]]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload)


def test_sigterm_drains_in_flight_requests_then_exits_0(offline_server: ServerProcess) -> None:
    server = offline_server.start()
    try:
        log = server.log()
        assert "offline DEMO model" in log and "RANDOM" in log  # the demo says its weights are random
        assert "anonymous tenant" in log  # no keys: one anonymous tenant, said plainly
        assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
        adapters = httpx.get(f"{server.url}/adapters").json()["adapters"]  # no key needed without keys
        assert {a["name"] for a in adapters if a["alias_of"] is None} == {
            "answerability",
            "uncertainty",
            "query_rewrite",
        }

        body = json.dumps({"prompt": "the river and the city", "max_tokens": 8, "ignore_eos": True}).encode()
        sock = send_partial_request(server.url, "/generate", body, sent=10)
        wait_in_flight(server.url, 2)  # that request, and the /metrics call that sees it
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)

        # readiness is off at once, but the listener stays open while a request is in flight
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json() == {"status": "draining"}
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert server.proc.poll() is None

        # the in-flight request completes with a full answer
        sock.sendall(body[10:])
        status, payload = read_response(sock)
        sock.close()
        assert status == 200
        assert len(payload["token_ids"]) == 8  # type: ignore[arg-type]
        assert payload["finish_reason"] == "length"

        assert server.proc.wait(timeout=60) == 0
        log = server.log()
        assert "draining" in log and "drained" in log
    finally:
        server.stop()


def test_unusable_adapter_fails_startup_with_a_clear_message(demo: DemoPaths, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    cmd = [sys.executable, "-m", "service.cli", "--model", str(demo.model), "--adapter", f"broken={broken}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=server_env())
    assert done.returncode == 3
    assert "DoRA" in done.stderr and "Application startup failed" in done.stderr


def test_version_is_the_package_metadata(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`alora-serve --version`, the OpenAPI document and alora_build_info all say the installed
    package's version, read from its metadata (a stand-in version here, so a literal cannot pass;
    tests/ops/test_install.py checks the real script against pyproject in a fresh install)."""
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "7.7.7" if name == "alora-serve" else real(name))
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == "alora-serve 7.7.7\n"
    app = create_app(Settings())
    assert app.openapi()["info"]["version"] == "7.7.7"
    build_info = app.state.metrics.build.collect()[0].samples[0]
    assert build_info.labels["version"] == "7.7.7"
