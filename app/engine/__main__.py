"""Engine CLI: `python -m app.engine generate --prompt TEXT [--chat] --max-tokens N ... [--json]`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from app.engine.config import EngineConfig, SamplingParams

_DEFAULTS = EngineConfig()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=SamplingParams.max_tokens)
    gen.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    gen.add_argument("--top-p", type=float, default=SamplingParams.top_p)
    gen.add_argument("--top-k", type=int, default=SamplingParams.top_k)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--tpot-slo-ms", type=float, default=None)
    gen.add_argument("--ttft-slo-ms", type=float, default=None)
    gen.add_argument("--policy", default=_DEFAULTS.policy, help="none | chain:k | static-tree | dynamic-tree | adaserve")
    gen.add_argument("--model", default=_DEFAULTS.model, help="'embedded', a Hugging Face id, a directory or .gguf")
    gen.add_argument("--draft", default=_DEFAULTS.draft, help="draft sources: feature | distilled | ngram | a model id/path | a comma list to merge (feature,ngram)")
    gen.add_argument("--device", default=_DEFAULTS.device)
    gen.add_argument("--dtype", default=_DEFAULTS.dtype)
    gen.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's choice; 1 is faster on a busy shared machine)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def generate(args: argparse.Namespace) -> int:
    try:
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        config = EngineConfig(model=args.model, draft=args.draft, policy=args.policy, device=args.device,
                              dtype=args.dtype)
    except ValueError as exc:
        return _fail(str(exc))
    if not args.prompt:
        return _fail("prompt is empty")
    if args.threads is not None:
        if args.threads < 1:
            return _fail("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    from app.engine.engine import LLMEngine
    from app.engine.weights import ModelLoadError

    try:
        engine = LLMEngine(config)
        t0 = time.perf_counter()
        out = engine.generate([args.prompt], sampling, chat=args.chat, tpot_slo_ms=args.tpot_slo_ms,
                              ttft_slo_ms=args.ttft_slo_ms)[0]
        wall_s = time.perf_counter() - t0
    except (ValueError, ModelLoadError, OSError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    m = out.metrics
    if args.json:
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "ttft_ms": None if m.ttft_s is None else m.ttft_s * 1e3,
            "tpot_ms": None if m.tpot_s is None else m.tpot_s * 1e3,
            "policy": config.policy, "model": config.model, "num_prompt_tokens": m.num_prompt_tokens,
            "num_output_tokens": m.num_output_tokens, "slo_attained": m.slo_attained, "wall_s": wall_s,
            "metrics": dataclasses.asdict(m),
        }))
    else:
        print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = _parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
