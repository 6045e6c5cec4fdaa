"""Autoscaling in the simulator: N simulated replicas (bench.simulate, the real policies) behind the router, with a
control loop that scales them like Ray Serve does: samples each replica every ``sample_s``, keeps a
``look_back_s`` window, asks a scaling rule for a replica count, and applies Serve's own delay logic
(``ray.serve.autoscaling_policy._apply_delay_logic``: ``upscale_delay_s`` / ``downscale_delay_s``) and bounds.

Rules compared on one load ramp (idle -> ``peak_x`` x one replica's capacity -> idle):
- ``slo``: ``policies.autoscaling.decide_replicas`` on each replica's SLO load (the engine's spare budget: the
  nodes its decoding requests' TPOT SLOs need, ``policies.budget``; and its sequence slots), as app.autoscaling;
- ``queue``: Serve's default, ``ceil(mean ongoing requests / target_ongoing_requests)``.
A new replica routes requests ``startup_s`` after it was asked for (weights load); a removed one stops routing at
once and finishes what it holds (graceful drain), so no request is lost to a scale-down.

CLI: ``python -m bench.simulate_cluster --profile 70b --max-replicas 8`` writes bench/runs/simulate_cluster-*/
(records, timeline, summary.json, autoscale_sim.png).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from ray.serve.autoscaling_policy import _apply_delay_logic
from ray.serve.config import AutoscalingConfig

from bench.paths import RESULTS, run_dir
from bench.simulate import (SimConfig, SimRequest, Simulator, _Replica, load_profile, synthetic_requests,
                            with_ttft)
from bench.traces import AcceptanceModel, load_trace
from policies.autoscaling import ReplicaWindow, ScalingConfig, decide_replicas, replica_load, steady_slo_load
from policies.budget import required_nodes, spare_budget
from policies.tree_selection import SLOState, required_acceptance


@dataclass(frozen=True)
class ScalerConfig:
    rule: str = "slo"               # slo | queue
    min_replicas: int = 1
    max_replicas: int = 8
    sample_s: float = 0.5           # replica samples and policy calls (Serve: record interval, control loop)
    look_back_s: float = 15.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    startup_s: float = 60.0         # asked for -> routing requests (a 70B replica loading its weights)
    target_ongoing_requests: float = 96.0  # the queue rule's target (the GPU YAML's old value)
    scaling: ScalingConfig = ScalingConfig()


class ClusterSimulator(Simulator):
    """Simulator whose replica set changes over time under a scaling rule."""

    def __init__(self, *args, scaler: ScalerConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.sc = scaler
        self.ray_config = AutoscalingConfig(min_replicas=scaler.min_replicas, max_replicas=scaler.max_replicas,
                                            upscale_delay_s=scaler.upscale_delay_s,
                                            downscale_delay_s=scaler.downscale_delay_s,
                                            look_back_period_s=scaler.look_back_s)
        self._next_tick = 0.0
        self._target = scaler.min_replicas
        self._policy_state: dict = {}
        self._ready_at: dict[int, float] = {}   # starting replica -> when it routes
        self._draining: set[int] = set()
        self._samples: dict[int, deque] = {}    # replica -> (t, load, waiting, ongoing)
        self._prefilled: dict[int, deque] = {}  # replica -> (t, prompt tokens) of its recent steps
        self.timeline: list[dict] = []

    def next_tick_s(self) -> float:
        return self._next_tick

    def tick(self, now: float) -> None:
        self._next_tick = now + self.sc.sample_s
        for rid, ready in list(self._ready_at.items()):
            if now >= ready:
                self.replicas[rid].routable = True
                del self._ready_at[rid]
        active = [r for r in self.replicas if r.routable]
        for r in active:
            q = self._samples.setdefault(r.rid, deque())
            q.append((now, self._load(r, now), len(r.waiting), len(r.running) + len(r.waiting)))
            while q and q[0][0] < now - self.sc.look_back_s:
                q.popleft()
        desired, reason = self._desired(active)
        starting = len(self._ready_at)
        current_target = len(active) + starting
        decision, self._policy_state = _apply_delay_logic(desired, current_target, self.ray_config,
                                                          self._policy_state, _now=now)
        decision = min(max(decision, self.sc.min_replicas), self.sc.max_replicas)
        for _ in range(decision - current_target):
            self.replicas.append(_Replica(len(self.replicas), routable=False))
            self._ready_at[len(self.replicas) - 1] = now + self.sc.startup_s
        for _ in range(current_target - decision):
            victim = min(active, key=lambda r: len(r.running) + len(r.waiting))  # Serve's choice is similar
            victim.routable = False
            self._draining.add(victim.rid)
            self._samples.pop(victim.rid, None)
            active.remove(victim)
        draining = sum(1 for rid in self._draining if self.replicas[rid].running or self.replicas[rid].waiting)
        self.timeline.append({"t": now, "routing": len(active), "starting": len(self._ready_at),
                              "draining": draining, "desired": desired, "target": decision, "reason": reason})

    def _desired(self, active: list[_Replica]) -> tuple[int, str]:
        samples = [self._samples[r.rid] for r in active if self._samples.get(r.rid)]
        n = len(active)  # Serve's current_num_replicas: running ones; starting ones are in its target already
        if self.sc.rule == "queue":
            ongoing = sum(float(np.mean([s[3] for s in q])) for q in samples)
            return max(1, math.ceil(ongoing / self.sc.target_ongoing_requests - 1e-9)), "queue"
        windows = [ReplicaWindow(load_mean=float(np.mean([s[1] for s in q])), load_peak=max(s[1] for s in q),
                                 waiting_mean=float(np.mean([s[2] for s in q]))) for q in samples]
        peak = max((sum(v) for v in zip(*[[s[1] for s in q] for q in samples])), default=None)  # same tick times
        config = ScalingConfig(**{**self.sc.scaling.__dict__, "min_replicas": self.sc.min_replicas,
                                  "max_replicas": self.sc.max_replicas})
        d = decide_replicas(windows, config, current_replicas=n, peak_total_load=peak)
        return d.desired_replicas, d.reason

    def _commit(self, rep: _Replica, now: float, plan) -> None:
        super()._commit(rep, now, plan)
        prefilled = sum(k for _, k in plan[3])
        if prefilled:
            self._prefilled.setdefault(rep.rid, deque()).append((now, prefilled))

    def _prefill_rate(self, rep: _Replica, now: float, window_s: float = 5.0) -> float:
        """As app.autoscaling.PrefillRate: prompt tokens prefilled per second over the last window_s."""
        q = self._prefilled.get(rep.rid, deque())
        while q and q[0][0] < now - window_s:
            q.popleft()
        return sum(k for _, k in q) / window_s

    def _load(self, rep: _Replica, now: float) -> float:
        """The replica's load as the engine reports it (app.autoscaling): its decoding requests' SLO need this step
        (Scheduler.spare_token_budget), their steady-pace need on a full replica, or its sequence slots."""
        dec = np.asarray([i for i in rep.running if self.out[i] > 0], dtype=np.int64)
        need = np.zeros(0, dtype=np.int64)
        steps = int(self.spec_steps.sum())
        e = float(self.accepted.sum()) / steps if steps else 0.0
        if dec.size and self.spec.kind != "none":
            slo = SLOState(decode_time_s=now - self.first_t[dec], decoded_tokens=np.maximum(self.out[dec] - 1, 0),
                           tpot_slo_s=self.slo_s[dec])
            t_step = float(self.p.target.predict(dec.size + self.token_budget,
                                                 float((self.prompt[dec] + self.out[dec]).sum()))) + self.p.overhead_s
            need = required_nodes(required_acceptance(slo, t_step, self.cfg.engine.max_draft_depth), e / (1.0 + e),
                                  self.n_max)
        spare = spare_budget(self.token_budget - len(rep.running), need)
        running = np.asarray(rep.running, dtype=np.int64)
        full_step_s = float(self.p.target.predict(self.token_budget, float((self.prompt[running] + self.out[running])
                                                                           .sum()))) + self.p.overhead_s
        steady = steady_slo_load(self.slo_s[running], len(rep.waiting), full_step_s, e / (1.0 + e), self.token_budget,
                                 self.n_max, self.cfg.engine.max_draft_depth, self._prefill_rate(rep, now))
        return replica_load(spare, self.token_budget, len(rep.running), self.cfg.engine.max_num_seqs,
                            waiting_requests=len(rep.waiting), steady_load=steady)


def ramp_knots(capacity_rps: float, peak_x: float, idle_s: float, peak_s: float, tail_s: float,
               ramp_s: float = 30.0) -> list[tuple[float, float]]:
    """The load ramp as (t, req/s) knots, linear between them: 0.2x capacity for idle_s, up over ramp_s to peak_x x
    capacity for peak_s, down over ramp_s, 0.2x for tail_s."""
    low, high = 0.2 * capacity_rps, peak_x * capacity_rps
    return [(0.0, low), (idle_s, low), (idle_s + ramp_s, high), (idle_s + ramp_s + peak_s, high),
            (idle_s + 2 * ramp_s + peak_s, low), (idle_s + 2 * ramp_s + peak_s + tail_s, low)]


def ramp_arrivals(unit_arrivals: np.ndarray, knots: list[tuple[float, float]]) -> np.ndarray:
    """Arrival times of a Poisson process with the knots' rate, from unit-rate arrivals (time change by the
    expected-arrivals curve; piecewise-linear inverse); NaN for arrivals past the last knot."""
    t = np.array([k[0] for k in knots])
    rate = np.array([k[1] for k in knots])
    cum = np.concatenate([[0.0], np.cumsum(np.diff(t) * (rate[1:] + rate[:-1]) / 2)])
    unit = np.asarray(unit_arrivals, dtype=np.float64)
    return np.where(unit < cum[-1], np.interp(unit, cum, t), np.nan)


def expected_arrivals(knots: list[tuple[float, float]]) -> float:
    return float(sum((t1 - t0) * (r0 + r1) / 2 for (t0, r0), (t1, r1) in zip(knots, knots[1:])))


def ramp_requests(profile, knots: list[tuple[float, float]], seed: int,
                  ttft: tuple[float, float] | None) -> list[SimRequest]:
    """The simulator's workload (bench.workloads' real lengths) arriving along the ramp."""
    reqs = synthetic_requests(int(expected_arrivals(knots) * 1.2) + 10, 1.0, profile, seed=seed)
    times = ramp_arrivals(np.array([r.arrival_s for r in reqs]), knots)
    out = [SimRequest(**{**r.__dict__, "arrival_s": float(a)}) for r, a in zip(reqs, times) if np.isfinite(a)]
    return with_ttft(out, profile, *ttft) if ttft is not None else out


def summarize_run(records: list[dict], timeline: list[dict], window: tuple[float, float]) -> dict:
    """Attainment (TTFT+TPOT), refusals and TTFT p90 of the requests arriving within ``window``; replica-seconds;
    time from the ramp's start to the first replica added."""
    from bench.loadgen import summarize

    inside = [r for r in records if window[0] <= r["scheduled_s"] < window[1]]
    o = summarize(inside)["overall"]
    allo = summarize(records)["overall"]
    ticks = np.diff([e["t"] for e in timeline], prepend=0.0)
    replica_s = float(sum(dt * (e["routing"] + e["starting"] + e["draining"]) for dt, e in zip(ticks, timeline)))
    first_up = next((e["t"] for e in timeline if e["target"] > 1 and e["t"] >= window[0] - 60), None)
    return {"ramp_attainment": o["attainment"], "ramp_refused": o["rejected"], "ramp_ttft_p90_s": o["ttft_s_p90"],
            "ramp_requests": len(inside), "all_attainment": allo["attainment"], "replica_s": replica_s,
            "max_routing": max(e["routing"] for e in timeline),
            "time_to_scale_up_s": None if first_up is None else first_up - window[0],
            "lost": sum(1 for r in records if r["error"] == "unfinished")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="70b")
    ap.add_argument("--policy", default="adaserve", help="the engine policy every replica runs")
    ap.add_argument("--rules", nargs="+", default=["slo", "queue"],
                    help="slo, queue (Serve's default rule with --target-ongoing-requests) or queue:<target>")
    ap.add_argument("--capacity-rps", type=float, required=True, help="one replica's capacity (req/s) at its SLOs")
    ap.add_argument("--peak-x", type=float, default=3.0)
    ap.add_argument("--idle-s", type=float, default=120.0)
    ap.add_argument("--peak-s", type=float, default=300.0)
    ap.add_argument("--tail-s", type=float, default=300.0)
    ap.add_argument("--max-replicas", type=int, default=8)
    ap.add_argument("--startup-s", type=float, default=60.0)
    ap.add_argument("--upscale-delay-s", type=float, default=10.0)
    ap.add_argument("--downscale-delay-s", type=float, default=60.0)
    ap.add_argument("--target-ongoing-requests", type=float, default=96.0)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    profile = load_profile(args.profile)
    acc = AcceptanceModel.from_trace(load_trace(RESULTS / "acceptance_trace.jsonl.gz"))
    knots = ramp_knots(args.capacity_rps, args.peak_x, args.idle_s, args.peak_s, args.tail_s)
    reqs = ramp_requests(profile, knots, args.seed, ttft=(10.0, 1000.0))
    window = (args.idle_s, args.idle_s + 60.0 + args.peak_s)  # ramp up, plateau, ramp down
    out = run_dir("simulate_cluster")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for rule in args.rules:
        kind, _, target = rule.partition(":")  # queue:<target_ongoing_requests>
        scaler = ScalerConfig(rule=kind, max_replicas=args.max_replicas, startup_s=args.startup_s,
                              upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s,
                              target_ongoing_requests=float(target or args.target_ongoing_requests))
        sim = ClusterSimulator(profile, acc, SimConfig.of(args.policy, seed=args.seed, max_num_seqs=args.max_num_seqs,
                                                          max_sim_s=1e9), scaler=scaler)
        records, _ = sim.run(reqs)
        summary = summarize_run(records, sim.timeline, window)
        results[rule] = {"summary": summary, "timeline": sim.timeline, "records": records}
        print_rule(rule, summary, f"{summary['replica_s']:.0f} replica-s, lost {summary['lost']}")
    write_results(out, args, knots, results, "autoscale_sim.png",
                  f"{profile.name}: {args.peak_x:g}x one replica's capacity, 1-{args.max_replicas} replicas")


def print_rule(rule: str, summary: dict, tail: str) -> None:
    """One line per scaling rule: the ramp's attainment, refusals, TTFT p90, time to scale up, most replicas."""
    print(f"{rule:>6}: ramp attainment {summary['ramp_attainment'] * 100:5.1f}% (refused "
          f"{summary['ramp_refused']}, TTFT p90 {(summary['ramp_ttft_p90_s'] or 0):.2f} s, "
          f"{summary['ramp_requests']} requests), time to scale up {summary['time_to_scale_up_s']} s, "
          f"max {summary['max_routing']} replicas, {tail}", flush=True)


def write_results(out, args: argparse.Namespace, knots: list, results: dict, plot_name: str, title: str) -> None:
    """summary.json (every rule's summary and timeline, without the per-request records) and the ramp's plot."""
    from bench.plots import autoscale_plot

    (out / "summary.json").write_text(json.dumps({"args": vars(args), "knots": knots, "results": {
        rule: {k: v for k, v in r.items() if k != "records"} for rule, r in results.items()}}))
    autoscale_plot(results, knots, out / plot_name, title=title)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
