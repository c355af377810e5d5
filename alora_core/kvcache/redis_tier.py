"""The Redis tier: the shared cold copy of the KV index, written behind and read ahead.

    alora:kv2:<model fingerprint>:<tenant digest>:{<chain hash>}                   a value: blocks
        [g*K, e) of a chain (K blocks per group, e <= (g+1)*K), keyed by the hash of its last block
    alora:kv2:<model fingerprint>:<tenant digest>:{<conversation digest>}:meta     a conversation's
        handle (JSON: token ids, salt, extent)
    alora:kv2:<model fingerprint>:<tenant digest>:{<conversation digest>}:tail     its partly filled
        last block

Every value key has its own hash tag (the chain hash), so values spread over Redis Cluster slots; a
conversation's meta and tail share one and are written in one MULTI/EXEC. Values are aligned on
groups of K blocks from position 0, so any replica names the values of any prefix from its token
ids alone (index.py) and a lookup probes values, not blocks. Two daemon threads do all the I/O
through one KVClient (standalone, Sentinel or Cluster: redis_url.py): the scheduler thread never
waits on Redis. A Redis error opens its node's circuit breaker (redis_health.py): the tier reports
degraded, keys on that node are recomputed, writes are skipped, and the write thread probes the node
with backoff (and refreshes a Cluster's slot map), so a Redis that comes back, or a replica that took
over, is used without a restart.
"""

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import nullcontext

import torch

from alora_core.kvcache.codec import (
    FORMAT_VERSION,
    ChunkHeader,
    CorruptEntry,
    KVLayout,
    RemoteMeta,
    decode_meta,
    decode_value,
    digest,
    encode_value,
    tenant_of,
)
from alora_core.kvcache.cost_model import CostModel
from alora_core.kvcache.index import BlockChain, make_root
from alora_core.kvcache.redis_client import REDIS_ERRORS, UNREACHABLE, KVClient
from alora_core.kvcache.redis_jobs import FetchJob, ProbeJob, ValueWrite, WriteJob
from alora_core.kvcache.redis_url import connect
from alora_core.kvcache.stats import CacheCounters

log = logging.getLogger(__name__)


Delete = tuple[str, list[str]]  # (conversation, keys): forget a handle and its values


