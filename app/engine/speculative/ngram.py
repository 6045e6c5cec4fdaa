"""Prompt lookup: propose the tokens that followed earlier occurrences of a request's last n tokens.

Each request's prompt and output so far are indexed (per request id, released with the request): for each n in
[min_n, max_n] a dict from an n-gram's hash to the latest position where it ends, and a `prev` list chaining
every position to the previous occurrence of the same n-gram (occurrences newest first). The first propose
builds it over the whole prompt with numpy (one stable sort per n, ~10 ms for 8k tokens on this CPU); later
steps add only the newly committed tokens (O(max_n) integer operations per token, rolling hashes). A query is
one dict lookup per n, longest n first, plus a walk along `prev`: its cost does not depend on the prompt length.

Proposal per request: up to `max_matches` earlier occurrences (longest n first, newest first within an n);
each occurrence's true match length is measured (slice compares up to 32 tokens; this also rejects hash
collisions); occurrences are ranked by match length, then recency; the tokens after each (max(tree depth,
min_depth) of them) go into a trie under the root, so continuations sharing a prefix share nodes and distinct
ones become sibling branches (at most `max_branches`). Node f comes from the calibrated acceptance statistics
(`calibration.py`): q(node) = P(accepted | parent accepted) for its cell (match length bucket, depth,
primary/alternative branch), f = product of q along the path. The match length of a node at depth d is the
occurrence's measured length plus d - 1: once its parent is accepted, the node continues a match that much
longer, so a deep node of a short match shares statistics (and the prior's optimism) with shallow nodes of long
matches instead of being pulled down to the short match's first-token rate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from app.engine.speculative.calibration import BetaCounts
from app.engine.speculative.source import CandidateTree, DraftRequest, DraftSource

_P = 0x9E3779B97F4A7C15  # odd 64-bit multiplier of the polynomial n-gram hash
_MASK = (1 << 64) - 1
# Match-length buckets: bucket b holds lengths in [LEN_EDGES[b], LEN_EDGES[b + 1]); lengths are measured up to 32.
LEN_EDGES = (1, 2, 3, 4, 6, 8, 16, 32)
MAX_STAT_DEPTH = 16  # depths beyond share the last depth's cell
_REBUILD_TOKENS = 256  # more new tokens than this at once: rebuild with numpy instead of rolling


def _len_bucket(length: int) -> int:
    b = 0
    while b + 1 < len(LEN_EDGES) and length >= LEN_EDGES[b + 1]:
        b += 1
    return b


_BUCKET = [_len_bucket(n) for n in range(LEN_EDGES[-1] + 1)]  # length (capped at 32) -> bucket


def cell_index(bucket: int, depth: int, branch: int) -> int:
    """Flat statistics cell of (match length bucket, depth 1.., branch 0 = primary / 1 = alternative).
    Cells of one (bucket, branch) are consecutive by depth: cell // MAX_STAT_DEPTH is their pool."""
    return (bucket * 2 + branch) * MAX_STAT_DEPTH + min(depth, MAX_STAT_DEPTH) - 1


def cell_features(cell: int) -> tuple[int, int, int]:
    """Inverse of cell_index: (length bucket, depth, branch)."""
    group, d = divmod(cell, MAX_STAT_DEPTH)
    bucket, branch = divmod(group, 2)
    return bucket, d + 1, branch


PRIOR_MEAN = (0.25, 0.45, 0.55, 0.6, 0.7, 0.75, 0.8, 0.8)  # per LEN_EDGES bucket, primary branch


def default_stats(**kw) -> BetaCounts:
    """Prior: P(accept | parent accepted) grows with the match length (PRIOR_MEAN, roughly what the embedded
    target shows), a third of that for alternative branches; all depths of one (length, branch) pool."""
    nb = len(LEN_EDGES)
    prior = np.empty((nb, 2, MAX_STAT_DEPTH))
    for b, m in enumerate(PRIOR_MEAN):
        prior[b, 0], prior[b, 1] = m, m / 3
    groups = np.arange(prior.size) // MAX_STAT_DEPTH
    return BetaCounts(prior, groups, **kw)


@dataclass
class LookupTree(CandidateTree):
    """A CandidateTree whose nodes carry their statistics cell (for the verify feedback)."""

    cell: np.ndarray | None = None  # [M] int64 flat BetaCounts cell of each node (-1: an anchor copy)
    anchor_copy: np.ndarray | None = None  # [M] bool: a copy of a model-draft node that lookups hang under


