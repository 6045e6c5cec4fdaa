"""The memory plan (app/engine/memory_plan.py): serve_config.gpu.yaml's models (Llama-3.1-8B target, Llama-3.2-1B
draft, bf16; shapes written here, nothing downloaded) fit an 80 GB GPU where the old sizing could not; golden cases
by hand; a budget that cannot hold one max_model_len sequence fails at start with its numbers; the engine sizes the
target's and the draft's KV together on CPU."""

from __future__ import annotations

import json

import pytest

from app.engine.config import EngineConfig
from app.engine.engine import LLMEngine
from app.engine.memory_plan import GIB, MemoryPlanError, forward_workspace_bytes, plan_memory
from app.engine.weights import ModelConfig

# The published configs' shape fields (meta-llama/Llama-3.1-8B-Instruct, meta-llama/Llama-3.2-1B-Instruct).
LLAMA_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position=131072,
                       tie_word_embeddings=False)
LLAMA_1B = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                       num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, max_position=131072,
                       tie_word_embeddings=True)
BF16 = 2
H100_FREE_AT_START = 79.2 * GIB  # an 80 GB card after the CUDA context
GPU_YAML_BATCHED_TOKENS = 2048  # serve_config.gpu.yaml's max_num_batched_tokens


def kv_bytes_per_token(c: ModelConfig, dtype_bytes: int = BF16) -> int:
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype_bytes  # K and V, every layer


def workspace(c: ModelConfig, tokens: int = GPU_YAML_BATCHED_TOKENS) -> int:
    return forward_workspace_bytes(tokens, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                   qkv_width=(c.num_heads + 2 * c.num_kv_heads) * c.head_dim,
                                   vocab_size=c.vocab_size, dtype_bytes=BF16)


def gpu_yaml_plan(free_bytes: float = H100_FREE_AT_START, fraction: float = 0.85, min_kv_tokens: int = 131072):
    return plan_memory(int(free_bytes * fraction), target_kv_bytes_per_token=kv_bytes_per_token(LLAMA_8B),
                       draft_kv_bytes_per_token=kv_bytes_per_token(LLAMA_1B), block_size=16,
                       min_kv_tokens=min_kv_tokens, target_weight_bytes=LLAMA_8B.num_params() * BF16,
                       draft_weight_bytes=LLAMA_1B.num_params() * BF16,
                       workspace_bytes=max(workspace(LLAMA_8B), workspace(LLAMA_1B)))


def test_num_params_of_published_shapes():
    assert LLAMA_8B.num_params() == 8_030_261_248  # "8.03B": the untied lm_head counts
    assert LLAMA_1B.num_params() == 1_235_814_400  # "1.24B": the embedding is the head, counted once


def test_num_params_equals_the_embedded_models(embedded_checkpoint, hf_embedded):
    assert embedded_checkpoint.config.num_params() == sum(p.numel() for p in hf_embedded.parameters())


def test_gpu_yaml_models_fit_an_80gb_gpu():
    plan = gpu_yaml_plan()
    assert plan.total_bytes <= plan.budget_bytes
    assert plan.budget_bytes - plan.total_bytes < (plan.target_kv_bytes_per_token + plan.draft_kv_bytes_per_token) * 16
    assert plan.target_kv_bytes == 4 * plan.draft_kv_bytes  # same tokens; the 1B's KV is a quarter of the 8B's
    # 128 sequences (max_num_seqs) of 2048 tokens each, and one sequence of the full 131072-token context
    assert plan.kv_token_capacity >= 128 * 2048
    assert plan.kv_token_capacity == 309_472  # 47.2 GiB of KV at 160 KiB per token
    assert 2.5 * GIB < plan.workspace_bytes < 3 * GIB  # mostly the logits of 2048 verified tokens
    line = plan.describe()
    assert "\n" not in line and "309472 tokens" in line and "draft KV 9.44" in line


def test_old_sizing_could_not_fit_the_gpu_yaml_models():
    """The sizing before the plan: the target's KV took 0.85 of the memory free after the target's weights, and the
    draft's KV as many blocks again at its own bytes per token, on top of the draft's weights."""
    target_weights, draft_weights = LLAMA_8B.num_params() * BF16, LLAMA_1B.num_params() * BF16
    target_kv = 0.85 * (H100_FREE_AT_START - target_weights)
    draft_kv = target_kv * kv_bytes_per_token(LLAMA_1B) / kv_bytes_per_token(LLAMA_8B)
    old_total = target_weights + target_kv + draft_weights + draft_kv  # no workspace counted at all
    assert old_total > H100_FREE_AT_START
    assert old_total / GIB == pytest.approx(85.5, abs=0.1)
    assert gpu_yaml_plan().total_bytes < 0.86 * H100_FREE_AT_START


