"""io.yaml loading: every shipped and reference file loads (and granite-common accepts it); a
malformed one is refused with an error naming the file and the field, and stops the service."""

from pathlib import Path

import pytest
import yaml
from granite_common import IntrinsicsResultProcessor, IntrinsicsRewriter

from alora_core.errors import AdapterLoadError
from alora_core.fixtures import IO_CONFIGS, DemoPaths
from service.intrinsics.config import IO_CONFIG_FILE, load_io_config
from tests.service.conftest import ServerProcess

DATA = Path(__file__).parent / "data"
REFERENCE = sorted(DATA.glob("*.yaml"))


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.stem)
def test_reference_io_yaml_loads_as_granite_common_reads_it(path: Path, tmp_path: Path) -> None:
    (tmp_path / IO_CONFIG_FILE).write_text(path.read_text())
    io = load_io_config(tmp_path)
    assert io is not None
    raw = yaml.safe_load(path.read_text())
    assert io.config.needs_logprobs == any(t["type"] == "likelihood" for t in raw["transformations"] or ())
    IntrinsicsRewriter(config_file=path)
    IntrinsicsResultProcessor(config_file=path)


def test_demo_adapters_ship_io_yaml(demo: DemoPaths) -> None:
    for name, path in demo.adapters.items():
        io = load_io_config(path)
        assert io is not None and io.text == IO_CONFIGS[name]
        IntrinsicsRewriter(config_file=path / IO_CONFIG_FILE)  # granite-common reads it too
    uncertainty = load_io_config(demo.adapters["uncertainty"])
    assert uncertainty is not None
    assert [t.type for t in uncertainty.config.transformations or ()] == ["likelihood", "nest"]


GOOD = (DATA / "uncertainty.yaml").read_text()

MALFORMED = [
    ("model: ~\nresponse_format: ~\n", "transformations", "missing"),
    (GOOD + "bogus: 1\n", "bogus", "Extra inputs"),
    (GOOD.replace('{"type": "integer"', '{"type": integer'), "response_format", "not JSON"),
    (GOOD.replace('"type": "integer"', '"type": "integr"'), "response_format", "not a JSON schema"),
    (GOOD.replace("type: nest", "type: nestle"), "transformations.1.type", "unknown transformation"),
    (GOOD.replace('    field_name: "certainty"\n', ""), "transformations.1", "field_name"),
    (GOOD.replace("max_completion_tokens: 2", "frequency_penalty: 2"), "parameters", "frequency_penalty"),
    (
        GOOD.replace("sentence_boundaries: ~", "sentence_boundaries: {middle: x}"),
        "sentence_boundaries.middle.[key]",
        "last_message",
    ),
    (GOOD + "docs_as_message: xml\n", "docs_as_message", ""),
    (GOOD.replace("input_path: []", "input_path: 3", 1), "transformations.0.input_path", ""),
]


@pytest.mark.parametrize(("text", "field", "reason"), MALFORMED)
def test_malformed_io_yaml_names_file_and_field(tmp_path: Path, text: str, field: str, reason: str) -> None:
    (tmp_path / IO_CONFIG_FILE).write_text(text)
    with pytest.raises(AdapterLoadError) as info:
        load_io_config(tmp_path)
    message = str(info.value)
    assert str(tmp_path / IO_CONFIG_FILE) in message
    assert f"field `{field}`" in message
    assert reason in message


def test_unreadable_yaml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / IO_CONFIG_FILE).write_text("model: [unclosed\n")
    with pytest.raises(AdapterLoadError, match="not readable YAML"):
        load_io_config(tmp_path)


def test_malformed_io_yaml_stops_the_service(demo: DemoPaths, tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    bad = adapters / "uncertainty"
    bad.mkdir(parents=True)
    for item in demo.adapters["uncertainty"].iterdir():
        (bad / item.name).write_bytes(item.read_bytes())
    (bad / IO_CONFIG_FILE).write_text(GOOD.replace("type: nest", "type: nestle"))
    server = ServerProcess(["--model", str(demo.model), "--adapters-dir", str(adapters)], tmp_path / "log")
    with pytest.raises(RuntimeError, match="server exited") as info:
        server.start()
    assert f"{bad / IO_CONFIG_FILE}: field `transformations.1.type`" in str(info.value)
