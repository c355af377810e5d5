"""CUDA-graph decode (model/cuda_graphs.py): bucket selection, padding, eager fallback, and replay equal
to eager over the engine's own steps.

On CPU there is no CUDA graph: the runner is driven with a stand-in graph whose replay re-runs the
captured function over the same static buffers (kernels under Triton's interpreter). That proves what
the graphs rely on (the padded fixed-shape step reads only the buffers the upload wrote, padding is
inert, the key picks a shape that holds the step, LoRA graphs follow the stacks); with
ALORA_TEST_DEVICE=cuda the same tests capture and replay real CUDA graphs.
"""

from collections.abc import Callable

import pytest
import torch

import tests.alora_core.interpreted_triton  # noqa: F401  (the kernels in the tests' Triton mode)
from alora_core import Engine, SamplingParams
from alora_core.model import cuda_graphs
from alora_core.model.batch import NO_SLOT, SeqSpan
from alora_core.model.cuda_graphs import (
    GraphKey,
    GraphRunner,
    bucket_keys,
    graphs_enabled,
    padded_batch,
    select,
)
from alora_core.model.step_buffers import StepBuffers
from tests.alora_core.conftest import TEST_DEVICE, PeftOracle, random_ids
from tests.alora_core.test_engine_parity import GREEDY, assert_matches, assert_mixed_batch_matches

CUDA = TEST_DEVICE == "cuda"


def test_select_picks_the_smallest_bucket_that_holds_the_step() -> None:
    assert select(1, 1, 1, False, 512, 256) == GraphKey(1, 1, 1, False)
    assert select(3, 3, 1, True, 512, 256) == GraphKey(4, 4, 1, True)
    assert select(33, 33, 1, False, 512, 256) == GraphKey(48, 48, 1, False)
    assert select(256, 256, 1, False, 512, 256) == GraphKey(256, 256, 1, False)
    assert select(257, 257, 1, False, 512, 512) is None  # past the largest decode bucket: eager
    assert select(40, 40, 1, False, 512, 32) is None  # past the buffers' sequences
    assert select(10, 1, 10, False, 512, 256) == GraphKey(16, 1, 16, False)  # an intrinsic's invocation
    assert select(20, 3, 16, True, 512, 256) == GraphKey(32, 4, 16, True)
    assert select(3, 2, 2, False, 512, 256) == GraphKey(16, 2, 16, False)  # a decode beside a 2-token extend
    assert select(20, 1, 17, False, 512, 256) is None  # a query longer than the short-query plan
    assert select(600, 40, 16, False, 1024, 256) is None  # past the largest extend bucket
    assert select(130, 100, 2, False, 512, 256) == GraphKey(256, 128, 16, False)


def test_bucket_keys_fit_the_buffers_largest_first() -> None:
    keys = bucket_keys(64, 8)
    assert keys == sorted(keys, reverse=True)
    assert max(k.tokens for k in keys) == 64 and max(k.seqs for k in keys) == 8
    assert {k.has_lora for k in keys} == {False, True}
    assert all(k.seqs <= k.tokens for k in keys)


def test_graphs_only_on_cuda_and_the_flag_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not graphs_enabled(torch.device("cpu"))
    assert graphs_enabled(torch.device("cuda"))
    monkeypatch.setenv(cuda_graphs.CUDA_GRAPHS_ENV, "0")
    assert not graphs_enabled(torch.device("cuda"))
    monkeypatch.setenv(cuda_graphs.CUDA_GRAPHS_ENV, "yes")
    with pytest.raises(ValueError, match="ALORA_CUDA_GRAPHS"):
        graphs_enabled(torch.device("cuda"))


