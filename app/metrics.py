"""Prometheus metrics served by the ingress at /metrics.

Request-level figures (tokens, TTFT/TPOT, SLO attainment and goodput per class) are counted by the ingress
from the streams it relays, so they are exact. Replica state (KV usage, queue length, accepted tokens per step,
spare budget, prefix cache hits) comes from the replicas' latest routing stats, read at scrape time by a custom collector, so a
replica that goes away stops being reported instead of leaving a stale gauge behind.

Goodput follows the paper: tokens of requests that attained their SLO (``adaserve_goodput_tokens_total``;
per second = ``rate()``). vLLM's request goodput is ``adaserve_slo_requests_total{attained="true"}``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0,
                     10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric suffix, stats key, help text) for the per-replica gauges
_REPLICA_GAUGES = (
    ("kv_free_blocks", "kv_free_blocks", "Free KV-cache blocks on the replica"),
    ("kv_total_blocks", "kv_total_blocks", "KV-cache blocks on the replica"),
    ("running_requests", "running_requests", "Requests decoding or prefilling on the replica"),
    ("queue_length", "queue_len", "Requests accepted by the replica but not yet running"),
    ("spare_token_budget", "spare_token_budget", "Step tokens left after the running requests' SLO needs"),
    ("load_ratio", "load", "Share of the replica in use: SLO step budget or sequence slots (the autoscaler's signal)"),
    ("accepted_tokens_per_step", "accepted_tokens_per_step", "Tokens a request gains per engine step (EWMA)"),
    ("measured_tpot_seconds", "measured_tpot_s", "Recent mean TPOT measured on the replica"),
    ("unloaded_tpot_seconds", "unloaded_tpot_s", "TPOT of one request on the idle replica (SLO baseline)"),
    ("prefill_held_steps", "prefill_held_steps", "Engine steps whose prompts waited for the running TPOT SLOs"),
    ("latency_scale", "latency_scale",
     "Measured / profiled target step time over recent steps (calibrate_latency prices it in, per step size)"),
    ("prefill_capacity_tokens_per_second", "prefill_capacity_tok_s",
     "Prompt tokens per second prefilled by steps that left prompts waiting (EMA): overload shedding's capacity"),
    ("shed_cutoff_tokens", "shed_cutoff_tokens",
     "Longest prompt the replica admits now under overload shedding (absent: no cutoff)"),
    ("prefix_cache_hit_ratio", "prefix_cache_hit_rate",
     "Admitted prompt tokens whose KV the prefix cache supplied / all admitted prompt tokens, since start"),
    ("prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens the prefix cache supplied, since start"),
    ("prefix_cache_blocks", "prefix_cache_blocks", "KV blocks registered in the prefix cache (in use or evictable)"),
    ("prefix_cache_evictions", "prefix_cache_evictions", "Cached KV blocks reused for other tokens, since start"),
    ("step_errors", "step_errors", "Engine steps that raised on the replica (their requests failed), since start"),
    ("loop_errors", "loop_errors", "Engine-loop failures outside a step (commands, stats), since start"),
    ("rss_bytes", "rss_bytes", "Resident memory of the replica process"),
    ("healthy", "healthy", "1 while the replica passes its own health check (no stalled step, no error streak)"),
)


class StatsSource(Protocol):
    def snapshot(self) -> dict[str, dict[str, Any]]: ...


_STATS_SOURCES: "weakref.WeakSet[StatsSource]" = weakref.WeakSet()


def register_stats_source(source: StatsSource) -> None:
    """Routers register here; held weakly, so a dropped handle's router disappears with it."""
    _STATS_SOURCES.add(source)


def latest_replica_stats() -> dict[str, dict[str, Any]]:
    """Latest stats of every replica known to any registered router in this process (freshest wins)."""
    merged: dict[str, dict[str, Any]] = {}
    for source in list(_STATS_SOURCES):
        for rid, stats in source.snapshot().items():
            if not stats.get("recorded_at"):
                continue  # not polled yet
            if rid not in merged or stats["recorded_at"] >= merged[rid]["recorded_at"]:
                merged[rid] = stats
    return merged


class ReplicaStatsCollector(Collector):
    """Yields per-replica gauges from whatever ``source()`` returns at scrape time."""

    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]]):
        self.source = source
        self.seen_replicas: set[str] = set()  # every replica that has reported: starts, restarts and scale-ups

    def collect(self) -> Iterable[GaugeMetricFamily]:
        stats = self.source()
        self.seen_replicas.update(stats)
        starts = CounterMetricFamily("adaserve_replica_starts", "Replicas that have reported since the ingress "
                                     "started (a restart or a scale-up adds one)")
        starts.add_metric([], float(len(self.seen_replicas)))
        yield starts
        reporting = GaugeMetricFamily("adaserve_replicas_reporting", "Replicas whose routing stats are current")
        reporting.add_metric([], float(len(stats)))
        yield reporting
        for suffix, key, help_text in _REPLICA_GAUGES:
            family = GaugeMetricFamily(f"adaserve_replica_{suffix}", help_text, labels=["replica"])
            for replica, s in sorted(stats.items()):
                if s.get(key) is not None:
                    family.add_metric([replica], float(s[key]))
            yield family
        usage = GaugeMetricFamily("adaserve_replica_kv_usage_ratio", "Used / total KV blocks", labels=["replica"])
        for replica, s in sorted(stats.items()):
            if s.get("kv_total_blocks"):
                usage.add_metric([replica], 1.0 - float(s.get("kv_free_blocks", 0)) / float(s["kv_total_blocks"]))
        yield usage
        for suffix, key, help_text in (
                ("accepted_tokens_per_step_by_source", "accepted_per_step_by_source",
                 "Draft tokens accepted per verified tree, by draft source"),
                ("draft_calibration_ece", "calibration_ece_by_source",
                 "Expected calibration error of predicted f vs observed acceptance, by draft source")):
            family = GaugeMetricFamily(f"adaserve_replica_{suffix}", help_text, labels=["replica", "source"])
            for replica, st in sorted(stats.items()):
                for source, value in sorted((st.get(key) or {}).items()):
                    if isinstance(value, (int, float)):
                        family.add_metric([replica, source], float(value))
            yield family


