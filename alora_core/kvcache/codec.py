"""Bytes for the Redis tier: a KV value is a fixed binary header followed by raw tensor bytes; a
conversation handle's metadata is a small JSON document. Nothing is ever unpickled.

    value = header (128 B) | payload: [blocks, layers, 2 (K|V), kv_heads, block_size, head_dim] raw dtype bytes

    header: magic "AKV1", format version, header size, model fingerprint, tenant digest, dtype,
            layout (layers, kv_heads, head_dim), block size, first block, blocks, tokens covered,
            prefix hash (sha256 over a seed and the token ids up to the value's end), payload
            length, payload checksum (xxh3-64)

The prefix hash covers every token id from position 0 to the value's last position, because a
block's K/V depends on the whole prefix, not just its own tokens, and its seed names the tenant,
the cache salt and, for a plain LoRA's chain, the adapter (index.Root, index.BlockChain): a value
restored for other token ids (a stale entry, a colliding key, another conversation's) never
matches. Any mismatch raises `CorruptEntry`.
"""

import hashlib
import json
import struct
import warnings
from array import array
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

FORMAT_VERSION = 2  # 2: values keyed by chain hash (index.py), seeded prefix hashes
MAGIC = b"AKV1"
META_FORMAT = "alora-kv-meta/2"

# magic, version, header size, fingerprint, tenant digest, dtype, pad, block size, layers, kv heads,
# head dim, first block, blocks, tokens, prefix hash, payload length, checksum
_HEADER = struct.Struct("<4sHH16s8sB3xIIIIIII32sQQ")
HEADER_BYTES = 128
assert _HEADER.size <= HEADER_BYTES

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
_TOKEN_ARRAY = "I"  # uint32 token ids
assert array(_TOKEN_ARRAY).itemsize == 4


