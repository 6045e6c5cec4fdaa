"""Golden cases for the SLO-headroom scaling decision (policies.autoscaling)."""

from __future__ import annotations

import numpy as np
import pytest

from policies.autoscaling import (MAX_REPLICA_LOAD, REASONS, steady_slo_load, ReplicaWindow, ScalingConfig, decide_replicas, replica_load,
                                  replicas_for_load)

CONFIG = ScalingConfig(min_replicas=1, max_replicas=8, scale_up_headroom=0.2, target_headroom=0.3,
                       scale_down_headroom=0.45)


def _even(total_load: float, n: int, peak: float | None = None, **kw) -> list[ReplicaWindow]:
    """``n`` replicas sharing ``total_load`` replica capacities evenly (past 1.0 per replica: demand they queue)."""
    share = total_load / n
    peak_share = share if peak is None else peak / n
    return [ReplicaWindow(load_mean=share, load_peak=peak_share, **kw) for _ in range(n)]


def _run(offered: list[float], window_ticks: int = 3, start: int = 1) -> tuple[list[int], list[str]]:
    """Each tick: the offered load (in replica capacities) spreads over the current replicas; the decision sees the
    mean of this tick and the peak of the last ``window_ticks`` ticks' total load, and takes effect at once."""
    n, counts, reasons, history = start, [], [], []
    for total in offered:
        history.append(total)
        d = decide_replicas(_even(total, n, peak=max(history[-window_ticks:])), CONFIG)
        assert d.reason in REASONS
        n = d.desired_replicas
        counts.append(n)
        reasons.append(d.reason)
    return counts, reasons


def test_replica_load_is_the_larger_of_budget_and_slots() -> None:
    assert replica_load(spare_token_budget=64, token_budget=256, running_requests=2, max_num_seqs=32) == 0.75
    assert replica_load(spare_token_budget=200, token_budget=256, running_requests=24, max_num_seqs=32) == 0.75
    assert replica_load(spare_token_budget=256, token_budget=256, running_requests=0, max_num_seqs=32) == 0.0
    # demand past capacity shows: SLO need over the budget, or requests waiting for a slot
    assert replica_load(spare_token_budget=-128, token_budget=256, running_requests=0, max_num_seqs=32) == 1.5
    assert replica_load(spare_token_budget=0, token_budget=256, running_requests=32, max_num_seqs=32,
                        waiting_requests=32) == 2.0
    assert replica_load(spare_token_budget=0, token_budget=256, running_requests=32, max_num_seqs=32,
                        waiting_requests=10_000) == MAX_REPLICA_LOAD


def test_steady_slo_load_grows_with_the_requests_not_their_lead() -> None:
    # full step 60 ms, SLO 30 ms: 2 tokens a step; at acceptance 0.75 a 2-chain yields 1.31 >= 1 -> 1 + 2 nodes;
    # no SLO: the root only; the waiting one costs the mean (7/3); budget 10
    load = steady_slo_load(np.array([0.03, 0.03, np.inf]), num_waiting=1, full_step_s=0.06, acceptance_rate=0.75,
                           token_budget=10, max_nodes=32, max_depth=8)
    assert load == pytest.approx((7 + 7 / 3) / 10)
    # twice the requests, twice the load (what sizing needs); an unreachable pace costs max_nodes
    assert steady_slo_load(np.array([0.03] * 4), 0, 0.06, 0.75, 10, 32, 8) == pytest.approx(12 / 10)
    assert steady_slo_load(np.array([0.03]), 0, 0.06, 0.5, 10, 32, 8) == pytest.approx(33 / 10)
    assert steady_slo_load(np.array([]), 0, 0.06, 0.75, 10, 32, 8) == 0.0
    # prompts arriving at 50 tokens/s take 3 tokens of each 60 ms step
    assert steady_slo_load(np.array([]), 0, 0.06, 0.75, 10, 32, 8, prefill_tokens_per_s=50.0) == pytest.approx(0.3)
    assert replica_load(200, 256, 2, 32, steady_load=0.9) == 0.9


def test_replicas_for_load() -> None:
    assert replicas_for_load(0.0, 0.3) == 1
    assert replicas_for_load(0.7, 0.3) == 1
    assert replicas_for_load(0.71, 0.3) == 2
    assert replicas_for_load(2.1, 0.3) == 3


def test_ramp_up_fires_before_replicas_are_full() -> None:
    # load 0.85 of one replica: not full, attainment still fine, but spare share 0.15 < 0.2 -> sized for 0.3 spare
    d = decide_replicas(_even(0.85, 1), CONFIG)
    assert (d.desired_replicas, d.reason) == (2, "headroom_low")
    # saturated replicas hide how much more is offered: at least one more each tick, sized by what is measured
    counts, reasons = _run([0.5, 0.9, 1.7, 2.6, 3.5, 3.5])
    assert counts == [1, 2, 3, 4, 5, 5]
    assert reasons[:5] == ["hold", "headroom_low", "headroom_low", "headroom_low", "headroom_low"]
    # a saturated replica whose queue holds 1.6 replicas' worth more: sized in one step (2.6 / 0.7 -> 4)
    d = decide_replicas([ReplicaWindow(load_mean=2.6, load_peak=2.8)], CONFIG)
    assert (d.desired_replicas, d.reason) == (4, "headroom_low")


