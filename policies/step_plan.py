"""The step's token split: roots first, then prefill chunks, then tree nodes (DESIGN.md 3).

One pure function, called by the engine's scheduler (app/engine/scheduler.py) and by the simulator
(bench/simulate.py) alike, so the two cannot drift. Numbers in, decisions out: which prompt tokens each
candidate prefills this step and how many draft nodes the step may verify.

Order within the step's ``max_num_batched_tokens``: every decoding request's root token (decodes never stall),
then prefill chunks (running partial prefills, then waiting prompts in FIFO order while sequence slots last),
and what is left goes to speculative tree nodes, up to the step's token budget B (roots included). Prefill thus
comes before speculation, as in AdaServe. An optional ``prefill_cap`` (the SLO pace plan,
``policies.budget.slo_step_plan``) bounds the step's prefill and reserves ``slo_nodes`` for the decoding
requests' SLOs, which the node budget then keeps even where B is spent; a step the cap held prompts out of
verifies those nodes and no more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenSplit:
    prefill_tokens: tuple[int, ...]  # per prefill candidate, in the order given: tokens it prefills (0: none)
    node_budget: int  # draft nodes (roots excluded) the step may verify
    slo_node_budget: int  # of which the SLO pace plan reserved this many for the decoding requests' SLOs
    prefill_held: bool  # the prefill cap, not the step's limits, kept prompt tokens out of this step

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_tokens)


def split_step_tokens(
    *,
    num_roots: int,
    prefill_remaining: Sequence[int],
    num_running_prefills: int,
    free_seq_slots: int,
    max_num_batched_tokens: int,
    prefill_chunk_tokens: int,
    token_budget: int,
    prefill_cap: int | None = None,
    slo_nodes: int = 0,
    max_admitted: int | None = None,
    gain_measured: bool = True,
) -> TokenSplit:
    """Split one step's tokens between roots, prefill chunks and tree nodes.

    ``prefill_remaining``: prompt tokens not yet computed, first the ``num_running_prefills`` running requests still
    in prefill, then the waiting requests in admission order. A waiting request is admitted only while
    ``free_seq_slots`` last. ``max_admitted``: only the first this-many candidates may be scheduled (the
    scheduler's KV cache could not hold the next one; the rest stay queued). ``prefill_cap`` / ``slo_nodes`` apply
    only when some request decodes (a step without roots has no TPOT to protect).

    The node budget is ``min(tokens left in the step, max(B - roots - prefill, slo_nodes))``: B bounds the tree
    nodes, except that nodes the SLO plan reserved are kept as long as the step's limit allows.

    A step whose prefill the cap held back (``prefill_held``) verifies only the reserved nodes: the plan chose that
    step's size (the most prefill per second that keeps every protected request on pace), and nodes past it would
    lengthen the very step the plan kept prompts waiting to keep short (docs/results.md, 2026-12-07). Until a tree
    has been verified (``gain_measured`` False) the plan prices nodes at an assumed gain (the prior of
    ``policies.budget.gain_per_step``; without one, 1 token a step, which reserves no nodes at all), so held steps
    keep B's nodes: otherwise a replica whose first steps are held might never speculate and never measure the gain.
    """
    budget = max(int(max_num_batched_tokens) - int(num_roots), 0)
    prefill_budget = budget
    reserved = 0
    if prefill_cap is not None and num_roots > 0:
        prefill_budget = max(0, min(budget, int(prefill_cap)))
        reserved = max(0, int(slo_nodes))
    capped = prefill_budget < budget
    limit = len(prefill_remaining) if max_admitted is None else min(int(max_admitted), len(prefill_remaining))
    slots = int(free_seq_slots)
    taken = [0] * len(prefill_remaining)
    for i in range(limit):
        if prefill_budget == 0:
            break
        waiting = i >= num_running_prefills
        if waiting and slots <= 0:
            break
        n = min(int(prefill_remaining[i]), int(prefill_chunk_tokens), prefill_budget)
        if n <= 0:
            continue
        taken[i] = n
        prefill_budget -= n
        slots -= waiting
    prefill = sum(taken)
    held = capped and prefill_budget == 0 and any(r > t for r, t in zip(prefill_remaining, taken))
    node_budget = min(budget - prefill, max(int(token_budget) - int(num_roots) - prefill, reserved))
    if held and gain_measured:  # the plan sized this step (roots + prefill + its nodes) to keep the pace
        node_budget = min(node_budget, reserved)
    if num_roots == 0:  # only decoding requests grow trees
        node_budget = 0
    return TokenSplit(tuple(taken), max(node_budget, 0), reserved, held)
