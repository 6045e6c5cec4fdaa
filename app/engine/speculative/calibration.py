"""Calibration for draft sources: running acceptance statistics and predicted-vs-observed tables.

A candidate's ``f`` must estimate the probability that the target accepts its whole path, on the same scale for
every source, or the selection cannot weigh a lookup node against a model-draft node (DESIGN.md 2). The model
draft's ``f`` is its softmax product; a lookup source has no probabilities, so its conditional acceptance
``q(node | parent accepted)`` comes from ``BetaCounts``: Beta counts per feature cell (for the n-gram source:
match length bucket x depth x primary/alternative branch), updated from every verify result, and
``f(node) = prod q`` along the path.

``CalibrationTable`` checks any source after the fact: predicted ``f`` of each verified node against whether the
node ended up on the accepted path, by bin (reliability table, expected calibration error).
"""

from __future__ import annotations

import numpy as np


class BetaCounts:
    """Beta(alpha, beta) acceptance counts per cell with a prior and a pooled back-off.

    Posterior mean of cell c, in group g (cells that share a pool, e.g. all depths of one match length):
        pooled(g) = (s_pool * prior(c) + A_g) / (s_pool + A_g + B_g)      A_g, B_g: counts summed over g
        mean(c)   = (s_cell * pooled(g) + a_c) / (s_cell + a_c + b_c)
    so a cell with no data follows its group, and a group with no data follows the prior. ``window`` bounds
    the observations a cell remembers (its counts are scaled down past it): the table follows a workload that
    drifts, at a standard error of about sqrt(p (1 - p) / window).
    """

    def __init__(self, prior_mean: np.ndarray, groups: np.ndarray | None = None, *, prior_strength: float = 2.0,
                 window: float = 4096.0):
        self.prior_mean = np.clip(np.asarray(prior_mean, np.float64).ravel(), 1e-4, 1 - 1e-4)  # [C]
        n = self.prior_mean.size
        self.groups = np.arange(n) if groups is None else np.asarray(groups, np.int64).ravel()  # [C]
        if self.groups.shape != (n,):
            raise ValueError("groups must have one entry per cell")
        self.strength = float(prior_strength)
        self.window = float(window)
        self.alpha = np.zeros(n)  # [C] accepted observations
        self.beta = np.zeros(n)  # [C] rejected observations
        self._means: list[float] | None = None

    @property
    def num_cells(self) -> int:
        return self.prior_mean.size

    def update(self, cells: np.ndarray, accepted: np.ndarray) -> None:
        """One observation per entry: cell index and whether the node was accepted (its parent was)."""
        cells = np.asarray(cells, np.int64).ravel()
        if cells.size == 0:
            return
        acc = np.asarray(accepted, np.float64).ravel()
        np.add.at(self.alpha, cells, acc)
        np.add.at(self.beta, cells, 1.0 - acc)
        total = self.alpha[cells] + self.beta[cells]
        over = total > self.window
        if over.any():
            c = np.unique(cells[over])
            scale = self.window / (self.alpha[c] + self.beta[c])
            self.alpha[c] *= scale
            self.beta[c] *= scale
        self._means = None

    def means_array(self) -> np.ndarray:
        """[C] posterior mean acceptance per cell."""
        g = self.groups
        ng = int(g.max()) + 1 if g.size else 0
        a_g = np.bincount(g, self.alpha, ng)[g]
        b_g = np.bincount(g, self.beta, ng)[g]
        pooled = (self.strength * self.prior_mean + a_g) / (self.strength + a_g + b_g)
        return (self.strength * pooled + self.alpha) / (self.strength + self.alpha + self.beta)

    def means(self) -> list[float]:
        """Posterior means as a python list (cheap scalar reads in the drafting loop); cached until an update."""
        if self._means is None:
            self._means = self.means_array().tolist()
        return self._means

    def counts(self) -> np.ndarray:
        return self.alpha + self.beta


class CalibrationTable:
    """Predicted f vs observed acceptance, by f bin (a reliability table)."""

    def __init__(self, edges: np.ndarray | None = None):
        self.edges = np.linspace(0.0, 1.0, 11) if edges is None else np.asarray(edges, np.float64)
        nb = self.edges.size - 1
        self.count = np.zeros(nb)  # [bins] verified nodes
        self.sum_pred = np.zeros(nb)  # [bins] sum of predicted f
        self.sum_obs = np.zeros(nb)  # [bins] nodes on the accepted path

    def update(self, predicted: np.ndarray, accepted: np.ndarray) -> None:
        pred = np.clip(np.asarray(predicted, np.float64).ravel(), 0.0, 1.0)
        if pred.size == 0:
            return
        nb = self.count.size
        b = np.clip(np.searchsorted(self.edges, pred, side="right") - 1, 0, nb - 1)
        self.count += np.bincount(b, minlength=nb)
        self.sum_pred += np.bincount(b, pred, nb)
        self.sum_obs += np.bincount(b, np.asarray(accepted, np.float64).ravel(), nb)

    @property
    def num_observations(self) -> int:
        return int(self.count.sum())

    def rows(self) -> list[dict]:
        """Non-empty bins: {lo, hi, count, predicted (mean f), observed (acceptance rate)}."""
        out = []
        for i in np.flatnonzero(self.count):
            n = self.count[i]
            out.append({"lo": float(self.edges[i]), "hi": float(self.edges[i + 1]), "count": int(n),
                        "predicted": float(self.sum_pred[i] / n), "observed": float(self.sum_obs[i] / n)})
        return out

    def ece(self) -> float:
        """Expected calibration error: count-weighted mean |predicted - observed| over the bins."""
        n = self.count.sum()
        if n == 0:
            return 0.0
        return float(np.abs(self.sum_pred - self.sum_obs).sum() / n)

    def summary(self) -> dict:
        n = self.count.sum()
        return {"count": int(n), "ece": self.ece(),
                "mean_predicted": float(self.sum_pred.sum() / n) if n else 0.0,
                "mean_observed": float(self.sum_obs.sum() / n) if n else 0.0, "bins": self.rows()}
