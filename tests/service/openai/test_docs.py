"""docs/openai.md's Python example runs as written against a server (its URL, key and base model
name swapped for the test server's)."""

import re
from pathlib import Path

from tests.service.conftest import KEY_A, ServerProcess
from tests.service.openai.conftest import SERVED

DOC = Path(__file__).resolve().parents[3] / "docs" / "openai.md"


def test_the_quick_start_example_runs(openai_server: ServerProcess, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    code = blocks[0].replace("http://localhost:8000/v1", f"{openai_server.url}/v1")
    code = code.replace('api_key="EMPTY"', f'api_key="{KEY_A}"').replace('"alora-demo"', f'"{SERVED}"')
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert namespace["certainty"].choices[0].logprobs.content[0].top_logprobs
    assert namespace["completion"].choices[0].model_extra["token_ids"]
    assert "certainty" in capsys.readouterr().out
