"""Candidate trees from the drafter -> padded policy arrays -> compact verify trees."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.engine.speculative.source import CandidateTree
from policies import token_tree


@dataclass
class PaddedCandidates:
    tokens: np.ndarray  # [R, M] int64
    parent: np.ndarray  # [R, M] int64
    path_prob: np.ndarray  # [R, M] float32
    valid: np.ndarray  # [R, M] bool


def pad(trees: list[CandidateTree]) -> PaddedCandidates:
    r, m = len(trees), max((t.num_nodes for t in trees), default=0)
    out = PaddedCandidates(np.zeros((r, m), np.int64), np.full((r, m), -1, np.int64),
                           np.zeros((r, m), np.float32), np.zeros((r, m), bool))
    for i, t in enumerate(trees):
        n = t.num_nodes
        out.tokens[i, :n], out.parent[i, :n], out.path_prob[i, :n], out.valid[i, :n] = (
            t.tokens, t.parent, t.path_prob, True)
    return out


@dataclass
class VerifyTree:
    """What the target verifies for one request: index 0 is the root token, then the selected nodes."""

    tokens: list[int]
    parents: list[int]  # -1 for the root
    path_prob: list[float]  # f per token (1.0 for the root)
    slots: list[int]  # candidate slot of each token in the drafter's CandidateTree (-1 for the root)

    @property
    def num_nodes(self) -> int:
        return len(self.tokens) - 1


def build_verify_trees(roots: list[int], cands: PaddedCandidates, selected: np.ndarray) -> list[VerifyTree]:
    order, new_parent, counts = token_tree.compact(cands.parent, selected)
    trees = []
    for r, root in enumerate(roots):
        k = int(counts[r])
        slots = order[r, :k]
        trees.append(VerifyTree(
            tokens=[root] + cands.tokens[r, slots].tolist(),
            parents=[-1] + (new_parent[r, :k] + 1).tolist(),  # the root is local index 0
            path_prob=[1.0] + cands.path_prob[r, slots].tolist(),
            slots=[-1] + slots.tolist()))
    return trees
