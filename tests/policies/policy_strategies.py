"""Shared hypothesis strategies and brute-force helpers for the policies tests (imported by name)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import strategies as st

from policies import token_tree

# draft probabilities with few significant bits: path products and their sums stay exact in float32/64,
# so brute-force comparisons need no tolerance, and ties (equal f, f = 0, f = 1) are common
QUANT_PROBS = (0.0, 0.25, 0.5, 0.75, 1.0)


@st.composite
def candidate_trees(draw, max_requests: int = 3, max_nodes: int = 8, quantised: bool = True):
    """(path_prob, parent, valid) in the token_tree layout; padding slots anywhere, parents-first."""
    r = draw(st.integers(1, max_requests))
    m = draw(st.integers(1, max_nodes))
    parent = np.full((r, m), -1, dtype=np.int64)
    valid = np.zeros((r, m), dtype=bool)
    q = np.zeros((r, m))
    for i in range(r):
        for j in range(m):
            parent[i, j] = draw(st.integers(-1, j - 1))
            valid[i, j] = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True
            if parent[i, j] >= 0 and not valid[i, parent[i, j]]:
                valid[i, j] = False  # a padding slot has no children
            if quantised:
                q[i, j] = draw(st.sampled_from(QUANT_PROBS))
            else:
                q[i, j] = draw(st.floats(0.0, 1.0, allow_nan=False))
    return token_tree.path_probs(parent, q, valid), parent, valid


def valid_subtrees(parent_row: np.ndarray, valid_row: np.ndarray) -> list[tuple[int, ...]]:
    """Every subset of valid nodes closed under 'parent selected' (brute force, M <= ~10)."""
    nodes = [j for j in range(len(valid_row)) if valid_row[j]]
    out = []
    for k in range(len(nodes) + 1):
        for combo in itertools.combinations(nodes, k):
            s = set(combo)
            if all(parent_row[j] < 0 or parent_row[j] in s for j in combo):
                out.append(combo)
    return out
