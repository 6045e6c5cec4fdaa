"""The feature draft (EAGLE style): one decoder layer that reads the target's own hidden states.

A token-only draft must rebuild from tokens what the target's 30 layers already computed; this one starts from
the target's final-normed hidden state F_i at each position. Draft position i holds the pair (F_i, x_{i+1}):

    e_i = fc([F_i ; embed(x_{i+1})])  ->  one Llama decoder layer (causal / tree)  ->  RMSNorm  ->  g_i

g_i predicts F_{i+1}, so `lm_head(g_i)` is the draft's distribution of x_{i+2}. Deeper tree levels have no target
hidden state yet: a node's pair uses its parent's g instead (the draft's estimate of the target's feature).

Shipped file (safetensors, bf16): `fc.weight` [H, 2H], `norm.weight` [H], HF-named `model.layers.0.*`, and
optionally `draft.vocab_ids` (a frequency-ranked vocabulary subset for the head). Embedding and LM head come from
the target at load; metadata pins the target (shape + embedding probe) like the distilled draft's.

Training (train/distill.py `--kind feature`, forward in train/forward.py) unrolls the draft over its own estimates
("training-time test"): pass p feeds g from pass p - 1 and attends to the true-feature context up to i - p, plus
its own chain, exactly what tree level p + 1 sees at inference.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from app.engine.runner import SeqInput
from app.engine.speculative.distilled import DraftLlamaModel, check_target, read_draft_weights
from app.engine.speculative.drafter import Drafter, common_prefix
from app.engine.speculative.source import DraftRequest
from app.engine.weights import ModelConfig

FORMAT = "adaserve-feature-draft/1"
SHIPPED_FEATURE_WEIGHTS = Path(__file__).parent / "weights" / "smollm2-135m-feature-draft.safetensors"


class FeatureDraftModel(DraftLlamaModel):
    """A one-layer DraftLlamaModel whose inputs are fc([target feature ; token embedding])."""

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], fc: torch.Tensor,
                 dtype: torch.dtype, device: torch.device, vocab_ids: torch.Tensor | None = None):
        super().__init__(config, state_dict, dtype, device, vocab_ids)
        self.fc = fc.to(device=device, dtype=dtype)

    def input_embeds(self, features: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """features [T, H] (target hidden or the draft's own g), token_ids [T] -> [T, H]."""
        return F.linear(torch.cat([features.to(self.dtype), self.embed[token_ids]], dim=-1), self.fc)


def is_feature_draft_file(path: Path | str) -> bool:
    p = Path(path)
    if not (p.suffix == ".safetensors" and p.is_file()):
        return False
    with safe_open(str(p), framework="pt") as f:
        return (f.metadata() or {}).get("format") == FORMAT


def build_feature_model(path: Path, target_config: ModelConfig, target_embed: torch.Tensor, dtype: torch.dtype,
                        device: torch.device, use_vocab_subset: bool = True) -> FeatureDraftModel:
    tensors, meta = read_draft_weights(path, FORMAT, "feature draft")
    check_target(path, meta, target_config, target_embed)
    config = replace(target_config, num_layers=1, tie_word_embeddings=True)
    state = {k: v for k, v in tensors.items() if k.startswith("model.layers.")}
    state["model.embed_tokens.weight"] = target_embed
    state["model.norm.weight"] = tensors["norm.weight"]
    vocab_ids = tensors.get("draft.vocab_ids") if use_vocab_subset else None
    return FeatureDraftModel(config, state, tensors["fc.weight"], dtype, device, vocab_ids)


# ---- drafting ---------------------------------------------------------------------------------------------

class _Features:
    """The target's hidden states of one request's tokens, by position (grown by doubling)."""

    def __init__(self, like: torch.Tensor, capacity: int):
        self.data = like.new_empty((capacity, like.shape[-1]))
        self.length = 0


class FeatureDrafter(Drafter):
    """A Drafter whose draft position i is the pair (F_i, x_{i+1}) of the target's hidden state and the next token.

    The engine hands over the target's final-normed hidden state of every token it computes (`record_hidden`:
    prefill chunks, decode roots, the accepted path of a verified tree). The draft cache of a request whose last
    token (the root) is x_{T-1} holds pairs 0..T-2; the root pair's output proposes level 1.
    """

    uses_features = True

    def __init__(self, model: FeatureDraftModel, num_kv_blocks: int, block_size: int = 16, name: str = "feature"):
        super().__init__(model, num_kv_blocks, block_size, name=name)
        self.features: dict[str, _Features] = {}

    def record_hidden(self, request_id: str, start: int, hidden: torch.Tensor) -> None:
        """hidden [n, H]: the target's hidden states of tokens start..start+n-1 of this request."""
        n = hidden.shape[0]
        if n == 0:
            return
        buf = self.features.get(request_id)
        if buf is None:
            if start != 0:
                raise ValueError(f"request {request_id}: hidden states must be recorded from position 0, got {start}")
            buf = self.features[request_id] = _Features(hidden, max(64, 2 * n))
        if start > buf.length:
            raise ValueError(f"request {request_id}: hidden states recorded up to {buf.length}, got one at {start}")
        if start + n > buf.data.shape[0]:
            grown = buf.data.new_empty((max(2 * buf.data.shape[0], start + n), buf.data.shape[1]))
            grown[: buf.length] = buf.data[: buf.length]
            buf.data = grown
        buf.data[start: start + n] = hidden.to(buf.data.dtype)
        buf.length = start + n

    def release(self, request_id: str) -> None:
        super().release(request_id)
        self.features.pop(request_id, None)

    def _catch_up_input(self, r: DraftRequest, st, scratch: int):
        n_pairs = len(r.token_ids) - 1
        if n_pairs < 1:  # a one-token prompt has no hidden state before its root
            return None, None
        buf = self.features.get(r.request_id)
        if buf is None or buf.length < n_pairs:
            have = buf.length if buf is not None else 0
            raise ValueError(f"request {r.request_id}: the feature draft needs the target's hidden states of its "
                             f"first {n_pairs} tokens, {have} were recorded")
        pair_tokens = r.token_ids[1:]
        start = min(common_prefix(st.token_ids, pair_tokens), n_pairs - 1)  # the root pair always runs
        del st.token_ids[start:]
        if not self.kv.ensure_capacity(st.block_ids, n_pairs + scratch):
            self.kv.trim(st.block_ids, start)
            return None, None
        seq = SeqInput(block_ids=st.block_ids, context_len=start, token_ids=pair_tokens[start:], logits="last")
        return seq, buf.data[start:n_pairs]

    def _committed(self, st, r: DraftRequest) -> None:
        st.token_ids[:] = r.token_ids[1:]
