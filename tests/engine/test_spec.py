"""Speculative decoding end to end: lossless for every policy and draft, full acceptance with draft = target,
the target's sampling distribution preserved."""

from __future__ import annotations

import dataclasses
import shutil
import time

import numpy as np
import pytest
import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine
from app.engine.step import StepTotals
from policies.latency_model import LatencyModel, PiecewiseLinear

POLICIES = ["chain:4", "static-tree", "dynamic-tree", "adaserve"]
PROMPTS = ["def fibonacci(n):", "Write a poem about the sea.", "List the planets of the solar system:",
           "The quick brown fox", "Explain photosynthesis briefly.", "1, 2, 3, 4,"]
NEW_TOKENS = 16
# Losslessness is exact token equality with plain decoding across different batch shapes: in bf16 (the default
# on AMX CPUs and GPUs) a near-tie can flip an argmax between shapes, so equality is asserted in float32.
EXACT_DTYPE = "float32"


@pytest.fixture(scope="module")
def random_draft_dir(tmp_path_factory, embedded_dir):
    """A tiny randomly initialised Llama sharing the target's tokenizer: the worst-case draft."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("random-draft")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                 max_position_embeddings=8192)).save_pretrained(path)
    for f in embedded_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, path / f.name)
    return path


def plain_greedy(prompts: list[str]) -> dict[str, list[int]]:
    """Non-speculative greedy outputs: what every speculative run must reproduce token for token."""
    engine = LLMEngine(EngineConfig(num_kv_blocks=256, dtype=EXACT_DTYPE))
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    return {p: o.token_ids for p, o in zip(prompts, outs)}


@pytest.fixture(scope="module")
def plain_outputs():
    return plain_greedy(PROMPTS)


def _spec_engine(draft: str, **kw) -> LLMEngine:
    cfg = dict(num_kv_blocks=256, dtype=EXACT_DTYPE, draft=draft, policy="adaserve", profile_latency=False, token_budget=48,
               prefill_chunk_tokens=16, max_num_batched_tokens=96)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def _run_staggered(engine: LLMEngine, policies: list[str], slo_ms: list[float | None],
                   prompts: list[str] = PROMPTS) -> dict[str, list[int]]:
    """Requests arrive two per step; request i carries policies[i % len] (per-request override) and slo_ms[i % len]."""
    outs: dict[str, list[int]] = {}
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished():
        for i in pending[:2]:
            engine.add_request(prompts[i], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
                               request_id=prompts[i], policy=policies[i % len(policies)],
                               tpot_slo_ms=slo_ms[i % len(slo_ms)])
        pending = pending[2:]
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.token_ids
    return outs


@pytest.mark.parametrize("draft", ["random", "distilled", "feature"])
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_speculation_is_lossless(draft, policy, random_draft_dir, plain_outputs):
    engine = _spec_engine(str(random_draft_dir) if draft == "random" else draft, policy=policy)
    outs = _run_staggered(engine, [policy], [None, 5.0, 1000.0])
    assert outs == plain_outputs
    assert engine.scheduler.totals.tree_nodes > 0  # speculation really ran
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
    drafter = engine.speculator.drafter
    assert not drafter.seqs and drafter.kv.allocator.num_free == drafter.kv.allocator.num_blocks  # draft KV freed
    assert not getattr(drafter, "features", None)  # and the target hidden states a feature draft kept


def test_mixed_policies_in_one_batch(random_draft_dir, plain_outputs):
    engine = _spec_engine(str(random_draft_dir))
    assert _run_staggered(engine, POLICIES + ["none"], [None, 20.0]) == plain_outputs


# free up to 40 step tokens, then 100 s a token: an SLO-aware prefill plans 40-token steps, so it leaves a step
# exactly 40 - (decoding requests) prefill tokens (1 s SLOs: one token a step keeps pace, no nodes reserved)
CLIFF = LatencyModel(PiecewiseLinear((0.0, 40.0, 41.0), (0.0, 0.0, 100.0), tail_slope=100.0), 0.0)


def _slo_prefill_engine(draft, **kw) -> LLMEngine:
    """adaserve with SLO-aware prefill (the default), priced by CLIFF instead of a profile."""
    engine = _spec_engine(draft, **kw)
    engine.scheduler.latency_model = CLIFF
    return engine


def test_slo_prefill_holds_prompts_to_the_slack_and_stays_lossless(random_draft_dir):
    long_prompt = "Summarize: " + " ".join(PROMPTS) * 2  # arrives while the others decode, takes several chunks
    prompts = PROMPTS[:2] + [long_prompt] + PROMPTS[2:]
    engine = _slo_prefill_engine(str(random_draft_dir))
    steps, caps = [], []
    sched = engine.scheduler
    prefill_cap, schedule = sched.prefill_cap, sched.schedule

    def recording_cap(decodes, now):
        slo_bound = any(r.tpot_slo_ms for r in decodes)  # only SLO'd requests bound it (1 s: never behind)
        tokens, nodes = prefill_cap(decodes, now)
        caps.append((tokens, (40 - len(decodes), 0) if slo_bound else (engine.config.max_num_batched_tokens, 0),
                     nodes))
        return tokens, nodes

    def recording_schedule(now):
        caps.clear()
        plan = schedule(now)
        queued = bool(sched.waiting) or any(not r.is_decoding for r in sched.running)
        steps.append((caps[0] if caps else None, sum(c.num_tokens for c in plan.prefills), queued))
        return plan

    sched.prefill_cap, sched.schedule = recording_cap, recording_schedule
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        if i == 2:  # the rest arrive once the first two decode with full trees
            for _ in range(3):
                engine.step()
        engine.add_request(p, sampling, request_id=p, tpot_slo_ms=[1000.0, None][i % 2])
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    assert outs == plain_greedy(prompts)
    capped = [(cap, expected, nodes, n, queued) for (cap, expected, nodes), n, queued in (s for s in steps if s[0])]
    assert capped and all((cap, nodes) == expected and n <= cap for cap, expected, nodes, n, _ in capped)
    assert any(n == cap < 40 and queued for cap, _, _, n, queued in capped)  # it held a prompt back
    assert engine.stats()["prefill_held_steps"] > 0
    assert steps[0][0] is None  # nothing decoding yet: the cap is not asked


def test_slo_prefill_never_holds_back_what_feasible_ttft_deadlines_need(random_draft_dir, monkeypatch):
    engine = _slo_prefill_engine(str(random_draft_dir))
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True), request_id="a", tpot_slo_ms=1000.0)
    while not engine.requests["a"].is_decoding:
        engine.step()
    engine.step()
    decodes = [engine.requests["a"]]
    sched = engine.scheduler
    bounded, unbounded = (40 - 1, 0), (engine.config.max_num_batched_tokens, 0)

    def cap():
        return sched.prefill_cap(decodes, time.perf_counter())

    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=4), request_id="b")
    assert cap() == bounded
    engine.add_request(PROMPTS[2], SamplingParams(max_tokens=4), request_id="c", ttft_slo_ms=1e6)
    assert cap() == bounded  # its TTFT deadline is far off: the pace bound already meets it
    floor, feasible = sched._ttft_floor(sched._prefill_candidates(), time.perf_counter())
    assert feasible.all() and floor <= 39
    monkeypatch.setattr(sched, "_ttft_floor", lambda queued, now: (45, None))  # deadlines that need 45 a step
    assert cap() == (45, 0)  # TTFT first: the pace plan gets what is left
    monkeypatch.undo()
    decodes[0].policy = "dynamic-tree"  # slo_prefill=None: only adaserve steps are bounded
    assert cap() == (None, 0)
    sched.config = dataclasses.replace(sched.config, slo_prefill=True)  # on for every policy
    assert cap() == bounded
    sched.config = dataclasses.replace(sched.config, max_prefill_wait_s=0.0)
    assert cap() == unbounded


@pytest.fixture(scope="module")
def self_draft_engine():
    """Draft = target: every drafted top-1 token is the target's own greedy choice."""
    return _spec_engine("embedded", token_budget=64)


