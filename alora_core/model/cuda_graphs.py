"""CUDA steps replayed as captured graphs: decode and small extend steps padded to a few fixed shapes.

A GPU decode step is host-bound when run eagerly (HF's modules, ~40 launches a layer). The graph-safe
forward (no host sync: model/sync_guard.py; metadata in StepBuffers' fixed device buffers; kernel
grids static in the padded shape) is captured once per bucket and replayed:

    key = (tokens T, sequences S, query Q, has_lora)       padded shape of a step
        decode:        T = S in DECODE_BUCKETS, Q = 1
        small extend:  T in EXTEND_TOKEN_BUCKETS, S in DECODE_BUCKETS (S <= T), Q = SHORT_QUERY
                       (every query <= 16 tokens: an intrinsic's invocation, a short turn)
    step -> the smallest key that holds it (bisect), else eager (long prefill chunks, prompt-scored
            rows, LoRA rows in 64-row blocks, a step that did not come through StepBuffers)
    replay: the step's upload already wrote the buffers (entries past the step's own are inert: slot -1,
            adapter -1, seq_len 0, LoRA block NO_SLOT), so replay = graph.replay(); logits[:n]

Captured into one memory pool, largest first (SGLang's and transformers' order: the pool does not
fragment). The attention plan of a key is fixed at capture (split-KV segments for the longest context:
empty segments are inert), so replays need no per-step host decision. LoRA graphs read the adapter
stacks at their capture-time addresses: when a load grows a stack (or fills a group that had none), the
LoRA graphs are dropped and recaptured on their next use (logged).

On CPU the runner is never built. `make_graph` lets the CPU tests drive the same padding and replay
logic with a stand-in graph that re-runs the captured function over the static buffers.
"""

import bisect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from alora_core.model.batch import SMALL_BLOCK_M, LoraBatch, StepBatch, TokenBlocks
from alora_core.model.step_buffers import DeviceStep, StepBuffers

log = logging.getLogger(__name__)

CUDA_GRAPHS_ENV = "ALORA_CUDA_GRAPHS"  # "1" (default on CUDA) / "0": every step eager
DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
EXTEND_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)
SHORT_QUERY = 16  # = paged_attention_triton.SHORT_QUERY (not imported: that module needs triton)


@dataclass(frozen=True, order=True)
class GraphKey:
    tokens: int
    seqs: int
    query: int  # the longest query the graph's attention plan allows (1: decode)
    has_lora: bool


def graphs_enabled(device: torch.device) -> bool:
    choice = os.environ.get(CUDA_GRAPHS_ENV, "1")
    if choice not in ("0", "1"):
        raise ValueError(f"{CUDA_GRAPHS_ENV} must be '0' or '1', got {choice!r}")
    return device.type == "cuda" and choice == "1"


def bucket_keys(max_tokens: int, max_seqs: int) -> list[GraphKey]:
    """Every key within the buffers' sizes (base and LoRA), largest first (the capture order)."""
    keys = []
    for has_lora in (False, True):
        keys += [GraphKey(b, b, 1, has_lora) for b in DECODE_BUCKETS if b <= min(max_tokens, max_seqs)]
        for t in EXTEND_TOKEN_BUCKETS:
            if t <= max_tokens:
                keys += [
                    GraphKey(t, s, SHORT_QUERY, has_lora) for s in DECODE_BUCKETS if s <= min(t, max_seqs)
                ]
    return sorted(keys, reverse=True)


def select(
    num_tokens: int, num_seqs: int, max_query_len: int, has_lora: bool, max_tokens: int, max_seqs: int
) -> GraphKey | None:
    """The smallest captured shape that holds the step, or None (eager)."""
    decode = [b for b in DECODE_BUCKETS if b <= min(max_tokens, max_seqs)]
    if max_query_len == 1 and num_tokens == num_seqs:
        at = bisect.bisect_left(decode, num_seqs)
        return GraphKey(decode[at], decode[at], 1, has_lora) if at < len(decode) else None
    if max_query_len > SHORT_QUERY:
        return None
    tokens = [t for t in EXTEND_TOKEN_BUCKETS if t <= max_tokens]
    at_t, at_s = bisect.bisect_left(tokens, num_tokens), bisect.bisect_left(decode, num_seqs)
    if at_t == len(tokens) or at_s == len(decode) or decode[at_s] > tokens[at_t]:
        return None
    return GraphKey(tokens[at_t], decode[at_s], SHORT_QUERY, has_lora)


def padded_batch(
    buffers: StepBuffers, key: GraphKey, kv: torch.Tensor, max_seq_len: int, lora_slots: frozenset[int]
) -> StepBatch:
    """The StepBatch a graph of `key` is captured over: full-size views of the device buffers, so that
    every replay reads the step the last upload wrote (entries past it are padding, inert)."""
    d = buffers._device_views
    t, s = key.tokens, key.seqs
    lora = None
    if key.has_lora:
        blocks = TokenBlocks(d["lora_rows"][:t], d["lora_blocks"][:t], SMALL_BLOCK_M, lora_slots)
        lora = LoraBatch(adapter_index=d["adapter_index"][:t], rows_by_slot={}, blocks=blocks)
    step = DeviceStep(
        block_tables=d["block_tables"],
        seq_lens=d["seq_lens"],
        query_start=d["query_start"],
        block_size=buffers.block_size,
        num_seqs=s,
        num_tokens=t,
        max_query_len=key.query,
        max_seq_len=max_seq_len,  # the plan's split-KV segments for the longest context
    )
    return StepBatch(
        input_ids=d["input_ids"][:t],
        positions=d["positions"][:t],
        slot_mapping=d["slot_mapping"][:t],
        seqs=(),
        kv=kv,
        lora=lora,
        logits_rows=d["logits_rows"][:s],
        device_step=step,
    )


