"""Which drafted nodes the target verifies this step: AdaServe's selection and the baselines (DESIGN.md 2, 4).

Input: candidate trees in the ``token_tree`` layout (``[R, M]`` arrays, implicit root, parents-first) with
path probabilities ``f``. Output: a boolean ``[R, M]`` mask that is always a valid tree per request.

Numpy throughout (torch only for one row-wise cumsum, ~4x faster than numpy's on CPU). Torch's CPU sort
is ~10x slower than numpy's, and the selection runs on the host between the draft and the verify forwards.

The core trick: for the budgeted policies every request keeps a *prefix* of its nodes ranked by
``(-f, slot)``. Since ``f(parent) >= f(child)`` and ``parent slot < child slot``, a parent always ranks
before its children, so every prefix is a valid tree. Ranks come from one integer sort of keys that pack
``f``'s float bits (high bits; order-preserving for f >= 0) and the slot (low bits): keys are unique per row,
so an unstable sort is exact, and "the top-k of row r" is simply ``key >= k-th largest key of row r``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from policies import token_tree
from policies.budget import adaptive_shape

DEFAULT_STATIC_WIDTHS: tuple[int, ...] = (1, 1, 3, 1, 1, 1, 1, 1)  # SpecInfer-style: 20 nodes, depth 8
LATENCY_CORRECTION = 1.05  # flexflow-serve inflates the step-time estimate by ~5% when computing A(r)
SLO_CAP_FACTOR = 1.2  # flexflow-serve: one request takes at most ~1.2 * budget / n nodes in the SLO phase
_KINDS = ("adaserve", "dynamic-tree", "static-tree", "chain", "none")


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy name. ``chain_len`` only for kind "chain"; ``static_widths`` only for "static-tree"."""

    kind: str
    chain_len: int = 0
    static_widths: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        if self.kind == "chain":
            return f"chain:{self.chain_len}"
        if self.kind == "static-tree" and self.static_widths != DEFAULT_STATIC_WIDTHS:
            return "static-tree:" + ",".join(map(str, self.static_widths))
        return self.kind

    @property
    def budgeted(self) -> bool:
        """True where the step token budget caps the selection (adaserve, dynamic-tree)."""
        return self.kind in ("adaserve", "dynamic-tree")


@functools.lru_cache(maxsize=64)
def parse_policy(name: str) -> PolicySpec:
    """Parse "adaserve" | "dynamic-tree" | "static-tree[:w1,w2,...]" | "chain:k" | "none" (case-insensitive).

    ``static-tree`` widths: ``w_l`` = children each kept node at depth l-1 keeps at depth l.
    """
    if not isinstance(name, str):
        raise ValueError(f"policy name must be a string, got {type(name).__name__}")
    text = name.strip().lower()
    kind, sep, arg = text.partition(":")
    usage = "expected one of: adaserve, dynamic-tree, static-tree, static-tree:1,1,3,1, chain:<k>, none"
    if kind in ("adaserve", "dynamic-tree", "none") and not sep:
        return PolicySpec(kind)
    if kind == "static-tree":
        if not sep:
            return PolicySpec(kind, static_widths=DEFAULT_STATIC_WIDTHS)
        try:
            widths = tuple(int(w) for w in arg.split(","))
        except ValueError:
            raise ValueError(f"bad static-tree widths in policy {name!r}; {usage}") from None
        if not widths or min(widths) < 1:
            raise ValueError(f"static-tree widths must be integers >= 1 in policy {name!r}")
        return PolicySpec(kind, static_widths=widths)
    if kind == "chain":
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"chain policy needs a length, e.g. 'chain:4', got {name!r}") from None
        if k < 1:
            raise ValueError(f"chain length must be >= 1, got {name!r}")
        return PolicySpec(kind, chain_len=k)
    raise ValueError(f"unknown speculation policy {name!r}; {usage}")


