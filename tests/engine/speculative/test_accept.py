"""Acceptance walk and verify-tree construction on hand-checked arrays."""

from __future__ import annotations

import numpy as np
import torch

from app.engine.config import SamplingParams
from app.engine.speculative.accept import accept_tree
from app.engine.speculative.source import CandidateTree, DraftSource
from app.engine.speculative.tree import build_verify_trees, pad


def _logits_choosing(choices: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(choices), vocab)
    for i, c in enumerate(choices):
        logits[i, c] = 5.0
    return logits


def test_greedy_walk_descends_while_children_match():
    # root(0) -> a=3 (1) -> b=4 (3); root -> c=5 (2)
    tokens, parents = [9, 3, 5, 4], [-1, 0, 0, 1]
    # target picks 3 at root, 4 at node 1, 7 at node 3: accepts nodes 1 and 3, bonus 7
    path, emitted = accept_tree(tokens, parents, _logits_choosing([3, 4, 0, 7]), SamplingParams(), None)
    assert path == [0, 1, 3] and emitted == [3, 4, 7]


def test_greedy_walk_rejects_at_root():
    path, emitted = accept_tree([9, 3], [-1, 0], _logits_choosing([6, 1]), SamplingParams(), None)
    assert path == [0] and emitted == [6]


def test_sampling_walk_consumes_generator_like_plain_decoding():
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    params = SamplingParams(temperature=1.0)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    from app.engine.sampling import sample_token

    first = sample_token(logits[0], params, g2)
    tokens, parents = [9, first, (first + 1) % 10], [-1, 0, 0]
    path, emitted = accept_tree(tokens, parents, logits, params, g1)
    assert emitted[0] == first and path[:2] == [0, 1]
    assert emitted[1] == sample_token(logits[1], params, g2)  # same draw sequence as non-speculative


def test_build_verify_trees_compacts_selected_nodes():
    trees = [CandidateTree(np.array([11, 12, 13, 14]), np.array([-1, -1, 0, 2]),
                           np.array([.6, .3, .5, .9], np.float32), np.array([.6, .3, .3, .27], np.float32)),
             CandidateTree.empty()]
    cands = pad(trees)
    assert cands.valid.tolist() == [[True] * 4, [False] * 4]
    selected = np.array([[True, False, True, True], [False] * 4])
    vt = build_verify_trees([100, 200], cands, selected)
    assert vt[0].tokens == [100, 11, 13, 14] and vt[0].parents == [-1, 0, 1, 2]
    assert vt[1].tokens == [200] and vt[1].num_nodes == 0


def test_depth_gate_follows_measured_acceptance():
    from app.engine.speculative.speculator import Speculator

    spec = Speculator(drafter=None, default_policy="adaserve", max_tree_nodes=32, max_depth=8, max_width=4)
    assert spec.depth_cap() == 8  # no evidence yet: the adaptive shape decides
    spec.num_trees, spec.num_accepted, spec.num_rejections = 100, 30, 100  # a = 0.23: level 2 yields 0.05
    assert spec.depth_cap() == 1
    spec.num_accepted, spec.num_rejections = 400, 100  # a = 0.8: 0.8**10 < 0.1 -> capped by max_depth
    assert spec.depth_cap() == 8
    spec.num_accepted, spec.num_rejections = 100, 100  # a = 0.5: 0.5**3 = 0.125 >= 0.1 > 0.5**4
    assert spec.depth_cap() == 3
    spec.num_accepted, spec.num_rejections = 100, 0  # a = 1 (every draft token accepted): log(a) = 0
    assert spec.depth_cap() == 8


def test_acceptance_rate_counts_only_walks_stopped_by_a_rejection():
    from app.engine.speculative.speculator import Speculator
    from app.engine.speculative.tree import VerifyTree

    spec = Speculator(_Fixed(), "adaserve", max_tree_nodes=8, max_depth=8, max_width=4)
    chain = VerifyTree(tokens=[1, 2, 3], parents=[-1, 0, 1], path_prob=[1.0, 0.5, 0.2], slots=[-1, 0, 1])
    fan = VerifyTree(tokens=[1, 2, 3], parents=[-1, 0, 0], path_prob=[1.0, 0.5, 0.2], slots=[-1, 0, 1])
    spec.observe("a", None, chain, [0, 1, 2])  # reached the leaf: 2 accepted, nothing said about a 3rd token
    spec.observe("b", None, fan, [0])  # both children rejected
    spec.observe("c", None, chain, [0, 1])  # node 2 rejected
    assert (spec.num_accepted, spec.num_rejections) == (3, 2)
    assert abs(spec.acceptance_rate() - 3 / 5) < 1e-12


class _Fixed(DraftSource):
    """A drafter that proposes the same 3-level tree (8 nodes, f halving per level) for every request."""

    def propose(self, reqs, depth, beam_width, topk, widths=None, **kw):
        parent = np.array([-1, -1, 0, 0, 1, 2, 2, 3])
        f = np.array([0.8, 0.6, 0.4, 0.3, 0.3, 0.2, 0.15, 0.1], np.float32)
        q = f / np.where(parent >= 0, f[np.maximum(parent, 0)], 1.0)
        return [CandidateTree(np.arange(8) + 100, parent, q.astype(np.float32), f) for _ in reqs]

    def release(self, request_id):
        pass


def test_throughput_cut_bounds_every_budgeted_policy_and_the_slo_phase(monkeypatch):
    from app.engine.request import Request
    from app.engine.speculative import speculator as speculator_module
    from app.engine.speculative.speculator import Speculator
    from app.engine.step import NodePricing, ScheduledChunk, StepPlan

    def plan(slo_ms, priced):
        reqs = []
        for i in range(3):
            r = Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=50), frozenset(), tpot_slo_ms=slo_ms)
            r.token_ids.extend([5] * 20)
            r.first_token_time = 0.0
            reqs.append(r)
        pricing = NodePricing(latency_model=None, base_tokens=3, context_tokens=69, num_roots=3, min_path_prob=0.0,
                              tokens_per_s=0.0) if priced else None
        return StepPlan(decodes=[ScheduledChunk(r, 1) for r in reqs], node_budget=24, predicted_step_s=0.05,
                        pricing=pricing)

    cut_at = 0.3  # nodes with f >= 0.3: 5 per request, 15 in all
    monkeypatch.setattr(speculator_module, "throughput_cut_path_prob", lambda *a, **k: cut_at)
    for policy, slo_ms in [("dynamic-tree", None), ("adaserve", None), ("adaserve", 1.0)]:
        spec = Speculator(_Fixed(), policy, max_tree_nodes=32, max_depth=3, max_width=4)
        free = spec.propose(plan(slo_ms, priced=False), now=10.0)
        cut = spec.propose(plan(slo_ms, priced=True), now=10.0)
        n_free = sum(t.num_nodes for t in free.trees.values())
        n_cut = sum(t.num_nodes for t in cut.trees.values())
        assert n_free == 24  # the budget alone
        assert n_cut == 15  # the cut bounds the step's size, even when every request is far behind its SLO
        below = [p for t in cut.trees.values() for p in t.path_prob[1:] if p < cut_at]
        # without SLOs only nodes above the cut; an urgent request's SLO phase may take a less likely node
        # of its own, within the same size
        assert (not below) if slo_ms is None else below
