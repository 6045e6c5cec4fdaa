"""The ingress's /metrics: per-replica gauges come from the replicas' latest routing stats."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app.metrics import ServeMetrics


def _gauges(metrics: ServeMetrics) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name.startswith("adaserve_replica_"):
                out[(s.name, s.labels.get("replica", ""))] = s.value
    return out


def test_prefix_cache_gauges_per_replica():
    stats = {"r1": {"prefix_cache_hit_rate": 0.75, "prefix_cache_hit_tokens": 300, "prefix_cache_blocks": 42,
                    "prefix_cache_evictions": 7, "prefix_hashes": [1, 2, 3], "kv_total_blocks": 100,
                    "kv_free_blocks": 90},
             "r2": {"kv_total_blocks": 100, "kv_free_blocks": 100}}  # caching off or not reported yet
    g = _gauges(ServeMetrics(lambda: stats))
    assert g[("adaserve_replica_prefix_cache_hit_ratio", "r1")] == 0.75
    assert g[("adaserve_replica_prefix_cache_hit_tokens", "r1")] == 300
    assert g[("adaserve_replica_prefix_cache_blocks", "r1")] == 42
    assert g[("adaserve_replica_prefix_cache_evictions", "r1")] == 7
    assert ("adaserve_replica_prefix_cache_blocks", "r2") not in g
    assert abs(g[("adaserve_replica_kv_usage_ratio", "r1")] - 0.1) < 1e-9


def test_latency_scale_gauge_per_replica():
    g = _gauges(ServeMetrics(lambda: {"r1": {"latency_scale": 1.32}, "r2": {}}))
    assert g[("adaserve_replica_latency_scale", "r1")] == 1.32
    assert ("adaserve_replica_latency_scale", "r2") not in g


def test_overload_shedding_gauges_per_replica():
    g = _gauges(ServeMetrics(lambda: {"r1": {"prefill_capacity_tok_s": 2100.5, "shed_cutoff_tokens": 412.0},
                                      "r2": {"prefill_capacity_tok_s": 5000.0, "shed_cutoff_tokens": None}}))
    assert g[("adaserve_replica_prefill_capacity_tokens_per_second", "r1")] == 2100.5
    assert g[("adaserve_replica_shed_cutoff_tokens", "r1")] == 412.0
    assert ("adaserve_replica_shed_cutoff_tokens", "r2") not in g  # no cutoff: every prompt length is admitted


def test_rejections_are_counted_per_class_and_reason():
    metrics = ServeMetrics(lambda: {})
    for slo_class, reason in [("coding", "overloaded"), ("coding", "overloaded"), ("coding", "tpot_pace"),
                              ("chat", "ttft_late"), ("chat", None)]:
        metrics.observe_rejected(slo_class, reason)
    counts = {tuple(sorted(s.labels.items())): s.value
              for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples
              if s.name == "adaserve_slo_rejections_total"}
    assert counts == {(("reason", "overloaded"), ("slo_class", "coding")): 2.0,
                      (("reason", "tpot_pace"), ("slo_class", "coding")): 1.0,
                      (("reason", "ttft_late"), ("slo_class", "chat")): 1.0,
                      (("reason", "unknown"), ("slo_class", "chat")): 1.0}
