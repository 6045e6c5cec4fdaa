"""policies.admission: EDF order, the TTFT prefill floor, fail-fast feasibility, the idle prefill time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.admission import (OfferedPrefill, deadline_order, first_token_times_s, idle_prefill_s, pace_tpot_slo_s,
                                shed_cutoff_tokens, tpot_pace_admits,
                                ttft_prefill_floor)
from policies.latency_model import LatencyModel, PiecewiseLinear

# 10 ms a step plus 1 ms a token: a step of P prefill tokens (no roots) takes 0.01 + 0.001 P seconds
LINEAR = LatencyModel(PiecewiseLinear((0.0, 1000.0), (0.01, 1.01)), 0.0)


def test_order_is_earliest_deadline_first_then_no_deadline_then_best_effort():
    deadline = np.array([5.0, np.inf, 2.0, 1.0, 2.0])
    arrival = np.array([0.0, 0.1, 0.2, 0.3, 0.1])
    best_effort = np.array([False, False, False, True, False])
    assert deadline_order(deadline, arrival, best_effort).tolist() == [4, 2, 0, 1, 3]


def test_first_token_times_golden():
    t = first_token_times_s(LINEAR, now_s=1.0, remaining_tokens=[100, 50], prefill_tokens=[100, 50],
                            num_roots=0, context_tokens=0)
    # P = 100: 1 step of 0.11 s, then 2 steps; P = 50: 2 steps of 0.06 s, then 3
    assert t == pytest.approx(np.array([[1.11, 1.22], [1.12, 1.18]]))


def test_floor_is_the_smallest_prefill_that_keeps_every_deadline():
    # one prompt of 100 tokens due in 0.5 s: P steps of 0.01 + 0.001 P; ceil(100 / P) (0.01 + 0.001 P) <= 0.5
    p, feasible = ttft_prefill_floor(LINEAR, now_s=0.0, deadline_s=[0.5], remaining_tokens=[100], num_roots=0,
                                     context_tokens=0, max_prefill_tokens=256)
    assert feasible.tolist() == [True]
    steps = lambda q: np.ceil(100 / q) * (0.01 + 0.001 * q)  # noqa: E731
    assert steps(p) <= 0.5 < min(steps(q) for q in range(1, p))
    # roots make every step longer: the floor rises
    p_roots, _ = ttft_prefill_floor(LINEAR, now_s=0.0, deadline_s=[0.5], remaining_tokens=[100], num_roots=100,
                                    context_tokens=0, max_prefill_tokens=256)
    assert p_roots > p


def test_infeasible_prompts_do_not_raise_the_floor_and_wait_behind():
    # the first prompt cannot make 0.05 s even alone at full speed (0.266 s); the second can, once the first waits
    p, feasible = ttft_prefill_floor(LINEAR, now_s=0.0, deadline_s=[0.05, 2.0], remaining_tokens=[256, 100],
                                     num_roots=0, context_tokens=0, max_prefill_tokens=256)
    assert feasible.tolist() == [False, True]
    assert p <= 100  # sized for the feasible prompt alone (in a 2 s budget a few steps will do)
    p0, feasible0 = ttft_prefill_floor(LINEAR, now_s=0.0, deadline_s=[np.inf, np.inf], remaining_tokens=[10, 10],
                                       num_roots=0, context_tokens=0, max_prefill_tokens=256)
    assert p0 == 0 and feasible0.all()  # no deadline, no floor


def test_a_new_arrival_that_would_push_others_past_their_deadline_shows_as_infeasible():
    # fail fast asks: with the newcomer in its EDF place, is it (and is everyone admitted before) still on time?
    deadline = np.array([0.3, 0.31])  # the admitted prompt, then the newcomer
    p, feasible = ttft_prefill_floor(LINEAR, now_s=0.0, deadline_s=deadline, remaining_tokens=[200, 200],
                                     num_roots=0, context_tokens=0, max_prefill_tokens=256)
    assert feasible.tolist() == [True, False]


def test_idle_prefill_sums_its_chunks():
    assert idle_prefill_s(LINEAR, 300, 256) == pytest.approx((0.01 + 0.256) + (0.01 + 0.044))
    assert idle_prefill_s(LINEAR, 10, 256, overhead_s=0.005) == pytest.approx(0.01 + 0.01 + 0.005)


def test_feasibility_looks_at_every_step_size_not_only_the_largest():
    # 1 ms a token up to 40, then a cliff: the largest step (256) is the slowest way to prefill a short prompt
    cliff = LatencyModel(PiecewiseLinear((0.0, 40.0, 41.0), (0.0, 0.04, 10.0), tail_slope=0.1), 0.0)
    p, feasible = ttft_prefill_floor(cliff, now_s=0.0, deadline_s=[0.1], remaining_tokens=[8], num_roots=0,
                                     context_tokens=0, max_prefill_tokens=256)
    assert feasible.tolist() == [True] and p <= 40


def _pace_admits(slo_s, remaining, decode_time_s=None, decoded=None, floor=0, sd=0.0):
    """The last request is the newcomer; no speculation (a = 0: one token a step), so a request of SLO s with its
    remaining tokens' time left needs a step of at most s seconds: at most 1000 s - 10 tokens."""
    n = len(slo_s)
    return tpot_pace_admits(
        LINEAR, newcomer=n - 1, tpot_slo_s=np.array(slo_s, float), remaining_tokens=np.array(remaining, float),
        decode_time_s=np.zeros(n) if decode_time_s is None else np.array(decode_time_s, float),
        decoded_tokens=np.zeros(n) if decoded is None else np.array(decoded, float), prefill_floor_tokens=floor,
        context_tokens=0.0, acceptance_rate=0.0, tokens_per_step=1.0, tokens_per_step_sd=sd,
        max_nodes_per_request=8, max_tokens=256, max_prefill_tokens=252, overhead_s=0.0, confidence_z=2.0)