def test_draft_equal_to_target_accepts_the_whole_chain(self_draft_engine):
    e = self_draft_engine
    rid = e.add_request(PROMPTS[0], SamplingParams(max_tokens=26, ignore_eos=True), policy="chain:4")
    req = e.requests[rid]
    gains = []
    while not req.finished:
        before = req.num_output_tokens
        e.step()
        gains.append(req.num_output_tokens - before)
    # one prefill step (first token), then 5 tokens per step: 4 drafted + the bonus token
    assert gains == [1, 5, 5, 5, 5, 5]


def test_draft_equal_to_target_accepts_the_greedy_path_of_a_tree(self_draft_engine):
    e = self_draft_engine
    rid = e.add_request(PROMPTS[1], SamplingParams(max_tokens=40, ignore_eos=True), policy="dynamic-tree")
    req = e.requests[rid]
    e.step()
    while not req.finished:
        before_acc, before_tree = req.num_accepted_draft_tokens, e.scheduler.totals.tree_nodes
        proposal_depth = e.config.max_draft_depth
        e.step()
        if req.finished:
            break
        accepted = req.num_accepted_draft_tokens - before_acc
        # The top-1 chain is the highest-f path, so it is drafted and selected to its full depth (bounded by the
        # tree's node count); every node on it is the target's greedy token.
        assert accepted >= 1
        assert accepted <= min(proposal_depth, e.scheduler.totals.tree_nodes - before_tree)
    assert req.num_accepted_draft_tokens / req.num_spec_steps >= 3


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chisquare

    probs = probs / probs.sum()  # float rounding: scipy checks that observed and expected totals agree
    keep = probs * counts.sum() >= 5  # pool rare cells
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum()) * counts.sum()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp).pvalue)


