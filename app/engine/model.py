"""Llama-family forward in plain torch (SmolLM2, Llama 2/3/3.1/3.2, Qwen2-style q/k/v bias).

One forward takes a flat batch of tokens from many requests; attention metadata says which request each token
belongs to, where its K/V goes and what it may attend to (kernels/metadata.py). q/k/v and gate/up projections
are fused at load time, as in gpt-fast, to halve the matmul launches per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from app.engine.weights import ModelConfig
from kernels import dispatch
from kernels.metadata import AttnMetadata


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos/sin: [T, 1, D]; HF's rotate_half convention (halves, not interleaved pairs)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    """Weights as plain tensors; no nn.Module machinery in the hot loop."""

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device):
        self.config = config
        self.dtype, self.device = dtype, device
        c = config

        def get(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise KeyError(f"checkpoint is missing {name}")
            return state_dict[name].to(device=device, dtype=dtype)

        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        self.lm_head = self.embed if c.tie_word_embeddings or "lm_head.weight" not in state_dict else get(
            "lm_head.weight")
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            layer = {
                "in_norm": get(p + "input_layernorm.weight"),
                "post_norm": get(p + "post_attention_layernorm.weight"),
                "wqkv": torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                "wo": get(p + "self_attn.o_proj.weight"),
                "w13": torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                "w2": get(p + "mlp.down_proj.weight"),
                "bqkv": None,
            }
            if c.attention_bias or (p + "self_attn.q_proj.bias") in state_dict:
                layer["bqkv"] = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append(layer)
        self.inv_freq = rope_inv_freq(c).to(device)
        self.scale = 1.0 / math.sqrt(c.head_dim)

    def new_kv_cache(self, num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    def kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden]."""
        c = self.config
        k_cache, v_cache = kv_cache
        h = self.embed[input_ids] if input_embeds is None else input_embeds
        T = h.shape[0]
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer["in_norm"], c.rms_norm_eps)
            qkv = F.linear(x, layer["wqkv"], layer["bqkv"])
            # q and k heads rotate together in one pass
            qk = _rotate(qkv[:, :q_size + kv_size].view(T, c.num_heads + c.num_kv_heads, c.head_dim), cos, sin)
            q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]
            v = qkv[:, q_size + kv_size:].view(T, c.num_kv_heads, c.head_dim)
            dispatch.write_kv(k, v, k_cache[i], v_cache[i], meta.slot_mapping)
            o = dispatch.attention(q, k_cache[i], v_cache[i], meta, self.scale)
            h = h + F.linear(o.reshape(T, q_size), layer["wo"])
            x = _rms_norm(h, layer["post_norm"], c.rms_norm_eps)
            gate, up = F.linear(x, layer["w13"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer["w2"])
        return _rms_norm(h, self.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
