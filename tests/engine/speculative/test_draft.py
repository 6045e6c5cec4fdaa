"""Model drafts: loading every kind, tree validity (beam and static), KV catch-up, vocabulary checks."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.engine.speculative import CandidateTree, Drafter, DraftRequest, load_draft_source
from app.engine.speculative.distilled import SHIPPED_WEIGHTS, read_draft_weights
from app.engine.weights import load_checkpoint, load_tokenizer
from train.export import save_draft_weights, save_feature_draft
from train.forward import fused_layer

PROMPT = "<|im_start|>user\nWrite a short poem about the sea and the wind.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def target():
    return load_checkpoint("embedded")


@pytest.fixture(scope="module")
def tokenizer(target):
    return load_tokenizer(target.tokenizer_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode(PROMPT, add_special_tokens=False)


@pytest.fixture(scope="module")
def distilled_file(target, tmp_path_factory):
    """An untrained distilled draft (target layers 0 and 29, 4096-row head) in the shipped format."""
    path = tmp_path_factory.mktemp("distilled") / "draft.safetensors"
    layers = [fused_layer(target.state_dict, i) for i in (0, 29)]
    vocab_ids = torch.arange(4096, dtype=torch.int64)
    save_draft_weights(path, layers, target.config, target.state_dict["model.embed_tokens.weight"], vocab_ids)
    return path


@pytest.fixture(scope="module")
def distilled(distilled_file, target):
    return load_draft_source(str(distilled_file), target=target, num_blocks=64)


def _tiny_llama_dir(target, path, vocab_size=None):
    """A random 2-layer Llama with the target's tokenizer files (kind (a): an independent HF causal LM)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": vocab_size or target.config.vocab_size, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True,
           "bos_token_id": 1, "eos_token_id": 2}
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    state = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], 64), "model.norm.weight": torch.ones(64)}
    for i in range(2):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": torch.ones(64), p + "post_attention_layernorm.weight":
                      torch.ones(64), p + "self_attn.q_proj.weight": rnd(64, 64), p + "self_attn.k_proj.weight":
                      rnd(32, 64), p + "self_attn.v_proj.weight": rnd(32, 64), p + "self_attn.o_proj.weight":
                      rnd(64, 64), p + "mlp.gate_proj.weight": rnd(128, 64), p + "mlp.up_proj.weight":
                      rnd(128, 64), p + "mlp.down_proj.weight": rnd(64, 128)})
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    for f in target.tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


def assert_valid_tree(tree: CandidateTree, vocab_size: int) -> None:
    m = tree.num_nodes
    assert tree.tokens.shape == tree.parent.shape == tree.draft_prob.shape == tree.path_prob.shape == (m,)
    assert tree.tokens.dtype == np.int64 and tree.parent.dtype == np.int64
    assert tree.draft_prob.dtype == np.float32 and tree.path_prob.dtype == np.float32
    assert ((tree.tokens >= 0) & (tree.tokens < vocab_size)).all()
    assert all(-1 <= p < i for i, p in enumerate(tree.parent.tolist()))  # parents first
    assert ((tree.draft_prob > 0) & (tree.draft_prob <= 1)).all()
    for i, p in enumerate(tree.parent.tolist()):
        expect = tree.draft_prob[i] * (tree.path_prob[p] if p >= 0 else 1.0)
        assert tree.path_prob[i] == pytest.approx(expect, rel=1e-5)
    # Siblings are distinct tokens whose probabilities sum to at most 1.
    for p in set(tree.parent.tolist()):
        kids = tree.parent == p
        assert len(set(tree.tokens[kids].tolist())) == int(kids.sum())
        assert tree.draft_prob[kids].sum() <= 1 + 1e-5


