"""Lossless acceptance: walk the verified tree with the target's own token choices.

At the current node the target picks its token exactly as non-speculative decoding would (argmax for greedy,
a sample from its processed distribution with the request's generator otherwise). If a child carries that
token we descend, else the token is emitted as the bonus and the walk stops. Every emitted token is the
target's choice given the tokens before it, so greedy output is identical to non-speculative decoding and
sampled output has the target's distribution (the generator is even consumed in the same order: one draw per
emitted token).
"""

from __future__ import annotations

import torch

from app.engine.config import SamplingParams
from app.engine.sampling import NonFiniteLogitsError, sample_token


def accept_tree(tokens: list[int], parents: list[int], logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None, greedy_choice: list[int] | None = None,
                finite: list[bool] | None = None) -> tuple[list[int], list[int]]:
    """tokens/parents: the verified tree, index 0 = root (parent -1). logits: [len(tokens), V].

    Returns (path, emitted): step indices of the accepted path starting with the root, and the tokens the
    request gains (accepted children's tokens, then the target's bonus token); len(emitted) == len(path).
    greedy_choice: precomputed argmax per node (one vectorised argmax for the whole batch); finite: precomputed
    per node, whether its logits are finite. The target's logits for emitted[k] are logits[path[k]].
    Raises NonFiniteLogitsError when a node the walk reaches has non-finite logits (the request then fails alone).
    """
    children: dict[int, dict[int, int]] = {}
    for i in range(1, len(tokens)):
        children.setdefault(parents[i], {})[tokens[i]] = i
    node, path, emitted = 0, [0], []
    while True:
        if params.greedy:
            if not (finite[node] if finite is not None else bool(torch.isfinite(logits[node]).all())):
                raise NonFiniteLogitsError("the model's logits for this request are not finite")
            t = greedy_choice[node] if greedy_choice is not None else int(torch.argmax(logits[node]))
        else:
            t = sample_token(logits[node], params, generator)
        emitted.append(t)
        child = children.get(node, {}).get(t)
        if child is None:
            return path, emitted
        node = child
        path.append(child)
