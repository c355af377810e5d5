"""The engine: the one entry point above the model. Requests are validated here, then run by the
continuous-batching scheduler thread; `generate` / `intrinsic` wait, `submit_*` return a handle.

Every request reuses the longest cached prefix of its tokens from the KV index (kvcache/), with or
without a conversation, whatever API it came through; what it computes joins the index.

    generate(conv?, input):  reuse = longest cached prefix of input (a conversation's own KV token
                             by token), prefill the rest, decode; with a conversation id, the
                             conversation (a named handle) moves to input + output
    intrinsic(aLoRA, ...):   start = last invocation in context; base blocks before the one holding
                             `start` are shared with base requests and every aLoRA; that block and
                             later ones belong to (adapter, start); the conversation is unchanged
    intrinsic(LoRA, ...):    every position adapted: reuses only that LoRA's own earlier blocks
    completion(model?, ids): stateless (the OpenAI API): base or adapter on ids, no conversation;
                             n choices prefill once and fork the prompt's KV at the first sample

A request whose params carry an output constraint gets its grammar compiled (cached) on the
submitting thread, and a matcher per choice; the scheduler masks its rows' logits (structured/).

KV is shared only within a tenant (the conversation key's namespace, or `tenant=`) and a
`cache_salt`. Idle blocks are demoted device -> host -> Redis under byte budgets and restored on
use; with Redis any replica finds a prefix another computed, and resumes any conversation.
"""

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alora_core.context import activation_start, invalid_token_ids, validate
from alora_core.errors import (
    CacheUnavailableError,
    ConversationBusyError,
    InvalidRequestError,
    UnknownConversationError,
)
from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.codec import KVLayout, tenant_of
from alora_core.kvcache.conversations import Conversation, ConversationStore
from alora_core.kvcache.cost_model import CostModel, RestorePolicy
from alora_core.kvcache.host_tier import HostTier
from alora_core.kvcache.index import PrefixIndex
from alora_core.kvcache.prefix_cache import PrefixCache
from alora_core.kvcache.redis_client import REDIS_ERRORS
from alora_core.kvcache.redis_tier import RedisTier
from alora_core.kvcache.remote import RemoteCache
from alora_core.kvcache.stats import CacheCounters, CacheStats
from alora_core.kvcache.tiers import TieredCache
from alora_core.lora.registry import AdapterRegistry
from alora_core.model import cpu_linear, fused_cpu
from alora_core.model.attention import kernel_wins_prefill
from alora_core.model.batch import ForwardContext
from alora_core.model.coverage import probe
from alora_core.model.cpu_kernels import load as load_cpu_kernels
from alora_core.model.cuda_graphs import GraphRunner, MakeGraph, bucket_keys, graphs_enabled
from alora_core.model.loader import DType, LoadedModel, load_model
from alora_core.model.step_buffers import StepBuffers, paged_kernel_available
from alora_core.request import Request, RequestHandle, TokenCallback
from alora_core.sampling import SamplingParams, TokenLogprobs
from alora_core.scheduler import ModelHandle, Scheduler, SchedulerConfig
from alora_core.sequence import NO_ACTIVATION, FinishReason
from alora_core.step import forward, forward_eager
from alora_core.structured import GrammarCompiler, GrammarState

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 1 << 30
ChoiceCallback = Callable[[int, int, TokenLogprobs | None], None]  # (choice index, token, its logprobs)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    trust_remote_code: bool = False  # run the model repository's own code (probed like any model)
    device: str = "auto"
    dtype: DType = "auto"
    block_size: int = 16  # tokens per KV block: the unit of sharing, spilling and Redis values
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES  # size of the device KV pool
    kv_cache_fraction: float | None = (
        None  # pool = this fraction of the device's free memory (overrides kv_cache_bytes)
    )
    num_blocks: int | None = None  # overrides kv_cache_bytes and kv_cache_fraction
    # tiered conversation caches (kvcache/tiers.py)
    device_cache_bytes: int | None = None  # KV idle conversations keep in the pool (None: all the pool)
    host_cache_bytes: int = (
        0  # host tier, pinned when on CUDA (0: none; demoted blocks go to Redis or are dropped)
    )
    redis_url: str | None = None  # shared cold tier, e.g. redis://host:6379/0 (None: none)
    redis_ttl_s: int = 86_400  # expiry of Redis entries, refreshed on every access
    redis_value_bytes: int = 4 << 20  # target size of one Redis value (a run of whole blocks)
    redis_write_buffer_bytes: int = 1 << 30  # KV staged for Redis writes; a commit beyond it is not written
    restore_policy: RestorePolicy = "cost"  # restore a lower tier only when cheaper than recompute
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    prefill_chunk_tokens: int = 512  # tokens of one sequence per forward during prefill
    max_num_seqs: int = 64  # sequences batched per forward (1 = one request at a time); n choices take n
    max_num_batched_tokens: int = 512  # new tokens per forward, all sequences together
    max_waiting: int = 256  # queued requests beyond which new ones are refused (HTTP 429)
    max_adapters: int = 32
    max_conversations: int = 10_000  # conversation handles kept (LRU); id-less requests make none
    # CPU: time two GEMM layouts per weight shape at start (model/cpu_linear.py)
    calibrate_cpu_linears: bool = True
    # CPU: compile and use the batched paged-attention kernel (model/cpu_kernels.py; needs a C compiler)
    cpu_kernels: bool = True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the cache (any tier), not computed


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
    queue_s: float = 0.0  # submitted -> admitted (the last admission, after any preemption)
    activation_start: int | None = None  # aLoRA: first adapted position of the context
    logits: torch.Tensor | None = None  # [completion_tokens, V] when params.return_logits
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry when params.logprobs is set
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.. when params.prompt_logprobs
    error: str | None = None  # finish_reason "error": why the output constraint allowed no next token
    # finish_reason "stop" by a stop token id or stop string: which one (vLLM's stop_reason); None for
    # EOS and every other finish
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class ConversationInfo:
    conversation_id: str
    num_tokens: int
    cached_tokens: int  # prefix whose KV can be restored without recompute, from any tier
    cache_location: Literal["device", "host", "redis", "none"]  # the coldest tier that prefix needs
    device_tokens: int = 0  # positions [0, device_tokens) on the device,
    host_tokens: int = 0  # the next host_tokens on the host,
    redis_tokens: int = 0  # and the next redis_tokens only in Redis


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        shape = loaded.shape
        self.max_model_len = min(
            config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings
        )
        block_bytes = BlockPool.bytes_per_block(shape, config.block_size, loaded.dtype)
        num_blocks = config.num_blocks or max(1, _pool_bytes(config, loaded.device) // block_bytes)
        self.pool = BlockPool(shape, num_blocks, config.block_size, loaded.dtype, loaded.device)
        layout = KVLayout(
            loaded.fingerprint,
            loaded.dtype,
            shape.num_layers,
            shape.num_kv_heads,
            shape.head_dim,
            config.block_size,
        )
        host = HostTier(layout, config.host_cache_bytes // block_bytes, pin=loaded.device.type == "cuda")
        self.index = PrefixIndex(loaded.fingerprint, config.block_size)
        self.conversations = ConversationStore(self.pool, config.max_conversations, host, self.index)
        counters, cost = CacheCounters(), CostModel()
        redis_tier = None
        if config.redis_url:
            redis_tier = RedisTier(
                config.redis_url,
                config.redis_ttl_s,
                layout,
                max(1, config.redis_value_bytes // block_bytes),
                counters,
                cost,
                wake=lambda: self.scheduler.wake(),
                max_pending_write_bytes=config.redis_write_buffer_bytes,
            )
        self.tiers = TieredCache(
            self.pool,
            self.index,
            self.conversations,
            host,
            redis_tier,
            cost,
            counters,
            config.restore_policy,
            None if config.device_cache_bytes is None else config.device_cache_bytes // block_bytes,
        )
        self.remote = (
            RemoteCache(redis_tier, self.pool, loaded.fingerprint) if redis_tier is not None else None
        )
        self.prefix = PrefixCache(self.tiers, self.conversations, self.remote)
        if loaded.device.type == "cpu" and config.calibrate_cpu_linears:
            transposed = cpu_linear.calibrate(loaded.model)
            log.info("CPU linears calibrated: %d take W @ x^T at some small-batch row counts", transposed)
        self.ctx = ForwardContext()
        if loaded.device.type == "cpu" and config.cpu_kernels:
            self.ctx.cpu_kernels = load_cpu_kernels()  # None (one warning) without a C compiler
            if self.ctx.cpu_kernels is not None:  # RMSNorm and SiLU-and-mul in one pass each
                fused_cpu.install(loaded.model, self.ctx.cpu_kernels)
                heads = loaded.model.config.get_text_config().num_attention_heads
                self.ctx.kernel_prefill = kernel_wins_prefill(
                    self.ctx.cpu_kernels, heads, shape.num_kv_heads, shape.head_dim
                )
        if paged_kernel_available(loaded.device):  # CUDA: step metadata on the device, the paged kernel
            self.ctx.buffers = StepBuffers(
                max_tokens=config.max_num_batched_tokens,
                max_seqs=config.max_num_seqs,
                max_blocks=-(-self.max_model_len // config.block_size),
                block_size=config.block_size,
                device=loaded.device,
            )
        # once: the engine's forward against transformers' own; refuses the model on a mismatch
        self.coverage = probe(
            loaded.model,
            functools.partial(forward, loaded.model, self.ctx),
            shape.num_kv_heads,
            shape.head_dim,
            shape.vocab_size,
        )
        self.grammars = GrammarCompiler(loaded.tokenizer, shape.vocab_size, loaded.eos_token_ids)
        self.adapters = AdapterRegistry(
            loaded.model,
            loaded.tokenizer,
            self.ctx,
            config.max_adapters,
            loaded.dtype,
            loaded.device,
            lora_targets=self.coverage.lora_targets,
        )
        self.graph_capture_s = 0.0
        if self.ctx.buffers is not None and graphs_enabled(loaded.device):
            self.ctx.graphs = self._graph_runner(loaded, self.ctx.buffers)
            base = [key for key in bucket_keys(*self.ctx.buffers.shape[:2]) if not key.has_lora]
            self.graph_capture_s = self.ctx.graphs.capture(base)  # LoRA graphs: on first use
        self.scheduler = Scheduler(
            ModelHandle(
                model=loaded.model,
                ctx=self.ctx,
                tokenizer=loaded.tokenizer,
                device=loaded.device,
                eos_token_ids=loaded.eos_token_ids,
                vocab_size=shape.vocab_size,
                max_model_len=self.max_model_len,
            ),
            self.pool,
            self.conversations,
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                prefill_chunk_tokens=config.prefill_chunk_tokens,
                max_waiting=config.max_waiting,
            ),
            self.tiers,
            self.prefix,
        )
        log.info(
            "KV pool: %d blocks x %d tokens (%.1f MiB), max_model_len %d; host tier %.1f MiB; Redis %s",
            num_blocks,
            config.block_size,
            num_blocks * block_bytes / 2**20,
            self.max_model_len,
            host.capacity_bytes / 2**20,
            "on" if redis_tier is not None else "off",
        )

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        adapters: dict[str, str | Path] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> "Engine":
        """aliases: other name -> adapter name (one adapter: the same slot, KV and metrics label)."""
        engine = cls(load_model(config.model, config.device, config.dtype, config.trust_remote_code), config)
        for name, path in (adapters or {}).items():
            engine.adapters.load(name, path)
        for alias, name in (aliases or {}).items():
            engine.adapters.add_alias(alias, name)
        return engine

    # -- public API ---------------------------------------------------------------------------------

    def generate(
        self,
        conversation_id: str | None,
        input_ids: list[int],
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
        *,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> GenerationResult:
        """Base-model continuation. input_ids is the FULL history; the longest prefix already cached
        is reused. With a conversation id, history + output become the conversation's new state."""
        handle = self.submit_generate(
            conversation_id, input_ids, params, on_token, tenant=tenant, cache_salt=cache_salt
        )
        return handle.result()

    def intrinsic(
        self,
        adapter_name: str,
        conversation_id: str | None,
        input_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
        *,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> GenerationResult:
        """Run adapter `adapter_name` on a context, without changing the conversation.

        Context = input_ids if given (an aLoRA's must contain its invocation), else the conversation's
        tokens with the invocation appended. An aLoRA reuses the cached base KV before the block
        holding its invocation; a plain LoRA reuses only its own earlier blocks."""
        handle = self.submit_intrinsic(
            adapter_name, conversation_id, input_ids, params, on_token, tenant=tenant, cache_salt=cache_salt
        )
        return handle.result()

    def submit_generate(
        self,
        conversation_id: str | None,
        input_ids: list[int],
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
        *,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> "EngineHandle":
        """Submit a base-model turn. conversation_id None: no conversation is made (nothing to
        commit to); its KV is still cached for any later request with the same prefix.

        tenant: who may reuse its KV (default: the conversation key's namespace, '<tenant>:<id>',
        else the empty tenant); cache_salt: only requests with the same salt share KV."""
        params = params or SamplingParams()
        self._validate(list(input_ids), params)
        owner = _tenant(conversation_id, tenant)
        if conversation_id is not None:
            self._resume(conversation_id, required=False)  # the input is the whole history
            self._await_handle_write(conversation_id)
        request = Request(
            "generate",
            conversation_id,
            list(input_ids),
            params,
            on_token=on_token,
            tenant=owner,
            cache_salt=cache_salt,
            grammar=self._grammar(params),
        )
        return self._submit(request)

    def submit_intrinsic(
        self,
        adapter_name: str,
        conversation_id: str | None,
        input_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
        *,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> "EngineHandle":
        """Submit an intrinsic (see `intrinsic`); tenant and cache_salt as for submit_generate."""
        params = params or SamplingParams()
        owner = _tenant(conversation_id, tenant)
        adapter = self.adapters.get(adapter_name)
        if input_ids is None and conversation_id is None:
            raise InvalidRequestError("intrinsic needs a conversation_id, input_ids, or both")
        if input_ids is not None:
            self._validate(list(input_ids), params)
            if adapter.spec.kind == "alora":
                activation_start(adapter, list(input_ids))
        else:
            params.validate(self.loaded.shape.vocab_size)
        if conversation_id is not None:
            self._resume(conversation_id)
            self._await_handle_write(conversation_id)
        if conversation_id is not None and conversation_id not in self.conversations:
            raise UnknownConversationError(f"unknown conversation {conversation_id!r}")
        request = Request(
            "intrinsic",
            conversation_id,
            None if input_ids is None else list(input_ids),
            params,
            adapter=adapter,
            on_token=on_token,
            tenant=owner,
            cache_salt=cache_salt,
            grammar=self._grammar(params),
        )
        return self._submit(request)

    def submit_completion(
        self,
        adapter_name: str | None,
        input_ids: list[int],
        params: SamplingParams | None = None,
        *,
        on_sample: ChoiceCallback | None = None,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> "EngineHandle":
        """A stateless request (what the OpenAI API runs): the base model (adapter_name None) or an
        adapter on input_ids, reusing the longest cached prefix like any request; no conversation
        is read or written. An aLoRA's input must contain its invocation. With params.n > 1 the
        handle's `choices` are the n choices: one prefill, then n - 1 forks of its KV at the first
        sampling point (choice i samples with seed + i). on_sample gets (choice, token, logprobs)
        as tokens are sampled; tenant and cache_salt as for submit_generate."""
        params = params or SamplingParams()
        adapter = self.adapters.get(adapter_name) if adapter_name is not None else None
        self._validate(list(input_ids), params)
        if adapter is not None and adapter.spec.kind == "alora":
            activation_start(adapter, list(input_ids))

        def request(choice: int, choice_params: SamplingParams) -> Request:
            callback = functools.partial(on_sample, choice) if on_sample is not None else None
            return Request(
                "generate" if adapter is None else "intrinsic",  # without a conversation: nothing to commit
                None,
                list(input_ids),
                choice_params,
                adapter=adapter,
                on_sample=callback,
                tenant=tenant or "",
                cache_salt=cache_salt,
                grammar=self._grammar(choice_params),
            )

        parent = request(0, params)  # keeps n: its first sampling point spawns the others
        parent.forks = [request(i, params.choice(i)) for i in range(1, params.n)]
        return self._submit(parent)

    def conversation(self, conversation_id: str) -> ConversationInfo:
        self._resume(conversation_id)
        with self.scheduler.state_lock:
            conv = self._conversation(conversation_id)
            device, local, cached = conv.device_tokens, conv.local_tokens, conv.cached_tokens
            location: Literal["device", "host", "redis", "none"] = "none"
            if cached:
                location = "device" if cached == device else "host" if cached == local else "redis"
            return ConversationInfo(
                conversation_id=conversation_id,
                num_tokens=len(conv.token_ids),
                cached_tokens=cached,
                cache_location=location,
                device_tokens=device,
                host_tokens=local - device,
                redis_tokens=cached - local,
            )

    def conversation_tokens(self, conversation_id: str) -> list[int]:
        self._resume(conversation_id)
        with self.scheduler.state_lock:
            return list(self._conversation(conversation_id).token_ids)

    def delete_conversation(self, conversation_id: str) -> None:
        """Forget the conversation here and in Redis, with the KV of its chain nothing else holds."""
        self._resume(conversation_id)
        with self.scheduler.state_lock:
            if conversation_id in self.scheduler.busy_conversations():
                raise ConversationBusyError(f"conversation {conversation_id!r} has a request in progress")
            conv = self._conversation(conversation_id)
            if self.remote is not None:
                self.remote.forget(conv)
            chain = list(conv.chain)
            self.conversations.delete(conversation_id)
            self.tiers.purge(chain)

    @property
    def cache_degraded(self) -> bool:
        """Redis is configured but unreachable (requests recompute). Lock-free: for probes."""
        return self.tiers.redis is not None and self.tiers.redis.degraded

    def cache_stats(self) -> CacheStats:
        """Per-tier usage, hits, transfers and Redis health of the conversation caches (for metrics)."""
        with self.scheduler.state_lock:
            return self.tiers.stats()

    def close(self) -> None:
        """Stop the scheduler (requests still queued or running fail with CapacityError), then finish
        the Redis writes already queued, so another replica can resume what this one served."""
        self.scheduler.stop()
        self.tiers.close()

    # -- internals ----------------------------------------------------------------------------------

    def _graph_runner(
        self, loaded: LoadedModel, buffers: StepBuffers, make_graph: MakeGraph | None = None
    ) -> GraphRunner:
        """CUDA graphs over the step buffers (model/cuda_graphs.py); LoRA graphs follow the stacks."""
        from alora_core.lora.layer import MaskedLoRALinear

        def stacks() -> list[object]:
            return [
                m.group.stack for m in loaded.model.modules() if isinstance(m, MaskedLoRALinear) and m.group
            ]

        return GraphRunner(
            functools.partial(forward_eager, loaded.model, self.ctx),
            buffers,
            self.pool.kv,
            self.max_model_len,
            lora_state=lambda: tuple((id(s.weights), s.slots) for s in stacks()),  # type: ignore[attr-defined]
            lora_slots=lambda: frozenset().union(*(s.slots for s in stacks())),  # type: ignore[attr-defined]
            make_graph=make_graph,
        )

    def _submit(self, request: Request) -> "EngineHandle":
        handle = EngineHandle(request, self.scheduler.wake, self)
        self.scheduler.submit(request)
        return handle

    def _resume(self, conversation_id: str, required: bool = True) -> None:
        """A conversation this replica does not know may live in Redis (written by any replica).
        Its Redis node unreachable: CacheUnavailableError when the caller needs the conversation
        (an intrinsic on it, GET, DELETE); a /generate, whose input is the whole history, starts over."""
        if self.tiers.redis is None:
            return
        with self.scheduler.state_lock:
            if conversation_id in self.conversations:
                return
        try:
            meta = self.tiers.redis.lookup(conversation_id)  # network round trip: not under the lock
        except REDIS_ERRORS as exc:
            if not required:
                return
            raise CacheUnavailableError(
                f"conversation {conversation_id!r} is not cached on this replica and the Redis node "
                "holding it does not answer; retry shortly"
            ) from exc
        if meta is not None and (bad := invalid_token_ids(meta.token_ids, self.loaded.shape.vocab_size)):
            log.warning(  # requests skip checking a conversation's history: it is checked here, once
                "conversation %r in Redis holds token ids outside this model's vocabulary (%s): not resumed",
                conversation_id,
                bad[:8],
            )
            meta = None
        if meta is not None and self.remote is not None:
            with self.scheduler.state_lock:
                if conversation_id not in self.conversations:
                    self.remote.adopt(self.conversations.get_or_create(conversation_id), meta)
                    log.info(
                        "resumed a conversation from Redis: %d tokens, %d cached",
                        len(meta.token_ids),
                        meta.cached_tokens,
                    )

    def _await_handle_write(self, conversation_id: str) -> None:
        """A conversation whose KV this replica no longer holds locally is restored from Redis, and
        while its last turn's write is in flight only its whole values may be read (the write rewrites
        its tail): a short conversation would be recomputed whole. Wait here, on the caller's thread,
        for that write (bounded, as a resume waits), so the scheduler restores it instead."""
        redis = self.tiers.redis
        if redis is None:
            return
        with self.scheduler.state_lock:
            conv = self.conversations.get(conversation_id)
            if conv is None or conv.persist_pending is None or conv.local_tokens + 1 >= len(conv.token_ids):
                return  # no write in flight, or this replica still holds the history's KV
            key = conv.key
        redis.wait_written(key)

    def _conversation(self, conversation_id: str) -> Conversation:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            raise UnknownConversationError(f"unknown conversation {conversation_id!r}")
        return conv

    def _validate(self, input_ids: list[int], params: SamplingParams) -> None:
        validate(input_ids, params, self.loaded.shape.vocab_size, self.max_model_len, self.pool)

    def _grammar(self, params: SamplingParams) -> GrammarState | None:
        """A fresh matcher of the request's output constraint (compiled here, on the submitting
        thread, or found in the cache); InvalidRequestError when the constraint is invalid."""
        return None if params.constraint is None else self.grammars.matcher(params.constraint)

    def result_of(self, r: Request) -> GenerationResult:
        seq = r.seq
        assert seq is not None and seq.finish_reason is not None
        end = time.perf_counter()
        admitted = r.admitted_at or r.arrival
        return GenerationResult(
            conversation_id=r.conversation_id,
            adapter=r.adapter.spec.name if r.adapter is not None else None,
            token_ids=list(seq.output),
            text=seq.text(self.tokenizer),
            finish_reason=seq.finish_reason,
            usage=Usage(
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.output),
                cached_tokens=r.cached_tokens,
            ),
            ttft_s=(r.first_token_at or end) - r.arrival,
            total_s=end - r.arrival,
            queue_s=admitted - r.arrival,
            activation_start=seq.activation_start if seq.activation_start != NO_ACTIVATION else None,
            logits=torch.stack(seq.logits) if seq.logits else None,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None,
            error=seq.error,
            stop_reason=seq.stop_reason,
        )


def _tenant(conversation_id: str | None, tenant: str | None) -> str:
    """A request's tenant: a conversation key's namespace ('<tenant>:<id>'), or the one given."""
    if conversation_id is None:
        return tenant or ""
    owner = tenant_of(conversation_id)
    if tenant is not None and tenant != owner:
        raise InvalidRequestError("tenant does not match the conversation key's namespace")
    return owner


def _pool_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_fraction is None:
        return config.kv_cache_bytes
    if not 0 < config.kv_cache_fraction <= 1:
        raise ValueError(f"kv_cache_fraction must be in (0, 1], got {config.kv_cache_fraction}")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * config.kv_cache_fraction)


class EngineHandle(RequestHandle):
    """A submitted request: `result()` waits and returns its GenerationResult; `cancel()` stops it."""

    def __init__(self, request: Request, wake: Callable[[], None], engine: Engine) -> None:
        super().__init__(request, wake)
        self._engine = engine
        # n > 1: every choice, this one first (the others fork from it inside the engine)
        self.choices: list[EngineHandle] = [self] + [EngineHandle(f, wake, engine) for f in request.forks]

    def result(self, timeout: float | None = None) -> GenerationResult:
        request = super().result(timeout)
        assert isinstance(request, Request)
        return self._engine.result_of(request)
