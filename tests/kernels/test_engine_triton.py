"""The engine with the Triton kernels (compiled on CUDA, interpreted on CPU) against the same engine with the torch
references (`ADASERVE_KERNELS=reference`, kernels/dispatch.py): float32 greedy tokens equal, with and without
speculation (tree masks and KV commits go through the kernels too); on CUDA also bf16 logits of decode-shaped
steps (head dim 64 / 128, GQA group 1 / 4 / 8) within bf16 tolerance. Each run counts the calls dispatch makes on
either path and checks that every one took the path forced for it, so a run can never compare a path with itself.
The models are dummy configs: no tokenizer or download needed."""

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
    """Count the calls dispatch makes on each path: the Triton entry points (imported from their modules at each
    call, so patching the modules works) and the torch references (bound in kernels.dispatch). KV commits count
    rows moved."""
    from kernels import dispatch, kv_commit, tree_attention

    calls = {f"{path}_{op}": 0 for path in ("triton", "reference") for op in ("attention", "write_kv", "commit_rows")}

    def counted(module, name: str, key: str, rows: bool = False) -> None:
        fn = getattr(module, name)

        def wrapper(*a, **kw):
            calls[key] += a[2].numel() if rows else 1  # kv_commit(k_cache, v_cache, src_slots, dst_slots)
            return fn(*a, **kw)

        monkeypatch.setattr(module, name, wrapper)

    counted(tree_attention, "tree_attention", "triton_attention")
    counted(tree_attention, "write_kv", "triton_write_kv")
    counted(kv_commit, "kv_commit", "triton_commit_rows", rows=True)
    counted(dispatch, "tree_attention_reference", "reference_attention")
    counted(dispatch, "write_kv_reference", "reference_write_kv")
    counted(dispatch, "kv_commit_reference", "reference_commit_rows", rows=True)
    return calls


def _on_path(path: str, device: str, monkeypatch, calls: dict[str, int], run):
    """run() with dispatch forced onto `path` ("reference" or "triton"), checking that every attention, KV write
    and KV commit it made took that path. Returns run()'s result and the calls it made."""
    if path == "reference":
        monkeypatch.setenv("ADASERVE_KERNELS", "reference")
    else:
        monkeypatch.delenv("ADASERVE_KERNELS", raising=False)
        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels in Triton's interpreter
    before = dict(calls)
    out = run()
    made = {k: calls[k] - before[k] for k in calls}
    other = "triton" if path == "reference" else "reference"
    assert made[f"{path}_attention"] > 0 and made[f"{path}_write_kv"] > 0, made
    assert not any(n for k, n in made.items() if k.startswith(other)), made
    return out, made


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("policy", ["none", "dynamic-tree"])
def test_engine_greedy_triton_equals_reference(tiny, device, policy, monkeypatch):
    draft = None if policy == "none" else f"dummy:{tiny}"  # draft = target: long accepted paths, KV commits move
    calls = _count_kernel_calls(monkeypatch)

    def run():
        return _generate(tiny, device, draft, policy)

    reference, by_reference = _on_path("reference", device, monkeypatch, calls, run)
    triton_out, by_triton = _on_path("triton", device, monkeypatch, calls, run)
    assert triton_out == reference
    if draft is not None:  # accepted paths were moved, by the reference, then by the Triton commit kernel
        assert by_reference["reference_commit_rows"] > 0 and by_triton["triton_commit_rows"] > 0


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

    calls = _count_kernel_calls(monkeypatch)
    reference, _ = _on_path("reference", "cuda", monkeypatch, calls, logits)
    triton_logits, _ = _on_path("triton", "cuda", monkeypatch, calls, logits)
    assert torch.isfinite(triton_logits).all()
    err = (triton_logits - reference).abs().max().item()
    assert err < 0.05 * reference.abs().max().item(), err