def test_pace_admission_prices_the_ttft_floor_against_the_tpot_pace():
    # four requests of a 100 ms SLO: steps of at most 100 ms = 90 tokens, 4 of them roots, 86 left for prefill
    assert _pace_admits([0.1] * 4, [10] * 4, floor=86)
    assert not _pace_admits([0.1] * 4, [10] * 4, floor=87)  # its prompts would need steps that break the pace


def test_pace_admission_refuses_a_newcomer_that_cannot_keep_its_own_tpot():
    # an 11 ms SLO needs steps of at most 11 ms; four roots already take 14 ms
    assert not _pace_admits([0.1, 0.1, 0.1, 0.011], [10] * 4)
    assert _pace_admits([0.1, 0.1, 0.1, 0.014], [10] * 4)  # 14 ms: on pace in the roots-only step
    assert _pace_admits([0.1, 0.1, 0.1, np.inf], [10] * 4)  # no TPOT SLO: nothing of its own to keep


def test_pace_admission_does_not_blame_the_load_for_a_pace_no_replica_could_keep():
    # a 9 ms SLO is below even the one-root step (11 ms): an idle replica misses it too, so refusing helps no one
    assert _pace_admits([0.009], [10])
    assert _pace_admits([0.1], [10], floor=10**6)  # an idle replica: its TTFT is judged elsewhere
    assert _pace_admits([0.1, 0.1, 0.1, 0.009], [10] * 4)
    # 12 ms: on pace alone (11 ms), not behind three others (14 ms); the load is the cause, so it is refused
    assert _pace_admits([0.012], [10])
    assert not _pace_admits([0.1, 0.1, 0.1, 0.012], [10] * 4)


def test_pace_admission_refuses_a_newcomer_that_pushes_a_running_request_off_its_pace():
    # the first request has 135 ms for its last 10 tokens: steps of at most 13.5 ms, i.e. 3 roots, not 4
    running = dict(decode_time_s=[1.215, 0, 0, 0], decoded=[90, 0, 0, 0])  # (90 + 10) x 13.5 ms - 1.215 s = 135 ms
    assert not _pace_admits([0.0135, 0.1, 0.1, 0.1], [10] * 4, **running)
    three = {k: v[:3] for k, v in running.items()}
    assert _pace_admits([0.0135, 0.1, 0.1], [10] * 3, **three)  # the same newcomer behind two requests fits
    # one already off its pace (it cannot keep it even alone) is not protected, so it does not stop the newcomer
    assert _pace_admits([0.009, 0.1, 0.1, 0.1], [10] * 4, **running)


def test_pace_admission_judges_the_expected_pace_without_the_cushion():
    # a spread of 0.5 tokens a step would give the step plan a cushion (2 x 0.5 x sqrt(10) tokens: steps of 75 ms,
    # 61 prefill tokens); admission asks whether the load fits at the expected gain: 86 prefill tokens
    assert _pace_admits([0.1] * 4, [10] * 4, floor=80, sd=0.5)