@pytest.mark.slow
def test_sampling_speculation_matches_target_distribution(random_draft_dir, embedded_checkpoint):
    """First two tokens at temperature 1 (top-k 4) against the target's exact joint distribution.

    The draft is the target itself, so nearly every step accepts a drafted token: a wrong acceptance rule would
    show as the draft's distribution. Chi-square goodness of fit at significance 0.001 (seeds fixed: the test
    is deterministic).
    """
    # the budget must leave room for trees after 128 roots a step
    e = _spec_engine("embedded", token_budget=1024, max_num_seqs=128, max_num_batched_tokens=2048,
                     prefill_chunk_tokens=2048, num_kv_blocks=1024)
    prompt = "My favourite colour is"
    n = 600
    params = [SamplingParams(max_tokens=2, temperature=1.0, top_k=4, seed=s, ignore_eos=True) for s in range(n)]
    outs = e.generate([prompt] * n, params, policy="dynamic-tree")
    assert e.scheduler.totals.accepted > 0
    assert_first_two_tokens_follow_target(e, prompt, params[0], outs)


def assert_first_two_tokens_follow_target(e: LLMEngine, prompt: str, params: SamplingParams, outs) -> None:
    """Chi-square of the sampled (t1, t2) pairs against the target's exact p(t1) p(t2 | t1) (fp32 reference)."""
    from app.engine.sampling import processed_probs

    ids = e.encode_prompt(prompt)
    base = LLMEngine(EngineConfig(num_kv_blocks=64, dtype=EXACT_DTYPE))
    p1 = processed_probs(_next_logits(base, ids), params)
    cells, probs = {}, []
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = processed_probs(_next_logits(base, ids + [t1]), params)
        for t2 in torch.nonzero(p2).flatten().tolist():
            cells[(t1, t2)] = len(probs)
            probs.append(float(p1[t1] * p2[t2]))
    counts = np.zeros(len(probs))
    for o in outs:
        counts[cells[tuple(o.token_ids)]] += 1
    assert _chi_square_p(counts, np.array(probs)) > 1e-3


def _next_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    from app.engine.runner import SeqInput

    blocks: list[int] = []
    engine.kv.ensure_capacity(blocks, len(ids))
    out = engine.runner.run([SeqInput(blocks, 0, ids)])
    engine.kv.release(blocks)
    return out.logits[0]


@pytest.mark.parametrize("draft", ["random", "feature"])
def test_speculation_survives_kv_exhaustion(draft, random_draft_dir, plain_outputs):
    engine = _spec_engine(str(random_draft_dir) if draft == "random" else draft, num_kv_blocks=5,
                          policy="dynamic-tree")
    outs = engine.generate(PROMPTS[:4], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outs] == [plain_outputs[p] for p in PROMPTS[:4]]
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
    assert sum(o.metrics.num_preemptions for o in outs) > 0  # preemption (and its recompute) really happened


def test_policy_without_draft_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a draft"):
        LLMEngine(EngineConfig(num_kv_blocks=16, policy="adaserve"))
    with pytest.raises(ValueError, match="unknown speculation policy"):
        LLMEngine(EngineConfig(num_kv_blocks=16, policy="bogus"))


def test_slo_prefill_plans_a_cushion_from_the_measured_gain_spread(random_draft_dir):
    engine = _spec_engine(str(random_draft_dir))
    sched = engine.scheduler
    sched.latency_model = LatencyModel(PiecewiseLinear((0.0, 100.0), (0.01, 5.01)), 0.0)  # 10 ms + 50 ms a token
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=16, ignore_eos=True), request_id="a", tpot_slo_ms=1000.0)
    while not engine.requests["a"].is_decoding:
        engine.step()
    decodes = [engine.requests["a"]]

    def cap():
        return sched.prefill_cap(decodes, time.perf_counter())

    sched.step_overhead_ema_s = 0.0
    sched.config = dataclasses.replace(sched.config, gain_prior_steps=0.0)  # the measured gain alone
    # every tree gained 1 token: no spread, so ~1 s steps of ~19 tokens keep the 1 s SLO for the 15 left
    sched.totals = StepTotals(tree_requests=100, accepted=0, tree_gain_sq=100)
    steady, nodes = cap()
    assert nodes == 0 and 15 <= steady <= 19
    # a spread of 0.5 tokens per step: a cushion of 2 x 0.5 x sqrt(15) tokens asks for ~0.8 s steps
    sched.totals.tree_gain_sq = 125
    cushioned, _ = cap()
    assert cushioned <= steady - 3
    sched.config = dataclasses.replace(sched.config, slo_prefill_confidence_z=0.0)
    assert cap() == (steady, 0)
