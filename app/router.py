"""SLO-aware request router: Ray Serve's custom RequestRouter, deciding through policies.routing.

The router lives in every process that holds a handle to the replica deployment (here: the ingress). For each
request it reads the request's ``tpot_slo_ms`` keyword argument, the replicas' ``routing_stats`` (what
``LLMReplica.record_routing_stats`` returned at the last poll) and its own in-flight counts, and returns a
full ranking: tight-SLO requests to the replica with the most spare token budget, others to the replica whose
prefix cache holds the longest prefix of the prompt (matched on text chunks of the call's payload, since the
ingress does not tokenize; see policies.routing) unless it lacks headroom, else by power of two choices on load.
Serve sends the request to the first ranked replica that accepts it (under its
``max_ongoing_requests``), so a full replica falls through to the next.

No FIFOMixin on purpose: without it Serve hands the chosen replica to exactly the request it was chosen
for, rather than to the oldest queued request, whose SLO may differ.

The router also registers itself as a source of every replica's latest stats for the ingress's /metrics
(``app.metrics.latest_replica_stats``): it is the one place in the ingress process that hears from all
replicas. The registry lives in app.metrics, not here, because Serve ships this module to the handle's
process pickled by value, i.e. with private copies of its globals.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from app import metrics
from policies.routing import (ReplicaStats, baseline_tpot_s, is_tight, prefix_chunk_hashes, rank_replicas,
                              routing_text)


class SLORequestRouter(RequestRouter):
    def initialize_state(self, tight_tpot_x_baseline: float = 2.0, max_stats_age_s: float = 5.0,
                         seed: int | None = None, prefix_max_load_imbalance: int = 8, **_: Any) -> None:
        """Called by Serve with ``request_router_kwargs``."""
        self.tight_ratio = float(tight_tpot_x_baseline)
        self.max_stats_age_s = float(max_stats_age_s)
        self.prefix_max_load_imbalance = int(prefix_max_load_imbalance)
        self._prefix_sets: dict[str, tuple[Any, frozenset[int]]] = {}  # replica -> (recorded_at, its hashes)
        self.rng = np.random.default_rng(seed)
        self.in_flight: dict[str, int] = {}  # replica unique id -> requests routed there, not yet completed
        self.routed_to: dict[str, str] = {}  # internal request id -> replica unique id
        self.num_tight_routed = 0
        metrics.register_stats_source(self)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        now = time.time()
        stats = [self._replica_stats(r, now) for r in candidate_replicas]
        tpot_slo_ms = request_tpot_slo_ms(pending_request)
        tight = is_tight(None if tpot_slo_ms is None else tpot_slo_ms / 1e3,
                         baseline_tpot_s(stats, self.max_stats_age_s), self.tight_ratio)
        self.num_tight_routed += int(tight)
        ranking = rank_replicas(stats, tight, rng=self.rng, max_stats_age_s=self.max_stats_age_s,
                                prefix_hashes=request_prefix_hashes(pending_request),
                                max_load_imbalance=self.prefix_max_load_imbalance)
        avoid = request_avoid_replicas(pending_request)
        if avoid and len(avoid) < len(by_id):  # replicas that refused this request's TTFT SLO go last
            ranking = [[i for i in g if i not in avoid] for g in ranking] + [[i for i in by_id if i in avoid]]
            ranking = [g for g in ranking if g]
        return [[by_id[i] for i in group] for group in ranking]

    def _replica_stats(self, replica: RunningReplica, now: float) -> ReplicaStats:
        s = replica.routing_stats or {}
        rid = replica.replica_id.unique_id
        recorded_at = s.get("recorded_at")
        age = now - float(recorded_at) if recorded_at is not None else float("inf")
        spare = s.get("spare_token_budget")
        return ReplicaStats(
            replica_id=rid,
            spare_budget=None if spare is None else float(spare),
            running_requests=s.get("running_requests"),
            queue_len=s.get("queue_len"),
            measured_tpot_s=s.get("unloaded_tpot_s"),  # routing.py's baseline = the replica's unloaded TPOT
            healthy=bool(s.get("healthy", True)),
            stats_age_s=max(0.0, age),
            in_flight=self.in_flight.get(rid, 0),
            prefix_hashes=self._prefix_set(rid, s),
        )

    def _prefix_set(self, rid: str, stats: dict[str, Any]) -> frozenset[int]:
        """The replica's reported prefix hashes as a set, rebuilt only when it reports anew."""
        cached = self._prefix_sets.get(rid)
        if cached is None or cached[0] != stats.get("recorded_at"):
            cached = (stats.get("recorded_at"), frozenset(stats.get("prefix_hashes") or ()))
            self._prefix_sets[rid] = cached
        return cached[1]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = replica_id.unique_id
        self.in_flight[rid] = self.in_flight.get(rid, 0) + 1
        self.routed_to[pending_request.metadata.internal_request_id] = rid

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self.routed_to.pop(internal_request_id, replica_id.unique_id)
        if self.in_flight.get(rid, 0) > 0:
            self.in_flight[rid] -= 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Latest routing stats per replica (unique id -> dict), plus this router's in-flight count."""
        out = {}
        for replica in list(self.curr_replicas.values()):
            rid = replica.replica_id.unique_id
            out[rid] = {**(replica.routing_stats or {}), "router_in_flight": self.in_flight.get(rid, 0)}
        return out


def request_tpot_slo_ms(pending_request: PendingRequest | None) -> float | None:
    """The request's resolved TPOT SLO, passed by the ingress as the ``tpot_slo_ms`` keyword argument."""
    if pending_request is None:
        return None
    value = (pending_request.kwargs or {}).get("tpot_slo_ms")
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def request_prefix_hashes(pending_request: PendingRequest | None) -> list[int]:
    """The prompt's prefix-chunk hashes, from the payload the ingress passes as the call's first argument."""
    args = getattr(pending_request, "args", None) or ()
    payload = args[0] if args else None
    return prefix_chunk_hashes(routing_text(payload)) if isinstance(payload, dict) else []


def request_avoid_replicas(pending_request: PendingRequest | None) -> set[str]:
    """Replicas (unique ids) that already refused this request, passed by the ingress as ``avoid_replicas``."""
    if pending_request is None:
        return set()
    value = (pending_request.kwargs or {}).get("avoid_replicas") or ()
    return {str(v) for v in value} if isinstance(value, (list, tuple, set)) else set()
