"""The dense training forwards (train/forward.py) compute what the serving model and the feature draft compute."""

from __future__ import annotations

import numpy as np
import torch
from safetensors import safe_open

from app.engine.layers import rms_norm
from app.engine.model import LlamaModel
from app.engine.speculative import DraftRequest, load_draft_source
# the embedded target, a prompt, its hidden states and an untrained feature draft file
from tests.engine.speculative.test_draft import feature_file, prompt_ids, target, target_hidden, tokenizer  # noqa: F401
from train.forward import dense_forward, feature_forward_train, fused_layer, rope_for_length


def test_dense_forward_equals_the_paged_forward(target, prompt_ids, target_hidden):
    """Every target layer over a padded batch of one (SDPA, causal) gives the serving model's hidden states."""
    model = LlamaModel(target.config, target.state_dict, torch.float32, torch.device("cpu"))
    layers = [fused_layer(target.state_dict, i) for i in range(target.config.num_layers)]
    ids = torch.tensor([prompt_ids])
    cos, sin = rope_for_length(target.config, ids.shape[1], torch.float32, ids.device)
    with torch.no_grad():
        h = dense_forward(layers, model.embed[ids], target.config, cos, sin)
        h = rms_norm(h, model.norm, target.config.rms_norm_eps)[0]
    torch.testing.assert_close(h, target_hidden, rtol=1e-4, atol=1e-4)  # the paged forward's, per prompt token


def test_feature_draft_equals_its_training_forward(feature_file, target, prompt_ids, target_hidden):
    """The serving path (paged catch-up, then a tree level fed with the draft's own output) computes what the
    unrolled training forward computes: pass 0 on the target's features, pass 1 on the draft's estimates."""
    drafter = load_draft_source(str(feature_file), target=target, num_blocks=64)
    drafter.record_hidden("c", 0, target_hidden)
    [tree] = drafter.propose([DraftRequest("c", prompt_ids)], depth=2, beam_width=1, topk=1)
    assert tree.num_nodes == 2
    with safe_open(str(feature_file), framework="pt") as f:
        t = {k: f.get_tensor(k).float() for k in f.keys()}
    layer = fused_layer({k: v for k, v in t.items() if k.startswith("model.layers.")}, 0)
    ids = torch.tensor([prompt_ids + [int(tree.tokens[0])]])
    feats = torch.cat([target_hidden, torch.zeros(1, target_hidden.shape[1])])[None]  # last feature unused
    cos, sin = rope_for_length(target.config, ids.shape[1] - 1, torch.float32, ids.device)
    embed = target.state_dict["model.embed_tokens.weight"].float()
    gs = feature_forward_train(t["fc.weight"], layer, t["norm.weight"], embed, feats, ids, target.config,
                               cos, sin, passes=2)
    head = embed[:4096]
    T = len(prompt_ids)
    p0 = torch.softmax(gs[0][0, T - 2] @ head.T, -1)  # the root pair (F_{T-2}, x_{T-1}) proposes level 1
    p1 = torch.softmax(gs[1][0, T - 1] @ head.T, -1)  # the level-1 node, fed the root pair's output
    assert int(p0.argmax()) == int(tree.tokens[0]) and int(p1.argmax()) == int(tree.tokens[1])
    np.testing.assert_allclose(float(p0.max()), tree.draft_prob[0], rtol=1e-3)
    np.testing.assert_allclose(float(p1.max()), tree.draft_prob[1], rtol=1e-3)
