"""The project's forward against transformers' (the reference), on the embedded model and a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch

from app.engine.config import EngineConfig
from app.engine.kv_cache import KVCache
from app.engine.model import LlamaModel, packing_available
from app.engine.runner import ModelRunner, SeqInput
from app.engine.weights import ModelConfig, ModelLoadError, load_checkpoint

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n    if len(arr) <= 1:",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books about",
    "1, 2, 3, 5, 8, 13,",
]


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _runner(ckpt, num_blocks=64, block_size=16) -> ModelRunner:
    model = LlamaModel(ckpt.config, ckpt.state_dict, torch.float32, torch.device("cpu"))
    return ModelRunner(model, KVCache(*model.new_kv_cache(num_blocks, block_size)))


def _prefill_logits(runner: ModelRunner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts in ONE flat batch; every token's logits."""
    seqs = []
    for ids in prompts:
        blocks: list[int] = []
        assert runner.kv.ensure_capacity(blocks, len(ids))
        seqs.append(SeqInput(block_ids=blocks, context_len=0, token_ids=ids, logits="all"))
    out = runner.run(seqs)
    return [out.logits[rows] for rows in out.logit_rows]


def test_embedded_logits_match_transformers(embedded_checkpoint, hf_embedded):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_checkpoint.tokenizer_dir))
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    ours = _prefill_logits(_runner(embedded_checkpoint), prompts)
    for ids, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_embedded(torch.tensor([ids])).logits[0]
        assert _max_rel_err(logits, ref) < 1e-4


def test_decode_after_chunked_prefill_matches_full_forward(embedded_checkpoint, hf_embedded):
    """KV written by earlier chunks is read back correctly through the block table."""
    ids = list(range(100, 150))
    runner = _runner(embedded_checkpoint, block_size=8)
    blocks: list[int] = []
    assert runner.kv.ensure_capacity(blocks, len(ids))
    logits = []
    for start, end in [(0, 13), (13, 16), (16, 40), (40, 50)]:  # ends on and off block boundaries
        out = runner.run([SeqInput(blocks, start, ids[start:end], logits="all")])
        logits.append(out.logits)
    with torch.no_grad():
        ref = hf_embedded(torch.tensor([ids])).logits[0]
    assert _max_rel_err(torch.cat(logits), ref) < 1e-4


def test_tree_tokens_see_only_their_ancestors(embedded_checkpoint, hf_embedded):
    """A tree node's logits equal those of the plain sequence context + its root->node path."""
    ctx = [504, 2988, 288, 451, 8170]
    tree_tokens = [100, 200, 300, 400, 500, 600]
    parents = [-1, 0, 0, 1, 2, 4]
    runner = _runner(embedded_checkpoint)
    blocks: list[int] = []
    assert runner.kv.ensure_capacity(blocks, len(ctx) + len(tree_tokens))
    runner.run([SeqInput(blocks, 0, ctx, logits="none")])
    out = runner.run([SeqInput(blocks, len(ctx), tree_tokens, parents=parents, logits="all")])
    for i in range(len(tree_tokens)):
        path, j = [], i
        while j >= 0:
            path.append(tree_tokens[j])
            j = parents[j]
        with torch.no_grad():
            ref = hf_embedded(torch.tensor([ctx + path[::-1]])).logits[0, -1]
        assert _max_rel_err(out.logits[i], ref) < 1e-4


