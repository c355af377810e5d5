"""The CPU kernels of `csrc/`, compiled on first use with the machine's C compiler and loaded with ctypes.

    source + flags + compiler version + CPU flags --sha256--> cache/<hash>.so   (compiled once, reused)

`-march=native` targets the CPU the server runs on, and the OpenMP calls bind to the libgomp torch has
already loaded (same soname), so the kernels run on torch's intra-op threads. A machine without a C
compiler (a slim image), a failed or timed-out compile (COMPILE_TIMEOUT_S) or ALORA_CPU_KERNELS=0 means
no kernels: the engine serves with the eager torch path, after one warning. The compile takes ~1 s on the
2-core CI VM; `load()` reports how long it took (logged at start-up).
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = (  # + rms_norm, silu_mul (fused_cpu.py), bind_threads (alora_core/threads.py)
    Path(__file__).parent / "csrc" / "paged_attention_cpu.c",
    Path(__file__).parent / "csrc" / "masked_lora_cpu.c",  # the LoRA delta (lora/ops.py)
)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")
COMPILE_TIMEOUT_S = 120.0
ENV_SWITCH = "ALORA_CPU_KERNELS"  # "0": never compile or load the kernels
ENV_CACHE = "ALORA_KERNEL_CACHE"  # where compiled kernels are kept (default ~/.cache/alora-serve/kernels)


class PagedArgs(ctypes.Structure):
    """Mirror of `PagedArgs` in csrc/paged_attention_cpu.c (field for field)."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("q_stride_t", ctypes.c_int64),
        ("q_stride_h", ctypes.c_int64),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("kv_stride_h", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("window", ctypes.c_int64),
        ("sinks", ctypes.c_void_p),
        ("num_items", ctypes.c_int64),
        ("items", ctypes.c_void_p),
        ("num_rows", ctypes.c_int64),
        ("row_q", ctypes.c_void_p),
        ("row_pos", ctypes.c_void_p),
        ("part_ptr", ctypes.c_void_p),
        ("part_idx", ctypes.c_void_p),
        ("part_acc", ctypes.c_void_p),
        ("part_ml", ctypes.c_void_p),
        ("threads", ctypes.c_int64),
        ("kv_bf16", ctypes.c_int64),
    ]


class LoraArgs(ctypes.Structure):
    """Mirror of `LoraArgs` in csrc/masked_lora_cpu.c (field for field)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("x_stride", ctypes.c_int64),
        ("y", ctypes.c_void_p),
        ("y_stride", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("index", ctypes.c_void_p),
        ("num_slots", ctypes.c_int64),
        ("a_t", ctypes.POINTER(ctypes.c_void_p)),
        ("b_t", ctypes.POINTER(ctypes.c_void_p)),
        ("rank", ctypes.POINTER(ctypes.c_int64)),
        ("scale", ctypes.POINTER(ctypes.c_float)),
        ("threads", ctypes.c_int64),
        ("bf16", ctypes.c_int64),
    ]


MASKED_LORA_MAX_RANK = 256  # as in csrc/masked_lora_cpu.c


@dataclass(frozen=True)
class CpuKernels:
    """The loaded kernel library."""

    library: ctypes.CDLL
    path: Path
    compile_s: float  # 0.0 when it came from the cache

    def paged_attention(self, args: PagedArgs) -> None:
        if self.library.paged_attention(ctypes.byref(args)):
            raise MemoryError("paged_attention: scratch allocation failed")

    def masked_lora(self, args: LoraArgs) -> None:
        self.library.masked_lora(ctypes.byref(args))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D] (float32, unit stride in D, rows at a fixed stride) -> RMS-normalized x * weight."""
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        x2 = x.reshape(rows, dim)
        out = torch.empty(rows, dim)
        c = ctypes.c_void_p
        self.library.rms_norm(
            c(x2.data_ptr()),
            x2.stride(0),
            c(weight.data_ptr()),
            c(out.data_ptr()),
            rows,
            dim,
            eps,
            _threads(),
        )
        return out.view(x.shape)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for [..., D] float32 views (unit stride in D): one pass, no temporaries."""
        rows, dim = gate.numel() // gate.shape[-1], gate.shape[-1]
        g2, u2 = gate.reshape(rows, dim), up.reshape(rows, dim)
        out = torch.empty(rows, dim)
        c = ctypes.c_void_p
        self.library.silu_mul(
            c(g2.data_ptr()),
            g2.stride(0),
            c(u2.data_ptr()),
            u2.stride(0),
            c(out.data_ptr()),
            rows,
            dim,
            _threads(),
        )
        return out.view(gate.shape)

    def bind_threads(self, cpus: tuple[int, ...]) -> None:
        """Pin the calling thread's OpenMP team (as many threads as `cpus`), thread i to cpus[i]."""
        array = (ctypes.c_int64 * len(cpus))(*cpus)
        if self.library.bind_threads(array, len(cpus)):
            raise OSError(f"could not pin OpenMP threads to CPUs {list(cpus)}")


@functools.cache
def load() -> CpuKernels | None:
    """The kernels, compiled if needed; None (after one warning) where they cannot be had."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("CPU kernels off (%s=0): the eager torch attention path serves", ENV_SWITCH)
        return None
    compiler = find_compiler()
    if compiler is None:
        log.warning(
            "no C compiler found (set CC, or install gcc): CPU kernels unavailable, the eager torch "
            "attention path serves (slower decode; see docs/cpu-performance.md)"
        )
        return None
    try:
        return _build(compiler)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels could not be built with %s (%s): the eager torch path serves", compiler, e)
        return None


def find_compiler() -> str | None:
    """$CC if it names an executable, else the first of cc, gcc, clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _build(compiler: str) -> CpuKernels:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    key = hashlib.sha256()
    for source in SOURCES:
        key.update(source.read_bytes())
    key.update(" ".join(FLAGS).encode() + version.encode() + _cpu_flags().encode())
    cache = _cache_dir()
    target = cache / f"alora_cpu_{key.hexdigest()[:16]}.so"
    compile_s = 0.0
    if not target.exists():
        t0 = time.perf_counter()
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            subprocess.run(
                [compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES), "-lm"],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
                check=True,
            )
            partial.replace(target)  # atomic: a concurrent process sees the old state or the whole file
        except subprocess.CalledProcessError as e:
            raise OSError(f"compile failed: {e.stderr.strip()[-400:]}") from e
        finally:
            partial.unlink(missing_ok=True)
        compile_s = time.perf_counter() - t0
    log.info("CPU kernels: %s (%s)", target.name, f"compiled in {compile_s:.1f} s" if compile_s else "cached")
    return load_library(target, compile_s)


def load_library(path: Path, compile_s: float = 0.0) -> CpuKernels:
    """The compiled kernels at `path`, their C signatures declared."""
    library = ctypes.CDLL(str(path))
    library.paged_attention.argtypes = [ctypes.POINTER(PagedArgs)]
    library.paged_attention.restype = ctypes.c_int
    library.bind_threads.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    library.bind_threads.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.masked_lora.argtypes = [ctypes.POINTER(LoraArgs)]
    library.masked_lora.restype = None
    library.rms_norm.argtypes = [ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, i64]
    library.rms_norm.restype = None
    library.silu_mul.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64]
    library.silu_mul.restype = None
    return CpuKernels(library, path, compile_s)


def _cache_dir() -> Path:
    configured = os.environ.get(ENV_CACHE)
    base = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = base if configured else base / "alora-serve" / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / "alora-serve-kernels"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: the build targets this CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _threads() -> int:
    return torch.get_num_threads()
