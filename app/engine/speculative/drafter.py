"""The drafter: keeps a draft model's KV cache in step with each request's accepted tokens and proposes a
candidate token tree per request, one batched draft forward per tree level.

A draft is any LlamaModel over the target's vocabulary: an independent Hugging Face causal LM with the target's
tokenizer, or the distilled draft (app/engine/speculative/distilled.py), possibly with a vocabulary-subset head.

Per step (`propose`):
1. Catch-up: each request's missing tokens (everything after the longest prefix its draft cache already holds;
   at least the last token, the tree root) run as one causal chain per request, all requests in one forward.
   The root's logits give level 1.
2. Levels 2..depth: one tree forward over the frontier nodes and their ancestors of every request, written
   after the committed context as scratch KV (overwritten by the next step, so the draft's committed length
   stays len(token_ids)); each frontier node proposes its top-k children.
   Beam mode: the `beam_width` children with the highest path probability (over the request's whole level)
   become the next frontier; every proposed child is a candidate. Static mode (`widths`): at level l each
   frontier node keeps its top widths[l-1] children, and all of them are the next frontier (SpecInfer shape).
Probabilities are the draft's plain softmax (temperature 1) over its vocabulary (renormalised over a subset).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.engine.kv_cache import KVCache
from app.engine.model import LlamaModel
from app.engine.runner import ModelRunner, SeqInput
from kernels.metadata import MAX_TREE_TOKENS


@dataclass
class DraftRequest:
    request_id: str
    token_ids: list[int]  # prompt + output so far; the LAST token is the tree root (the target has not computed it)


@dataclass
class CandidateTree:
    """Nodes stored parents-first (parent index < own index)."""

    tokens: np.ndarray  # [M] int64 draft tokens
    parent: np.ndarray  # [M] int64, -1 = child of the root
    draft_prob: np.ndarray  # [M] float32 draft softmax prob of this token given its parent path
    path_prob: np.ndarray  # [M] float32 product of draft_prob along root -> node (f in the paper)

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def empty(cls) -> "CandidateTree":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))

    def depths(self) -> np.ndarray:
        """[M] depth of each node (1 = child of the root)."""
        d = np.zeros(self.num_nodes, np.int64)
        for i, p in enumerate(self.parent.tolist()):
            d[i] = 1 if p < 0 else d[p] + 1
        return d


@dataclass
class _DraftSeq:
    block_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V sits in the draft cache, in order


@dataclass
class _Building:
    """One request's tree while it is drafted (python lists, appended level by level)."""

    index: int  # position in the propose() batch
    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    draft_prob: list[float] = field(default_factory=list)
    path_prob: list[float] = field(default_factory=list)
    frontier: list[int] = field(default_factory=list)  # node indices whose children the next level proposes
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # feature drafts: output per expanded node (-1 = root)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the token -> id map (what decides whether two models can share token ids)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def max_step_tokens(depth: int, beam_width: int, topk: int, widths: tuple[int, ...] | None) -> int:
    """Largest tree-forward size (frontier + ancestors) of one request over the levels."""
    if widths is not None:
        total, level = 0, 1
        for w in widths[:-1]:  # the last level's children are never run through the draft
            level *= w
            total += level
        return total
    # The forward for level l + 1 runs the frontier (<= beam_width nodes at depth l) and its ancestors.
    return sum(min(beam_width, topk ** d) for d in range(1, depth))


