"""Ahead-of-time compile of the Triton kernels for sm_90 (no GPU needed), in a process without the interpreter:
the decode launches (tests/kernels/sm90_compile.py) for CI, the full launch grid where a GPU machine is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _compile(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    assert "compiled all kernels" in _compile("--quick")


@pytest.mark.slow
@pytest.mark.gpu  # needs no GPU itself, but ~60 compiles: run on the GPU machine's fast CPUs
def test_every_decode_launch_compiles_for_sm90():
    assert "compiled all kernels" in _compile()
