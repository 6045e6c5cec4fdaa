"""The engine's greedy output with the Triton path (interpreted on CPU) equals the torch reference path,
with and without speculation (tree masks and KV commit go through the kernels too)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.engine import LLMEngine


def _tiny_llama(path, embedded_dir, layers: int, seed: int) -> str:
    """A small random Llama with the embedded model's tokenizer (vocab 49152), so the engine runs end to end."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                 tie_word_embeddings=True, max_position_embeddings=2048)).save_pretrained(path)
    for f in embedded_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, path / f.name)
    return str(path)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, embedded_dir):
    return (_tiny_llama(tmp_path_factory.mktemp("target"), embedded_dir, 2, 0),
            _tiny_llama(tmp_path_factory.mktemp("draft"), embedded_dir, 1, 1))


def _generate(model: str, draft: str | None, policy: str) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=model, draft=draft, policy=policy, num_kv_blocks=64, block_size=8,
                                    profile_latency=False, token_budget=24, prefill_chunk_tokens=8,
                                    dtype="float32"))  # exact equality: no bf16 near-ties
    prompts = [[5, 17, 300, 42, 9, 1000, 77, 23, 11], [400, 401, 402], [7] * 17]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("policy", ["none", "dynamic-tree"])
def test_engine_greedy_triton_equals_reference(tiny_pair, policy, monkeypatch):
    target, _ = tiny_pair
    draft = None if policy == "none" else target  # draft = target: long accepted paths, so KV commit moves entries
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reference = _generate(target, draft, policy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kernels import dispatch

    assert dispatch.use_triton(torch.device("cpu"))
    commits = []
    from kernels import kv_commit as kv_commit_module

    real = kv_commit_module.kv_commit
    monkeypatch.setattr(kv_commit_module, "kv_commit", lambda *a: (commits.append(a[2].numel()), real(*a)))
    assert _generate(target, draft, policy) == reference
    if draft is not None:
        assert sum(commits) > 0  # accepted paths were moved by the Triton commit kernel
    assert os.environ["TRITON_INTERPRET"] == "1"
