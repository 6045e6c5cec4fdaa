"""tree_selection: validity for every policy, budget/n_max, optimality against brute force, SLO ordering,
fixed shapes on golden trees, policy names and draft shapes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import token_tree as tt
from policies.tree_selection import (
    DEFAULT_STATIC_WIDTHS,
    REACH_RTOL,
    PolicySpec,
    SLOState,
    draft_shape,
    parse_policy,
    required_acceptance,
    select,
)
from policy_strategies import candidate_trees, valid_subtrees

POLICIES = ["adaserve", "dynamic-tree", "static-tree", "static-tree:2,1", "chain:1", "chain:3", "none"]


@st.composite
def slo_states(draw, r: int):
    """Mixed SLOs: none, loose, tight; progress anywhere from ahead to far behind."""
    tpot = np.array([draw(st.sampled_from([np.inf, 0.02, 0.05, 0.2])) for _ in range(r)])
    l_s = np.array([draw(st.floats(0.0, 2.0)) for _ in range(r)])
    o = np.array([draw(st.integers(0, 100)) for _ in range(r)], dtype=np.float64)
    return SLOState(l_s, o, tpot)


# ---------------------------------------------------------------- names and shapes


def test_parse_policy_names():
    assert parse_policy("adaserve") == PolicySpec("adaserve")
    assert parse_policy(" Dynamic-Tree ") == PolicySpec("dynamic-tree")
    assert parse_policy("static-tree").static_widths == DEFAULT_STATIC_WIDTHS == (1, 1, 3, 1, 1, 1, 1, 1)
    assert parse_policy("static-tree:2,1").static_widths == (2, 1)
    assert parse_policy("chain:6") == PolicySpec("chain", chain_len=6)
    assert parse_policy("none").kind == "none"
    for name in ["chain:6", "static-tree", "static-tree:2,1", "adaserve"]:
        assert parse_policy(parse_policy(name).name) == parse_policy(name)


@pytest.mark.parametrize("bad", ["", "ada", "chain", "chain:", "chain:0", "chain:x", "static-tree:1,,2",
                                 "static-tree:0", "none:1", "adaserve:2"])
def test_parse_policy_rejects(bad):
    with pytest.raises(ValueError, match="policy|chain|static-tree"):
        parse_policy(bad)


def test_draft_shape_golden():
    assert draft_shape("none", 8, 56) == (0, 0, 0)
    assert draft_shape("chain:4", 8, 56) == (4, 1, 1)
    assert draft_shape("static-tree", 8, 56) == (8, 3, 3)
    assert draft_shape("static-tree:2,2", 8, 56) == (2, 4, 2)
    # step budget 56 + 8 = 64: d = floor(64 / 9) - 1 = 6, w = floor(64 / 8) = 8
    assert draft_shape("adaserve", 8, 56) == (6, 8, 8)
    assert draft_shape("dynamic-tree", 8, 56, draft_budget=16) == (6, 2, 2)
    assert draft_shape(parse_policy("adaserve"), 32, 32) == (1, 2, 2)


# ---------------------------------------------------------------- A(r)


def test_required_acceptance_golden():
    slo = SLOState(np.array([1.0, 0.5, 3.0, 0.0, 1.0]), np.array([10, 9, 1000, 0, 5]),
                   np.array([0.05, 0.05, 0.05, 0.05, np.inf]))
    a = required_acceptance(slo, t_step_s=0.1, max_depth=4, latency_correction=1.05)
    # (1 + 0.105) / 0.05 - 10 = 12.1 -> 5; (0.5 + 0.105) / 0.05 - 9 = 3.1; far ahead -> 1;
    # fresh: 0.105 / 0.05 = 2.1; no SLO -> 1
    np.testing.assert_allclose(a, [5.0, 3.1, 1.0, 2.1, 1.0])
    assert required_acceptance(slo, 0.1, 4, latency_correction=1.0)[1] == pytest.approx(3.0)


# ---------------------------------------------------------------- properties for every policy


@settings(max_examples=80, deadline=None)
@given(data=st.data(), tree=candidate_trees(max_requests=4, max_nodes=10, quantised=True))
def test_every_policy_selects_valid_trees_within_limits(data, tree):
    f, parent, valid = tree
    r = f.shape[0]
    slo = data.draw(slo_states(r))
    budget = data.draw(st.integers(0, 12))
    n_max = data.draw(st.integers(0, 6))
    for name in POLICIES:
        sel = select(name, f, parent, valid, slo, budget, 0.05, 4, n_max)
        assert sel.shape == f.shape and sel.dtype == bool
        assert tt.is_valid_tree(parent, sel), name
        assert not (sel & ~valid).any(), name
        if parse_policy(name).budgeted:
            assert sel.sum() <= budget and (sel.sum(axis=1) <= n_max).all(), name
            assert (f[sel] > 0).all(), name
            usable = np.minimum((valid & (f > 0)).sum(axis=1), n_max)
            assert sel.sum() == min(budget, usable.sum()), name  # the budget is spent when it can be


@settings(max_examples=25, deadline=None)
@given(tree=candidate_trees(max_requests=6, max_nodes=64, quantised=False))
def test_float_probabilities_stay_valid(tree):
    f, parent, valid = tree
    slo = SLOState(np.full(f.shape[0], 1.0), np.full(f.shape[0], 5.0), np.full(f.shape[0], 0.1))
    for name in POLICIES:
        sel = select(name, f, parent, valid, slo, 20, 0.1, 8, 16)
        assert tt.is_valid_tree(parent, sel) and not (sel & ~valid).any(), name


def test_nan_inf_and_negative_probabilities_are_never_selected():
    f = np.array([[0.9, np.nan, 0.5, -0.1, np.inf]])
    parent = np.array([[-1, -1, 0, -1, -1]])
    valid = np.ones((1, 5), dtype=bool)
    for name in ["adaserve", "dynamic-tree"]:
        sel = select(name, f, parent, valid, SLOState.no_slo(1), 10, 0.1, 4, 10)
        np.testing.assert_array_equal(sel, [[True, False, True, False, False]])


# ---------------------------------------------------------------- optimality vs brute force


def _brute_force_best(f, parent, valid, budget, n_max):
    """Max total f over per-request valid subtrees with <= n_max nodes each and <= budget in all."""
    per_req = []
    for i in range(f.shape[0]):
        trees = [t for t in valid_subtrees(parent[i], valid[i]) if len(t) <= n_max]
        per_req.append([(len(t), float(sum(f[i, j] for j in t))) for t in trees])
    best = 0.0
    for combo in itertools.product(*per_req):
        if sum(n for n, _ in combo) <= budget:
            best = max(best, sum(v for _, v in combo))
    return best


@settings(max_examples=60, deadline=None)
@given(data=st.data(), tree=candidate_trees(max_requests=2, max_nodes=6, quantised=True))
def test_dynamic_tree_maximises_expected_acceptance(data, tree):
    f, parent, valid = tree
    budget = data.draw(st.integers(0, 8))
    n_max = data.draw(st.integers(0, 6))
    sel = select("dynamic-tree", f, parent, valid, SLOState.no_slo(f.shape[0]), budget, 0.05, 6, n_max)
    assert f[sel].sum() == _brute_force_best(f, parent, valid, budget, n_max)


def _satisfied(f, sel, need):
    got = np.where(sel, f, 0.0).sum(axis=1)
    return int(((need <= 0) | (got >= need * (1 - REACH_RTOL))).sum())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), tree=candidate_trees(max_requests=2, max_nodes=6, quantised=True))
def test_adaserve_meets_as_many_slos_as_possible(data, tree):
    """With the SLO-phase cap lifted to n_max, the count of requests whose selected f reaches A(r) - 1 equals
    the brute-force maximum over all valid selections within the budget and n_max."""
    f, parent, valid = tree
    r = f.shape[0]
    slo = data.draw(slo_states(r))
    budget = data.draw(st.integers(0, 8))
    n_max = data.draw(st.integers(0, 6))
    t_step_s, depth = 0.05, 6
    sel = select("adaserve", f, parent, valid, slo, budget, t_step_s, depth, n_max, slo_cap_factor=1e9)
    need = required_acceptance(slo, t_step_s, depth) - 1.0
    best = 0
    per_req = [[t for t in valid_subtrees(parent[i], valid[i]) if len(t) <= n_max] for i in range(r)]
    for combo in itertools.product(*per_req):
        if sum(map(len, combo)) <= budget:
            mask = np.zeros_like(valid)
            for i, t in enumerate(combo):
                mask[i, list(t)] = True
            best = max(best, _satisfied(f, mask, need))
    assert _satisfied(f, sel, need) == best


@settings(max_examples=40, deadline=None)
@given(tree=candidate_trees(max_requests=4, max_nodes=10, quantised=True), budget=st.integers(0, 20))
def test_adaserve_without_slos_is_dynamic_tree(tree, budget):
    f, parent, valid = tree
    slo = SLOState.no_slo(f.shape[0])
    a = select("adaserve", f, parent, valid, slo, budget, 0.05, 4, 5)
    d = select("dynamic-tree", f, parent, valid, slo, budget, 0.05, 4, 5)
    np.testing.assert_array_equal(a, d)


# ---------------------------------------------------------------- SLO phase on hand-built cases


def _chains(f_rows):
    """One chain per request with the given path probabilities (already non-increasing)."""
    f = np.array(f_rows, dtype=np.float64)
    r, m = f.shape
    parent = np.tile(np.arange(-1, m - 1), (r, 1))
    return f, parent, np.ones((r, m), dtype=bool)


def test_tight_request_behind_is_served_before_a_loose_one():
    # request 0: loose SLO, ahead of it, great draft; request 1: tight SLO, behind, mediocre draft
    f, parent, valid = _chains([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]])
    slo = SLOState(decode_time_s=np.array([1.0, 1.0]), decoded_tokens=np.array([50, 53.5]),
                   tpot_slo_s=np.array([0.1, 0.02]))
    # A(0) = (1 + 0.105) / 0.1 - 50 < 1: needs nothing. A(1) = 1.105 / 0.02 - 53.5 = 1.75: its nodes must
    # bring 0.75, which takes 2 (0.5 + 0.4), exactly the budget
    sel = select("adaserve", f, parent, valid, slo, 2, 0.1, 4, 4)
    np.testing.assert_array_equal(sel.sum(axis=1), [0, 2])
    dyn = select("dynamic-tree", f, parent, valid, slo, 2, 0.1, 4, 4)
    np.testing.assert_array_equal(dyn.sum(axis=1), [2, 0])  # SLO-blind: all to the better draft
    # with budget to spare, the rest goes to the best remaining nodes: request 0's
    sel = select("adaserve", f, parent, valid, slo, 4, 0.1, 4, 4)
    np.testing.assert_array_equal(sel.sum(axis=1), [2, 2])


def test_feasible_requests_are_served_cheapest_first():
    f, parent, valid = _chains([[0.5, 0.5, 0.5, 0.5], [0.9, 0.8, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1]])
    # needs (A - 1): request 0 needs 1.5 -> 3 nodes; request 1 needs 1.5 -> 2 nodes; request 2 needs 0.5 -> 1 node
    slo = SLOState(np.array([0.5, 0.5, 0.5]), np.array([0.0, 0.0, 0.0]), np.array([0.2, 0.2, 0.5]))
    t_step_s = 0.0
    np.testing.assert_allclose(required_acceptance(slo, t_step_s, 4, 1.0) - 1, [1.5, 1.5, 0.0])
    slo.decode_time_s[2] = 0.75  # 0.75 / 0.5 - 0 = 1.5 -> needs 0.5
    sel = select("adaserve", f, parent, valid, slo, 3, t_step_s, 4, 4, latency_correction=1.0,
                 slo_cap_factor=10)
    # cheapest first: request 2 (1 node), request 1 (2 nodes); request 0 (3 nodes) no longer fits
    np.testing.assert_array_equal(sel.sum(axis=1), [0, 2, 1])
    sel = select("adaserve", f, parent, valid, slo, 7, t_step_s, 4, 4, latency_correction=1.0,
                 slo_cap_factor=10)
    np.testing.assert_array_equal(sel.sum(axis=1), [4, 2, 1])  # all served; the 7th node by f: 0.5 > 0.1


def test_slo_phase_cap_then_throughput_phase():
    f, parent, valid = _chains([[0.3, 0.2, 0.1, 0.05, 0.01], [0.9, 0.8, 0.7, 0.6, 0.5]])
    slo = SLOState(np.array([10.0, 0.0]), np.array([0.0, 0.0]), np.array([0.01, np.inf]))
    # request 0 is hopeless (needs d = 4, has 0.66): SLO phase gives it ceil(1.2 * 4 / 2) = 3 nodes,
    # the throughput phase gives the last node to request 1
    sel = select("adaserve", f, parent, valid, slo, 4, 0.1, 4, 5)
    np.testing.assert_array_equal(sel.sum(axis=1), [3, 1])
    sel = select("adaserve", f, parent, valid, slo, 4, 0.1, 4, 2)  # n_max caps the SLO phase too
    np.testing.assert_array_equal(sel.sum(axis=1), [2, 2])
    # triage: the hopeless request gets nothing in the SLO phase; the throughput phase goes by f alone
    sel = select("adaserve", f, parent, valid, slo, 4, 0.1, 4, 5, serve_unreachable=False)
    np.testing.assert_array_equal(sel, select("dynamic-tree", f, parent, valid, slo, 4, 0.1, 4, 5))
    np.testing.assert_array_equal(sel.sum(axis=1), [0, 4])
    # ... while a request it can bring onto its SLO is still served first: A(0) = 1.105 / 0.01 - 109 = 1.5
    # needs 0.3 + 0.2; request 1 (A = 0.105 / 0.01 -> d + 1 = 5, needs 4 > 3.5) is hopeless and gets only
    # the throughput phase's 2 nodes, though its draft is much better
    slo = SLOState(np.array([1.0, 0.0]), np.array([109.0, 0.0]), np.array([0.01, 0.01]))
    sel = select("adaserve", f, parent, valid, slo, 4, 0.1, 4, 5, serve_unreachable=False)
    np.testing.assert_array_equal(sel.sum(axis=1), [2, 2])
    np.testing.assert_array_equal(select("dynamic-tree", f, parent, valid, slo, 4, 0.1, 4, 5).sum(axis=1), [0, 4])


def test_ties_and_zero_probabilities_keep_parents_first():
    # all f equal: any top-k must still be parents-first; zero-f nodes are never taken by budgeted policies
    parent = np.array([[-1, 0, 1, 2, -1, 4]])
    f = np.array([[0.5, 0.5, 0.5, 0.5, 0.0, 0.0]])
    valid = np.ones_like(f, dtype=bool)
    for budget in range(7):
        sel = select("dynamic-tree", f, parent, valid, SLOState.no_slo(1), budget, 0.1, 6, 6)
        np.testing.assert_array_equal(sel[0], np.arange(6) < min(budget, 4))


# ---------------------------------------------------------------- fixed shapes (golden)

# root -> {0 (.6), 1 (.3)}; 0 -> {2 (.3), 3 (.2), 4 (.05)}; 1 -> 5 (.25); 2 -> {6 (.2), 7 (.05)};
# 3 -> 8 (.15); 6 -> 9 (.1); 7 -> 10 (.04)
GOLD_PARENT = np.array([[-1, -1, 0, 0, 0, 1, 2, 2, 3, 6, 7]])
GOLD_F = np.array([[0.6, 0.3, 0.3, 0.2, 0.05, 0.25, 0.2, 0.05, 0.15, 0.1, 0.04]])
GOLD_VALID = np.ones_like(GOLD_F, dtype=bool)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("chain:1", [0]),
        ("chain:3", [0, 2, 6]),
        ("chain:8", [0, 2, 6, 9]),
        ("static-tree:2,1", [0, 1, 2, 5]),
        ("static-tree:1,2,1", [0, 2, 3, 6, 8]),
        ("static-tree:2,3,2", [0, 1, 2, 3, 4, 5, 6, 7, 8]),
        ("static-tree", [0, 2, 6, 7, 9, 10]),  # (1, 1, 3, ...): 0 -> 2 -> {6, 7} -> 9, 10
    ],
)
def test_fixed_shapes_golden(name, expected):
    sel = select(name, GOLD_F, GOLD_PARENT, GOLD_VALID, SLOState.no_slo(1), 0, 0.1, 1, 0)
    assert np.nonzero(sel[0])[0].tolist() == expected  # budget 0 and n_max 0 do not apply


def test_fixed_shapes_break_sibling_ties_by_slot_and_skip_padding():
    parent = np.array([[-1, -1, -1, 0, 0]])
    f = np.array([[0.4, 0.4, 0.9, 0.2, 0.2]])
    valid = np.array([[1, 1, 0, 1, 1]], dtype=bool)  # slot 2 is padding despite its f
    sel = select("static-tree:1,1", f, parent, valid, SLOState.no_slo(1), 0, 0.1, 2, 0)
    assert np.nonzero(sel[0])[0].tolist() == [0, 3]


def test_none_and_empty():
    assert not select("none", GOLD_F, GOLD_PARENT, GOLD_VALID, SLOState.no_slo(1), 10, 0.1, 4, 4).any()
    empty = np.zeros((0, 4))
    for name in POLICIES:
        sel = select(name, empty, empty.astype(int), empty.astype(bool), SLOState.no_slo(0), 4, 0.1, 4, 4)
        assert sel.shape == (0, 4)


def test_bench_sized_batch():
    """256 requests x 64 candidates from the benchmark's generator: valid, within the budget."""
    from bench.selection_overhead import random_candidate_trees, random_slo_state

    rng = np.random.default_rng(1)
    f, parent, valid = random_candidate_trees(rng, 256, 64, 8)
    slo = random_slo_state(rng, 256, 0.1)
    for name in POLICIES:
        sel = select(name, f, parent, valid, slo, 1024, 0.1, 8, 32)
        assert tt.is_valid_tree(parent, sel), name
        if parse_policy(name).budgeted:
            assert sel.sum() == 1024 and sel.sum(axis=1).max() <= 32


