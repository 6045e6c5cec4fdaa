"""The Llama decoder layer, written once: the serving model (paged attention over a flat token batch), the
drafts built on it, and the dense training forwards (train/forward.py, padded batches) all call these.

A layer is a dict of fused tensors (q/k/v and gate/up concatenated at load, as in gpt-fast): `in_norm`, `wqkv`,
optional `bqkv` (Qwen2-style q/k/v bias), `wo`, `post_norm`, `w13`, `w2`. Only attention differs between the
callers, so `decoder_layer` takes it as a function of the rotated q, k and v.

A weight may be a oneDNN-packed tensor (`pack_linear_weight`, CPU inference only): every matmul goes through
`linear`, which runs either kind, so the serving model, the drafts and the training teacher share this code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from app.engine.weights import ModelConfig

# attend(q [..., heads, D], k [..., kv_heads, D], v [..., kv_heads, D]) -> o [..., heads, D]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pack_linear_weight(weight: torch.Tensor, batch_hint: int = 64) -> torch.Tensor:
    """[out, in] -> a oneDNN-packed copy for `linear` (CPU, float32/bfloat16, inference only: no autograd).

    Why: on CPU, ATen's F.linear goes to MKL, whose small-M GEMMs read the weights at about a third of the memory
    bandwidth on the machines measured (2-core AMD EPYC, 2026-12-07: one decode step's matmuls 46 ms vs 21.5 ms
    packed); oneDNN's reordered layout streams them. `batch_hint` is the token count the layout is tuned for;
    16-64 served 1-256 tokens best there.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a plain weight [out, in], or oneDNN's packed GEMM for one from `pack_linear_weight`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] rotary inverse frequencies, with linear or llama3 scaling."""
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


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, 1, head_dim] (the 1 broadcasts over heads). sin's first half is negated, the
    sign rotate_half puts on x's second half, so that `apply_rope` rotates with one roll instead of neg + cat."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    sin = emb.sin()
    sin[..., : freqs.shape[-1]].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, D]; cos/sin [T, 1, D] from `rope_cos_sin`, cast to x's dtype. HF's rotate_half convention
    (halves, not interleaved pairs): x * cos + cat(-x2, x1) * sin, bit for bit (negating is exact)."""
    return x * cos.to(x.dtype) + x.roll(x.shape[-1] // 2, dims=-1) * sin.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalised in float32, cast back, then scaled. In float32 that is torch's fused kernel (one
    op instead of seven, the same sums); other dtypes keep HF's cast before the scale."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def decoder_layer(h: torch.Tensor, layer: dict[str, torch.Tensor], config: ModelConfig, cos: torch.Tensor,
                  sin: torch.Tensor, attend: Attend) -> torch.Tensor:
    """One pre-norm decoder layer: h [..., T, hidden] (a flat batch [T, H] or a padded one [B, T, H]) -> same."""
    c = config
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    x = rms_norm(h, layer["in_norm"], c.rms_norm_eps)
    qkv = linear(x, layer["wqkv"], layer.get("bqkv"))
    # q and k heads rotate together in one pass
    qk = apply_rope(qkv[..., :q_size + kv_size].unflatten(-1, (c.num_heads + c.num_kv_heads, c.head_dim)), cos, sin)
    q, k = qk[..., :c.num_heads, :], qk[..., c.num_heads:, :]
    v = qkv[..., q_size + kv_size:].unflatten(-1, (c.num_kv_heads, c.head_dim))
    o = attend(q, k, v)
    h = h + linear(o.flatten(-2), layer["wo"])
    x = rms_norm(h, layer["post_norm"], c.rms_norm_eps)
    gate, up = linear(x, layer["w13"]).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, layer["w2"])