def test_the_pace_protects_neither_best_effort_requests_nor_those_that_missed_their_ttft():
    slo = pace_tpot_slo_s(tpot_slo_s=[0.05, 0.05, 0.05, 0.05, 0.05], first_token_s=[1.0, 3.0, np.nan, np.nan, 1.0],
                          ttft_deadline_s=[2.0, 2.0, 2.0, np.inf, np.inf], best_effort=[False, False, False, False, True])
    assert slo.tolist() == [0.05, np.inf, 0.05, 0.05, np.inf]


def test_shed_cutoff_admits_the_shortest_prompts_that_fit_golden():
    prompts = [100, 50, 800, 50, 200]  # sorted: 50 50 100 200 800, offering 5 10 20 40 120 tok/s cumulated over 10 s
    assert shed_cutoff_tokens(prompts, 10.0, 120.0) == np.inf  # everything fits: no shedding
    assert shed_cutoff_tokens(prompts, 10.0, 50.0) == 200  # the 800-token prompt is shed
    assert shed_cutoff_tokens(prompts, 10.0, 15.0) == 50  # 100 would need 20 tok/s
    assert shed_cutoff_tokens(prompts, 10.0, 7.0) == 0  # the two 50s go together (10 tok/s) or not at all
    assert shed_cutoff_tokens(prompts, 10.0, 0.0) == 0
    assert shed_cutoff_tokens([], 10.0, 1.0) == np.inf and shed_cutoff_tokens(prompts, 0.0, 1.0) == np.inf


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4000), min_size=1, max_size=60), st.floats(0.5, 60.0), st.floats(0.0, 5000.0))
def test_shed_cutoff_is_the_largest_length_whose_shorter_prompts_fit(prompts, span_s, capacity):
    p = np.array(prompts, dtype=np.float64)
    cutoff = shed_cutoff_tokens(p, span_s, capacity)
    if cutoff == np.inf:
        assert p.sum() / span_s <= capacity
        return
    assert p[p <= cutoff].sum() / span_s <= capacity  # what it admits fits
    above = p[p > cutoff]
    assert above.size and p[p <= above.min()].sum() / span_s > capacity  # the next length up would not


def test_offered_prefill_window_span_and_capacity():
    load = OfferedPrefill(window_s=10.0, min_arrivals=3, capacity_ema=0.5)
    for t, n in ((0.0, 900), (1.0, 100), (2.0, 100)):
        load.observe_arrival(t, n)
    assert load.cutoff_tokens(2.0) == np.inf  # no saturated step yet: no capacity to judge against
    load.observe_saturated_step(100, 0.5)  # 200 tok/s
    load.observe_saturated_step(0, 0.5)  # a step whose prompts all waited (the TPOT pace held them): 0 tok/s
    assert load.capacity_tok_s == pytest.approx(100.0)
    assert load.cutoff_tokens(2.0) == np.inf  # fail fast has refused no one: the replica is not overloaded
    load.observe_refusal(1.5)
    # 3 arrivals span 2 s, stretched to 3 s: 1100 tokens offer 367 tok/s > 100; the two 100s offer 67
    assert load.cutoff_tokens(2.0) == 100
    assert load.cutoff_tokens(11.5) == np.inf  # the refusal is 10 s old: out of the window
    load.observe_refusal(11.0)
    load.observe_arrival(11.5, 100)  # the 900-token arrival (t = 0) and the one at t = 1 leave the window
    assert [t for t, _ in load.arrivals] == [2.0, 11.5]
    assert load.cutoff_tokens(11.5) == np.inf  # 2 arrivals: below min_arrivals, no estimate


def test_offered_prefill_capacity_is_at_least_what_was_admitted():
    load = OfferedPrefill(window_s=30.0, min_arrivals=3)
    for t, n in ((0.0, 500), (1.0, 100), (2.0, 100), (3.0, 100)):
        load.observe_arrival(t, n)
    load.observe_saturated_step(10, 1.0)  # metered steps: 10 tok/s
    load.observe_refusal(3.0)
    # 4 arrivals span 3 s, stretched to 4 s: 800 tokens offer 200 tok/s; at 10 tok/s not even a 100-token prompt fits
    assert load.cutoff_tokens(3.0) == 0
    for t in (1.0, 2.0, 3.0):
        load.observe_admission(t, 100)  # it admitted the three 100-token prompts: 75 tok/s, which it serves
    assert load.cutoff_tokens(3.0) == 100
    load.observe_admission(3.0, 500)  # and the 500-token one as well: 200 tok/s, everything fits
    assert load.cutoff_tokens(3.0) == np.inf
