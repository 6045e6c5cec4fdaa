"""Discrete-event simulator of the serving system: the REAL policies/ code with a latency model instead of a model.

Per replica it mirrors the engine step by step (app/engine/scheduler.py + engine._execute):
1. schedule: the engine scheduler's own token split (``policies.step_plan.split_step_tokens``: roots, running
   prefills, FIFO admission, node budget), prefill bounded by the SLO pace where the engine bounds it
   (``policies.budget.slo_step_plan``); the configuration is an ``EngineConfig`` with the engine's defaults;
2. draft: ``tree_selection.draft_shape`` (-> ``budget.adaptive_shape``) picks depth/beam/topk exactly as the
   speculator does; candidate trees are built level by level like the drafter's beam search (static widths
   for static-tree, one chain for chain:k), each node's children's draft probabilities drawn from the
   fan-out rows of the request's class in the recorded acceptance trace (bench/traces.py); for a trace of
   merged drafts, one of the class's recorded prompt-lookup chains is added as often as the class had one
   (``_add_lookup``: deep whatever the adaptive depth, no draft time, first in line for the target's pick);
3. select: ``tree_selection.select`` with a real ``SLOState`` (l_r, o_r, SLO) and the engine's t_step
   prediction, then the engine's n_max cap;
4. verify/accept: at every drafted node the target "picks" at most one child, child i with the empirical
   P(accept | parent accepted, q_i) of the trace; a node is accepted iff it is picked, selected and its
   parent accepted (so a path is accepted with the empirical counterpart of f);
5. time: target ``LatencyModel.predict(step tokens, context)`` + draft cost per level + host overhead; the
   step's tokens are stamped at its end.
Several replicas run in one event loop; each arrival is routed with ``routing.rank_replicas`` (spare budget
for tight SLOs, power of two choices otherwise) on the replicas' current stats.

Profiles (``Profile``): measured on this CPU (bench/results/profile_cpu.json, --profile cpu: the profile bench/sweep.py wrote for the cpu_sweep_slo_z2 run, from
``app.engine.profiler.profile_target`` plus a draft timing), or ``roofline_70b()`` for Llama-3.1-70B on
4xA100 (paper: 128 tokens/step ~55 ms, 512 ~125 ms, 1024 ~205 ms; 1B draft ~3 ms per level).

Policies are engine policy names; a ``+`` suffix sets an engine option for that run (``POLICY_OPTIONS``:
``+notriage`` is ``slo_triage: false``, ``+slochunk`` / ``+noslochunk`` is ``slo_prefill: true / false``,
``+shed`` / ``+noshed`` is ``overload_shedding: true / false``, ``+noprior`` is ``gain_prior_steps: 0``).

CLI: ``python -m bench.simulate --profile 70b --rates 2 4 8 16 -n 2000 --replicas 4``.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.engine.config import EngineConfig
from bench.paths import RESULTS
from bench.traces import AcceptanceModel, load_trace
from bench.workloads import SLO_CLASSES, WorkloadRequest
from policies import routing, token_tree
from policies.admission import (OfferedPrefill, deadline_order, idle_prefill_s, newcomer_fits, pace_tpot_slo_s,
                                running_finish_times_s, slot_ready_times_s, tpot_pace_admits, ttft_feasible,
                                ttft_prefill_floor)
from policies.budget import choose_token_budget, gain_per_step, slo_step_plan, throughput_cut_path_prob
from policies.step_plan import split_step_tokens
from policies.latency_model import LatencyModel, PiecewiseLinear
from policies.tree_selection import SLOState, cap_tree_size, draft_shape, parse_policy, select

MAX_TREE_TOKENS = 64


@dataclass(frozen=True)
class Profile:
    name: str
    target: LatencyModel  # verify step time (tokens in step, summed context)
    draft_level_s: float  # fixed cost of one draft forward (one tree level)
    draft_token_s: float  # cost per token in a draft level
    overhead_s: float  # host work per step (scheduling, accept, sampling, python)
    spec_overhead_s: float = 0.0  # extra host work per speculating step (tree building, accept walk)

    def unloaded_tpot_s(self, context: int = 256) -> float:
        return float(self.target.predict(1, context)) + self.overhead_s

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target.to_dict(), "draft_level_s": self.draft_level_s,
                "draft_token_s": self.draft_token_s, "overhead_s": self.overhead_s,
                "spec_overhead_s": self.spec_overhead_s}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(d["name"], LatencyModel.from_dict(d["target"]), d["draft_level_s"], d["draft_token_s"],
                   d["overhead_s"], d.get("spec_overhead_s", 0.0))


def roofline_70b() -> Profile:
    """Llama-3.1-70B, TP=4 on A100-80GB, bf16: ~140 GB of weights over 4 x 2 TB/s gives a ~40 ms memory-bound
    floor (with realistic efficiency), compute-bound growth matching the paper's figures (128 tokens ~55 ms,
    512 ~125 ms, 1024 ~205 ms); KV read ~328 KB/token over 8 TB/s ~ 4e-8 s per context token. Draft
    (Llama-3.2-1B): ~3 ms per level plus ~4 us per token; host ~2 ms per step."""
    pw = PiecewiseLinear((1.0, 64.0, 128.0, 512.0, 1024.0), (0.040, 0.046, 0.055, 0.125, 0.205), 0.205 / 1024)
    return Profile("llama-3.1-70b-4xa100-roofline", LatencyModel(pw, 4e-8), 0.003, 4e-6, 0.002, 0.0005)


def load_profile(name: str) -> Profile:
    if name == "70b":
        return roofline_70b()
    path = Path(name) if Path(name).exists() else RESULTS / f"profile_{name}.json"
    return Profile.from_dict(json.loads(path.read_text()))


POLICY_OPTIONS = {  # "POLICY+name": the engine option a simulated run sets
    "notriage": {"slo_triage": False},
    "slochunk": {"slo_prefill": True},
    "noslochunk": {"slo_prefill": False},
    "noadmission": {"ttft_admission": False},
    "shed": {"overload_shedding": True},
    "noshed": {"overload_shedding": False},
    "calib": {"calibrate_latency": True},  # an engine option; a no-op here, where steps take the profile's time
    "noprior": {"gain_prior_steps": 0.0},  # the gain per step measured alone, 1 token a step before any tree
}


def split_policy_options(policy: str) -> tuple[str, dict]:
    """``dynamic-tree+slochunk`` -> ("dynamic-tree", the engine options its ``+`` suffixes set, ``POLICY_OPTIONS``);
    ValueError on an unknown suffix. ``bench.sweep`` reads policy names the same way."""
    base, *suffixes = policy.split("+")
    unknown = sorted(set(suffixes) - set(POLICY_OPTIONS))
    if unknown:
        raise ValueError(f"unknown policy options {unknown} in {policy!r} (known: {', '.join(POLICY_OPTIONS)})")
    return base, {k: v for suffix in suffixes for k, v in POLICY_OPTIONS[suffix].items()}


@dataclass(frozen=True)
class SimConfig:
    """A simulated replica is an engine with this ``EngineConfig`` (its defaults, its names)."""

    engine: EngineConfig = EngineConfig(policy="adaserve")
    label: str = ""  # the policy name in records and tables (default: the engine's policy)
    num_replicas: int = 1
    seed: int = 0
    max_sim_s: float = 3600.0

    @classmethod
    def of(cls, policy: str, *, num_replicas: int = 1, seed: int = 0, max_sim_s: float = 3600.0,
           **engine_options) -> "SimConfig":
        """``policy`` may carry ``+`` suffixes from ``POLICY_OPTIONS``; other engine fields as keywords."""
        base, options = split_policy_options(policy)
        return cls(EngineConfig(policy=base, **engine_options, **options), policy, num_replicas, seed, max_sim_s)

    @property
    def policy(self) -> str:
        return self.label or self.engine.policy


@dataclass
class SimRequest:
    """The simulator's view of a request (no text): what the latency and SLO maths need."""

    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    slo_class: str
    tpot_slo_ms: float | None
    ttft_slo_ms: float | None = None


