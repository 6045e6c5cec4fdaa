"""`load_draft_source`: the one way to build the draft source a spec names.

spec: one source or a comma list ("distilled,ngram"), or a list of them (as in serve_config.yaml). A source is
- "feature": the shipped feature draft for the embedded target (reads the target's hidden states);
- "distilled": the shipped token-only distilled draft;
- a path to a feature- or distilled-draft .safetensors file;
- any model id/path `load_checkpoint` takes: an independent causal LM with the target's tokenizer;
- "ngram" / "ngram:MIN-MAX" / "ngram:anchors=N": prompt lookup (no draft model).
A single model source gives its Drafter (FeatureDrafter for a feature draft); a list, or a lookup anywhere in it,
gives a MultiSourceDrafter over the sources in order, each model source with its own KV cache.

Two steps, so that the engine can plan memory between them: `load_draft_models` loads every draft model's weights
and allocates no KV; `DraftModels.build` allocates the KV caches and makes the source. `load_draft_source` does both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from app.engine.model import LlamaModel
from app.engine.speculative.distilled import SHIPPED_WEIGHTS, build_distilled_model
from app.engine.speculative.drafter import Drafter
from app.engine.speculative.feature import (SHIPPED_FEATURE_WEIGHTS, FeatureDrafter, build_feature_model,
                                            is_feature_draft_file)
from app.engine.speculative.multi import DEFAULT_MAX_CANDIDATES, MultiSourceDrafter
from app.engine.speculative.ngram import NgramConfig, NgramSource
from app.engine.speculative.source import DraftSource
from app.engine.weights import Checkpoint, load_checkpoint, load_tokenizer

DISTILLED = "distilled"
FEATURE = "feature"


def load_draft_source(spec: str | Sequence[str], *, target: Checkpoint | LlamaModel, target_tokenizer=None,
                      target_dir: Path | str | None = None, num_blocks: int | None = None, block_size: int = 16,
                      device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                      kv_cache_memory_gb: float = 0.25, cache_dir: Path | None = None,
                      use_vocab_subset: bool = True, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> DraftSource:
    """The draft source for `spec` (see the module docstring).

    target: the target's Checkpoint, or its LlamaModel (then pass target_tokenizer, a tokenizer object or its
    directory, or target_dir, the target's checkpoint directory, for the vocabulary check of an independent draft).
    num_blocks: KV blocks of each draft model; None sizes them from kv_cache_memory_gb. Giving the target's block
    count gives a draft the same token capacity. device/dtype: the target's unless given (a Checkpoint: cpu,
    float32). use_vocab_subset: a draft's vocabulary-subset head, where it ships one. max_candidates: the merged
    tree's node cap (lists only).
    """
    drafts = load_draft_models(spec, target=target, target_tokenizer=target_tokenizer, target_dir=target_dir,
                               device=device, dtype=dtype, cache_dir=cache_dir, use_vocab_subset=use_vocab_subset,
                               max_candidates=max_candidates)
    return drafts.build(num_blocks, block_size, kv_cache_memory_gb)


@dataclass
class DraftModel:
    """One draft model with its weights loaded and no KV cache yet."""

    name: str
    model: LlamaModel
    drafter_cls: type[Drafter]

    def state_bytes_per_token(self) -> int:
        """What each token of a running request costs this draft: its KV, and for a feature draft the target's
        hidden state it keeps per request (FeatureDrafter's buffers grow by doubling: up to two rows per token)."""
        extra = 0
        if self.drafter_cls.uses_features:
            extra = 2 * self.model.config.hidden_size * self.model.embed.element_size()
        return self.model.kv_bytes_per_token() + extra

    def drafter(self, num_blocks: int | None, block_size: int, kv_cache_memory_gb: float) -> Drafter:
        if num_blocks is None:
            per_block = self.model.kv_bytes_per_token() * block_size
            num_blocks = max(1, int(kv_cache_memory_gb * 2**30) // per_block)
        return self.drafter_cls(self.model, num_blocks, block_size, name=self.name)


@dataclass
class DraftModels:
    """A parsed draft spec, its models loaded and no KV allocated: the engine sizes every KV cache together from
    `state_bytes_per_token` (app/engine/memory_plan.py), then `build`s the source."""

    names: list[str]
    sources: list[DraftModel | NgramConfig]  # in the spec's order
    max_candidates: int

    @property
    def models(self) -> list[DraftModel]:
        return [s for s in self.sources if isinstance(s, DraftModel)]

    @property
    def uses_features(self) -> bool:
        return any(m.drafter_cls.uses_features for m in self.models)

    def state_bytes_per_token(self) -> int:
        """Every draft model's per-token cost together (0 for a lookup alone)."""
        return sum(m.state_bytes_per_token() for m in self.models)

    def build(self, num_blocks: int | None, block_size: int = 16, kv_cache_memory_gb: float = 0.25) -> DraftSource:
        """Allocate each draft model's KV cache (num_blocks blocks each; None sizes each from kv_cache_memory_gb)
        and make the source: one model's Drafter, else a MultiSourceDrafter over the sources in order."""
        built = [NgramSource(s, name="ngram") if isinstance(s, NgramConfig)
                 else s.drafter(num_blocks, block_size, kv_cache_memory_gb) for s in self.sources]
        if len(built) == 1 and isinstance(self.sources[0], DraftModel):
            return built[0]
        return MultiSourceDrafter(built, names=self.names, max_candidates=self.max_candidates)


def load_draft_models(spec: str | Sequence[str], *, target: Checkpoint | LlamaModel, target_tokenizer=None,
                      target_dir: Path | str | None = None, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None, cache_dir: Path | None = None, use_vocab_subset: bool = True,
                      max_candidates: int = DEFAULT_MAX_CANDIDATES) -> DraftModels:
    """Every model source of `spec` loaded, no KV allocated (the arguments as in `load_draft_source`)."""
    names = parse_sources(spec)
    if sum(is_lookup(n) for n in names) > 1:
        raise ValueError(f"at most one n-gram source, got {names}")
    sources = [NgramConfig.parse(n) if is_lookup(n) else _load_model_draft(
        n, target=target, target_tokenizer=target_tokenizer, target_dir=target_dir, device=device, dtype=dtype,
        cache_dir=cache_dir, use_vocab_subset=use_vocab_subset) for n in names]
    return DraftModels(names=["ngram" if is_lookup(n) else n for n in names], sources=sources,
                       max_candidates=max_candidates)


def parse_sources(spec: str | Sequence[str]) -> list[str]:
    """"distilled,ngram" / ["distilled", "ngram"] -> ["distilled", "ngram"] (stripped, empty entries dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(s).strip() for s in items if str(s).strip()]
    if not names:
        raise ValueError(f"no draft source in {spec!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"draft sources repeat in {spec!r}")
    return names


def is_lookup(name: str) -> bool:
    return name.strip().lower().partition(":")[0] == "ngram"


def _load_model_draft(spec: str, *, target: Checkpoint | LlamaModel, target_tokenizer, target_dir: Path | str | None,
                      device: torch.device | str | None, dtype: torch.dtype | None, cache_dir: Path | None,
                      use_vocab_subset: bool) -> DraftModel:
    """One draft model, loaded (its Drafter class: a FeatureDrafter for a feature draft)."""
    if target_tokenizer is None and target_dir is not None:
        target_tokenizer = Path(target_dir)
    if isinstance(target, Checkpoint):
        t_config = target.config
        t_embed = target.state_dict["model.embed_tokens.weight"]
        t_norm = target.state_dict["model.norm.weight"]
        target_tokenizer = target_tokenizer if target_tokenizer is not None else target.tokenizer_dir
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
    elif isinstance(target, LlamaModel):
        t_config, t_embed, t_norm = target.config, target.embed, target.norm
        device = torch.device(device) if device is not None else target.device
        dtype = dtype or target.dtype
    else:
        raise TypeError(f"target must be a Checkpoint or a LlamaModel, got {type(target).__name__}")

    drafter_cls = Drafter
    if spec == FEATURE or is_feature_draft_file(spec):
        path = SHIPPED_FEATURE_WEIGHTS if spec == FEATURE else Path(spec)
        model = build_feature_model(path, t_config, t_embed, dtype, device, use_vocab_subset)
        name, drafter_cls = (FEATURE if spec == FEATURE else str(path)), FeatureDrafter
    elif spec == DISTILLED or spec.endswith(".safetensors") and Path(spec).is_file():
        path = SHIPPED_WEIGHTS if spec == DISTILLED else Path(spec)
        model = build_distilled_model(path, t_config, t_embed, t_norm, dtype, device, use_vocab_subset)
        name = DISTILLED if spec == DISTILLED else str(path)
    else:
        ckpt = load_checkpoint(spec, cache_dir)
        if target_tokenizer is None:
            raise ValueError("an independent draft needs the target's tokenizer for the vocabulary check")
        if isinstance(target_tokenizer, (str, Path)):
            target_tokenizer = load_tokenizer(Path(target_tokenizer))
        draft_tokenizer = load_tokenizer(ckpt.tokenizer_dir)
        check_same_vocabulary(draft_tokenizer, target_tokenizer, spec)
        if ckpt.config.vocab_size < t_config.vocab_size:
            raise ValueError(f"draft {spec!r} has {ckpt.config.vocab_size} vocabulary rows, the target "
                             f"{t_config.vocab_size}")
        model = LlamaModel(ckpt.config, ckpt.state_dict, dtype, device)
        if ckpt.config.vocab_size > t_config.vocab_size:  # padded rows the target can never emit
            model.lm_head = model.lm_head[: t_config.vocab_size]
        name = spec
        del ckpt
    return DraftModel(name, model, drafter_cls)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the token -> id map (what decides whether two models can share token ids)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_same_vocabulary(draft_tokenizer, target_tokenizer, draft_name: str = "draft") -> None:
    """A clear ValueError unless both tokenizers map the same tokens to the same ids."""
    dv, tv = len(draft_tokenizer.get_vocab()), len(target_tokenizer.get_vocab())
    if dv != tv:
        raise ValueError(f"draft {draft_name!r} has a different vocabulary from the target "
                         f"({dv} tokens vs {tv}): a draft must use the target's tokenizer")
    if tokenizer_fingerprint(draft_tokenizer) != tokenizer_fingerprint(target_tokenizer):
        raise ValueError(f"draft {draft_name!r} has a different vocabulary from the target (same size {dv}, "
                         f"different token -> id map): a draft must use the target's tokenizer")