def test_distilled_beam_trees(distilled, target, prompt_ids):
    reqs = [DraftRequest("a", prompt_ids), DraftRequest("b", prompt_ids[:9])]
    trees = distilled.propose(reqs, depth=4, beam_width=3, topk=4)
    assert len(trees) == 2
    for tree in trees:
        assert_valid_tree(tree, target.config.vocab_size)
        assert tree.num_nodes == 4 + 3 * 3 * 4  # topk + (depth - 1) * beam_width * topk
        assert (tree.tokens < 4096).all()  # the subset head maps back to full ids inside its subset
        depth = tree.depths()
        assert np.bincount(depth)[1:].tolist() == [4, 12, 12, 12]
        # Beam: each level's parents are the beam_width highest-f nodes of the level above.
        for lvl in (2, 3, 4):
            parents = set(tree.parent[depth == lvl].tolist())
            above = np.flatnonzero(depth == lvl - 1)
            best = set(above[np.argsort(-tree.path_prob[above], kind="stable")[:3]].tolist())
            assert parents == best
    distilled.release("a")
    distilled.release("b")


def test_root_topk_widens_the_root_only(distilled, target, prompt_ids):
    req = [DraftRequest("w", prompt_ids)]
    base = distilled.propose(req, depth=3, beam_width=2, topk=3)[0]
    wide = distilled.propose(req, depth=3, beam_width=2, topk=3, root_topk=10)[0]
    assert_valid_tree(wide, target.config.vocab_size)
    d_base, d_wide = base.depths(), wide.depths()
    assert np.bincount(d_wide)[1:].tolist() == [10, 6, 6]  # root children, then beam 2 x top-3 as before
    # the root's top 3 are the narrow tree's; the deeper levels (same beam) are the same tokens and f
    np.testing.assert_array_equal(wide.tokens[d_wide == 1][:3], base.tokens[d_base == 1])
    assert (np.diff(wide.path_prob[d_wide == 1]) <= 0).all()
    for lvl in (2, 3):
        np.testing.assert_array_equal(wide.tokens[d_wide == lvl], base.tokens[d_base == lvl])
        np.testing.assert_allclose(wide.path_prob[d_wide == lvl], base.path_prob[d_base == lvl], rtol=1e-3)
    distilled.release("w")


def test_cut_offs_stop_drafting_what_selection_could_not_use(distilled, target, prompt_ids):
    req = [DraftRequest("c", prompt_ids)]
    full = distilled.propose(req, depth=4, beam_width=3, topk=4)[0]
    assert full.depths().max() == 4
    # Only frontier nodes with f >= min_path_prob are expanded: children hang under such parents only.
    cut = float(np.sort(full.path_prob[full.depths() == 1])[-2])  # keeps at most the top two level-1 nodes
    pruned = distilled.propose(req, depth=4, beam_width=3, topk=4, min_path_prob=cut)[0]
    assert_valid_tree(pruned, target.config.vocab_size)
    inner = pruned.parent[pruned.parent >= 0]
    assert (pruned.path_prob[inner] >= cut).all()
    assert pruned.num_nodes < full.num_nodes
    # A level whose frontiers' total f is below min_level_mass is not drafted at all.
    level1 = float(np.sort(full.path_prob[full.depths() == 1])[::-1][:3].sum())
    shallow = distilled.propose(req, depth=4, beam_width=3, topk=4, min_level_mass=level1 * 1.01)[0]
    assert shallow.depths().max() == 1 and shallow.num_nodes == 4
    deep = distilled.propose(req, depth=4, beam_width=3, topk=4, min_level_mass=level1 * 0.99)[0]
    assert deep.depths().max() >= 2
    distilled.release("c")


def test_static_tree_shape(distilled, target, prompt_ids):
    widths = (1, 1, 3, 1, 1)
    [tree] = distilled.propose([DraftRequest("s", prompt_ids)], depth=0, beam_width=1, topk=1, widths=widths)
    assert_valid_tree(tree, target.config.vocab_size)
    assert np.bincount(tree.depths())[1:].tolist() == [1, 1, 3, 3, 3]
    distilled.release("s")


def test_shipped_distilled_draft_loads_and_proposes(target, prompt_ids):
    assert SHIPPED_WEIGHTS.exists() and SHIPPED_WEIGHTS.stat().st_size <= 25 * 2**20
    tensors, meta = read_draft_weights(SHIPPED_WEIGHTS)
    assert all(not k.startswith("model.embed") for k in tensors)  # only trained tensors ship
    drafter = load_draft_source("distilled", target=target, num_blocks=32)
    [tree] = drafter.propose([DraftRequest("x", prompt_ids)], depth=3, beam_width=2, topk=3)
    assert_valid_tree(tree, target.config.vocab_size)
    assert tree.num_nodes == 3 + 2 * 2 * 3