class NgramIndex:
    """One request's n-gram index over its tokens (see the module docstring)."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.reset()

    def reset(self) -> None:
        self.length = 0  # tokens hashed (positions 0 .. length - 1)
        self.last_token = -1
        n = self.max_n + 1
        self.heads: list[dict[int, int]] = [{} for _ in range(n)]  # [n] hash -> newest end position
        self.prev: list[list[int]] = [[] for _ in range(n)]  # [n][pos] previous end position of that n-gram
        self.tail = [0] * n  # [n] hash of the n-gram ending at position length - 1

    def update(self, tokens: list[int]) -> None:
        """Catch up with `tokens` (the previous tokens plus new ones). Position i < length - 1 is searchable
        once the token after it is known; the last position is the query."""
        new_len = len(tokens)
        if new_len < self.length or (self.length and tokens[self.length - 1] != self.last_token):
            self.reset()  # the history changed (a reused request id): start over
        if new_len == self.length:
            return
        if self.length == 0 or new_len - self.length > _REBUILD_TOKENS:
            self._build(tokens)
        else:
            self._extend(tokens)
        self.last_token = tokens[-1]

    def _build(self, tokens: list[int]) -> None:
        length = len(tokens)
        t = np.asarray(tokens, np.int64).astype(np.uint64) + np.uint64(1)
        h = t.copy()  # [L] hash of the n-gram ending at each position (garbage below n - 1)
        p = np.uint64(_P)
        for n in range(1, self.max_n + 1):
            if n > 1:
                h[1:] = h[:-1] * p + t[1:]  # wraps modulo 2**64, as the rolling update does
            self.tail[n] = int(h[-1])
            self.heads[n], self.prev[n] = {}, [-1] * max(length - 1, 0)
            if n < self.min_n or length - 1 <= n - 1:
                continue
            keys = h[n - 1:length - 1]  # searchable positions n-1 .. L-2
            order = np.argsort(keys, kind="stable")
            ks = keys[order]
            ps = order + (n - 1)
            prev = np.full(length - 1, -1, np.int64)
            same = ks[1:] == ks[:-1]
            prev[ps[1:]] = np.where(same, ps[:-1], -1)
            last = np.append(~same, True)
            self.heads[n] = dict(zip(ks[last].tolist(), ps[last].tolist()))
            self.prev[n] = prev.tolist()
        self.length = length

    def _extend(self, tokens: list[int]) -> None:
        heads, prev, tail = self.heads, self.prev, self.tail
        lo, hi = self.min_n, self.max_n
        for i in range(self.length, len(tokens)):
            q = i - 1  # position q gains its continuation token: index the n-grams ending there
            for n in range(lo, hi + 1):
                if q >= n - 1:
                    d = heads[n]
                    prev[n].append(d.get(tail[n], -1))
                    d[tail[n]] = q
                else:
                    prev[n].append(-1)
            t = tokens[i] + 1
            for n in range(hi, 1, -1):
                tail[n] = (tail[n - 1] * _P + t) & _MASK
            tail[1] = t
        self.length = len(tokens)

    def matches(self, tokens: list[int], max_matches: int, extra: list[int] = ()) -> list[tuple[int, int]]:
        """Earlier occurrences of the suffix of tokens + extra (extra: tokens not committed yet, e.g. a model
        draft's path to an anchor node): [(end position, measured match length)], best first (longer match,
        then newer). Only indexed positions (with a committed token after them)."""
        length = self.length
        query = tokens[-LEN_EDGES[-1]:] + list(extra) if extra else tokens
        qlen = len(query)
        total = length + len(extra)
        tails = self.tail if not extra else self._query_hashes(query)
        found: list[tuple[int, int]] = []
        seen: set[int] = set()
        for n in range(min(self.max_n, length - 1, total), self.min_n - 1, -1):
            p = self.heads[n].get(tails[n], -1)
            walked = 0
            while p >= 0 and len(found) < max_matches and walked < 2 * max_matches:
                walked += 1
                if p not in seen:
                    seen.add(p)
                    if tokens[p - n + 1:p + 1] == query[qlen - n:]:  # not a hash collision
                        m = n
                        for e in LEN_EDGES:
                            if e <= m:
                                continue
                            if p - e + 1 < 0 or e > qlen or tokens[p - e + 1:p + 1] != query[qlen - e:]:
                                break
                            m = e
                        found.append((p, m))
                p = self.prev[n][p]
            if len(found) >= max_matches:
                break
        found.sort(key=lambda pm: (-pm[1], -pm[0]))
        return found

    def _query_hashes(self, query: list[int]) -> list[int]:
        """[n] hash of the last n tokens of query (the index's polynomial hash), n = 0 .. max_n."""
        out = [0] * (self.max_n + 1)
        for n in range(1, min(self.max_n, len(query)) + 1):
            h = 0
            for t in query[len(query) - n:]:
                h = (h * _P + t + 1) & _MASK
            out[n] = h
        return out


@dataclass(frozen=True)
class NgramConfig:
    min_n: int = 1
    max_n: int = 4
    max_matches: int = 8  # occurrences considered per request and step
    max_branches: int = 4  # distinct continuations kept (sibling branches)
    min_depth: int = 16  # chains are at least this deep whatever the model's adaptive depth (summarization: 3.27 tokens
    # per step at 16 vs 3.13 at 8 and 3.24 at 24, bench.ngram's 16 requests)
    max_anchors: int = 0  # model-draft nodes per request that a lookup is also anchored under (merged sources)

    @classmethod
    def parse(cls, spec: str) -> "NgramConfig":
        """"ngram", "ngram:MIN-MAX" (e.g. "ngram:2-5"), "ngram:anchors=N" (lookups under the model draft's
        N best nodes; 0: none), or both ("ngram:2-5:anchors=0")."""
        name, _, args = spec.strip().lower().partition(":")
        if name != "ngram":
            raise ValueError(f"not an n-gram source: {spec!r}")
        cfg = cls()
        for arg in filter(None, args.split(":")):
            key, eq, value = arg.partition("=")
            try:
                if eq and key == "anchors":
                    cfg = replace(cfg, max_anchors=int(value))
                elif not eq:
                    lo, _, hi = arg.partition("-")
                    cfg = replace(cfg, min_n=int(lo), max_n=int(hi or lo))
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad n-gram option {arg!r} in {spec!r}; expected e.g. 'ngram:1-4' or "
                                 f"'ngram:anchors=3'") from None
        if not 1 <= cfg.min_n <= cfg.max_n:
            raise ValueError(f"n-gram range must satisfy 1 <= min <= max, got {spec!r}")
        if cfg.max_anchors < 0:
            raise ValueError(f"anchors must be >= 0, got {spec!r}")
        return cfg


