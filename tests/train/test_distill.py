"""Distillation (train/distill.py): a quick run of either draft kind learns."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["layers", "feature"])
def test_quick_training_reduces_the_loss(kind, tmp_path):
    from train.distill import QUICK, TrainConfig, train

    cfg = TrainConfig(**{**asdict(TrainConfig()), **QUICK, "quick": True, "out_dir": str(tmp_path),
                         "minutes": 0.5, "self_distill": 2, "kind": kind})
    summary = train(cfg)
    losses = summary["losses"]
    assert len(losses) >= 6
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert (tmp_path / "draft.safetensors").exists() and (tmp_path / "ckpt.pt").exists()