def test_decode_batches_match_transformers(embedded_checkpoint, hf_embedded):
    """One-token steps: several requests of different lengths (a masked SDPA over the whole batch, no gather of
    queries) and a lone request (no mask at all) give transformers' next-token logits."""
    prompts = [[504, 2988, 288, 451, 8170, 77], list(range(100, 140)), [9, 8, 7]]
    runner = _runner(embedded_checkpoint, block_size=8)
    blocks = [[] for _ in prompts]
    for b, ids in zip(blocks, prompts):
        assert runner.kv.ensure_capacity(b, len(ids) + 2)
        runner.run([SeqInput(b, 0, ids[:-1], logits="none")])
    both = runner.run([SeqInput(b, len(ids) - 1, ids[-1:]) for b, ids in zip(blocks, prompts)])
    lone = runner.run([SeqInput(blocks[1], len(prompts[1]), [42])])
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            assert _max_rel_err(both.logits[i], hf_embedded(torch.tensor([ids])).logits[0, -1]) < 1e-4
        assert _max_rel_err(lone.logits[0], hf_embedded(torch.tensor([prompts[1] + [42]])).logits[0, -1]) < 1e-4


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_weights_match_plain_ones(embedded_checkpoint, dtype, tol):
    """oneDNN-packed matmuls are the same maths as F.linear, summed in another order: float32 logits agree to
    rounding and pick the same greedy tokens; bf16 to bf16's precision. The pinned CPU wheel has oneDNN, so
    packing must be available here (the engine's default depends on it)."""
    assert packing_available(torch.device("cpu"), dtype), "torch built without oneDNN: the default CPU path is untested"
    prompts = [[504, 2988, 288, 451, 8170], list(range(100, 180))]
    out = {}
    for packed in (True, False):
        model = LlamaModel(embedded_checkpoint.config, embedded_checkpoint.state_dict, dtype, torch.device("cpu"),
                           pack_weights=packed)
        assert model.packed == packed and model.layers[0]["wqkv"].is_mkldnn == packed
        runner = ModelRunner(model, KVCache(*model.new_kv_cache(32, 16)))
        out[packed] = _prefill_logits(runner, prompts)
    for a, b in zip(out[True], out[False]):
        assert _max_rel_err(a, b) < tol
        if dtype == torch.float32:
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_packed_head_follows_a_replaced_lm_head(embedded_checkpoint):
    """Drafts replace lm_head after construction (a vocabulary subset): the packed copy is rebuilt from it."""
    model = LlamaModel(embedded_checkpoint.config, embedded_checkpoint.state_dict, torch.float32, torch.device("cpu"))
    hidden = torch.randn(3, model.config.hidden_size)
    full = model.logits(hidden)
    model.lm_head = model.lm_head[:1000]
    sub = model.logits(hidden)
    assert sub.shape == (3, 1000)
    assert _max_rel_err(sub, full[:, :1000]) < 1e-5
    assert _max_rel_err(sub, torch.nn.functional.linear(hidden, model.lm_head)) < 1e-5


def _tiny_llama_dir(tmp_path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
               rope_theta=50000.0,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    cfg.update(overrides)
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "tie_word_embeddings": True,
                                             "rope_scaling": None, "num_key_value_heads": 8}])
def test_tiny_random_llama_matches_transformers(tmp_path, overrides):
    hf = _tiny_llama_dir(tmp_path, **overrides)
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt.config.num_kv_heads == hf.config.num_key_value_heads
    # Positions past original_max_position_embeddings exercise the llama3 frequency rescaling.
    prompts = [[(7 * i) % 320 for i in range(300)], [3, 1, 4, 1, 5, 9, 2, 6]]
    ours = _prefill_logits(_runner(ckpt), prompts)
    for ids, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert _max_rel_err(logits, ref) < 1e-4


def test_config_reads_both_rope_formats():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    old = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                               "original_max_position_embeddings": 8192}})
    new = ModelConfig.from_hf({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3",
                               "factor": 8.0, "original_max_position_embeddings": 8192}})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling == new.rope_scaling and old.rope_scaling["rope_type"] == "llama3"
    with pytest.raises(ModelLoadError, match="unsupported model type"):
        ModelConfig.from_hf({**base, "model_type": "gpt2"})


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="config.json lacks"):
        load_checkpoint(str(tmp_path / "cfg"))


def test_cpu_kernel_caches_are_bounded_unless_the_environment_says_otherwise(monkeypatch) -> None:
    from app.engine.model import bound_cpu_kernel_caches

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # so that teardown restores what was there
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")  # a user's own setting wins
    assert bound_cpu_kernel_caches(64) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "7"}
    with pytest.raises(ValueError, match="cpu_kernel_cache_entries must be positive"):
        EngineConfig(cpu_kernel_cache_entries=0)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, torch.float32), (True, False, torch.bfloat16),
                                                        (False, True, torch.bfloat16)])
def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch, amx, avx512_bf16, expected):
    from app.engine.engine import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # an explicit dtype is kept
