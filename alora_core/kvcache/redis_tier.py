"""The Redis tier: the shared cold copy of conversation caches, written behind and read ahead.

    alora:kv1:<model fingerprint>:<tenant digest>:{<conversation digest>}:meta   JSON: token ids, extent
    alora:kv1:<model fingerprint>:<tenant digest>:{<conversation digest>}:kv:<i> chunk i: blocks
                                                       [i*K, (i+1)*K) of the conversation (codec.py)

K = blocks per value (a few MB). The `{...}` hash tag keeps a conversation in one Redis Cluster slot.
A write replaces a conversation's chunks and metadata in one MULTI/EXEC; reads are GETEX (TTL
refreshed on access), pipelined FETCH_WINDOW deep. Two daemon threads do all the I/O: the scheduler
thread never waits on Redis. Any Redis error marks the tier degraded (callers recompute) and opens a
circuit breaker that retries with backoff, so a Redis that comes back is used again without a restart.
"""

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.codec import (
    FORMAT_VERSION,
    ChunkHeader,
    CorruptEntry,
    KVLayout,
    RemoteMeta,
    decode_meta,
    decode_value,
    digest,
    encode_meta,
    encode_value,
    prefix_hashes,
    tenant_of,
)
from alora_core.kvcache.cost_model import CostModel
from alora_core.kvcache.host_tier import copy_blocks
from alora_core.kvcache.stats import CacheCounters

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.RedisError, OSError)
# Chunk reads in flight on one connection. Redis copies each reply into its output buffer before
# sending: with the whole conversation requested at once that buffer grows to the conversation's
# size (fresh pages, faulted in, every restore); a few values in flight keep it small and reused.
FETCH_WINDOW = 2


@dataclass
class WriteJob:
    """Persist the KV of token_ids[:cached_tokens]; chunks before first_chunk are already there."""

    key: str
    version: int
    token_ids: list[int]
    cached_tokens: int
    first_chunk: int
    blocks: torch.Tensor  # [n, *block_shape] on CPU: the conversation's blocks from first_chunk * K
    old_chunks: int  # chunks Redis may hold from an earlier write: those past the new end are deleted
    ready: "torch.cuda.Event | None" = None  # device -> host copy of `blocks` in flight

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()


@dataclass(frozen=True)
class WriteDone:
    key: str
    version: int
    cached_tokens: int
    num_chunks: int
    ok: bool


@dataclass
class FetchJob:
    """Restore token_ids[first_block * bs : end_token] of a conversation (Redis holds its
    token_ids[:cached_tokens]) straight into `blocks`, pool blocks the job owns until it is collected.

    The I/O thread reads the values one by one and copies each valid one into its blocks while the
    next arrives; it stops filling at the first missing or refused value."""

    key: str
    version: int  # the conversation's version when the job was made
    token_ids: list[int]
    cached_tokens: int
    pool: BlockPool
    first_block: int
    end_token: int
    blocks: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    filled_blocks: int = 0
    filled_tokens: int = 0  # restored positions end here
    copied: "torch.cuda.Event | None" = None  # CUDA: the last copy into `blocks`
    seconds: float = 0.0

    def chunk_range(self, chunk_tokens: int) -> range:
        return range(
            self.first_block * self.pool.block_size // chunk_tokens, -(-self.end_token // chunk_tokens)
        )

    def accept(self, header: ChunkHeader, payload: torch.Tensor) -> bool:
        """Copy the blocks of a valid value that continue what is filled. False: a gap."""
        lo = self.first_block + self.filled_blocks
        hi = min(header.first_block + header.num_blocks, self.first_block + len(self.blocks))
        if not header.first_block <= lo < hi:
            return False
        rows = list(range(lo - header.first_block, hi - header.first_block))
        copy_blocks(
            self.pool,
            self.blocks[lo - self.first_block : hi - self.first_block],
            payload,
            rows,
            to_pool=True,
            side_thread=True,  # the fetch thread
        )
        self.filled_blocks = hi - self.first_block
        self.filled_tokens = min(
            hi * self.pool.block_size, header.first_block * self.pool.block_size + header.num_tokens
        )
        return True


