"""The engine: the one entry point above the model. Base turns commit to a conversation; intrinsics
run on a fork of it and leave it untouched.

    generate(conv, input):   reuse = lcp(conv.cached, input)      -> truncate conv KV, prefill the rest,
                             decode; commit input + output to conv
    intrinsic(aLoRA, conv):  start = last invocation in context; reuse = min(lcp, start)
                             fork conv KV at reuse (shared blocks), adapter on positions >= start,
                             decode; drop the fork
    intrinsic(LoRA, ...):    every position adapted: nothing reused, fresh KV, dropped after
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alora_core.errors import (
    CapacityError,
    ContextTooLongError,
    InvalidRequestError,
    InvocationMissingError,
    UnknownConversationError,
)
from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.kvcache.conversations import Conversation, ConversationStore
from alora_core.lora.registry import AdapterRegistry, ResidentAdapter
from alora_core.model.batch import ForwardContext
from alora_core.model.loader import DType, LoadedModel, load_model
from alora_core.sampling import SamplingParams
from alora_core.scheduler import run_step
from alora_core.sequence import NO_ACTIVATION, FinishReason, Sequence

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 1 << 30

TokenCallback = Callable[[int], None]  # called with each sampled token id, from the engine's thread


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "auto"
    dtype: DType = "auto"
    block_size: int = 16  # tokens per KV block: the unit of sharing, spilling and Redis values
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES  # size of the device KV pool
    num_blocks: int | None = None  # overrides kv_cache_bytes
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    prefill_chunk_tokens: int = 512  # tokens of one sequence per forward during prefill
    max_adapters: int = 32
    max_conversations: int = 10_000


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the conversation's cache


@dataclass(frozen=True)
class GenerationResult:
    conversation_id: str | None
    adapter: str | None
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    ttft_s: float
    total_s: float
    activation_start: int | None = None  # aLoRA: first adapted position of the context
    logits: torch.Tensor | None = None  # [completion_tokens, V] when params.return_logits


@dataclass(frozen=True)
class ConversationInfo:
    conversation_id: str
    num_tokens: int
    cached_tokens: int
    cache_location: Literal["device", "none"]


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        shape = loaded.shape
        self.max_model_len = min(
            config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings
        )
        num_blocks = config.num_blocks or max(
            1, config.kv_cache_bytes // BlockPool.bytes_per_block(shape, config.block_size, loaded.dtype)
        )
        self.pool = BlockPool(shape, num_blocks, config.block_size, loaded.dtype, loaded.device)
        self.conversations = ConversationStore(self.pool, config.max_conversations)
        self.ctx = ForwardContext()
        self.adapters = AdapterRegistry(
            loaded.model, loaded.tokenizer, self.ctx, config.max_adapters, loaded.dtype, loaded.device
        )
        self._lock = threading.Lock()  # one request at a time until the batching scheduler owns the model
        log.info(
            "KV pool: %d blocks x %d tokens (%.1f MiB), max_model_len %d",
            num_blocks,
            config.block_size,
            num_blocks * BlockPool.bytes_per_block(shape, config.block_size, loaded.dtype) / 2**20,
            self.max_model_len,
        )

    @classmethod
    def from_config(cls, config: EngineConfig, adapters: dict[str, str | Path] | None = None) -> "Engine":
        engine = cls(load_model(config.model, config.device, config.dtype), config)
        for name, path in (adapters or {}).items():
            engine.adapters.load(name, path)
        return engine

    # -- public API ---------------------------------------------------------------------------------

    def generate(
        self,
        conversation_id: str | None,
        input_ids: list[int],
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        """Base-model continuation. input_ids is the conversation's FULL history; the longest prefix
        already cached is reused, and history + output become the conversation's new state."""
        params = params or SamplingParams()
        self._validate(input_ids, params)
        t0 = time.perf_counter()
        with self._lock:
            key = conversation_id if conversation_id is not None else uuid.uuid4().hex
            conv = self.conversations.get_or_create(key)
            reuse = min(_common_prefix(conv.token_ids[: conv.cached_tokens], input_ids), len(input_ids) - 1)
            conv.kv.truncate(reuse)
            seq = self._sequence(input_ids, conv.kv, params)
            try:
                ttft = self._run(seq, frozenset({key}), on_token)
            except BaseException:
                conv.kv.truncate(min(conv.kv.num_tokens, reuse))  # keep only KV valid for the old history
                raise
            conv.token_ids = seq.tokens
        return self._result(key, None, seq, reuse, t0, ttft)

    def intrinsic(
        self,
        adapter_name: str,
        conversation_id: str | None,
        input_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        """Run adapter `adapter_name` on a context, without changing the conversation.

        Context = input_ids if given (an aLoRA's must contain its invocation), else the conversation's
        tokens with the invocation appended. An aLoRA reuses the conversation's base KV before the
        invocation; a plain LoRA recomputes everything."""
        params = params or SamplingParams()
        adapter = self.adapters.get(adapter_name)
        if input_ids is None and conversation_id is None:
            raise InvalidRequestError("intrinsic needs a conversation_id, input_ids, or both")
        t0 = time.perf_counter()
        with self._lock:
            conv = self._conversation(conversation_id) if conversation_id is not None else None
            context = list(input_ids) if input_ids is not None else self._append_invocation(conv, adapter)
            self._validate(context, params)
            start = 0
            if adapter.spec.kind == "alora":
                start = self.activation_start(adapter, context)
            reuse = 0
            if conv is not None and adapter.spec.kind == "alora":
                reuse = min(_common_prefix(conv.token_ids[: conv.cached_tokens], context), start)
            table = conv.kv.fork(reuse) if reuse > 0 and conv is not None else BlockTable(self.pool)
            seq = self._sequence(context, table, params, adapter, start)
            protect = frozenset({conv.key}) if conv is not None else frozenset()
            try:
                ttft = self._run(seq, protect, on_token)
            finally:
                table.free()
        return self._result(conversation_id, adapter.spec.name, seq, reuse, t0, ttft)

    def activation_start(self, adapter: ResidentAdapter, context: list[int]) -> int:
        """Position of the LAST occurrence of the adapter's invocation sequence in context."""
        invocation = list(adapter.spec.invocation_tokens or ())
        start = _last_occurrence(context, invocation)
        if start is None:
            raise InvocationMissingError(
                f"input does not contain the invocation sequence of aLoRA adapter {adapter.spec.name!r}: "
                f"{adapter.spec.invocation_text!r} = token ids {invocation}"
            )
        return start

    def conversation(self, conversation_id: str) -> ConversationInfo:
        with self._lock:
            conv = self._conversation(conversation_id)
            return ConversationInfo(
                conversation_id=conversation_id,
                num_tokens=len(conv.token_ids),
                cached_tokens=conv.cached_tokens,
                cache_location="device" if conv.cached_tokens else "none",
            )

    def conversation_tokens(self, conversation_id: str) -> list[int]:
        with self._lock:
            return list(self._conversation(conversation_id).token_ids)

    def delete_conversation(self, conversation_id: str) -> None:
        with self._lock:
            if not self.conversations.delete(conversation_id):
                raise UnknownConversationError(f"unknown conversation {conversation_id!r}")

    # -- internals ----------------------------------------------------------------------------------

    def _conversation(self, conversation_id: str) -> Conversation:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            raise UnknownConversationError(f"unknown conversation {conversation_id!r}")
        return conv

    def _append_invocation(self, conv: Conversation | None, adapter: ResidentAdapter) -> list[int]:
        assert conv is not None
        if not conv.token_ids:
            raise InvalidRequestError(f"conversation {conv.key!r} is empty: nothing to run the adapter on")
        return conv.token_ids + list(adapter.spec.invocation_tokens or ())

    def _validate(self, input_ids: list[int], params: SamplingParams) -> None:
        vocab = self.loaded.shape.vocab_size
        params.validate(vocab)
        if not input_ids:
            raise InvalidRequestError("input is empty: at least one token is needed")
        bad = [t for t in input_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:8]} fall outside the vocabulary [0, {vocab})")
        if len(input_ids) >= self.max_model_len:
            raise ContextTooLongError(
                f"input has {len(input_ids)} tokens; the model maximum is {self.max_model_len} "
                f"including at least one generated token, so at most {self.max_model_len - 1} input tokens"
            )
        blocks_needed = -(-(len(input_ids) + 1) // self.pool.block_size)
        if blocks_needed > self.pool.num_blocks:
            raise ContextTooLongError(
                f"input has {len(input_ids)} tokens; the KV pool holds at most "
                f"{self.pool.num_blocks * self.pool.block_size - 1} (raise kv_cache_bytes)"
            )

    def _sequence(
        self,
        prompt: list[int],
        table: BlockTable,
        params: SamplingParams,
        adapter: ResidentAdapter | None = None,
        activation_start: int = NO_ACTIVATION,
    ) -> Sequence:
        return Sequence(
            prompt=list(prompt),
            table=table,
            params=params,
            max_model_len=self.max_model_len,
            eos_token_ids=self.loaded.eos_token_ids,
            adapter_slot=adapter.slot if adapter is not None else None,
            activation_start=activation_start if adapter is not None else NO_ACTIVATION,
            generator=params.generator(self.loaded.device),
        )

    def _run(self, seq: Sequence, protect: frozenset[str], on_token: TokenCallback | None) -> float:
        """Prefill in chunks, then decode until finished. Returns the time to the first token."""
        t0 = time.perf_counter()
        ttft = 0.0
        while not seq.finished:
            start, end = seq.next_feed(self.config.prefill_chunk_tokens)
            self._reserve(seq.table, end, protect)
            produced = len(seq.output)
            run_step(
                [(seq, start, end)],
                self.loaded.model,
                self.ctx,
                self.pool,
                self.tokenizer,
                self.loaded.device,
            )
            if seq.output and not ttft:
                ttft = time.perf_counter() - t0
            if on_token is not None and len(seq.output) > produced:
                on_token(seq.output[-1])
        return ttft

    def _reserve(self, table: BlockTable, total_tokens: int, protect: frozenset[str]) -> None:
        try:
            table.reserve(total_tokens)
        except CapacityError:
            missing = -(-total_tokens // self.pool.block_size) - len(table.blocks)
            dropped = self.conversations.evict_caches(missing, protect)
            log.info("KV pool full: dropped the cache of %d tokens of idle conversations", dropped)
            table.reserve(total_tokens)

    def _result(
        self,
        conversation_id: str | None,
        adapter: str | None,
        seq: Sequence,
        reuse: int,
        t0: float,
        ttft: float,
    ) -> GenerationResult:
        assert seq.finish_reason is not None
        return GenerationResult(
            conversation_id=conversation_id,
            adapter=adapter,
            token_ids=list(seq.output),
            text=seq.text(self.tokenizer),
            finish_reason=seq.finish_reason,
            usage=Usage(
                prompt_tokens=len(seq.prompt), completion_tokens=len(seq.output), cached_tokens=reuse
            ),
            ttft_s=ttft,
            total_s=time.perf_counter() - t0,
            activation_start=seq.activation_start if seq.activation_start != NO_ACTIVATION else None,
            logits=torch.stack(seq.logits) if seq.logits else None,
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _last_occurrence(tokens: list[int], pattern: list[int]) -> int | None:
    """Start of the last occurrence of `pattern` in `tokens` (PEFT's calculate_alora_offsets rule)."""
    m = len(pattern)
    for i in range(len(tokens) - m, -1, -1):
        if tokens[i : i + m] == pattern:
            return i
    return None
