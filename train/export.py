"""Write trained drafts in the shipped formats that app/engine/speculative/distilled.py and feature.py read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from app.engine.speculative import distilled, feature
from app.engine.speculative.distilled import embed_probe
from app.engine.weights import ModelConfig


def hf_layer_tensors(layer: dict[str, torch.Tensor], config: ModelConfig, prefix: str,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One fused training layer (in_norm, post_norm, wqkv, wo, w13, w2) -> HF-named tensors under `prefix`."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    wq, wk, wv = layer["wqkv"].detach().split([q, kv, kv])
    gate, up = layer["w13"].detach().chunk(2)
    parts = {"input_layernorm.weight": layer["in_norm"], "post_attention_layernorm.weight": layer["post_norm"],
             "self_attn.q_proj.weight": wq, "self_attn.k_proj.weight": wk, "self_attn.v_proj.weight": wv,
             "self_attn.o_proj.weight": layer["wo"], "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
             "mlp.down_proj.weight": layer["w2"]}
    return {prefix + name: t.detach().to(dtype).contiguous().cpu() for name, t in parts.items()}


def save_draft_weights(path: Path, layers: list[dict[str, torch.Tensor]], target_config: ModelConfig,
                       target_embed: torch.Tensor, vocab_ids: torch.Tensor | None, extra: dict | None = None,
                       dtype: torch.dtype = torch.bfloat16) -> None:
    """The distilled draft. layers: fused training tensors (in_norm, post_norm, wqkv, wo, w13, w2) per layer."""
    c = target_config
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        tensors.update(hf_layer_tensors(layer, c, f"model.layers.{i}.", dtype))
    if vocab_ids is not None:
        tensors["draft.vocab_ids"] = vocab_ids.to(torch.int64).contiguous().cpu()
    meta = {"format": distilled.FORMAT, "num_layers": str(len(layers)), "target_vocab_size": str(c.vocab_size),
            "target_hidden_size": str(c.hidden_size), "target_embed_probe": json.dumps(embed_probe(target_embed))}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    _save(path, tensors, meta)


def save_feature_draft(path: Path, fc: torch.Tensor, layer: dict[str, torch.Tensor], norm: torch.Tensor,
                       target_config: ModelConfig, target_embed: torch.Tensor, vocab_ids: torch.Tensor | None,
                       extra: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
    """The feature draft. layer: fused training tensors (in_norm, post_norm, wqkv, wo, w13, w2)."""
    c = target_config
    tensors = hf_layer_tensors(layer, c, "model.layers.0.", dtype)
    tensors["fc.weight"] = fc.detach().to(dtype).contiguous().cpu()
    tensors["norm.weight"] = norm.detach().to(dtype).contiguous().cpu()
    if vocab_ids is not None:
        tensors["draft.vocab_ids"] = vocab_ids.to(torch.int64).contiguous().cpu()
    meta = {"format": feature.FORMAT, "target_vocab_size": str(c.vocab_size), "target_hidden_size": str(c.hidden_size),
            "target_embed_probe": json.dumps(embed_probe(target_embed))}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    _save(path, tensors, meta)


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
