"""`python -m bench.gpu_check --quick`, the CPU dry run of the GPU check: every section runs at toy sizes and the
JSON summary says so; a failing section is reported, the others still run, and the exit status is 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check
from bench.kernels import peak_bytes_per_s

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_dry_run_passes_every_section(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # the last line is the JSON summary
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["quick"] and summary["failed"] == []
    s = summary["sections"]
    assert {name: s[name]["status"] for name in gpu_check.SECTIONS} == dict.fromkeys(gpu_check.SECTIONS, "ok")
    assert s["tests"]["failed"] == s["tests"]["errors"] == 0 and s["tests"]["passed"] + s["tests"]["skipped"] > 0
    assert "tests/kernels/test_engine_triton.py" in s["tests"]["files"]
    assert all(row["max_err"] < 1e-4 and row["triton_ms"] > 0 for row in s["kernels"]["rows"])
    rows = s["engine"]["rows"]
    assert {(r["model"], r["policy"]) for r in rows} == {("embedded", "none"), ("embedded", "adaserve"),
                                                         ("dummy tiny", "none"), ("dummy tiny", "adaserve")}
    assert all(r["decode_tok_s"] > 0 and "error" not in r for r in rows)
    assert s["serve"]["http_status"] == 200 and s["serve"]["completion_tokens"] == 16
    for header in ("== tests: ok", "== kernels: ok", "== engine: ok", "== serve: ok", "triton_ms", "decode tok/s"):
        assert header in done.stdout


def test_a_failing_section_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("no GPU today")

    ran = []
    monkeypatch.setattr(gpu_check, "section_tests", broken)
    monkeypatch.setattr(gpu_check, "run_child", lambda name, *a: ran.append(name) or {"status": "ok", "rows": []})
    monkeypatch.setattr(gpu_check, "section_serve", lambda *a: ran.append("serve") or {"status": "skipped",
                                                                                       "reason": "no ray"})
    assert gpu_check.main(["--quick", "--out", str(tmp_path)]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ran == ["kernels", "engine", "serve"]
    assert summary["failed"] == ["tests"] and not summary["ok"]
    assert summary["sections"]["tests"]["error"] == "RuntimeError: no GPU today"
    assert summary["sections"]["serve"]["status"] == "skipped"  # a missing package is not a failure


def test_peak_bandwidth_by_device_name():
    assert peak_bytes_per_s("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bytes_per_s("NVIDIA H200") == 4.8e12
    assert peak_bytes_per_s("NVIDIA H100 PCIe") == 2.0e12
    assert peak_bytes_per_s("NVIDIA A10G") is None
