"""Continuous batching with chunked prefill: decides which tokens of which requests run in the next step.

Order within a step's token budget: every decoding request gets its one token first (decodes never stall),
then prefill chunks (running partial prefills, then FIFO admission), and whatever budget is left goes to
speculative tree tokens. Prefill thus comes before speculation, as in AdaServe. An optional ``prefill_cap``
(the engine's SLO-aware prefill) bounds the step's prefill tokens given the step's decoding requests and
reserves the tree nodes their SLOs need. Running out of KV blocks preempts the newest running request (its KV is
dropped and recomputed later), so the oldest keep progressing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from app.engine.config import EngineConfig
from app.engine.kv_cache import KVCache
from app.engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # tokens token_ids[num_computed : num_computed + num_tokens] run this step

    @property
    def completes(self) -> bool:
        """This chunk reaches the end of the request's tokens, so its last logits yield a new token."""
        return self.request.num_computed_tokens + self.num_tokens == len(self.request.token_ids)


@dataclass
class StepPlan:
    decodes: list[ScheduledChunk] = field(default_factory=list)  # one token each; may grow a speculation tree
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    spec_token_budget: int = 0  # tokens left in the step for speculative tree nodes
    slo_node_budget: int = 0  # tree nodes the prefill cap reserved for the decoding requests' SLOs
    prefill_held: bool = False  # the prefill cap, not the step's budget, kept prompt tokens out of this step

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache: KVCache):
        self.config = config
        self.kv = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self, prefill_cap: Callable[[list[Request]], tuple[int, int]] | None = None) -> StepPlan:
        """``prefill_cap(decoding requests)``: (most prefill tokens this step may carry, tree nodes to reserve for
        the requests' SLOs); None: no bound."""
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()

        # 1. Decodes: one token each, oldest first; preempt the newest running request when blocks run out.
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or not req.is_decoding or budget == 0:
                continue
            if not self._grow(req, req.num_computed_tokens + 1, plan):
                continue  # req itself was preempted
            plan.decodes.append(ScheduledChunk(req, 1))
            scheduled.add(req.request_id)
            budget -= 1

        prefill_budget = budget
        if prefill_cap is not None and plan.decodes:
            cap, slo_nodes = prefill_cap([c.request for c in plan.decodes])
            prefill_budget = max(0, min(budget, int(cap)))
            plan.slo_node_budget = max(0, int(slo_nodes))
        capped = prefill_budget < budget

        # 2. Running requests still in prefill (chunked, or recomputing after a preemption).
        for req in list(self.running):
            if prefill_budget == 0:
                break
            if req.status is not RequestStatus.RUNNING or req.request_id in scheduled:
                continue
            n = min(req.num_uncomputed_tokens, self.config.prefill_chunk_tokens, prefill_budget)
            if n > 0 and self._grow(req, req.num_computed_tokens + n, plan):
                plan.prefills.append(ScheduledChunk(req, n))
                scheduled.add(req.request_id)
                prefill_budget -= n

        # 3. Admit waiting requests in FIFO order while budget, sequence slots and blocks allow.
        while self.waiting and prefill_budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_uncomputed_tokens, self.config.prefill_chunk_tokens, prefill_budget)
            if not self.kv.ensure_capacity(req.block_ids, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.prefills.append(ScheduledChunk(req, n))
            prefill_budget -= n

        plan.spec_token_budget = budget - sum(c.num_tokens for c in plan.prefills)
        if capped and prefill_budget == 0:
            planned = {c.request.request_id: c.num_tokens for c in plan.chunks}
            plan.prefill_held = bool(self.waiting) or any(
                not r.is_decoding and r.num_uncomputed_tokens > planned.get(r.request_id, 0) for r in self.running)
        return plan

    def _grow(self, req: Request, num_tokens: int, plan: StepPlan) -> bool:
        """Make req's blocks hold num_tokens, preempting newer requests; False if req itself was preempted."""
        while not self.kv.ensure_capacity(req.block_ids, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            plan.preempted.append(victim)
            for chunks in (plan.decodes, plan.prefills):
                chunks[:] = [c for c in chunks if c.request is not victim]
            if victim is req:
                return False
        return True

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.release(req.block_ids)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.release(req.block_ids)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
