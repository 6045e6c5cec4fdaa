"""Prefix caching: greedy outputs are token-identical with caching on and off (float32), cached blocks are shared,
evicted, and survive preemption; every reference is returned; a tree write never changes a shared block."""

from __future__ import annotations

import pytest
import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine

SYSTEM = ("You are a careful assistant for a hardware store. Answer in one short sentence, name the aisle, and "
          "never invent a product. The store has twelve aisles: tools, paint, garden, plumbing, electrical, "
          "fasteners, lumber and seasonal goods among them. ")  # 3 full blocks of 16 tokens and a bit
QUESTIONS = ["Where are the hammers?", "Do you sell blue paint?", "Which aisle has garden hoses?",
             "How much is a box of nails?"]
NEW_TOKENS = 12
EXACT = dict(dtype="float32", device="cpu", profile_latency=False)
POLICIES = {"none": dict(), "adaserve": dict(draft="ngram", policy="adaserve", token_budget=48)}


def _engine(policy: str = "none", caching: bool = True, **kw) -> LLMEngine:
    cfg = dict(EXACT, num_kv_blocks=128, block_size=16, prefill_chunk_tokens=32, max_num_batched_tokens=96)
    cfg.update(POLICIES[policy])
    cfg.update(kw)
    return LLMEngine(EngineConfig(enable_prefix_caching=caching, **cfg))


def _run(engine: LLMEngine, prompts: list[list[int]], *, together: bool, max_tokens: int = NEW_TOKENS) -> list:
    """Greedy outputs; one request at a time (each turn finds the previous turns cached) or all at once."""
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    if together:
        return engine.generate(prompts, sp)
    return [engine.generate([p], sp)[0] for p in prompts]


def _assert_all_returned(engine: LLMEngine) -> None:
    """Every reference is back: each block is free or evictable (cached, count 0)."""
    a = engine.kv.allocator
    assert all(c == 0 for c in a.ref_count)
    assert a.num_free == a.num_blocks
    assert a.num_evictable == a.num_cached


@pytest.fixture(scope="module")
def ids():
    eng = _engine(caching=False, num_kv_blocks=8)
    shared = [eng.encode_prompt(SYSTEM + q) for q in QUESTIONS]
    base = eng.encode_prompt(SYSTEM + QUESTIONS[0])
    # Divergence mid-block: equal for 40 tokens (two and a half 16-token blocks), then different.
    diverge = [base[:40] + eng.encode_prompt(" Please reply in French.")]
    return {"shared": shared, "diverge": diverge, "base": base}


@pytest.fixture(scope="module")
def reference(ids):
    """Caching off, one request at a time: what every cached run must reproduce."""
    eng = _engine(caching=False)
    prompts = ids["shared"] + ids["diverge"]
    return {tuple(p): o.token_ids for p, o in zip(prompts, _run(eng, prompts, together=False))}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("together", [False, True], ids=["sequential", "batched"])
def test_outputs_identical_with_caching_on_and_off(policy, together, ids, reference):
    eng = _engine(policy)
    prompts = ids["shared"] + ids["diverge"]
    outs = _run(eng, prompts, together=together)
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference[tuple(p)]
    stats = eng.stats()["prefix_cache"]
    cached = [o.metrics.num_cached_tokens for o in outs]
    if not together:  # later prompts find the system prompt's full blocks; the mid-block divergence keeps two
        assert cached[0] == 0 and all(c >= 48 for c in cached[1:-1]) and cached[-1] == 32
        assert stats["hit_tokens"] == sum(cached)
    assert stats["queried_tokens"] == sum(len(p) for p in prompts)
    _assert_all_returned(eng)


def test_follow_up_turn_maps_prompt_and_output_blocks(ids):
    """A chat's next turn resends the conversation: the previous turn's prompt AND output blocks are cached."""
    on, off = _engine(), _engine(caching=False)
    turn1 = ids["base"]
    first = _run(on, [turn1], together=False, max_tokens=40)[0]
    turn2 = turn1 + first.token_ids + on.encode_prompt(" Thanks! And the screws?")
    got = _run(on, [turn2], together=False)[0]
    assert got.token_ids == _run(off, [turn2], together=False)[0].token_ids
    # everything but the last sampled token of turn 1 was computed: its full blocks are all cached
    assert got.metrics.num_cached_tokens == (len(turn1) + len(first.token_ids) - 1) // 16 * 16
    assert got.metrics.num_cached_tokens > len(turn1)
    _assert_all_returned(on)


