"""The thread policy of CPU serving: which threads compute, on how many cores, pinned or not.

    engine scheduler thread   every forward: torch's intra-op threads (one OpenMP team) = cpu_threads
    start-up work             calibration and the model probe, on short-lived threads (service:
                              the whole engine load) whose OpenMP teams end with them
    HTTP event loop, anyio    never run multi-threaded torch ops (host-tier copies use numpy); not
    workers, Redis I/O        pinned: they wake briefly (requests, token streaming, Redis round trips)
    threads                   and take a core from the team for that long
    inter-op pool             1 thread (nothing uses inter-op parallelism)

One team only, because libgomp gives every thread that runs a parallel region a team of its own, and
once the process has more OpenMP threads than cores it stops spin-waiting: every parallel region of the
forwards then pays a wake-up (measured on the 2-core CI VM: decode 12.4 -> 20.0 ms/token for as long as
a second team lived, see kvcache/host_tier.py).

cpu_threads (default): the CPUs the process may run on, its affinity mask capped by its cgroup CPU quota
(a container limited to 2 CPUs on a 64-core node must not start 64 threads; torch alone would).
cpu_bind (optional, "0-7" or "auto": the CPUs the process may use): the scheduler's OpenMP threads
pinned one per listed CPU, in order.
For pods with exclusive cores (Guaranteed QoS, integer CPUs, the kubelet's static CPU manager); on
shared cores pinning only removes the scheduler's freedom to move a thread off a busy core.
"""

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ThreadPolicy:
    intra_op: int  # torch / OpenMP threads of the forwards
    bind: tuple[int, ...] | None  # CPUs of those threads, in team order; None: not pinned


_policy: ThreadPolicy | None = None  # set by configure(); None: torch's own settings, no pinning
_prepared = threading.local()


def configure(threads: int | None = None, bind: str | None = None) -> ThreadPolicy:
    """Apply the policy to this process (call once, before the engine loads). threads: intra-op threads
    (None or 0: as many as a `bind` list names, else `available_cpus()`); bind: a CPU list ("0-3,8") or
    "auto" (the first of the process's allowed CPUs) to pin them to, None: not pinned."""
    global _policy
    cpus = None
    if bind == "auto":
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    elif bind:
        cpus = parse_cpu_list(bind)
    count = threads or (len(cpus) if cpus and bind != "auto" else available_cpus())
    if cpus is not None and len(cpus) < count:
        raise ValueError(f"cpu_bind {bind!r} lists {len(cpus)} CPUs for {count} threads")
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # already set, or inter-op work ran: keep what is there
        torch.set_num_interop_threads(1)
    _policy = ThreadPolicy(count, cpus[:count] if cpus else None)
    log.info(
        "threads: %d intra-op (of %d CPUs available), %s",
        count,
        available_cpus(),
        f"pinned to CPUs {list(_policy.bind)}" if _policy.bind else "not pinned",
    )
    return _policy


def policy() -> ThreadPolicy | None:
    return _policy


def prepare_current_thread() -> None:
    """Once per thread that runs engine steps (step.run_step calls it: the scheduler thread): its own
    OpenMP and MKL thread counts (per-thread settings: a new thread starts at the library default, every
    core), and its team pinned where the policy says so."""
    if getattr(_prepared, "done", False):
        return
    _prepared.done = True
    torch.set_num_threads(torch.get_num_threads())  # sets this thread's OpenMP / MKL counts too
    if _policy is not None and _policy.bind:
        _pin_team(_policy.bind)


def _pin_team(cpus: tuple[int, ...]) -> None:
    from alora_core.model.cpu_kernels import load

    kernels = load()
    if kernels is None:  # no compiled helper: only this thread can be pinned from Python
        os.sched_setaffinity(threading.get_native_id(), {cpus[0]})
        log.warning("cpu_bind: no CPU kernels (no C compiler), only the scheduler thread is pinned")
        return
    kernels.bind_threads(cpus)
    log.info("scheduler thread %d: OpenMP team pinned to CPUs %s", threading.get_native_id(), list(cpus))


def run_on_short_lived_thread(fn: Callable[[], T]) -> T:
    """fn() on a new thread, joined: torch work there leaves no OpenMP team behind (see the module
    docstring). Returns its result or raises its exception."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        torch.set_num_threads(threads)
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller
            error.append(e)

    threads = torch.get_num_threads()
    worker = threading.Thread(target=target, name="alora-startup")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup (v2 or v1) CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """quota / period of the process's cgroup (v2 cpu.max, else v1 cfs files), None where there is no
    limit or no cgroup filesystem."""
    try:
        fields = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "200000 100000"
        return int(fields[0]) / int(fields[1]) if fields[0] != "max" else None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11) (the kernel's cpuset list format)."""
    cpus: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"bad CPU list {text!r}: expected e.g. 0-3,8")
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.extend(range(lo, hi + 1))
    if not cpus or len(set(cpus)) != len(cpus):
        raise ValueError(f"bad CPU list {text!r}: empty or repeated CPUs")
    return tuple(cpus)