class CorruptEntry(Exception):
    """A Redis value or metadata that must not be used. `reason` names the check that failed."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class KVLayout:
    """Everything that must agree between the writer and the reader of a KV value."""

    fingerprint: str  # model weights + dtype (LoadedModel.fingerprint)
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        n = self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim
        return n * torch.empty((), dtype=self.dtype).element_size()


def tenant_of(conversation_key: str) -> str:
    """The service builds keys as '<tenant-hash>:<conversation-id>'; a bare key has the empty tenant."""
    tenant, sep, _ = conversation_key.partition(":")
    return tenant if sep else ""


def digest(text: str, size: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def prefix_hashes(
    token_ids: list[int], chunk_ends: list[int], seed: bytes = b"alora-kv-prefix"
) -> list[bytes]:
    """sha256 chain: hash i covers seed + token_ids[:chunk_ends[i]] (ends ascending)."""
    out: list[bytes] = []
    h = hashlib.sha256(seed)
    start = 0
    for end in chunk_ends:
        h.update(array(_TOKEN_ARRAY, token_ids[start:end]).tobytes())
        out.append(h.copy().digest())
        start = end
    return out


@dataclass(frozen=True)
class ChunkHeader:
    first_block: int
    num_blocks: int
    num_tokens: int  # tokens covered, from position first_block * block_size
    prefix_hash: bytes


def encode_value(layout: KVLayout, tenant: str, header: ChunkHeader, payload: torch.Tensor) -> bytearray:
    """header + raw bytes of payload [num_blocks, *block_shape] (a contiguous CPU tensor)."""
    assert payload.is_contiguous() and payload.device.type == "cpu"
    assert tuple(payload.shape) == (header.num_blocks, *layout.block_shape), payload.shape
    raw = payload.view(torch.uint8).reshape(-1)
    value = bytearray(HEADER_BYTES + raw.numel())
    # called on the Redis writer thread: no torch copy here (see host_tier.cpu_copy)
    np.copyto(np.frombuffer(value, dtype=np.uint8, offset=HEADER_BYTES), raw.numpy())
    body = memoryview(value)[HEADER_BYTES:]
    _HEADER.pack_into(
        value,
        0,
        MAGIC,
        FORMAT_VERSION,
        HEADER_BYTES,
        layout.fingerprint.encode()[:16].ljust(16, b"\0"),
        bytes.fromhex(digest(tenant)),
        DTYPE_CODES[layout.dtype],
        layout.block_size,
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
        header.first_block,
        header.num_blocks,
        header.num_tokens,
        header.prefix_hash,
        len(body),
        xxhash.xxh3_64_intdigest(body),
    )
    return value


def decode_value(value: bytes, layout: KVLayout, tenant: str, expect: ChunkHeader) -> torch.Tensor:
    """Check every header field and the checksum; return the payload as [num_blocks, *block_shape]
    (a zero-copy view of `value`, read-only)."""
    if len(value) < HEADER_BYTES:
        raise CorruptEntry("truncated", f"{len(value)} bytes, shorter than the header")
    (
        magic,
        version,
        header_bytes,
        fingerprint,
        tenant_digest,
        dtype_code,
        block_size,
        num_layers,
        num_kv_heads,
        head_dim,
        first_block,
        num_blocks,
        num_tokens,
        prefix_hash,
        payload_bytes,
        checksum,
    ) = _HEADER.unpack_from(value, 0)
    if magic != MAGIC or header_bytes != HEADER_BYTES:
        raise CorruptEntry("corrupt", "bad magic or header size")
    if version != FORMAT_VERSION:
        raise CorruptEntry("version", f"format {version}, this server reads {FORMAT_VERSION}")
    if fingerprint.rstrip(b"\0") != layout.fingerprint.encode()[:16]:
        raise CorruptEntry("wrong_model", "written by another model or dtype")
    if tenant_digest != bytes.fromhex(digest(tenant)):
        raise CorruptEntry("wrong_tenant", "written for another tenant")
    if (_DTYPES_BY_CODE.get(dtype_code), block_size, num_layers, num_kv_heads, head_dim) != (
        layout.dtype,
        layout.block_size,
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
    ):
        raise CorruptEntry("wrong_layout", "dtype, block size or KV shape differs")
    if (first_block, num_blocks, num_tokens) != (expect.first_block, expect.num_blocks, expect.num_tokens):
        raise CorruptEntry("stale", "covers other positions than the metadata says")
    if prefix_hash != expect.prefix_hash:
        raise CorruptEntry("stale", "computed for other token ids")
    if payload_bytes != num_blocks * layout.bytes_per_block or len(value) != HEADER_BYTES + payload_bytes:
        raise CorruptEntry(
            "truncated", f"{len(value) - HEADER_BYTES} payload bytes, expected {payload_bytes}"
        )
    if xxhash.xxh3_64_intdigest(memoryview(value)[HEADER_BYTES:]) != checksum:
        raise CorruptEntry("checksum", "payload bytes do not match their checksum")
    with warnings.catch_warnings():  # bytes are read-only; we only ever read the view
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(value, dtype=layout.dtype, offset=HEADER_BYTES)
    return flat.view(num_blocks, *layout.block_shape)


@dataclass(frozen=True)
class RemoteMeta:
    """What any replica needs to resume a conversation: its history and what Redis holds of its KV."""

    conversation: str
    token_ids: list[int]
    cached_tokens: int  # Redis holds the KV of token_ids[:cached_tokens], in num_chunks value groups
    num_chunks: int
    salt: str = ""  # the cache salt its blocks were keyed with


def encode_meta(layout: KVLayout, blocks_per_value: int, meta: RemoteMeta) -> bytes:
    doc = {
        "format": META_FORMAT,
        "fingerprint": layout.fingerprint,
        "tenant": tenant_of(meta.conversation),
        "conversation": meta.conversation,
        "block_size": layout.block_size,
        "blocks_per_value": blocks_per_value,
        "cached_tokens": meta.cached_tokens,
        "num_chunks": meta.num_chunks,
        "salt": meta.salt,
        "token_ids": meta.token_ids,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_meta(raw: bytes, layout: KVLayout, blocks_per_value: int, conversation: str) -> RemoteMeta:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntry("corrupt", f"metadata is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != META_FORMAT:
        raise CorruptEntry("version", "unknown metadata format")
    if doc.get("fingerprint") != layout.fingerprint:
        raise CorruptEntry("wrong_model", "metadata of another model")
    if doc.get("conversation") != conversation or doc.get("tenant") != tenant_of(conversation):
        raise CorruptEntry("wrong_tenant", "metadata of another conversation or tenant")
    if doc.get("block_size") != layout.block_size or doc.get("blocks_per_value") != blocks_per_value:
        raise CorruptEntry("wrong_layout", "other block size or value size")
    token_ids, cached, chunks = doc.get("token_ids"), doc.get("cached_tokens"), doc.get("num_chunks")
    salt = doc.get("salt")
    if (
        not isinstance(salt, str)
        or not isinstance(token_ids, list)
        or not all(type(t) is int and 0 <= t < 1 << 32 for t in token_ids)
        or type(cached) is not int
        or type(chunks) is not int
        or not 0 <= cached <= len(token_ids)
        or chunks != -(-cached // (blocks_per_value * layout.block_size))
    ):
        raise CorruptEntry("corrupt", "metadata fields are inconsistent")
    return RemoteMeta(conversation, token_ids, cached, chunks, salt)
