"""Prompt-lookup drafting and multi-source trees: the n-gram index, calibrated statistics, merging, and the
engine end to end (lossless for every policy with lookup alone and merged with a model draft, the target's
sampling distribution preserved, copied text accepted from lookup nodes)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.engine.config import SamplingParams
from app.engine.speculative.calibration import BetaCounts, CalibrationTable
from app.engine.speculative.factory import load_draft_source, parse_sources
from app.engine.speculative.multi import MultiSourceDrafter, agreement_cell
from app.engine.speculative.ngram import NgramConfig, NgramIndex, NgramSource, cell_features, cell_index
from app.engine.speculative.source import CandidateTree, DraftRequest, DraftSource
from app.engine.engine import LLMEngine
from app.engine.speculative.tree import VerifyTree
from policies import token_tree
from tests.engine.test_spec import POLICIES, _spec_engine, assert_first_two_tokens_follow_target, plain_greedy
from tests.engine.test_spec import _run_staggered as run_staggered
from tests.engine.test_spec import random_draft_dir  # noqa: F401

PARAGRAPH = ("The river flows through the old town, past the stone bridge and the market square, where merchants "
             "sell bread, cheese and fresh vegetables every morning. In the evening the lamps are lit and people "
             "walk slowly along the water, talking about the day.")
PROMPTS = ["def fibonacci(n):", "Write a poem about the sea.", "1, 2, 3, 4,",
           "Repeat exactly: the cat sat on the mat, the cat sat on the mat,", "The quick brown fox",
           "List the planets of the solar system:"]
NEW_TOKENS = 16


# ---- the n-gram index ----------------------------------------------------------------------------------------

def _brute_matches(tokens: list[int], lo: int, hi: int) -> set[int]:
    """End positions p < L-1 where some n in [lo, hi] tokens before p+1 equal the last n tokens."""
    length = len(tokens)
    return {p for n in range(lo, hi + 1) for p in range(n - 1, length - 1)
            if length >= n and tokens[p - n + 1:p + 1] == tokens[length - n:]}


def test_index_matches_brute_force_with_incremental_updates():
    rng = random.Random(0)
    for _ in range(150):
        vocab = rng.choice([2, 4, 30])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 50))]
        lo = rng.randrange(1, 3)
        hi = lo + rng.randrange(0, 3)
        index = NgramIndex(lo, hi)
        index.update(tokens[:rng.randrange(1, len(tokens) + 1)])
        for _ in range(4):
            tokens = tokens + [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
            index.update(tokens)
            found = index.matches(tokens, 10_000)
            assert {p for p, _ in found} == _brute_matches(tokens, lo, hi)
            for p, m in found:  # measured length: a real match, at least as long as an indexed n
                assert tokens[p - m + 1:p + 1] == tokens[len(tokens) - m:]


def test_incremental_index_equals_a_fresh_build():
    rng = random.Random(1)
    tokens = [rng.randrange(5) for _ in range(40)]
    grown = NgramIndex(1, 4)
    grown.update(tokens[:3])
    for k in range(4, len(tokens) + 1):
        grown.update(tokens[:k])
    fresh = NgramIndex(1, 4)
    fresh.update(tokens)
    assert grown.heads == fresh.heads and grown.prev == fresh.prev and grown.tail == fresh.tail


def test_longest_match_first_then_newest():
    # positions:  0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [7, 1, 2, 3, 9, 5, 2, 3, 8, 1, 2, 3]
    index = NgramIndex(1, 4)
    index.update(tokens)
    # suffix "1 2 3" ends at 3 (length 3) and "2 3" at 7 (length 2): the longer match ranks first though older
    assert index.matches(tokens, 10) == [(3, 3), (7, 2)]
    assert index.matches(tokens, 1) == [(3, 3)]


def test_history_change_resets_the_index():
    index = NgramIndex(1, 3)
    index.update([1, 2, 3, 1, 2])
    assert index.matches([1, 2, 3, 1, 2], 10) == [(1, 2)]
    index.update([5, 6, 5])  # another request reused the id: rebuilt, no stale matches
    assert index.matches([5, 6, 5], 10) == [(0, 1)]


def test_lookup_tree_branches_and_chains():
    src = NgramSource(NgramConfig(min_n=1, max_n=3, max_branches=2, min_depth=1))
    # "a b" occurred twice, followed by "c d" and by "x y": two sibling branches; the newer one is primary
    a, b, c, d, x, y, z = range(10, 17)
    tokens = [a, b, c, d, z, a, b, x, y, z, a, b]
    tree = src.propose([DraftRequest("r", tokens)], depth=3)[0]
    assert tree.parent.tolist() == [-1, 0, 1, -1, 3, 4]
    assert tree.tokens.tolist() == [x, y, z, c, d, z]
    # f = product of the cells' means along the path, primary above the alternative
    means = src.acceptance.means_array()
    assert tree.path_prob[2] == pytest.approx(np.prod(means[tree.cell[:3]]), rel=1e-5)
    assert tree.path_prob[0] > tree.path_prob[3]
    assert [cell_features(int(k))[1:] for k in tree.cell] == [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1)]
    assert (tree.path_prob[1:3] <= tree.path_prob[0:2]).all()
    # chains are min_depth deep whatever the model's depth (static shapes keep their own)
    deep = NgramSource(NgramConfig(min_depth=6)).propose([DraftRequest("r", list(range(20)) * 2)], depth=2)[0]
    assert deep.num_nodes == 6 and deep.parent.tolist() == [-1, 0, 1, 2, 3, 4]
    assert NgramSource(NgramConfig(min_depth=6)).propose([DraftRequest("r", list(range(20)) * 2)], depth=2,
                                                          widths=(1, 1))[0].num_nodes == 2
    # no match -> empty tree; release drops the index
    assert src.propose([DraftRequest("s", [1, 2, 3])], depth=4)[0].num_nodes == 0
    src.release("r")
    src.release("s")
    assert not src.indexes


def test_ngram_config_parse():
    assert NgramConfig.parse("ngram") == NgramConfig()
    assert NgramConfig.parse("ngram:2-5") == NgramConfig(min_n=2, max_n=5)
    assert NgramConfig.parse("ngram:anchors=3") == NgramConfig(max_anchors=3)
    assert NgramConfig.parse("ngram:2-5:anchors=1") == NgramConfig(min_n=2, max_n=5, max_anchors=1)
    for bad in ["ngram:5-2", "ngram:anchors=-1", "ngram:depth=3", "ngram:x"]:
        with pytest.raises(ValueError):
            NgramConfig.parse(bad)
    assert parse_sources(" distilled , ngram ") == ["distilled", "ngram"]
    with pytest.raises(ValueError, match="repeat"):
        parse_sources("ngram,ngram")


# ---- calibration ---------------------------------------------------------------------------------------------

def test_beta_counts_converge_and_back_off():
    rng = np.random.default_rng(0)
    prior = np.full(6, 0.5)
    stats = BetaCounts(prior, groups=np.array([0, 0, 0, 1, 1, 1]), prior_strength=2.0, window=4096)
    true = np.array([0.8, 0.6, 0.0, 0.2, 0.0, 0.0])
    for _ in range(40):
        cells = rng.choice([0, 1, 3], size=100)
        stats.update(cells, rng.random(100) < true[cells])
    m = stats.means_array()
    assert abs(m[0] - 0.8) < 0.03 and abs(m[1] - 0.6) < 0.03 and abs(m[3] - 0.2) < 0.03
    # cells without data follow their group's pooled rate, not the prior
    assert abs(m[2] - 0.7) < 0.05 and abs(m[4] - 0.2) < 0.05
    # the window bounds memory: a drifted rate takes over
    for _ in range(200):
        stats.update(np.zeros(100, np.int64), rng.random(100) < 0.3)
    assert abs(stats.means_array()[0] - 0.3) < 0.04


def test_calibration_table_bins():
    table = CalibrationTable()
    table.update(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0, 0, 1, 0]))
    rows = table.rows()
    assert [(r["count"], r["observed"]) for r in rows] == [(2, 0.0), (2, 0.5)]
    assert table.ece() == pytest.approx((2 * 0.05 + 2 * 0.45) / 4)


def test_lookup_statistics_converge_on_a_synthetic_stream():
    """A periodic stream makes the lookup propose a chain every step; a simulated target accepts each node with
    probability P_TRUE given its parent; the (length, depth) statistics converge to P_TRUE."""
    p_true = 0.6
    rng = np.random.default_rng(0)
    drafter = MultiSourceDrafter([NgramSource(NgramConfig(min_n=1, max_n=4, min_depth=1))])
    tokens = [1, 2, 3, 4, 5, 6] * 10
    for step in range(3000):
        cand = drafter.propose([DraftRequest("r", tokens)], depth=4, beam_width=1, topk=1)[0]
        m = cand.num_nodes
        assert m >= 4
        tree = VerifyTree(tokens=[tokens[-1]] + cand.tokens.tolist(), parents=[-1] + (cand.parent + 1).tolist(),
                          path_prob=[1.0] + cand.path_prob.tolist(), slots=[-1] + list(range(m)))
        path, node = [0], 0
        while True:  # the periodic stream gives one chain: accept each node with probability p_true
            kids = [i for i in range(1, m + 1) if tree.parents[i] == node]
            if not kids or rng.random() >= p_true:
                break
            node = kids[0]
            path.append(node)
        drafter.observe("r", cand, tree, path)
    stats = drafter.sources[0].acceptance
    counts, means = stats.counts(), stats.means_array()
    seen = np.flatnonzero(counts > 100)
    assert len(seen) >= 3  # depths 1..4 of the longest match's primary chain
    assert np.abs(means[seen] - p_true).max() < 0.05
    # f of a fresh proposal is the product of the learnt rates along the chain
    f = drafter.propose([DraftRequest("r", tokens)], depth=4, beam_width=1, topk=1)[0].path_prob
    assert f[:4] == pytest.approx([p_true ** k for k in range(1, 5)], abs=0.06)
    st = drafter.stats()
    assert st["accepted_per_step"] == pytest.approx(1 + sum(p_true ** k for k in range(1, 5)), abs=0.15)
    assert st["calibration"]["ngram"]["ece"] < 0.06


# ---- merging -------------------------------------------------------------------------------------------------

class _FixedSource(DraftSource):
    def __init__(self, name, trees):
        self.name, self.trees, self.released = name, trees, []

    def propose(self, reqs, depth, beam_width, topk, widths=None, min_path_prob=0.0, min_level_mass=0.0, root_topk=0):
        return [self.trees[r.request_id] for r in reqs]

    def release(self, request_id):
        self.released.append(request_id)


def _tree(tokens, parent, f):
    f = np.asarray(f, np.float32)
    parent = np.asarray(parent, np.int64)
    return CandidateTree(np.asarray(tokens, np.int64), parent,
                         f / np.where(parent >= 0, f[np.maximum(parent, 0)], 1).astype(np.float32), f)


def test_duplicate_tokens_under_one_parent_are_merged():
    model = _tree([5, 6, 7, 8], [-1, -1, 0, 1], [0.5, 0.3, 0.2, 0.1])  # 5 -> 7, 6 -> 8
    lookup = _tree([5, 7, 9, 6], [-1, 0, 1, -1], [0.9, 0.8, 0.7, 0.05])  # 5 -> 7 -> 9, 6
    drafter = MultiSourceDrafter([_FixedSource("model", {"r": model}), _FixedSource("lookup", {"r": lookup})])
    out = drafter.propose([DraftRequest("r", [1, 2])], depth=3, beam_width=2, topk=2)[0]
    assert out.tokens.tolist() == [5, 6, 7, 8, 9]
    assert out.parent.tolist() == [-1, -1, 0, 1, 2]
    assert out.path_prob.tolist() == pytest.approx([0.9, 0.3, 0.8, 0.1, 0.7])  # max of the sources' f
    assert out.source.tolist() == [3, 3, 3, 1, 2]  # bit 0 = model, bit 1 = lookup
    assert token_tree.is_valid_tree(out.parent[None], np.ones((1, 5), bool))
    assert (out.path_prob[out.parent >= 0] <= out.path_prob[out.parent[out.parent >= 0]]).all()
    assert out.draft_prob[2] == pytest.approx(0.8 / 0.9)
    # verify feedback: 5 and 7 accepted (shared nodes), 9 rejected
    tree = VerifyTree(tokens=[2, 5, 7, 9], parents=[-1, 0, 1, 2], path_prob=[1.0, 0.9, 0.8, 0.7], slots=[-1, 0, 2, 4])
    drafter.observe("r", out, tree, [0, 1, 2])
    st = drafter.stats()
    assert st["accepted_per_step_by_source"] == {"model": 2.0, "lookup": 2.0}
    assert st["accepted_per_step_only"] == {"model": 0.0, "lookup": 0.0, "shared": 2.0}
    assert st["calibration"]["model"]["count"] == 2 and st["calibration"]["lookup"]["count"] == 3
    drafter.release("r")
    assert drafter.sources[0].released == ["r"] and not drafter._proposals


def test_query_with_an_extension_finds_what_committing_it_would():
    rng = np.random.default_rng(1)
    for _ in range(30):
        tokens = rng.integers(0, 6, int(rng.integers(2, 60))).tolist()
        extra = rng.integers(0, 6, int(rng.integers(1, 4))).tolist()
        index = NgramIndex(1, 4)
        index.update(tokens)
        whole = NgramIndex(1, 4)
        whole.update(tokens + extra)
        expect = [(p, m) for p, m in whole.matches(tokens + extra, 1000) if p < len(tokens) - 1]
        got = index.matches(tokens, 1000, extra=extra)
        assert sorted(got) == sorted(expect)


def test_lookup_resumes_under_a_model_draft_node():
    a, b, c, d, e, x, z = range(20, 27)
    tokens = [7, a, b, c, d, e, 8, x]  # x never occurred before: a plain lookup finds nothing
    src = NgramSource(NgramConfig(min_depth=4, max_anchors=2))
    model = _tree([a, z, b], [-1, -1, 0], [0.6, 0.3, 0.5])  # the draft guesses a (then b), or z
    assert src.propose([DraftRequest("r", tokens)], depth=4)[0].num_nodes == 0
    tree = src.propose([DraftRequest("r", tokens)], depth=4, anchors=[model])[0]
    # anchors: a (f 0.6) and a -> b (0.5); z is not in the prompt. Under a: copy of a, then b c d e.
    # Under a -> b: copies of a, b, then c d e 8.
    assert tree.tokens.tolist() == [a, b, c, d, e, a, b, c, d, e, 8]
    assert tree.parent.tolist() == [-1, 0, 1, 2, 3, -1, 5, 6, 7, 8, 9]
    assert tree.anchor_copy.tolist() == [True] + [False] * 4 + [True, True] + [False] * 4
    assert (tree.cell[tree.anchor_copy] == -1).all() and (tree.cell[~tree.anchor_copy] >= 0).all()
    means = src.acceptance.means_array()
    assert tree.path_prob[1] == pytest.approx(0.6 * means[tree.cell[1]], rel=1e-5)  # anchor f x chain q
    assert tree.path_prob[7] == pytest.approx(0.5 * means[tree.cell[7]], rel=1e-5)
    # merged: the copies fold onto the model's nodes, which stay the model's alone
    drafter = MultiSourceDrafter([_FixedSource("model", {"r": model}), src])
    out = drafter.propose([DraftRequest("r", tokens)], depth=4, beam_width=2, topk=2)[0]
    assert token_tree.is_valid_tree(out.parent[None], np.ones((1, out.num_nodes), bool))
    # a and z are the model's alone; b is also the first node of the chain under a (bits: 1 model, 2 lookup)
    assert out.tokens[:3].tolist() == [a, z, b] and out.source[:3].tolist() == [1, 1, 3]
    # b: the draft and the lookup agree, so its q is the agreement table's (depth 2, model q 0.5 / 0.6)
    q_agree = drafter.agreement.means_array()[agreement_cell(np.array([2]), np.array([0.5 / 0.6]))[0]]
    assert q_agree > 0.5 / 0.6
    assert out.path_prob[:3].tolist() == pytest.approx([0.6, 0.3, 0.6 * q_agree], rel=1e-5)
    # both chains fold into one: a -> b -> c -> d -> e -> 8, the part below b from lookup only
    assert out.tokens[3:].tolist() == [c, d, e, 8] and out.parent[3:].tolist() == [2, 3, 4, 5]
    assert out.source[3:].tolist() == [2, 2, 2, 2]


def test_agreement_sets_q_of_shared_lookup_nodes_and_learns_apart_from_the_lookup_cells():
    # prompt ... 5 6 7 8 ... 5: the lookup proposes 6 7 8 under the root; the model guesses 6 (q 0.1) and 9
    tokens = [1, 5, 6, 7, 8, 2, 5]
    src = NgramSource(NgramConfig(min_depth=3))
    model = _tree([6, 9], [-1, -1], [0.1, 0.05])
    drafter = MultiSourceDrafter([_FixedSource("model", {"r": model}), src])
    out = drafter.propose([DraftRequest("r", tokens)], depth=3, beam_width=2, topk=2)[0]
    assert out.tokens.tolist() == [6, 9, 7, 8] and out.source.tolist() == [3, 1, 2, 2]
    look = src.propose([DraftRequest("r2", tokens)], depth=3)[0]  # the lookup's own tree: 6 7 8
    q_look = look.path_prob / np.concatenate([[1.0], look.path_prob[:-1]])
    cell = int(agreement_cell(np.array([1]), np.array([0.1]))[0])
    q6 = drafter.agreement.means_array()[cell]
    assert q6 > max(0.1, q_look[0])  # agreement beats either source alone
    # the chain below the shared node inherits its f: f = q6 x the lookup's own conditionals
    assert out.path_prob.tolist() == pytest.approx([q6, 0.05, q6 * q_look[1], q6 * q_look[1] * q_look[2]], rel=1e-5)
    assert out.draft_prob[[0, 2, 3]].tolist() == pytest.approx([q6, q_look[1], q_look[2]], rel=1e-5)
    # feedback: 6 rejected (9 accepted instead). The agreement cell learns it, and so does the lookup's cell of 6
    # (a lookup's cells learn from every node it proposed: learning only from its unshared ones cost 6% of the
    # tokens per tree under the CPU's priced cut); 7's parent was rejected, so 7 teaches nothing.
    before = src.acceptance.counts().copy()
    tree = VerifyTree(tokens=[5, 6, 9, 7], parents=[-1, 0, 0, 1], path_prob=[1.0, *out.path_prob[[0, 1, 2]]],
                      slots=[-1, 0, 1, 2])
    for _ in range(20):
        drafter.propose([DraftRequest("r", tokens)], depth=3, beam_width=2, topk=2)
        drafter.observe("r", drafter._proposals["r"].tree, tree, [0, 2])
    drafter._flush()
    assert drafter.agreement.means_array()[cell] < 0.2 < q6
    learned = src.acceptance.counts() - before
    assert learned[look.cell[0]] == pytest.approx(20) and learned.sum() == pytest.approx(20)


def test_merge_caps_candidates_to_a_valid_tree():
    rng = np.random.default_rng(0)
    m = 60
    parent = np.array([-1] + [int(rng.integers(-1, i)) for i in range(1, m)])
    q = rng.random(m).astype(np.float32)
    f = token_tree.path_probs(parent[None], q[None], np.ones((1, m), bool))[0]
    lookup = _tree(list(range(1000, 1008)), [-1, 0, 1, 2, 3, 4, 5, 6], [0.9 ** k for k in range(1, 9)])
    model = _tree(list(rng.integers(0, 50, m)), parent, f)
    drafter = MultiSourceDrafter([_FixedSource("m", {"r": model}), _FixedSource("n", {"r": lookup})],
                                 max_candidates=20)
    out = drafter.propose([DraftRequest("r", [1])], depth=8, beam_width=4, topk=4)[0]
    assert out.num_nodes == 20
    assert token_tree.is_valid_tree(out.parent[None], np.ones((1, 20), bool))
    best = np.sort(np.concatenate([f.astype(np.float32), lookup.path_prob]))[-20:]
    assert np.sort(out.path_prob) == pytest.approx(best)  # the top 20 by f
    kept = [t - 1000 for t in out.tokens.tolist() if t >= 1000]
    assert kept == list(range(len(kept))) and len(kept) >= 1  # a prefix of the lookup chain


# ---- the engine ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_outputs():
    return plain_greedy(PROMPTS)


def _run_staggered(engine: LLMEngine, policies: list[str], slo_ms: list[float | None]) -> dict[str, list[int]]:
    return run_staggered(engine, policies, slo_ms, PROMPTS)


def _check_released(engine: LLMEngine) -> None:
    assert engine.kv.allocator.num_free == engine.kv.allocator.num_blocks
    drafter = engine.speculator.drafter
    assert isinstance(drafter, MultiSourceDrafter) and not drafter._proposals
    for src in drafter.sources:
        if isinstance(src, NgramSource):
            assert not src.indexes
        else:
            assert not src.seqs and src.kv.allocator.num_free == src.kv.allocator.num_blocks
            assert not getattr(src, "features", None)


@pytest.mark.parametrize("draft", ["ngram", "distilled,ngram", "random,ngram", "feature,ngram"])
def test_greedy_is_lossless_for_every_policy_on_staggered_batches(draft, random_draft_dir, plain_outputs):
    """One staggered run per source list; the requests cycle through every policy (and SLOs)."""
    spec = draft.replace("random", str(random_draft_dir))
    engine = _spec_engine(spec, max_draft_depth=4, token_budget=24)  # small trees keep the test fast
    outs = _run_staggered(engine, POLICIES, [None, 5.0, 1000.0])
    assert outs == plain_outputs
    assert engine.scheduler.totals.tree_nodes > 0
    st = engine.speculator.drafter.stats()
    assert st["accepted_per_step_by_source"]["ngram"] > 0  # lookup nodes were accepted
    _check_released(engine)


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["ngram", "distilled,ngram", "random,ngram"])
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_is_lossless_per_policy(draft, policy, random_draft_dir, plain_outputs):
    engine = _spec_engine(draft.replace("random", str(random_draft_dir)), policy=policy)
    assert _run_staggered(engine, [policy], [None, 5.0, 1000.0]) == plain_outputs
    _check_released(engine)


def test_copied_paragraph_is_accepted_from_lookup_nodes():
    """A merged draft (model + lookup) on 'Repeat exactly: <paragraph>': the selection takes the lookup nodes."""
    engine = _spec_engine("distilled,ngram", token_budget=64, max_num_batched_tokens=512, prefill_chunk_tokens=256)
    out = engine.generate(["Repeat exactly: " + PARAGRAPH], SamplingParams(max_tokens=48), chat=True)[0]
    st = engine.speculator.drafter.stats()
    from_lookup = st["accepted_per_step_by_source"]["ngram"] * st["spec_steps"]
    assert len(out.token_ids) >= 40
    assert from_lookup / len(out.token_ids) > 0.5
    assert st["accepted_per_step"] > 3


def test_load_draft_source_routes_specs(embedded_checkpoint):
    from app.engine.speculative import Drafter

    assert isinstance(load_draft_source("ngram", target=embedded_checkpoint), MultiSourceDrafter)
    single = load_draft_source("distilled", target=embedded_checkpoint, num_blocks=4)
    assert isinstance(single, Drafter)
    both = load_draft_source(["distilled", "ngram:2-5"], target=embedded_checkpoint, num_blocks=4)
    assert both.names == ["distilled", "ngram"] and both.sources[1].config == NgramConfig(2, 5)


@pytest.mark.slow
def test_sampling_with_merged_sources_matches_target_distribution():
    """First two tokens at temperature 1 (top-k 4) on a repetitive prompt (lookup nodes are accepted often)
    against the target's exact joint distribution; chi-square at significance 0.001, seeds fixed."""
    e = _spec_engine("distilled,ngram", token_budget=512, max_num_seqs=64, max_num_batched_tokens=2048,
                     prefill_chunk_tokens=2048, num_kv_blocks=1024)  # budget: 64 decodes + ~7 nodes each
    prompt = "red green blue red green blue red green blue red green"
    n = 600
    params = [SamplingParams(max_tokens=2, temperature=1.0, top_k=4, seed=s, ignore_eos=True) for s in range(n)]
    outs = e.generate([prompt] * n, params, policy="dynamic-tree")
    st = e.speculator.drafter.stats()
    assert st["accepted_per_step_by_source"]["ngram"] > 0.3
    assert_first_two_tokens_follow_target(e, prompt, params[0], outs)


def test_cell_index_roundtrip():
    for b in range(3):
        for d in range(1, 20):
            for br in (0, 1):
                bb, dd, bbr = cell_features(cell_index(b, d, br))
                assert (bb, bbr) == (b, br) and dd == min(d, 16)
