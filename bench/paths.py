"""Where benchmarks read and write. Committed inputs (the acceptance trace, the CPU latency profile) live in
bench/results/; every run writes to a fresh folder under bench/runs/, which git ignores, so runs are never
committed (the older run folders are in git history, up to commit c1a46a0)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"  # committed inputs: acceptance_trace.jsonl.gz, profile_cpu.json
RUNS = BENCH / "runs"  # git-ignored outputs


def run_dir(name: str) -> Path:
    """bench/runs/<name>-<YYYYmmdd-HHMMSS>. Not created here: argparse builds its defaults even for --help."""
    return RUNS / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