@dataclass
class SLOState:
    """Per-request SLO bookkeeping, each an array of shape [R].

    ``decoded_tokens`` is o_r, the count in the TPOT denominator; ``decode_time_s`` is l_r, the decode time
    so far; ``tpot_slo_s`` is inf for requests without a TPOT SLO.
    """

    decode_time_s: np.ndarray  # [R] float, l_r
    decoded_tokens: np.ndarray  # [R] int/float, o_r
    tpot_slo_s: np.ndarray  # [R] float, inf = no SLO

    @classmethod
    def no_slo(cls, num_requests: int) -> "SLOState":
        """State for requests without SLOs (A(r) = 1 for all: adaserve degenerates to dynamic-tree)."""
        return cls(np.zeros(num_requests), np.zeros(num_requests), np.full(num_requests, np.inf))


def required_acceptance(
    slo: SLOState, t_step_s: float, max_depth: int, latency_correction: float = LATENCY_CORRECTION
) -> np.ndarray:
    """A(r) = (l_r + t_step * correction) / tpot_slo_r - o_r, clipped to [1, d + 1]; [R] float64.

    Tokens request r must gain this step (root/bonus token included) to be on its SLO after it.
    No SLO (inf), non-positive or NaN SLOs give 1: the free root token is enough.
    """
    slo_s = np.asarray(slo.tpot_slo_s, dtype=np.float64)
    ok = np.isfinite(slo_s) & (slo_s > 0)
    elapsed_s = np.asarray(slo.decode_time_s, dtype=np.float64) + float(t_step_s) * latency_correction
    a = elapsed_s / np.where(ok, slo_s, 1.0) - np.asarray(slo.decoded_tokens, dtype=np.float64)
    a = np.where(ok & ~np.isnan(a), a, 1.0)
    return np.clip(a, 1.0, float(max_depth) + 1.0)


