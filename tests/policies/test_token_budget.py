"""budget: token budget from the latency model, adaptive draft shape, required nodes and spare budget."""

from __future__ import annotations

import numpy as np
import pytest

from policies.budget import adaptive_shape, choose_token_budget, required_nodes, slo_prefill_tokens, spare_budget
from policies.latency_model import LatencyModel, PiecewiseLinear

# 20 ms floor up to 64 tokens, then 1 ms per token; 1 us per context token
MODEL = LatencyModel(PiecewiseLinear((1.0, 64.0, 128.0), (0.020, 0.020, 0.084), tail_slope=0.001), 1e-6)


def test_choose_token_budget_golden():
    assert choose_token_budget(MODEL, tolerance=1.2) == 68  # 20 ms * 1.2 = 24 ms -> 64 + 4
    assert choose_token_budget(MODEL, tolerance=1.0) == 64  # the end of the flat part
    # the floor rises with context (20 ms + 10 ms): 30 ms * 1.2 = 36 ms -> 64 + 6
    assert choose_token_budget(MODEL, context_tokens=10_000, tolerance=1.2) == 70
    assert choose_token_budget(MODEL, tolerance=3.0, max_tokens=100) == 100
    assert choose_token_budget(MODEL, tolerance=2.0, max_step_s=0.030) == 74  # SLO mix caps the step
    assert choose_token_budget(MODEL, max_step_s=0.001, min_tokens=8) == 8  # never below min_tokens


@pytest.mark.parametrize(
    "args, expected",
    [
        ((64, 8, 64), (6, 8)),  # d = floor(64 / 9) - 1, w = floor(64 / 8)
        ((16, 16, 16), (1, 1)),  # d clipped up to d_min, w = 1
        ((1024, 2, 1024), (8, 8)),  # both clipped to their maxima
        ((64, 0, 64), (8, 8)),  # no requests: treated as one
        ((40, 4, 8), (7, 2)),
    ],
)
def test_adaptive_shape_golden(args, expected):
    assert adaptive_shape(*args) == expected


def test_adaptive_shape_constants():
    assert adaptive_shape(64, 8, 64, c1=0, c2=2, d_max=16, w_max=16) == (7, 10)
    assert adaptive_shape(64, 8, 64, d_min=2, d_max=4, w_max=3) == (4, 3)


def test_required_nodes_golden():
    a = np.array([1.0, 1.5, 1.75, 1.875, 2.0, 5.0])
    # acceptance 0.5: a k-chain yields 1 - 0.5^k; needs 0, 0.5, 0.75, 0.875 -> 0, 1, 2, 3; 1 is unreachable
    np.testing.assert_array_equal(required_nodes(a, 0.5, max_nodes=16), [0, 1, 2, 3, 16, 16])
    np.testing.assert_array_equal(required_nodes(a, 1.0, max_nodes=16), [0, 1, 1, 1, 1, 4])
    np.testing.assert_array_equal(required_nodes(a, 0.0, max_nodes=16), [0, 16, 16, 16, 16, 16])
    # need 2: .8 + .64 + .512 = 1.952 falls short, a 4th node (+ .4096) reaches it
    np.testing.assert_array_equal(required_nodes(np.array([3.0]), 0.8, max_nodes=16), [4])


def test_spare_budget():
    assert spare_budget(100, np.array([3, 0, 16])) == 81
    assert spare_budget(10, np.array([8, 8])) == -6  # over-committed is reported as such
    assert spare_budget(10, np.array([], dtype=np.int64)) == 10


def test_min_worthwhile_path_prob_is_throughput_break_even():
    from policies.budget import min_worthwhile_path_prob
    from policies.latency_model import LatencyModel

    # t(n) = 50 ms + 2 ms per token: a 10-token step takes 70 ms; one more node costs 2 ms.
    model = LatencyModel.fit([(n, 0, 0.05 + 0.002 * n) for n in (1, 2, 4, 8, 16, 32, 64)])
    f_min = min_worthwhile_path_prob(model, 10, 0, expected_tokens=12.0)
    assert abs(f_min - 12.0 * 0.002 / 0.070) < 1e-3
    # break-even: exactly f_min extra tokens for 2 ms keeps throughput unchanged
    assert abs((12.0 + f_min) / 0.072 - 12.0 / 0.070) < 1e-3
    flat = LatencyModel.fit([(n, 0, 0.03) for n in (1, 8, 64)])
    assert min_worthwhile_path_prob(flat, 10, 0, 12.0) == 0.0


