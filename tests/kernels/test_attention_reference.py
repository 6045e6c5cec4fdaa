"""The torch reference itself against a naive dense per-query attention (catches reference bugs)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_batches import ReqSpec, make_batch, naive_attention
from kernels.metadata import MAX_TREE_TOKENS, bits_from_parents
from kernels.reference import kv_commit_reference, tree_attention_reference, write_kv_reference


@st.composite
def parents_lists(draw, max_nodes: int = 16) -> tuple[int, ...]:
    n = draw(st.integers(1, max_nodes))
    return (-1, *(draw(st.integers(0, i - 1)) for i in range(1, n)))


@st.composite
def req_specs(draw, max_ctx: int = 40, max_nodes: int = 16) -> ReqSpec:
    ctx = draw(st.integers(0, max_ctx))
    if draw(st.booleans()):
        return ReqSpec(ctx=ctx, parents=draw(parents_lists(max_nodes)))
    return ReqSpec(ctx=ctx, q_len=draw(st.integers(1, max_nodes)))


@settings(max_examples=25, deadline=None)
@given(specs=st.lists(req_specs(), min_size=1, max_size=4), group=st.sampled_from([1, 2, 4]),
       kv_heads=st.sampled_from([1, 2]), block_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 99))
def test_reference_matches_naive(specs, group, kv_heads, block_size, seed):
    b = make_batch(specs, heads=group * kv_heads, kv_heads=kv_heads, head_dim=8, block_size=block_size, seed=seed)
    ref = tree_attention_reference(b.q, b.k_cache, b.v_cache, b.meta, 0.3)
    assert (ref.double() - naive_attention(b, 0.3)).abs().max() < 1e-5


def test_reference_long_causal_request_gets_own_call():
    """Over 64 step tokens the reference attends a request alone; a 70-token prefill next to a tree."""
    specs = [ReqSpec(ctx=5, q_len=70), ReqSpec(ctx=3, parents=(-1, 0, 0, 1))]
    b = make_batch(specs, heads=4, kv_heads=2, head_dim=8, block_size=8)
    ref = tree_attention_reference(b.q, b.k_cache, b.v_cache, b.meta, 0.3)
    assert (ref.double() - naive_attention(b, 0.3)).abs().max() < 1e-5


def test_bits_from_parents_64_nodes_sets_bit_63():
    bits = bits_from_parents(list(range(-1, MAX_TREE_TOKENS - 1)))  # a 64-long chain
    assert bits[-1] == -1 and bits[0] == 1
    with pytest.raises(ValueError):
        bits_from_parents(list(range(-1, MAX_TREE_TOKENS)))


def test_write_kv_reference_skips_minus_one():
    k_cache = torch.zeros(3, 4, 2, 8)
    v_cache = torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv_reference(k, v, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = k_cache.view(12, 2, 8), v_cache.view(12, 2, 8)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[0], k[2]) and torch.equal(flat_v[5], v[0])
    assert flat_k[[1, 2, 3, 4, 6, 7, 8, 9, 10, 11]].abs().sum() == 0


def test_kv_commit_reference_overlapping_ranges():
    cache = torch.arange(2 * 2 * 4 * 1 * 1, dtype=torch.float32).view(2, 2, 4, 1, 1)
    other = cache.clone()
    kv_commit_reference(cache, other, torch.tensor([2, 3, 5]), torch.tensor([1, 2, 3]))
    flat = cache.view(2, 8)
    assert flat[0].tolist() == [0, 2, 3, 5, 4, 5, 6, 7]
    assert flat[1].tolist() == [8, 10, 11, 13, 12, 13, 14, 15]