def from_workload(workload: list[WorkloadRequest], slo_ms: dict[str, float],
                  prompt_tokens: list[int] | None = None) -> list[SimRequest]:
    return [SimRequest(r.arrival_s, prompt_tokens[i] if prompt_tokens else r.prompt_tokens_est, r.max_tokens,
                       r.slo_class, slo_ms.get(r.slo_class)) for i, r in enumerate(workload)]


def with_ttft(reqs: list[SimRequest], profile: Profile, x_prefill: float, allowance_ms: float,
              chunk_tokens: int = EngineConfig.prefill_chunk_tokens) -> list[SimRequest]:
    """Every request's TTFT SLO as the server's default gives it: ``x_prefill`` x its prompt's idle prefill time
    (``policies.admission.idle_prefill_s``) + ``allowance_ms``."""
    return [dataclasses.replace(r, ttft_slo_ms=x_prefill * idle_prefill_s(
        profile.target, r.prompt_tokens, chunk_tokens, profile.overhead_s) * 1e3 + allowance_ms) for r in reqs]


@dataclass
class _Replica:
    rid: int
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy: bool = False
    steps: int = 0
    busy_s: float = 0.0
    select_s: float = 0.0
    routable: bool = True  # False while starting or draining (bench.simulate_cluster): the router skips it
    offered: OfferedPrefill = field(default_factory=OfferedPrefill)  # overload shedding's arrivals and capacity


