"""The simulator: deterministic, conserves requests, degrades with load, and matches the latency model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.loadgen import summarize, tpot_s
from app.engine.config import EngineConfig
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
    cfg = SimConfig.of(policy, max_num_seqs=64, max_num_batched_tokens=1024)
    a, _ = simulate(reqs, roofline_70b(), acceptance(), cfg)
    b, _ = simulate(reqs, roofline_70b(), acceptance(), cfg)
    assert a == b
    assert all(r["error"] is None and r["num_tokens"] == q.max_tokens for r, q in zip(a, reqs))
    assert all(r["first_token_s"] >= q.arrival_s for r, q in zip(a, reqs))


def test_attainment_falls_with_rate():
    # with prefill unbounded (adaserve bounds it by the SLO pace: under overload its prompts queue instead)
    att = []
    for rate in (1.0, 8.0, 40.0):
        recs, _ = simulate(workload(300, rate), roofline_70b(), acceptance(), SimConfig.of("dynamic-tree",
                                                                                       max_num_seqs=64))
        att.append(summarize(recs)["overall"]["attainment"])
    assert att[0] > att[1] > att[2]


def test_no_speculation_tpot_matches_latency_model():
    flat = LatencyModel(PiecewiseLinear((1.0, 64.0), (0.030, 0.030), 0.0), 0.0)
    prof = Profile("flat", flat, 0.003, 0.0, 0.002)
    reqs = [SimRequest(i * 10.0, 50, 20, "chat", 100.0) for i in range(5)]  # one at a time
    recs, _ = simulate(reqs, prof, acceptance(), SimConfig.of("none"))
    for r in recs:
        assert tpot_s(r) == pytest.approx(0.032)  # target step + host overhead, one token per step
        assert r["first_token_s"] - r["scheduled_s"] == pytest.approx(0.032)


def test_speculation_gains_tokens_and_many_replicas():
    reqs = workload(400, 30.0)
    recs, info = simulate(reqs, roofline_70b(), acceptance(), SimConfig.of("adaserve", num_replicas=4,
                                                                        max_num_seqs=64))
    s = summarize(recs)["overall"]
    assert s["accepted_tokens_per_step"] > 1.2
    assert all(b > 0 for b in info["busy_s"])  # the router spread the load over every replica


def test_headline_ratios():
    from bench.simulate import headline

    def row(pol, rate, att, gp):
        return {"policy": pol, "rate": rate, "summary": {"overall": {"attainment": att, "goodput_tok_s": gp}}}

    rows = [row("none", 1, 0.9, 10), row("dynamic-tree", 1, 0.95, 11), row("adaserve", 1, 0.95, 12),
            row("adaserve+notriage", 1, 0.99, 13), row("none", 2, 0.3, 10), row("dynamic-tree", 2, 0.4, 11),
            row("adaserve", 2, 0.8, 22)]
    h = headline(rows)
    assert h["per_rate"][0]["best_attainment_policy"] == "dynamic-tree"  # prototypes are never baselines
    assert h["highest_load_ge_50pct"]["rate"] == 2 and h["highest_load_ge_50pct"]["attainment_ratio"] == 2.0
    assert headline(rows, exclude=("dynamic-tree",))["per_rate"][1]["goodput_ratio"] == 2.2


def test_policy_options_set_engine_options():
    with pytest.raises(ValueError, match="unknown policy options"):
        SimConfig.of("adaserve+bogus")
    cfg = SimConfig.of("adaserve+notriage+noslochunk", max_num_seqs=64)
    assert (cfg.engine.policy, cfg.engine.slo_triage, cfg.engine.slo_prefill, cfg.engine.max_num_seqs) == (
        "adaserve", False, False, 64)
    assert cfg.policy == "adaserve+notriage+noslochunk"  # records keep the label
    assert SimConfig.of("dynamic-tree").engine.max_tree_nodes == EngineConfig().max_tree_nodes  # the engine's defaults
    recs, _ = simulate(workload(40, 5.0), roofline_70b(), acceptance(), cfg)
    assert all(r["error"] is None and r["policy"] == cfg.policy for r in recs)


def test_slo_prefill_defers_prompts_and_protects_running_slos_under_overload():
    reqs = workload(300, 40.0)
    runs = {}
    for pol in ("adaserve", "adaserve+noslochunk"):
        recs, _ = simulate(reqs, roofline_70b(), acceptance(), SimConfig.of(pol, max_num_seqs=64))
        assert all(r["error"] is None for r in recs)
        ttft = np.median([r["first_token_s"] - r["scheduled_s"] for r in recs])
        runs[pol] = (summarize(recs)["overall"]["attainment"], ttft)
    (att, ttft), (att_off, ttft_off) = runs["adaserve"], runs["adaserve+noslochunk"]
    assert att > att_off and ttft > ttft_off  # more TPOT SLOs kept, paid for in queueing
    recs, _ = simulate(reqs, roofline_70b(), acceptance(), SimConfig.of("adaserve", max_num_seqs=64,
                                                                     max_prefill_wait_s=0.0))
    assert summarize(recs)["overall"]["attainment"] == pytest.approx(att_off)  # waiting 0 s lifts the bound


def _with_lookup(acc: AcceptanceModel, share: float) -> AcceptanceModel:
    chains = np.tile(np.array([0.9] * 8 + [0.0] * 8, np.float32), (50, 1))
    return dataclasses.replace(acc, lookup_chains=chains, lookup_shared_first=np.arange(50) % 2 == 0,
                               lookup_share=share, lookup_cond_rate=np.full(Q_BINS.size - 1, 0.8))


def test_lookup_chains_add_tokens_and_one_child_per_node_is_picked():
    from bench.simulate import Simulator

    sim = Simulator(roofline_70b(), _with_lookup(acceptance(), 1.0), SimConfig.of("dynamic-tree"))
    sim.pools = sim.acc.pools_for(["coding"] * 400)
    dec = np.arange(400)
    parent, f, valid, chosen, _, picks = sim._draft(dec, 2, 2, 2, None)
    m = parent.shape[1]
    parent, f, valid, chosen = sim._add_lookup(dec, parent, f, valid, chosen, picks)
    assert parent.shape[1] == m + 16
    kids = np.zeros((400, parent.shape[1] + 1), np.int64)  # column -1: the root
    np.add.at(kids, (np.arange(400)[:, None].repeat(parent.shape[1], 1), parent), chosen & valid)
    assert kids.max() <= 1  # the target's one token per node: never two picked siblings
    assert (f[:, m + 1:] <= f[:, m:-1] + 1e-12)[valid[:, m + 1:]].all()  # f falls along the chain
    reqs = workload(200, 6.0)
    cfg = SimConfig.of("dynamic-tree", max_num_seqs=64)
    acc_steps = []
    for share in (0.0, 1.0):
        recs, _ = simulate(reqs, roofline_70b(), _with_lookup(acceptance(), share), cfg)
        acc_steps.append(summarize(recs)["overall"]["accepted_tokens_per_step"])
    assert acc_steps[1] > acc_steps[0] + 0.5  # deep, likely chains are accepted far beyond the model's depth


def test_each_request_drafts_from_its_class_s_rows():
    # coding's rows are confident (top child q 0.9), chat's unsure (0.05); acceptance follows q
    fan = np.zeros((200, 4), np.float32)
    fan[:100, 0], fan[100:, 0] = 0.05, 0.9
    centre = 0.5 * (Q_BINS[:-1] + Q_BINS[1:])
    acc = AcceptanceModel(fan, Q_BINS, np.minimum(centre, 1.0), np.ones(12), centre, np.ones(12), 0.5,
                          category_rows={"chat": (0, 100), "coding": (100, 100)})
    reqs = workload(200, 2.0)
    recs, _ = simulate(reqs, roofline_70b(), acc, SimConfig.of("dynamic-tree", max_num_seqs=64))
    per_step = {c: np.mean([r["accepted_draft_tokens"] / r["spec_steps"] for r in recs
                            if r["slo_class"] == c and r["spec_steps"]]) for c in ("coding", "chat")}
    assert per_step["coding"] > 1.0 > 0.2 > per_step["chat"]


def test_simulator_and_engine_make_the_same_admission_decision():
    import time

    from app.engine.config import SamplingParams
    from app.engine.engine import LLMEngine
    from app.engine.request import Request
    from bench.simulate import Simulator, _Replica

    linear = LatencyModel(PiecewiseLinear((0.0, 1000.0), (0.01, 1.01)), 0.0)  # 10 ms + 1 ms a token
    lengths, ttft_s = [120, 40, 200, 60], [0.4, 0.2, 0.45, 0.25]  # the last one is the newcomer
    now = time.perf_counter()
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, dtype="float32", max_num_batched_tokens=64))
    sched = engine.scheduler
    sched.latency_model, sched.step_overhead_ema_s = linear, 0.0
    reqs = [Request(str(i), [1] * n, SamplingParams(), frozenset(), ttft_slo_ms=t * 1e3, arrival_time=now)
            for i, (n, t) in enumerate(zip(lengths, ttft_s))]
    sched.waiting.extend(reqs[:-1])
    feasible, queued = sched.ttft_feasible(now, extra=reqs[-1])

    sim = Simulator(Profile("linear", linear, 0.0, 0.0, 0.0), acceptance(),
                    SimConfig.of("none", max_num_batched_tokens=64))
    sim.arrival = np.zeros(4)
    sim.prompt, sim.computed, sim.out = np.array(lengths), np.zeros(4, np.int64), np.zeros(4, np.int64)
    sim.deadline, sim.best_effort, sim.step_overhead_s = np.array(ttft_s), np.zeros(4, bool), 0.0
    sim.maxtok, sim.spec_steps, sim.accepted = np.full(4, 256), np.zeros(4, np.int64), np.zeros(4, np.int64)
    rep = _Replica(0)
    rep.waiting.extend(range(3))
    order = sim._queued(rep, extra=3)
    assert [int(r.request_id) for r in queued] == order == [1, 3, 0, 2]  # earliest deadline first
    assert sim._feasible(rep, order, 0.0).tolist() == feasible.tolist()
    assert not feasible.all() and feasible.any()  # a real decision: some make it, some do not

    # the TPOT pace rule, where the pace plan runs: every request with a TPOT SLO of x, the newcomer refused once
    # the four requests' steps (their prompts' floor included) no longer fit in x
    engine_paced = dataclasses.replace(engine.config, slo_prefill=True)
    sched.config, sim.slo_prefill = engine_paced, True
    sim.first_t, sim.gain_sq = np.full(4, np.nan), 0.0
    decisions = []
    for tpot_s in (0.02, 0.05, 0.08, 0.12, 0.5):
        for r in reqs:
            r.tpot_slo_ms = tpot_s * 1e3
        sim.slo_s = np.full(4, tpot_s)
        decision = sched.pace_admits(now, reqs[-1])
        assert sim._pace_admits(rep, order, 3, 0.0) == decision
        decisions.append(decision)
    assert decisions[0] is False and decisions[-1] is True  # a real decision


def test_fail_fast_bounds_ttft_under_overload_and_counts_refusals_as_misses():
    from bench.simulate import with_ttft

    reqs = with_ttft(workload(300, 40.0), roofline_70b(), 10.0, 1000.0)
    runs = {}
    for pol in ("dynamic-tree", "dynamic-tree+noadmission"):
        recs, _ = simulate(reqs, roofline_70b(), acceptance(), SimConfig.of(pol, max_num_seqs=64))
        runs[pol] = recs
    refused = [r for r in runs["dynamic-tree"] if r["error"] == "slo_unattainable"]
    assert refused and not any(r["error"] for r in runs["dynamic-tree+noadmission"])
    served = [r for r in runs["dynamic-tree"] if not r["error"]]
    ttft = lambda rs: np.percentile([r["first_token_s"] - r["scheduled_s"] for r in rs], 99)  # noqa: E731
    assert ttft(served) < ttft(runs["dynamic-tree+noadmission"])  # the queue stays bounded
    s = summarize(runs["dynamic-tree"])["overall"]
    assert s["rejected"] == len(refused) and s["attainment"] <= 1 - len(refused) / len(reqs)


def test_simulator_and_engine_shed_the_same_prompts():
    import time

    from app.engine.config import SamplingParams
    from app.engine.engine import LLMEngine, SLOUnattainableError
    from bench.simulate import Simulator, _Replica

    lengths = [10, 30, 119, 400]
    engine = LLMEngine(EngineConfig(num_kv_blocks=256, dtype="float32", max_num_batched_tokens=64, slo_prefill=True,
                                    overload_shedding=True))
    engine.scheduler.latency_model = LatencyModel(PiecewiseLinear((0.0, 1000.0), (0.01, 1.01)), 0.0)
    sim = Simulator(roofline_70b(), acceptance(), SimConfig.of("adaserve+shed"))
    sim.prompt = np.array(lengths)
    decisions = []
    for i, n in enumerate(lengths):  # each prompt on a replica that has seen the same history, with 25 tok/s
        engine.scheduler.offered_prefill.arrivals.clear()
        rep = _Replica(0)
        now = time.perf_counter()
        for k in range(9):  # 20 tokens a second over the last 9 s
            engine.scheduler.offered_prefill.observe_arrival(now - 9.0 + k, 20)
            rep.offered.observe_arrival(k - 9.0, 20)
        engine.scheduler.offered_prefill.capacity_tok_s = rep.offered.capacity_tok_s = 25.0
        engine.scheduler.offered_prefill.observe_refusal(now - 1.0)
        rep.offered.observe_refusal(-1.0)
        try:
            engine.add_request([1] * n, SamplingParams(max_tokens=2), ttft_slo_ms=600_000.0)
            shed = False
        except SLOUnattainableError:
            shed = True
        assert sim._sheds(rep, i, time.perf_counter() - now) == shed
        decisions.append(shed)
    assert decisions == [False, False, True, True]  # a real decision both ways


def test_overload_shedding_serves_more_requests_by_refusing_the_longest_prompts():
    from bench.simulate import with_ttft

    reqs = with_ttft(workload(400, 30.0), roofline_70b(), 10.0, 1000.0)
    runs = {pol: simulate(reqs, roofline_70b(), acceptance(), SimConfig.of(pol, max_num_seqs=64))[0]
            for pol in ("adaserve+shed", "adaserve")}
    att = {pol: summarize(recs)["overall"]["attainment"] for pol, recs in runs.items()}
    assert att["adaserve+shed"] > att["adaserve"]
    prompt = {i: r.prompt_tokens for i, r in enumerate(reqs)}
    refused = [prompt[r["index"]] for r in runs["adaserve+shed"] if r["error"] == "slo_unattainable"]
    served = [prompt[r["index"]] for r in runs["adaserve+shed"] if not r["error"]]
    assert np.mean(refused) > 1.2 * np.mean(served)
