"""Llama-family forward in plain torch (SmolLM2, Llama 2/3/3.1/3.2, Qwen2-style q/k/v bias).

One forward takes a flat batch of tokens from many requests; attention metadata says which request each token
belongs to, where its K/V goes and what it may attend to (kernels/metadata.py). q/k/v and gate/up projections
are fused at load time, as in gpt-fast, to halve the matmul launches per layer. On CPU the matmul weights are
packed for oneDNN at load (layers.pack_linear_weight): the step is weight-streaming bound and MKL's small-M GEMMs
stream at a third of the bandwidth.
"""

from __future__ import annotations

import math
import os
from functools import partial

import torch
import torch.nn.functional as F

from app.engine.layers import decoder_layer, linear, pack_linear_weight, rms_norm, rope_cos_sin, rope_inv_freq
from app.engine.weights import ModelConfig
from kernels import dispatch
from kernels.metadata import AttnMetadata


class LlamaModel:
    """Weights as plain tensors; no nn.Module machinery in the hot loop.

    pack_weights: store the layers' matmul weights (and a copy of the LM head) oneDNN-packed; None = wherever
    that is available (`packing_available`). `embed` and `lm_head` stay plain tensors (drafts slice them).
    """

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, pack_weights: bool | None = None):
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
        self.packed = packing_available(device, dtype) if pack_weights is None else pack_weights
        if self.packed:
            if not packing_available(device, dtype):
                raise ValueError(f"oneDNN weight packing needs a CPU and float32/bfloat16, not {device}/{dtype}")
            for layer in self.layers:
                for name in ("wqkv", "wo", "w13", "w2"):
                    layer[name] = pack_linear_weight(layer[name])
        self._head_source: torch.Tensor | None = None  # the lm_head tensor `_head_packed` was packed from
        self._head_packed: torch.Tensor | None = None
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
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)
        for i, layer in enumerate(self.layers):
            h = decoder_layer(h, layer, c, cos, sin, partial(self._attend, k_cache[i], v_cache[i], meta))
        return rms_norm(h, self.norm, c.rms_norm_eps)

    def _attend(self, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Paged attention of one layer: store k/v at their slots, attend over the cache. q [T, heads, D]."""
        dispatch.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return dispatch.attention(q, k_cache, v_cache, meta, self.scale)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(hidden, self.lm_head).float()
        if self._head_source is not self.lm_head:  # packed on first use: drafts replace lm_head after __init__
            self._head_source, self._head_packed = self.lm_head, pack_linear_weight(self.lm_head)
        return linear(hidden, self._head_packed).float()


CPU_KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's


def bound_cpu_kernel_caches(entries: int) -> dict[str, str]:
    """Cap the per-shape kernel caches of oneDNN and of ideep (PyTorch's oneDNN wrapper) at ``entries`` shapes each,
    unless the environment already sets them; returns the values in force.

    Why: every new matmul row count (a step's tokens) compiles and keeps a kernel in each cache, ~100-250 KB apiece;
    at their default of 1024 shapes a replica serving mixed traffic grows by a few hundred MB over its first hours.
    128 kept the same speed on this project's workloads (docs/results.md, 2026-12-07): the row counts a replica
    keeps seeing stay cached, a rare one costs a kernel build (~0.6 ms). Both libraries read the variables when
    they first run, so this must come before the first CPU matmul of the process (the engine calls it first thing);
    later it has no effect.
    """
    return {name: os.environ.setdefault(name, str(int(entries))) for name in CPU_KERNEL_CACHE_VARS}


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packs float32 and bfloat16 matmul weights on CPU (ATen built with MKLDNN, as the PyPI wheels are)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