def _rate(f_desc, k, model, base, roots):
    return (roots + f_desc[:k].sum()) / float(model.predict(base + k, 0))


def test_throughput_cut_maximises_the_step_token_rate():
    from policies.budget import throughput_cut_path_prob

    rng = np.random.default_rng(0)
    for _ in range(200):
        # random monotone step cost with a jump (a matrix unit's next tile) somewhere
        knee = int(rng.integers(2, 40))
        jump = float(rng.uniform(0.0, 0.03))
        knots = (1.0, float(knee), float(knee + 1), 200.0)
        values = (0.05, 0.05 + 1e-4 * knee, 0.05 + 1e-4 * knee + jump, 0.05 + 1e-4 * knee + jump + 0.01)
        model = LatencyModel(PiecewiseLinear(knots, values, tail_slope=1e-4), 0.0)
        f = rng.random(int(rng.integers(0, 60))) ** 4
        roots = int(rng.integers(1, 8))
        cut = throughput_cut_path_prob(f, model, roots, 0, roots)
        f_desc = np.sort(f)[::-1]
        k = int((f >= cut).sum()) if np.isfinite(cut) else 0
        best = max(_rate(f_desc, j, model, roots, roots) for j in range(f.size + 1))
        assert _rate(f_desc, k, model, roots, roots) == pytest.approx(best, rel=1e-9)
        # and with ties (f rounded to 2 digits) the threshold's all-or-none choice is the better of the two
        fr = np.round(f, 2)
        cut = throughput_cut_path_prob(fr, model, roots, 0, roots)
        k = int((fr >= cut).sum()) if np.isfinite(cut) else 0
        fr_desc = np.sort(fr)[::-1]
        reachable = [0] + [int((fr >= v).sum()) for v in np.unique(fr)]
        best = max(_rate(fr_desc, j, model, roots, roots) for j in reachable)
        assert _rate(fr_desc, k, model, roots, roots) == pytest.approx(best, rel=1e-9)


def test_throughput_cut_skips_a_tail_that_buys_the_next_tile():
    from policies.budget import min_worthwhile_path_prob, throughput_cut_path_prob

    # flat to 16 tokens, +20 ms for the 17th (the next 16-row tile), flat again to 32
    tile = LatencyModel(PiecewiseLinear((1.0, 16.0, 17.0, 32.0), (0.060, 0.060, 0.080, 0.080)), 0.0)
    f = np.array([0.6, 0.4, 0.3] + [0.02 - 1e-4 * i for i in range(25)])
    assert min_worthwhile_path_prob(tile, 1, 0, 2.0) == 0.0  # the slope at the base sees nothing to pay
    cut = throughput_cut_path_prob(f, tile, 1, 0, 1.0)
    assert (f >= cut).sum() == 15  # the 1-token root + 15 nodes fill the first tile; the tail stops there
    ties = np.array([0.6, 0.4, 0.3] + [0.02] * 25)  # a threshold cannot split equal f: all or none of them
    assert (ties >= throughput_cut_path_prob(ties, tile, 1, 0, 1.0)).sum() == 3
    flat = LatencyModel(PiecewiseLinear((1.0, 64.0), (0.06, 0.06)), 0.0)
    assert throughput_cut_path_prob(ties, flat, 1, 0, 1.0) == pytest.approx(0.02)  # free nodes: take them all
    steep = LatencyModel(PiecewiseLinear((1.0, 2.0), (0.06, 0.12), tail_slope=0.06), 0.0)
    assert throughput_cut_path_prob(f, steep, 1, 0, 1.0) == float("inf")  # nothing pays for a doubled step
    assert throughput_cut_path_prob(np.zeros(0), tile, 1, 0, 1.0) == 0.0


# 10 ms + 1 ms per token: a step of n tokens takes 10 + n ms
LINEAR = LatencyModel(PiecewiseLinear((0.0, 1000.0), (0.010, 1.010)), 0.0)


