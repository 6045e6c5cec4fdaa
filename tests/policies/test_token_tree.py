"""token_tree: golden arrays on a hand-built tree, and pointer jumping against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from policies import token_tree as tt
from policy_strategies import candidate_trees

# root -> 0 -> {1, 2}; 1 -> {3, 4}; 2 -> 5; root -> 6 -> 7   (slot 8 is padding)
PARENT = np.array([[-1, 0, 0, 1, 1, 2, -1, 6, 3]])
VALID = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=bool)
DRAFT = np.array([[0.5, 0.5, 0.25, 1.0, 0.5, 0.5, 0.25, 1.0, 0.9]])


def test_depths_golden():
    np.testing.assert_array_equal(tt.depths(PARENT, VALID), [[1, 2, 2, 3, 3, 3, 1, 2, 0]])


def test_path_probs_golden():
    f = tt.path_probs(PARENT, DRAFT, VALID)
    np.testing.assert_array_equal(f, [[0.5, 0.25, 0.125, 0.25, 0.125, 0.0625, 0.25, 0.25, 0.0]])


def test_path_probs_clips_bad_probabilities():
    q = DRAFT.copy()
    q[0, 0], q[0, 6] = 1.5, np.nan
    f = tt.path_probs(PARENT, q, VALID)
    assert f[0, 0] == 1.0 and f[0, 6] == 0.0 and f[0, 7] == 0.0


def test_monotone_path_probs_repairs_order_and_orphans():
    f = np.array([[0.5, 0.6, 0.1, 0.2]])  # slot 1 above its parent; slot 3's parent is padding
    parent = np.array([[-1, 0, 0, 2]])
    valid = np.array([[1, 1, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(tt.monotone_path_probs(parent, f, valid), [[0.5, 0.5, 0.0, 0.0]])


def test_is_valid_tree():
    sel = np.array([[1, 1, 0, 1, 0, 0, 1, 0, 0]], dtype=bool)
    assert tt.is_valid_tree(PARENT, sel)
    sel[0, 1] = False  # 3 loses its parent
    assert not tt.is_valid_tree(PARENT, sel)
    assert not tt.is_valid_tree(np.array([[1, -1]]), np.array([[True, True]]))  # parent after child
    assert tt.is_valid_tree(PARENT, np.zeros_like(sel))


def test_compact_and_ancestor_bits_golden():
    sel = np.array([[1, 1, 0, 1, 0, 0, 1, 1, 0]], dtype=bool)
    order, new_parent, counts = tt.compact(PARENT, sel)
    np.testing.assert_array_equal(counts, [5])
    np.testing.assert_array_equal(order, [[0, 1, 3, 6, 7, -1, -1, -1, -1]])
    np.testing.assert_array_equal(new_parent, [[-1, 0, 1, -1, 3, -1, -1, -1, -1]])
    bits = tt.ancestor_bits(new_parent, counts)
    # token 0 = root; token j + 1 = compacted node j
    assert bits.shape == (1, 10)
    assert bits[0, :6].tolist() == [0b1, 0b11, 0b111, 0b1111, 0b10001, 0b110001]
    assert not bits[0, 6:].any()


def test_compact_rejects_broken_selection():
    with pytest.raises(ValueError):
        tt.compact(PARENT, np.array([[0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=bool))


def test_ancestor_bits_limit():
    m = 64
    parent = np.arange(-1, m - 1)[None, :]
    _, new_parent, counts = tt.compact(parent, np.ones((1, m), dtype=bool))
    with pytest.raises(ValueError):
        tt.ancestor_bits(new_parent, counts)
    bits = tt.ancestor_bits(new_parent[:, :63], np.array([63]))
    assert bits[0, 63] == -1  # a 63-chain plus the root sets all 64 bits


def _loop_reference(parent, draft, valid):
    r, m = parent.shape
    depth = np.zeros((r, m), dtype=np.int64)
    f = np.zeros((r, m))
    for i in range(r):
        for j in range(m):
            if valid[i, j]:
                p = parent[i, j]
                depth[i, j] = 1 + (depth[i, p] if p >= 0 else 0)
                f[i, j] = draft[i, j] * (f[i, p] if p >= 0 else 1.0)
    return depth, f


@settings(max_examples=60, deadline=None)
@given(candidate_trees(max_requests=3, max_nodes=12, quantised=False))
def test_pointer_jumping_matches_loop(tree):
    _, parent, valid = tree
    draft = np.linspace(0.05, 1.0, parent.size).reshape(parent.shape)
    depth, f = _loop_reference(parent, draft, valid)
    np.testing.assert_array_equal(tt.depths(parent, valid), depth)
    np.testing.assert_allclose(tt.path_probs(parent, draft, valid), f, rtol=1e-12)
    sel = valid.copy()
    order, new_parent, counts = tt.compact(parent, sel)
    np.testing.assert_array_equal(counts, valid.sum(axis=1))
    for i in range(parent.shape[0]):  # every compacted parent points at the same original node
        for j in range(counts[i]):
            p = parent[i, order[i, j]]
            assert (new_parent[i, j] == -1) if p < 0 else (order[i, new_parent[i, j]] == p)