class ScalingDecisionCollector(Collector):
    """The autoscaler's last decision per deployment (app.autoscaling publishes it), read at scrape time."""

    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]]):
        self.source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        decisions = self.source()
        for suffix, key, help_text in (
                ("running_replicas", "running_replicas", "Replicas running when the autoscaler last decided"),
                ("target_replicas", "target_replicas", "Replica count Serve is moving to (after its delays)"),
                ("desired_replicas", "desired_replicas", "Replica count the SLO-headroom policy asks for"),
                ("decided_at_seconds", "decided_at", "Unix time of the autoscaler's last published decision")):
            family = GaugeMetricFamily(f"adaserve_autoscaling_{suffix}", help_text, labels=["deployment"])
            for deployment, d in sorted(decisions.items()):
                family.add_metric([deployment], float(d[key]))
            yield family
        reason = GaugeMetricFamily("adaserve_autoscaling_reason", "1 for the reason of the autoscaler's last decision",
                                   labels=["deployment", "reason"])
        for deployment, d in sorted(decisions.items()):
            reason.add_metric([deployment, str(d["reason"])], 1.0)
        yield reason


class ServeMetrics:
    """All ingress metrics on a private registry (several apps in one process must not collide)."""

    def __init__(self, replica_stats: Callable[[], dict[str, dict[str, Any]]] = latest_replica_stats):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adaserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("adaserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("adaserve_generation_tokens", "Tokens generated", registry=r)
        self.in_flight = Gauge("adaserve_ingress_in_flight_requests", "Requests the ingress is relaying", registry=r)
        self.ttft = Histogram("adaserve_ttft_seconds", "Time to first token", ["slo_class"],
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("adaserve_tpot_seconds", "Mean time per output token over the decode phase",
                              ["slo_class"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.slo_requests = Counter("adaserve_slo_requests",
                                    "Requests with an SLO, by outcome (attained: true | false | rejected)",
                                    ["slo_class", "attained"], registry=r)
        self.slo_rejections = Counter("adaserve_slo_rejections",
                                      "Requests refused because no replica could meet their SLOs (429), by the rule "
                                      "that refused them (reason: overloaded | ttft | tpot_pace | ttft_late)",
                                      ["slo_class", "reason"], registry=r)
        self.slo_attainment = Gauge("adaserve_slo_attainment_ratio", "Attained / finished requests with an SLO",
                                    ["slo_class"], registry=r)
        self.goodput_tokens = Counter("adaserve_goodput_tokens", "Tokens of requests that attained their SLO",
                                      ["slo_class"], registry=r)
        self.aborted = Counter("adaserve_aborted_requests", "Requests cancelled before finishing (client gone)",
                               registry=r)
        r.register(ReplicaStatsCollector(replica_stats))
        self.scaling_decisions: dict[str, dict[str, Any]] = {}  # set by the ingress before each render
        r.register(ScalingDecisionCollector(lambda: self.scaling_decisions))
        self._slo_counts: dict[str, list[int]] = {}  # class -> [attained, finished]

    def observe_rejected(self, slo_class: str, reason: str | None) -> None:
        """A request refused because its SLOs were unattainable here (``reason``: the rule that refused it, from the
        replica's error; "unknown" if it named none): a miss for its class's attainment."""
        self.slo_rejections.labels(slo_class, reason or "unknown").inc()
        self.slo_requests.labels(slo_class, "rejected").inc()
        counts = self._slo_counts.setdefault(slo_class, [0, 0])
        counts[1] += 1
        self.slo_attainment.labels(slo_class).set(counts[0] / counts[1])

    def observe_finished(self, slo_class: str, metrics: dict[str, Any] | None) -> None:
        """Record one finished request from the replica's final metrics (RequestMetrics as a dict)."""
        if not metrics:
            return
        self.prompt_tokens.inc(metrics.get("num_prompt_tokens") or 0)
        num_out = metrics.get("num_output_tokens") or 0
        if metrics.get("ttft_s") is not None:
            self.ttft.labels(slo_class).observe(metrics["ttft_s"])
        if metrics.get("tpot_s") is not None:
            self.tpot.labels(slo_class).observe(metrics["tpot_s"])
        attained = metrics.get("slo_attained")
        if attained is None:
            return
        self.slo_requests.labels(slo_class, "true" if attained else "false").inc()
        counts = self._slo_counts.setdefault(slo_class, [0, 0])
        counts[0] += int(attained)
        counts[1] += 1
        self.slo_attainment.labels(slo_class).set(counts[0] / counts[1])
        if attained:
            self.goodput_tokens.labels(slo_class).inc(num_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)