class RedisTier:
    def __init__(
        self,
        url: str,
        ttl_s: int,
        layout: KVLayout,
        blocks_per_value: int,
        counters: CacheCounters,
        cost: CostModel,
        wake: Callable[[], None],
        max_pending_write_bytes: int = 256 << 20,
        timeout_s: float = 2.0,
        client: KVClient | None = None,
    ) -> None:
        self.layout = layout
        self.ttl_s = ttl_s
        self.blocks_per_value = blocks_per_value
        self.chunk_tokens = blocks_per_value * layout.block_size
        self.counters = counters
        self.cost = cost
        self.max_pending_write_bytes = max_pending_write_bytes
        self._wake = wake
        self._client: KVClient = client if client is not None else connect(url, timeout_s)
        self.health = self._client.health
        self._cv = threading.Condition()
        self._writes: deque[WriteJob | Delete] = deque()
        self._reads: deque[FetchJob | ProbeJob] = deque()
        self._done: deque[WriteJob] = deque()
        self._busy_writes = 0
        self._pending_keys: Counter[str] = Counter()  # conversations with a write or delete queued
        self.pending_write_bytes = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._write_loop, name="alora-redis-write", daemon=True),
            threading.Thread(target=self._read_loop, name="alora-redis-fetch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- keys -----------------------------------------------------------------------------------------

    def _tenant_prefix(self, tenant: str) -> str:
        return f"alora:kv{FORMAT_VERSION}:{self.layout.fingerprint}:{digest(tenant)}"

    def value_key(self, tenant: str, chain_hash: int) -> str:
        return f"{self._tenant_prefix(tenant)}:{{{chain_hash:016x}}}"

    def _handle_prefix(self, key: str) -> str:
        return f"{self._tenant_prefix(tenant_of(key))}:{{{digest(key, 32)}}}"

    def meta_key(self, key: str) -> str:
        return f"{self._handle_prefix(key)}:meta"

    def tail_key(self, key: str) -> str:
        return f"{self._handle_prefix(key)}:tail"

    def value_groups(self, first_block: int, end_block: int, written_end: int) -> list[tuple[int, int]]:
        """[start, end) blocks of each value covering blocks [first_block, end_block) of a chain whose
        values were written up to block written_end: groups of K from 0, the last one shorter."""
        k = self.blocks_per_value
        return [
            (g * k, min((g + 1) * k, written_end))
            for g in range(first_block // k, -(-min(end_block, written_end) // k))
        ]

    def chunk_key(self, conversation: str, index: int) -> str:
        """The key of value `index` of a conversation Redis holds (its tail after the last group), for
        tests and operators: reads its handle, names the value from its token ids."""
        meta = self.lookup(conversation)
        assert meta is not None, f"Redis holds no conversation {conversation!r}"
        bs = self.layout.block_size
        n = meta.cached_tokens // bs
        groups = self.value_groups(0, n, n)
        if index >= len(groups):
            return self.tail_key(conversation)
        chain = BlockChain(make_root(self.layout.fingerprint, tenant_of(conversation), meta.salt), bs)
        chain.hash_blocks(meta.token_ids, n)
        return self.value_key(chain.root.tenant, chain.hashes[groups[index][1] - 1])

    # -- called from any thread -----------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """Some Redis node is unreachable (its keys are recomputed, writes are skipped)."""
        return self.health.degraded

    @property
    def readable(self) -> bool:
        """Some node answers: a restore or probe may find values (those on an open node read as missing)."""
        return self.health.usable

    def writable(self) -> bool:
        return not self.health.degraded

    def lookup(self, key: str, wait_s: float = 5.0) -> RemoteMeta | None:
        """The conversation's handle, if Redis has a valid one (any replica may have written it).
        A write of it still queued here is waited for: it may have just left the local store. Raises
        the client's error (REDIS_ERRORS) when the node holding it cannot answer: unknown, not absent."""
        self.wait_written(key, wait_s)
        t0 = time.perf_counter()
        raw = self._client.getex(self.meta_key(key), self.ttl_s)  # errors: counted by the client
        self.cost.observe_redis_latency(time.perf_counter() - t0)
        if raw is None:
            return None
        try:
            return decode_meta(raw, self.layout, self.blocks_per_value, key)
        except CorruptEntry as exc:
            self.counters.discarded_entries[exc.reason] += 1
            log.warning("discarded the Redis metadata of a conversation: %s", exc)
            return None

    def wait_written(self, key: str, wait_s: float = 5.0) -> bool:
        """Until no write of conversation `key` is queued or in flight here (at most wait_s): whether
        none is."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while self._pending_keys[key] and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            return not self._pending_keys[key]

    def submit_write(self, job: WriteJob) -> bool:
        with self._cv:
            if self.health.degraded or self.pending_write_bytes + job.nbytes > self.max_pending_write_bytes:
                self.counters.redis_writes_skipped += 1
                return False
            self.pending_write_bytes += job.nbytes
            if job.conversation is not None:
                self._pending_keys[job.conversation] += 1
            self._writes.append(job)
            self._cv.notify_all()
        return True

    def submit_delete(self, conversation: str, value_keys: list[str]) -> None:
        """Forget a conversation's handle (meta, tail) and the given values."""
        with self._cv:
            self._pending_keys[conversation] += 1
            self._writes.append((conversation, value_keys))
            self._cv.notify_all()

    def submit_read(self, job: FetchJob | ProbeJob) -> None:
        with self._cv:
            self._reads.append(job)
            self._cv.notify_all()

    def completed_writes(self) -> list[WriteJob]:
        done = []
        while self._done:
            done.append(self._done.popleft())
        return done

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted write and delete has been attempted."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._writes or self._busy_writes:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, flush_timeout_s: float = 10.0) -> None:
        self.flush(flush_timeout_s)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        self._client.close()

    # -- the write thread -----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                if not self._writes and not self._closed:
                    self._cv.wait(timeout=1.0)  # idle: wake up anyway to probe unreachable nodes
                if self._closed and not self._writes:
                    return
                item = self._writes.popleft() if self._writes else None
                self._busy_writes += 1
            try:
                self._client.recover()  # a no-op unless a node is due for a probe (or a slot moved)
                if isinstance(item, WriteJob):
                    self._write(item)
                elif item is not None:
                    self._delete(*item)
            except Exception:  # a bug: this write is lost, the thread lives on
                log.exception("Redis write failed")
            finally:
                with self._cv:
                    self._busy_writes -= 1
                    if isinstance(item, WriteJob):
                        self.pending_write_bytes -= item.nbytes
                        self._done.append(item)
                    conversation = item.conversation if isinstance(item, WriteJob) else item and item[0]
                    if conversation:
                        self._pending_keys[conversation] -= 1
                        if not self._pending_keys[conversation]:
                            del self._pending_keys[conversation]
                    self._cv.notify_all()

    def _write(self, job: WriteJob) -> None:
        if self.health.degraded:
            self.counters.redis_writes_skipped += 1
            return
        t0 = time.perf_counter()
        if job.ready is not None:
            job.ready.synchronize()

        def encode(v: ValueWrite) -> bytearray:
            payload = job.blocks[v.row : v.row + v.header.num_blocks]
            return encode_value(self.layout, job.tenant, v.header, payload)

        values = [(v.key, encode(v)) for v in job.values]
        handle = (
            [(self.tail_key(job.conversation), encode(job.tail))] if job.tail and job.conversation else []
        )
        if job.meta is not None and job.conversation is not None:
            handle.append((self.meta_key(job.conversation), job.meta))
        try:
            if values:
                self._client.set_many(values, self.ttl_s)
            if handle:  # after its values: a handle never names a value not yet written
                self._client.set_atomic(handle, self.ttl_s)
            if job.touch:
                self._client.expire(job.touch, self.ttl_s)
            if job.delete:
                self._client.delete(job.delete)
        except REDIS_ERRORS:  # counted by the client; the job settles as failed (rewritten later)
            return
        job.ok = True
        nbytes = sum(len(v) for _, v in values + handle)
        self.counters.transfer("to_redis", nbytes, time.perf_counter() - t0)

    def _delete(self, conversation: str, value_keys: list[str]) -> None:
        if self.health.degraded:
            self.counters.redis_writes_skipped += 1
            return
        with contextlib.suppress(*REDIS_ERRORS):  # counted by the client; values expire with their TTL
            self._client.delete([self.meta_key(conversation), self.tail_key(conversation), *value_keys])

    # -- the read thread ------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            with self._cv:
                while not self._reads and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._reads:
                        job.done.set()
                    return
                job = self._reads.popleft()
            try:
                if isinstance(job, FetchJob):
                    self._fetch(job)
                else:
                    self._probe(job)
            except Exception:  # a bug: this read restores nothing, the thread lives on
                log.exception("Redis read failed")
            finally:
                job.done.set()
                self._wake()

    def _probe(self, job: ProbeJob) -> None:
        if not self.readable:
            return
        t0 = time.perf_counter()
        try:
            job.exists = self._client.exists_many(job.keys)  # keys on an unreachable node: False
        except REDIS_ERRORS:
            return
        self.cost.observe_redis_latency(time.perf_counter() - t0)

    def _fetch(self, job: FetchJob) -> None:
        if not self.readable:
            return
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(job.pool.kv.device) if job.pool.kv.is_cuda else None
        filling, unreachable = True, False
        try:  # every reply is read, even after a refused one: the connection stays in step
            replies = self._client.get_many([key for key, _ in job.values], self.ttl_s)
            for (key, header), value in zip(job.values, replies, strict=True):
                unreachable |= value is UNREACHABLE
                if filling:
                    filling = self._accept(job, key, value, header, stream)
        except REDIS_ERRORS:
            return
        if stream is not None:
            job.copied = torch.cuda.Event()
            job.copied.record(stream)
        job.seconds = time.perf_counter() - t0
        if not unreachable:  # a node failing says nothing about the bandwidth of the others
            self.cost.observe_transfer("redis", job.filled_blocks * self.layout.bytes_per_block, job.seconds)

    def _accept(self, job: FetchJob, key: str, value: object, header: ChunkHeader, stream: object) -> bool:
        reason = None
        if value is UNREACHABLE:  # its node is down (counted as an error): a gap, not a bad value
            return False
        if value is None:
            reason = "missing"
        elif not isinstance(value, bytes):
            reason = "corrupt"
        else:
            try:
                payload = decode_value(value, self.layout, job.tenant, header)
            except CorruptEntry as exc:
                reason = exc.reason
                log.warning("discarded Redis value %s: %s", key, exc)
            else:
                with torch.cuda.stream(stream) if isinstance(stream, torch.cuda.Stream) else nullcontext():
                    if job.accept(header, payload):
                        return True
                reason = "stale"
        self.counters.discarded_entries[reason] += 1
        return False
