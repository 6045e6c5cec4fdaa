"""Engine CLI: generate text for one prompt with the in-process engine.

Usage:
    python -m app.engine generate --prompt TEXT [--chat] [--max-tokens N] [--temperature T] [--top-p P]
        [--top-k K] [--seed N] [--stop TEXT]... [--tpot-slo-ms MS] [--ttft-slo-ms MS] [--policy POLICY]
        [--draft SOURCES] [--model MODEL] [--load-format {auto,dummy}] [--device DEVICE] [--dtype DTYPE]
        [--threads N] [--no-prefix-caching] [--json]

POLICY is none | chain:k | static-tree | dynamic-tree | adaserve; a speculative one (anything but none) without
--draft uses DEFAULT_DRAFT (feature,ngram), the draft serve_config.yaml serves. --json prints one JSON object, and
an error as {"error": {"message": ..., "type": "invalid_request_error"}} on stdout. Without --json an error is one
line on stderr (after the usage, for arguments that do not parse). Either way an error exits with status 2.
--load-format dummy runs seeded random weights of a shape, without a download: MODEL is then a preset (llama-1b,
llama-8b, llama-70b-tp4, smollm2-135m) or a directory holding a config.json; a dummy draft is written dummy:MODEL.
--no-prefix-caching recomputes every prompt (prefix caching, on by default, matters only across requests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import textwrap
import time

from app.engine.config import DEFAULT_DRAFT, EngineConfig, SamplingParams

_DEFAULTS = EngineConfig()
_SYNOPSIS = textwrap.dedent(__doc__.split("Usage:\n", 1)[1].split("\n\n", 1)[0]).strip()  # the docstring's usage


class _UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """Raises on a usage error instead of exiting, so main can answer in JSON when --json was asked for."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(self, message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m app.engine", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt", usage=_SYNOPSIS)
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=SamplingParams.max_tokens, metavar="N",
                     help="most tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=SamplingParams.temperature, metavar="T",
                     help="0 = greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=SamplingParams.top_p, metavar="P")
    gen.add_argument("--top-k", type=int, default=SamplingParams.top_k, metavar="K", help="0 = off")
    gen.add_argument("--seed", type=int, default=None, metavar="N")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--tpot-slo-ms", type=float, default=None, metavar="MS")
    gen.add_argument("--ttft-slo-ms", type=float, default=None, metavar="MS")
    gen.add_argument("--policy", default=_DEFAULTS.policy, metavar="POLICY",
                     help="none | chain:k | static-tree | dynamic-tree | adaserve (default: %(default)s)")
    gen.add_argument("--draft", default=None, metavar="SOURCES",
                     help="draft sources: feature | distilled | ngram | a model id/path | a comma list to merge "
                          f"(default: {DEFAULT_DRAFT} when --policy speculates, else none)")
    gen.add_argument("--model", default=_DEFAULTS.model, metavar="MODEL",
                     help="'embedded', a Hugging Face id, a directory or .gguf (default: %(default)s)")
    gen.add_argument("--load-format", default=_DEFAULTS.load_format, choices=["auto", "dummy"],
                     help="dummy: seeded random weights; MODEL is a preset (llama-1b, llama-8b, llama-70b-tp4, "
                          "smollm2-135m) or a directory with a config.json (default: %(default)s)")
    gen.add_argument("--device", default=_DEFAULTS.device, metavar="DEVICE",
                     help="cpu | cuda | auto (default: %(default)s)")
    gen.add_argument("--dtype", default=_DEFAULTS.dtype, metavar="DTYPE",
                     help="float32 | bfloat16 | float16 | auto (default: %(default)s)")
    gen.add_argument("--threads", type=int, default=None, metavar="N",
                     help="torch CPU threads (default: torch's choice; 1 is faster on a busy shared machine)")
    gen.add_argument("--no-prefix-caching", action="store_true",
                     help="turn off prefix caching (reusing a computed prompt prefix's KV blocks; on by default)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object instead of the text (errors too)")
    return parser


def _fail(message: str, as_json: bool = False) -> int:
    if as_json:
        print(json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                    "code": None}}))
    else:
        print(f"error: {message}", file=sys.stderr)
    return 2


def generate(args: argparse.Namespace) -> int:
    from policies.tree_selection import parse_policy

    as_json = args.json
    try:
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        speculates = parse_policy(args.policy).kind != "none"  # a bad name fails before the model loads
        draft = args.draft if args.draft is not None else (DEFAULT_DRAFT if speculates else None)
        config = EngineConfig(model=args.model, load_format=args.load_format, draft=draft, policy=args.policy,
                              device=args.device, dtype=args.dtype,
                              enable_prefix_caching=not args.no_prefix_caching)
    except ValueError as exc:
        return _fail(str(exc), as_json)
    if not args.prompt:
        return _fail("prompt is empty", as_json)
    if args.threads is not None:
        if args.threads < 1:
            return _fail("--threads must be at least 1", as_json)
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
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, as_json)
    m = out.metrics
    if args.json:
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "ttft_ms": None if m.ttft_s is None else m.ttft_s * 1e3,
            "tpot_ms": None if m.tpot_s is None else m.tpot_s * 1e3,
            "policy": config.policy, "draft": config.draft, "model": config.model,
            "load_format": config.load_format,
            "num_prompt_tokens": m.num_prompt_tokens,
            "num_output_tokens": m.num_output_tokens, "slo_attained": m.slo_attained, "wall_s": wall_s,
            "metrics": dataclasses.asdict(m),
        }))
    else:
        print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        if "--json" in argv:  # the arguments did not parse, so this is the best reading of --json there is
            return _fail(f"{exc.parser.prog}: {exc}", as_json=True)
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "generate":
        return generate(args)
    return _fail(f"unknown command {args.command}", getattr(args, "json", False))


if __name__ == "__main__":
    sys.exit(main())
