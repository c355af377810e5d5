"""Whether the fused Triton kernels can run: asked only for CUDA devices, so CPU serving never imports
triton (a plain `pip install .` does not bring it; the test extra and PyPI's CUDA torch wheels do).
Asked once per process: on a CUDA machine without triton the LoRA layers and the attention take their
torch paths, and the log says so once, at start-up."""

import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def triton_imports() -> bool:
    try:
        import triton  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        log.warning(
            "triton is not importable (%s): on CUDA the LoRA deltas and the attention use the torch "
            "paths instead of the fused Triton kernels (slower); install triton (PyPI's CUDA torch "
            "wheels bring it)",
            exc,
        )
        return False
    return True
