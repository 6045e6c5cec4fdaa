"""Several draft sources, one candidate tree per request: the selection arbitrates between them by f.

`MultiSourceDrafter` is a DraftSource like the ones it merges (source.py), so the Speculator and every selection
policy run unchanged. Per step it asks every source for its trees (the model draft: beam search; prompt lookup:
n-gram continuations) and merges them per request:

- nodes are matched from the root down by (merged parent, token): identical tokens under the same parent become
  one node that records every source that proposed it;
- each merged node gets a conditional acceptance q (accepted given its parent was): the larger of its sources'
  own conditionals (f / f of the parent in that source's tree), except where a prompt lookup and a model draft
  propose the same token: that agreement is strong evidence (measured on summarization: 59% accepted at depth
  1, where the draft said 20% and the lookup alone gets 20%), so such nodes take q from `agreement`, running
  Beta counts by (depth, the model's q bin). f = the product of q along the merged path, so a lookup chain
  under a node the draft agrees with inherits that node's higher f instead of the lookup's own lower one;
- the result stays parents-first without a sort (a source's nodes are parents-first and each maps onto an
  existing node or is appended after its parent), f(child) <= f(parent) holds (q <= 1), and the tree is capped
  at `max_candidates` nodes, keeping the top of the (f desc, slot asc) ranking, which is a valid tree.

`observe` (called by the engine after acceptance) feeds every verified node back: lookup statistics for nodes
whose parent was accepted (the lookup's own cells for every node it proposed, agreement counts also for the
nodes a model draft proposed too), the per-source calibration tables (predicted f vs on the accepted path), and the
accepted-tokens-by-source counters. `stats()` returns them for metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.engine.speculative.calibration import BetaCounts, CalibrationTable
from app.engine.speculative.ngram import NgramSource
from app.engine.speculative.source import CandidateTree, DraftRequest, DraftSource
from policies import token_tree

DEFAULT_MAX_CANDIDATES = 192
# Agreement cells: depth (1, 2, 3+) x the model draft's own q for the node, binned by these edges.
AGREE_DEPTHS = 3
AGREE_Q_EDGES = (0.05, 0.15, 0.3, 0.5)
_AGREE_LOOKUP_PRIOR = 0.4  # prior: noisy-OR of the model's q (bin middle) and a lookup q of this


def default_agreement() -> BetaCounts:
    """Counts for P(accepted | parent accepted) of nodes a model draft and a prompt lookup both proposed."""
    mids = np.diff(np.concatenate([[0.0], AGREE_Q_EDGES, [1.0]])) / 2 + np.concatenate([[0.0], AGREE_Q_EDGES])
    prior = 1.0 - (1.0 - mids) * (1.0 - _AGREE_LOOKUP_PRIOR)
    nb = len(mids)
    return BetaCounts(np.tile(prior, AGREE_DEPTHS), np.repeat(np.arange(AGREE_DEPTHS), nb))


def agreement_cell(depth: np.ndarray, model_q: np.ndarray) -> np.ndarray:
    """Flat agreement cell of nodes at `depth` (1..) whose model-draft conditional is `model_q`."""
    d = np.minimum(np.asarray(depth, np.int64), AGREE_DEPTHS) - 1
    return d * (len(AGREE_Q_EDGES) + 1) + np.searchsorted(AGREE_Q_EDGES, model_q, side="right")


@dataclass
class MergedTree(CandidateTree):
    """A CandidateTree whose nodes record their sources."""

    source: np.ndarray | None = None  # [M] uint8 bit mask: bit s set = proposed by source s


@dataclass
class _Proposal:
    """What propose() handed out for one request, kept for its verify feedback."""

    tree: MergedTree
    source_f: list[np.ndarray | None]  # [S] each source's own f per node, [M] float32 (NaN: not by it); None: none
    cells: list[np.ndarray | None]  # [S] statistics cell per node, [M] int64 (-1: none), for sources that learn
    agree_cell: np.ndarray | None = None  # [M] int64 agreement cell of nodes a lookup and a model both proposed

    def source_f_or_nan(self, s: int) -> np.ndarray:
        f = self.source_f[s]
        return f if f is not None else np.full(self.tree.num_nodes, np.nan, np.float32)

    def cells_or_none(self, s: int) -> np.ndarray:
        c = self.cells[s]
        return c if c is not None else np.full(self.tree.num_nodes, -1, np.int64)


class MultiSourceDrafter(DraftSource):
    """Runs every draft source and merges their trees per request (see the module docstring)."""

    def __init__(self, sources: Sequence[DraftSource], names: Sequence[str] | None = None,
                 max_candidates: int = DEFAULT_MAX_CANDIDATES):
        if not sources:
            raise ValueError("at least one draft source is needed")
        if len(sources) > 8:
            raise ValueError("at most 8 draft sources")
        self.sources = list(sources)
        self.names = list(names) if names is not None else [s.name for s in self.sources]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"draft sources must be distinct, got {self.names}")
        self.name = ",".join(self.names)
        self.max_candidates = int(max_candidates)
        self._proposals: dict[str, _Proposal] = {}
        s = len(self.sources)
        self.calibration = [CalibrationTable() for _ in range(s)]  # per source, on its own f
        self.calibration_merged = CalibrationTable()  # on the f the selection saw
        self.is_lookup = [isinstance(src, NgramSource) for src in self.sources]
        self.agreement = default_agreement()
        self.num_steps = 0  # verified trees
        self.num_accepted = 0  # accepted draft nodes (bonus tokens excluded)
        self.verified_by = np.zeros(s, np.int64)  # verified nodes proposed by source s (shared nodes count for each)
        self.accepted_by = np.zeros(s, np.int64)  # accepted nodes proposed by source s
        self.accepted_only = np.zeros(s, np.int64)  # accepted nodes proposed by source s alone
        self.accepted_shared = 0  # accepted nodes proposed by several sources
        # verify feedback waiting to be applied (vectorised, once per step, before the next proposal)
        self._fb_props: list[_Proposal] = []
        self._fb_size = 0  # candidate slots of the pending proposals, concatenated
        self._fb_slots: list[int] = []  # verified nodes: slot in the concatenation
        self._fb_acc: list[bool] = []  # ... accepted
        self._fb_parent_acc: list[bool] = []  # ... parent accepted

    # ---- the DraftSource interface ------------------------------------------------------------------------
    @property
    def num_forwards(self) -> int:
        return sum(s.num_forwards for s in self.sources)

    @property
    def uses_features(self) -> bool:
        return any(s.uses_features for s in self.sources)

    def record_hidden(self, request_id: str, start: int, hidden) -> None:
        """The target's hidden states, for the sources that read them (feature drafts)."""
        for s in self.sources:
            if s.uses_features:
                s.record_hidden(request_id, start, hidden)

    def release(self, request_id: str) -> None:
        for s in self.sources:
            s.release(request_id)
        self._proposals.pop(request_id, None)

    def propose(self, reqs: list[DraftRequest], depth: int, beam_width: int, topk: int,
                widths: tuple[int, ...] | None = None, min_path_prob: float = 0.0,
                min_level_mass: float = 0.0, root_topk: int = 0) -> list[CandidateTree]:
        """Every source's trees merged per request. `root_topk` goes to the model sources: their wider root
        also tells how likely the draft finds a lookup's first token (agreement)."""
        self._flush()
        kw = dict(depth=depth, beam_width=beam_width, topk=topk, widths=widths, min_path_prob=min_path_prob,
                  min_level_mass=min_level_mass)
        per_source: list = [None] * len(self.sources)
        anchors = None  # the first model source's trees: lookups also hang under their best nodes
        for s, src in enumerate(self.sources):
            if not self.is_lookup[s]:
                per_source[s] = src.propose(reqs, root_topk=root_topk, **kw)
                anchors = per_source[s] if anchors is None else anchors
        for s, src in enumerate(self.sources):
            if self.is_lookup[s]:
                per_source[s] = src.propose(reqs, anchors=anchors, **kw)
        out = []
        for i, r in enumerate(reqs):
            prop = self._merge([trees[i] for trees in per_source])
            self._proposals[r.request_id] = prop
            out.append(prop.tree)
        return out

    def observe(self, request_id: str, candidates: CandidateTree, tree, path: list[int]) -> None:
        """Verify feedback for one request: `tree` (a VerifyTree over `candidates`, which this drafter proposed)
        and `path`, the accepted path's indices into tree.tokens (root first). Queued; applied in one batch."""
        prop = self._proposals.pop(request_id, None)
        if prop is None or prop.tree is not candidates or len(tree.tokens) <= 1:
            return
        on_path = set(path)
        off = self._fb_size
        self._fb_props.append(prop)
        self._fb_size += prop.tree.num_nodes
        self._fb_slots.extend([s + off for s in tree.slots[1:]])
        self._fb_acc.extend([i in on_path for i in range(1, len(tree.tokens))])
        self._fb_parent_acc.extend([p in on_path for p in tree.parents[1:]])
        self.num_steps += 1
        self.num_accepted += len(path) - 1

    def _flush(self) -> None:
        """Apply the queued feedback: lookup statistics, calibration tables, accepted-by-source counters."""
        if not self._fb_props:
            return
        props = self._fb_props
        slots = np.asarray(self._fb_slots, np.int64)  # [K] verified nodes of all queued trees
        acc = np.asarray(self._fb_acc, bool)  # [K] on the accepted path
        parent_acc = np.asarray(self._fb_parent_acc, bool)  # [K] parent on the accepted path
        self._fb_props, self._fb_size, self._fb_slots, self._fb_acc, self._fb_parent_acc = [], 0, [], [], []
        self.calibration_merged.update(np.concatenate([p.tree.path_prob for p in props])[slots], acc)
        bits = np.concatenate([p.tree.source for p in props])[slots]
        agree = np.concatenate([p.agree_cell if p.agree_cell is not None else np.full(p.tree.num_nodes, -1, np.int64)
                                for p in props])[slots]
        learn_agree = (agree >= 0) & parent_acc
        self.agreement.update(agree[learn_agree], acc[learn_agree])
        for s, src in enumerate(self.sources):
            mine = (bits >> s) & 1 == 1
            if not mine.any():
                continue
            f = np.concatenate([p.source_f_or_nan(s) for p in props])[slots]
            self.calibration[s].update(f[mine], acc[mine])
            self.verified_by[s] += int(mine.sum())
            self.accepted_by[s] += int((mine & acc).sum())
            self.accepted_only[s] += int((acc & (bits == (1 << s))).sum())
            if self.is_lookup[s]:
                cells = np.concatenate([p.cells_or_none(s) for p in props])[slots]
                learn = (cells >= 0) & parent_acc
                src.update_stats(cells[learn], acc[learn])
        self.accepted_shared += int((acc & ((bits & (bits - 1)) != 0)).sum())  # more than one bit set

    # ---- merging ------------------------------------------------------------------------------------------
    def _merge(self, trees: list[CandidateTree]) -> _Proposal:
        num_src = len(trees)
        nonempty = [s for s, t in enumerate(trees) if t.num_nodes]
        if len(nonempty) <= 1:  # nothing to merge
            s = nonempty[0] if nonempty else 0
            t = trees[s]
            source_f: list[np.ndarray | None] = [None] * num_src
            cells: list[np.ndarray | None] = [None] * num_src
            source_f[s], cells[s] = t.path_prob, getattr(t, "cell", None)
            merged = MergedTree(tokens=t.tokens, parent=t.parent, draft_prob=t.draft_prob, path_prob=t.path_prob,
                                source=np.full(t.num_nodes, 1 << s, np.uint8))
            return self._cap(_Proposal(merged, source_f, cells))

        tok: list[int] = []
        par: list[int] = []
        index: dict[tuple[int, int], int] = {}
        maps = []  # per non-empty source: [n_s] merged index of each of its nodes
        for s in nonempty:
            t = trees[s]
            t_tok, t_par = t.tokens.tolist(), t.parent.tolist()
            if not tok:  # the first source: usually duplicate-free, take it whole
                keys = list(zip(t_par, t_tok))
                index = dict(zip(keys, range(len(keys))))
                if len(index) == len(keys):
                    tok, par = t_tok, t_par
                    maps.append(np.arange(len(keys)))
                    continue
                index = {}
            mp = [0] * len(t_tok)
            for j, (p, x) in enumerate(zip(t_par, t_tok)):
                key = (mp[p] if p >= 0 else -1, x)
                i = index.get(key)
                if i is None:
                    i = index[key] = len(tok)
                    tok.append(x)
                    par.append(key[0])
                mp[j] = i
            maps.append(np.asarray(mp, np.int64))
        m = len(tok)
        source_f = [None] * num_src
        cells = [None] * num_src
        bits = np.zeros(m, np.uint8)
        q_model = np.zeros(m, np.float64)  # the largest conditional of the model sources (0: none proposed it)
        q_lookup = np.zeros(m, np.float64)
        for s, mp in zip(nonempty, maps):
            t = trees[s]
            pf = t.path_prob
            q = np.minimum(t.draft_prob.astype(np.float64), 1.0)  # this source's conditional (f / parent's f)
            own = getattr(t, "anchor_copy", None)  # copies of another source's nodes are not this source's
            cell = getattr(t, "cell", None)
            if own is not None:
                own = ~own
                mp, pf, q, cell = mp[own], pf[own], q[own], cell[own] if cell is not None else None
            source_f[s] = np.full(m, np.nan, np.float32)
            np.fmax.at(source_f[s], mp, pf)  # fmax: a source's own duplicates keep their larger f
            if cell is not None:
                cells[s] = np.full(m, -1, np.int64)
                cells[s][mp] = cell
            bits[mp] |= np.uint8(1 << s)
            np.fmax.at(q_lookup if self.is_lookup[s] else q_model, mp, q)  # fmax: a NaN f counts as 0
        parent = np.asarray(par, np.int64)
        lookup_bits = sum(1 << s for s in range(num_src) if self.is_lookup[s])
        both = ((bits & lookup_bits) != 0) & ((bits & ~np.uint8(lookup_bits)) != 0)
        q_merged = np.maximum(q_model, q_lookup)
        agree_cell = None
        if both.any():
            depth = token_tree.depths(parent[None], np.ones((1, m), bool))[0]
            agree_cell = np.where(both, agreement_cell(depth, q_model), -1)
            q_merged[both] = np.maximum(self.agreement.means_array()[agree_cell[both]], q_merged[both])
        q_merged = q_merged.astype(np.float32)
        f = token_tree.path_probs(parent[None], q_merged[None], np.ones((1, m), bool))[0]
        merged = MergedTree(tokens=np.asarray(tok, np.int64), parent=parent, draft_prob=q_merged, path_prob=f,
                            source=bits)
        return self._cap(_Proposal(merged, source_f, cells, agree_cell))

    def _cap(self, prop: _Proposal) -> _Proposal:
        """Keep the best max_candidates nodes by (f desc, slot asc): a prefix of that ranking is a valid tree."""
        t = prop.tree
        m = t.num_nodes
        if m <= self.max_candidates:
            return prop
        keep = np.sort(np.lexsort((np.arange(m), -t.path_prob.astype(np.float64)))[: self.max_candidates])
        new_index = np.full(m, -1, np.int64)
        new_index[keep] = np.arange(keep.size)
        old_parent = t.parent[keep]
        parent = np.where(old_parent >= 0, new_index[np.maximum(old_parent, 0)], -1)
        tree = MergedTree(tokens=t.tokens[keep], parent=parent, draft_prob=t.draft_prob[keep],
                          path_prob=t.path_prob[keep], source=t.source[keep])
        return _Proposal(tree, [f[keep] if f is not None else None for f in prop.source_f],
                         [c[keep] if c is not None else None for c in prop.cells],
                         prop.agree_cell[keep] if prop.agree_cell is not None else None)

    # ---- metrics ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Accepted tokens per verified tree split by source, calibration per source, lookup statistics.

        accepted_per_step: accepted draft tokens + the bonus token, per verified tree.
        accepted_per_step_by_source[name]: accepted nodes that source proposed (shared nodes count for each);
        accepted_per_step_only[name]: accepted nodes only that source proposed; ["shared"]: by several.
        calibration[name]: that source's own f vs acceptance by bin; ["merged"]: the f the selection used.
        lookup_stats[name]: per (match length, depth, branch) cell with data: observations and mean q.
        agreement: per (depth, model q bin) cell with data, for nodes a lookup and a model draft both proposed.
        """
        self._flush()
        steps = max(self.num_steps, 1)
        out = {
            "sources": list(self.names),
            "spec_steps": self.num_steps,
            "accepted_per_step": (self.num_accepted + self.num_steps) / steps if self.num_steps else 0.0,
            "accepted_per_step_by_source": {n: float(self.accepted_by[s]) / steps for s, n in enumerate(self.names)},
            "accepted_per_step_only": {**{n: float(self.accepted_only[s]) / steps for s, n in enumerate(self.names)},
                                       "shared": self.accepted_shared / steps},
            "verified_per_step_by_source": {n: float(self.verified_by[s]) / steps for s, n in enumerate(self.names)},
            "calibration": {**{n: self.calibration[s].summary() for s, n in enumerate(self.names)},
                            "merged": self.calibration_merged.summary()},
            "lookup_stats": {},
            "agreement": [],
        }
        counts, means = self.agreement.counts(), self.agreement.means_array()
        edges = (0.0, *AGREE_Q_EDGES, 1.0)
        for c in np.flatnonzero(counts > 0):
            d, b = divmod(int(c), len(AGREE_Q_EDGES) + 1)
            out["agreement"].append({"depth": d + 1, "model_q_min": edges[b], "model_q_max": edges[b + 1],
                                     "observations": float(counts[c]), "mean": float(means[c])})
        for s, (name, src) in enumerate(zip(self.names, self.sources)):
            if self.is_lookup[s]:
                out["lookup_stats"][name] = src.stats()["lookup_stats"]
        return out
