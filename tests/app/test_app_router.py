"""The Serve router adapter: stats and the request's SLO in, a full ranking out (no Ray cluster needed)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from app.router import SLORequestRouter, request_prefix_hashes, request_tpot_slo_ms
from policies.routing import prefix_chunk_hashes, routing_text


def _replica(rid: str, **stats) -> SimpleNamespace:
    stats.setdefault("recorded_at", time.time())
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats=stats)


def _router() -> SLORequestRouter:
    router = SLORequestRouter.__new__(SLORequestRouter)  # skip Serve's wiring; only the policy is under test
    router.initialize_state(tight_tpot_x_baseline=2.0, seed=0)
    return router


def _pending(tpot_slo_ms: float | None) -> SimpleNamespace:
    return SimpleNamespace(kwargs={} if tpot_slo_ms is None else {"tpot_slo_ms": tpot_slo_ms},
                           metadata=SimpleNamespace(internal_request_id="r1"))


def _choose(router, replicas, tpot_slo_ms):
    ranking = asyncio.run(router.choose_replicas(replicas, _pending(tpot_slo_ms)))
    return [[r.replica_id.unique_id for r in group] for group in ranking]


LOADED = dict(spare_token_budget=10, running_requests=1, queue_len=0, unloaded_tpot_s=0.05)
IDLE = dict(spare_token_budget=400, running_requests=3, queue_len=0, unloaded_tpot_s=0.05)


def test_tight_request_goes_to_most_spare_budget() -> None:
    router = _router()
    replicas = [_replica("low_spare", **LOADED), _replica("high_spare", **IDLE)]
    for _ in range(20):
        assert _choose(router, replicas, tpot_slo_ms=60.0)[0] == ["high_spare"]  # 60 ms < 2 x 50 ms: tight
    assert router.num_tight_routed == 20


def test_loose_request_uses_power_of_two_on_load() -> None:
    router = _router()
    replicas = [_replica("low_spare", **LOADED), _replica("high_spare", **IDLE)]
    for slo in (None, 500.0):
        ranking = _choose(router, replicas, tpot_slo_ms=slo)
        assert ranking[0] == ["low_spare"] and sorted(sum(ranking, [])) == ["high_spare", "low_spare"]
    assert router.num_tight_routed == 0


def test_stale_or_missing_stats_fall_back_to_in_flight_counts() -> None:
    router = _router()
    stale = dict(LOADED, recorded_at=time.time() - 60)
    replicas = [_replica("a", **stale), _replica("b")]
    router.on_request_routed(_pending(None), SimpleNamespace(unique_id="a"), None)
    assert _choose(router, replicas, tpot_slo_ms=None)[0] == ["b"]
    router.on_request_completed(SimpleNamespace(unique_id="a"), "r1")
    assert router.in_flight["a"] == 0


def test_unhealthy_replica_is_ranked_last() -> None:
    router = _router()
    replicas = [_replica("sick", **dict(IDLE, spare_token_budget=10_000, healthy=False)), _replica("ok", **LOADED)]
    assert _choose(router, replicas, tpot_slo_ms=60.0) == [["ok"], ["sick"]]


def test_slo_kwarg_is_read_defensively() -> None:
    assert request_tpot_slo_ms(None) is None
    assert request_tpot_slo_ms(SimpleNamespace(kwargs={"tpot_slo_ms": "40"})) == 40.0
    assert request_tpot_slo_ms(SimpleNamespace(kwargs={"tpot_slo_ms": "fast"})) is None


def test_loose_request_goes_to_the_replica_holding_its_prompt_prefix() -> None:
    """The router hashes the payload's text (the ingress does not tokenize) and matches the replicas' summaries."""
    router = _router()
    messages = [{"role": "system", "content": "Answer like a pirate. " * 60}, {"role": "user", "content": "Hi"}]
    payload = {"request_id": "x", "messages": messages, "sampling": {}}
    held = prefix_chunk_hashes(routing_text({"messages": messages[:1]}))
    assert held and request_prefix_hashes(SimpleNamespace(args=[payload]))[:len(held)] == held
    replicas = [_replica("idle", **dict(IDLE, running_requests=0)),  # power of two alone would pick this one
                _replica("warm", **dict(LOADED, running_requests=5, prefix_hashes=held))]
    pending = SimpleNamespace(args=[payload], kwargs={}, metadata=SimpleNamespace(internal_request_id="r2"))
    for _ in range(10):
        ranking = asyncio.run(router.choose_replicas(replicas, pending))
        assert ranking[0][0].replica_id.unique_id == "warm"
    assert request_prefix_hashes(None) == [] and request_prefix_hashes(SimpleNamespace(args=["text"])) == []
