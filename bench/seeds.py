"""Mean +- 95% t-interval over runs of one sweep made with different seeds.

Why: one seed's attainment moves by several points from seed to seed, so a claim about a policy needs the spread
over seeds. This reads the runs' summary.json (from ``bench.sweep`` or ``bench.simulate`` with ``--seed S --out DIR``)
and does that arithmetic instead of a person: per policy x rate the overall class's attainment and goodput as
mean +- half-width of the 95% Student t interval, and, per seed, the focus policy against the best baseline as
``bench.simulate.headline`` judges it (for TTFT+TPOT and for TPOT-only attainment), with the same interval over the
per-seed ratios. numpy only: the t quantiles come from a table (df <= 30) and Hill's expansion above it.

    python -m bench.seeds bench/runs/sim70b-pace-s0 bench/runs/sim70b-pace-s1 bench/runs/sim70b-pace-s2 [--out F.md]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from bench.simulate import headline

# t_{0.975, df} for df = 1..30, to 9 decimals: a rounder table moves half-widths that sit on a display digit's edge.
_T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135,
         2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299,
         2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
         2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (within 1e-7)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975  # Hill's (Cornish-Fisher) expansion: off by < 1e-7 from df = 30 on
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(g / df ** (k + 1) for k, g in enumerate(terms))


def mean_ci95(values: list[float | None]) -> dict:
    """Mean and 95% t half-width of ``values`` (one per seed); None for both if any value is None."""
    if any(v is None for v in values):
        return {"mean": None, "half_width": None, "values": list(values)}
    x = np.asarray(values, dtype=float)
    half = t_quantile_975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return {"mean": float(x.mean()), "half_width": half, "values": list(values)}


def load_runs(dirs: list[Path]) -> list[list[dict]]:
    """Each folder's summary.json rows; ValueError unless there are >= 2 distinct folders with the same cells."""
    if len(dirs) < 2:
        raise ValueError(f"need at least 2 run folders (one per seed), got {len(dirs)}")
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise ValueError("the same run folder is given twice")
    runs = []
    for d in dirs:
        if not (d / "summary.json").is_file():
            raise ValueError(f"{d} has no summary.json")
        runs.append(json.loads((d / "summary.json").read_text()))
    cells = [sorted((r["policy"], r["rate"]) for r in rows) for rows in runs]
    for d, c in zip(dirs[1:], cells[1:]):
        if c != cells[0]:
            diff = sorted(set(c) ^ set(cells[0]))
            shown = ", ".join(f"{p} at {r:g}" for p, r in diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise ValueError(f"{d} holds other policy x rate cells than {dirs[0]}: {shown or 'a cell twice'}")
    return runs


def _tpot_only(rows: list[dict]) -> list[dict]:
    """The rows with TPOT-only attainment and goodput in place of TTFT+TPOT ones, for ``headline``."""
    out = []
    for r in rows:
        o = r["summary"]["overall"]
        o = {**o, "attainment": o["attainment_tpot"], "goodput_tok_s": o["goodput_tpot_tok_s"]}
        out.append({**r, "summary": {**r["summary"], "overall": o}})
    return out


def aggregate(runs: list[list[dict]], focus: str = "adaserve", exclude: tuple[str, ...] = ()) -> dict:
    """Per policy x rate means over seeds, and per rate the focus / best baseline ratios over seeds."""
    cells = []
    for policy, rate in sorted(dict.fromkeys((r["policy"], r["rate"]) for r in runs[0]), key=lambda c: c[1]):
        overall = [next(r for r in rows if r["policy"] == policy and r["rate"] == rate)["summary"]["overall"]
                   for rows in runs]
        cells.append({"policy": policy, "rate": rate, **{k: mean_ci95([o[k] for o in overall]) for k in (
            "attainment", "goodput_tok_s", "attainment_tpot", "goodput_tpot_tok_s", "throughput_tok_s",
            "ttft_s_p99", "rejected")}})
    ratios = {}
    for metric, view in (("ttft_tpot", lambda rows: rows), ("tpot_only", _tpot_only)):
        heads = [headline(view(rows), focus, exclude)["per_rate"] for rows in runs]
        ratios[metric] = [{
            "rate": per_seed[0]["rate"],
            "best_attainment_policy": [p["best_attainment_policy"] for p in per_seed],
            "best_goodput_policy": [p["best_goodput_policy"] for p in per_seed],
            "attainment_ratio": mean_ci95([p["attainment_ratio"] for p in per_seed]),
            "goodput_ratio": mean_ci95([p["goodput_ratio"] for p in per_seed]),
        } for per_seed in zip(*heads)]
    return {"seeds": len(runs), "focus": focus, "excluded": list(exclude), "cells": cells, "headline": ratios}


def _pm(s: dict, scale: float, digits: int, unit: str = "") -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean'] * scale:.{digits}f}±{s['half_width'] * scale:.{digits}f}{unit}"


def format_markdown(agg: dict) -> str:
    rates = sorted({c["rate"] for c in agg["cells"]})
    policies = list(dict.fromkeys(c["policy"] for c in agg["cells"]))
    by = {(c["policy"], c["rate"]): c for c in agg["cells"]}
    lines = [f"Overall class, mean ± 95% t-interval over {agg['seeds']} seeds: TTFT+TPOT attainment / goodput tok/s "
             "/ throughput tok/s (mean) / TTFT p99 (mean)", "",
             "| policy | " + " | ".join(f"{r:g} req/s" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for p in policies:
        row = []
        for r in rates:
            c = by.get((p, r))
            ttft = "-" if c is None or c["ttft_s_p99"]["mean"] is None else f"{c['ttft_s_p99']['mean']:.2f} s"
            row.append("" if c is None else f"{_pm(c['attainment'], 100, 1, '%')} / {_pm(c['goodput_tok_s'], 1, 0)} "
                                            f"/ {c['throughput_tok_s']['mean']:.0f} / {ttft}")
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    excl = f" (without {', '.join(agg['excluded'])})" if agg["excluded"] else ""
    for metric, heads in agg["headline"].items():
        label = {"ttft_tpot": "TTFT+TPOT", "tpot_only": "TPOT-only"}[metric]
        lines += ["", f"{agg['focus']} / best baseline{excl}, {label} attainment and goodput, per seed -> "
                      "mean ± 95% interval:"]
        for h in heads:
            parts = []
            for k, name in (("attainment", "attainment"), ("goodput", "goodput")):
                s = h[f"{k}_ratio"]
                per = " ".join("-" if v is None else f"{v:.2f}" for v in s["values"])
                best = "/".join(dict.fromkeys(h[f"best_{k}_policy"]))
                parts.append(f"{name} {per} -> {_pm(s, 1, 2)} (vs {best})")
            lines.append(f"- {h['rate']:g} req/s: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run folders of one sweep, one per seed (each has summary.json)")
    ap.add_argument("--focus", default="adaserve", help="the policy to judge against the best baseline")
    ap.add_argument("--exclude", nargs="*", default=[], help="baselines left out of the headline (e.g. dynamic-tree)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here, and the aggregate as .json")
    args = ap.parse_args()
    try:
        runs = load_runs(args.runs)
    except ValueError as e:
        ap.error(str(e))
    if not any(r["policy"] == args.focus for r in runs[0]):
        ap.error(f"--focus {args.focus} is not a policy of these runs: {sorted({r['policy'] for r in runs[0]})}")
    agg = aggregate(runs, args.focus, tuple(args.exclude))
    text = format_markdown(agg)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        agg["runs"] = [str(d) for d in args.runs]
        args.out.with_suffix(".json").write_text(json.dumps(agg, indent=1))


if __name__ == "__main__":
    main()
