"""Which drafted nodes the target verifies this step: AdaServe's selection and the baselines (DESIGN.md 2, 4).

Input: candidate trees in the ``token_tree`` layout (``[R, M]`` arrays, implicit root, parents-first) with
path probabilities ``f``. Output: a boolean ``[R, M]`` mask that is always a valid tree per request.

Numpy only: the selection runs on the host between the draft and the verify forwards, on [R, M] arrays
that fit in cache; torch's CPU sort is ~10x slower than numpy's and its per-op overhead dominates here.

The core trick: for the budgeted policies every request keeps a *prefix* of its nodes ranked by
``(-f, slot)``. Since ``f(parent) >= f(child)`` and ``parent slot < child slot``, a parent always ranks
before its children, so every prefix is a valid tree. Ranks come from one integer sort of keys that pack
``f``'s float32 bits (high bits; order-preserving for f >= 0) and the slot (low bits): keys are unique per
row, so a plain sort is exact, and "the top-k of row r" is simply ``key >= k-th largest key of row r``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from policies import token_tree
from policies.budget import adaptive_shape

DEFAULT_STATIC_WIDTHS: tuple[int, ...] = (1, 1, 3, 1, 1, 1, 1, 1)  # SpecInfer-style: 20 nodes, depth 8
LATENCY_CORRECTION = 1.05  # flexflow-serve inflates the step-time estimate by ~5% when computing A(r)
SLO_CAP_FACTOR = 1.2  # flexflow-serve: one request takes at most ~1.2 * budget / n nodes in the SLO phase


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
    No SLO (inf), zero, negative or NaN SLOs give 1: the free root token is enough.
    """
    slo_s = np.asarray(slo.tpot_slo_s, dtype=np.float64)
    slo_s = np.where(slo_s > 0, slo_s, np.inf)  # NaN, 0 and negative SLOs count as none
    elapsed_s = np.asarray(slo.decode_time_s, dtype=np.float64) + float(t_step_s) * latency_correction
    a = elapsed_s / slo_s - np.asarray(slo.decoded_tokens)
    return np.fmin(np.fmax(a, 1.0), float(max_depth) + 1.0)  # fmax: a NaN (inf / inf) becomes 1


_SLOT_BITS_MAX = 16  # keys keep 23 - slot_bits mantissa bits of f; M <= 65536 keeps >= 7
REACH_RTOL = 2.0**-15  # f is truncated to ~17 bits (always down): a prefix this close to the need reaches it


@functools.lru_cache(maxsize=16)
def _slot_bits(m: int, b: int) -> np.ndarray:
    """``2**b - 1 - slot`` for slots 0..m-1: the low bits of the keys (larger for earlier slots)."""
    out = np.int32((1 << b) - 1) - np.arange(m, dtype=np.int32)
    out.flags.writeable = False
    return out


def _keys(path_prob: np.ndarray, valid: np.ndarray, positive_only: bool) -> tuple[np.ndarray, int]:
    """Per-row unique int32 keys ordering nodes by (f desc, slot asc), and the slot bit count b.

    A key is f's float32 bit pattern (order-preserving for f >= 0) with its low b bits replaced by
    ``2**b - 1 - slot``. f values closer than ~2**(b - 23) relative (~8e-6 for M = 64) compare equal and
    fall to the slot tiebreak: negligible for the objective, and a parent (f >= child's, smaller slot) still
    ranks first. Unusable nodes (padding; with ``positive_only`` also f <= 0, NaN, inf) get f bits 0: their
    keys are <= ``2**b - 1`` and rank after every usable node.
    """
    m = path_prob.shape[1]
    b = max(1, (m - 1).bit_length())
    if b > _SLOT_BITS_MAX:
        raise ValueError(f"at most {1 << _SLOT_BITS_MAX} candidate slots per request, got {m}")
    low = (1 << b) - 1
    f32 = np.ascontiguousarray(path_prob, dtype=np.float32)
    if not positive_only:  # fixed shapes keep every valid node: NaN and negatives just rank as 0
        f32 = np.fmax(f32, np.float32(0))
    bits = f32.view(np.int32)
    if positive_only:
        # low < bits < inf's bits (one unsigned compare): f > 0, finite, not lost to the slot bits
        usable = (bits - np.int32(low + 1)).view(np.uint32) < np.uint32(0x7F800000 - low - 1)
        usable &= valid
    else:
        usable = valid
    return ((bits & np.int32(~low)) * usable) | _slot_bits(m, b), b


