"""The stable engine CLI: JSON output, one-line (or, with --json, JSON) errors with exit 2, a complete synopsis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.engine import __main__ as cli
from app.engine.config import DEFAULT_DRAFT

ROOT = Path(__file__).resolve().parents[2]
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
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt", "", "--max-tokens", "4"], "prompt is empty"),
    (["--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
    (["--prompt", "hi", "--policy", "bogus"], "unknown speculation policy"),
    (["--max-tokens", "4"], "--prompt"),  # argparse's own errors answer in JSON too
    (["--prompt", "hi", "--max-tokens", "many"], "--max-tokens"),
])
def test_json_errors_are_one_json_object_with_exit_2(args, message):
    out = _cli(*args, "--json")
    assert out.returncode == 2, out.stderr
    assert len(out.stdout.strip().splitlines()) == 1, out.stdout
    error = json.loads(out.stdout)["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]
    assert "Traceback" not in out.stderr


def test_speculative_policy_without_draft_uses_the_default_draft():
    out = _cli("--prompt", "The capital of France is", "--policy", "adaserve", "--max-tokens", "2",
               "--dtype", "float32", "--threads", "1", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["policy"] == "adaserve" and data["draft"] == DEFAULT_DRAFT
    assert 1 <= data["num_output_tokens"] <= 2


def test_default_draft_is_serve_configs():
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    engine = next(app["args"]["engine"] for app in config["applications"] if "engine" in app.get("args", {}))
    assert engine["policy"] != "none"
    assert engine["draft"] == DEFAULT_DRAFT, "serve_config.yaml's draft and app.engine.config.DEFAULT_DRAFT differ"


def _generate_parser():
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    return sub.choices["generate"]


def test_synopsis_lists_every_option():
    gen = _generate_parser()
    options = [o for a in gen._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert {"--draft", "--dtype", "--policy", "--model", "--json"} <= set(options)
    usage = gen.format_usage()
    help_text = cli._parser().format_help()  # `python -m app.engine --help` shows the module docstring
    for option in options:
        for where, text in (("usage", usage), ("docstring", cli.__doc__), ("--help", help_text)):
            assert f"[{option}" in text or f"{option} " in text, f"{option} missing from the {where}"
    out = subprocess.run([sys.executable, "-m", "app.engine", "generate", "--help"], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert out.returncode == 0 and "--draft SOURCES" in out.stdout and "--dtype DTYPE" in out.stdout