def test_golden_plans():
    # 1000 bytes left for KV at (40 + 10) bytes per token in blocks of 4: 5 blocks (1000 // 200), 20 tokens
    plan = plan_memory(1600, target_kv_bytes_per_token=40, draft_kv_bytes_per_token=10, block_size=4,
                       min_kv_tokens=20, target_weight_bytes=300, draft_weight_bytes=200, workspace_bytes=100)
    assert (plan.num_kv_blocks, plan.kv_token_capacity) == (5, 20)
    assert (plan.target_kv_bytes, plan.draft_kv_bytes, plan.total_bytes) == (800, 200, 1600)
    # 199 bytes short of a sixth block: still 5
    assert plan_memory(1799, target_kv_bytes_per_token=40, draft_kv_bytes_per_token=10, block_size=4,
                       min_kv_tokens=1, target_weight_bytes=300, draft_weight_bytes=200,
                       workspace_bytes=100).num_kv_blocks == 5
    # no draft, nothing but KV (the CPU plan): 2 GiB of 1024-byte tokens in blocks of 16
    cpu = plan_memory(2 * GIB, target_kv_bytes_per_token=1024, block_size=16, min_kv_tokens=8192)
    assert (cpu.num_kv_blocks, cpu.draft_kv_bytes) == (131072, 0)
    assert "weights" not in cpu.describe() and "budget 2.00 GiB" in cpu.describe()
    # num_kv_blocks given: taken as is, however small, with no budget
    fixed = plan_memory(None, target_kv_bytes_per_token=40, draft_kv_bytes_per_token=10, block_size=4,
                        min_kv_tokens=10**6, num_kv_blocks=3)
    assert (fixed.num_kv_blocks, fixed.budget_bytes, fixed.total_bytes) == (3, None, 600)
    assert "num_kv_blocks given" in fixed.describe()


def test_workspace_golden():
    # per token: 2 x (4*8 + 4*16 + 2*12) bytes of layer activations + 8*8 of float32 norms + 100 x (2 + 8) of logits
    assert forward_workspace_bytes(3, hidden_size=8, intermediate_size=16, qkv_width=12, vocab_size=100,
                                   dtype_bytes=2) == 3 * (240 + 64 + 1000)


def test_a_budget_without_room_for_one_sequence_fails_with_its_numbers():
    with pytest.raises(MemoryPlanError, match=r"131072-token sequence") as err:
        gpu_yaml_plan(free_bytes=24 * GIB)  # a 24 GB card: the weights alone take most of it
    message = str(err.value)
    assert "20.40 GiB" in message and "target weights 14.96 GiB" in message and "draft weights 2.30 GiB" in message
    assert "131072 (target) + 32768 (draft) bytes per token" in message
    # the same card with a context the KV left over can hold
    assert gpu_yaml_plan(free_bytes=24 * GIB, min_kv_tokens=1024).kv_token_capacity >= 1024
    with pytest.raises(MemoryPlanError, match="0.00 GiB for KV"):  # weights over the budget: no negative KV
        plan_memory(100, target_kv_bytes_per_token=1, block_size=1, min_kv_tokens=1, target_weight_bytes=200)


# ---- the engine on CPU: kv_cache_memory_gb holds the target's and the draft's KV together ------------------------

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
        "max_position_embeddings": 2048, "tie_word_embeddings": True}
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 1 * 64 * 4  # K and V x 2 layers x 1 KV head x 64 x float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("dummy") / "tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY))
    return str(path)


def _engine(tiny: str, **kw) -> LLMEngine:
    kw = dict(model=tiny, load_format="dummy", device="cpu", dtype="float32", block_size=8, profile_latency=False,
              token_budget=16, kv_cache_memory_gb=1 / 1024) | kw  # 1 MiB
    return LLMEngine(EngineConfig(**kw))


def test_engine_on_cpu_splits_kv_cache_memory_between_target_and_draft(tiny):
    alone = _engine(tiny, max_model_len=256)
    assert alone.memory_plan.num_kv_blocks == alone.kv.allocator.num_blocks == 2**20 // (TINY_KV_BYTES_PER_TOKEN * 8)
    assert alone.stats()["kv_token_capacity"] == 1024
    spec = _engine(tiny, max_model_len=256, draft=f"dummy:{tiny}", policy="dynamic-tree")  # a draft of the same shape
    assert spec.memory_plan.draft_kv_bytes_per_token == TINY_KV_BYTES_PER_TOKEN
    assert spec.kv.allocator.num_blocks == spec.speculator.drafter.kv.allocator.num_blocks == 64  # half each
    assert spec.memory_plan.target_kv_bytes + spec.memory_plan.draft_kv_bytes == 2**20


def test_engine_refuses_to_start_without_kv_for_one_context(tiny):
    with pytest.raises(MemoryPlanError, match="fewer than one 2048-token sequence"):
        _engine(tiny, draft=f"dummy:{tiny}", policy="dynamic-tree")  # 512 tokens of KV, a 2048-token context
    assert _engine(tiny, num_kv_blocks=4).max_model_len == 32  # a given cache size bounds the context instead
