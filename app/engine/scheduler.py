"""Continuous batching with chunked prefill; owns every budget of a step.

``schedule(now)`` returns a ``StepPlan``: each decoding request's root token, prefill chunks and the draft-node
budget, split by ``policies.step_plan.split_step_tokens`` (the simulator calls the same function); the SLO pace
plan (``policies.budget.slo_step_plan``) bounds the prefill where adaserve runs, and the latency profile prices
the step's nodes. ``update(plan, result)`` advances the requests and the running statistics the next plans are
priced with. Running out of KV blocks preempts the newest running request (its KV is dropped and recomputed
later), so the oldest keep progressing. With prefix caching a waiting request maps its longest cached prefix when it
is admitted and prefills only the rest; its full blocks join the cache as their tokens are computed.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from app.engine.config import EngineConfig
from app.engine.kv_cache import KVCache
from app.engine.request import Request, RequestStatus
from app.engine.step import NodePricing, ScheduledChunk, StepPlan, StepResult, StepTotals
from kernels.metadata import MAX_TREE_TOKENS
from policies.admission import (OfferedPrefill, deadline_order, pace_tpot_slo_s, running_finish_times_s,
                                slot_ready_times_s, tpot_pace_admits, ttft_feasible, ttft_prefill_floor)
from policies.budget import gain_per_step, min_worthwhile_path_prob, required_nodes, slo_step_plan, spare_budget
from policies.latency_model import LatencyModel, update_knot_log_scales
from policies.step_plan import split_step_tokens
from policies.tree_selection import SLOState, parse_policy, required_acceptance


LATENCY_EMA = 0.05  # weight of the newest step in ``latency_scale``: ~20 steps, a second or two of serving


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache: KVCache, *, speculative: bool,
                 latency_model: LatencyModel | None = None, token_budget: int | None = None):
        self.config = config
        self.kv = kv_cache
        self.speculative = speculative  # a draft source is loaded (a request may speculate)
        self.latency_model = latency_model  # the profile; None: no priced cut-offs and no SLO pace plan
        self.latency_scale = 1.0  # measured / profiled step time, EMA of recent steps (exported: the profile's error)
        # per token knot of the profile, log of measured / predicted step time (priced in: calibrate_latency)
        self.knot_log_scales: np.ndarray | None = None
        self._scaled: tuple[LatencyModel, LatencyModel] | None = None  # (profile, profile rescaled by those)
        self.token_budget = token_budget or config.max_num_batched_tokens  # B: step tokens, roots included
        self.default_policy = parse_policy(config.policy)
        self.max_tree_nodes = min(config.max_tree_nodes, MAX_TREE_TOKENS - 1)  # the root takes one mask bit
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.totals = StepTotals()
        self.step_ema_s: float | None = None
        self.step_overhead_ema_s = 0.0  # a decoding step's time outside the target forward (draft, select, host)
        self.offered_prefill = OfferedPrefill()  # overload shedding's window of arrivals and prefill capacity

    # ---- queues ---------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def policy_of(self, req: Request):
        return parse_policy(req.policy) if req.policy else self.default_policy

    @property
    def model(self) -> LatencyModel | None:
        """The latency profile every plan and admission decision is priced with: rescaled, step size by step size, to
        the measured speed where ``calibrate_latency`` is on (``policies.latency_model.LatencyModel.rescaled``)."""
        base = self.latency_model
        logs = self._knot_log_scales(base) if base is not None and self.config.calibrate_latency else None
        if logs is None:
            return base
        if self._scaled is None or self._scaled[0] is not base:
            self._scaled = (base, base.rescaled(np.exp(logs)))
        return self._scaled[1]

    def _knot_log_scales(self, base: LatencyModel) -> np.ndarray | None:
        """The per-knot scales measured for ``base``'s knots (None: none yet, or measured for another profile)."""
        logs = self.knot_log_scales
        return logs if logs is not None and logs.size == len(base.tokens.knots) else None

    # ---- the plan -------------------------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        limit = self.config.max_num_batched_tokens
        # 1. Decodes: one token each, oldest first; preempt the newest running request when blocks run out.
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or not req.is_decoding or len(plan.decodes) == limit:
                continue
            if self._grow(req, req.num_computed_tokens + 1, plan):
                plan.decodes.append(ScheduledChunk(req, 1))
        decodes = [c.request for c in plan.decodes]
        self._demote_late(now, plan)
        self._order_waiting()
        cap, slo_nodes = self.prefill_cap(decodes, now) if decodes else (None, 0)
        # 2. Prefill chunks, as the pure split decides; KV decides how far admission gets.
        max_admitted = None
        while True:
            candidates = self._prefill_candidates()
            num_running_prefills = len(candidates) - len(self.waiting)
            remaining = [self._remaining(r) for r in candidates]
            split = split_step_tokens(
                num_roots=len(plan.decodes), prefill_remaining=remaining,
                num_running_prefills=num_running_prefills,
                free_seq_slots=self.config.max_num_seqs - len(self.running),
                max_num_batched_tokens=limit, prefill_chunk_tokens=self.config.prefill_chunk_tokens,
                token_budget=self.token_budget, prefill_cap=cap, slo_nodes=slo_nodes, max_admitted=max_admitted,
                gain_measured=self.totals.tree_requests > 0)
            num_preempted = len(plan.preempted)
            stop = self._allocate(candidates, num_running_prefills, split.prefill_tokens, plan)
            if len(plan.preempted) > num_preempted:  # the queues changed: plan again
                max_admitted = None
            elif stop is not None:  # the stop-th candidate (waiting) does not fit: it and those after it wait
                max_admitted = stop
            else:
                break
        plan.prefills = []
        for i, (req, n) in enumerate(zip(candidates, split.prefill_tokens)):
            if n == 0:
                continue
            if i >= num_running_prefills:
                self.waiting.remove(req)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                req.num_cached_tokens = req.num_computed_tokens
                self.kv.count_admission(len(req.token_ids), req.num_cached_tokens)
            plan.prefills.append(ScheduledChunk(req, n))
        for req in self.waiting:  # a waiting request holds no KV: what the passes above took for it goes back
            if req.block_ids:
                self.kv.release_request(req)
                req.num_computed_tokens = 0
        plan.node_budget, plan.slo_node_budget, plan.prefill_held = (
            split.node_budget, split.slo_node_budget, split.prefill_held)
        plan.prompts_left_waiting = sum(remaining) > split.num_prefill_tokens
        if self.speculative and plan.decodes:
            self._price(plan)
        return plan

    def _prefill_candidates(self) -> list[Request]:
        """Running requests still in prefill, then the waiting queue, each in service order."""
        running = [r for r in self.running if r.status is RequestStatus.RUNNING and not r.is_decoding
                   and r.num_uncomputed_tokens > 0]
        return (_service_order(running) if self.config.ttft_admission else running) + list(self.waiting)

    def _remaining(self, req: Request) -> int:
        """Tokens req still has to prefill: a waiting request's cached prefix does not count (it is mapped, not
        computed, when the request is admitted)."""
        if req.block_ids or req.status is not RequestStatus.WAITING:
            return req.num_uncomputed_tokens
        return req.num_uncomputed_tokens - self.kv.num_cached_prefix_tokens(req)

    def _demote_late(self, now: float, plan: StepPlan) -> None:
        """A queued prompt that can no longer make its TTFT deadline (even at full prefill speed, after the feasible
        ones ahead) is refused if it has not started (``on_unattainable: reject``: the client hears at once, and the
        queue stays bounded under overload), else becomes best effort: served after every protected prompt, so one
        late prompt does not make the ones behind it late too."""
        feasible, queued = self.ttft_feasible(now)
        reject = self.config.on_unattainable == "reject"
        for r, ok in zip(queued, feasible):
            if ok or r.num_output_tokens or r.best_effort:
                continue
            if reject and r.status is RequestStatus.WAITING and r.num_computed_tokens == 0:
                self.finish(r, "slo_unattainable")
                plan.refused.append(r)
            else:
                r.best_effort = True

    def _order_waiting(self) -> None:
        if self.config.ttft_admission:
            self.waiting = deque(_service_order(list(self.waiting)))

    def ttft_feasible(self, now: float, extra: Request | None = None,
                      headroom: float = 0.0) -> tuple[np.ndarray, list[Request]]:
        """Which queued prompts (``extra``, a newcomer, in its EDF place, judged against ``1 - headroom`` of its TTFT
        SLO) the latency model says can still get their first token by their TTFT deadline at full prefill speed,
        in service order."""
        queued = self._queued_with(extra)
        args = self._ttft_inputs(queued, now)
        if args is None:
            return np.ones(len(queued), bool), queued
        if extra is not None:
            args["deadline_s"][queued.index(extra)] = extra.arrival_time + extra.ttft_slo_ms / 1e3 * (1.0 - headroom)
        return ttft_feasible(self.model, **args), queued

    def _queued_with(self, extra: Request | None) -> list[Request]:
        """The prefill candidates in service order, with ``extra`` (a newcomer) in its EDF place among the waiting."""
        queued = self._prefill_candidates()
        if extra is None:
            return queued
        running = len(queued) - len(self.waiting)
        return queued[:running] + _service_order(queued[running:] + [extra])

    def pace_admits(self, now: float, extra: Request, queued: list[Request] | None = None) -> bool:
        """Fail fast's TPOT rule (``policies.admission.tpot_pace_admits``) where the SLO pace plan bounds prefill:
        may ``extra`` join the decoding requests and the queued prompts (each counted as decoding) without breaking a
        protected request's TPOT pace, its own included, or the TTFT floor? ``queued``: the prefill candidates with
        ``extra`` in its place, as ``ttft_feasible(now, extra=...)`` returned them (None: made here)."""
        if not self._paced([extra] + [r for r in self.running if r.is_decoding]) or not self.config.ttft_admission:
            return True
        queued = self._queued_with(extra) if queued is None else queued
        reqs = [r for r in self.running if r.is_decoding] + queued
        floor, _ = self._ttft_floor(queued, now)
        return tpot_pace_admits(
            self.model, newcomer=reqs.index(extra), tpot_slo_s=self._pace_slo_s(reqs),
            remaining_tokens=np.array([r.sampling.max_tokens - max(r.num_output_tokens, 1) for r in reqs]),
            decode_time_s=np.array([r.decode_time_s(now) for r in reqs]),
            decoded_tokens=np.array([max(r.num_output_tokens - 1, 0) for r in reqs]), prefill_floor_tokens=floor,
            **self._pace_kw(sum(r.num_computed_tokens if r.is_decoding else len(r.token_ids) for r in reqs)))

    def shed_cutoff_tokens(self, now: float, extra: Request) -> float:
        """Overload shedding (``overload_shedding``, where the SLO pace plan runs): record ``extra``'s arrival and
        return the longest prompt this replica admits now (``policies.admission.shed_cutoff_tokens``; inf: all)."""
        self.offered_prefill.observe_arrival(now, extra.num_prompt_tokens)
        return self.shed_cutoff_now(now, extra)

    def shed_cutoff_now(self, now: float, extra: Request | None = None) -> float:
        """The longest prompt admitted now, without recording an arrival (inf: no cutoff)."""
        decoding = [r for r in self.running if r.is_decoding]
        if not self.config.overload_shedding or not self._paced(decoding + ([extra] if extra else [])):
            return float("inf")
        return self.offered_prefill.cutoff_tokens(now)

    def _paced(self, reqs: list[Request]) -> bool:
        """Whether the SLO pace plan bounds prefill in a step that decodes ``reqs`` (``slo_prefill``; None: where
        one of them runs adaserve). Pricing a chunk needs the latency profile."""
        cfg = self.config
        if cfg.slo_prefill is False or self.latency_model is None:
            return False
        return cfg.slo_prefill is True or (self.speculative and any(
            self.policy_of(r).kind == "adaserve" for r in reqs))

    @staticmethod
    def _pace_slo_s(reqs: list[Request]) -> np.ndarray:
        """[R] the TPOT SLO the pace plan protects each request by (``policies.admission.pace_tpot_slo_s``)."""
        return pace_tpot_slo_s(
            np.array([r.tpot_slo_ms / 1e3 if r.tpot_slo_ms else np.inf for r in reqs]),
            np.array([np.nan if r.first_token_time is None else r.first_token_time for r in reqs]),
            np.array([r.ttft_deadline for r in reqs]), np.array([r.best_effort for r in reqs]))

    def gain_stats(self) -> tuple[float, float]:
        """(mean, sd) of the tokens a speculating request gains per step, as every plan and price here takes them:
        the measurement so far shrunk toward the configured prior (``policies.budget.gain_per_step``). The exported
        ``accepted_tokens_per_step`` stays the measurement alone."""
        t, cfg = self.totals, self.config
        return gain_per_step(t.tree_requests, t.accepted, t.tree_gain_sq,
                             prior_tokens_per_step=cfg.gain_prior_tokens_per_step, prior_steps=cfg.gain_prior_steps)

    def _pace_kw(self, context_tokens: float) -> dict:
        """The pace plan's inputs besides the requests: the gain per step (``gain_stats``) and the step's limits."""
        gain, gain_sd = self.gain_stats()
        limit = self.config.max_num_batched_tokens
        return dict(context_tokens=context_tokens, acceptance_rate=(gain - 1.0) / gain, tokens_per_step=gain,
                    tokens_per_step_sd=gain_sd,
                    max_nodes_per_request=self.max_tree_nodes if self.speculative else 0,
                    max_tokens=limit, max_prefill_tokens=limit, overhead_s=self.step_overhead_ema_s,
                    confidence_z=self.config.slo_prefill_confidence_z)

    def _ttft_floor(self, queued: list[Request], now: float) -> tuple[int, np.ndarray]:
        args = self._ttft_inputs(queued, now)
        if args is None:
            return 0, np.ones(len(queued), bool)
        return ttft_prefill_floor(self.model, **args)

    def _ttft_inputs(self, queued: list[Request], now: float) -> dict | None:
        """The service model's inputs for ``policies.admission`` (None: TTFT scheduling is off or has no profile)."""
        if self.latency_model is None or not queued or not self.config.ttft_admission:
            return None
        decoding = [r for r in self.running if r.is_decoding]
        context = sum(r.num_computed_tokens for r in decoding)
        waiting = [r for r in queued if r.status is RequestStatus.WAITING]
        finish = running_finish_times_s(
            now, np.array([r.sampling.max_tokens - r.num_output_tokens for r in self.running]),
            self.gain_stats()[0] if self.speculative else 1.0,
            self.step_ema_s or self.predicted_step_s(len(decoding), context))
        ready = np.full(len(queued), now)
        ready[len(queued) - len(waiting):] = slot_ready_times_s(
            now, finish, self.config.max_num_seqs - len(self.running), len(waiting))
        # no deadline for best-effort prompts, nor for preempted ones (their first token is out): both still count
        # where they are served
        deadline = np.array([np.inf if r.best_effort or r.num_output_tokens else r.ttft_deadline for r in queued])
        return dict(now_s=now, deadline_s=deadline, remaining_tokens=np.array([self._remaining(r) for r in queued]),
                    num_roots=len(decoding), context_tokens=context,
                    max_prefill_tokens=max(self.config.max_num_batched_tokens - len(decoding), 1),
                    overhead_s=self.step_overhead_ema_s, ready_s=ready)

    def queue_drain_s(self, now: float) -> float:
        """Seconds until every queued prompt is prefilled at full speed: when a refused client may retry."""
        queued = self._prefill_candidates()
        if self.latency_model is None or not queued:
            return 0.0
        limit = max(self.config.max_num_batched_tokens - sum(r.is_decoding for r in self.running), 1)
        steps = -(-sum(self._remaining(r) for r in queued) // limit)
        return steps * (self.predicted_step_s(self.config.max_num_batched_tokens, 0) + self.step_overhead_ema_s)

    def _allocate(self, candidates: list[Request], num_running_prefills: int, tokens: tuple[int, ...],
                  plan: StepPlan) -> int | None:
        """Give each chunk its KV blocks; returns the index of a waiting candidate that does not fit, else None
        (a running prefill that does not fit preempts newer requests, and the caller plans again without them)."""
        for i, (req, n) in enumerate(zip(candidates, tokens)):
            if n == 0:
                continue
            if i < num_running_prefills:
                before = len(plan.preempted)
                self._grow(req, req.num_computed_tokens + n, plan)
                if len(plan.preempted) > before:
                    return None
            elif not self._admit(req, n):
                return i
        return None

    def _admit(self, req: Request, n: int) -> bool:
        """KV for a waiting request's first chunk of n tokens: its cached prefix (which the chunk follows), then
        blocks for the chunk; False, holding nothing, if they ran out."""
        if not req.block_ids:
            self.kv.acquire_prefix(req)  # sets num_computed_tokens to the cached length
        if self.kv.ensure_capacity(req.block_ids, req.num_computed_tokens + n, write_from=req.num_computed_tokens):
            return True
        self.kv.release_request(req)
        req.num_computed_tokens = 0
        return False

    def prefill_cap(self, decodes: list[Request], now: float) -> tuple[int | None, int]:
        """(prefill tokens, reserved SLO nodes) the decoding requests' TPOT SLO pace leaves this step
        (``policies.budget.slo_step_plan``); (None, 0) where prefill is not bounded. The bound never goes below the
        prefill the queued prompts' TTFT deadlines need (``policies.admission.ttft_prefill_floor``): deadlines
        that can still be met come first, the TPOT pace takes what is left. A prompt queued for
        ``max_prefill_wait_s`` lifts the bound. ``slo_prefill=None`` bounds only steps where a decoding request runs
        adaserve; pricing a chunk needs the latency profile."""
        cfg = self.config
        if not self._paced(decodes):
            return None, 0
        queued = self._prefill_candidates()
        if cfg.max_prefill_wait_s is not None and any(now - r.arrival_time >= cfg.max_prefill_wait_s for r in queued):
            return cfg.max_num_batched_tokens, 0
        ttft_floor, _ = self._ttft_floor(queued, now)
        prefill, nodes = slo_step_plan(
            self.model, root_tokens=len(decodes), decode_time_s=np.array([r.decode_time_s(now) for r in decodes]),
            decoded_tokens=np.array([max(r.num_output_tokens - 1, 0) for r in decodes]),
            tpot_slo_s=self._pace_slo_s(decodes),
            remaining_tokens=np.array([r.sampling.max_tokens - r.num_output_tokens for r in decodes]),
            **self._pace_kw(sum(r.num_computed_tokens for r in decodes)))
        return max(prefill, ttft_floor), nodes

    def _price(self, plan: StepPlan) -> None:
        """The step's predicted time (A(r)'s t_step) and, with a latency profile, what a draft node costs."""
        roots, prefill = len(plan.decodes), plan.num_prefill_tokens
        context = sum(c.request.num_computed_tokens for c in plan.decodes)
        plan.predicted_step_s = self.predicted_step_s(roots + prefill + plan.node_budget, context)
        if self.latency_model is None:
            return
        expected = roots * self.gain_stats()[0]
        plan.pricing = NodePricing(
            latency_model=self.model, base_tokens=roots + prefill, context_tokens=context, num_roots=roots,
            min_path_prob=min_worthwhile_path_prob(self.model, roots + prefill, context, expected),
            tokens_per_s=expected / max(plan.predicted_step_s, 1e-6))

    def predicted_step_s(self, num_tokens: int, context_tokens: int) -> float:
        if self.latency_model is not None:
            return float(self.model.predict(num_tokens, context_tokens))
        return self.step_ema_s or 0.05

    def _grow(self, req: Request, num_tokens: int, plan: StepPlan) -> bool:
        """Make req's blocks hold num_tokens, preempting newer requests; False if req itself was preempted."""
        while not self.kv.ensure_capacity(req.block_ids, num_tokens, write_from=req.num_computed_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            plan.preempted.append(victim)
            for chunks in (plan.decodes, plan.prefills):
                chunks[:] = [c for c in chunks if c.request is not victim]
            if victim is req:
                return False
        return True

    # ---- after the step -------------------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Advance each request's computed tokens by what the step verified, and the statistics the next plans
        are priced with."""
        trees = {t.request_id: t for t in result.trees}
        for c in plan.chunks:
            tree = trees.get(c.request.request_id)
            if tree is None:
                c.request.num_computed_tokens += c.num_tokens
            else:
                c.request.num_computed_tokens += len(tree.path)
                c.request.num_spec_steps += 1
                c.request.num_accepted_draft_tokens += tree.num_accepted
            if c.request.status is RequestStatus.RUNNING:
                self.kv.cache_full_blocks(c.request)  # full blocks of computed tokens join the prefix cache
        self._calibrate(plan, result)
        if plan.prompts_left_waiting:  # overload shedding's capacity: what a saturated step prefills per second
            self.offered_prefill.observe_saturated_step(plan.num_prefill_tokens, result.step_s)
        self.totals.add(plan, result)
        ema = self.step_ema_s
        self.step_ema_s = result.step_s if ema is None else 0.8 * ema + 0.2 * result.step_s
        if result.num_decodes:
            self.step_overhead_ema_s = (0.9 * self.step_overhead_ema_s
                                        + 0.1 * max(result.step_s - result.verify_s, 0.0))

    def _calibrate(self, plan: StepPlan, result: StepResult) -> None:
        """Move ``latency_scale`` toward this step's measured / profiled target time (an EMA of its log, each step
        clipped to [1/4, 4] so that one stalled step cannot swing it): tracked whether or not it is priced in, the
        replica exports it as the profile's error. With ``calibrate_latency`` also move the per-knot scales the plans
        are priced with (``policies.latency_model.update_knot_log_scales``) by this step's error against the
        rescaled profile, same weight and clip. Called before ``update`` advances the requests: the context is what
        the step read."""
        base = self.latency_model
        if base is None or result.num_tokens <= 0 or result.verify_s <= 0:
            return
        context = sum(c.request.num_computed_tokens for c in plan.decodes)
        predicted = float(base.predict(result.num_tokens, context))
        if predicted <= 0:
            return
        ratio = min(max(result.verify_s / predicted, 0.25), 4.0)
        self.latency_scale = float(np.exp((1 - LATENCY_EMA) * np.log(self.latency_scale) + LATENCY_EMA * np.log(ratio)))
        if not self.config.calibrate_latency:
            return
        logs = self._knot_log_scales(base)
        if logs is None:  # the first step priced with this profile: its scales start at 1
            logs, rescaled = np.zeros(len(base.tokens.knots)), predicted
        else:
            rescaled = float(self.model.predict(result.num_tokens, context))
        error = min(max(result.verify_s / rescaled, 0.25), 4.0)
        self.knot_log_scales = update_knot_log_scales(logs, base.tokens.knots, result.num_tokens,
                                                      float(np.log(error)), LATENCY_EMA)
        self._scaled = None

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.release_request(req)  # its registered blocks stay cached: re-admission maps them again
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        # A request that finished by the step that just ran (not aborted between steps) holds the K/V of every token
        # but the last sampled one, though update() has not counted them yet: its full blocks join the cache now.
        # (aborted or refused between steps, or failed: only what was computed)
        self.kv.cache_full_blocks(req, req.num_computed_tokens if reason in ("abort", "slo_unattainable", "error")
                                  else len(req.token_ids) - 1)
        self.kv.release_request(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def spare_token_budget(self, now: float) -> int:
        """Node budget left after every running request's SLO need (the router's signal for tight requests).

        Need per request: its root token plus the draft nodes a chain with the measured per-token acceptance
        needs to reach A(r) this step (policies.budget.required_nodes).
        """
        decoding = [r for r in self.running if r.first_token_time is not None]
        expected = self.gain_stats()[0] - 1.0
        need = np.zeros(0, dtype=np.int64)
        if decoding and self.speculative:
            slo = SLOState(
                decode_time_s=np.array([r.decode_time_s(now) for r in decoding]),
                decoded_tokens=np.array([r.num_output_tokens - 1 for r in decoding]),
                tpot_slo_s=np.array([r.tpot_slo_ms / 1e3 if r.tpot_slo_ms else np.inf for r in decoding]))
            a = required_acceptance(slo, self.step_ema_s or 0.05, self.config.max_draft_depth)
            need = required_nodes(a, expected / (1.0 + expected), self.config.max_tree_nodes)
        return spare_budget(self.token_budget - len(self.running), need)


def _service_order(reqs: list[Request]) -> list[Request]:
    """Earliest TTFT deadline first (``policies.admission.deadline_order``); a preempted request, whose first token
    is out already, goes first; best-effort requests last."""
    if len(reqs) < 2:
        return reqs
    deadline = np.array([-np.inf if r.num_output_tokens else r.ttft_deadline for r in reqs])
    order = deadline_order(deadline, np.array([r.arrival_time for r in reqs]), np.array([r.best_effort for r in reqs]))
    return [reqs[i] for i in order]
