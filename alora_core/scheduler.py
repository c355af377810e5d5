"""Continuous batching: one background thread packs every running sequence into each forward.

    loop:
        inbox -> waiting                              (bounded: OverloadedError when full)
        drop cancelled requests                       (blocks freed; its conversation never changed)
        admit waiting in FIFO order                   (KV blocks, max_num_seqs, per-conversation order)
        schedule: decodes first (1 token each), then prefill chunks, within max_num_batched_tokens
        out of KV -> demote idle conversation handles' blocks (kvcache.tiers), then preempt the newest
        one forward (step.run_step), emit tokens; new full blocks join the KV index
        finish: a /generate on a conversation moves its handle; every other request releases its
            blocks, which stay cached (evictable, LRU)
        idle blocks over the device budget -> demoted to host (-> Redis)

Every request reuses the longest cached prefix of its tokens, with or without a conversation
(kvcache.prefix_cache): blocks on the device are shared (reference counted), host ones copied back
at once, Redis ones fetched by an I/O thread while other requests keep running, or recomputed,
whichever the cost model says is cheaper.

Per conversation: at most one /generate runs, later requests on that conversation wait behind it,
and a /generate waits for earlier requests on its conversation; intrinsics run side by side,
sharing the conversation's blocks.
"""

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alora_core.context import activation_start, validate
from alora_core.errors import (
    AloraError,
    CapacityError,
    InvalidRequestError,
    OverloadedError,
    RequestCancelledError,
    UnknownConversationError,
)
from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.kvcache.conversations import Conversation, ConversationStore
from alora_core.kvcache.index import AdapterKey, BlockChain
from alora_core.kvcache.prefix_cache import Lookup, PrefixCache
from alora_core.kvcache.tiers import TieredCache
from alora_core.model.batch import ForwardContext
from alora_core.request import Request
from alora_core.sampling import TokenLogprobs
from alora_core.sequence import NO_ACTIVATION, Sequence
from alora_core.step import Work, run_step, sample_rows

log = logging.getLogger(__name__)

Admission = Literal["admitted", "no_kv", "fetching"]  # fetching: its cache is on its way from Redis


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences per step (1 = no batching)
    max_num_batched_tokens: int = 512  # new tokens per step: bounds decode latency during long prefills
    prefill_chunk_tokens: int = 512  # new tokens of one sequence per step
    max_waiting: int = 256  # queued requests before new ones get OverloadedError (HTTP 429)


@dataclass(frozen=True)
class ModelHandle:
    model: nn.Module
    ctx: ForwardContext
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    max_model_len: int