class _Breaker:
    """Degraded after any error; the next attempt is allowed after a backoff (0.5 s doubling to 5 s)."""

    def __init__(self, counters: CacheCounters) -> None:
        self.counters = counters
        self.degraded = False
        self._retry_at = 0.0
        self._backoff = 0.5
        self._lock = threading.Lock()

    def allow(self) -> bool:
        return not self.degraded or time.monotonic() >= self._retry_at

    def ok(self) -> None:
        if self.degraded:
            log.warning("Redis is reachable again: the Redis cache tier is back in use")
        with self._lock:
            self.degraded = False
            self._backoff = 0.5

    def failed(self, exc: BaseException) -> None:
        self.counters.redis_errors += 1
        with self._lock:
            if not self.degraded:
                log.warning("Redis cache tier degraded (requests recompute): %s", exc)
            self.degraded = True
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)


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
    ) -> None:
        self.layout = layout
        self.ttl_s = ttl_s
        self.blocks_per_value = blocks_per_value
        self.chunk_tokens = blocks_per_value * layout.block_size
        self.counters = counters
        self.cost = cost
        self.max_pending_write_bytes = max_pending_write_bytes
        self._wake = wake
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            socket_read_size=1 << 20,
        )
        self._breaker = _Breaker(counters)
        self._cv = threading.Condition()
        self._writes: deque[WriteJob | tuple[str, int]] = deque()  # a tuple is a delete (key, chunks)
        self._fetches: deque[FetchJob] = deque()
        self._done: deque[WriteDone] = deque()
        self._busy_writes = 0
        self._pending_keys: Counter[str] = Counter()  # conversations with a write or delete queued
        self.pending_write_bytes = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._write_loop, name="alora-redis-write", daemon=True),
            threading.Thread(target=self._fetch_loop, name="alora-redis-fetch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- keys -----------------------------------------------------------------------------------------

    def _prefix(self, key: str) -> str:
        return f"alora:kv{FORMAT_VERSION}:{self.layout.fingerprint}:{digest(tenant_of(key))}:{{{digest(key, 32)}}}"

    def meta_key(self, key: str) -> str:
        return f"{self._prefix(key)}:meta"

    def chunk_key(self, key: str, index: int) -> str:
        return f"{self._prefix(key)}:kv:{index}"

    def chunk_headers(self, token_ids: list[int], cached_tokens: int) -> list[ChunkHeader]:
        """What the values of a conversation holding token_ids[:cached_tokens] must say."""
        bs, k = self.layout.block_size, self.blocks_per_value
        ends = [
            min((i + 1) * self.chunk_tokens, cached_tokens)
            for i in range(-(-cached_tokens // self.chunk_tokens))
        ]
        hashes = prefix_hashes(token_ids, ends)
        return [
            ChunkHeader(i * k, -(-end // bs) - i * k, end - i * k * bs, h)
            for i, (end, h) in enumerate(zip(ends, hashes, strict=True))
        ]

    # -- called from any thread -----------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self._breaker.degraded

    def writable(self) -> bool:
        return self._breaker.allow()

    def lookup(self, key: str, wait_s: float = 5.0) -> RemoteMeta | None:
        """The conversation's metadata, if Redis has a valid one (any replica may have written it).
        A write of it still queued here is waited for: it may have just left the local store."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while self._pending_keys[key] and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
        if not self._breaker.allow():
            return None
        t0 = time.perf_counter()
        try:
            raw = self._client.getex(self.meta_key(key), ex=self.ttl_s)
        except REDIS_ERRORS as exc:
            self._breaker.failed(exc)
            return None
        self._breaker.ok()
        self.cost.observe_redis_latency(time.perf_counter() - t0)
        if not isinstance(raw, bytes):
            return None
        try:
            return decode_meta(raw, self.layout, self.blocks_per_value, key)
        except CorruptEntry as exc:
            self.counters.discarded_entries[exc.reason] += 1
            log.warning("discarded the Redis metadata of a conversation: %s", exc)
            return None

    def submit_write(self, job: WriteJob) -> bool:
        with self._cv:
            if (
                not self._breaker.allow()
                or self.pending_write_bytes + job.nbytes > self.max_pending_write_bytes
            ):
                self.counters.redis_writes_skipped += 1
                return False
            self.pending_write_bytes += job.nbytes
            self._pending_keys[job.key] += 1
            self._writes.append(job)
            self._cv.notify_all()
        return True

    def submit_delete(self, key: str, num_chunks: int) -> None:
        with self._cv:
            self._pending_keys[key] += 1
            self._writes.append((key, num_chunks))
            self._cv.notify_all()

    def submit_fetch(self, job: FetchJob) -> None:
        with self._cv:
            self._fetches.append(job)
            self._cv.notify_all()

    def completed_writes(self) -> list[WriteDone]:
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

    # -- the I/O threads ------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._writes and not self._closed:
                    if not self._cv.wait(timeout=1.0) and self._breaker.degraded and self._breaker.allow():
                        break  # idle and degraded: probe, so /ready recovers without traffic
                if self._closed and not self._writes:
                    return
                item = self._writes.popleft() if self._writes else None
                self._busy_writes += 1
            try:
                if item is None:
                    self._probe()
                elif isinstance(item, WriteJob):
                    self._write(item)
                else:
                    self._delete(*item)
            except Exception:  # a bug: this write is lost, the thread lives on
                log.exception("Redis write failed")
                if isinstance(item, WriteJob):
                    self._done.append(WriteDone(item.key, item.version, item.cached_tokens, 0, False))
            finally:
                with self._cv:
                    self._busy_writes -= 1
                    if isinstance(item, WriteJob):
                        self.pending_write_bytes -= item.nbytes
                    if item is not None:
                        key = item.key if isinstance(item, WriteJob) else item[0]
                        self._pending_keys[key] -= 1
                        if not self._pending_keys[key]:
                            del self._pending_keys[key]
                    self._cv.notify_all()

    def _probe(self) -> None:
        try:
            self._client.ping()
        except REDIS_ERRORS as exc:
            self._breaker.failed(exc)
        else:
            self._breaker.ok()

    def _write(self, job: WriteJob) -> None:
        num_chunks = -(-job.cached_tokens // self.chunk_tokens)
        ok = False
        if self._breaker.allow():
            t0 = time.perf_counter()
            if job.ready is not None:
                job.ready.synchronize()
            tenant = tenant_of(job.key)
            headers = self.chunk_headers(job.token_ids, job.cached_tokens)
            base = job.first_chunk * self.blocks_per_value
            pipe = self._client.pipeline(transaction=True)
            nbytes = 0
            for i in range(job.first_chunk, num_chunks):
                h = headers[i]
                payload = job.blocks[h.first_block - base : h.first_block - base + h.num_blocks]
                value = encode_value(self.layout, tenant, h, payload)
                nbytes += len(value)
                pipe.set(self.chunk_key(job.key, i), value, ex=self.ttl_s)
            for i in range(job.first_chunk):
                pipe.expire(self.chunk_key(job.key, i), self.ttl_s)
            for i in range(num_chunks, job.old_chunks):
                pipe.delete(self.chunk_key(job.key, i))
            meta = RemoteMeta(job.key, job.token_ids, job.cached_tokens, num_chunks)
            pipe.set(
                self.meta_key(job.key), encode_meta(self.layout, self.blocks_per_value, meta), ex=self.ttl_s
            )
            try:
                pipe.execute()
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc)
            else:
                self._breaker.ok()
                ok = True
                self.counters.transfer("to_redis", nbytes, time.perf_counter() - t0)
        else:
            self.counters.redis_writes_skipped += 1
        self._done.append(WriteDone(job.key, job.version, job.cached_tokens, num_chunks, ok))

    def _delete(self, key: str, num_chunks: int) -> None:
        if not self._breaker.allow():
            self.counters.redis_writes_skipped += 1
            return
        try:
            self._client.delete(self.meta_key(key), *(self.chunk_key(key, i) for i in range(num_chunks)))
        except REDIS_ERRORS as exc:
            self._breaker.failed(exc)
        else:
            self._breaker.ok()

    def _fetch_loop(self) -> None:
        while True:
            with self._cv:
                while not self._fetches and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._fetches:
                        job.done.set()
                    return
                job = self._fetches.popleft()
            try:
                self._fetch(job)
            except Exception:  # a bug: this fetch restores nothing, the thread lives on
                log.exception("Redis fetch failed")
            finally:
                job.done.set()
                self._wake()

    def _fetch(self, job: FetchJob) -> None:
        if not self._breaker.allow():
            return
        t0 = time.perf_counter()
        chunks = job.chunk_range(self.chunk_tokens)
        headers = self.chunk_headers(job.token_ids, job.cached_tokens)
        tenant = tenant_of(job.key)
        commands: list[tuple[str | int, ...]] = [
            ("GETEX", self.chunk_key(job.key, i), "EX", self.ttl_s) for i in chunks
        ]
        commands.append(("EXPIRE", self.meta_key(job.key), self.ttl_s))
        stream = torch.cuda.Stream(job.pool.kv.device) if job.pool.kv.is_cuda else None
        pool = self._client.connection_pool
        conn = None
        try:  # FETCH_WINDOW requests in flight: a reply is checked and copied while the next arrives
            conn = pool.get_connection()
            conn.send_packed_command(conn.pack_commands(commands[:FETCH_WINDOW]))
            filling = True
            for n, i in enumerate(chunks):
                value = _read_response(conn)
                if n + FETCH_WINDOW < len(commands):
                    conn.send_packed_command(conn.pack_command(*commands[n + FETCH_WINDOW]))
                if filling:
                    filling = self._accept(job, i, value, headers[i], tenant, stream)
            _read_response(conn)
        except REDIS_ERRORS as exc:
            if conn is not None:
                conn.disconnect()
            self._breaker.failed(exc)
            return
        finally:
            if conn is not None:
                pool.release(conn)
        self._breaker.ok()
        if stream is not None:
            job.copied = torch.cuda.Event()
            job.copied.record(stream)
        job.seconds = time.perf_counter() - t0
        self.cost.observe_transfer("redis", job.filled_blocks * self.layout.bytes_per_block, job.seconds)

    def _accept(
        self, job: FetchJob, index: int, value: object, header: ChunkHeader, tenant: str, stream: object
    ) -> bool:
        reason = None
        if value is None:
            reason = "missing"
        elif not isinstance(value, bytes):
            reason = "corrupt"
        else:
            try:
                payload = decode_value(value, self.layout, tenant, header)
            except CorruptEntry as exc:
                reason = exc.reason
                log.warning("discarded Redis chunk %d of a conversation: %s", index, exc)
            else:
                with torch.cuda.stream(stream) if isinstance(stream, torch.cuda.Stream) else nullcontext():
                    if job.accept(header, payload):
                        return True
                reason = "stale"
        self.counters.discarded_entries[reason] += 1
        return False


def _read_response(conn: redis.Connection) -> object:
    """One reply; an error reply (e.g. a key of another type) is returned, not raised: it is consumed."""
    try:
        return conn.read_response()
    except redis.ResponseError as exc:
        return exc
