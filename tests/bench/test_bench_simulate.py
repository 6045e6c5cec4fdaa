"""The simulator: deterministic, conserves requests, degrades with load, and matches the latency model."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loadgen import summarize, tpot_s
from bench.simulate import Profile, SimConfig, SimRequest, roofline_70b, simulate
from bench.traces import Q_BINS, AcceptanceModel
from policies.latency_model import LatencyModel, PiecewiseLinear


def acceptance(scale: float = 0.9) -> AcceptanceModel:
    rng = np.random.default_rng(0)
    fan = np.sort(rng.dirichlet(np.full(6, 0.3), size=300)[:, :4], axis=1)[:, ::-1].astype(np.float32)
    centre = 0.5 * (Q_BINS[:-1] + Q_BINS[1:])
    return AcceptanceModel(fan, Q_BINS, np.minimum(centre * scale, 1.0), np.ones(12), centre, np.ones(12), 0.5)


def workload(n: int, rate: float, seed: int = 0, slo_ms=(50.0, 70.0, 200.0)) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    cls = rng.choice(3, n, p=[0.6, 0.2, 0.2])
    names = ["coding", "chat", "summarization"]
    return [SimRequest(float(t[i]), int(rng.integers(20, 300)), int(rng.integers(8, 40)), names[c], slo_ms[c])
            for i, c in enumerate(cls)]


@pytest.mark.parametrize("policy", ["none", "chain:4", "static-tree", "dynamic-tree", "adaserve"])
def test_deterministic_and_conserves_requests(policy):
    reqs = workload(120, 8.0)
    cfg = SimConfig(policy=policy, max_num_seqs=64, max_num_batched_tokens=1024)
    a, _ = simulate(reqs, roofline_70b(), acceptance(), cfg)
    b, _ = simulate(reqs, roofline_70b(), acceptance(), cfg)
    assert a == b
    assert all(r["error"] is None and r["num_tokens"] == q.max_tokens for r, q in zip(a, reqs))
    assert all(r["first_token_s"] >= q.arrival_s for r, q in zip(a, reqs))


def test_attainment_falls_with_rate():
    att = []
    for rate in (1.0, 8.0, 40.0):
        recs, _ = simulate(workload(300, rate), roofline_70b(), acceptance(), SimConfig(policy="adaserve",
                                                                                       max_num_seqs=64))
        att.append(summarize(recs)["overall"]["attainment"])
    assert att[0] > att[1] > att[2]


def test_no_speculation_tpot_matches_latency_model():
    flat = LatencyModel(PiecewiseLinear((1.0, 64.0), (0.030, 0.030), 0.0), 0.0)
    prof = Profile("flat", flat, 0.003, 0.0, 0.002)
    reqs = [SimRequest(i * 10.0, 50, 20, "chat", 100.0) for i in range(5)]  # one at a time
    recs, _ = simulate(reqs, prof, acceptance(), SimConfig(policy="none"))
    for r in recs:
        assert tpot_s(r) == pytest.approx(0.032)  # target step + host overhead, one token per step
        assert r["first_token_s"] - r["scheduled_s"] == pytest.approx(0.032)


def test_speculation_gains_tokens_and_many_replicas():
    reqs = workload(400, 30.0)
    recs, info = simulate(reqs, roofline_70b(), acceptance(), SimConfig(policy="adaserve", num_replicas=4,
                                                                        max_num_seqs=64))
    s = summarize(recs)["overall"]
    assert s["accepted_tokens_per_step"] > 1.2
    assert all(b > 0 for b in info["busy_s"])  # the router spread the load over every replica


def test_headline_ratios():
    from bench.simulate import headline

    def row(pol, rate, att, gp):
        return {"policy": pol, "rate": rate, "summary": {"overall": {"attainment": att, "goodput_tok_s": gp}}}

    rows = [row("none", 1, 0.9, 10), row("dynamic-tree", 1, 0.95, 11), row("adaserve", 1, 0.95, 12),
            row("adaserve+cut", 1, 0.99, 13), row("none", 2, 0.3, 10), row("dynamic-tree", 2, 0.4, 11),
            row("adaserve", 2, 0.8, 22)]
    h = headline(rows)
    assert h["per_rate"][0]["best_attainment_policy"] == "dynamic-tree"  # prototypes are never baselines
    assert h["highest_load_ge_50pct"]["rate"] == 2 and h["highest_load_ge_50pct"]["attainment_ratio"] == 2.0
    assert headline(rows, exclude=("dynamic-tree",))["per_rate"][1]["goodput_ratio"] == 2.2


def test_prototype_variants_parse():
    with pytest.raises(ValueError):
        simulate(workload(3, 1.0), roofline_70b(), acceptance(), SimConfig(policy="adaserve+bogus"))
    recs, _ = simulate(workload(40, 5.0), roofline_70b(), acceptance(), SimConfig(policy="adaserve+cut+pd"))
    assert all(r["error"] is None for r in recs)
