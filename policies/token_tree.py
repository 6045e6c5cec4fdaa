"""Candidate token trees as padded per-request arrays, and vectorised bookkeeping over them.

Layout (shared by the drafter, `tree_selection` and the verifier):

- A step holds ``R`` requests with ``M`` candidate slots each; arrays are ``[R, M]``.
- The root of each tree (the request's last committed token; always verified; counts as the one "bonus"
  token) is implicit and NOT stored. ``parent[r, i] == -1`` means node ``i`` is a child of the root.
- Nodes are stored parents-first: ``parent[r, i] < i``. Slots with ``valid[r, i] == False`` are padding;
  their ``parent`` value is ignored.
- ``draft_prob[r, i]`` is the draft's softmax probability of node ``i``'s token given its parent's path;
  ``path_prob`` (``f`` in DESIGN.md) is the product of ``draft_prob`` along root -> node.

Every helper here loops only ``ceil(log2(M))`` times (pointer jumping), never over nodes.
"""

from __future__ import annotations

import numpy as np

MAX_TREE_TOKENS = 64  # root + nodes that fit an int64 ancestor bitmask (kernels/metadata.py)


def sanitize_parent(parent: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """int64 parents with padding and anything outside [0, own index) mapped to -1.

    Gathers then stay in bounds and pointer jumping always ends (a parent pointer never points forward).
    """
    parent = np.asarray(parent, dtype=np.int64)
    m = parent.shape[-1]
    bad = (parent < 0) | (parent >= np.arange(m))
    if valid is not None:
        bad |= ~np.asarray(valid, dtype=bool)
    return np.where(bad, -1, parent)


def path_reduce(
    parent: np.ndarray,
    values: np.ndarray,
    op: np.ufunc,
    identity: float | int | bool | None = None,
) -> np.ndarray:
    """``out[r, i] = op`` over ``values`` on the path root -> i (i included, the implicit root excluded).

    Pointer jumping: after k rounds ``out[i]`` covers i's 2**k nearest path nodes and ``jump[i]`` is its
    2**k-th ancestor, so ``ceil(log2(depth))`` rounds of [R, M] gathers replace an M-long loop. Arrays carry
    one extra column per row, a sentinel holding ``identity`` that the root's children point to (and that
    points to itself), so each round is two gathers and one ``op`` with no masking. ``op`` must be an
    associative ufunc; ``identity`` defaults to ``op.identity`` (pass it for np.minimum / np.maximum).
    ``parent`` must be sanitised: -1 for the root's children and padding, else ``parent[r, i] < i``.
    """
    r, m = parent.shape
    values = np.asarray(values)
    if values.size == 0:
        return values.copy()
    ident = op.identity if identity is None else identity
    if ident is None:
        raise ValueError(f"{op.__name__} has no identity; pass one")
    stride = m + 1
    base = (np.arange(r, dtype=np.int64) * stride)[:, None]
    jump = np.empty((r, stride), dtype=np.int64)
    jump[:, :m] = np.where(parent >= 0, parent, m) + base
    jump[:, m:] = base + m  # the sentinel points to itself
    out = np.empty((r, stride), dtype=values.dtype)
    out[:, :m] = values
    out[:, m] = ident
    sentinel = base + m
    while not (jump[:, :m] == sentinel).all():
        out = op(out, out.ravel()[jump])
        jump = jump.ravel()[jump]
    return out[:, :m]


def depths(parent: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Depth of every node ([R, M] int64): 1 for a child of the root; 0 for padding slots.

    The verifier places node v at rope position ``context_len + depth(v)``.
    """
    valid = np.asarray(valid, dtype=bool)
    p = sanitize_parent(parent, valid)
    return path_reduce(p, valid.astype(np.int64), np.add) * valid


def path_probs(parent: np.ndarray, draft_prob: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``f`` = product of draft probabilities on root -> node ([R, M] float64); 0 for padding.

    Probabilities are clipped to [0, 1] (NaN -> 0) so that ``f(child) <= f(parent)`` holds exactly, which
    is what makes any top-f node set a valid tree (see ``tree_selection``).
    """
    valid = np.asarray(valid, dtype=bool)
    q = np.nan_to_num(np.asarray(draft_prob, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    q = np.clip(q, 0.0, 1.0) * valid
    return path_reduce(sanitize_parent(parent, valid), q, np.multiply)


def monotone_path_probs(parent: np.ndarray, path_prob: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Repair ``f`` so that ``f(child) <= f(parent)``: each node gets the min over its path; padding 0.

    For callers whose ``f`` comes from elsewhere (fp16 products, temperature) and may break the order by a
    rounding error; a node whose parent is padding gets 0 and so is never selected.
    """
    valid = np.asarray(valid, dtype=bool)
    p = sanitize_parent(parent, None)
    f = np.where(valid, np.nan_to_num(np.asarray(path_prob, dtype=np.float64), nan=0.0), 0.0)
    # a valid node under a padding parent must become 0: gather through the raw parent, padding included
    return path_reduce(p, f, np.minimum, identity=np.inf)


def is_valid_tree(parent: np.ndarray, selected: np.ndarray) -> bool:
    """True iff every selected node's parent is -1 or a selected node with a smaller index."""
    parent = np.asarray(parent, dtype=np.int64)
    selected = np.asarray(selected, dtype=bool)
    if selected.size == 0:
        return True
    r, m = parent.shape
    idx = np.arange(m)[None, :]
    is_root_child = parent == -1
    in_range = (parent >= 0) & (parent < idx)
    flat = np.where(in_range, parent, 0) + (np.arange(r) * m)[:, None]
    parent_selected = selected.ravel()[flat] & in_range
    return bool(np.all(~selected | is_root_child | parent_selected))


def compact(parent: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact each request's selected nodes into local indices 0..count-1, keeping parents-first order.

    Returns ``(order, new_parent, counts)``:
      - ``order[r, j]``: original slot of request r's j-th selected node (ascending slot order, hence still
        parents-first); -1 for ``j >= counts[r]``.
      - ``new_parent[r, j]``: local index of that node's parent, -1 for a child of the root; -1 padding.
      - ``counts[r]``: number of selected nodes.
    Raises ValueError if the selection is not a valid tree (a kept node whose parent was dropped).
    """
    parent = np.asarray(parent, dtype=np.int64)
    selected = np.asarray(selected, dtype=bool)
    if not is_valid_tree(parent, selected):
        raise ValueError("selection is not a tree: a selected node's parent is not selected")
    r, m = selected.shape
    new_idx = np.cumsum(selected, axis=1, dtype=np.int64) - 1
    counts = selected.sum(axis=1).astype(np.int64)
    order = np.full((r, m), -1, dtype=np.int64)
    new_parent = np.full((r, m), -1, dtype=np.int64)
    rows, cols = np.nonzero(selected)
    dst = new_idx[rows, cols]
    order[rows, dst] = cols
    par = parent[rows, cols]
    new_parent[rows, dst] = np.where(par >= 0, new_idx[rows, np.maximum(par, 0)], -1)
    return order, new_parent, counts


def ancestor_bits(new_parent: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Tree-attention bitmasks for compacted trees, root included as local token 0.

    Returns ``bits`` [R, M + 1] int64: ``bits[r, 0] = 1`` (root), and for compacted node j (``j < counts[r]``)
    ``bits[r, j + 1]`` has bit 0 (root), bit j + 1 (itself) and the bits of all its ancestors set; 0 beyond
    ``counts[r] + 1``. Token k may attend to step token t iff bit t of ``bits[k]`` is set. Needs
    ``counts + 1 <= 64`` (int64); raises ValueError otherwise.
    """
    new_parent = np.asarray(new_parent, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    r, m = new_parent.shape
    if r and int(counts.max(initial=0)) + 1 > MAX_TREE_TOKENS:
        raise ValueError(f"tree of {int(counts.max()) + 1} tokens exceeds {MAX_TREE_TOKENS}-bit masks")
    live = np.arange(m)[None, :] < counts[:, None]
    p = sanitize_parent(new_parent, live)
    own = np.zeros((r, m), dtype=np.int64)
    shift = np.minimum(np.arange(1, m + 1), 63)  # entries past 63 are never live (checked above)
    own[:] = np.left_shift(np.int64(1), shift)[None, :]
    own *= live
    path = path_reduce(p, own, np.bitwise_or)
    bits = np.zeros((r, m + 1), dtype=np.int64)
    bits[:, 0] = 1
    bits[:, 1:] = np.where(live, path | 1, 0)
    return bits