class NgramSource(DraftSource):
    """Prompt-lookup draft source; f from calibrated acceptance statistics (`acceptance`, learnt through
    `update_stats` when a MultiSourceDrafter feeds verify results back)."""

    def __init__(self, config: NgramConfig = NgramConfig(), acceptance: BetaCounts | None = None,
                 name: str = "ngram"):
        self.config = config
        self.name = name
        self.acceptance = acceptance if acceptance is not None else default_stats()  # q per statistics cell
        self.indexes: dict[str, NgramIndex] = {}

    def release(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)

    def update_stats(self, cells: np.ndarray, accepted: np.ndarray) -> None:
        """Verify feedback: one entry per verified lookup node whose parent was accepted."""
        self.acceptance.update(cells, accepted)

    def stats(self) -> dict:
        """lookup_stats: per (match length, depth, branch) cell with data, its observations and mean q."""
        counts, means = self.acceptance.counts(), self.acceptance.means_array()
        rows = []
        for c in np.flatnonzero(counts > 0):
            bucket, depth, branch = cell_features(int(c))
            rows.append({"match_len": LEN_EDGES[bucket], "depth": depth, "branch": branch,
                         "observations": float(counts[c]), "mean": float(means[c])})
        return {"lookup_stats": rows}

    def propose(self, reqs: list[DraftRequest], depth: int, beam_width: int = 1, topk: int = 1,
                widths: tuple[int, ...] | None = None, min_path_prob: float = 0.0,
                min_level_mass: float = 0.0, root_topk: int = 0,
                anchors: list[CandidateTree] | None = None) -> list[LookupTree]:
        """One lookup tree per request, max(depth, min_depth) levels deep (len(widths) for a static shape).

        Lookup nodes cost nothing to propose, so their chains do not shrink with the adaptive depth (1 under
        heavy load), and the model draft's work cut-offs (`min_path_prob`, `min_level_mass`) do not apply:
        the selection weighs their f against everything else under the budget.

        `anchors` (one model-draft tree per request, from a merged drafter): the lookup is also run under the
        draft's `max_anchors` most probable nodes that the plain lookup does not already cover, with the path
        to the node appended to the query. A paraphrase (the target's own first token) stops a plain lookup;
        anchored under the draft's guess of that token, the lookup resumes copying in the same step. Such a
        chain hangs under copies of the anchor path (`anchor_copy`, which the merge maps onto the draft's
        nodes), and its f is the anchor's f times the chain's calibrated q.
        """
        if widths is not None:
            depth = len(widths)
        elif depth >= 1:
            depth = max(depth, self.config.min_depth)
        if depth < 1:
            raise ValueError("depth must be at least 1")
        cfg = self.config
        means = self.acceptance.means()
        out = []
        for i, r in enumerate(reqs):
            if not r.token_ids:
                raise ValueError(f"request {r.request_id}: token_ids is empty")
            index = self.indexes.get(r.request_id)
            if index is None:
                index = self.indexes[r.request_id] = NgramIndex(cfg.min_n, cfg.max_n)
            tokens = r.token_ids
            index.update(tokens)
            tree = self._tree(tokens, index.matches(tokens, cfg.max_matches), depth, means, cfg.max_branches)
            if anchors is not None and cfg.max_anchors > 0 and anchors[i].num_nodes:
                tree = self._anchored(tree, tokens, index, anchors[i], depth, means)
            out.append(tree)
        return out

    def _anchored(self, tree: LookupTree, tokens: list[int], index: NgramIndex, draft: CandidateTree,
                  depth: int, means: list[float]) -> LookupTree:
        """`tree` plus, under each anchor of `draft`, a copy of the anchor path and the trie of the best
        occurrences' continuations after it."""
        d_par, d_tok = draft.parent.tolist(), draft.tokens.tolist()
        on_trie = dict(zip(zip(tree.parent.tolist(), tree.tokens.tolist()), range(tree.num_nodes)))
        mapped: list[int] = []  # draft node -> plain lookup node with the same path (-1: none)
        for p, t in zip(d_par, d_tok):
            mapped.append(-1 if p >= 0 and mapped[p] < 0 else on_trie.get((mapped[p] if p >= 0 else -1, t), -1))
        free = np.flatnonzero(np.asarray(mapped) < 0)
        if not free.size:
            return tree
        ranked = free[np.argsort(-draft.path_prob[free], kind="stable")][: self.config.max_anchors]
        parts = [tree]
        offset = tree.num_nodes
        for a in ranked.tolist():
            path = [a]
            while d_par[path[-1]] >= 0:
                path.append(d_par[path[-1]])
            path.reverse()
            found = index.matches(tokens, max(self.config.max_matches // 2, 1), extra=[d_tok[j] for j in path])
            if not found:
                continue
            sub = self._tree(tokens, found, depth, means, self.config.max_branches, f0=float(draft.path_prob[a]))
            k = len(path)
            copy = LookupTree(tokens=draft.tokens[path], parent=np.arange(offset - 1, offset + k - 1),
                              draft_prob=draft.draft_prob[path], path_prob=draft.path_prob[path],
                              cell=np.full(k, -1, np.int64), anchor_copy=np.ones(k, bool))
            copy.parent[0] = -1
            sub.parent = np.where(sub.parent >= 0, sub.parent + offset + k, offset + k - 1)
            sub.anchor_copy = np.zeros(sub.num_nodes, bool)
            parts += [copy, sub]
            offset += k + sub.num_nodes
        if len(parts) == 1:
            return tree
        tree.anchor_copy = np.zeros(tree.num_nodes, bool)
        cat = lambda name: np.concatenate([getattr(t, name) for t in parts])  # noqa: E731
        return LookupTree(tokens=cat("tokens"), parent=cat("parent"), draft_prob=cat("draft_prob"),
                          path_prob=cat("path_prob"), cell=cat("cell"), anchor_copy=cat("anchor_copy"))

    def _tree(self, tokens: list[int], found: list[tuple[int, int]], depth: int, means: list[float],
              max_branches: int, f0: float = 1.0) -> LookupTree:
        """Trie of the occurrences' continuations (best occurrence first); f = f0 x the product of the cells'
        means along the path (f0: the anchor's f, 1 under the root)."""
        tok: list[int] = []
        par: list[int] = []
        cell: list[int] = []
        f: list[float] = []
        q: list[float] = []
        children: dict[tuple[int, int], int] = {}
        num_branches = 0
        top = LEN_EDGES[-1]
        for p, m in found:
            if num_branches >= max_branches:
                break
            cont = tokens[p + 1:p + 1 + depth]
            node, d = -1, 0
            if num_branches:  # descend the prefix this continuation shares with earlier ones
                for t in cont:
                    c = children.get((node, t))
                    if c is None:
                        break
                    node, d = c, d + 1
                else:
                    continue  # nothing new
            branch = 1 if num_branches else 0
            num_branches += 1
            new = cont[d:]
            first = len(tok)
            tok.extend(new)
            par.append(node)
            par.extend(range(first, first + len(new) - 1))
            fp = f[node] if node >= 0 else f0
            keep_children = num_branches < max_branches
            for j in range(first, first + len(new)):
                d += 1
                k = (_BUCKET[min(m + d - 1, top)] * 2 + branch) * MAX_STAT_DEPTH + min(d, MAX_STAT_DEPTH) - 1
                qj = means[k]
                fp *= qj
                cell.append(k)
                q.append(qj)
                f.append(fp)
                if keep_children:
                    children[(par[j], tok[j])] = j
        return LookupTree(tokens=np.asarray(tok, np.int64), parent=np.asarray(par, np.int64),
                          draft_prob=np.asarray(q, np.float32), path_prob=np.asarray(f, np.float32),
                          cell=np.asarray(cell, np.int64))
