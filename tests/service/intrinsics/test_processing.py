"""The native route's result processing (granite-common's IntrinsicsResultProcessor, run by
service.intrinsics.apply.process) against the two reference implementations on the same raw
responses: granite-common's own processor called as a client calls it, and Mellea 0.8's vendored
copy (mellea.formatters.granite). Raw responses: JSON outputs split one character per token, with
ten seeded-random alternatives per token (so every value starts on a token boundary, as the
likelihood rule requires)."""

import json
import math
import random
from pathlib import Path
from typing import Any

import granite_common
import mellea.formatters.granite as mellea_granite
import pytest

from service.intrinsics.apply import load_intrinsic_ios, process, rewrite
from service.intrinsics.config import IO_CONFIG_FILE

DATA = Path(__file__).parent / "data"
CHAT = [
    {"role": "user", "content": "Which of my pets have fleas? Tell me quickly."},
    {"role": "assistant", "content": "Rex has fleas. Tom does not. Both play outside."},
]
DOCUMENTS = [
    {"doc_id": "1", "text": "Rex is a dog. Rex has fleas since May."},
    {"doc_id": "2", "text": "Tom is a cat. Tom was treated for fleas."},
]
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"

# (io.yaml, documents, instruction args, raw output): covering likelihood, nest, explode,
# decode_sentences (last message and documents), project (list and rename map), drop_duplicates
CASES: list[tuple[str, list[dict[str, str]] | None, dict[str, str], str]] = [
    ("uncertainty", None, {}, "7"),
    ("requirement_check", None, {"requirement": "Name every pet."}, "true"),
    ("citations", DOCUMENTS, {}, '[{"r": 0, "c": [1, 0]}, {"r": 1, "c": [3]}]'),
    (
        "hallucination_detection",
        DOCUMENTS,
        {},
        '[{"r": 0, "e": "Doc 1 says so.", "f": "faithful"}, {"r": 2, "e": "No source.", "f": "partial"}]',
    ),
    ("dedupe", None, {}, '[{"k": "a", "v": [1, 2, 1], "x": 5}, {"k": "b", "v": [2], "x": 6}]'),
]


def char_logprobs(content: str, seed: int) -> list[dict[str, Any]]:
    """One token per character; the sampled one most likely, then nine random others."""
    rng = random.Random(seed)
    out = []
    for char in content:
        others = rng.sample([c for c in ALPHABET if c != char], 9)
        values = sorted((math.log(rng.uniform(0.001, 0.3)) for _ in others), reverse=True)
        top = [{"token": char, "logprob": math.log(0.6)}]
        top += [{"token": t, "logprob": v} for t, v in zip(others, values, strict=True)]
        out.append({"token": char, "logprob": top[0]["logprob"], "top_logprobs": top})
    return out


def close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, abs_tol=1e-6)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(close, a, b))
    return bool(a == b)


@pytest.mark.parametrize(("name", "documents", "args", "content"), CASES, ids=[c[0] for c in CASES])
def test_result_equals_granite_common_and_mellea(
    name: str, documents: list[dict[str, str]] | None, args: dict[str, str], content: str, tmp_path: Path
) -> None:
    source = DATA / f"{name}.yaml"
    (tmp_path / IO_CONFIG_FILE).write_text(source.read_text())
    iio = load_intrinsic_ios({name: tmp_path})[name]
    rewritten = rewrite(iio, [dict(m) for m in CHAT], documents, args)
    logprobs = char_logprobs(content, seed=len(content))
    result, error = process(iio, content, logprobs, rewritten)
    assert error is None, error

    request: dict[str, Any] = {"messages": CHAT}
    if documents is not None:
        request["extra_body"] = {"documents": documents}
    response = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": {"content": logprobs},
            }
        ]
    }
    for library in (granite_common, mellea_granite):
        their_request = library.IntrinsicsRewriter(config_file=source).transform(request, **args)
        assert their_request.model_dump() == rewritten.model_dump(), library.__name__  # same prompt edits
        processed = library.IntrinsicsResultProcessor(config_file=source).transform(response, their_request)
        expected = json.loads(processed.choices[0].message.content)
        if library is mellea_granite and name == "dedupe":
            # granite-common 0.4.1's drop_duplicates keeps a repeated exploded record; Mellea's copy
            # drops it. The server runs granite-common: the difference is pinned here, both ways.
            assert not close(result, expected)
            assert [dict(t) for t in {tuple(sorted(r.items())) for r in result["pairs"]}] != result["pairs"]  # type: ignore[index,call-overload]
            assert expected == {"pairs": [{"k": "a", "v": 1}, {"k": "a", "v": 2}, {"k": "b", "v": 2}]}
            continue
        assert close(result, expected), (library.__name__, result, expected)


def test_likelihood_is_the_probability_weighted_value(tmp_path: Path) -> None:
    """uncertainty: sum over the digit alternatives of softmax-renormalised p * value, nested."""
    (tmp_path / IO_CONFIG_FILE).write_text((DATA / "uncertainty.yaml").read_text())
    iio = load_intrinsic_ios({"uncertainty": tmp_path})["uncertainty"]
    top = [("7", 0.5), ("3", 0.3), ("x", 0.2)]
    logprobs = [
        {
            "token": "7",
            "logprob": math.log(0.5),
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top],
        }
    ]
    result, error = process(iio, "7", logprobs, None)
    assert error is None
    expected = (0.5 * 0.75 + 0.3 * 0.35) / (0.5 + 0.3)  # "x" is no category: left out
    assert math.isclose(result["certainty"], expected, abs_tol=1e-6)  # type: ignore[index,call-overload]


def test_unfit_output_gives_null_and_the_reason(tmp_path: Path) -> None:
    (tmp_path / IO_CONFIG_FILE).write_text((DATA / "uncertainty.yaml").read_text())
    iio = load_intrinsic_ios({"uncertainty": tmp_path})["uncertainty"]
    result, error = process(iio, "seven", char_logprobs("seven", 0), None)
    assert result is None
    assert error is not None and "does not fit the adapter's io.yaml" in error
