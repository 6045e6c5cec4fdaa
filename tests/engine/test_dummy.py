"""Dummy weights: presets have the documented shapes, loading is deterministic, activations stay finite in bf16,
and a dummy model runs through the engine (speculating, with a dummy draft too) as any checkpoint does."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from app.engine.config import EngineConfig, SamplingParams
from app.engine.dummy import PRESETS, IdTokenizer, param_shapes
from app.engine.weights import ModelConfig, ModelLoadError, load_checkpoint, load_dummy_checkpoint, load_tokenizer

TINY = {"model_type": "llama", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 1024, "tie_word_embeddings": False, "eos_token_id": 2}
PROMPTS = [[5, 17, 300, 42, 9, 100, 77, 23, 11], [200, 201, 202], [7] * 17]


def write_config(path, **overrides):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY | overrides))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("dummy") / "tiny")


def engine(model: str, **kw):
    from app.engine.engine import LLMEngine

    cfg = dict(model=model, load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64, block_size=8,
               prefill_chunk_tokens=8, profile_latency=False, token_budget=24) | kw
    return LLMEngine(EngineConfig(**cfg))


def greedy(eng, max_tokens: int = 8) -> list[list[int]]:
    return [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True))]


@pytest.mark.parametrize("name,shape,billions", [
    ("llama-1b", dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                      head_dim=64, tie_word_embeddings=True), 1.236),
    ("llama-8b", dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128, tie_word_embeddings=False), 8.030),
    # Llama-3.1-70B (64 heads, 8 KV heads, intermediate 28672) split 4 ways; hidden, layers and vocabulary whole
    ("llama-70b-tp4", dict(hidden_size=8192, intermediate_size=7168, num_layers=80, num_heads=16, num_kv_heads=2,
                           head_dim=128, tie_word_embeddings=False), 19.22),
    ("smollm2-135m", dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                          head_dim=64, tie_word_embeddings=True), 0.1345),
])
def test_presets_have_the_documented_shapes(name, shape, billions):
    config = ModelConfig.from_hf(PRESETS[name])  # the config only: nothing is allocated
    assert {k: getattr(config, k) for k in shape} == shape
    if name.startswith("llama"):
        assert config.vocab_size == 128256 and config.rope_scaling["rope_type"] == "llama3"
    params = sum(torch.Size(s).numel() for s in param_shapes(config).values())
    assert params / 1e9 == pytest.approx(billions, rel=0.01)


def test_two_loads_give_the_same_weights_and_tokens(tiny_dir):
    a, b = (load_dummy_checkpoint(str(tiny_dir), device="cpu") for _ in range(2))
    other = load_dummy_checkpoint(str(tiny_dir), device="cpu", seed=1)
    assert set(a.state_dict) == set(param_shapes(a.config))
    for name in a.state_dict:
        assert torch.equal(a.state_dict[name], b.state_dict[name]), name
    w = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(a.state_dict[w], other.state_dict[w])
    assert a.state_dict[w].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(a.state_dict["model.norm.weight"], torch.ones(64))
    assert greedy(engine(str(tiny_dir))) == greedy(engine(str(tiny_dir)))


def test_dummy_prefix_dtype_and_errors(tiny_dir):
    ckpt = load_checkpoint(f"dummy:{tiny_dir}", device="cpu", dtype=torch.bfloat16)  # the form a draft spec takes
    w = ckpt.state_dict["model.embed_tokens.weight"]
    assert w.dtype == torch.bfloat16
    ref = load_checkpoint(str(tiny_dir), load_format="dummy", device="cpu").state_dict["model.embed_tokens.weight"]
    assert torch.equal(w, ref.to(torch.bfloat16))  # made in float32, then cast: same weights in any dtype
    with pytest.raises(ModelLoadError, match="preset"):
        load_checkpoint("llama-3b", load_format="dummy")
    with pytest.raises(ModelLoadError, match="load format"):
        load_checkpoint(str(tiny_dir), load_format="bogus")
    with pytest.raises(ValueError, match="load_format"):
        EngineConfig(load_format="bogus")


def test_activations_stay_finite_in_bf16_over_80_layers(tmp_path):
    from app.engine.runner import SeqInput

    eng = engine(str(write_config(tmp_path / "deep", num_hidden_layers=80)), dtype="bfloat16", num_kv_blocks=8)
    blocks: list[int] = []
    assert eng.kv.ensure_capacity(blocks, len(PROMPTS[2]))
    out = eng.runner.run([SeqInput(blocks, 0, PROMPTS[2], logits="all")])
    assert torch.isfinite(out.hidden).all() and torch.isfinite(out.logits).all()
    assert 0.1 < out.logits.std().item() < 100  # neither vanishing nor exploding


def test_speculative_greedy_equals_plain_greedy(tiny_dir):
    plain = greedy(engine(str(tiny_dir)), 12)
    for draft in ("ngram", f"dummy:{tiny_dir}"):  # prompt lookup; a dummy draft (= the target: long paths)
        eng = engine(str(tiny_dir), draft=draft, policy="dynamic-tree")
        assert greedy(eng, 12) == plain, draft
        if draft != "ngram":
            assert eng.stats()["draft_tokens_accepted"] > 0


def test_id_tokenizer(tiny_dir):
    tok = load_tokenizer(tiny_dir)  # nothing but a config.json: no tokenizer to load
    assert isinstance(tok, IdTokenizer) and len(tok) == 384 and tok.eos_token_id is None
    ids = tok.encode("hi <300> <999>")
    assert ids[:3] == [ord("h"), ord("i"), ord(" ")] and ids[3] == 300 and len(ids) == 10  # 999 >= vocab: bytes
    assert tok.decode([5, 300]) == "<5><300>" and tok.encode(tok.decode([5, 300])) == [5, 300]
    chat = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    assert chat == "user: x\nassistant: "
    assert len(tok.get_vocab()) == 384


def test_cli_and_yaml_take_the_load_format(tiny_dir, monkeypatch):
    from app.config import AppSettings
    from app.engine import __main__ as cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["generate", "--load-format", "dummy", "--model", str(tiny_dir), "--prompt", "<5><6>",
                       "--max-tokens", "3", "--device", "cpu", "--dtype", "float32", "--json"])
    result = json.loads(out.getvalue())
    assert rc == 0 and result["load_format"] == "dummy" and len(result["token_ids"]) == 3
    assert result["text"] == "".join(f"<{t}>" for t in result["token_ids"])
    assert AppSettings(engine={"model": "llama-8b", "load_format": "dummy"}).engine_config().load_format == "dummy"
    with pytest.raises(ValueError, match="load_format"):
        AppSettings(engine={"load_format": "random"})
