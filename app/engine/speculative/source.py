"""What every draft source shares: the request it drafts for, the candidate tree it proposes, and the
`DraftSource` interface the speculator and the engine call (model drafts, prompt lookup, their merge).

A source proposes one candidate tree per request (`propose`), may learn from what the target accepted
(`observe`), frees a request's state (`release`) and reports its statistics (`stats`). The base class gives
no-op defaults, so a caller never asks whether a source can do something: a lookup runs no draft forwards
(`num_forwards` stays 0) and ignores the target's hidden states unless it reads them (`uses_features`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


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


class DraftSource(ABC):
    """A draft source. Subclasses implement `propose` and `release`; the rest defaults to doing nothing."""

    name: str = "draft"
    uses_features: bool = False  # reads the target's hidden states (record_hidden); feature drafts do
    num_forwards: int = 0  # draft-model forwards run so far (one per tree level); 0 for a lookup

    @abstractmethod
    def propose(self, reqs: list[DraftRequest], depth: int, beam_width: int, topk: int,
                widths: tuple[int, ...] | None = None, min_path_prob: float = 0.0,
                min_level_mass: float = 0.0, root_topk: int = 0) -> list[CandidateTree]:
        """One candidate tree per request (an empty tree where there is nothing to propose).

        Beam shape: `depth` levels, each frontier node proposes its `topk` children and the `beam_width` most
        probable become the next frontier; `widths` (a static shape) replaces depth/beam/topk. Budgeted callers
        pass cut-offs: frontier nodes with f below `min_path_prob` are not expanded, and a level is not drafted
        when its frontiers' total f is below `min_level_mass`. `root_topk` > topk widens the root's children."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Free this request's state (finished, aborted or preempted); an unknown id is fine."""

    def observe(self, request_id: str, candidates: CandidateTree, tree, path: list[int]) -> None:
        """Verify feedback: `tree` (a VerifyTree built from `candidates`, which this source proposed for the
        request) and `path`, the accepted path's indices into tree.tokens (root first)."""

    def record_hidden(self, request_id: str, start: int, hidden: torch.Tensor) -> None:
        """hidden [n, H]: the target's final-normed hidden states of tokens start..start+n-1 of this request
        (kept only where uses_features)."""

    def stats(self) -> dict:
        """Statistics for metrics (empty when the source keeps none)."""
        return {}
