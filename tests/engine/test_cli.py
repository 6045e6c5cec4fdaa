"""The stable engine CLI: JSON output and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.engine", "generate", *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_generate_json(hf_embedded, embedded_dir):
    from tests.conftest import hf_greedy
    from transformers import AutoTokenizer

    out = _cli("--prompt", "The capital of France is", "--max-tokens", "6", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"text", "token_ids", "ttft_ms", "tpot_ms", "policy"} <= data.keys()
    assert data["policy"] == "none" and data["ttft_ms"] > 0
    ids = AutoTokenizer.from_pretrained(str(embedded_dir)).encode("The capital of France is",
                                                                  add_special_tokens=False)
    ref = hf_greedy(hf_embedded, ids, 6)
    assert data["token_ids"] == ref[: len(data["token_ids"])]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "", "--max-tokens", "4"], "prompt is empty"),
    (["--prompt", "hi", "--max-tokens", "-3"], "max_tokens"),
    (["--prompt", "hi " * 9000, "--max-tokens", "4"], "context window"),
    (["--prompt", "hi", "--model", "/no/such/model"], "not found"),
    (["--prompt", "hi", "--policy", "bogus"], "unknown speculation policy"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
])
def test_bad_input_exits_with_one_line(args, message):
    out = _cli(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr
