"""The block allocator and the prefix cache without a model: reference counts, LRU eviction, hashing, copy on write."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from app.engine.kv_cache import BlockAllocator, KVCache

BS = 4


@dataclass
class Req:
    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_registered_blocks: int = 0


def _cache(num_blocks: int = 8, caching: bool = True, identity: str = "m|float32") -> KVCache:
    k = torch.zeros(2, num_blocks, BS, 1, 2)  # [layers, blocks, block_size, kv_heads, head_dim]
    return KVCache(k, torch.zeros_like(k), prefix_caching=caching, identity=identity)


def _compute(kv: KVCache, req: Req) -> None:
    """As if a step computed every token but the last: blocks, K/V writes (value = token id), registration."""
    n = len(req.token_ids) - 1
    assert kv.ensure_capacity(req.block_ids, n, write_from=req.num_computed_tokens)
    for pos in range(req.num_computed_tokens, n):
        slot = kv.slots(req.block_ids, pos, 1)[0]
        kv.k.view(2, -1, 1, 2)[:, slot] = float(req.token_ids[pos])
    req.num_computed_tokens = n
    kv.cache_full_blocks(req)


def test_allocator_counts_references_and_frees_at_zero():
    a = BlockAllocator(4, BS)
    blocks = a.allocate(2)
    assert blocks == [0, 1] and a.num_free == 2
    a.touch(blocks[0])
    a.free(blocks)
    assert a.ref_count[:2] == [1, 0] and a.num_free == 3
    a.free([blocks[0]])
    assert a.num_free == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        a.free([blocks[0]])


def test_registered_blocks_stay_cached_and_are_evicted_lru_only_when_free_blocks_run_out():
    a = BlockAllocator(4, BS)
    b = a.allocate(4)
    for i, blk in enumerate(b[:3]):
        assert a.register(blk, bytes([i]))
    assert not a.register(b[3], bytes([0]))  # a second block of the same tokens is not registered
    a.free(b)  # walked from the tail: 2 is released before 1 before 0
    assert a.num_free == 4 and a.num_evictable == 3 and a.num_cached == 3
    assert a.allocate(1) == [b[3]] and a.num_evictions == 0  # the plain free block goes first
    assert a.allocate(1) == [b[2]] and a.num_evictions == 1 and a.lookup(bytes([2])) is None
    a.touch(b[0])  # mapped again: no longer evictable
    assert a.allocate(1) == [b[1]]
    with pytest.raises(RuntimeError):
        a.allocate(1)
    assert a.lookup(bytes([0])) == b[0]


def test_match_maps_full_blocks_only_and_never_the_last_token():
    kv = _cache()
    first = Req(list(range(10, 22)))  # 12 tokens = 3 blocks; 11 computed: blocks 0 and 1 are full
    _compute(kv, first)
    assert first.num_registered_blocks == 2
    first_blocks = list(first.block_ids)
    kv.release_request(first)
    same = Req(list(range(10, 22)))
    assert kv.num_cached_prefix_tokens(same) == 8
    longer = Req(list(range(10, 30)))
    assert kv.acquire_prefix(longer) == 8 and longer.num_computed_tokens == 8
    assert longer.block_ids == first_blocks[:2] and kv.allocator.num_evictable == 0
    short = Req(list(range(10, 18)))  # exactly 2 blocks: the second holds its last token, so only one maps
    assert kv.num_cached_prefix_tokens(short) == 4
    diverged = Req(list(range(10, 16)) + [99, 98, 97, 96])  # differs inside block 1
    assert kv.num_cached_prefix_tokens(diverged) == 4
    kv.release_request(longer)
    assert kv.allocator.num_free == kv.allocator.num_blocks


def test_hashes_chain_on_the_parent_and_the_model_identity():
    a, b = _cache(identity="m|float32"), _cache(identity="m|bfloat16")
    tokens = list(range(8)) + [1]
    ha, hb = a.block_hashes(Req(tokens), 2), b.block_hashes(Req(tokens), 2)
    assert ha[0] != hb[0]  # same tokens, another model or dtype: another block
    other = a.block_hashes(Req([7, 7, 7, 7] + tokens[4:8]), 2)
    assert other[1] != ha[1]  # same block tokens after a different parent


def test_caching_off_matches_and_registers_nothing():
    kv = _cache(caching=False)
    req = Req(list(range(9)))
    _compute(kv, req)
    assert kv.allocator.num_cached == 0 and kv.match_prefix(Req(list(range(9)))) == []
    kv.release_request(req)
    assert kv.allocator.num_free == kv.allocator.num_blocks


def test_write_into_a_shared_block_copies_it_first():
    kv = _cache()
    a = Req(list(range(1, 8)))  # 7 tokens, 6 computed: block 0 full (registered), block 1 half full
    _compute(kv, a)
    partial = a.block_ids[1]
    kv.allocator.touch(partial)  # another reader of the partial block
    before = kv.k[:, partial].clone()
    assert kv.ensure_capacity(a.block_ids, 9, write_from=6)
    assert a.block_ids[1] != partial and kv.num_cow_blocks == 1
    assert torch.equal(kv.k[:, a.block_ids[1]], before)  # the copy holds what was written so far
    kv.k.view(2, -1, 1, 2)[:, kv.slots(a.block_ids, 6, 1)[0]] = -1.0  # the write lands in the copy only
    assert torch.equal(kv.k[:, partial], before)
    # a registered (cached) block is shared too, even with one reference
    full = a.block_ids[0]
    assert kv.ensure_capacity(a.block_ids, 9, write_from=2)
    assert a.block_ids[0] != full and kv.allocator.lookup(a.block_hashes[0]) == full
    kv.allocator.free([partial])
    kv.release_request(a)
    assert all(c == 0 for c in kv.allocator.ref_count) and kv.allocator.num_free == kv.allocator.num_blocks


def test_copy_on_write_needs_a_free_block():
    kv = _cache(num_blocks=2)
    a = Req(list(range(1, 8)))
    _compute(kv, a)  # both blocks in use
    kv.allocator.touch(a.block_ids[1])
    assert not kv.ensure_capacity(a.block_ids, 8, write_from=6)  # nothing taken
    assert kv.num_cow_blocks == 0 and kv.allocator.num_free == 0


def test_reset_forgets_idle_cached_blocks_only():
    kv = _cache()
    a = Req(list(range(9)))
    _compute(kv, a)
    with pytest.raises(RuntimeError):
        kv.reset_prefix_cache()
    kv.release_request(a)
    kv.reset_prefix_cache()
    assert kv.allocator.num_cached == 0 and kv.num_cached_prefix_tokens(Req(list(range(9)))) == 0
    assert kv.allocator.num_free == kv.allocator.num_blocks