def test_padded_batch_entries_past_the_step_are_inert() -> None:
    """A 3-token, 2-sequence step in a (16 tokens, 4 sequences) graph: padding writes no KV (slot -1),
    uses no adapter (-1, LoRA blocks NO_SLOT) and has no keys (seq_len 0, empty query ranges)."""
    buffers = StepBuffers(32, 8, 4, 16, torch.device(TEST_DEVICE))
    spans = (SeqSpan(0, 2, 20, ((0, 20),)), SeqSpan(2, 1, 5, ((32, 37),)))
    ids = torch.tensor([5, 6, 7])
    real = buffers.upload(
        ids, torch.tensor([18, 19, 4]), torch.tensor([18, 19, 36]), torch.tensor([-1, 2, 2]),
        torch.tensor([1, 2]), spans, torch.empty(0),
    )  # fmt: skip
    key = GraphKey(16, 4, 16, True)
    batch = padded_batch(buffers, key, torch.empty(0), 64, frozenset({2}))
    step = batch.device_step
    assert step is not None and (step.num_tokens, step.num_seqs, step.max_query_len) == (16, 4, 16)
    assert batch.input_ids.data_ptr() == real.input_ids.data_ptr()  # the buffers a replay reads
    assert batch.slot_mapping.tolist() == [18, 19, 36] + [-1] * 13
    assert batch.lora is not None and batch.lora.adapter_index.tolist() == [-1, 2, 2] + [-1] * 13
    blocks = batch.lora.blocks
    assert blocks is not None and blocks.blocks.shape == (16, 3)
    assert blocks.blocks[0].tolist() == [2, 0, 2] and blocks.rows[:2].tolist() == [1, 2]
    assert (blocks.blocks[1:, 0] == NO_SLOT).all()
    assert step.seq_lens[:4].tolist() == [20, 5, 0, 0]
    assert step.query_start[:5].tolist() == [0, 2, 3, 3, 3]
    assert batch.logits_rows.tolist() == [1, 2, 0, 0]


@pytest.mark.slow
def test_graph_replay_equals_eager_on_the_engine(
    make_engine: Callable[..., Engine], oracle: PeftOracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32: a base conversation, an aLoRA intrinsic over it (a short extend with LoRA rows), a LoRA
    request and a base decode batched together: tokens equal PEFT's, logits within 1e-4 (assert_matches),
    decode and small extend steps replayed, larger ones eager."""
    from alora_core import engine as engine_module
    from alora_core.lora import layer

    monkeypatch.setattr(engine_module, "paged_kernel_available", lambda device: True)
    monkeypatch.setattr(layer, "lora_kernel_available", lambda device: True)
    if not CUDA:  # the engine builds the runner on CUDA only: here with the stand-in graph
        monkeypatch.setattr(engine_module, "graphs_enabled", lambda device: True)
        monkeypatch.setattr(cuda_graphs, "capture_cuda", lambda pool: cuda_graphs.rerun_graph)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=32, prefill_chunk_tokens=24)
    runner = engine.ctx.graphs
    assert runner is not None and runner.graphs, "base graphs are captured at start-up"
    assert not any(k.has_lora for k in runner.graphs)
    eager: list[int] = []
    real_forward = runner.forward
    monkeypatch.setattr(runner, "forward", lambda batch: eager.append(1) or real_forward(batch))
    history = random_ids(21, seed=720)
    assert_matches(engine.generate("c", history, GREEDY), oracle, None, history)
    replays = runner.replays
    assert replays >= GREEDY.max_tokens - 1, "every decode step replays a graph"
    assert_mixed_batch_matches(
        engine, oracle, "c", ("certainty",), random_ids(19, seed=721), random_ids(23, seed=722)
    )
    assert runner.replays > replays
    assert any(k.has_lora for k in runner.graphs), "LoRA steps replay LoRA graphs"
    assert eager, "prefill chunks longer than 16 tokens run eager"


@pytest.mark.slow
def test_lora_graphs_are_dropped_when_a_load_changes_the_stacks(
    make_engine: Callable[..., Engine], demo: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alora_core import engine as engine_module
    from alora_core.lora import layer

    monkeypatch.setattr(engine_module, "paged_kernel_available", lambda device: True)
    monkeypatch.setattr(layer, "lora_kernel_available", lambda device: True)
    if not CUDA:
        monkeypatch.setattr(engine_module, "graphs_enabled", lambda device: True)
        monkeypatch.setattr(cuda_graphs, "capture_cuda", lambda pool: cuda_graphs.rerun_graph)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=32)
    runner = engine.ctx.graphs
    assert isinstance(runner, GraphRunner)
    params = SamplingParams(max_tokens=3)
    first = engine.generate(None, random_ids(9, seed=730), params)
    engine.intrinsic("rewrite", None, random_ids(9, seed=731), params)
    assert any(k.has_lora for k in runner.graphs)
    state = runner.lora_state()
    engine.adapters.unload("rewrite")
    assert runner.lora_state() != state
    engine.adapters.load("rewrite", demo.adapters["rewrite"])  # type: ignore[attr-defined]
    engine.intrinsic("rewrite", None, random_ids(9, seed=731), params)
    assert runner._captured_lora_state == runner.lora_state()
    assert engine.generate(None, random_ids(9, seed=730), params).token_ids == first.token_ids
