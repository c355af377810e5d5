"""No host sync in the device part of a step on the graph-safe path (issue 21): the paged Triton
attention over StepBuffers, the fused LoRA kernels and the device sampler.

On CPU the kernels run under Triton's interpreter and `SyncGuard` counts every call that would sync on
a GPU (model/sync_guard.py); with ALORA_TEST_DEVICE=cuda the same steps run compiled on the GPU with
`torch.cuda.set_sync_debug_mode("error")`, so a real sync raises.
"""

from collections.abc import Callable

import numpy as np
import pytest
import torch

import tests.alora_core.interpreted_triton  # noqa: F401  (the kernels in the tests' Triton mode)
from alora_core.model.batch import LoraBatch, group_rows
from alora_core.model.sync_guard import SyncGuard
from tests.alora_core.conftest import TEST_DEVICE, PeftOracle, random_ids

CUDA = TEST_DEVICE == "cuda"


from alora_core import Engine  # noqa: E402
from alora_core import step as step_module  # noqa: E402
from tests.alora_core.test_engine_parity import GREEDY, assert_matches, assert_mixed_batch_matches  # noqa: E402


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t[0].item(),
        lambda t: t.tolist(),
        lambda t: t.cpu(),
        lambda t: t.nonzero(),
        lambda t: t[t > 2],
        lambda t: torch.equal(t, t),
        lambda t: bool(t[0]),
        lambda t: int(t[0]),
        lambda t: float(t[1]),
        lambda t: [0, 1][t[0]],
        lambda t: torch.unique(t),
        lambda t: t.repeat_interleave(t),
        lambda t: torch.tensor([1, 2], device=t.device),
    ],
)
def test_guard_counts_each_kind_of_sync(call: Callable[[torch.Tensor], object]) -> None:
    t = torch.arange(4, device=TEST_DEVICE)
    with SyncGuard() as guard:
        call(t)
    assert len(guard.calls) >= 1, "the guard missed a host sync"
    assert "test_sync_guard.py" in guard.calls[0][1]  # it names the line that asked


def test_guard_passes_device_only_work() -> None:
    t = torch.arange(8, device=TEST_DEVICE, dtype=torch.float32)
    with SyncGuard() as guard:
        y = torch.where(t > 2, t * 2, t).softmax(0).argmax()
        t[1] = y.float()  # a Python int index: no device read
        t.index_put_((torch.zeros(1, dtype=torch.long, device=TEST_DEVICE),), y.float().reshape(1))
        t.to(torch.float16)
    assert guard.calls == [], guard.report()


def test_host_grouping_equals_the_device_grouping() -> None:
    """StepBuffers groups LoRA rows from the host index (no sync); LoraBatch.from_index reads the device
    index (unique + nonzero): the same rows per slot, in the same order."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        index = rng.integers(-1, 4, size=int(rng.integers(1, 200)))
        rows, blocks, block_m, per_slot = group_rows(index)
        reference = LoraBatch.from_index(torch.from_numpy(index))
        if reference is None:
            assert per_slot == {} and blocks == []
            continue
        assert list(per_slot) == sorted(reference.rows_by_slot)
        expected = torch.cat([reference.rows_by_slot[s] for s in sorted(reference.rows_by_slot)])
        assert rows.tolist() == expected.tolist()
        covered = [
            r for slot, first, count in blocks for r in rows[first : first + count] if index[r] == slot
        ]
        assert sorted(covered) == sorted(expected.tolist())  # every row once, under its own slot
        assert all(1 <= count <= block_m for _, _, count in blocks)


@pytest.mark.slow
def test_a_mixed_step_on_the_graph_safe_path_does_not_sync(
    make_engine: Callable[..., Engine], oracle: PeftOracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base, aLoRA (a fork over the cached conversation), LoRA and decode rows, batched with chunked
    prefill, on the paged kernel and the fused LoRA kernels: every forward runs under the guard (on a
    GPU in sync-debug "error" mode), makes no host sync, and the answers still equal PEFT's."""
    from alora_core import engine as engine_module
    from alora_core.lora import layer

    monkeypatch.setattr(engine_module, "paged_kernel_available", lambda device: True)
    monkeypatch.setattr(layer, "lora_kernel_available", lambda device: True)
    monkeypatch.setenv("ALORA_CUDA_GRAPHS", "0")  # on a GPU: the eager forward a graph captures
    guards: list[SyncGuard] = []
    real = step_module.forward

    def guarded(*args: object) -> torch.Tensor:
        with SyncGuard(cuda=CUDA) as guard:
            logits = real(*args)  # type: ignore[arg-type]
        guards.append(guard)
        return logits

    monkeypatch.setattr(step_module, "forward", guarded)
    engine = make_engine(max_num_seqs=8, max_num_batched_tokens=48, prefill_chunk_tokens=24)
    history = random_ids(21, seed=710)
    assert_matches(engine.generate("c", history, GREEDY), oracle, None, history)
    assert_mixed_batch_matches(
        engine, oracle, "c", ("certainty",), random_ids(19, seed=711), random_ids(23, seed=712)
    )
    assert guards
    calls = [call for guard in guards for call in guard.calls]
    assert calls == [], "host syncs in a step:\n" + "\n".join(f"{n} at {w}" for n, w in calls)
