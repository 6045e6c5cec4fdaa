"""policies.admission: EDF order, the TTFT prefill floor, fail-fast feasibility, the idle prefill time."""

from __future__ import annotations

import numpy as np
import pytest

from policies.admission import deadline_order, first_token_times_s, idle_prefill_s, ttft_prefill_floor
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