def test_cross_request_ties_at_the_budget_cut():
    f, parent, valid = _chains([[0.5, 0.25], [0.5, 0.25], [0.5, 0.25]])
    for budget, expected in [(1, [1, 0, 0]), (2, [1, 1, 0]), (4, [2, 1, 1]), (5, [2, 2, 1])]:
        for name in ["dynamic-tree", "adaserve"]:
            sel = select(name, f, parent, valid, SLOState.no_slo(3), budget, 0.1, 2, 2)
            np.testing.assert_array_equal(sel.sum(axis=1), expected, err_msg=f"{name} budget {budget}")


def test_slo_state_must_match_the_batch():
    f, parent, valid = _chains([[0.5], [0.5]])
    with pytest.raises(ValueError, match="SLOState"):
        select("adaserve", f, parent, valid, SLOState.no_slo(3), 4, 0.1, 2, 2)


def test_min_path_prob_cuts_the_throughput_phase_but_not_slo_needs():
    import numpy as np

    from policies.tree_selection import SLOState, select

    f = np.array([[0.9, 0.5, 0.05, 0.01], [0.6, 0.3, 0.02, 0.01]], np.float32)
    parent = np.array([[-1, 0, 1, 2], [-1, 0, 1, 2]])
    valid = np.ones_like(f, bool)
    no_slo = SLOState.no_slo(2)
    keep = select("dynamic-tree", f, parent, valid, no_slo, 8, 0.05, 4, 8, min_path_prob=0.1)
    assert keep.tolist() == [[True, True, False, False], [True, True, False, False]]
    # request 0 is far behind its SLO: it needs A(r) = 4 tokens, so it keeps its unlikely nodes
    slo = SLOState(np.array([1.0, 0.0]), np.array([5, 0]), np.array([0.1, np.inf]))
    keep = select("adaserve", f, parent, valid, slo, 8, 0.05, 4, 8, min_path_prob=0.1)
    assert keep[0].all() and keep[1].tolist() == [True, True, False, False]