def _prefill(decode_time_s, decoded, slo_s, remaining, gain=1.0, max_tokens=256, base=4, min_tokens=0,
             recovery_steps=1):
    return slo_prefill_tokens(LINEAR, base_tokens=base, context_tokens=0.0, decode_time_s=np.array(decode_time_s),
                              decoded_tokens=np.array(decoded), tpot_slo_s=np.array(slo_s),
                              remaining_tokens=np.array(remaining), tokens_per_step=gain, max_tokens=max_tokens,
                              min_tokens=min_tokens, recovery_steps=recovery_steps)


def test_slo_prefill_fills_exactly_the_tightest_requests_slack():
    # on SLO after the step iff l + t <= (o + g) slo; base step = 14 ms
    # request 0: 1.0 s for 20 tokens at 60 ms -> limit (21 * 0.06) - 1.0 = 260 ms -> 246 prefill tokens;
    # request 1: 0.5 s for 10 tokens at 55 ms -> limit 0.105 s -> 91 tokens: the tighter one decides
    assert _prefill([1.0, 0.5], [20, 10], [0.060, 0.055], [10, 10]) == 91
    assert _prefill([1.0], [20], [0.060], [10]) == 246
    # two tokens expected per step double the time the step may take (0.5 s, 10 tok, 55 ms, g = 2: 0.16 s)
    assert _prefill([0.5], [10], [0.055], [10], gain=2.0) == 146
    assert _prefill([1.0], [20], [0.060], [10], max_tokens=64) == 64


def test_slo_prefill_recovery_steps_lend_the_next_steps_slack():
    # back on the SLO within 3 steps: (20 + 3) * 0.06 - 1.0 - 2 * 0.014 = 0.352 s -> 338 tokens
    assert _prefill([1.0], [20], [0.060], [10], max_tokens=512, recovery_steps=3) == 338
    # a request with 2 tokens left has 2 steps to recover: (20 + 2) * 0.06 - 1.0 - 0.014 = 0.306 s
    assert _prefill([1.0], [20], [0.060], [2], max_tokens=512, recovery_steps=3) == 292
    assert _prefill([1.0], [20], [0.060], [10], max_tokens=512, recovery_steps=1) == 246


def test_slo_prefill_without_tight_requests_is_unbounded():
    assert _prefill([1.0, 2.0], [10, 10], [np.inf, np.nan], [5, 5]) == 256
    assert _prefill([], [], [], []) == 256
    assert _prefill([1.0], [20], [0.060], [0]) == 256  # done decoding: nothing to protect


def test_slo_prefill_protects_a_recoverable_request_that_is_behind_but_not_a_hopeless_one():
    # 1.3 s for 20 tokens at 60 ms: behind (limit 1.26 - 1.3 < 0), but 30 more tokens at 14 ms steps end at
    # 1.72 s <= 50 * 0.06 = 3.0 s: recoverable, so only min_tokens pass
    assert _prefill([1.3], [20], [0.060], [30]) == 0
    assert _prefill([1.3], [20], [0.060], [30], min_tokens=8) == 8
    # 2 more tokens can't recover it (1.3 + 2 * 0.014 > 22 * 0.06): it does not hold prefill back
    assert _prefill([1.3], [20], [0.060], [2]) == 256
    assert _prefill([1.3, 1.0], [20, 20], [0.060, 0.060], [2, 10]) == 246  # the other one still counts


def test_slo_prefill_result_fits_every_protected_limit_and_is_the_largest_that_does():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 6))
        o = rng.integers(1, 40, n).astype(float)
        slo = rng.uniform(0.02, 0.2, n)
        l_s = o * slo * rng.uniform(0.5, 1.2, n)
        m = rng.integers(1, 40, n)
        g = float(rng.uniform(1, 3))
        p = _prefill(l_s, o, slo, m, gain=g)
        t_base = LINEAR.predict(4)
        protect = l_s + np.ceil(m / g) * t_base <= (o + m) * slo
        if not protect.any():
            assert p == 256
            continue
        limit = ((o + np.minimum(g, m)) * slo - l_s)[protect].min()  # a request ending this step counts what it gets
        if p > 0:
            assert LINEAR.predict(4 + p) <= limit + 1e-9
        if p < 256:
            assert LINEAR.predict(4 + p + 1) > limit
