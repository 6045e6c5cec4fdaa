"""Plots of a sweep's summary.json (matplotlib, Agg backend): attainment vs rate and goodput vs rate per policy,
and per-class attainment bars per rate. ``python -m bench.plots bench/runs/sweep-<time>/summary.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"none": ("tab:gray", "o"), "chain:4": ("tab:olive", "v"), "chain:6": ("tab:orange", "^"),
         "chain:8": ("tab:brown", "<"), "static-tree": ("tab:purple", "s"), "dynamic-tree": ("tab:blue", "D"),
         "adaserve": ("tab:red", "*")}


def _style(policy: str) -> tuple[str | None, str]:
    """Simulator prototypes ("adaserve+cut") take their base policy's colour, a hollow marker and dashes."""
    base = policy.split("+")[0]
    color, marker = STYLE.get(base, (None, "x"))
    return ("tab:pink" if base == "adaserve" else "tab:cyan") if "+" in policy else color, "x" if "+" in policy else marker


def _series(rows: list[dict], cls: str, key: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in sorted(rows, key=lambda r: r["rate"]):
        b = row["summary"].get(cls)
        if b is None or b.get(key) is None:
            continue
        xs, ys = out.setdefault(row["policy"], ([], []))
        xs.append(row["rate"])
        ys.append(b[key] * (100 if key == "attainment" else 1))
    return out


def plot_sweep(summary_path: Path, out_dir: Path, title: str = "", prefix: str = "") -> list[Path]:
    rows = json.loads(Path(summary_path).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or Path(summary_path).parent.name
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (key, label) in zip(axes, [("attainment", "SLO attainment (%)"),
                                       ("goodput_tok_s", "goodput (tokens/s of SLO-attaining requests)"),
                                       ("goodput_req_s", "goodput (SLO-attaining requests/s)")]):
        for pol, (xs, ys) in _series(rows, "overall", key).items():
            color, marker = _style(pol)
            ax.plot(xs, ys, marker=marker, color=color, label=pol, lw=2.5 if pol.startswith("adaserve") else 1.2,
                    ls="--" if "+" in pol else "-")
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-3, 103)
    axes[0].legend(fontsize=8)
    paths.append(_save(fig, f"{title}: attainment and goodput vs rate",
                       out_dir / f"{prefix}attainment_goodput_vs_rate.png"))

    rates = sorted({r["rate"] for r in rows})
    policies = [p for p in STYLE if any(r["policy"] == p for r in rows)] + sorted(
        {r["policy"] for r in rows} - set(STYLE))
    classes = [c for c in ("coding", "chat", "summarization") if any(c in r["summary"] for r in rows)]
    fig, axes = plt.subplots(1, len(rates), figsize=(4.2 * len(rates), 4), sharey=True, squeeze=False)
    width = 0.8 / max(len(policies), 1)
    for ax, rate in zip(axes[0], rates):
        for j, pol in enumerate(policies):
            row = next((r for r in rows if r["rate"] == rate and r["policy"] == pol), None)
            if row is None:
                continue
            vals = [(row["summary"].get(c) or {}).get("attainment") or 0.0 for c in classes]
            color, _ = _style(pol)
            ax.bar([i + j * width for i in range(len(classes))], [v * 100 for v in vals], width, color=color,
                   label=pol)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes, fontsize=8)
        ax.set_title(f"rate {rate:g} req/s")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("SLO attainment (%)")
    axes[0][-1].legend(fontsize=7)
    paths.append(_save(fig, f"{title}: per-class attainment", out_dir / f"{prefix}attainment_per_class.png"))
    return paths


def autoscale_plot(runs: dict[str, dict], offered: list[tuple[float, float]], path: Path, title: str = "",
                   bin_s: float = 10.0) -> Path:
    """One autoscaled load ramp per scaling rule (``runs``: rule -> {"timeline": [{t, routing, target, ...}],
    "records": request records}): replicas routing and asked for, offered load (``offered``: [(t, req/s)]), and per
    ``bin_s`` of arrival time the SLO attainment (TTFT+TPOT) and TTFT p90."""
    import numpy as np

    from bench.loadgen import attained, ttft_s

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot([t for t, _ in offered], [r for _, r in offered], color="black")
    axes[0].set_ylabel("offered load (req/s)")
    for k, (rule, run) in enumerate(sorted(runs.items())):
        color = f"C{k}"
        tl = run["timeline"]
        axes[1].step([e["t"] for e in tl], [e["routing"] for e in tl], where="post", color=color,
                     label=f"{rule}: routing")
        axes[1].step([e["t"] for e in tl], [e["target"] for e in tl], where="post", color=color, linestyle=":",
                     label=f"{rule}: target")
        recs = run["records"]
        if not recs:
            continue
        bins = np.floor(np.array([r["scheduled_s"] for r in recs]) / bin_s).astype(int)
        centers, attain, p90 = [], [], []
        for b in np.unique(bins):
            inside = [r for r, rb in zip(recs, bins) if rb == b]
            ttfts = [v for v in (ttft_s(r) for r in inside) if v is not None]
            centers.append((b + 0.5) * bin_s)
            attain.append(100.0 * sum(attained(r) for r in inside) / len(inside))
            p90.append(float(np.percentile(ttfts, 90)) if ttfts else float("nan"))
        axes[2].plot(centers, attain, color=color, label=rule)
        axes[3].plot(centers, p90, color=color, label=rule)
    axes[1].set_ylabel("replicas")
    axes[2].set_ylabel(f"attainment % ({bin_s:g} s bins)")
    axes[3].set_ylabel("TTFT p90 (s)")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("time (s)")
    for ax in axes[1:]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, title, path)


def _save(fig, title: str, path: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("summary", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    for p in plot_sweep(args.summary, args.out or args.summary.parent, args.title):
        print(p)


if __name__ == "__main__":
    main()
