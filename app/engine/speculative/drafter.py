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

from dataclasses import dataclass, field

import numpy as np
import torch

from app.engine.kv_cache import KVCache
from app.engine.model import LlamaModel
from app.engine.runner import ModelRunner, SeqInput
from app.engine.speculative.source import CandidateTree, DraftRequest, DraftSource
from kernels.metadata import MAX_TREE_TOKENS


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


class Drafter(DraftSource):
    """Proposes candidate trees for a batch of requests with one draft forward per level. (FeatureDrafter, in
    feature.py, is the one that reads the target's hidden states: uses_features.)"""

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
        start = common_prefix(st.token_ids, r.token_ids)
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


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    arr = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(arr.argmax())