class Drafter:
    """Proposes candidate trees for a batch of requests with one draft forward per level."""

    uses_features = False  # feature drafts (app/engine/speculative/feature.py) read the target's hidden states

    def __init__(self, model: LlamaModel, num_kv_blocks: int, block_size: int = 16, name: str = "draft"):
        self.model = model
        self.name = name
        self.kv = KVCache(*model.new_kv_cache(num_kv_blocks, block_size))
        self.runner = ModelRunner(model, self.kv)
        vocab_ids = getattr(model, "vocab_ids", None)
        self.vocab_ids = vocab_ids  # [S] column -> full token id, or None
        self.seqs: dict[str, _DraftSeq] = {}
        self.num_forwards = 0

    # ---- state ---------------------------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Free this request's draft KV (finished, aborted or preempted)."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.kv.release(seq.block_ids)

    def num_cached_tokens(self, request_id: str) -> int:
        seq = self.seqs.get(request_id)
        return len(seq.token_ids) if seq else 0

    # ---- proposing -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, reqs: list[DraftRequest], depth: int, beam_width: int, topk: int,
                widths: tuple[int, ...] | None = None, min_path_prob: float = 0.0,
                min_level_mass: float = 0.0, root_topk: int = 0) -> list[CandidateTree]:
        """Candidate trees, one draft forward per level. Budgeted callers pass two cut-offs that stop work
        whose result could not be used: a frontier node with path probability below `min_path_prob` is not
        expanded (its children's f are lower still), and the next level is not drafted when the frontiers'
        total path probability, an upper bound on what the level can add, is below `min_level_mass`.
        `root_topk` > topk proposes that many children of the root (free: the same forward's logits; only the
        beam's best are expanded), so a merged lookup can see how likely the draft finds its first token."""
        if widths is not None:
            widths = tuple(int(w) for w in widths)
            if not widths or min(widths) < 1:
                raise ValueError(f"widths must be positive, got {widths}")
            depth = len(widths)
        if depth < 1 or beam_width < 1 or topk < 1:
            raise ValueError("depth, beam_width and topk must be at least 1")
        scratch = max_step_tokens(depth, beam_width, topk, widths)
        if scratch > MAX_TREE_TOKENS:
            raise ValueError(f"a draft tree forward would hold {scratch} tokens per request (> {MAX_TREE_TOKENS}); "
                             f"lower depth or beam width")
        if not reqs:
            return []

        # 1. Catch-up: one causal chain per request from its first uncached token to the root.
        seqs, live, feats = [], [], []
        for i, r in enumerate(reqs):
            if not r.token_ids:
                raise ValueError(f"request {r.request_id}: token_ids is empty")
            st = self.seqs.setdefault(r.request_id, _DraftSeq())
            seq, feat = self._catch_up_input(r, st, scratch)
            if seq is not None:
                seqs.append(seq)
                feats.append(feat)
                live.append(i)
        trees: list[CandidateTree | None] = [None] * len(reqs)
        if live:
            embeds = None
            if self.uses_features:
                embeds = self.model.input_embeds(torch.cat(feats), torch.tensor(
                    [t for s in seqs for t in s.token_ids], dtype=torch.int64, device=self.model.device))
            out = self.runner.run(seqs, embeds)
            self.num_forwards += 1
            builds = [_Building(index=i) for i in live]
            for b, rows in zip(builds, out.token_rows):
                self._committed(self.seqs[reqs[b.index].request_id], reqs[b.index])
                if self.uses_features:
                    b.hidden[-1] = out.hidden[rows[-1]]
            self._expand(builds, out.logits, [None] * len(builds), 1, depth, beam_width,
                         max(topk, root_topk) if widths is None else topk, widths)

            # 2. One tree forward per further level.
            for level in range(2, depth + 1):
                if min_path_prob > 0:
                    for b in builds:
                        b.frontier = [n for n in b.frontier if b.path_prob[n] >= min_path_prob]
                active = [b for b in builds if b.frontier]
                if not active or sum(b.path_prob[n] for b in active for n in b.frontier) < min_level_mass:
                    break
                logits = self._tree_forward(active, reqs)
                self._expand(active, logits, [b.frontier for b in active], level, depth, beam_width, topk, widths)
            for b in builds:
                trees[b.index] = CandidateTree(
                    tokens=np.asarray(b.tokens, np.int64), parent=np.asarray(b.parent, np.int64),
                    draft_prob=np.asarray(b.draft_prob, np.float32), path_prob=np.asarray(b.path_prob, np.float32))
        return [t if t is not None else CandidateTree.empty() for t in trees]

    def _catch_up_input(self, r: DraftRequest, st: _DraftSeq,
                        scratch: int) -> tuple[SeqInput | None, torch.Tensor | None]:
        """The causal chain that brings this request's draft cache up to its root (None: no KV room)."""
        start = _common_prefix(st.token_ids, r.token_ids)
        start = min(start, len(r.token_ids) - 1)  # the root's logits are always needed
        del st.token_ids[start:]
        if not self.kv.ensure_capacity(st.block_ids, len(r.token_ids) + scratch):
            self.kv.trim(st.block_ids, start)
            return None, None
        return SeqInput(block_ids=st.block_ids, context_len=start, token_ids=r.token_ids[start:], logits="last"), None

    def _committed(self, st: _DraftSeq, r: DraftRequest) -> None:
        st.token_ids[:] = r.token_ids

    def _tree_forward(self, active: list[_Building], reqs: list[DraftRequest]) -> torch.Tensor:
        """Run frontier nodes plus their ancestors as a tree after each committed context; frontier logits
        (a feature draft keeps each frontier node's output in `hidden` for its children's inputs)."""
        seqs, rows, feats = [], [], []
        cursor = 0
        for b in active:
            keep: set[int] = set()
            for n in b.frontier:
                while n >= 0 and n not in keep:
                    keep.add(n)
                    n = b.parent[n]
            nodes = sorted(keep)  # node indices are parents-first, so sorted order is too
            local = {n: j for j, n in enumerate(nodes)}
            parents = [local[b.parent[n]] if b.parent[n] >= 0 else -1 for n in nodes]
            st = self.seqs[reqs[b.index].request_id]
            seqs.append(SeqInput(block_ids=st.block_ids, context_len=len(st.token_ids),
                                 token_ids=[b.tokens[n] for n in nodes], parents=parents, logits="none"))
            if self.uses_features:
                feats.extend(b.hidden[b.parent[n]] for n in nodes)  # a node's pair: (parent's output, token)
            rows.extend(cursor + local[n] for n in b.frontier)
            cursor += len(nodes)
        input_ids, positions, meta, _ = self.runner.build(seqs)
        embeds = self.model.input_embeds(torch.stack(feats), input_ids) if self.uses_features else None
        hidden = self.model.forward(input_ids, positions, meta, self.kv.tensors, input_embeds=embeds)
        self.num_forwards += 1
        frontier_hidden = hidden[torch.tensor(rows, device=hidden.device)]
        if self.uses_features:  # the children of a frontier node take its output as their feature
            for (b, n), h in zip([(b, n) for b in active for n in b.frontier], frontier_hidden):
                b.hidden[n] = h
        return self.model.logits(frontier_hidden)

    def _expand(self, builds: list[_Building], logits: torch.Tensor, frontiers: list[list[int] | None],
                level: int, depth: int, beam_width: int, topk: int, widths: tuple[int, ...] | None) -> None:
        """Add children of each frontier node (rows of `logits`, in order) and choose the next frontier."""
        k = widths[level - 1] if widths is not None else topk
        k = min(k, logits.shape[-1])
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)  # [rows, k]
        if self.vocab_ids is not None:
            top_i = self.vocab_ids[top_i]
        top_p, top_i = top_p.cpu().numpy(), top_i.cpu().numpy()
        row = 0
        for b, frontier in zip(builds, frontiers):
            parents = frontier if frontier is not None else [-1]
            n = len(parents)
            p_par = np.asarray([b.path_prob[q] if q >= 0 else 1.0 for q in parents], np.float32)
            dp = top_p[row: row + n]  # [n, k]
            tok = top_i[row: row + n]
            row += n
            path = p_par[:, None] * dp  # [n, k]
            first = len(b.tokens)
            b.tokens.extend(tok.reshape(-1).tolist())
            b.parent.extend(np.repeat(np.asarray(parents, np.int64), k).tolist())
            b.draft_prob.extend(dp.reshape(-1).tolist())
            b.path_prob.extend(path.reshape(-1).tolist())
            if level >= depth:
                b.frontier = []
            elif widths is not None:
                b.frontier = list(range(first, first + n * k))
            else:
                flat = path.reshape(-1)
                best = np.argsort(-flat, kind="stable")[: beam_width]
                b.frontier = sorted(first + int(j) for j in best)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    arr = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(arr.argmax())


