"""A stand-in replica for the router test: no engine, fixed routing stats by replica rank.

Rank 0 reports a full step budget (loaded), rank 1 plenty of spare budget; both the same unloaded TPOT.
Imported by Serve workers through PYTHONPATH (the Ray test module puts tests/app there).
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.config import RequestRouterConfig


@serve.deployment(num_replicas=2, max_ongoing_requests=100, ray_actor_options={"num_cpus": 0},
                  request_router_config=RequestRouterConfig(request_router_class="app.router.SLORequestRouter",
                                                            request_routing_stats_period_s=0.2))
class FakeReplica:
    def __init__(self) -> None:
        rank = serve.get_replica_context().rank
        self.rank = int(getattr(rank, "rank", rank))

    def record_routing_stats(self) -> dict[str, Any]:
        loaded = self.rank == 0
        return {"spare_token_budget": 0 if loaded else 400, "running_requests": 8 if loaded else 1,
                "queue_len": 0, "unloaded_tpot_s": 0.05, "healthy": True, "recorded_at": time.time()}

    async def generate(self, request: dict[str, Any], tpot_slo_ms: float | None = None) -> AsyncIterator[dict]:
        yield {"rank": self.rank}
