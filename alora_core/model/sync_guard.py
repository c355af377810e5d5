"""Host syncs in the device part of a step: found on CPU by a guard, refused on CUDA by torch itself.

A CUDA graph replays device work only: a step that reads a device value on the host (`.item()`,
`.tolist()`, `.cpu()`, `nonzero`, a boolean-mask index, `torch.equal`, `if tensor:`) stalls the host
on the GPU every step and cannot be captured at all. The graph-safe path (the paged Triton attention
with StepBuffers, the fused LoRA wrappers, the device sampler) must do none of these.

    with SyncGuard() as guard:          # any device
        forward(...)                    # the device part of a step
    guard.calls -> [(name, where), ...] # every offending call, with the line of ours that made it

On CPU every tensor lives on the host, so nothing really syncs; the guard counts the calls that *would*
sync on a GPU, by name (a TorchFunctionMode sees every torch function and Tensor method). Triton's
interpreter (the kernels on CPU in tests) moves tensors to numpy on purpose: calls made from inside
triton's own frames are a kernel launch on a GPU, not a sync, and are not counted. On CUDA,
`SyncGuard(cuda=True)` also sets `torch.cuda.set_sync_debug_mode("error")`, so a real sync raises.
"""

import os
import sys
import traceback
from types import TracebackType

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and torch functions whose result a host must wait for (vLLM's and SGLang's list)
SYNCING = frozenset(
    {
        "item",
        "tolist",
        "cpu",
        "numpy",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "equal",
        "allclose",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
    }
)
# made from Python or numpy data (or moved up from the host, "upload"): inside a captured forward, the
# capture's values replayed
HOST_DATA = frozenset({"tensor", "as_tensor", "from_numpy"})
_TRITON_DIR = os.sep + "triton" + os.sep


class SyncGuard(TorchFunctionMode):
    """Records every call that reads device data on the host; on CUDA, turns real syncs into errors."""

    def __init__(self, cuda: bool = False) -> None:
        super().__init__()
        self.cuda = cuda
        self.calls: list[tuple[str, str]] = []
        self._previous_mode: int | str = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        kind = self._kind(name, args, kwargs)
        if kind is not None and not _inside_triton():
            self.calls.append((kind, _our_caller()))
        return func(*args, **kwargs)

    @staticmethod
    def _kind(name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> str | None:
        """The name a call is recorded under, or None: a sync by its name, host data entering the step
        as "tensor" / "as_tensor" / "from_numpy" / "upload" (not a sync, but a graph would replay the
        capture's values: fine after the graph, in the sampler; not inside the forward)."""
        if name in SYNCING or name in HOST_DATA:
            return name
        if name == "to" and args and isinstance(args[0], torch.Tensor):  # a move between devices
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if not isinstance(target, (str, torch.device)):
                return None
            source, dest = args[0].device.type, torch.device(target).type
            if source != "cpu" and dest == "cpu":
                return "to(cpu)"
            return "upload" if source == "cpu" and dest != "cpu" else None
        if name in ("__getitem__", "__setitem__") and len(args) > 1:  # boolean-mask indexing
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                return "boolean mask"
        if name == "repeat_interleave" and "output_size" not in kwargs:  # its output size is data-dependent
            return name
        return None

    def __enter__(self) -> "SyncGuard":
        if self.cuda:
            self._previous_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(kind, error, tb)
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._previous_mode)

    def report(self) -> str:
        return "\n".join(f"{name} at {where}" for name, where in self.calls)


def _inside_triton() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if _TRITON_DIR in frame.f_code.co_filename:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _our_caller() -> str:
    """The innermost frame outside torch and this module: the line that asked for the sync."""
    for entry in reversed(traceback.extract_stack()[:-1]):
        if os.sep + "torch" + os.sep not in entry.filename and entry.filename != __file__:
            return f"{entry.filename}:{entry.lineno} ({entry.name})"
    return "?"