def test_independent_hf_draft(target, prompt_ids, tmp_path):
    path = _tiny_llama_dir(target, tmp_path / "tiny")
    drafter = load_draft_source(str(path), target=target, num_blocks=32)
    assert drafter.model.config.num_layers == 2 and drafter.vocab_ids is None
    trees = drafter.propose([DraftRequest("a", prompt_ids), DraftRequest("b", prompt_ids[:5])],
                            depth=3, beam_width=2, topk=2)
    for tree in trees:
        assert_valid_tree(tree, target.config.vocab_size)
        assert tree.num_nodes == 2 + 2 * 2 * 2


def test_vocabulary_mismatch_is_a_clear_error(target, tmp_path):
    # Same size, two token ids swapped.
    path = _tiny_llama_dir(target, tmp_path / "swapped")
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different vocabulary"):
        load_draft_source(str(path), target=target, num_blocks=8)
    # A different size.
    path = _tiny_llama_dir(target, tmp_path / "smaller", vocab_size=1000)
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if v < 1000}
    tok["model"]["merges"] = []
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < 1000]
    (path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different vocabulary"):
        load_draft_source(str(path), target=target, num_blocks=8)


def test_distilled_draft_for_another_target_is_an_error(distilled_file, target):
    embed = target.state_dict["model.embed_tokens.weight"]
    other = replace(target, state_dict={**target.state_dict, "model.embed_tokens.weight": embed * 2})
    with pytest.raises(ValueError, match="different target"):
        load_draft_source(str(distilled_file), target=other)


def _same_trees(a: CandidateTree, b: CandidateTree) -> None:
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.parent.tolist() == b.parent.tolist()
    np.testing.assert_allclose(a.path_prob, b.path_prob, rtol=1e-3, atol=1e-6)


def test_catch_up_after_partial_acceptance_matches_fresh_prefill(distilled, prompt_ids):
    model = distilled.model
    stepper, fresh = Drafter(model, 64), Drafter(model, 64)
    ctx = prompt_ids[:-3]
    stepper.propose([DraftRequest("r", ctx)], depth=4, beam_width=2, topk=3)
    assert stepper.num_cached_tokens("r") == len(ctx)
    # The target accepted two draft tokens and emitted a bonus token: three new tokens after the old root.
    accepted = prompt_ids
    got = stepper.propose([DraftRequest("r", accepted)], depth=4, beam_width=2, topk=3)
    want = fresh.propose([DraftRequest("f", accepted)], depth=4, beam_width=2, topk=3)
    _same_trees(got[0], want[0])
    # Diverged history (e.g. recomputed after preemption): recompute from the common prefix.
    diverged = prompt_ids[:-2] + [1000, 2000]
    got = stepper.propose([DraftRequest("r", diverged)], depth=3, beam_width=2, topk=2)
    want = Drafter(model, 64).propose([DraftRequest("g", diverged)], depth=3, beam_width=2, topk=2)
    _same_trees(got[0], want[0])
    assert stepper.num_cached_tokens("r") == len(diverged)
    # The same tokens again (nothing new): the root is recomputed, the proposal is unchanged.
    again = stepper.propose([DraftRequest("r", diverged)], depth=3, beam_width=2, topk=2)
    _same_trees(again[0], got[0])
    free = stepper.kv.allocator.num_free
    stepper.release("r")
    assert stepper.kv.allocator.num_free > free and stepper.num_cached_tokens("r") == 0


def test_out_of_kv_blocks_gives_an_empty_tree(distilled, prompt_ids):
    small = Drafter(distilled.model, num_kv_blocks=3, block_size=16)  # 48 slots
    long_req = DraftRequest("long", (prompt_ids * 3)[:60])
    short_req = DraftRequest("short", prompt_ids[:10])
    trees = small.propose([long_req, short_req], depth=3, beam_width=2, topk=2)
    assert trees[0].num_nodes == 0
    assert trees[1].num_nodes == 2 + 2 * 2 * 2


def test_tree_too_large_is_rejected(distilled, prompt_ids):
    with pytest.raises(ValueError, match="tree forward"):
        distilled.propose([DraftRequest("big", prompt_ids)], depth=10, beam_width=8, topk=8)


# ---- the feature draft (EAGLE style) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def feature_file(target, tmp_path_factory):
    """An untrained feature draft (fc = [I I], target layer 29, 4096-row head) in the shipped format."""
    path = tmp_path_factory.mktemp("feature") / "draft.safetensors"
    H = target.config.hidden_size
    torch.manual_seed(0)
    fc = torch.cat([torch.eye(H), torch.eye(H)], dim=1) + 0.02 * torch.randn(H, 2 * H)
    save_feature_draft(path, fc, fused_layer(target.state_dict, 29), target.state_dict["model.norm.weight"],
                       target.config, target.state_dict["model.embed_tokens.weight"],
                       torch.arange(4096, dtype=torch.int64))
    return path


@pytest.fixture(scope="module")
def target_hidden(target, prompt_ids):
    """The target's final-normed hidden states of prompt_ids (fp32, paged forward)."""
    from train.evaluate import target_hidden_states
    from app.engine.model import LlamaModel

    model = LlamaModel(target.config, target.state_dict, torch.float32, torch.device("cpu"))
    return target_hidden_states(model, [(prompt_ids, [])])[0]


def _feature_drafter(feature_file, target, blocks=64):
    drafter = load_draft_source(str(feature_file), target=target, num_blocks=blocks)
    assert drafter.uses_features and drafter.model.config.num_layers == 1
    return drafter


def test_feature_draft_beam_trees(feature_file, target, prompt_ids, target_hidden):
    drafter = _feature_drafter(feature_file, target)
    drafter.record_hidden("a", 0, target_hidden)
    drafter.record_hidden("b", 0, target_hidden[:9])
    trees = drafter.propose([DraftRequest("a", prompt_ids), DraftRequest("b", prompt_ids[:10])],
                            depth=3, beam_width=2, topk=3)
    for tree in trees:
        assert_valid_tree(tree, target.config.vocab_size)
        assert tree.num_nodes == 3 + 2 * 2 * 3
    for r in ("a", "b"):
        drafter.release(r)
    assert not drafter.features and drafter.kv.allocator.num_free == drafter.kv.allocator.num_blocks


def test_feature_draft_needs_the_target_hidden_states(feature_file, target, prompt_ids, target_hidden):
    drafter = _feature_drafter(feature_file, target)
    with pytest.raises(ValueError, match="hidden states"):
        drafter.propose([DraftRequest("x", prompt_ids)], depth=2, beam_width=1, topk=2)
    drafter.record_hidden("y", 0, target_hidden[:5])
    with pytest.raises(ValueError, match="hidden states"):
        drafter.record_hidden("y", 7, target_hidden[7:9])  # a gap
    # A one-token prompt has no hidden state before its root: an empty tree, not an error.
    assert drafter.propose([DraftRequest("z", prompt_ids[:1])], depth=2, beam_width=1, topk=2)[0].num_nodes == 0


def test_feature_catch_up_after_partial_acceptance_matches_fresh_prefill(feature_file, target, prompt_ids,
                                                                          target_hidden):
    drafter = _feature_drafter(feature_file, target)
    stepper = type(drafter)(drafter.model, 64)
    ctx = prompt_ids[:-3]
    stepper.record_hidden("r", 0, target_hidden[: len(ctx) - 1])
    stepper.propose([DraftRequest("r", ctx)], depth=4, beam_width=2, topk=3)
    # The target verified the root and two accepted nodes (their hidden states arrive) and emitted a bonus.
    stepper.record_hidden("r", len(ctx) - 1, target_hidden[len(ctx) - 1: len(prompt_ids) - 1])
    got = stepper.propose([DraftRequest("r", prompt_ids)], depth=4, beam_width=2, topk=3)
    fresh = type(drafter)(drafter.model, 64)
    fresh.record_hidden("f", 0, target_hidden)
    want = fresh.propose([DraftRequest("f", prompt_ids)], depth=4, beam_width=2, topk=3)
    _same_trees(got[0], want[0])
    again = stepper.propose([DraftRequest("r", prompt_ids)], depth=4, beam_width=2, topk=3)
    _same_trees(again[0], got[0])
