"""Token sampling: greedy rows vectorised, sampled rows with each request's own generator (reproducible).

Numerics are checked per row: a row of logits (or of processed probabilities) that is not finite raises
``NonFiniteLogitsError``, which the engine turns into a failure of that request alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.config import SamplingParams


class NonFiniteLogitsError(ArithmeticError):
    """A request's logits or sampling distribution hold NaN/inf: its output would be arbitrary."""


@dataclass
class TokenLogprob:
    """One emitted token's log-probability and the ``len(top)`` most likely alternatives (token id, logprob).

    The distribution is the target's raw next-token distribution, log_softmax(logits) in float32, before
    temperature, top-k and top-p (OpenAI's and vLLM's convention): it says how likely the model found the token,
    independent of how this request sampled. It comes from the verify pass that chose the token."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Per row of logits [n, V]: every value finite (one vectorised check for a whole step)."""
    return torch.isfinite(logits).all(dim=-1).tolist()


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a request actually samples from: temperature, then top-k, then top-p. logits: [..., V]."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of logits [V]. Raises NonFiniteLogitsError if the row or its distribution is not
    finite (multinomial would raise a generic error, or silently pick a token, on NaN)."""
    if params.greedy:
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogitsError("the model's logits for this request are not finite")
        return int(torch.argmax(logits))
    probs = processed_probs(logits, params)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        raise NonFiniteLogitsError("the sampling distribution for this request is not finite")
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[TokenLogprob]:
    """Raw log-probabilities of tokens[i] under logits[i] ([n, V]) and the num_top[i] most likely tokens of each
    row: one log_softmax and one top-k for the whole step."""
    if not tokens:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1)).squeeze(1).tolist()
    k = max(num_top)
    top_vals, top_ids = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return [TokenLogprob(t, lp, list(zip(top_ids[i][:n], top_vals[i][:n])))
            for i, (t, lp, n) in enumerate(zip(tokens, chosen, num_top))]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                greedy: list[int], finite: list[bool]) -> list[int | NonFiniteLogitsError]:
    """One token per row of logits [n, V]; a row whose numerics fail gets its NonFiniteLogitsError instead, so
    that only its request fails. greedy / finite: each row's argmax and ``finite_rows``, computed once per step
    by the caller for every row it verifies."""
    tokens: list[int | NonFiniteLogitsError] = list(greedy)
    for i, p in enumerate(params):
        try:
            if not finite[i]:
                raise NonFiniteLogitsError("the model's logits for this request are not finite")
            if not p.greedy:
                tokens[i] = sample_token(logits[i], p, generators[i])
        except NonFiniteLogitsError as exc:
            tokens[i] = exc
    return tokens
