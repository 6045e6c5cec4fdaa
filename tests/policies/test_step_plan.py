"""policies.step_plan.split_step_tokens: golden splits and the invariants every split keeps."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.step_plan import split_step_tokens

LIMITS = dict(max_num_batched_tokens=64, prefill_chunk_tokens=16, token_budget=24)


def split(**kw):
    args = dict(LIMITS, num_roots=0, prefill_remaining=[], num_running_prefills=0, free_seq_slots=8)
    args.update(kw)
    return split_step_tokens(**args)


def test_roots_then_running_prefills_then_fifo_admission_then_nodes():
    s = split(num_roots=3, prefill_remaining=[40, 5, 30, 30, 30], num_running_prefills=2)
    # 61 tokens after the roots: running chunks 16 + 5, then waiting 16 + 16 + 8 (the step's limit)
    assert s.prefill_tokens == (16, 5, 16, 16, 8)
    assert s.node_budget == 0 and not s.prefill_held  # the step is full; B = 24 is long spent
    s = split(num_roots=3, prefill_remaining=[10], num_running_prefills=0)
    assert s.prefill_tokens == (10,) and s.node_budget == 24 - 3 - 10  # B bounds the tree nodes


def test_sequence_slots_bound_admission_not_running_prefills():
    s = split(prefill_remaining=[4, 4, 4, 4], num_running_prefills=2, free_seq_slots=1)
    assert s.prefill_tokens == (4, 4, 4, 0)


def test_max_admitted_keeps_the_rest_queued():
    s = split(prefill_remaining=[4, 4, 4], num_running_prefills=0, max_admitted=1)
    assert s.prefill_tokens == (4, 0, 0) and s.node_budget == 0  # no decoding request: no tree
    s = split(num_roots=2, prefill_remaining=[4, 4, 4], num_running_prefills=0, max_admitted=1)
    assert s.node_budget == 24 - 2 - 4


def test_prefill_cap_holds_prompts_and_reserves_slo_nodes():
    s = split(num_roots=2, prefill_remaining=[40], prefill_cap=5, slo_nodes=30)
    assert s.prefill_tokens == (5,) and s.prefill_held
    # the reserved nodes survive where B is spent: min(62 - 5, max(24 - 2 - 5, 30))
    assert s.node_budget == 30 and s.slo_node_budget == 30
    s = split(num_roots=0, prefill_remaining=[40], prefill_cap=5, slo_nodes=30)
    assert s.prefill_tokens == (16,) and s.slo_node_budget == 0 and not s.prefill_held  # no decodes: no cap
    s = split(num_roots=2, prefill_remaining=[3], prefill_cap=5)
    assert s.prefill_tokens == (3,) and not s.prefill_held  # nothing left waiting


def test_a_held_step_verifies_only_the_reserved_nodes():
    # B leaves 24 - 2 - 5 = 17 nodes, but the plan sized this step with 3: prompts wait so that it stays that short
    s = split(num_roots=2, prefill_remaining=[40], prefill_cap=5, slo_nodes=3)
    assert s.prefill_held and s.prefill_tokens == (5,) and s.node_budget == 3
    s = split(num_roots=2, prefill_remaining=[40], prefill_cap=5, slo_nodes=0)
    assert s.prefill_held and s.node_budget == 0
    # nothing held back (every prompt fits under the cap): B's nodes as before
    s = split(num_roots=2, prefill_remaining=[3], prefill_cap=5, slo_nodes=3)
    assert not s.prefill_held and s.node_budget == 24 - 2 - 3
    # no tree verified yet: the plan cannot price a node, so B's nodes, or the replica would never measure the gain
    s = split(num_roots=2, prefill_remaining=[40], prefill_cap=5, slo_nodes=0, gain_measured=False)
    assert s.prefill_held and s.node_budget == 24 - 2 - 5


def test_no_budget_left():
    s = split(num_roots=64, prefill_remaining=[10])
    assert s.prefill_tokens == (0,) and s.node_budget == 0


@settings(max_examples=300, deadline=None)
@given(num_roots=st.integers(0, 80), remaining=st.lists(st.integers(1, 100), max_size=8),
       running=st.integers(0, 8), slots=st.integers(0, 8), limit=st.integers(1, 128), chunk=st.integers(1, 64),
       budget=st.integers(1, 128), cap=st.none() | st.integers(0, 128), slo_nodes=st.integers(0, 64),
       measured=st.booleans())
def test_every_split_stays_within_the_steps_limits(num_roots, remaining, running, slots, limit, chunk, budget, cap,
                                                   slo_nodes, measured):
    running = min(running, len(remaining))
    num_roots = min(num_roots, limit)
    s = split_step_tokens(num_roots=num_roots, prefill_remaining=remaining, num_running_prefills=running,
                          free_seq_slots=slots, max_num_batched_tokens=limit, prefill_chunk_tokens=chunk,
                          token_budget=budget, prefill_cap=cap, slo_nodes=slo_nodes, gain_measured=measured)
    taken = s.prefill_tokens
    assert len(taken) == len(remaining)
    assert all(0 <= t <= min(r, chunk) for t, r in zip(taken, remaining))
    assert num_roots + sum(taken) + s.node_budget <= limit
    assert sum(1 for t in taken[running:] if t) <= max(slots, 0)
    admitted = [t > 0 for t in taken[running:]]
    assert admitted == sorted(admitted, reverse=True)  # FIFO: admission is a prefix of the queue
    if cap is not None and num_roots:
        assert sum(taken) <= cap
    else:
        assert not s.prefill_held and s.slo_node_budget == 0
    if num_roots:
        assert s.node_budget >= min(limit - num_roots - sum(taken), s.slo_node_budget)
    if s.prefill_held and measured:
        assert s.node_budget <= s.slo_node_budget
