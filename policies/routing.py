"""Replica choice for one request, as a full ranking (Ray Serve's ``RequestRouter.choose_replicas`` shape).

Pure: the router adapter (app/) turns ``replica.routing_stats`` plus its own in-flight counts into
``ReplicaStats`` and the returned replica ids back into replicas.

- Tight-SLO requests go where the reported spare token budget is largest: that replica can still give
  them the deep trees they need.
- Other requests use power of two choices on load (running + queued), which spreads load without herding
  onto the one replica with the freshest good-looking stats.
- Stats older than ``max_stats_age_s``, or missing, are not trusted: such replicas are ranked by the
  router's local in-flight count instead, after the replicas with fresh stats for tight requests.
- Unhealthy replicas come last, as a final group, so a request still finds a replica if all report trouble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class ReplicaStats:
    """What the router knows about one replica. ``None`` = not reported yet (``routing_stats`` is {})."""

    replica_id: str
    spare_budget: float | None = None  # draft nodes per step left after its requests' SLO needs
    running_requests: int | None = None
    queue_len: int | None = None
    measured_tpot_s: float | None = None  # unloaded TPOT the replica measured (baseline for relative SLOs)
    healthy: bool = True
    stats_age_s: float = math.inf  # seconds since the stats were recorded
    in_flight: int = 0  # requests this router sent there and has not seen finish (local, always fresh)

    @classmethod
    def from_mapping(cls, replica_id: str, stats: Mapping[str, Any] | None, in_flight: int = 0,
                     stats_age_s: float | None = None) -> "ReplicaStats":
        """Build from a ``record_routing_stats()`` dict; unknown keys are ignored, missing ones stay None."""
        s = dict(stats or {})
        age = stats_age_s if stats_age_s is not None else s.get("stats_age_s", math.inf if not s else 0.0)
        return cls(
            replica_id=str(replica_id),
            spare_budget=_num(s.get("spare_budget")),
            running_requests=_int(s.get("running_requests")),
            queue_len=_int(s.get("queue_len")),
            measured_tpot_s=_num(s.get("measured_tpot_s")),
            healthy=bool(s.get("healthy", True)),
            stats_age_s=float(age),
            in_flight=int(in_flight),
        )


def _num(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _int(v: Any) -> int | None:
    f = _num(v)
    return None if f is None or not math.isfinite(f) else int(f)


def is_tight(tpot_slo_s: float | None, baseline_tpot_s: float | None, tight_ratio: float = 2.0) -> bool:
    """A request is tight when its TPOT SLO is under ``tight_ratio`` x the replicas' unloaded TPOT: it then
    needs speculation (several tokens per step) to make its SLO under any load."""
    if tpot_slo_s is None or not math.isfinite(tpot_slo_s):
        return False
    if baseline_tpot_s is None or not math.isfinite(baseline_tpot_s) or baseline_tpot_s <= 0:
        return False
    return tpot_slo_s < tight_ratio * baseline_tpot_s


def baseline_tpot_s(replicas: Sequence[ReplicaStats], max_stats_age_s: float = 5.0) -> float | None:
    """Median measured unloaded TPOT over replicas with fresh stats (None if none reported)."""
    vals = [r.measured_tpot_s for r in replicas
            if r.measured_tpot_s is not None and r.measured_tpot_s > 0 and r.stats_age_s <= max_stats_age_s]
    return float(np.median(vals)) if vals else None


def _fresh(r: ReplicaStats, max_stats_age_s: float) -> bool:
    return r.stats_age_s <= max_stats_age_s and (r.running_requests is not None or r.spare_budget is not None)


def _load(r: ReplicaStats, max_stats_age_s: float) -> int:
    """Requests at the replica: its own count (running + queued) if fresh, but never below what this router
    has in flight there (the reported count lags the router's latest sends)."""
    if _fresh(r, max_stats_age_s) and r.running_requests is not None:
        return max(r.running_requests + (r.queue_len or 0), r.in_flight)
    return r.in_flight


def rank_replicas(
    replicas: Sequence[ReplicaStats | Mapping[str, Any]],
    tight: bool,
    *,
    rng: np.random.Generator | None = None,
    max_stats_age_s: float = 5.0,
) -> list[list[str]]:
    """Full ranking of replica ids, best first, as singleton groups (``[[best], [next], ...]``), with
    unhealthy replicas in one final group. Every replica appears exactly once. Dicts are read with
    ``ReplicaStats.from_mapping`` keys (``replica_id`` required). ``rng`` seeds the power-of-two draw.
    """
    reps = [r if isinstance(r, ReplicaStats) else ReplicaStats.from_mapping(r["replica_id"], r,
                                                                           int(r.get("in_flight", 0)))
            for r in replicas]
    healthy = [r for r in reps if r.healthy]
    sick = sorted((r for r in reps if not r.healthy), key=lambda r: (_load(r, max_stats_age_s), r.replica_id))
    if tight:
        fresh = [r for r in healthy if _fresh(r, max_stats_age_s) and r.spare_budget is not None]
        stale = [r for r in healthy if not (_fresh(r, max_stats_age_s) and r.spare_budget is not None)]
        ranked = sorted(fresh, key=lambda r: (-r.spare_budget, _load(r, max_stats_age_s), r.replica_id))
        ranked += sorted(stale, key=lambda r: (_load(r, max_stats_age_s), r.replica_id))
    else:
        ranked = _power_of_two(healthy, rng or np.random.default_rng(), max_stats_age_s)
    groups = [[r.replica_id] for r in ranked]
    if sick:
        groups.append([r.replica_id for r in sick])
    return groups


def _power_of_two(reps: list[ReplicaStats], rng: np.random.Generator, max_stats_age_s: float) -> list[ReplicaStats]:
    """Two random replicas, the less loaded first (ties: random order); then the rest by load."""
    if len(reps) <= 1:
        return list(reps)
    i, j = (int(x) for x in rng.choice(len(reps), size=2, replace=False))
    a, b = reps[i], reps[j]
    la, lb = _load(a, max_stats_age_s), _load(b, max_stats_age_s)
    first, second = (a, b) if la < lb else (b, a)  # equal load: the draw's order decides
    rest = sorted((r for k, r in enumerate(reps) if k not in (i, j)),
                  key=lambda r: (_load(r, max_stats_age_s), r.replica_id))
    return [first, second] + rest
