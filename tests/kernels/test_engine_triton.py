"""The engine with the Triton kernels (compiled on CUDA, interpreted on CPU) against the same engine with the torch
references (`ADASERVE_KERNELS=reference`, kernels/dispatch.py): float32 greedy tokens equal, with and without
speculation (tree masks and KV commits go through the kernels too); on CUDA also bf16 logits of decode-shaped
steps (head dim 64 / 128, GQA group 1 / 4 / 8) within bf16 tolerance. The models are dummy configs: no tokenizer
or download needed."""

from __future__ import annotations

import json

import pytest
import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine
from app.engine.runner import SeqInput

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
        "max_position_embeddings": 2048, "tie_word_embeddings": True}


def _config_dir(path, **overrides) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY | overrides))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _config_dir(tmp_path_factory.mktemp("dummy") / "tiny")


def _engine(model: str, device: str, dtype: str = "float32", **kw) -> LLMEngine:
    kw = dict(num_kv_blocks=64, block_size=8, profile_latency=False, token_budget=24, prefill_chunk_tokens=8) | kw
    return LLMEngine(EngineConfig(model=model, load_format="dummy", device=device, dtype=dtype, **kw))


def _generate(model: str, device: str, draft: str | None, policy: str) -> list[list[int]]:
    engine = _engine(model, device, draft=draft, policy=policy)  # float32: exact equality, no bf16 near-ties
    prompts = [[5, 17, 300, 42, 9, 100, 77, 23, 11], [400, 401, 402], [7] * 17]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    return [o.token_ids for o in outs]


def _count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Count the Triton entry points dispatch calls (it imports them at each call, so patching the modules works)."""
    from kernels import kv_commit, tree_attention

    calls = {"attention": 0, "commit_rows": 0}
    attend, commit = tree_attention.tree_attention, kv_commit.kv_commit

    def counted_attention(*a, **kw):
        calls["attention"] += 1
        return attend(*a, **kw)

    def counted_commit(*a):
        calls["commit_rows"] += a[2].numel()
        return commit(*a)

    monkeypatch.setattr(tree_attention, "tree_attention", counted_attention)
    monkeypatch.setattr(kv_commit, "kv_commit", counted_commit)
    return calls


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("policy", ["none", "dynamic-tree"])
def test_engine_greedy_triton_equals_reference(tiny, device, policy, monkeypatch):
    draft = None if policy == "none" else f"dummy:{tiny}"  # draft = target: long accepted paths, KV commits move
    calls = _count_kernel_calls(monkeypatch)
    monkeypatch.setenv("ADASERVE_KERNELS", "reference")
    reference = _generate(tiny, device, draft, policy)
    assert calls == {"attention": 0, "commit_rows": 0}
    monkeypatch.delenv("ADASERVE_KERNELS")
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _generate(tiny, device, draft, policy) == reference
    assert calls["attention"] > 0
    if draft is not None:
        assert calls["commit_rows"] > 0  # accepted paths were moved by the Triton commit kernel


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_engine_bf16_decode_logits_triton_close_to_reference(tmp_path, head_dim, group, monkeypatch):
    """One prefill and one verify step of 8 requests: plain decode and 16-token trees over 600-1300-token contexts
    (past 1024 keys the kernel splits the KV range when the grid is small, as here)."""
    model = _config_dir(tmp_path / "m", hidden_size=512, intermediate_size=1024, num_attention_heads=2 * group,
                        num_key_value_heads=2, head_dim=head_dim, vocab_size=1024)
    prompts = [[(13 * r + 7 * i) % 1024 for i in range(600 + 100 * r)] for r in range(8)]

    def logits() -> torch.Tensor:
        engine = _engine(model, "cuda", "bfloat16", num_kv_blocks=1024, block_size=16)
        tables = [[] for _ in prompts]
        for blocks, p in zip(tables, prompts):
            assert engine.kv.ensure_capacity(blocks, len(p) + 16)
        engine.runner.run([SeqInput(b, 0, p, logits="none") for b, p in zip(tables, prompts)])
        tree = [-1, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11]
        steps = [SeqInput(b, len(p), [1 + r] if r % 2 else list(range(1 + r, 17 + r)),
                          None if r % 2 else tree, logits="all") for r, (b, p) in enumerate(zip(tables, prompts))]
        return engine.runner.run(steps).logits

    monkeypatch.setenv("ADASERVE_KERNELS", "reference")
    reference = logits()
    monkeypatch.delenv("ADASERVE_KERNELS")
    triton_logits = logits()
    assert torch.isfinite(triton_logits).all()
    err = (triton_logits - reference).abs().max().item()
    assert err < 0.05 * reference.abs().max().item(), err