Replay = Callable[[], None]


def rerun_graph(fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
    """A stand-in for a CUDA graph where there is none (CPU tests, bench_gpu --cpu-smoke): replay
    re-runs the captured function over the same static buffers into the same output."""
    out = fn()
    return lambda: out.copy_(fn()), out  # type: ignore[return-value]


# (the captured function) -> (replay, its static output)
MakeGraph = Callable[[Callable[[], torch.Tensor]], tuple[Replay, torch.Tensor]]


def capture_cuda(pool: object) -> MakeGraph:
    """torch.cuda.graph capture into the shared pool, after two warm-up runs on a side stream."""

    def make(fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out

    return make


class GraphRunner:
    """Replays captured graphs for the steps that fit a key; `run` returns None for the others."""

    def __init__(
        self,
        forward: Callable[[StepBatch], torch.Tensor],  # the eager forward: batch -> logits [n, V]
        buffers: StepBuffers,
        kv: torch.Tensor,
        max_seq_len: int,
        lora_state: Callable[[], tuple[object, ...]],  # identity of every LoRA stack (addresses, slots)
        lora_slots: Callable[[], frozenset[int]],
        make_graph: MakeGraph | None = None,
    ) -> None:
        self.forward = forward
        self.buffers = buffers
        self.kv = kv
        self.max_seq_len = max_seq_len
        self.lora_state = lora_state
        self.lora_slots = lora_slots
        self.make_graph = (
            make_graph if make_graph is not None else capture_cuda(torch.cuda.graph_pool_handle())
        )
        self.graphs: dict[GraphKey, tuple[Replay, torch.Tensor]] = {}
        self._captured_lora_state: tuple[object, ...] | None = None
        self._captured_buffer = buffers.device  # the device buffer every graph reads
        self.capture_s = 0.0  # total seconds spent capturing (start-up and recaptures)
        self.replays = 0

    def capture(self, keys: list[GraphKey]) -> float:
        """Capture `keys` (largest first); returns the seconds it took."""
        start = time.perf_counter()
        empty = torch.zeros(0, dtype=torch.long)  # every entry padding: the warm-up runs write no KV
        self.buffers.upload(empty, empty, empty, empty, empty, (), self.kv)
        for key in sorted(keys, reverse=True):
            self._capture(key)
        took = time.perf_counter() - start
        log.info("captured %d CUDA graphs in %.1f s", len(keys), took)
        return took

    def _capture(self, key: GraphKey) -> tuple[Replay, torch.Tensor]:
        start = time.perf_counter()
        if key.has_lora:
            self._captured_lora_state = self.lora_state()
        batch = padded_batch(self.buffers, key, self.kv, self.max_seq_len, self.lora_slots())
        self.graphs[key] = graph = self.make_graph(lambda: self.forward(batch))
        self.capture_s += time.perf_counter() - start
        return graph

    def key_of(self, batch: StepBatch) -> GraphKey | None:
        step = batch.device_step
        if step is None or batch.logits_rows.numel() > step.num_seqs:
            return None  # not through StepBuffers, or prompt-scored rows: eager
        if batch.lora is not None and (
            batch.lora.blocks is None or batch.lora.blocks.block_m != SMALL_BLOCK_M
        ):
            return None
        return select(
            step.num_tokens,
            step.num_seqs,
            step.max_query_len,
            batch.lora is not None,
            self.buffers.max_tokens,
            self.buffers.max_seqs,
        )

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        """Replay the step's graph (capturing it first if needed) -> logits [n, V]; None: run eager."""
        key = self.key_of(batch)
        if key is None or batch.input_ids.untyped_storage().data_ptr() != self.buffers.device.data_ptr():
            return None  # no graph shape holds it, or its step came through other buffers
        if self.buffers.device is not self._captured_buffer:  # the buffers grew: new addresses
            if self.graphs:
                log.warning(
                    "step buffers reallocated: %d CUDA graphs dropped, recaptured on use", len(self.graphs)
                )
            self.graphs.clear()
            self._captured_buffer = self.buffers.device
        if key.has_lora and self._captured_lora_state != self.lora_state():
            dropped = [k for k in self.graphs if k.has_lora]
            for k in dropped:
                del self.graphs[k]
            if dropped:
                log.info("LoRA stacks changed: %d LoRA graphs dropped, recaptured on use", len(dropped))
            self._captured_lora_state = self.lora_state()
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key)
        replay, logits = graph
        replay()
        self.replays += 1
        return logits[: batch.logits_rows.numel()]
