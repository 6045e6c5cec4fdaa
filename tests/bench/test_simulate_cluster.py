"""The simulator's cluster layer: a load ramp scales the replicas up and back down, and no request is lost."""

from __future__ import annotations

import numpy as np
import pytest

from bench.simulate import SimConfig, SimRequest, roofline_70b
from bench.simulate_cluster import ClusterSimulator, ScalerConfig, expected_arrivals, ramp_arrivals, ramp_knots
from test_bench_simulate import acceptance


def _ramp(seed: int = 0) -> list[SimRequest]:
    knots = ramp_knots(capacity_rps=12.0, peak_x=3.0, idle_s=20.0, peak_s=60.0, tail_s=120.0, ramp_s=10.0)
    rng = np.random.default_rng(seed)
    unit = np.cumsum(rng.exponential(1.0, int(expected_arrivals(knots) * 1.2)))
    times = ramp_arrivals(unit, knots)
    return [SimRequest(float(t), int(rng.integers(20, 300)), int(rng.integers(32, 128)), "chat", 80.0)
            for t in times if np.isfinite(t)]


def test_ramp_arrivals_follow_the_rate() -> None:
    knots = [(0.0, 1.0), (10.0, 1.0), (10.0, 5.0), (20.0, 5.0)]
    assert expected_arrivals(knots) == pytest.approx(60.0)
    times = ramp_arrivals(np.array([5.0, 10.0, 35.0, 59.0, 61.0]), knots)
    assert times[:4] == pytest.approx([5.0, 10.0, 15.0, 19.8]) and np.isnan(times[4])


@pytest.mark.parametrize("rule", ["slo", "queue"])
def test_scales_up_under_the_ramp_and_back_down_without_losing_requests(rule: str) -> None:
    reqs = _ramp()
    scaler = ScalerConfig(rule=rule, max_replicas=6, startup_s=10.0, upscale_delay_s=2.0, downscale_delay_s=20.0,
                          look_back_s=12.0, target_ongoing_requests=16.0)
    sim = ClusterSimulator(roofline_70b(), acceptance(), SimConfig.of("adaserve", max_num_seqs=64), scaler=scaler)
    records, _ = sim.run(reqs)
    assert all(r["error"] is None and r["num_tokens"] == q.max_tokens for r, q in zip(records, reqs))
    routing = [e["routing"] for e in sim.timeline]
    assert routing[0] == 1 and max(routing) >= 2
    assert sim.timeline[-1]["target"] == 1  # back to one after the ramp
    # never more routing replicas than asked for, and no replica routes before its start-up
    assert all(e["routing"] + e["starting"] <= max(e["target"], e["routing"]) for e in sim.timeline)
