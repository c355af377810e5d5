"""The Redis value codec: exact round trip, and every kind of bad value refused with its reason."""

import struct
from dataclasses import replace

import pytest
import torch

from alora_core.kvcache.codec import (
    HEADER_BYTES,
    ChunkHeader,
    CorruptEntry,
    KVLayout,
    RemoteMeta,
    decode_meta,
    decode_value,
    encode_meta,
    encode_value,
    prefix_hashes,
)
from alora_core.kvcache.host_tier import cpu_copy

LAYOUT = KVLayout("f" * 16, torch.float32, num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
TOKENS = list(range(10, 30))


def chunk(tokens: list[int] = TOKENS) -> tuple[ChunkHeader, torch.Tensor]:
    """Blocks 1..3 of a conversation (positions 4..13: the last block holds 2 tokens)."""
    (_, h) = prefix_hashes(tokens, [4, 14])
    payload = torch.randn(3, *LAYOUT.block_shape, generator=torch.Generator().manual_seed(0))
    return ChunkHeader(first_block=1, num_blocks=3, num_tokens=10, prefix_hash=h), payload


def test_value_round_trip_is_bit_exact() -> None:
    header, payload = chunk()
    value = bytes(encode_value(LAYOUT, "tenant-a", header, payload))
    assert len(value) == HEADER_BYTES + payload.numel() * 4
    assert torch.equal(decode_value(value, LAYOUT, "tenant-a", header), payload)


def test_prefix_hash_covers_every_earlier_token() -> None:
    edited = [*TOKENS]
    edited[0] += 1  # a token before the chunk: its K/V differ, so must its hash
    assert prefix_hashes(TOKENS, [4, 14])[1] != prefix_hashes(edited, [4, 14])[1]
    assert prefix_hashes(TOKENS, [14]) == prefix_hashes(TOKENS, [4, 14])[1:]


def _mutations() -> dict[str, tuple[str, object]]:
    header, payload = chunk()
    good = encode_value(LAYOUT, "tenant-a", header, payload)
    flipped = bytearray(good)
    flipped[HEADER_BYTES + 100] ^= 0x01
    other_model = replace(LAYOUT, fingerprint="0" * 16)
    other_dtype = replace(LAYOUT, dtype=torch.float16)
    future = bytearray(good)
    struct.pack_into("<H", future, 4, 99)
    stale_header, _ = chunk([*TOKENS[:5], 0, *TOKENS[6:]])
    return {
        "truncated payload": ("truncated", bytes(good[:-7])),
        "truncated header": ("truncated", bytes(good[:50])),
        "flipped payload bit": ("checksum", bytes(flipped)),
        "future format": ("version", bytes(future)),
        "other model": ("wrong_model", bytes(encode_value(other_model, "tenant-a", header, payload))),
        "other tenant": ("wrong_tenant", bytes(encode_value(LAYOUT, "tenant-b", header, payload))),
        "other token ids": ("stale", bytes(encode_value(LAYOUT, "tenant-a", stale_header, payload))),
        "other dtype": ("wrong_layout", bytes(encode_value(other_dtype, "tenant-a", header, payload.half()))),
        "garbage": ("corrupt", b"\x80\x04\x95" + bytes(200)),  # e.g. a pickle: never unpickled
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_bad_values_are_refused_with_their_reason(case: str) -> None:
    reason, value = _mutations()[case]
    header, _ = chunk()
    with pytest.raises(CorruptEntry) as err:
        decode_value(value, LAYOUT, "tenant-a", header)  # type: ignore[arg-type]
    assert err.value.reason == reason


def test_metadata_round_trip_and_refusals() -> None:
    meta = RemoteMeta("tenant-a:conv", TOKENS, cached_tokens=13, num_chunks=2)
    raw = encode_meta(LAYOUT, 2, meta)  # 2 blocks of 4 tokens per value: 13 tokens = 2 values
    assert decode_meta(raw, LAYOUT, 2, "tenant-a:conv") == meta
    with pytest.raises(CorruptEntry, match="wrong_tenant"):
        decode_meta(raw, LAYOUT, 2, "tenant-b:conv")
    with pytest.raises(CorruptEntry, match="wrong_model"):
        decode_meta(raw, replace(LAYOUT, fingerprint="0" * 16), 2, "tenant-a:conv")
    with pytest.raises(CorruptEntry, match="wrong_layout"):
        decode_meta(raw, LAYOUT, 4, "tenant-a:conv")
    with pytest.raises(CorruptEntry, match="corrupt"):
        decode_meta(raw[:-3], LAYOUT, 2, "tenant-a:conv")
    bad = RemoteMeta("tenant-a:conv", TOKENS, cached_tokens=13, num_chunks=5)
    with pytest.raises(CorruptEntry, match="corrupt"):
        decode_meta(encode_meta(LAYOUT, 2, bad), LAYOUT, 2, "tenant-a:conv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_side_thread_copy_equals_torch_copy_for_strided_block_runs(dtype: torch.dtype) -> None:
    """cpu_copy (the Redis threads' copy, outside torch's thread pool) moves the same bytes as copy_,
    between a pool-shaped view and a permuted block-major view, both ways."""
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(2, 2, 3, 40, 4, 8, generator=gen).to(dtype)  # [L, 2, KVH, blocks, bs, D]
    host = torch.randn(7, 2, 2, 3, 4, 8, generator=gen).to(dtype)  # [n, L, 2, KVH, bs, D]
    device_run, host_run = pool[:, :, :, 10:15], host[1:6].permute(1, 2, 3, 0, 4, 5)

    expected_pool = pool.clone()
    expected_pool[:, :, :, 10:15] = host_run
    cpu_copy(device_run, host_run)
    assert torch.equal(pool, expected_pool)

    pool[:, :, :, 10:15] = torch.randn(2, 2, 3, 5, 4, 8, generator=gen).to(dtype)
    expected_host = host.clone()
    expected_host[1:6] = pool[:, :, :, 10:15].permute(3, 0, 1, 2, 4, 5)
    cpu_copy(host_run, device_run)
    assert torch.equal(host, expected_host)
