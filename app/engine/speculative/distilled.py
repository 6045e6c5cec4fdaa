"""The distilled draft for a target: the target's frozen embedding, final norm and (tied) LM head around 1-3
trained decoder layers, optionally with a frequency-ranked vocabulary-subset head.

Shipped file (safetensors, only the trained tensors, bf16): HF-named layer tensors `model.layers.{i}.*`, plus
`draft.vocab_ids` ([S] int64, the full-vocabulary ids the subset head scores, most frequent first) when the head
is a subset. Metadata records the format, the target's shape and a probe of its embedding, so a draft is
never run against a target it was not trained for.

Training uses a dense (padded batch) forward over the same layer tensors (`dense_forward`), not the paged one.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from app.engine.model import LlamaModel, _rms_norm, _rotate, rope_inv_freq
from app.engine.weights import ModelConfig

FORMAT = "adaserve-distilled-draft/1"
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_WEIGHTS = WEIGHTS_DIR / "smollm2-135m-draft.safetensors"
_LAYER_PARTS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


class DraftLlamaModel(LlamaModel):
    """A LlamaModel whose head may score only a subset of the vocabulary rows.

    `vocab_ids` ([S] int64 on device) maps a logit column back to a full-vocabulary token id; None = full head.
    `logits()` then returns [rows, S]; probabilities over the subset are renormalised by the softmax.
    """

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, vocab_ids: torch.Tensor | None = None):
        super().__init__(config, state_dict, dtype, device)
        self.vocab_ids = None
        if vocab_ids is not None:
            self.vocab_ids = vocab_ids.to(device=device, dtype=torch.int64)
            self.lm_head = self.lm_head[self.vocab_ids].contiguous()


def embed_probe(embed: torch.Tensor, n: int = 32) -> list[float]:
    """A few fixed entries of the embedding: tells targets apart, robust to the target's dtype (fp32/bf16/fp16)."""
    rows = torch.linspace(0, embed.shape[0] - 1, n).long()
    cols = torch.linspace(0, embed.shape[1] - 1, n).long()
    return [float(v) for v in embed[rows.to(embed.device), cols.to(embed.device)].float().cpu()]


def same_target(probe: list[float], embed: torch.Tensor) -> bool:
    mine = torch.tensor(embed_probe(embed, len(probe)))
    return bool(torch.allclose(mine, torch.tensor(probe), rtol=2e-2, atol=1e-3))


# ---- shipped-file format -----------------------------------------------------------------------------------

def save_draft_weights(path: Path, layers: list[dict[str, torch.Tensor]], target_config: ModelConfig,
                       target_embed: torch.Tensor, vocab_ids: torch.Tensor | None, extra: dict | None = None,
                       dtype: torch.dtype = torch.bfloat16) -> None:
    """layers: fused training tensors (in_norm, post_norm, wqkv, wo, w13, w2) per draft layer."""
    c = target_config
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        tensors.update(hf_layer_tensors(layer, c, f"model.layers.{i}.", dtype))
    if vocab_ids is not None:
        tensors["draft.vocab_ids"] = vocab_ids.to(torch.int64).contiguous().cpu()
    meta = {"format": FORMAT, "num_layers": str(len(layers)), "target_vocab_size": str(c.vocab_size),
            "target_hidden_size": str(c.hidden_size), "target_embed_probe": json.dumps(embed_probe(target_embed))}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


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


def read_draft_weights(path: Path, fmt: str = FORMAT,
                       what: str = "distilled draft") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: not a {what} file (format {meta.get('format')!r}, want {fmt!r})")
    return tensors, meta


def check_target(path: Path, meta: dict[str, str], target_config: ModelConfig, target_embed: torch.Tensor) -> None:
    """A clear ValueError unless the draft file was trained for this target (shape and embedding probe)."""
    c = target_config
    if int(meta["target_vocab_size"]) != c.vocab_size or int(meta["target_hidden_size"]) != c.hidden_size:
        raise ValueError(f"{path} was trained for a target with vocab {meta['target_vocab_size']} / hidden "
                         f"{meta['target_hidden_size']}, not vocab {c.vocab_size} / hidden {c.hidden_size}")
    if not same_target(json.loads(meta.get("target_embed_probe", "[]")) or [0.0], target_embed):
        raise ValueError(f"{path} was trained for a different target model (its embedding differs)")


def build_distilled_model(path: Path, target_config: ModelConfig, target_embed: torch.Tensor,
                          target_norm: torch.Tensor, dtype: torch.dtype, device: torch.device,
                          use_vocab_subset: bool = True) -> DraftLlamaModel:
    """The draft LlamaModel: trained layers from `path`, embedding/norm/tied head from the target."""
    tensors, meta = read_draft_weights(path)
    check_target(path, meta, target_config, target_embed)
    config = replace(target_config, num_layers=int(meta["num_layers"]), tie_word_embeddings=True)
    state = {k: v for k, v in tensors.items() if k.startswith("model.layers.")}
    state["model.embed_tokens.weight"] = target_embed
    state["model.norm.weight"] = target_norm
    vocab_ids = tensors.get("draft.vocab_ids") if use_vocab_subset else None
    return DraftLlamaModel(config, state, dtype, device, vocab_ids)


# ---- dense forward for training --------------------------------------------------------------------------

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


def rope_cos_sin(config: ModelConfig, length: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(config).to(device)
    freqs = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [L, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def dense_forward(layers: list[dict[str, torch.Tensor]], h: torch.Tensor, config: ModelConfig,
                  cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal forward of decoder layers over a padded batch h [B, L, hidden] (no final norm)."""
    c = config
    B, L, _ = h.shape
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for layer in layers:
        x = _rms_norm(h, layer["in_norm"], c.rms_norm_eps)
        qkv = F.linear(x, layer["wqkv"], layer.get("bqkv"))
        q = qkv[..., :q_size].reshape(B, L, c.num_heads, c.head_dim)
        k = qkv[..., q_size:q_size + kv_size].reshape(B, L, c.num_kv_heads, c.head_dim)
        v = qkv[..., q_size + kv_size:].reshape(B, L, c.num_kv_heads, c.head_dim)
        q, k = _rotate(q, cos.to(q.dtype), sin.to(q.dtype)), _rotate(k, cos.to(k.dtype), sin.to(k.dtype))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=c.num_kv_heads != c.num_heads)
        h = h + F.linear(o.transpose(1, 2).reshape(B, L, q_size), layer["wo"])
        x = _rms_norm(h, layer["post_norm"], c.rms_norm_eps)
        gate, up = F.linear(x, layer["w13"]).chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, layer["w2"])
    return h
