"""Settings: one field = one flag = one ALORA_* variable; the offline default; adapter discovery."""

import os
import re
from pathlib import Path

import pytest

from alora_core.errors import AdapterLoadError
from alora_core.fixtures import DemoPaths
from service.loading import resolve_sources
from service.settings import Settings, env_var, flag, parse_settings

CONFIGURATION_DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ALORA_"):
            monkeypatch.delenv(name)


def test_flags() -> None:
    s = parse_settings(
        [
            "--model", "/models/granite",
            "--adapter", "certainty=/a/certainty",
            "--adapter", "rewrite=/a/rewrite",
            "--api-key", "k1",
            "--api-key", "k2",
            "--max-model-len", "8192",
            "--kv-cache-bytes", "512MiB",
            "--max-request-bytes", "1MB",
            "--dtype", "bfloat16",
        ]
    )  # fmt: skip
    assert s.model == "/models/granite"
    assert s.adapter == {"certainty": Path("/a/certainty"), "rewrite": Path("/a/rewrite")}
    assert s.api_keys() == ["k1", "k2"]
    assert s.max_model_len == 8192
    assert int(s.kv_cache_bytes) == 512 << 20
    assert int(s.max_request_bytes) == 1_000_000
    assert s.dtype == "bfloat16"
    assert "k1" not in repr(s)  # keys never end up in a log line


def test_env_vars_and_flag_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nfile-key-1\n\nfile-key-2  # ops team\n")
    monkeypatch.setenv("ALORA_ADAPTER", "a=/x,b=/y")
    monkeypatch.setenv("ALORA_API_KEY", "e1,e2")
    monkeypatch.setenv("ALORA_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("ALORA_PORT", "9001")
    monkeypatch.setenv("ALORA_HOST", "0.0.0.0")
    s = parse_settings(["--port", "9002"])
    assert s.adapter == {"a": Path("/x"), "b": Path("/y")}
    assert s.api_keys() == ["e1", "e2", "file-key-1", "file-key-2"]
    assert s.port == 9002  # the flag wins
    assert s.host == "0.0.0.0"


@pytest.mark.parametrize(
    "argv",
    [["--port", "http"], ["--adapter", "no-equals-sign"], ["--dtype", "float8"], ["--max-model-len", "1"]],
)
def test_bad_values_exit_2_with_the_flag_named(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_offline_default_serves_the_demo_with_its_adapters(demo: DemoPaths, demo_cache: Path) -> None:
    sources = resolve_sources(Settings(cache_dir=demo_cache))
    assert sources.demo
    assert sources.model == str(demo.model)
    assert sources.adapters == demo.adapters


def test_adapter_flag_and_adapters_dir_combine_and_conflicts_fail(demo: DemoPaths, tmp_path: Path) -> None:
    extra = Settings(model=str(demo.model), adapters_dir=demo.root / "adapters", adapter={"extra": tmp_path})
    assert set(resolve_sources(extra).adapters) == {"uncertainty", "answerability", "query_rewrite", "extra"}
    clash = Settings(
        model=str(demo.model), adapters_dir=demo.root / "adapters", adapter={"certainty": tmp_path}
    )
    with pytest.raises(AdapterLoadError, match="given twice"):
        resolve_sources(clash)


def test_documented_configuration_table_lists_every_setting() -> None:
    """Each row of docs/configuration.md: | `--flag` | `ALORA_VAR` | default | meaning |, one per
    Settings field."""
    section = CONFIGURATION_DOC.read_text()
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `(ALORA_[A-Z_]+)` \|", section, flags=re.M)
    assert rows == [(flag(name), env_var(name)) for name in Settings.model_fields]


def test_trust_remote_code_is_a_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_settings([]).trust_remote_code is False
    assert parse_settings(["--trust-remote-code"]).trust_remote_code is True
    monkeypatch.setenv("ALORA_TRUST_REMOTE_CODE", "true")
    assert parse_settings([]).trust_remote_code is True