class Scheduler:
    def __init__(
        self,
        handle: ModelHandle,
        pool: BlockPool,
        conversations: ConversationStore,
        config: SchedulerConfig,
        tiers: TieredCache,
        prefix: PrefixCache,
    ) -> None:
        self.handle = handle
        self.pool = pool
        self.conversations = conversations
        self.config = config
        self.tiers = tiers
        self.prefix = prefix
        self._released = False  # blocks went back to the pool outside a finish: check the budget
        self.state_lock = threading.Lock()  # conversations + pool: held for a whole step
        self._inbox: deque[Request] = deque()
        self._inbox_cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._stopping = False
        self.preemptions = 0
        self._outbox: list[Callable[[], None]] = []  # deliveries to run once the step releases the lock
        self.step_observers: list[Callable[[list[Work]], None]] = []  # see each step's work (metrics, tests)
        self._thread = threading.Thread(target=self._loop, name="alora-scheduler", daemon=True)
        self._thread.start()

    # -- called from any thread ---------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._inbox_cv:
            if self._stopping:
                raise CapacityError("the engine is shutting down")
            if len(self._inbox) + len(self._waiting) >= self.config.max_waiting:
                raise OverloadedError(
                    f"{self.config.max_waiting} requests are already waiting", retry_after_s=1.0
                )
            self._inbox.append(request)
            self._inbox_cv.notify()

    def wake(self) -> None:
        with self._inbox_cv:
            self._inbox_cv.notify()

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self._waiting)

    def busy_conversations(self) -> set[str]:
        """Conversations a running or waiting request will read or write (do not delete them now)."""
        requests = [*self.running, *self._waiting, *self._inbox]
        return {r.conversation_id for r in requests if r.conversation_id is not None}

    def stop(self) -> None:
        with self._inbox_cv:
            self._stopping = True
            self._inbox_cv.notify()
        self._thread.join(timeout=30)

    # -- the scheduler thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._inbox_cv:
                while not (self._inbox or self._waiting or self.running or self._stopping):
                    self._inbox_cv.wait()
                if self._stopping:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            with self.state_lock:
                progressed = self._step_safely()
                outbox, self._outbox = self._outbox, []
            for (
                deliver
            ) in outbox:  # token callbacks and results, outside the lock: a slow consumer stalls no one
                deliver()
            if not progressed:  # waiting requests that cannot be admitted yet: do not spin
                with self._inbox_cv:  # a new request or a finished Redis fetch (wake) ends the wait
                    self._inbox_cv.wait(timeout=0.005)
        with self.state_lock:
            error = CapacityError("the engine shut down before the request finished")
            for r in [*self.running, *self._waiting, *self._inbox]:
                self._abort(r, error)

    def _step_safely(self) -> bool:
        work: list[Work] = []
        try:
            self._drop_cancelled()
            self._admit()
            work = self._schedule()
            if self._released:
                self._released = False
                self.tiers.enforce_budget(self.busy_conversations())
            if not work:
                return False
            for observe in self.step_observers:
                observe(work)
            h = self.handle
            t0 = time.perf_counter()
            run_step(work, h.model, h.ctx, self.pool, h.tokenizer, h.device)
            self.tiers.cost.observe_prefill(
                sum(end - start for _, start, end in work), time.perf_counter() - t0
            )
        except Exception as exc:  # a bug or a device error: fail the requests of this step, keep serving
            log.exception("engine step failed")
            failed = {id(seq) for seq, _, _ in work}
            for r in [r for r in self.running if id(r.seq) in failed]:
                self._abort(r, exc)
            return True
        self._after_step()
        return True

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancel_event.is_set()]:
            self._waiting.remove(r)
            self._release(r)
            r.fail(RequestCancelledError("request cancelled"))
        for r in [r for r in self.running if r.cancel_event.is_set()]:
            self._abort(r, RequestCancelledError("request cancelled"))

    def _admit(self) -> None:
        self.tiers.poll()  # Redis writes done, abandoned fetches freed
        blocked: set[str] = {
            r.conversation_id for r in self.running if r.kind == "generate" and r.conversation_id
        }
        pending: set[str] = set()  # conversations with an earlier request still waiting
        keep: deque[Request] = deque()
        seats = sum(_seats(r) for r in self.running)
        while self._waiting:
            r = self._waiting.popleft()
            key = r.conversation_id
            # an n > 1 request takes its choices' seats too (they fork from it at its first token);
            # one with more choices than max_num_seqs runs alone rather than never. No seat: strict
            # FIFO, as for KV (a smaller request behind it does not take the seats it waits for)
            if seats + _seats(r) > self.config.max_num_seqs and self.running:
                keep.append(r)
                keep.extend(self._waiting)
                self._waiting.clear()
                break
            if key is not None and (key in blocked or (r.kind == "generate" and key in pending)):
                keep.append(r)
            else:
                try:
                    admission = self._start(r)
                except AloraError as exc:
                    self._release(r)
                    r.fail(exc)
                    continue
                if admission == "no_kv":  # not enough KV now: strict FIFO, everything behind it waits too
                    keep.append(r)
                    keep.extend(self._waiting)
                    self._waiting.clear()
                    break
                if admission == "fetching":  # others go ahead while its cache comes from Redis
                    keep.append(r)
                else:
                    self.running.append(r)
                    seats += _seats(r)
            if key is not None:
                pending.add(key)
                if r.kind == "generate":
                    blocked.add(key)
        self._waiting = keep

    def _start(self, r: Request) -> Admission:
        """Resolve the context, restore its longest cached prefix from any tier, take KV blocks."""
        conv = self._conversation_of(r)
        if r.kind == "intrinsic" and r.conversation_id is not None and conv is None:
            raise UnknownConversationError(f"unknown conversation {r.conversation_id!r}")
        if r.seq is None:
            r.seq = self._new_sequence(r, conv)
        seq, prefix = r.seq, self.prefix
        if r.fetch is not None:  # its prefix is on its way from Redis
            if not prefix.collect(seq, r.fetch, r.hits):
                return "fetching"
            r.fetch = None
            return self._admitted(r, conv)
        if r.probe is not None:  # Redis was asked how far cached values go
            if not r.probe.job.done.is_set():
                return "fetching"
            r.probed_blocks, r.probe = prefix.probed_blocks(r.probe), None
        if r.params.prompt_logprobs is None:
            found = prefix.lookup(seq, conv, r.probed_blocks)
        else:  # its prompt rows need logits: it computes them all, reusing nothing
            found, r.probed_blocks = Lookup([], 0, 0, 0), 0
        if conv is None and r.probed_blocks is None:
            r.probe, r.probed_blocks = prefix.probe(seq, found), 0
            if r.probe is not None:
                prefix.unpin(found)
                return "fetching"
        bs = self.pool.block_size
        # blocks to take: all but the device ones it reuses (restored ones come out of this too)
        need = -(-seq.num_tokens // bs) - found.device_tokens // bs + 1
        if self.pool.num_free < need:
            self.tiers.make_room(need, protect=self._protected(r))
            if self.pool.num_free < need:
                prefix.unpin(found)
                return "no_kv"
        if r.admitted_at is None:
            r.wanted, r.handle_tokens = found.want, found.handle_tokens
        r.fetch = prefix.restore(seq, found, self.tiers.plan(found, found.want), r.hits)
        return "fetching" if r.fetch is not None else self._admitted(r, conv)

    def _admitted(self, r: Request, conv: Conversation | None) -> Admission:
        seq = r.seq
        assert seq is not None
        if conv is not None and r.handle_tokens:
            self.prefix.attach(conv, seq, r.handle_tokens)
        if r.admitted_at is None:
            r.admitted_at = time.perf_counter()
            r.cached_tokens = seq.table.num_tokens
            kind = r.adapter.spec.kind if r.adapter is not None else "base"
            self.prefix.count(kind, len(seq.prompt), r.hits, r.wanted - r.cached_tokens)
        r.hits.clear()
        return "admitted"

    def _new_sequence(self, r: Request, conv: Conversation | None) -> Sequence:
        h = self.handle
        if r.input_ids is not None:
            context = list(r.input_ids)
            checked = len(context)  # by the engine, at submission
        else:
            assert conv is not None and r.adapter is not None
            if not conv.token_ids:
                raise InvalidRequestError(f"conversation {r.conversation_id!r} is empty: nothing to run on")
            checked = len(conv.token_ids)
            context = conv.token_ids + list(r.adapter.spec.invocation_tokens or ())
        validate(context, r.params, h.vocab_size, h.max_model_len, self.pool, checked)
        start, key = NO_ACTIVATION, None
        if r.adapter is not None:
            spec = r.adapter.spec
            start = activation_start(r.adapter, context) if spec.kind == "alora" else 0
            key = AdapterKey.of(spec.name, spec.digest, start)
        root = self.prefix.index.root(r.tenant, r.cache_salt)
        return Sequence(
            prompt=context,
            table=BlockTable(self.pool),
            chain=BlockChain(root, self.pool.block_size, key),
            params=r.params,
            max_model_len=h.max_model_len,
            eos_token_ids=h.eos_token_ids,
            adapter_slot=r.adapter.slot if r.adapter is not None else None,
            activation_start=start,
            generator=r.params.generator(h.device),
            grammar=r.grammar,
        )

    def _conversation_of(self, r: Request) -> Conversation | None:
        return self.conversations.get(r.conversation_id) if r.conversation_id is not None else None

    def _protected(self, r: Request | None = None) -> frozenset[str]:
        keys = {x.conversation_id for x in self.running if x.conversation_id is not None}
        if r is not None and r.conversation_id is not None:
            keys.add(r.conversation_id)
        return frozenset(keys)

    def _schedule(self) -> list[Work]:
        budget = self.config.max_num_batched_tokens
        decodes = [
            r for r in self.running if r.seq is not None and r.seq.num_tokens - r.seq.table.num_tokens == 1
        ]
        prefills = [r for r in self.running if r not in decodes]
        work: list[Work] = []
        scheduled: set[int] = set()
        for r in decodes + prefills:
            if budget <= 0:
                break
            if r not in self.running:  # preempted to make room for an earlier one
                continue
            seq = r.seq
            assert seq is not None
            start, end = seq.next_feed(min(budget, self.config.prefill_chunk_tokens))
            if not self._reserve(r, end, scheduled):
                continue
            work.append((seq, start, end))
            scheduled.add(id(r))
            budget -= end - start
        return work

    def _reserve(self, r: Request, end: int, scheduled: set[int]) -> bool:
        assert r.seq is not None
        while True:
            try:
                r.seq.table.reserve(end)
                return True
            except CapacityError:
                missing = -(-end // self.pool.block_size) - len(r.seq.table.blocks)
                self.tiers.make_room(missing, protect=self._protected())
                if self.pool.num_free >= missing:
                    continue
                victims = [x for x in reversed(self.running) if x is not r and id(x) not in scheduled]
                if victims:
                    self._preempt(victims[0])
                    continue
                if len(self.running) == 1 and r.seq.output:  # alone and still too big: stop here
                    r.seq.finish_reason = "length"
                    self._finish(r)
                    return False
                self._preempt(r)
                return False

    def _preempt(self, r: Request) -> None:
        """Free the request's KV and put it first in line; its tokens so far are recomputed later."""
        self._release(r)
        self.running.remove(r)
        self._waiting.appendleft(r)
        r.preemptions += 1
        self.preemptions += 1
        log.info("preempted a %s request (KV full); it will be recomputed", r.kind)

    def _release(self, r: Request) -> None:
        """Give back the request's blocks (cached ones stay in the index) and any fetch in flight."""
        if r.fetch is not None:
            self.tiers.abandon(r.fetch)
            r.fetch = None
        r.probe = None
        if r.seq is not None:
            r.seq.table.free()
            self._released = True

    def _after_step(self) -> None:
        now = time.perf_counter()
        finished = False
        for r in self.running:  # blocks filled by this step join the index
            assert r.seq is not None
            self.prefix.register(r.seq)
        for r in [r for r in self.running if r.forks and r.seq is not None and r.seq.fork_logits is not None]:
            self._spawn_forks(r)  # after register: the choices share the prompt's indexed blocks
        for r in list(self.running):
            seq = r.seq
            assert seq is not None
            if seq.output and r.first_token_at is None:
                r.first_token_at = now
            if (r.on_token is not None or r.on_sample is not None) and len(seq.output) > r.emitted:
                emit = functools.partial(_emit, r, seq.output[r.emitted :], seq.logprobs[r.emitted :])
                self._outbox.append(emit)
            r.emitted = len(seq.output)
            if seq.finished:
                self._finish(r)
                finished = True
        if finished:
            self.tiers.enforce_budget(self.busy_conversations())

    def _spawn_forks(self, r: Request) -> None:
        """n > 1: r just sampled its first token. Its other choices fork its prompt's KV (full blocks
        shared, the partly filled last one copied) and sample their first token from the same
        logits, so the prompt is computed once. A choice that finds no free block for its copy
        queues to recompute its prompt instead."""
        seq = r.seq
        assert seq is not None and seq.fork_logits is not None
        logits, seq.fork_logits = seq.fork_logits, None
        forks, r.forks = r.forks, []
        for child in forks:
            child.admitted_at, child.cached_tokens = r.admitted_at, r.cached_tokens
            if child.cancel_event.is_set():
                child.fail(RequestCancelledError("request cancelled"))
                continue
            try:
                table = seq.table.fork(len(seq.prompt))
            except CapacityError:
                child.seq = seq.fork(child.params, BlockTable(self.pool), self.handle.device, child.grammar)
                self._waiting.appendleft(child)
                continue
            child.seq = seq.fork(child.params, table, self.handle.device, child.grammar)
            sample_rows(logits[None], [child.seq], self.handle.tokenizer)
            self.running.append(child)

    def _finish(self, r: Request) -> None:
        seq = r.seq
        assert seq is not None
        if r.kind == "generate" and r.conversation_id is not None:
            self.prefix.commit(r.conversation_id, seq)
        else:
            self.prefix.finish(seq)
        self.running.remove(r)
        self._outbox.append(functools.partial(_resolve, r))

    def _abort(self, r: Request, error: BaseException) -> None:
        self._release(r)
        if r in self.running:
            self.running.remove(r)
        if r in self._waiting:
            self._waiting.remove(r)
        r.fail(error)


def _emit(r: Request, tokens: list[int], logprobs: list[TokenLogprobs]) -> None:
    for i, token in enumerate(tokens):
        if r.cancel_event.is_set():
            return
        try:
            if r.on_sample is not None:
                r.on_sample(token, logprobs[i] if i < len(logprobs) else None)
            elif r.on_token is not None:
                r.on_token(token)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("on_token callback failed; cancelling its request")
            r.cancel_event.set()
            return


def _resolve(r: Request) -> None:
    if not r.future.done():
        r.future.set_result(r)


def _seats(r: Request) -> int:
    """Sequences a request runs as: itself and the choices that will fork from it (n > 1)."""
    return 1 + len(r.forks)