def test_plateau_holds_inside_the_band() -> None:
    # 3 replicas at 0.6 each: 0.4 spare (>= 0.2, no scale-up); on 2 they would be at 0.9 (> 0.55) -> hold
    counts, reasons = _run([1.8] * 6, start=3)
    assert counts == [3] * 6 and set(reasons) == {"hold"}


def test_ramp_down_waits_for_the_window_peak_and_keeps_headroom() -> None:
    counts, reasons = _run([3.0, 3.0, 1.0, 1.0, 1.0, 0.5, 0.1, 0.1, 0.1], start=5)
    # the peak of 3.0 stays in the 3-tick window for three ticks; then a peak of 1.0 needs 2 replicas at <= 0.55
    # each; until 1.0 leaves the window; then the peak 0.5 fits one replica with 0.5 spare
    assert counts == [5, 5, 5, 5, 2, 2, 2, 1, 1]
    assert reasons[4] == "fits_fewer" and reasons[7] == "fits_fewer"


def test_flapping_load_does_not_flap_the_replica_count() -> None:
    # load alternating between 0.3 and 1.3 replica capacities: up once, then the window's peak keeps it there
    counts, _ = _run([0.3, 1.3] * 6)
    assert counts[0] == 1
    assert counts[1:] == [2] * 11


def test_backstops_scale_up_even_with_headroom() -> None:
    calm = dict(load_mean=0.5, load_peak=0.5)
    queueing = decide_replicas([ReplicaWindow(**calm, waiting_mean=3.0)] * 2, CONFIG)
    assert (queueing.desired_replicas, queueing.reason) == (3, "queueing")
    refused = decide_replicas([ReplicaWindow(**calm, slo_rejections=1), ReplicaWindow(**calm)], CONFIG)
    assert (refused.desired_replicas, refused.reason) == (3, "slo_rejections")
    # per class: chat is fine, coding misses on one replica -> its pooled attainment 7/10 < 0.9
    missing = decide_replicas([ReplicaWindow(**calm, attainment={"chat": (10, 10), "coding": (2, 5)}),
                               ReplicaWindow(**calm, attainment={"coding": (5, 5)})], CONFIG)
    assert (missing.desired_replicas, missing.reason) == (3, "attainment_low")
    assert "coding" in missing.message
    # too few finished requests say nothing
    few = decide_replicas([ReplicaWindow(**calm, attainment={"coding": (0, 4)}), ReplicaWindow(**calm)], CONFIG)
    assert few.reason == "hold"


def test_no_scale_down_while_requests_queue() -> None:
    # 1.5 waiting in all: on 1 replica that is 1.5 >= half the scale-up queue (2.0 / 2) -> hold
    d = decide_replicas([ReplicaWindow(load_mean=0.1, load_peak=0.1, waiting_mean=0.5)] * 3, CONFIG)
    assert (d.desired_replicas, d.reason) == (3, "hold")
    # a moment's queue (requests between arrival and the next engine step) does not block it
    d = decide_replicas([ReplicaWindow(load_mean=0.1, load_peak=0.1, waiting_mean=0.1)] * 3, CONFIG)
    assert (d.desired_replicas, d.reason) == (1, "fits_fewer")


def test_peak_of_the_sum_instead_of_the_sum_of_peaks() -> None:
    # two replicas whose 0.5 peaks came at different times: together never above 0.5 -> one replica suffices
    alternating = [ReplicaWindow(load_mean=0.25, load_peak=0.5)] * 2
    assert decide_replicas(alternating, CONFIG).desired_replicas == 2
    assert decide_replicas(alternating, CONFIG, peak_total_load=0.5).desired_replicas == 1


def test_bounds_and_silent_replicas() -> None:
    assert decide_replicas(_even(8.0, 8), CONFIG).desired_replicas == 8  # at max: stays
    d = decide_replicas(_even(0.0, 1), CONFIG)
    assert (d.desired_replicas, d.reason) == (1, "hold")
    assert decide_replicas([], CONFIG, current_replicas=2).reason == "no_reports"
    # 3 running, 1 reported at full load: the silent two (just started) count as idle capacity -> spare share 0.67,
    # no scale-up; and no scale-down either until every running replica has reported
    d = decide_replicas(_even(1.0, 1), CONFIG, current_replicas=3)
    assert (d.desired_replicas, d.reason) == (3, "hold")
    assert decide_replicas(_even(0.1, 1), CONFIG, current_replicas=3).desired_replicas == 3
    assert decide_replicas(_even(0.1, 3), CONFIG, current_replicas=3).desired_replicas == 1


def test_config_rejects_inverted_thresholds() -> None:
    with pytest.raises(ValueError):
        ScalingConfig(scale_up_headroom=0.5, target_headroom=0.3)
    with pytest.raises(ValueError):
        ScalingConfig(min_replicas=3, max_replicas=2)
