"""The Serve glue of the SLO-headroom autoscaler (app.autoscaling), with Serve's own context and sample types."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from app.autoscaling import (ATTAINED_PREFIX, FINISHED_PREFIX, LOAD, REJECTIONS, WAITING, PrefillRate,
                             SLOHeadroomPolicy, autoscaling_stats, engine_steady_load, peak_of_sum, replica_window)
from app.metrics import ServeMetrics
from policies.autoscaling import ReplicaWindow

DEPLOYMENT = DeploymentID(name="LLMReplica", app_name="adaserve")


def _series(*values: float, t0: float = 100.0) -> list[TimeStampedValue]:
    return [TimeStampedValue(t0 + i, v) for i, v in enumerate(values)]


def _context(raw: dict, running: list[ReplicaID], target: int | None = None, max_replicas: int = 3):
    config = AutoscalingConfig(min_replicas=1, max_replicas=max_replicas)
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name="LLMReplica", app_name="adaserve",
        current_num_replicas=len(running), target_num_replicas=target or len(running), running_replicas=running,
        total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics={}, raw_metrics=raw,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=max_replicas, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config)


def test_stats_are_flat_numbers_serve_accepts() -> None:
    state = {"load": 0.5, "queue_len": 2, "slo_rejections": 1, "slo_outcomes": {"chat": (3, 4)}}
    stats = autoscaling_stats(state)
    assert stats == {LOAD: 0.5, WAITING: 2.0, REJECTIONS: 1.0, FINISHED_PREFIX + "chat": 4.0,
                     ATTAINED_PREFIX + "chat": 3.0}
    assert all(isinstance(v, float) for v in stats.values())


def test_prefill_rate_counts_the_window_only() -> None:
    rate = PrefillRate(window_s=5.0)
    rate.observe(SimpleNamespace(num_prefill_tokens=100), None)
    rate.observe(SimpleNamespace(num_prefill_tokens=0), None)
    assert rate.tokens_per_s() == pytest.approx(20.0)
    assert rate.tokens_per_s(now=time.monotonic() + 6.0) == 0.0


def test_engine_steady_load_reads_the_scheduler() -> None:
    running = [SimpleNamespace(tpot_slo_ms=60.0, num_computed_tokens=100) for _ in range(10)]
    sched = SimpleNamespace(running=running, waiting=[], step_overhead_ema_s=0.0, token_budget=40,
                            gain_stats=lambda: (1.0, 0.0),
                            predicted_step_s=lambda tokens, context: 0.010 + 0.001 * tokens)
    engine = SimpleNamespace(scheduler=sched, config=SimpleNamespace(max_tree_nodes=32, max_draft_depth=8))
    # a full-budget step (40 tokens) takes 50 ms, under the 60 ms SLO: a root token each -> 10 / 40
    assert engine_steady_load(engine) == pytest.approx(0.25)
    # at a 20 ms SLO a request needs 2.5 tokens a step, which no draft gives here (acceptance 0): max_nodes + 1 each
    for r in running:
        r.tpot_slo_ms = 20.0
    assert engine_steady_load(engine) == pytest.approx(10 * 33 / 40)


def test_window_takes_mean_peak_and_counter_increases() -> None:
    window = replica_window({LOAD: _series(0.2, 0.9, 0.4), WAITING: _series(0, 3, 0),
                             REJECTIONS: _series(5, 5, 7), FINISHED_PREFIX + "chat": _series(10, 14, 20),
                             ATTAINED_PREFIX + "chat": _series(10, 12, 15), FINISHED_PREFIX + "coding": _series(2, 2)})
    assert window == ReplicaWindow(load_mean=0.5, load_peak=0.9, waiting_mean=1.0, slo_rejections=2,
                                   attainment={"chat": (5, 10)})
    # a restarted replica's counter starts again from 0; samples arrive unordered
    restarted = replica_window({LOAD: list(reversed(_series(0.1, 0.1))), REJECTIONS: _series(9, 1)})
    assert restarted.slo_rejections == 1
    assert replica_window({WAITING: _series(1)}) is None


def test_peak_of_sum_aligns_replicas_in_time() -> None:
    a = _series(0.5, 0.0, 0.0, t0=0.0)   # t = 0, 1, 2
    b = _series(0.0, 0.5, 0.0, t0=0.5)   # t = 0.5, 1.5, 2.5
    assert peak_of_sum([a, b]) == 0.5    # sum of peaks would say 1.0
    assert peak_of_sum([_series(0.2, 0.6, t0=0.0), _series(0.3, t0=0.0)]) == pytest.approx(0.9)


def test_policy_reads_serve_context_and_keeps_state_free() -> None:
    a, b = (ReplicaID(unique_id=u, deployment_id=DEPLOYMENT) for u in ("a", "b"))
    policy = SLOHeadroomPolicy(publish_decisions=False, scale_up_headroom=0.2, target_headroom=0.3,
                               scale_down_headroom=0.45)
    full = {LOAD: {a: _series(0.95, 0.9)}}
    assert policy(_context(full, [a])) == (2, {"reason": "headroom_low"})
    # b just started and has not reported: it counts as idle capacity, no second scale-up, no scale-down
    assert policy(_context(full, [a, b])) == (2, {"reason": "hold"})
    idle = {LOAD: {a: _series(0.1, 0.05), b: _series(0.0, 0.0)}}
    assert policy(_context(idle, [a, b])) == (1, {"reason": "fits_fewer"})
    # the bounds come from autoscaling_config
    assert policy(_context({LOAD: {a: _series(1.0)}}, [a], max_replicas=1))[0] == 1


def test_policy_rejects_unknown_or_bound_kwargs() -> None:
    with pytest.raises(ValueError, match="scale_up_hedroom"):
        SLOHeadroomPolicy(scale_up_hedroom=0.1)
    with pytest.raises(ValueError, match="max_replicas"):
        SLOHeadroomPolicy(max_replicas=4)


def test_decision_appears_in_metrics() -> None:
    metrics = ServeMetrics(lambda: {})
    metrics.scaling_decisions = {"LLMReplica": {"running_replicas": 1, "target_replicas": 2, "desired_replicas": 2,
                                                "reason": "headroom_low", "message": "...", "decided_at": 5.0}}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(metrics.render().decode()) for s in fam.samples}
    assert samples[("adaserve_autoscaling_running_replicas", (("deployment", "LLMReplica"),))] == 1
    assert samples[("adaserve_autoscaling_desired_replicas", (("deployment", "LLMReplica"),))] == 2
    assert samples[("adaserve_autoscaling_reason", (("deployment", "LLMReplica"), ("reason", "headroom_low")))] == 1