def _keys(path_prob: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Unique per-row int64 keys ordering nodes by (f desc, slot asc), and the rows sorted descending.

    Unusable nodes get f = 0 and so rank after all usable ones; ``key > low_mask`` iff usable. Dropping
    the b low mantissa bits (b = bits of M - 1) merges f values equal to ~1e-14 relative: harmless, and the
    slot tiebreak still puts a parent first.
    """
    m = path_prob.shape[1]
    b = max(1, (m - 1).bit_length())
    low = (1 << b) - 1
    bits = np.ascontiguousarray(path_prob, dtype=np.float64).view(np.int64) * usable
    key = ((bits >> b) << b) | (low - np.arange(m, dtype=np.int64))
    sorted_desc = np.sort(-key, axis=1)
    np.negative(sorted_desc, out=sorted_desc)
    return key, sorted_desc, b


def _sorted_f(sorted_desc: np.ndarray, b: int) -> np.ndarray:
    """The (truncated) f values of the sorted keys; 0 for unusable nodes."""
    return ((sorted_desc >> b) << b).view(np.float64)


def _mask_from_counts(key: np.ndarray, sorted_desc: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Boolean [R, M]: each row's top-k[r] nodes (keys unique per row, so ``>=`` the k-th key is exact)."""
    r, m = key.shape
    thresh = sorted_desc[np.arange(r), np.clip(k - 1, 0, max(m - 1, 0))]
    return (key >= thresh[:, None]) & (k > 0)[:, None]


def _fill_globally(sorted_desc: np.ndarray, base: np.ndarray, cap: np.ndarray, budget: int) -> np.ndarray:
    """Per-row counts after spending ``budget`` more nodes on the globally highest-f ranks in [base, cap).

    Exactly ``min(budget, available)`` nodes are added; ties at the threshold go to lower rows first. Within a
    row the additions are consecutive ranks, so the result stays a prefix.
    """
    r, m = sorted_desc.shape
    room = np.maximum(cap - base, 0)
    if budget <= 0 or r == 0:
        return base
    if int(room.sum()) <= budget:
        return base + room
    ranks = np.arange(m)
    cand = (ranks >= base[:, None]) & (ranks < cap[:, None])
    values = sorted_desc * cand  # non-candidates -> 0, below every usable key
    flat = values.ravel()
    v = np.partition(flat, flat.size - budget)[flat.size - budget]  # budget-th largest, > 0
    chosen = values > v
    take = budget - int(chosen.sum())
    eq = values == v
    if int(eq.sum()) > take:  # cross-row ties on the threshold key: first rows win
        eq &= (np.cumsum(eq.ravel()) <= take).reshape(eq.shape)
    chosen |= eq
    return base + chosen.sum(axis=1)


def _adaserve_counts(
    sorted_desc: np.ndarray,
    b: int,
    n_usable: np.ndarray,
    slo: SLOState,
    token_budget: int,
    t_step_s: float,
    max_depth: int,
    n_max: int,
    latency_correction: float,
    slo_cap_factor: float,
) -> np.ndarray:
    """Per-request node counts: SLO phase (cheapest-to-satisfy first) then throughput phase.

    Order of the SLO phase: requests that can reach their need ``A(r) - 1`` (the root pays 1) within their
    SLO-phase cap go first, by ascending node cost (ties: larger A(r) first, then request index); those that
    cannot go after, by ascending shortfall. Cheapest-first maximises the number of requests on their SLO
    this step (unit-value knapsack) and is what flexflow's "ascending target" order approximates, since the
    cost grows with the target for similar trees. Requests that cannot make it still get their capped
    share, as in flexflow, but only after every request that can.
    """
    r, m = sorted_desc.shape
    need = required_acceptance(slo, t_step_s, max_depth, latency_correction) - 1.0
    slo_cap = min(n_max, max(1, math.ceil(slo_cap_factor * token_budget / max(r, 1))))
    avail = np.minimum(slo_cap, n_usable)
    prefix = torch.cumsum(torch.from_numpy(_sorted_f(sorted_desc, b)), dim=1).numpy()
    tol = 1e-9 * np.maximum(need, 1.0)
    short = (prefix < (need - tol)[:, None]).sum(axis=1)  # ranks whose prefix sum is still below need
    cost = np.where(need > tol, short + 1, 0)
    feasible = cost <= avail
    reach = np.where(avail > 0, prefix[np.arange(r), np.maximum(avail - 1, 0)], 0.0)
    grant = np.where(feasible, cost, avail)
    order = np.lexsort((-need, np.where(feasible, cost, need - reach), ~feasible))
    g = grant[order]
    before = np.cumsum(g) - g
    given = np.empty_like(grant)
    given[order] = np.clip(token_budget - before, 0, g)
    rest = token_budget - int(given.sum())
    return _fill_globally(sorted_desc, given, np.minimum(n_max, n_usable), rest)


def _shape_select(path_prob: np.ndarray, parent: np.ndarray, valid: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """Fixed shape: each kept node at depth l-1 keeps its top-``widths[l-1]`` children by (f desc, slot asc)."""
    r, m = valid.shape
    p = token_tree._sanitize_parent(parent, valid)
    depth = token_tree.depths(p, valid)
    f = np.where(valid, np.nan_to_num(np.asarray(path_prob, dtype=np.float64), nan=0.0), 0.0)
    key, _, _ = _keys(np.maximum(f, 0.0), valid)
    perm = np.lexsort((-key, p), axis=-1)  # grouped by parent, best sibling first
    sp = np.take_along_axis(p, perm, axis=1)
    pos = np.broadcast_to(np.arange(m), (r, m))
    new_group = np.ones((r, m), dtype=bool)
    new_group[:, 1:] = sp[:, 1:] != sp[:, :-1]
    sib_rank_sorted = pos - np.maximum.accumulate(np.where(new_group, pos, 0), axis=1)
    sib_rank = np.empty_like(sib_rank_sorted)
    np.put_along_axis(sib_rank, perm, sib_rank_sorted, axis=1)
    width_at = np.array((0,) + tuple(widths) + (0,), dtype=np.int64)[np.minimum(depth, len(widths) + 1)]
    node_ok = valid & (sib_rank < width_at)
    return token_tree.path_reduce(p, node_ok, np.logical_and)


def select(
    policy: str | PolicySpec,
    path_prob: np.ndarray,
    parent: np.ndarray,
    valid: np.ndarray,
    slo: SLOState,
    token_budget: int,
    t_step_s: float,
    max_depth: int,
    n_max: int,
    *,
    latency_correction: float = LATENCY_CORRECTION,
    slo_cap_factor: float = SLO_CAP_FACTOR,
) -> np.ndarray:
    """Nodes to verify this step: boolean [R, M], a valid tree per request (root implicit, always verified).

    path_prob [R, M] float: f, with f(child) <= f(parent) (``token_tree.path_probs`` guarantees it; else
        repair with ``token_tree.monotone_path_probs``). parent [R, M] int, parents-first, -1 = root child.
    valid [R, M] bool: real candidates (padding False).
    token_budget: draft nodes the step may verify over all requests, roots excluded (flexflow: max tokens
        per batch - active requests). Caps adaserve and dynamic-tree; ignored by static-tree and chain.
    t_step_s: predicted time of this step (for A(r)). max_depth: the drafted depth d (A(r) <= d + 1).
    n_max: most nodes per request (roots excluded) for adaserve and dynamic-tree.

    adaserve / dynamic-tree skip nodes with f <= 0 (or NaN): they add nothing to the expected acceptance.
    static-tree / chain keep their shape from whatever valid nodes exist (no budget, no n_max).
    """
    spec = parse_policy(policy) if isinstance(policy, str) else policy
    valid = np.asarray(valid, dtype=bool)
    r, m = valid.shape
    if spec.kind == "none" or r == 0 or m == 0:
        return np.zeros((r, m), dtype=bool)
    if spec.kind == "chain":
        return _shape_select(path_prob, parent, valid, (1,) * spec.chain_len)
    if spec.kind == "static-tree":
        return _shape_select(path_prob, parent, valid, spec.static_widths)
    f = np.asarray(path_prob)
    usable = valid & (f > 0) & (f < np.inf)
    key, sorted_desc, b = _keys(f, usable)
    n_usable = usable.sum(axis=1)
    budget = max(int(token_budget), 0)
    cap = np.minimum(max(int(n_max), 0), n_usable)
    if spec.kind == "dynamic-tree":
        counts = _fill_globally(sorted_desc, np.zeros(r, dtype=np.int64), cap, budget)
    else:
        counts = _adaserve_counts(
            sorted_desc, b, n_usable, slo, budget, t_step_s, max_depth, max(int(n_max), 0),
            latency_correction, slo_cap_factor,
        )
    return _mask_from_counts(key, sorted_desc, counts)


def draft_shape(
    spec: str | PolicySpec,
    num_requests: int,
    token_budget: int,
    *,
    draft_budget: int | None = None,
    c1: float = 1.0,
    c2: int = 0,
    d_min: int = 1,
    d_max: int = 8,
    w_max: int = 8,
) -> tuple[int, int, int]:
    """How the drafter should draft for ``spec``: (depth, beam_width, topk).

    ``token_budget`` is the same node budget ``select`` gets (roots excluded); the paper's adaptive formula
    wants the step budget, so ``budget.adaptive_shape`` is called with ``token_budget + num_requests``.
    ``draft_budget`` (tokens per draft step over all requests) defaults to that step budget.
    static-tree drafts ``len(widths)`` levels with a beam as wide as its widest level and ``max(widths)``
    proposals per node: the beam may drop a node of the exact static shape (a sibling branch with a higher
    path probability wins); static-tree selection then keeps the shape restricted to what was drafted.
    chain:k drafts exactly k tokens (beam 1, top-1). none drafts nothing.
    """
    spec = parse_policy(spec) if isinstance(spec, str) else spec
    if spec.kind == "none":
        return 0, 0, 0
    if spec.kind == "chain":
        return spec.chain_len, 1, 1
    if spec.kind == "static-tree":
        level_sizes = np.cumprod(spec.static_widths)
        return len(spec.static_widths), int(level_sizes.max()), int(max(spec.static_widths))
    step_budget = int(token_budget) + int(num_requests)
    depth, width = adaptive_shape(
        step_budget, num_requests, step_budget if draft_budget is None else draft_budget,
        c1=c1, c2=c2, d_min=d_min, d_max=d_max, w_max=w_max,
    )
    return depth, width, width