def test_a_fully_cached_prompt_still_computes_its_last_token(ids):
    eng = _engine()
    p = ids["base"][:48]  # exactly three blocks
    a, b = _run(eng, [p, p], together=False)
    assert a.token_ids == b.token_ids
    assert b.metrics.num_cached_tokens == 32  # never the last block holding the final prompt token
    _assert_all_returned(eng)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_eviction_under_pressure(policy, ids, reference):
    """7 blocks of 16 tokens: each request (~4 blocks of prompt, 1 of output) evicts what earlier ones left."""
    eng = _engine(policy, num_kv_blocks=7)
    prompts = ids["shared"] + ids["diverge"] + ids["shared"]
    outs = _run(eng, prompts, together=False)
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference[tuple(p)]
    stats = eng.stats()["prefix_cache"]
    assert stats["evictions"] > 0 and stats["hit_tokens"] > 0
    _assert_all_returned(eng)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_preemption_releases_references_and_outputs_stay_identical(policy, ids, reference):
    eng = _engine(policy, num_kv_blocks=12, max_num_seqs=8)
    prompts = ids["shared"] + ids["diverge"]
    outs = _run(eng, prompts, together=True, max_tokens=NEW_TOKENS)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference[tuple(p)]
    _assert_all_returned(eng)


def test_tree_step_over_a_shared_block_leaves_the_other_request_unchanged(ids, reference):
    """Request A (plain) and B (adaserve trees) share the system prompt's blocks and decode side by side; a block
    that another holder reads is copied before a tree writes into it (copy on write)."""
    eng = _engine("adaserve")
    a_ids, b_ids = ids["shared"][0], ids["shared"][1]
    eng.generate([a_ids], SamplingParams(max_tokens=1))  # warm the cache with the system prompt
    sp = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    eng.add_request(a_ids, sp, request_id="a", policy="none")
    eng.add_request(b_ids, sp, request_id="b")
    eng.step()  # both prefilled from the shared prefix
    a, b = eng.requests["a"], eng.requests["b"]
    assert a.num_cached_tokens and b.num_cached_tokens and set(a.block_ids) & set(b.block_ids)
    # Hold an extra reference on B's partial last block, as if another request read it: B's tree writes there.
    assert b.num_computed_tokens % 16  # its next tokens land in its partial last block
    held = b.block_ids[b.num_computed_tokens // 16]
    eng.kv.allocator.touch(held)
    k_before, v_before = eng.kv.k[:, held].clone(), eng.kv.v[:, held].clone()
    shared_before = {blk: eng.kv.k[:, blk].clone() for blk in set(a.block_ids) & set(b.block_ids)}
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    assert outs["a"].token_ids == reference[tuple(a_ids)] and outs["b"].token_ids == reference[tuple(b_ids)]
    assert outs["b"].metrics.num_spec_steps > 0
    assert eng.kv.num_cow_blocks >= 1
    assert torch.equal(eng.kv.k[:, held], k_before) and torch.equal(eng.kv.v[:, held], v_before)
    for blk, k in shared_before.items():
        assert torch.equal(eng.kv.k[:, blk], k)
    eng.kv.allocator.free([held])
    _assert_all_returned(eng)


def test_feature_draft_gets_a_cached_prefix_hidden_states(ids, reference):
    """The feature draft reads the target's hidden state of every token: a cached prefix's come from the cache."""
    eng = _engine("adaserve", draft="feature")
    prompts = ids["shared"][:3]
    outs = _run(eng, prompts, together=False)
    assert [o.token_ids for o in outs] == [reference[tuple(p)] for p in prompts]
    assert outs[1].metrics.num_cached_tokens > 0 and outs[1].metrics.num_accepted_draft_tokens > 0
    _assert_all_returned(eng)


def test_caching_off_keeps_nothing(ids):
    eng = _engine(caching=False)
    outs = _run(eng, ids["shared"][:2], together=False)
    assert all(o.metrics.num_cached_tokens == 0 for o in outs)
    stats = eng.stats()["prefix_cache"]
    assert not stats["enabled"] and stats["hit_tokens"] == stats["cached_blocks"] == 0
    _assert_all_returned(eng)