class Simulator:
    def __init__(self, profile: Profile, acceptance: AcceptanceModel, config: SimConfig):
        self.p, self.acc, self.cfg = profile, acceptance, config
        e = config.engine
        self.spec = parse_policy(e.policy)
        # As the engine with a latency profile: budgeted policies price their nodes (the selection keeps the
        # candidates that maximise the step's token rate, policies.budget.throughput_cut_path_prob, which also
        # bounds the SLO phase's size) and stop drafting once a level's summed frontier f cannot pay for its forward.
        self.serve_unreachable = not e.slo_triage
        self.slo_prefill = e.slo_prefill is True or (e.slo_prefill is None and self.spec.kind == "adaserve")
        self.cut = self.spec.budgeted
        self.n_max = min(e.max_tree_nodes, MAX_TREE_TOKENS - 1)
        self.token_budget = e.token_budget or choose_token_budget(
            profile.target, context_tokens=256, tolerance=e.budget_tolerance, max_tokens=e.max_num_batched_tokens)
        self.rng = np.random.default_rng(config.seed)
        self.step_overhead_s = profile.overhead_s
        self.fan = acceptance.fanout.astype(np.float64)
        # per top-k: the pool's child probs, their pick probabilities (normalised where they sum past 1) and
        # the cumulative pick intervals, precomputed once (the per-step work is then gathers)
        self.pool = {}
        for k in range(1, self.fan.shape[1] + 1):
            q = self.fan[:, :k]
            g = acceptance.cond_accept(q) * (q > 0)
            tot = g.sum(axis=1, keepdims=True)
            g = np.where(tot > 1.0, g / np.maximum(tot, 1e-12), g)
            cum = np.cumsum(g, axis=1)
            self.pool[k] = (q, cum - g, cum)

    # ---- request state (arrays over all requests) ---------------------------------------------------------
    def run(self, reqs: list[SimRequest]) -> tuple[list[dict], dict]:
        n = len(reqs)
        self.arrival = np.array([r.arrival_s for r in reqs])
        self.prompt = np.array([r.prompt_tokens for r in reqs], dtype=np.int64)
        self.maxtok = np.array([r.max_tokens for r in reqs], dtype=np.int64)
        self.slo_s = np.array([r.tpot_slo_ms / 1e3 if r.tpot_slo_ms else np.inf for r in reqs])
        self.deadline = np.array([r.arrival_s + r.ttft_slo_ms / 1e3 if r.ttft_slo_ms else np.inf for r in reqs])
        self.best_effort = np.zeros(n, dtype=bool)
        self.refused = np.zeros(n, dtype=bool)
        self.computed = np.zeros(n, dtype=np.int64)  # prompt tokens prefilled
        self.out = np.zeros(n, dtype=np.int64)
        self.first_t = np.full(n, np.nan)
        self.last_t = np.full(n, np.nan)
        self.spec_steps = np.zeros(n, dtype=np.int64)
        self.accepted = np.zeros(n, dtype=np.int64)
        self.gain_sq = 0.0  # sum of squared per-step gains of speculating requests (the gain's spread)
        self.pools = self.acc.pools_for([r.slo_class for r in reqs])  # each request drafts like its class
        reps = self.replicas = [_Replica(i) for i in range(self.cfg.num_replicas)]
        base_tpot = self.p.unloaded_tpot_s()
        order = np.argsort(self.arrival, kind="stable")
        events: list = []  # (time, seq, replica id) step completions
        seq = 0
        ai = 0
        t_wall = time.perf_counter()
        now = 0.0
        pending: dict[int, tuple] = {}
        while ai < n or events:
            t_next_arr = self.arrival[order[ai]] if ai < n else np.inf
            t_next_evt = events[0][0] if events else np.inf
            if self.next_tick_s() <= min(t_next_arr, t_next_evt):
                now = self.next_tick_s()
                self.tick(now)  # a cluster layer may add replicas (self.replicas) or stop routing to some
                continue
            if t_next_arr <= t_next_evt:
                now = t_next_arr
                i = int(order[ai])
                ai += 1
                rep = self._admit(reps, i, base_tpot, now)
                if rep is None:
                    continue
                rep.waiting.append(i)
                if not rep.busy:
                    seq = self._start(rep, now, events, seq, pending)
            else:
                now, _, rid = heapq.heappop(events)
                rep = reps[rid]
                self._commit(rep, now, pending.pop(rid))
                rep.busy = False
                if rep.running or rep.waiting:
                    seq = self._start(rep, now, events, seq, pending)
            if now > self.cfg.max_sim_s:
                break
        records = []
        for i, r in enumerate(reqs):
            done = self.out[i] >= self.maxtok[i]
            records.append({
                "index": i, "slo_class": r.slo_class, "category": r.slo_class, "policy": self.cfg.policy,
                "tpot_slo_ms": r.tpot_slo_ms, "ttft_slo_ms": r.ttft_slo_ms, "scheduled_s": float(self.arrival[i]),
                "first_token_s": None if np.isnan(self.first_t[i]) else float(self.first_t[i]),
                "last_token_s": None if np.isnan(self.last_t[i]) else float(self.last_t[i]),
                "num_tokens": int(self.out[i]),
                "error": "slo_unattainable" if self.refused[i] else None if done else "unfinished",
                "spec_steps": int(self.spec_steps[i]), "accepted_draft_tokens": int(self.accepted[i])})
        info = {"sim_wall_s": time.perf_counter() - t_wall, "token_budget": self.token_budget,
                "steps": sum(r.steps for r in reps), "select_s": sum(r.select_s for r in reps),
                "busy_s": [round(r.busy_s, 3) for r in reps], "unloaded_tpot_s": base_tpot}
        return records, info

    def next_tick_s(self) -> float:
        """When ``tick`` runs next (a cluster layer's control loop); never in a fixed cluster."""
        return np.inf

    def tick(self, now: float) -> None:
        pass

    def _route(self, reps: list[_Replica], i: int, base_tpot: float) -> list[int]:
        """Replica ids in the router's order of preference."""
        reps = [r for r in reps if r.routable]
        if len(reps) == 1:
            return [reps[0].rid]
        stats = [routing.ReplicaStats(str(r.rid), spare_budget=self.token_budget - len(r.running),
                                      running_requests=len(r.running), queue_len=len(r.waiting),
                                      measured_tpot_s=base_tpot, stats_age_s=0.0,
                                      in_flight=len(r.running) + len(r.waiting)) for r in reps]
        tight = routing.is_tight(self.slo_s[i], base_tpot)
        return [int(rid) for group in routing.rank_replicas(stats, tight, rng=self.rng) for rid in group]

    def _admit(self, reps: list[_Replica], i: int, base_tpot: float, now: float) -> _Replica | None:
        """The engine's fail-fast admission (``LLMEngine._admit_ttft``) on each replica in the router's order: the
        first whose queue lets request i (in its EDF place) and every prompt it already holds on time takes it;
        if none does, it is refused (``on_unattainable: reject``) or served best effort by the first choice."""
        order = self._route(reps, i, base_tpot)
        e = self.cfg.engine
        if not e.ttft_admission or not np.isfinite(self.deadline[i]):
            return reps[order[0]]
        for rid in order:
            rep = reps[rid]
            if self._sheds(rep, i, now):
                continue
            queued, after_order = self._queued(rep), self._queued(rep, extra=i)
            before = self._feasible(rep, queued, now)
            after = self._feasible(rep, after_order, now, newcomer=i, headroom=e.ttft_admission_headroom)
            if newcomer_fits(queued, before, after_order, after, i) and self._pace_admits(rep, after_order, i, now):
                rep.offered.observe_admission(now, int(self.prompt[i]))
                return rep
            rep.offered.observe_refusal(now)  # the scheduler's: overloaded, overload shedding may choose whom to refuse
        if e.on_unattainable == "best_effort":
            self.best_effort[i] = True
            return reps[order[0]]
        self.refused[i] = True
        return None

    def _sheds(self, rep: _Replica, i: int, now: float) -> bool:
        """The scheduler's ``shed_cutoff_tokens``: record the arrival; is request i's prompt over the cutoff?"""
        rep.offered.observe_arrival(now, int(self.prompt[i]))
        if not (self.cfg.engine.overload_shedding and self.slo_prefill):
            return False
        return bool(self.prompt[i] > rep.offered.cutoff_tokens(now))

    def _queued(self, rep: _Replica, extra: int | None = None) -> list[int]:
        """Prompts a replica still has to prefill, in service order (the scheduler's ``_prefill_candidates``)."""
        running = [i for i in rep.running if self.out[i] == 0]
        waiting = list(rep.waiting) + ([extra] if extra is not None else [])
        if not self.cfg.engine.ttft_admission:
            return running + waiting
        return self._edf(running) + self._edf(waiting)

    def _edf(self, idx: list[int]) -> list[int]:
        if len(idx) < 2:
            return idx
        a = np.asarray(idx, dtype=np.int64)
        return [idx[k] for k in deadline_order(self.deadline[a], self.arrival[a], self.best_effort[a])]

    def _feasible(self, rep: _Replica, queued: list[int], now: float, newcomer: int | None = None,
                  headroom: float = 0.0) -> np.ndarray:
        """The scheduler's ``ttft_feasible``: the newcomer judged against ``1 - headroom`` of its TTFT SLO."""
        args = self._ttft_inputs(rep, queued, now)
        if args is None:
            return np.ones(len(queued), bool)
        if newcomer is not None:
            i = newcomer
            args["deadline_s"][queued.index(i)] = self.arrival[i] + (self.deadline[i] - self.arrival[i]) * (1 - headroom)
        return ttft_feasible(self.p.target, **args)

    def _pace_admits(self, rep: _Replica, queued: list[int], newcomer: int, now: float) -> bool:
        """The scheduler's ``tpot_pace_admits`` where the SLO pace plan runs: the decoding requests, then the queued
        prompts with the newcomer (``queued``), each as if its first token were out."""
        if not self.slo_prefill:
            return True
        e = self.cfg.engine
        dec = np.asarray([i for i in rep.running if self.out[i] > 0], dtype=np.int64)
        q = np.asarray(queued, dtype=np.int64)
        ids = np.concatenate([dec, q])
        first = np.concatenate([self.first_t[dec], np.full(q.size, np.nan)])
        acceptance, gain, gain_sd = self._gain_stats()
        floor, _ = self._ttft_floor(rep, queued, now)
        return tpot_pace_admits(
            self.p.target, newcomer=dec.size + queued.index(newcomer),
            tpot_slo_s=pace_tpot_slo_s(self.slo_s[ids], first, self.deadline[ids], self.best_effort[ids]),
            remaining_tokens=np.concatenate([self.maxtok[dec] - self.out[dec], np.maximum(self.maxtok[q] - 1, 0)]),
            decode_time_s=np.concatenate([now - self.first_t[dec], np.zeros(q.size)]),
            decoded_tokens=np.concatenate([np.maximum(self.out[dec] - 1, 0), np.zeros(q.size)]),
            prefill_floor_tokens=floor, context_tokens=float((self.prompt[ids] + self.out[ids]).sum()),
            acceptance_rate=acceptance, tokens_per_step=gain, tokens_per_step_sd=gain_sd,
            max_nodes_per_request=self.n_max, max_tokens=e.max_num_batched_tokens,
            max_prefill_tokens=e.max_num_batched_tokens, overhead_s=self.step_overhead_s,
            confidence_z=e.slo_prefill_confidence_z)

    def _gain_stats(self) -> tuple[float, float, float]:
        """(per-token acceptance, tokens per speculating step, its standard deviation), as the scheduler's
        ``gain_stats`` takes them: the measurement shrunk toward the engine's prior."""
        e = self.cfg.engine
        gain, sd = gain_per_step(int(self.spec_steps.sum()), float(self.accepted.sum()), self.gain_sq,
                                 prior_tokens_per_step=e.gain_prior_tokens_per_step, prior_steps=e.gain_prior_steps)
        return (gain - 1.0) / gain, gain, sd

    def _ttft_floor(self, rep: _Replica, queued: list[int], now: float) -> tuple[int, np.ndarray]:
        args = self._ttft_inputs(rep, queued, now)
        if args is None:
            return 0, np.ones(len(queued), bool)
        return ttft_prefill_floor(self.p.target, **args)

    def _ttft_inputs(self, rep: _Replica, queued: list[int], now: float) -> dict | None:
        """The scheduler's ``_ttft_inputs`` from the simulator's arrays."""
        if not queued or not self.cfg.engine.ttft_admission:
            return None
        q = np.asarray(queued, dtype=np.int64)
        dec = np.asarray([i for i in rep.running if self.out[i] > 0], dtype=np.int64)
        context = float((self.prompt[dec] + self.out[dec]).sum())
        run = np.asarray(rep.running, dtype=np.int64)
        gain = self._gain_stats()[1] if self.spec.kind != "none" else 1.0
        finish = running_finish_times_s(now, self.maxtok[run] - self.out[run], gain,
                                        float(self.p.target.predict(dec.size, context)) + self.step_overhead_s)
        waiting = q.size - sum(1 for i in rep.running if self.out[i] == 0)  # queued without a sequence slot
        ready = np.full(q.size, now)
        ready[q.size - waiting:] = slot_ready_times_s(now, finish, self.cfg.engine.max_num_seqs - run.size, waiting)
        return dict(now_s=now, deadline_s=np.where(self.best_effort[q], np.inf, self.deadline[q]),
                    remaining_tokens=self.prompt[q] - self.computed[q], num_roots=dec.size, context_tokens=context,
                    max_prefill_tokens=max(self.cfg.engine.max_num_batched_tokens - dec.size, 1),
                    overhead_s=self.step_overhead_s, ready_s=ready)

    # ---- one step ---------------------------------------------------------------------------------------
    def _start(self, rep: _Replica, now: float, events: list, seq: int, pending: dict) -> int:
        e = self.cfg.engine
        decodes = [i for i in rep.running if self.out[i] > 0][:e.max_num_batched_tokens]
        cap, slo_nodes = None, 0
        if self.slo_prefill and decodes:
            cap, slo_nodes = self._prefill_plan(rep, np.asarray(decodes, dtype=np.int64), now)
        if e.ttft_admission:  # the scheduler's _demote_late (refuse unstarted late prompts, else demote), then EDF
            queued = self._queued(rep)
            late = [i for i, ok in zip(queued, self._feasible(rep, queued, now))
                    if not ok and not self.best_effort[i]]
            refuse = {i for i in late if e.on_unattainable == "reject" and i in rep.waiting and self.computed[i] == 0}
            self.refused[list(refuse)] = True
            self.best_effort[[i for i in late if i not in refuse]] = True
            rep.waiting = deque(self._edf([i for i in rep.waiting if i not in refuse]))
        candidates = self._queued(rep)
        num_running_prefills = len(candidates) - len(rep.waiting)
        remaining = [int(self.prompt[i] - self.computed[i]) for i in candidates]
        split = split_step_tokens(
            num_roots=len(decodes), prefill_remaining=remaining,
            num_running_prefills=num_running_prefills, free_seq_slots=e.max_num_seqs - len(rep.running),
            max_num_batched_tokens=e.max_num_batched_tokens, prefill_chunk_tokens=e.prefill_chunk_tokens,
            token_budget=self.token_budget, prefill_cap=cap, slo_nodes=slo_nodes,
            gain_measured=bool(self.spec_steps.any()))
        prefills = [(i, k) for i, k in zip(candidates, split.prefill_tokens) if k]
        for _ in range(sum(1 for k in split.prefill_tokens[num_running_prefills:] if k)):  # in order: a prefix
            rep.running.append(rep.waiting.popleft())
        prefill_tokens = split.num_prefill_tokens
        dec = np.asarray(decodes, dtype=np.int64)
        ctx_dec = self.prompt[dec] + self.out[dec]
        gained = np.ones(dec.size, dtype=np.int64)
        nodes = 0
        draft_s = 0.0
        spec_mask = np.zeros(dec.size, dtype=bool)
        if self.spec.kind != "none" and dec.size:
            node_budget = split.node_budget
            t_step = float(self.p.target.predict(dec.size + prefill_tokens + max(node_budget, 0), ctx_dec.sum()))
            if not (self.spec.budgeted and node_budget <= 0):
                acc, nodes, draft_s, spec_mask, sel_s = self._speculate(dec, max(node_budget, 0), t_step, now,
                                                                        dec.size + prefill_tokens, ctx_dec.sum())
                gained += acc
                rep.select_s += sel_s
        ctx_all = int(ctx_dec.sum() + sum(self.computed[i] for i, _ in prefills))
        num_tokens = dec.size + prefill_tokens + nodes
        t_target = float(self.p.target.predict(num_tokens, ctx_all))
        dt = t_target + draft_s + self.p.overhead_s + (self.p.spec_overhead_s if nodes else 0.0)
        rep.busy, rep.steps, rep.busy_s = True, rep.steps + 1, rep.busy_s + dt
        if sum(remaining) > prefill_tokens:  # the scheduler's prompts_left_waiting: overload shedding's capacity
            rep.offered.observe_saturated_step(prefill_tokens, dt)
        pending[rep.rid] = (dec, gained, spec_mask, prefills, dt - t_target)
        heapq.heappush(events, (now + dt, seq, rep.rid))
        return seq + 1

    def _prefill_plan(self, rep: _Replica, dec: np.ndarray, now: float) -> tuple[int, int]:
        """(prefill tokens, SLO nodes) the decoding requests' SLO pace leaves this step, never below what the queued
        prompts' feasible TTFT deadlines need (the engine's rule, ``Scheduler.prefill_cap``)."""
        cfg = self.cfg.engine
        if cfg.max_prefill_wait_s is not None:
            queued = list(rep.waiting) + [i for i in rep.running if self.out[i] == 0]
            if queued and now - float(self.arrival[queued].min()) >= cfg.max_prefill_wait_s:
                return cfg.max_num_batched_tokens, 0
        acceptance, gain, gain_sd = self._gain_stats()
        ttft_floor, _ = self._ttft_floor(rep, self._queued(rep), now)
        prefill, nodes = slo_step_plan(
            self.p.target, root_tokens=dec.size, context_tokens=float((self.prompt[dec] + self.out[dec]).sum()),
            decode_time_s=now - self.first_t[dec], decoded_tokens=np.maximum(self.out[dec] - 1, 0),
            tpot_slo_s=pace_tpot_slo_s(self.slo_s[dec], self.first_t[dec], self.deadline[dec], self.best_effort[dec]),
            remaining_tokens=self.maxtok[dec] - self.out[dec],
            acceptance_rate=acceptance, tokens_per_step=gain, tokens_per_step_sd=gain_sd,
            max_nodes_per_request=self.n_max,
            max_tokens=cfg.max_num_batched_tokens, max_prefill_tokens=cfg.max_num_batched_tokens,
            overhead_s=self.step_overhead_s, confidence_z=cfg.slo_prefill_confidence_z)
        return max(prefill, ttft_floor), nodes  # TTFT deadlines that can be met first (the scheduler's prefill_cap)

    def _commit(self, rep: _Replica, now: float, plan) -> None:
        dec, gained, spec_mask, prefills, overhead_s = plan
        if dec.size:
            # EMA of a decoding step's time beyond the target's (draft, host), as the engine keeps it
            self.step_overhead_s = 0.9 * self.step_overhead_s + 0.1 * overhead_s
            g = np.minimum(gained, self.maxtok[dec] - self.out[dec])
            self.out[dec] += g
            self.last_t[dec] = now
            self.spec_steps[dec] += spec_mask
            self.accepted[dec] += np.where(spec_mask, g - 1, 0)
            self.gain_sq += float((g[spec_mask].astype(np.float64) ** 2).sum())
        for i, k in prefills:
            self.computed[i] += k
            if self.computed[i] >= self.prompt[i]:
                self.out[i] = 1
                self.first_t[i] = self.last_t[i] = now
        done = [i for i in rep.running if self.out[i] >= self.maxtok[i]]
        if done:
            ds = set(done)
            rep.running = [i for i in rep.running if i not in ds]

    def _speculate(self, dec: np.ndarray, node_budget: int, t_step: float, now: float, step_tokens: int,
                   context_tokens: float):
        e, spec = self.cfg.engine, self.spec
        r = dec.size
        slo = SLOState(decode_time_s=now - self.first_t[dec], decoded_tokens=np.maximum(self.out[dec] - 1, 0),
                       tpot_slo_s=self.slo_s[dec])
        depth, beam, topk = draft_shape(spec, r, node_budget, d_max=e.max_draft_depth, w_max=e.max_draft_width)
        depth = min(depth, (MAX_TREE_TOKENS - 1) // max(beam, 1))
        if depth == 0:
            return np.zeros(r, np.int64), 0, 0.0, np.zeros(r, bool), 0.0
        gate = None
        if self.cut:  # tokens/s the step makes without the level / node (~r tokens per t_step)
            rate = r / max(t_step + self.p.overhead_s, 1e-9)
            gate = lambda front_f_sum, tokens: front_f_sum >= rate * (self.p.draft_level_s + self.p.draft_token_s * tokens)  # noqa: E731
        parent, f, valid, chosen, level_tokens, picks = self._draft(dec, depth, beam, topk,
                                                                    spec.static_widths or None, gate)
        depth = len(level_tokens)
        if self.acc.lookup_chains is not None:
            parent, f, valid, chosen = self._add_lookup(dec, parent, f, valid, chosen, picks)
        draft_s = sum(self.p.draft_level_s + self.p.draft_token_s * t for t in level_tokens)
        min_f, sel_budget = 0.0, node_budget
        if self.cut:  # the engine's throughput cut: it bounds the selection's f and its size
            min_f = throughput_cut_path_prob(f[valid], self.p.target, step_tokens, context_tokens, r)
            sel_budget = min(node_budget, int(np.count_nonzero(f[valid] >= min_f)))
        t0 = time.perf_counter()
        sel = select(spec, f.astype(np.float32), parent, valid, slo, sel_budget, t_step, depth, self.n_max,
                     min_path_prob=min_f,
                     serve_unreachable=self.serve_unreachable)
        sel = cap_tree_size(sel, self.n_max)
        sel_s = time.perf_counter() - t0
        ok = (chosen & sel).astype(np.int8)
        acc = token_tree.path_reduce(token_tree.sanitize_parent(parent, valid), ok, np.minimum, identity=1)
        acc = (acc.astype(bool) & sel).sum(axis=1)
        nodes = int(sel.sum())
        return acc.astype(np.int64), nodes, draft_s, sel.any(axis=1), sel_s

    def _draft(self, dec: np.ndarray, depth: int, beam: int, topk: int, widths, gate=None):
        """Candidate trees [r, M] level by level like the drafter, for requests ``dec``, each node's children
        drawn from its request's class's fan-out rows; returns parent, f, valid, chosen (the target's pick at
        its parent), and the tokens of each draft forward (for the draft cost)."""
        rng = self.rng
        r = dec.size
        row_start, row_count = self.pools["fan_start"][dec, None], self.pools["fan_count"][dec, None]
        k_pool = self.fan.shape[1]
        parents_l, f_l, valid_l, chosen_l, lo_l, hi_l = [], [], [], [], [], []
        picks_l = []  # per level: (frontier slots, the target's uniform draw there)
        front_idx = np.full((r, 1), -1, dtype=np.int64)  # frontier node slots (-1 = root)
        front_f = np.ones((r, 1))
        front_ok = np.ones((r, 1), dtype=bool)
        offset = 0
        level_tokens = []
        for level in range(depth):
            k = min(widths[level] if widths else topk, k_pool)
            fcount = front_idx.shape[1]
            if gate is not None and level > 0 and not gate(float(front_f.sum()), r * fcount):
                break
            level_tokens.append(r * (1 if level == 0 else fcount))
            pq, lo, hi = self.pool[k]
            rows = row_start + np.minimum((rng.random((r, fcount)) * row_count).astype(np.int64), row_count - 1)
            q = pq[rows] * front_ok[:, :, None]  # [r, F, k], descending per node
            u = rng.random((r, fcount, 1))
            pick = (u >= lo[rows]) & (u < hi[rows]) & (q > 0)
            picks_l.append((front_idx, u[..., 0]))
            f = front_f[:, :, None] * q
            par = np.broadcast_to(front_idx[:, :, None], (r, fcount, k))
            parents_l.append(par.reshape(r, -1))
            f_l.append(f.reshape(r, -1))
            valid_l.append((q > 0).reshape(r, -1))
            chosen_l.append(pick.reshape(r, -1))
            lo_l.append(lo[rows].reshape(r, -1))
            hi_l.append(hi[rows].reshape(r, -1))
            slots = offset + np.arange(fcount * k)
            offset += fcount * k
            if level + 1 == depth:
                break
            flat_f = f.reshape(r, -1)
            if widths or beam >= flat_f.shape[1]:  # static, or a beam as wide as the level: all children
                front_idx = np.broadcast_to(slots, (r, slots.size)).copy()
                front_f, front_ok = flat_f, flat_f > 0
            else:
                nb = min(beam, flat_f.shape[1])
                top = np.argsort(-flat_f, axis=1, kind="stable")[:, :nb]
                front_idx = slots[top]
                front_f = np.take_along_axis(flat_f, top, axis=1)
                front_ok = front_f > 0
        parent = np.concatenate(parents_l, axis=1)
        m = parent.shape[1]
        draw = np.full((r, m + 1), np.nan)  # column m: the root
        rows_r = np.arange(r)[:, None]
        for idx, u in picks_l:
            col = np.where(idx < 0, m, idx)
            draw[rows_r, col] = u
        return (parent, np.concatenate(f_l, axis=1), np.concatenate(valid_l, axis=1),
                np.concatenate(chosen_l, axis=1), level_tokens,
                (draw, np.concatenate(lo_l, axis=1), np.concatenate(hi_l, axis=1)))

    def _add_lookup(self, dec, parent, f, valid, chosen, picks):
        """Append a prompt-lookup chain to each request's tree, as the merged drafter would: as often as the
        trace's trees of the request's class had one, one of that class's recorded primary chains (q per depth);
        under the model's likeliest level-1 node when the recorded chain's first node was the model's too (the
        chain then continues below it), else under the root. Lookup chains do not shrink with the adaptive depth
        and cost no draft time. The target picks one child per node, from the anchor's uniform draw: the chain's
        first node takes the first interval and the model's children there the intervals after it (so at most
        one of them is accepted); deeper nodes use the trace's lookup acceptance by q. The lookup goes first
        because that is how the trace measured it: q >= 0.8 lookups were accepted 91% of the time beside model
        children whose calibrated acceptance summed to 0.31; placed after them they were capped at 69%."""
        draw, node_lo, node_hi = picks
        acc, rng = self.acc, self.rng
        r, m = parent.shape
        rows = np.arange(r)
        count = self.pools["chain_count"][dec]
        has = (rng.random(r) < self.pools["lookup_share"][dec]) & (count > 0)
        idx = self.pools["chain_start"][dec] + np.minimum((rng.random(r) * count).astype(np.int64),
                                                           np.maximum(count - 1, 0))
        q = acc.lookup_chains[idx].astype(np.float64) * has[:, None]  # [r, D]
        level1 = (parent < 0) & valid
        top = np.argmax(np.where(level1, f, -1.0), axis=1)
        under = acc.lookup_shared_first[idx] & has & level1[rows, top]
        q = np.where(under[:, None], np.concatenate([q[:, 1:], np.zeros((r, 1))], axis=1), q)
        anchor = np.where(under, top, -1)
        cf = np.where(under, f[rows, top], 1.0)[:, None] * np.cumprod(q, axis=1)
        cvalid = np.cumprod(q > 0, axis=1).astype(bool)
        depth = q.shape[1]
        cparent = np.empty((r, depth), np.int64)
        cparent[:, 0] = anchor
        cparent[:, 1:] = m + np.arange(depth - 1)
        g = acc.lookup_accept(q) * cvalid
        col = np.where(under, top, m)
        u = draw[rows, col]
        fresh = np.isnan(u)  # the anchor was not expanded by the model: nothing competes there
        u = np.where(fresh, rng.random(r), u)
        first = u < g[:, 0]
        # the model's children at the anchor: their pick intervals move past the lookup's
        kids = valid & (parent == anchor[:, None]) & ~fresh[:, None]
        shifted = (u - g[:, 0])[:, None]
        chosen = np.where(kids, (shifted >= node_lo) & (shifted < node_hi), chosen)
        cchosen = np.concatenate([first[:, None], rng.random((r, depth - 1)) < g[:, 1:]], axis=1) & cvalid
        return (np.concatenate([parent, cparent], axis=1), np.concatenate([f, cf], axis=1),
                np.concatenate([valid, cvalid], axis=1), np.concatenate([chosen, cchosen], axis=1))


def simulate(reqs: list[SimRequest], profile: Profile, acceptance: AcceptanceModel, config: SimConfig):
    return Simulator(profile, acceptance, config).run(reqs)


def synthetic_requests(n: int, rate: float, profile: Profile, *, seed: int = 0, mix=(0.6, 0.2, 0.2),
                       arrival: str = "poisson", cv: float = 1.0, max_tokens_cap: int = 128,
                       prompt_char_cap: int = 4000, slo_ms: dict[str, float] | None = None) -> list[SimRequest]:
    """The workload of bench.workloads (real prompt/answer lengths) for the simulator at scale."""
    from bench.workloads import build_workload

    wl = build_workload(n, rate=rate, seed=seed, mix=mix, arrival=arrival, cv=cv, max_tokens_cap=max_tokens_cap,
                        prompt_char_cap=prompt_char_cap)
    base_ms = profile.unloaded_tpot_s() * 1e3
    slo = slo_ms or {c: x * base_ms for c, x in SLO_CLASSES.items()}
    return from_workload(wl, slo)


def sim_sweep(profile: Profile, acc: AcceptanceModel, policies: list[str], rates: list[float], n: int, *,
              replicas: int = 1, max_tokens: int = 128, max_num_seqs: int = 128, max_batched_tokens: int = 2048,
              token_budget: int | None = None, budget_tolerance: float = 1.5, seed: int = 0,
              arrival: str = "poisson", cv: float = 1.0, verbose: bool = False,
              confidence_z: float = 2.0, max_prefill_wait_s: float | None = None,
              ttft: tuple[float, float] | None = None) -> list[dict]:
    from bench.loadgen import format_summary, summarize

    rows = []
    for rate in rates:
        reqs = synthetic_requests(n, rate, profile, seed=seed, max_tokens_cap=max_tokens, arrival=arrival, cv=cv)
        if ttft is not None:
            reqs = with_ttft(reqs, profile, *ttft)
        for pol in policies:
            cfg = SimConfig.of(pol, num_replicas=replicas, seed=seed, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_batched_tokens, token_budget=token_budget,
                               budget_tolerance=budget_tolerance, slo_prefill_confidence_z=confidence_z,
                               max_prefill_wait_s=max_prefill_wait_s)
            recs, info = simulate(reqs, profile, acc, cfg)
            s = summarize(recs)
            o = s["overall"]
            rows.append({"policy": pol, "rate": rate, "summary": s, "info": {k: v for k, v in info.items()
                                                                             if k != "busy_s"}})
            print(f"rate {rate:6.2f} {pol:<13} attain {o['attainment'] * 100:5.1f}% (tpot-only "
                  f"{o['attainment_tpot'] * 100:5.1f}%, refused {o['rejected']:3d}, TTFT p90 "
                  f"{(o['ttft_s_p90'] or 0) * 1e3:6.0f} ms)  goodput {o['goodput_tok_s']:8.1f} "
                  f"tok/s {o['goodput_req_s']:6.2f} req/s  acc/step {o['accepted_tokens_per_step'] or 1:.2f}  "
                  f"B={info['token_budget']}  sim {info['sim_wall_s']:.2f} s ({info['steps']} steps)", flush=True)
            if verbose:
                print(format_summary(s))
    return rows


def headline(rows: list[dict], focus: str = "adaserve", exclude: tuple[str, ...] = ()) -> dict:
    """``focus`` vs the best baseline per rate, and at the highest rate where any policy attains >= 50%.
    Baselines: every policy not starting with "adaserve", without '+' (simulator prototypes), not in
    ``exclude`` (e.g. dynamic-tree, to compare with the paper's baseline set only)."""
    out = {"focus": focus, "excluded": list(exclude), "per_rate": []}
    rates = sorted({r["rate"] for r in rows})
    for rate in rates:
        rs = [r for r in rows if r["rate"] == rate]
        ours = next((r["summary"]["overall"] for r in rs if r["policy"] == focus), None)
        base = [r for r in rs if not r["policy"].startswith("adaserve") and "+" not in r["policy"]
                and r["policy"] not in exclude]
        if ours is None or not base:
            continue
        best_att = max(base, key=lambda r: r["summary"]["overall"]["attainment"])
        best_gp = max(base, key=lambda r: r["summary"]["overall"]["goodput_tok_s"])
        ba, bg = best_att["summary"]["overall"]["attainment"], best_gp["summary"]["overall"]["goodput_tok_s"]
        any50 = max(r["summary"]["overall"]["attainment"] for r in rs) >= 0.5
        out["per_rate"].append({
            "rate": rate, "adaserve_attainment": ours["attainment"], "best_baseline_attainment": ba,
            "best_attainment_policy": best_att["policy"], "attainment_ratio": ours["attainment"] / ba if ba else None,
            "adaserve_goodput": ours["goodput_tok_s"], "best_baseline_goodput": bg,
            "best_goodput_policy": best_gp["policy"], "goodput_ratio": ours["goodput_tok_s"] / bg if bg else None,
            "any_policy_ge_50pct": any50})
    ok = [p for p in out["per_rate"] if p["any_policy_ge_50pct"]]
    out["highest_load_ge_50pct"] = ok[-1] if ok else None
    return out


def format_headline(h: dict) -> str:
    lines = [f"{'rate':>7} {'ours att':>9} {'best att':>9} {'(policy)':>14} {'ratio':>6} {'ours gp':>9} {'best gp':>9} "
             f"{'(policy)':>14} {'ratio':>6}"]
    for p in h["per_rate"]:
        ar = "-" if p["attainment_ratio"] is None else f"{p['attainment_ratio']:.2f}"
        gr = "-" if p["goodput_ratio"] is None else f"{p['goodput_ratio']:.2f}"
        lines.append(f"{p['rate']:>7g} {p['adaserve_attainment'] * 100:>8.1f}% {p['best_baseline_attainment'] * 100:>8.1f}% "
                     f"{p['best_attainment_policy']:>14} {ar:>6} {p['adaserve_goodput']:>9.1f} "
                     f"{p['best_baseline_goodput']:>9.1f} {p['best_goodput_policy']:>14} {gr:>6}")
    hl = h["highest_load_ge_50pct"]
    if hl:
        lines.append(f"highest load with any policy >= 50%: rate {hl['rate']:g}: attainment x{hl['attainment_ratio'] or 0:.2f}, "
                     f"goodput x{hl['goodput_ratio'] or 0:.2f} vs the best baseline")
    return "\n".join(lines)


def calibrated_profile(profile: Profile, steps: list[dict]) -> Profile:
    """The profile with its target model refitted on the engine's own StepStats of the run (num_tokens,
    verify_s; context folded into the fit: StepStats has none). On shared cores the start-up profile can be
    off by 2x from what the run then sees; the run's steps are the same engine on the same CPU, measured live."""
    samples = [(d["num_tokens"], 0.0, d["verify_s"]) for d in steps if d["num_tokens"] > 0]
    target = LatencyModel.fit(samples, knots=[1, 4, 16, 64, 256, 512])
    return Profile(profile.name + " (calibrated on the run's steps)", target, profile.draft_level_s,
                   profile.draft_token_s, profile.overhead_s, profile.spec_overhead_s)


def scaled_profile(profile: Profile, factor: float) -> Profile:
    """Every cost x factor (the machine got uniformly slower or faster: shared cores)."""
    return Profile(profile.name, profile.target.scaled(factor), profile.draft_level_s * factor,
                   profile.draft_token_s * factor, profile.overhead_s * factor, profile.spec_overhead_s * factor)


def run_slowdowns(profile: Profile, sweep_dir: Path) -> dict[tuple[str, float], float]:
    """Per run (policy, rate): measured verify time / the profile's prediction for that run's own steps.
    The other jobs on the shared cores come and go, so each run saw its own machine speed."""
    steps_path, samples_path = sweep_dir / "steps.json", sweep_dir / "step_samples.json"
    if not (steps_path.exists() and samples_path.exists()):
        return {}
    runs, samples = json.loads(steps_path.read_text()), json.loads(samples_path.read_text())
    if sum(r["num_steps"] for r in runs) != len(samples):
        return {}
    out, pos = {}, 0
    for r in runs:
        chunk = samples[pos:pos + r["num_steps"]]
        pos += r["num_steps"]
        pred = sum(float(profile.target.predict(d["num_tokens"])) for d in chunk)
        real = sum(d["verify_s"] for d in chunk)
        out[(r["policy"], r["rate"])] = real / pred if pred > 0 else 1.0
    return out


def validate(sweep_dir: Path, trace: Path | None = None, seed: int = 0,
             calibrate: bool = True, per_run: bool = True, what_if: tuple[str, ...] = ()) -> list[dict]:
    """Simulate the exact workload of a real CPU sweep (same arrivals, prompt token counts, lengths, SLOs,
    token budget, max_num_seqs) with its measured CPU profile; print real vs simulated side by side."""
    from bench.loadgen import summarize

    meta = json.loads((sweep_dir / "meta.json").read_text())
    profile = Profile.from_dict(json.loads((sweep_dir / "profile_cpu.json").read_text()))
    if calibrate and (sweep_dir / "step_samples.json").exists():
        profile = calibrated_profile(profile, json.loads((sweep_dir / "step_samples.json").read_text()))
        (sweep_dir / "profile_cpu_calibrated.json").write_text(json.dumps(profile.to_dict(), indent=1))
        print(f"target latency refitted on the run's own {profile.name} steps: 1 tok "
              f"{profile.target.predict(1) * 1e3:.0f} ms, 32 tok {profile.target.predict(32) * 1e3:.0f} ms, "
              f"128 tok {profile.target.predict(128) * 1e3:.0f} ms")
    slowdowns = run_slowdowns(profile, sweep_dir) if calibrate and per_run else {}
    if slowdowns:
        print("per-run machine speed (verify time / calibrated model): " + ", ".join(
            f"{p}@{r:g} {x:.2f}" for (p, r), x in slowdowns.items()))
    acc = AcceptanceModel.from_trace(load_trace(trace or sweep_dir / "trace.jsonl"))
    recs = [json.loads(x) for x in (sweep_dir / "requests.jsonl").read_text().splitlines() if x.strip()]
    out = []
    for pol in what_if:  # prototypes on the same workload and machine speed as the real adaserve run
        for rate in meta["rates"]:
            rs = sorted((r for r in recs if r["policy"] == "adaserve" and r["rate"] == rate), key=lambda r: r["index"])
            reqs = [SimRequest(r["scheduled_s"], r["prompt_tokens"], r["max_tokens"], r["slo_class"], r["tpot_slo_ms"])
                    for r in rs]
            prof = scaled_profile(profile, slowdowns.get(("adaserve", rate), 1.0))
            sims = [summarize(simulate(reqs, prof, acc, SimConfig.of(
                pol, seed=seed + k, token_budget=meta["token_budget"], max_num_seqs=meta["max_num_seqs"]))[0])["overall"]
                for k in range(5)]
            row = {"policy": pol, "rate": rate, "what_if": True,
                   "sim_attainment": float(np.mean([x["attainment"] for x in sims])),
                   "sim_goodput": float(np.mean([x["goodput_tok_s"] for x in sims]))}
            out.append(row)
            print(f"what-if {pol:<20} rate {rate:>5g}: sim attainment {row['sim_attainment'] * 100:5.1f}%, "
                  f"goodput {row['sim_goodput']:.2f} tok/s")
    print(f"{'policy':<13}{'rate':>6} | {'attain real':>11} {'sim':>6} {'diff':>6} | {'goodput real':>12} {'sim':>7} "
          f"{'rel':>6} | {'acc/st real':>11} {'sim':>5}")
    for pol in meta["policies"]:
        for rate in meta["rates"]:
            rs = sorted((r for r in recs if r["policy"] == pol and r["rate"] == rate), key=lambda r: r["index"])
            if not rs:
                continue
            reqs = [SimRequest(r["scheduled_s"], r["prompt_tokens"], r["max_tokens"], r["slo_class"], r["tpot_slo_ms"])
                    for r in rs]
            sims = []
            prof = scaled_profile(profile, slowdowns[(pol, rate)]) if (pol, rate) in slowdowns else profile
            for k in range(5):  # average a few seeds: a 16-request run is noisy
                cfg = SimConfig.of(pol, seed=seed + k, token_budget=meta["token_budget"],
                                   max_num_seqs=meta["max_num_seqs"])
                sim_recs, _ = simulate(reqs, prof, acc, cfg)
                sims.append(summarize(sim_recs)["overall"])
            real = summarize(rs)["overall"]
            sa = float(np.mean([s["attainment"] for s in sims]))
            sg = float(np.mean([s["goodput_tok_s"] for s in sims]))
            sacc = float(np.mean([s["accepted_tokens_per_step"] or 1.0 for s in sims]))
            row = {"policy": pol, "rate": rate, "machine_speed_factor": slowdowns.get((pol, rate), 1.0),
                   "real_attainment": real["attainment"], "sim_attainment": sa,
                   "real_goodput": real["goodput_tok_s"], "sim_goodput": sg,
                   "real_acc_per_step": real["accepted_tokens_per_step"] or 1.0, "sim_acc_per_step": sacc,
                   "real_tpot_p50": real["tpot_s_p50"], "sim_tpot_p50": float(np.mean([s["tpot_s_p50"] for s in sims]))}
            row["attainment_diff_pts"] = (sa - real["attainment"]) * 100
            row["goodput_rel_err"] = (sg - real["goodput_tok_s"]) / real["goodput_tok_s"] if real["goodput_tok_s"] else None
            out.append(row)
            ge = "-" if row["goodput_rel_err"] is None else f"{row['goodput_rel_err'] * 100:+.0f}%"
            print(f"{pol:<13}{rate:>6g} | {real['attainment'] * 100:>10.0f}% {sa * 100:>5.0f}% {row['attainment_diff_pts']:>+6.0f} | "
                  f"{real['goodput_tok_s']:>12.2f} {sg:>7.2f} {ge:>6} | {row['real_acc_per_step']:>11.2f} {sacc:>5.2f}",
                  flush=True)
    passes: dict[str, int] = {}
    for row in out:
        if row.get("what_if"):
            continue
        gp_ok = (row["goodput_rel_err"] is not None and abs(row["goodput_rel_err"]) <= 0.15) or (
            row["real_goodput"] == 0 and row["sim_goodput"] < 0.5)  # both (nearly) nothing
        row["within_target"] = bool(abs(row["attainment_diff_pts"]) <= 10 and gp_ok)
        passes[row["policy"]] = passes.get(row["policy"], 0) + row["within_target"]
    print("rates within 10 points of attainment and 15% of goodput: " + ", ".join(f"{k} {v}/{len(meta['rates'])}"
                                                                             for k, v in passes.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validate", type=Path, default=None, help="a real sweep directory to predict")
    ap.add_argument("--profile", default="70b", help="70b | cpu | path to a profile JSON")
    ap.add_argument("--trace", type=Path, default=None, help="acceptance trace (default: the recorded one)")
    ap.add_argument("--policies", nargs="+",
                    default=["none", "chain:4", "chain:6", "chain:8", "static-tree", "dynamic-tree", "adaserve"])
    ap.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 12, 16])
    ap.add_argument("-n", "--num-requests", type=int, default=2000)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--accept-scale", type=float, default=1.0, help="what-if: conditional acceptance x this")
    ap.add_argument("--ttft-x-prefill", type=float, default=10.0,
                    help="every request's TTFT SLO: this x its prompt's idle prefill time ... (the server's default)")
    ap.add_argument("--ttft-allowance-ms", type=float, default=1000.0, help="... plus this allowance")
    ap.add_argument("--no-ttft", action="store_true", help="TPOT SLOs only (the paper's setting)")
    ap.add_argument("--budget-tolerance", type=float, default=1.5,
                    help="EngineConfig.budget_tolerance (the 70B scenario's B = 155 comes from 1.5)")
    ap.add_argument("--confidence-z", type=float, default=2.0, help="EngineConfig.slo_prefill_confidence_z")
    ap.add_argument("--max-prefill-wait-s", type=float, default=None, help="EngineConfig.max_prefill_wait_s")
    ap.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="directory for summary.json, headline.json, plots")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--no-calibrate", action="store_true", help="validate with the start-up profile as is")
    ap.add_argument("--what-if", nargs="*", default=[], help="with --validate: prototype policies to simulate too")
    ap.add_argument("--global-calibration", action="store_true",
                    help="one refitted model for all runs (default: also scaled to each run's measured speed)")
    ap.add_argument("--headline", type=Path, default=None, help="print the headline of a saved summary.json")
    args = ap.parse_args()
    if not args.confidence_z >= 0:
        ap.error(f"--confidence-z must be >= 0, got {args.confidence_z}")
    for pol in args.policies:
        try:
            split_policy_options(pol)
        except ValueError as exc:
            ap.error(str(exc))
    if args.headline is not None:
        rows = json.loads(args.headline.read_text())
        for focus in sorted({r["policy"] for r in rows if r["policy"].startswith("adaserve")}):
            for exclude in ((), ("dynamic-tree",)):
                print(f"== {focus} vs the best baseline" + (f" (without {', '.join(exclude)})" if exclude else ""))
                print(format_headline(headline(rows, focus, exclude)))
        return
    if args.validate is not None:
        rows = validate(args.validate, args.trace, args.seed, not args.no_calibrate,
                        not args.global_calibration, tuple(args.what_if))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "validation.json").write_text(json.dumps(rows, indent=1))
        return
    profile = load_profile(args.profile)
    trace = args.trace or RESULTS / "acceptance_trace.jsonl.gz"
    acc = AcceptanceModel.from_trace(load_trace(trace))
    if args.accept_scale != 1.0:
        acc = acc.scaled(args.accept_scale)
    print(f"profile {profile.name}: unloaded TPOT {profile.unloaded_tpot_s() * 1e3:.1f} ms; trace {trace}")
    rows = sim_sweep(profile, acc, args.policies, args.rates, args.num_requests, replicas=args.replicas,
                     max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
                     max_batched_tokens=args.max_batched_tokens, token_budget=args.token_budget,
                     budget_tolerance=args.budget_tolerance, seed=args.seed,
                     arrival=args.arrival, cv=args.cv, verbose=args.verbose,
                     confidence_z=args.confidence_z, max_prefill_wait_s=args.max_prefill_wait_s,
                     ttft=None if args.no_ttft else (args.ttft_x_prefill, args.ttft_allowance_ms))
    h = {f"{f} vs {'paper baselines' if ex else 'all baselines'}": headline(rows, f, ex)
         for f in sorted({r["policy"] for r in rows if r["policy"].startswith("adaserve")})
         for ex in ((), ("dynamic-tree",))}
    for f, hf in h.items():
        print(f"== {f}\n{format_headline(hf)}")
    if args.out:
        from bench.plots import plot_sweep

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
        (args.out / "headline.json").write_text(json.dumps({"headline": h, "args": {k: str(v) for k, v in vars(args).items()}},
                                                           indent=1))
        for p in plot_sweep(args.out / "summary.json", args.out, title=args.out.name):
            print(f"plot: {p}")


if __name__ == "__main__":
    main()
