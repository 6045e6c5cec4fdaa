"""bench.seeds: the t interval's arithmetic, the per-seed headline ratios, and the refusal of mismatched runs."""

from __future__ import annotations

import json
import math
import sys

import pytest
from scipy import stats

from bench import seeds


def overall(att: float, gp: float, att_tpot: float | None = None, gp_tpot: float | None = None) -> dict:
    return {"requests": 100, "attainment": att, "goodput_tok_s": gp, "attainment_tpot": att_tpot or att,
            "goodput_tpot_tok_s": gp_tpot or gp, "throughput_tok_s": gp * 1.5, "rejected": 0, "ttft_s_p99": 0.5}


def write_run(path, cells: dict) -> object:
    """A summary.json like bench.simulate's: ``cells`` maps (policy, rate) to overall()'s arguments."""
    path.mkdir()
    rows = [{"policy": p, "rate": r, "summary": {"wall_s": 1.0, "overall": overall(*v), "coding": overall(*v)}}
            for (p, r), v in cells.items()]
    (path / "summary.json").write_text(json.dumps(rows))
    return path


def test_t_quantile_matches_scipy():
    for df in range(1, 200):
        assert seeds.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-7, abs=0)
    with pytest.raises(ValueError):
        seeds.t_quantile_975(0)


def test_mean_and_half_width_golden():
    s = seeds.mean_ci95([0.5, 0.6, 0.7])
    assert s["mean"] == pytest.approx(0.6)
    assert s["half_width"] == pytest.approx(4.302652730 * 0.1 / math.sqrt(3))
    s = seeds.mean_ci95([1.0, 3.0])  # sd sqrt(2), df 1
    assert s["half_width"] == pytest.approx(12.706204736 * math.sqrt(2) / math.sqrt(2))
    assert seeds.mean_ci95([0.5, None])["mean"] is None


def three_runs(tmp_path):
    # seed 2: none beats dynamic-tree at rate 2, so the per-seed best baseline differs there
    att = {"none": (0.4, 0.5, 0.6), "dynamic-tree": (0.5, 0.6, 0.5), "adaserve": (0.8, 0.9, 0.9)}
    runs = []
    for s in range(3):
        cells = {(p, r): (a[s] / r, 100 * a[s] / r, min(1.0, 1.2 * a[s] / r), 120 * a[s] / r)
                 for r in (1.0, 2.0) for p, a in att.items()}
        runs.append(write_run(tmp_path / f"s{s}", cells))
    return runs


def test_aggregate_cells_and_ratio_per_seed(tmp_path):
    agg = seeds.aggregate(seeds.load_runs(three_runs(tmp_path)), focus="adaserve")
    cell = next(c for c in agg["cells"] if c["policy"] == "adaserve" and c["rate"] == 1.0)
    assert cell["attainment"]["values"] == [0.8, 0.9, 0.9]
    assert cell["attainment"]["mean"] == pytest.approx(2.6 / 3)
    assert [c["policy"] for c in agg["cells"]][:3] == ["none", "dynamic-tree", "adaserve"]  # the runs' order
    (r1, r2) = agg["headline"]["ttft_tpot"]
    assert r2["rate"] == 2.0
    assert r2["best_attainment_policy"] == ["dynamic-tree", "dynamic-tree", "none"]
    assert r2["attainment_ratio"]["values"] == pytest.approx([0.8 / 0.5, 0.9 / 0.6, 0.9 / 0.6])
    assert r2["goodput_ratio"]["values"] == pytest.approx([0.8 / 0.5, 0.9 / 0.6, 0.9 / 0.6])
    ratios = [0.8 / 0.5, 0.9 / 0.6, 0.9 / 0.6]
    assert r2["attainment_ratio"]["half_width"] == pytest.approx(
        stats.t.ppf(0.975, 2) * stats.tstd(ratios) / math.sqrt(3))
    # TPOT-only: attainment_tpot is capped at 1.0, so the ratio at rate 1 differs from the TTFT+TPOT one
    t1 = agg["headline"]["tpot_only"][0]
    assert t1["attainment_ratio"]["values"] == pytest.approx([0.96 / 0.6, 1.0 / 0.72, 1.0 / 0.72])
    assert r1["attainment_ratio"]["values"] == pytest.approx([0.8 / 0.5, 0.9 / 0.6, 0.9 / 0.6])


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench.seeds", *map(str, argv)])
    seeds.main()


def test_main_prints_table_and_writes_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "agg" / "seeds.md"
    run_main(monkeypatch, *three_runs(tmp_path), "--out", out)
    text = capsys.readouterr().out
    assert "| adaserve | 86.7±14.3% / 87±14 / 130 / 0.50 s |" in text
    assert "- 2 req/s: attainment 1.60 1.50 1.50 -> 1.53±0.14 (vs dynamic-tree/none)" in text
    assert out.read_text() == text
    assert json.loads(out.with_suffix(".json").read_text())["seeds"] == 3


def test_refuses_mismatched_or_too_few_runs(tmp_path, monkeypatch, capsys):
    a, b, _ = three_runs(tmp_path)
    c = write_run(tmp_path / "other", {("none", 1.0): (0.4, 50), ("adaserve", 3.0): (0.5, 60)})
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, a, b, c)
    assert e.value.code == 2
    assert "other policy x rate cells" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main(monkeypatch, a)
    assert "at least 2 run folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main(monkeypatch, a, b, "--focus", "eagle")
    assert "not a policy of these runs" in capsys.readouterr().err
