"""Ray Serve's own autoscaler, driven by the replicas' SLO headroom (policies.autoscaling).

Ray Serve 2.60 supports both halves this needs, so nothing here runs a control loop of its own:

- custom metrics: each ``LLMReplica`` defines ``record_autoscaling_stats()``; Serve samples it every
  ``min(look_back_period_s * 0.2, metrics_interval_s)`` seconds and pushes the look-back window's samples to the
  controller every ``metrics_interval_s`` (``autoscaling_stats`` builds the flat number dict it must return);
- a custom policy: ``autoscaling_config.policy: {policy_function: "app.autoscaling:SLOHeadroomPolicy",
  policy_kwargs: {...}}``. Serve instantiates the class once with ``policy_kwargs`` and calls it every control
  loop tick in the controller with an ``AutoscalingContext``; its ``raw_metrics`` hold each running replica's
  samples over the window. Serve then applies ``upscale_delay_s`` / ``downscale_delay_s`` and the replica bounds.

Removal is Serve's graceful shutdown: the replica leaves the routers' set, Serve waits (polling every
``graceful_shutdown_wait_loop_s``) until its ongoing requests -- our streams -- are done, for at most
``graceful_shutdown_timeout_s``, and only then calls ``LLMReplica.__del__``; so that timeout must exceed the
longest stream (max_tokens x TPOT).

The controller is a separate process, so the last decision (running, target and desired replica counts and its
reason) is published to a small named actor, ``ScalingBoard``, that the ingress reads when /metrics is scraped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from typing import Any, Iterable, Mapping

from policies.autoscaling import ReplicaWindow, ScalingConfig, ScalingDecision, decide_replicas, steady_slo_load

logger = logging.getLogger("ray.serve")

BOARD_NAME = "adaserve-autoscaling-board"
BOARD_NAMESPACE = "adaserve"
REPUBLISH_S = 5.0  # the board gets the decision again this often even when unchanged (a restarted board refills)

# custom metric names (Serve wants a flat str -> number dict)
LOAD = "load"
WAITING = "waiting_requests"
REJECTIONS = "slo_rejections_total"
FINISHED_PREFIX = "slo_finished_total:"  # + class name
ATTAINED_PREFIX = "slo_attained_total:"


def autoscaling_stats(state: Mapping[str, Any]) -> dict[str, float]:
    """What a replica reports to Serve's autoscaler, from ``LLMReplica.state()``: its load, queue, and cumulative
    SLO counters (the policy takes their increase over the window)."""
    stats = {LOAD: float(state["load"]), WAITING: float(state["queue_len"]),
             REJECTIONS: float(state["slo_rejections"])}
    for slo_class, (attained, finished) in (state.get("slo_outcomes") or {}).items():
        stats[FINISHED_PREFIX + slo_class] = float(finished)
        stats[ATTAINED_PREFIX + slo_class] = float(attained)
    return stats


class PrefillRate:
    """Prompt tokens an engine prefilled per second over the last ``window_s``: a step observer
    (``LLMEngine.step_observers``) called on the engine's thread."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._steps: deque[tuple[float, int]] = deque()

    def observe(self, plan: Any, result: Any) -> None:
        if plan.num_prefill_tokens:
            self._steps.append((time.monotonic(), int(plan.num_prefill_tokens)))

    def tokens_per_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()
        return sum(n for _, n in self._steps) / self.window_s


def engine_steady_load(engine: Any, prefill_tokens_per_s: float = 0.0) -> float:
    """``policies.autoscaling.steady_slo_load`` of the engine's running and waiting requests and its recent prompt
    tokens, a full-budget step predicted by its latency model (else its measured step time). Call it on the
    engine's thread."""
    sched = engine.scheduler
    running = list(sched.running)
    slo_s = [r.tpot_slo_ms / 1e3 if r.tpot_slo_ms else float("inf") for r in running]
    context = sum(r.num_computed_tokens for r in running)
    full_step_s = sched.predicted_step_s(sched.token_budget, context) + sched.step_overhead_ema_s
    tokens_per_step = sched.gain_stats()[0]
    expected = max(tokens_per_step - 1.0, 0.0)
    return steady_slo_load(slo_s, len(sched.waiting), full_step_s, expected / (1.0 + expected), sched.token_budget,
                           engine.config.max_tree_nodes, engine.config.max_draft_depth, prefill_tokens_per_s)


def replica_window(series: Mapping[str, Iterable[Any]]) -> ReplicaWindow | None:
    """One replica's window from its raw samples (metric -> [TimeStampedValue]); None before its first sample."""
    loads = _values(series.get(LOAD))
    if not loads:
        return None
    waiting = _values(series.get(WAITING))
    attainment: dict[str, tuple[int, int]] = {}
    for name in series:
        if name.startswith(FINISHED_PREFIX):
            slo_class = name[len(FINISHED_PREFIX):]
            finished = _increase(_values(series[name]))
            if finished > 0:
                attainment[slo_class] = (_increase(_values(series.get(ATTAINED_PREFIX + slo_class))), finished)
    return ReplicaWindow(load_mean=sum(loads) / len(loads), load_peak=max(loads),
                         waiting_mean=sum(waiting) / len(waiting) if waiting else 0.0,
                         slo_rejections=_increase(_values(series.get(REJECTIONS))), attainment=attainment)


