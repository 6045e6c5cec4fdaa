"""The distilled draft for a target: the target's frozen embedding, final norm and (tied) LM head around 1-3
trained decoder layers, optionally with a frequency-ranked vocabulary-subset head.

Shipped file (safetensors, only the trained tensors, bf16): HF-named layer tensors `model.layers.{i}.*`, plus
`draft.vocab_ids` ([S] int64, the full-vocabulary ids the subset head scores, most frequent first) when the head
is a subset. Metadata records the format, the target's shape and a probe of its embedding, so a draft is
never run against a target it was not trained for.

Training (train/distill.py) writes this file (train/export.py) and runs a dense (padded batch) forward over the
same layer tensors (train/forward.py), not the paged one.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from app.engine.model import LlamaModel
from app.engine.weights import ModelConfig

FORMAT = "adaserve-distilled-draft/1"
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_WEIGHTS = WEIGHTS_DIR / "smollm2-135m-draft.safetensors"


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
