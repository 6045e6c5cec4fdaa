"""Start-up latency profile of the target's step (tokens in step x context), cached per model and device."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from app.engine.kv_cache import KVCache
from app.engine.runner import ModelRunner, SeqInput
from policies.latency_model import LatencyModel


def _cache_key(model_name: str, runner: ModelRunner, shapes: list) -> str:
    c = runner.model.config
    dev = torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu"
    text = json.dumps([model_name, c.hidden_size, c.num_layers, c.vocab_size, str(runner.model.dtype), dev,
                       torch.__version__, torch.get_num_threads(), shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_target(runner: ModelRunner, model_name: str, cache_dir: Path | None,
                   num_requests: tuple[int, ...] = (1, 4, 16), tokens_per_request: tuple[int, ...] = (1, 4, 16),
                   context_lens: tuple[int, ...] = (32, 512), single_request_tokens: tuple[int, ...] = (2, 8, 24, 32),
                   repeats: int = 3) -> LatencyModel:
    """Time verify-shaped steps (num_requests trees of tokens_per_request tokens after a context) and fit."""
    shapes = [(n, t, c) for n in num_requests for t in tokens_per_request for c in context_lens]
    # One request's growing tree: the marginal cost of a verified node at small steps decides how many nodes
    # are worth verifying (min_worthwhile_path_prob), so that range is sampled finely.
    shapes += [(1, t, c) for t in single_request_tokens for c in context_lens if (1, t, c) not in shapes]
    path = None
    if cache_dir is not None:
        path = cache_dir / "latency" / f"{_cache_key(model_name, runner, shapes)}.json"
        if path.exists():
            return LatencyModel.from_dict(json.loads(path.read_text()))
    kv: KVCache = runner.kv
    samples = []
    for n, t, c in shapes:
        blocks = [[] for _ in range(n)]
        if not all(kv.ensure_capacity(b, c + t) for b in blocks):
            for b in blocks:
                kv.release(b)
            continue
        seqs = [SeqInput(b, c, [1] * t, parents=[-1] + [i for i in range(t - 1)], logits="all") for b in blocks]
        times = []
        for _ in range(repeats + 1):  # first run warms up
            t0 = time.perf_counter()
            runner.run(seqs)
            if runner.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        samples.append((n * t, n * c, float(np.median(times[1:]))))  # a shared CPU's best case flatters it
        for b in blocks:
            kv.release(b)
    model = LatencyModel.fit(samples)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(model.to_dict()))
    return model
