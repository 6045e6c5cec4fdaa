"""Shared fixtures: the embedded checkpoint and its transformers twin, loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are collected everywhere and skipped, with the reason, where no CUDA device is."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu; `python -m bench.gpu_check` runs these)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_dir():
    from app.engine.weights import resolve_model_dir

    return resolve_model_dir("embedded")


@pytest.fixture(scope="session")
def hf_embedded(embedded_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(embedded_dir), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def embedded_checkpoint():
    from app.engine.weights import load_checkpoint

    return load_checkpoint("embedded")


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding: the reference every engine path must match."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
