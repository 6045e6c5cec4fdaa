"""Triton KV commit: accepted entries move to context_len + 0, 1, ... in every layer, nothing else changes."""

from __future__ import annotations

import torch

from kernel_batches import DEVICE
from kernels.kv_commit import kv_commit
from kernels.metadata import AttnMetadata
from kernels.reference import kv_commit_reference, tree_attention_reference
from kernels.tree_attention import tree_attention

LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 12, 4, 2, 8
# Physical blocks of three requests (non-contiguous on purpose); block 0 and 11 belong to nobody.
TABLES = {"a": [5, 2, 9], "b": [1, 7, 3], "c": [4, 10, 6, 8]}


def slot(req: str, j: int) -> int:
    return TABLES[req][j // BLOCK_SIZE] * BLOCK_SIZE + j % BLOCK_SIZE


def random_caches(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def commit_case() -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[int, list[int]]]]:
    """Request a (context 6) accepts tree nodes [0, 1, 3, 5]; b (context 3) accepts [0, 2, 3, 4, 7]: both
    overlap their own destinations (b reads slots 5..7 while writing 4..7). Request c commits nothing."""
    paths = {"a": (6, [0, 1, 3, 5]), "b": (3, [0, 2, 3, 4, 7])}
    src = [slot(r, ctx + i) for r, (ctx, path) in paths.items() for i in path]
    dst = [slot(r, ctx + k) for r, (ctx, path) in paths.items() for k in range(len(path))]
    return torch.tensor(src), torch.tensor(dst), paths


def test_commit_moves_accepted_entries_and_leaves_the_rest():
    k_cache, v_cache = random_caches()
    src, dst, paths = commit_case()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    kv_commit(k_dev, v_dev, src.to(DEVICE), dst.to(DEVICE))
    k_after, v_after = k_dev.cpu(), v_dev.cpu()

    for before, after in ((k_before, k_after), (v_before, v_after)):
        flat_b, flat_a = before.flatten(1, 2), after.flatten(1, 2)  # [layers, slots, kv_heads, head_dim]
        assert torch.equal(flat_a[:, dst], flat_b[:, src])
        untouched = torch.ones(flat_a.shape[1], dtype=torch.bool)
        untouched[dst] = False
        assert torch.equal(flat_a[:, untouched], flat_b[:, untouched])
        for blk in [0, 11, *TABLES["c"]]:  # other requests' (and free) blocks are byte-identical
            assert torch.equal(after[:, blk], before[:, blk])

    ref_k, ref_v = k_before.clone(), v_before.clone()
    kv_commit_reference(ref_k, ref_v, src, dst)
    assert torch.equal(ref_k, k_after) and torch.equal(ref_v, v_after)


def test_next_step_reads_committed_path():
    """After commit, a decode step of each request attends to context + accepted path, as if decoded plainly."""
    k_cache, v_cache = random_caches(seed=1)
    src, dst, paths = commit_case()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    kv_commit(k_dev, v_dev, src.to(DEVICE), dst.to(DEVICE))

    reqs = list(paths)
    new_ctx = [paths[r][0] + len(paths[r][1]) for r in reqs]
    width = max(len(t) for t in TABLES.values())
    meta = AttnMetadata(
        slot_mapping=torch.tensor([slot(r, c) for r, c in zip(reqs, new_ctx)]),
        query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
        context_lens=torch.tensor(new_ctx, dtype=torch.int32),
        block_tables=torch.tensor([TABLES[r] + [-1] * (width - len(TABLES[r])) for r in reqs], dtype=torch.int32),
        is_tree=torch.tensor([False, False]),
        tree_bits=torch.tensor([1, 1]),
        max_query_len=1,
        max_kv_len=max(new_ctx) + 1,
        query_start_loc_host=[0, 1, 2],
    )
    q = torch.randn(2, 4, HEAD_DIM)
    for layer in range(LAYERS):
        out = tree_attention(q.to(DEVICE), k_dev[layer], v_dev[layer], meta.to(DEVICE), 0.5).cpu()
        for i, r in enumerate(reqs):
            ctx, path = paths[r]
            logical = list(range(ctx)) + [ctx + p for p in path] + [new_ctx[i]]  # pre-commit positions
            idx = torch.tensor([slot(r, j) for j in logical])
            keys = k_before[layer].flatten(0, 1)[idx]  # [n, kv_heads, head_dim]
            vals = v_before[layer].flatten(0, 1)[idx]
            for h in range(4):
                w = torch.softmax(keys[:, h // 2] @ q[i, h] * 0.5, dim=0)
                assert (out[i, h] - w @ vals[:, h // 2]).abs().max() < 1e-5
        ref = tree_attention_reference(q, k_dev[layer].cpu(), v_dev[layer].cpu(), meta, 0.5)
        assert (out - ref).abs().max() < 1e-5


def test_commit_arbitrary_permutation_is_simultaneous():
    """Gather-then-scatter holds for any distinct destinations, e.g. a swap and a 3-cycle."""
    k_cache, v_cache = random_caches(seed=2)
    src, dst = torch.tensor([8, 9, 20, 21, 22]), torch.tensor([9, 8, 21, 22, 20])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    kv_commit_reference(ref_k, ref_v, src, dst)
    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    kv_commit(k_dev, v_dev, src.to(DEVICE), dst.to(DEVICE))
    assert torch.equal(k_dev.cpu(), ref_k) and torch.equal(v_dev.cpu(), ref_v)


def test_empty_commit_is_a_no_op():
    k_cache, v_cache = random_caches(seed=3)
    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    kv_commit(k_dev, v_dev, empty, empty)
    assert torch.equal(k_dev.cpu(), k_cache) and torch.equal(v_dev.cpu(), v_cache)
