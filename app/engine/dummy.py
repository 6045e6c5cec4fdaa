"""Dummy weights (vLLM's `--load-format dummy`): any Llama shape, run and timed without a download.

A dummy model is a Hugging Face `config.json` (a preset below, or a local directory holding one) with seeded random
weights. Each tensor is made when the model reads it, from a seed of its own (the model seed and its name), on the
target device in float32 and then cast to the target dtype: a layer at a time, never the whole fp32 model, and the
same seed gives the same weights in any dtype on one kind of device (CPU or CUDA). Matrices are N(0, 0.02), norms 1
and biases 0, so each layer adds O(1) to the residual stream and activations stay finite in bf16 over 80 layers.
Greedy output is meaningless (and acceptance of any draft with it) but deterministic.

Without tokenizer files a dummy model gets `IdTokenizer`: text encodes to its UTF-8 bytes (and `<id>` to that id),
ids decode to `<id>`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from app.engine.weights import ModelConfig

DUMMY_SEED = 0
INIT_STD = 0.02

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
           "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}

# Hugging Face config.json contents of common Llama shapes (the published Instruct configs' shape fields).
PRESETS: dict[str, dict] = {
    "llama-1b": _LLAMA3 | {  # Llama-3.2-1B
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
        "rope_scaling": _LLAMA3_ROPE | {"factor": 32.0}},
    "llama-8b": _LLAMA3 | {  # Llama-3.1-8B
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
    # Llama-3.1-70B's per-GPU shard under tensor parallel 4: attention heads 64/4, KV heads 8/4 and the MLP's
    # intermediate 28672/4 are split; hidden size, layers and vocabulary stay whole (so the lm_head, which tensor
    # parallelism splits too, costs 4x its share, and the all-reduces between shards are not modelled).
    "smollm2-135m": {  # the embedded model's shape (SmolLM2-135M-Instruct)
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
    "llama-70b-tp4": _LLAMA3 | {
        "hidden_size": 8192, "intermediate_size": 7168, "num_hidden_layers": 80, "num_attention_heads": 16,
        "num_key_value_heads": 2, "head_dim": 128, "tie_word_embeddings": False},
}


class DummyStateDict(Mapping):
    """Hugging Face parameter names -> seeded random tensors, each made on first read (not kept)."""

    def __init__(self, config: ModelConfig, seed: int = DUMMY_SEED, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.config, self.seed = config, seed
        self.device, self.dtype = torch.device(device), dtype
        self.shapes = param_shapes(config)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]  # KeyError for a name the config has no parameter for
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        w = torch.randn(shape, generator=gen, dtype=torch.float32, device=self.device).mul_(INIT_STD)
        return w.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Llama checkpoint with this config, by its Hugging Face name."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                          "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (c.hidden_size,),
                   p + "post_attention_layernorm.weight": (c.hidden_size,),
                   p + "self_attn.q_proj.weight": (q, c.hidden_size),
                   p + "self_attn.k_proj.weight": (kv, c.hidden_size),
                   p + "self_attn.v_proj.weight": (kv, c.hidden_size),
                   p + "self_attn.o_proj.weight": (c.hidden_size, q),
                   p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                   p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                   p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size)}
        if c.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


class IdTokenizer:
    """The tokenizer of a model that has none: text -> its UTF-8 bytes as ids (modulo the vocabulary; `<id>` in the
    text -> that id), ids -> `<id>`. It has no special tokens, so only the model config's EOS ids stop a request."""

    bos_token_id = eos_token_id = pad_token_id = None
    _ID = re.compile(r"<(\d+)>")

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._ID.split(text)):  # odd parts are the digits of an <id>
            if i % 2 and int(part) < self.vocab_size:
                ids.append(int(part))
            else:
                ids.extend(b % self.vocab_size for b in (f"<{part}>" if i % 2 else part).encode())
        return ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs) -> list[int] | str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        text += "assistant: " if add_generation_prompt else ""
        return self.encode(text) if tokenize else text

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(self.vocab_size)}
