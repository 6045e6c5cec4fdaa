"""Step token budget, adaptive draft shape, and the spare budget a replica reports to the router (DESIGN.md 3)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from policies.latency_model import LatencyModel


def choose_token_budget(
    model: LatencyModel,
    *,
    context_tokens: float = 0.0,
    tolerance: float = 1.2,
    min_tokens: int = 1,
    max_tokens: int = 1024,
    max_step_s: float | None = None,
) -> int:
    """Largest step size (tokens, roots included) whose predicted time stays within ``tolerance`` x the
    memory-bound floor (the time of a 1-token step at this context), and within ``max_step_s`` if given.

    ``max_step_s`` is how an SLO mix enters: e.g. tightest TPOT SLO x tokens a tight request expects per
    step. Returns at least ``min_tokens`` even if that is over the limits (a step must make progress).
    """
    sizes = np.arange(min_tokens, max(max_tokens, min_tokens) + 1)
    t_s = np.asarray(model.predict(sizes, context_tokens))
    slack = 1.0 + 1e-9  # a size exactly on the limit counts as within it, whatever the rounding
    ok = t_s <= tolerance * float(model.predict(1, context_tokens)) * slack
    if max_step_s is not None:
        ok &= t_s <= max_step_s * slack
    # the latency model is non-decreasing, so ``ok`` is a prefix; take its end
    return int(sizes[ok][-1]) if ok.any() else int(min_tokens)


def adaptive_shape(
    token_budget: int,
    num_requests: int,
    draft_budget: int,
    c1: float = 1.0,
    c2: int = 0,
    d_min: int = 1,
    d_max: int = 8,
    w_max: int = 8,
) -> tuple[int, int]:
    """(depth, width) of the draft beam, the paper's rule:

    ``d = clip(floor(B / (n + c1)) - 1, d_min, d_max)``, ``w = clip(floor(B_draft / n) + c2, 1, w_max)``.
    ``token_budget`` is the step budget B (roots included: B / n tokens per request, minus its root, bounds
    a useful depth); ``draft_budget`` is B_draft, tokens one draft step may process over all requests.
    c1 > 0 keeps depth below the per-request share so the budget can still be shared unevenly; our defaults
    (c1 = 1, c2 = 0, d in [1, 8], w <= 8) are our own choice, the paper does not fix them.
    """
    n = max(int(num_requests), 1)
    depth = int(np.clip(math.floor(token_budget / (n + c1)) - 1, d_min, d_max))
    width = int(np.clip(math.floor(draft_budget / n) + c2, 1, w_max))
    return depth, width


def required_nodes(required_accept: np.ndarray, acceptance_rate: float, max_nodes: int) -> np.ndarray:
    """Draft nodes request r likely needs to gain ``A(r)`` tokens this step ([R] int64).

    Estimate: the root pays 1, so the nodes must yield ``A - 1``; a k-chain whose every token is accepted with
    probability ``a`` yields ``a (1 - a^k) / (1 - a)`` in expectation; take the smallest such k. Trees do
    better than chains at equal size, so this overestimates the need (spare budget errs low). A need the
    infinite chain cannot reach (``A - 1 >= a / (1 - a)``) costs ``max_nodes``.
    """
    need = np.maximum(np.asarray(required_accept, dtype=np.float64) - 1.0, 0.0)
    a = float(acceptance_rate)
    if a >= 1.0:
        k = np.ceil(need - 1e-9)
    elif a <= 0.0:
        k = np.where(need > 0, np.inf, 0.0)
    else:
        frac = need * (1.0 - a) / a  # need = a (1 - a^k) / (1 - a)  <=>  a^k = 1 - frac
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.where(frac < 1.0, np.ceil(np.log1p(-np.minimum(frac, 1.0)) / math.log(a) - 1e-9), np.inf)
    k = np.where(need > 0, np.maximum(k, 1.0), 0.0)
    return np.minimum(k, max_nodes).astype(np.int64)


def chain_tokens(num_nodes: int, acceptance_rate: float) -> float:
    """Expected tokens of a step whose tree is a chain of ``num_nodes`` at per-token acceptance a (the root's token
    included): ``1 + a (1 - a^k) / (1 - a)``, the model ``required_nodes`` inverts."""
    a = float(np.clip(acceptance_rate, 0.0, 1.0 - 1e-9))
    return 1.0 + a * (1.0 - a**num_nodes) / (1.0 - a)


def spare_budget(token_budget: int, required_nodes_per_request: np.ndarray) -> int:
    """Node budget left after every running request's SLO need; negative means over-committed.

    ``token_budget`` counts draft nodes (roots excluded), as ``tree_selection.select`` does; the need comes
    from ``required_nodes``. The router sends tight-SLO requests where this is largest.
    """
    return int(token_budget) - int(np.sum(required_nodes_per_request))


def min_worthwhile_path_prob(model: LatencyModel, step_tokens: int, context_tokens: float,
                             expected_tokens: float) -> float:
    """Smallest f for which verifying one more tree node raises the step's token throughput.

    One more node lengthens the step by the latency model's marginal time per token ``s`` and yields ``f``
    expected tokens; throughput ``T / t`` rises iff ``(T + f) / (t + s) > T / t``, i.e. ``f > T * s / t``, where
    ``T`` is the step's expected output tokens and ``t`` its time. On a GPU's flat region ``s`` ~ 0 and every
    node is worth verifying; on a compute-bound CPU most deep, unlikely nodes are not.
    """
    t = float(model.predict(step_tokens, context_tokens))
    s = float(model.predict(step_tokens + 1, context_tokens)) - t
    if t <= 0 or s <= 0:
        return 0.0
    return float(expected_tokens) * s / t


def throughput_cut_path_prob(path_probs: np.ndarray, model: LatencyModel, step_tokens: int,
                             context_tokens: float, expected_tokens: float) -> float:
    """The f below which this step's candidates are not worth verifying, chosen from the candidates themselves.

    Verifying the k most probable candidates yields ``expected_tokens`` (the roots' sure tokens) plus the sum
    of their f in ``model.predict(step_tokens + k)`` seconds; k* maximises that rate over k = 0 .. n. Pricing
    the whole curve matters where the cost is not smooth: on a CPU's bf16 matrix unit a step is flat up to a
    16-row tile and then jumps, so the slope at the step's base (``min_worthwhile_path_prob``) is ~0 and lets
    a tail of unlikely nodes buy the next tile. Returns the k*-th largest f (``inf`` when k* = 0: no candidate
    pays for itself). A threshold keeps or drops equal f together, so where k* splits a run of equal values
    the better of all or none of the run is taken.
    """
    f = np.sort(np.asarray(path_probs, dtype=np.float64).ravel())[::-1]
    if f.size == 0:
        return 0.0
    k = np.arange(f.size + 1)
    gain = float(expected_tokens) + np.concatenate([[0.0], np.cumsum(f)])
    rate = gain / np.maximum(np.asarray(model.predict(step_tokens + k, context_tokens), dtype=np.float64), 1e-12)
    best = int(np.argmax(rate))  # the first maximum: the smaller k among ties
    if best == 0:
        return float("inf")
    v = f[best - 1]
    k_lo, k_hi = int(np.count_nonzero(f > v)), int(np.count_nonzero(f >= v))
    if rate[k_lo] >= rate[k_hi]:
        return float(f[k_lo - 1]) if k_lo else float("inf")
    return float(v)


def gain_per_step(tree_steps: int, accepted_tokens: float, gain_sq: float, *, prior_tokens_per_step: float,
                  prior_steps: float) -> tuple[float, float]:
    """(mean, standard deviation) of the tokens a speculating request gains per step (accepted draft tokens + the
    bonus token): what the replica measured over ``tree_steps`` verified trees (``accepted_tokens`` in all, squared
    gains summing to ``gain_sq``), shrunk toward a prior worth ``prior_steps`` trees whose mean is
    ``prior_tokens_per_step`` and whose spread equals its accepted tokens (sd = prior - 1).

    Why a prior: the SLO pace plan and fail fast price every TPOT pace with this gain. Measured alone it is 1 token
    per step until a tree has been verified, and noisy over the first few; at 1 token per step a tight class (1.2x
    the unloaded TPOT) cannot be kept even by an idle replica, so fail fast judges each newcomer as having no TPOT
    SLO and the plan protects no one. A replica that starts into a burst (a scale-up, a restart, each run of a
    sweep) then admits every arrival unprotected, and the TTFT floor's prefill takes their pace. ``prior_steps`` 0:
    the measurement alone (1 token per step, spread 0, before any tree)."""
    prior = max(float(prior_tokens_per_step), 1.0)
    weight = max(float(prior_steps), 0.0)
    n = int(tree_steps) + weight
    if n <= 0:
        return 1.0, 0.0
    mean = (int(tree_steps) + float(accepted_tokens) + weight * prior) / n
    second = (float(gain_sq) + weight * (prior**2 + (prior - 1.0) ** 2)) / n
    return mean, math.sqrt(max(second - mean**2, 0.0))


class PacePlan(NamedTuple):
    """What ``slo_pace_plan`` decided: the step's prefill and reserved SLO nodes, which requests it protects, and
    whether one step size keeps every protected request on its pace (False: the plan is over-committed and the
    step prefills nothing)."""

    prefill_tokens: int
    slo_nodes: int
    protected: np.ndarray  # [R] bool
    feasible: bool


def slo_step_plan(model: LatencyModel, **kwargs) -> tuple[int, int]:
    """(prefill tokens, SLO nodes) of ``slo_pace_plan``: the step's split, as the scheduler and the simulator use it."""
    plan = slo_pace_plan(model, **kwargs)
    return plan.prefill_tokens, plan.slo_nodes


def slo_pace_plan(
    model: LatencyModel,
    *,
    root_tokens: int,
    context_tokens: float,
    decode_time_s: np.ndarray,
    decoded_tokens: np.ndarray,
    tpot_slo_s: np.ndarray,
    remaining_tokens: np.ndarray,
    acceptance_rate: float,
    tokens_per_step: float,
    tokens_per_step_sd: float,
    max_nodes_per_request: int,
    max_tokens: int,
    max_prefill_tokens: int,
    overhead_s: float = 0.0,
    confidence_z: float = 2.0,
) -> PacePlan:
    """The prefill tokens and SLO nodes of a step that keeps every protected decoding request on a pace that
    finishes it within its TPOT SLO, and prefills as fast as that allows.

    Request r has ``T = (o + m) * slo - l`` seconds left for its ``m`` remaining tokens (``l`` seconds spent on
    ``o``). Its pace is ``(m + z * sd * sqrt(m / g)) / T`` tokens per second: the remaining tokens plus a cushion
    of ``z`` standard deviations of what ``m / g`` steps gain (per-step gains of mean ``g`` and deviation ``sd``,
    measured, taken as independent), spread over the time left. So a short request, whose few steps vary most,
    is planned with the widest headroom, a long one near its SLO, banked slack is spent evenly over the rest of
    the request and a debt is recovered the same way; a request that even the smallest step keeps on pace only
    without the cushion is planned without it. A step of N tokens takes ``t = predict(N) + overhead_s``
    (``overhead_s``: the draft and host time) and must give r ``t x pace`` tokens; a step size is allowed if a
    chain at per-token acceptance ``a`` can, and ``required_nodes`` prices the nodes, which are reserved. What is
    left of N after the roots and those nodes is prefill, and the plan takes the N with the most prefill per second.

    Why a pace and not the slack: bounding each step by the tightest request's slack (Sarathi's budget, set per
    step) alternates long prefill steps with prefill-free catch-up steps, and on a memory-bound GPU the many
    short steps waste the step's fixed cost (70B simulation, 7 req/s: 427 vs 510 tok/s throughput). Pricing the
    nodes matters as much: a step that carries prefill must still leave the tight requests the tree they need.
    Why a cushion that shrinks with length rather than a fixed margin on the SLO: a fixed margin either starves
    short requests of headroom or makes every long one pay for it (70B simulation, 10 req/s: a 0.8 margin gives
    89.3% / 488 tok/s, z = 2 90.8% / 503). Protected: requests with an SLO and tokens left that can still finish
    on it at ``tokens_per_step`` with the smallest step; others hold nothing back. None protected: all prefill,
    no SLO nodes.
    """
    max_prefill = max(int(max_prefill_tokens), 0)
    num_requests = np.asarray(tpot_slo_s).size
    if max_tokens <= root_tokens:
        return PacePlan(0, 0, np.zeros(num_requests, bool), False)
    slo = np.asarray(tpot_slo_s, dtype=np.float64)
    slo = np.where(np.isfinite(slo) & (slo > 0), slo, np.inf)
    l_s = np.asarray(decode_time_s, dtype=np.float64)
    o = np.asarray(decoded_tokens, dtype=np.float64)
    m = np.maximum(np.asarray(remaining_tokens, dtype=np.float64), 0.0)
    a = float(np.clip(acceptance_rate, 0.0, 1.0 - 1e-9))
    n_max = max(int(max_nodes_per_request), 0)
    g_max = chain_tokens(n_max, a)  # the most a request can expect from one step
    g = min(max(float(tokens_per_step), 1.0), g_max)
    sizes = np.arange(root_tokens, int(max_tokens) + 1)
    t_s = np.asarray(model.predict(sizes, context_tokens), dtype=np.float64) + float(overhead_s)  # [S]
    with np.errstate(invalid="ignore"):
        left_s = (o + m) * slo - l_s  # time the remaining tokens have if the request is to keep its SLO
        keep = np.isfinite(slo) & (m > 0) & (left_s > 0)
    left_s = np.where(keep, left_s, 1.0)
    cushion = max(float(confidence_z), 0.0) * max(float(tokens_per_step_sd), 0.0) * np.sqrt(np.maximum(m / g, 1.0))
    pace_plain = m / left_s  # tokens per second
    keep &= t_s[0] * pace_plain <= g * (1.0 + 1e-9)  # it can still finish on its SLO at the usual gain
    if not keep.any():
        return PacePlan(max_prefill, 0, keep, True)
    pace = (m + cushion)[keep] / left_s[keep]
    pace = np.where(t_s[0] * pace <= g_max * (1.0 + 1e-9), pace, pace_plain[keep])
    need = t_s[:, None] * pace[None, :]  # [S, K] tokens this step
    reach = (need <= g_max * (1.0 + 1e-9)).all(axis=1)
    nodes = required_nodes(np.fmax(need, 1.0).ravel(), a, n_max).reshape(need.shape).sum(axis=1)
    prefill = sizes - root_tokens - nodes
    ok = reach & (prefill >= 0)
    if not ok.any():
        return PacePlan(0, int(nodes[0]), keep, False)
    rate = np.where(ok, np.minimum(prefill, max_prefill) / np.maximum(t_s, 1e-9), -1.0)
    best = int(np.argmax(rate))  # the first maximum: the shortest step among ties
    return PacePlan(int(min(prefill[best], max_prefill)), int(nodes[best]), keep, True)
