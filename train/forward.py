"""Dense training forwards over padded batches [B, L, ...], built from the serving model's decoder layer
(app/engine/layers.py), so training and serving compute the same layer.

- `dense_forward`: causal decoder layers (the teacher, and the distilled draft under training).
- `feature_forward_train`: the feature draft (app/engine/speculative/feature.py) unrolled over its own estimates.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from app.engine.layers import decoder_layer, rms_norm, rope_cos_sin, rope_inv_freq
from app.engine.weights import ModelConfig


def fused_layer(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """One target layer's HF tensors -> the fused dict LlamaModel uses (in_norm, wqkv, wo, w13, w2, post_norm)."""
    p = f"model.layers.{i}."
    return {
        "in_norm": state[p + "input_layernorm.weight"].float().clone(),
        "post_norm": state[p + "post_attention_layernorm.weight"].float().clone(),
        "wqkv": torch.cat([state[p + f"self_attn.{n}_proj.weight"].float() for n in "qkv"]),
        "wo": state[p + "self_attn.o_proj.weight"].float().clone(),
        "w13": torch.cat([state[p + "mlp.gate_proj.weight"].float(), state[p + "mlp.up_proj.weight"].float()]),
        "w2": state[p + "mlp.down_proj.weight"].float().clone(),
    }


def rope_for_length(config: ModelConfig, length: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, 1, head_dim] of positions 0..length-1."""
    return rope_cos_sin(torch.arange(length, device=device), rope_inv_freq(config).to(device), dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """q [B, L, heads, D], k/v [B, S, kv_heads, D] -> [B, L, heads, D] (torch's attention is heads-first)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       enable_gqa=k.shape[2] != q.shape[2], **kw)
    return o.transpose(1, 2)


def dense_forward(layers: list[dict[str, torch.Tensor]], h: torch.Tensor, config: ModelConfig,
                  cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal forward of decoder layers over a padded batch h [B, L, hidden] (no final norm)."""
    for layer in layers:
        h = decoder_layer(h, layer, config, cos, sin, lambda q, k, v: _sdpa(q, k, v, is_causal=True))
    return h


def unrolled_mask(length: int, passes: int, device: torch.device) -> list[torch.Tensor]:
    """Per pass p, the bool mask [L, (p + 1) * L] over the keys of passes 0..p: pass-0 keys j <= i - p (true
    features), pass-m keys (m >= 1) only at j = i - (p - m) (the query's own chain of draft estimates)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    masks = []
    for p in range(passes):
        blocks = [j <= i - p]
        blocks += [j == i - (p - m) for m in range(1, p + 1)]
        masks.append(torch.cat(blocks, dim=1))
    return masks


def _attend_unrolled(keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor, q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One pass of the unrolled feature draft: its k/v join the earlier passes', the mask picks what it sees."""
    keys.append(k)
    values.append(v)
    return _sdpa(q, torch.cat(keys, dim=1), torch.cat(values, dim=1), attn_mask=mask)


def feature_forward_train(fc: torch.Tensor, layer: dict[str, torch.Tensor], norm: torch.Tensor,
                          embed: torch.Tensor, features: torch.Tensor, ids: torch.Tensor, config: ModelConfig,
                          cos: torch.Tensor, sin: torch.Tensor, passes: int) -> list[torch.Tensor]:
    """Dense training forward over a padded batch; returns g per pass, each [B, L - 1, H].

    features [B, L, H]: the target's final-normed hidden states of ids [B, L]. Position i of pass 0 is the
    pair (F_i, x_{i+1}); pass p uses g_{p-1}[i - 1] (the previous pass's estimate of F_i) instead of F_i.
    Positions i < p of pass p have no estimate (zeros) and must be left out of the loss. Pass p attends to the
    keys and values of every earlier pass (through `unrolled_mask`).
    """
    tok = embed[ids[:, 1:]]
    masks = unrolled_mask(ids.shape[1] - 1, passes, ids.device)
    keys: list[torch.Tensor] = []  # [B, L, kv_heads, D] per pass so far
    values: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    feat = features[:, :-1]
    for p in range(passes):
        if p:
            prev = outs[-1].detach()
            feat = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], dim=1)
        h = F.linear(torch.cat([feat.to(tok.dtype), tok], dim=-1), fc)
        h = decoder_layer(h, layer, config, cos, sin, partial(_attend_unrolled, keys, values, masks[p]))
        outs.append(rms_norm(h, norm, config.rms_norm_eps))
    return outs