def _sorted_desc(key: np.ndarray) -> np.ndarray:
    """Each row's keys, largest first (a reversed view of an ascending sort; faster than sorting -key)."""
    return np.sort(key, axis=1)[:, ::-1]


_KEY_MAX = np.int32(np.iinfo(np.int32).max)  # above every key


def _slo_phase(
    sorted_desc: np.ndarray,
    b: int,
    slo: SLOState,
    token_budget: int,
    t_step_s: float,
    max_depth: int,
    n_cap: int,
    latency_correction: float,
    slo_cap_factor: float,
    serve_unreachable: bool = True,
) -> np.ndarray:
    """Nodes each request gets in the SLO phase ([R] int64): a prefix of its ranking, sum <= budget.

    Order: requests by ascending node cost, the number of their best nodes whose f sums to their need
    ``A(r) - 1`` (the root pays 1); ties: larger A(r) first, then request index. Requests that cannot reach
    it within the SLO-phase cap (``min(n_max, ceil(1.2 * budget / R))``) come last, larger A(r) first, and
    get all their usable nodes within the cap, as in flexflow. Cheapest-first maximises the number of
    requests on their SLO this step (unit values, integer costs: the classic greedy) and is what flexflow's
    "ascending target" order approximates, since cost grows with the target for similar trees. When the
    budget runs out mid-request, that request gets the rest.
    """
    r = sorted_desc.shape[0]
    need = required_acceptance(slo, t_step_s, max_depth, latency_correction) - 1.0
    if need.shape != (r,):
        raise ValueError(f"SLOState holds {need.shape} requests, the candidate arrays {r}")
    slo_cap = min(n_cap, max(1, math.ceil(slo_cap_factor * token_budget / r)))
    top_f = ((sorted_desc[:, :slo_cap] >> b) << b).view(np.float32)  # truncated f by rank; 0 = unusable
    prefix = np.cumsum(top_f, axis=1, dtype=np.float64)
    goal = need * (1.0 - REACH_RTOL)
    # nodes needed = prefixes (the empty one included) still short of the goal; slo_cap + 1 = unreachable
    cost = np.count_nonzero(prefix < goal[:, None], axis=1) + (goal > 0)
    grant = np.where(cost <= slo_cap, cost, np.count_nonzero(top_f, axis=1) if serve_unreachable else 0)
    order = np.argsort(cost * (max_depth + 2.0) - need, kind="stable")
    g = grant[order]
    given = np.empty_like(grant)
    given[order] = np.minimum(g, np.maximum(token_budget - (np.cumsum(g) - g), 0))
    return given


def _thresholds(sorted_desc: np.ndarray, low: int, base: np.ndarray, budget: int, n_cap: int) -> np.ndarray:
    """Per-request key thresholds ([R]): keep each request's ``base`` best nodes, then spend ``budget``
    more on the globally best remaining ones among each request's top ``n_cap``; select ``key >= thr``.

    The throughput phase picks the ``budget`` largest candidate keys, candidates being ranks in
    [base, n_cap) with usable keys (> ``low``); its global cut ``v`` becomes a per-row threshold, capped
    by the row's ``n_cap``-th key. Exactly ``min(budget, candidates)`` nodes are added; on cross-row ties
    at ``v`` (one per row at most: keys are unique in a row) the first rows win. Every row keeps a prefix
    of its ranking, hence a valid tree.
    """
    r = sorted_desc.shape[0]
    rows = np.arange(r)
    slo_thr = np.where(base > 0, sorted_desc[rows, np.maximum(base - 1, 0)], _KEY_MAX)
    if budget <= 0:
        return slo_thr
    values = sorted_desc[:, :n_cap] * (np.arange(n_cap) >= base[:, None])  # ranks below base -> 0
    thr = np.maximum(sorted_desc[:, n_cap - 1], low + 1)  # the n_cap cap; usable keys only
    flat = values.ravel()
    if budget < flat.size:
        v = np.partition(flat, flat.size - budget)[flat.size - budget]  # the budget-th largest
        if v > low:  # else fewer usable candidates than budget: take them all
            thr = np.maximum(thr, v)
            extra = int(np.count_nonzero(values >= v)) - budget
            if extra > 0:
                losers = np.nonzero((values == v).any(axis=1))[0][-extra:]
                thr[losers] = v + 1
    return np.minimum(slo_thr, thr)