# ---- loading -------------------------------------------------------------------------------------------------

DISTILLED = "distilled"
FEATURE = "feature"


def load_drafter(spec: str, target, *, target_tokenizer=None, target_dir: Path | str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 num_kv_blocks: int | None = None, num_blocks: int | None = None, block_size: int = 16,
                 kv_cache_memory_gb: float = 0.25, cache_dir: Path | None = None,
                 use_vocab_subset: bool = True) -> Drafter:
    """Build a Drafter for `target`.

    spec: "feature" (the shipped feature draft for the embedded target: reads the target's hidden states),
    "distilled" (the shipped token-only draft), a path to a feature- or distilled-draft .safetensors file, or
    any model id/path `load_checkpoint` takes (an independent causal LM with the target's tokenizer).
    target: the target's Checkpoint, or its LlamaModel (then pass target_tokenizer, a tokenizer object or its
    directory, or target_dir, the target's checkpoint directory, for the vocabulary check of an independent draft).
    num_kv_blocks (alias num_blocks): draft KV blocks; None sizes them from kv_cache_memory_gb. Giving the target's
    block count gives the draft the same token capacity.
    """
    if num_kv_blocks is None:
        num_kv_blocks = num_blocks
    if target_tokenizer is None and target_dir is not None:
        target_tokenizer = Path(target_dir)
    from app.engine.speculative.distilled import SHIPPED_WEIGHTS, build_distilled_model
    from app.engine.speculative.feature import (SHIPPED_FEATURE_WEIGHTS, FeatureDrafter, build_feature_model,
                                          is_feature_draft_file)
    from app.engine.weights import Checkpoint, load_checkpoint, load_tokenizer

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
        name = "distilled" if spec == DISTILLED else str(path)
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
    if num_kv_blocks is None:
        per_block = model.kv_bytes_per_token() * block_size
        num_kv_blocks = max(1, int(kv_cache_memory_gb * 2**30) // per_block)
    return drafter_cls(model, num_kv_blocks, block_size, name=name)


def check_same_vocabulary(draft_tokenizer, target_tokenizer, draft_name: str = "draft") -> None:
    """A clear ValueError unless both tokenizers map the same tokens to the same ids."""
    dv, tv = len(draft_tokenizer.get_vocab()), len(target_tokenizer.get_vocab())
    if dv != tv:
        raise ValueError(f"draft {draft_name!r} has a different vocabulary from the target "
                         f"({dv} tokens vs {tv}): a draft must use the target's tokenizer")
    if tokenizer_fingerprint(draft_tokenizer) != tokenizer_fingerprint(target_tokenizer):
        raise ValueError(f"draft {draft_name!r} has a different vocabulary from the target (same size {dv}, "
                         f"different token -> id map): a draft must use the target's tokenizer")
