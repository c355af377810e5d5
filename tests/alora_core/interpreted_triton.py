"""The Triton kernels in the mode the tests need, imported once for every Triton test module: on CUDA
compiled, elsewhere under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before the kernel
modules are first imported; it is restored afterwards so nothing else sees it). Without triton the
importing module is skipped, except under CI, which installs the test extra and must run them."""

import os

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:
    if os.environ.get("CI") == "true":
        raise ImportError(
            "CI needs triton for these tests: pip install -c constraints/cpu.txt -e '.[test]'"
        ) from exc
    pytest.skip("triton is not installed (pip install -e '.[test]')", allow_module_level=True)

_previous = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from alora_core.lora import triton_ops
    from alora_core.model import paged_attention_triton as pa
finally:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous
if torch.cuda.is_available() == pa.INTERPRET or triton_ops._INTERPRET != pa.INTERPRET:
    raise RuntimeError("the Triton kernels were imported before this module chose the Triton mode")

__all__ = ["pa", "triton_ops"]