def _shape_select(path_prob: np.ndarray, parent: np.ndarray, valid: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """Fixed shape: each kept node at depth l-1 keeps its top-``widths[l-1]`` children by (f desc, slot asc).

    One sort of (parent group, f key) lines siblings up best-first, so "rank among siblings >= w" is "the
    sorted entry w places earlier has the same parent"; then one [R, M] gather per level moves the frontier
    down from the root. No depth array needed.
    """
    r, m = valid.shape
    p = token_tree.sanitize_parent(parent, valid)
    key, b = _keys(path_prob, valid, positive_only=False)
    low = (1 << b) - 1
    group = np.where(valid, m - p, 0)  # parent group; padding in group 0, sorted last
    comp_desc = _sorted_desc((group << 31) | key)
    grp = comp_desc >> 31
    # rank_class[j] = how many of the distinct widths the node's sibling rank reaches (0 = below all)
    distinct = sorted(set(w for w in widths if w < m))
    rank_class = np.zeros((r, m), dtype=np.int8)
    same = np.zeros((r, m), dtype=bool)
    for w in distinct:
        same[:, :w] = False  # the first w of a row have no entry w places earlier
        np.equal(grp[:, w:], grp[:, :-w], out=same[:, w:])
        rank_class += same.view(np.int8)
    node_flat = (low - (comp_desc & low)) + (np.arange(r) * m)[:, None]
    by_node = np.empty(r * m, dtype=np.int8)
    by_node[node_flat.ravel()] = rank_class.ravel()
    by_node = by_node.reshape(r, m)
    # ok[k]: the node is among its parent's top distinct[k] children (and real); widths >= m admit all
    ok = {w: valid & (by_node <= i) for i, w in enumerate(distinct)}
    front = np.zeros((r, m + 1), dtype=bool)  # last column: the implicit root
    front[:, m] = True
    front_flat = front.ravel()
    parent_flat = np.where(p >= 0, p, m) + (np.arange(r) * (m + 1))[:, None]
    selected = np.zeros((r, m), dtype=bool)
    kept = np.empty((r, m), dtype=bool)
    for w in widths:
        np.take(front_flat, parent_flat, out=kept)
        kept &= ok.get(w, valid)
        if not kept.any():
            break
        selected |= kept
        front[:, :m] = kept
        front[:, m] = False
    return selected


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
    min_path_prob: float = 0.0,
    serve_unreachable: bool = True,
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
    f is compared in float32 (pass float32 to skip a conversion); values closer than ~1e-5 relative tie.
    min_path_prob: the throughput phase (and dynamic-tree) skips nodes with f below it: a node that costs more
        step time than its expected tokens repay (the engine sets it from the latency model's marginal cost).
        The SLO phase ignores it: a request's SLO need is served even by unlikely nodes.
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
    budget = max(int(token_budget), 0)
    n_max = max(int(n_max), 0)
    if n_max == 0 or budget == 0:
        return np.zeros((r, m), dtype=bool)
    key, b = _keys(path_prob, valid, positive_only=True)
    sorted_desc = _sorted_desc(key)
    n_cap = min(n_max, m)
    if spec.kind == "dynamic-tree":
        base = np.zeros(r, dtype=np.int64)
    else:
        base = _slo_phase(
            sorted_desc, b, slo, budget, t_step_s, max_depth, n_cap, latency_correction, slo_cap_factor,
            serve_unreachable,
        )
    low = (1 << b) - 1
    if min_path_prob > 0:  # keys below f = min_path_prob count as unusable for the throughput phase
        floor_key = int(np.float32(min(min_path_prob, 1.0)).view(np.int32)) & ~low
        low = max(low, floor_key - 1)
    thr = _thresholds(sorted_desc, low, base, budget - int(base.sum()), n_cap)
    return key >= thr[:, None]


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


def cap_tree_size(selected: np.ndarray, n_max: int) -> np.ndarray:
    """Unbudgeted shapes (static-tree, chain) can exceed the mask width: keep the first n_max (parents-first)."""
    if selected.size == 0 or int(selected.sum(axis=1).max()) <= n_max:
        return selected
    return selected & (np.cumsum(selected, axis=1) <= n_max)