def peak_of_sum(series_list: list[Iterable[Any]]) -> float:
    """Peak over time of the replicas' summed samples: at each sample time, each replica counts with its latest
    sample so far (its first one before that)."""
    series = [sorted(s, key=lambda p: p.timestamp) for s in series_list if s]
    events = sorted((p.timestamp, i, float(p.value)) for i, s in enumerate(series) for p in s)
    current = [float(s[0].value) for s in series]
    peak = sum(current)
    for _, i, value in events:
        current[i] = value
        peak = max(peak, sum(current))
    return peak


def _values(series: Iterable[Any] | None) -> list[float]:
    return [float(p.value) for p in sorted(series or (), key=lambda p: p.timestamp)]


def _increase(values: list[float]) -> int:
    """A cumulative counter's increase over the window (a restarted replica's counter starts again from 0)."""
    if not values:
        return 0
    return int(round(values[-1] - values[0])) if values[-1] >= values[0] else int(round(values[-1]))


class SLOHeadroomPolicy:
    """The class-callable custom autoscaling policy: Serve builds it once from ``policy_kwargs`` (the
    ``ScalingConfig`` thresholds; the bounds come from ``autoscaling_config``) and calls it each control tick."""

    def __init__(self, publish_decisions: bool = True, **thresholds: float):
        unknown = set(thresholds) - {f.name for f in dataclasses.fields(ScalingConfig)} | (
            set(thresholds) & {"min_replicas", "max_replicas"})
        if unknown:
            raise ValueError(f"unknown SLOHeadroomPolicy policy_kwargs {sorted(unknown)} (min/max replicas come from "
                             "autoscaling_config)")
        self.thresholds = thresholds
        ScalingConfig(**thresholds)  # fail at deploy time, not at the first tick
        self.publish_decisions = publish_decisions
        self._board: Any = None
        self._last: tuple | None = None
        self._last_published_at = 0.0

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        config = ScalingConfig(min_replicas=max(1, ctx.capacity_adjusted_min_replicas),
                               max_replicas=max(1, ctx.capacity_adjusted_max_replicas), **self.thresholds)
        raw = ctx.raw_metrics or {}
        windows, loads = [], []
        for replica_id in ctx.running_replicas:
            window = replica_window({name: per_replica[replica_id] for name, per_replica in raw.items()
                                     if replica_id in per_replica})
            if window is not None:
                windows.append(window)
                loads.append(raw[LOAD][replica_id])
        decision = decide_replicas(windows, config, current_replicas=ctx.current_num_replicas,
                                   peak_total_load=peak_of_sum(loads) if loads else None)
        self._report(ctx, decision)
        return decision.desired_replicas, {"reason": decision.reason}

    def _report(self, ctx: Any, decision: ScalingDecision) -> None:
        key = (ctx.current_num_replicas, ctx.target_num_replicas, decision.desired_replicas, decision.reason)
        now = time.time()
        if key != self._last:
            logger.info("autoscaling %s: %d running, target %d, desired %d (%s: %s)", ctx.deployment_name,
                        ctx.current_num_replicas, ctx.target_num_replicas, decision.desired_replicas,
                        decision.reason, decision.message)
        elif now - self._last_published_at < REPUBLISH_S:
            return
        self._last = key
        self._last_published_at = now
        if self.publish_decisions:
            self._publish(ctx.deployment_name, {
                "running_replicas": ctx.current_num_replicas, "target_replicas": ctx.target_num_replicas,
                "desired_replicas": decision.desired_replicas, "reason": decision.reason,
                "message": decision.message, "decided_at": now})

    def _publish(self, deployment: str, decision: dict[str, Any]) -> None:
        """Fire and forget: the controller's loop never waits on the board."""
        try:
            if self._board is None:
                import ray

                self._board = ray.remote(num_cpus=0)(ScalingBoard).options(
                    name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True).remote()
            self._board.publish.remote(deployment, decision)
        except Exception:  # the board is for visibility only; scaling goes on without it
            logger.exception("could not publish the autoscaling decision")
            self._board = None


class ScalingBoard:
    """The latest autoscaling decision per deployment (a named Ray actor; made by the policy in the controller)."""

    def __init__(self) -> None:
        self.decisions: dict[str, dict[str, Any]] = {}

    def publish(self, deployment: str, decision: dict[str, Any]) -> None:
        self.decisions[deployment] = decision

    def latest(self) -> dict[str, dict[str, Any]]:
        return self.decisions


class ScalingBoardReader:
    """The ingress side: the board's decisions at scrape time, or {} when there is no board (fixed replica count)
    or it does not answer within ``timeout_s``. A missing board is looked up again after ``retry_s``."""

    def __init__(self, timeout_s: float = 1.0, retry_s: float = 10.0):
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._board: Any = None
        self._looked_up_at = -float("inf")

    async def latest(self) -> dict[str, dict[str, Any]]:
        if self._board is None:
            if time.monotonic() - self._looked_up_at < self.retry_s:
                return {}
            self._looked_up_at = time.monotonic()
            import ray

            try:
                self._board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
            except ValueError:
                return {}
        try:
            return await asyncio.wait_for(self._board.latest.remote(), timeout=self.timeout_s)
        except Exception:
            self._board = None  # gone (controller restarted) or slow: look it up again later
            return {}
