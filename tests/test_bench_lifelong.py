"""`seminar-tf bench lifelong` (seminar_tf/bench/lifelong.py): gap closed, checks, paired intervals and the
Markdown from a hand-made report; and a tiny end-to-end run through the CLI."""

import json

import numpy as np
import pytest

from seminar_tf import cli
from seminar_tf.bench import lifelong, stamp


def _metric(mean, n=3):
    return {"mean": mean, "std": 0.01 if n > 1 else 0.0, "n": n}


def _row(name, length, auc, n=3):
    return {"row": name, "max_history": length, "description": name, "n": n, "auc": auc if n else None,
            "metrics": {"auc": _metric(auc, n), "gauc": _metric(auc - 0.1, n), "logloss": _metric(0.6, n)},
            "gap_closed": lifelong.gap_closed(auc if n else None, 0.80, 0.64)}


def _diff(difference, low, high):
    return {"difference": difference, "low": low, "high": high, "se": 0.01, "users": 120, "draws": 2000}


def _report():
    config = lifelong.LifelongBenchConfig()
    rows = [_row("seminar", 100, 0.60), _row("seminar", 1000, 0.66), _row("seminar", 10_000, 0.75),
            _row("seminar_no_pretrain", 10_000, 0.70), _row("sim_hard", 10_000, 0.74), _row("sim_soft", 10_000, 0.76),
            _row("eta", 10_000, 0.0, n=0), _row("twin", 10_000, 0.70), _row("din", 10_000, 0.65),
            _row("popularity", None, 0.57), _row("oracle", None, 0.80, n=1),
            _row("oracle_without_long_term", None, 0.64, n=1)]
    paired = {"seminar@100": _diff(0.15, 0.12, 0.18), "seminar@1000": _diff(0.09, 0.05, 0.12),
              "seminar_no_pretrain@10000": _diff(0.05, 0.02, 0.08), "sim_hard@10000": _diff(0.01, -0.01, 0.03),
              "sim_soft@10000": _diff(-0.01, -0.03, 0.01), "twin@10000": _diff(0.05, 0.03, 0.07),
              "din@10000": _diff(0.10, 0.08, 0.12)}
    report = {"benchmark": "lifelong", **stamp.stamp(config.cli()), "config": "demo", "overrides": [], "seeds": 3,
              "lengths": [100, 1000, 10_000], "long_rows": list(config.long_rows), "align_chunk_steps": 100,
              "world": {"flags": config.world_flags(), "ok": True, "reused": False}, "build": {"ok": True},
              "samples": {"train": 38400, "valid": 4800, "test": 4800}, "oracle": {},
              "failed": {"10000": [{"cell": "eta_s0", "error": "boom"}]}, "missing": {"10000": ["eta_s1", "eta_s2"]},
              "note": "", "wall_seconds": 10.0, "rows": rows, "oracle_auc": 0.80,
              "oracle_auc_without_long_term": 0.64, "paired": paired}
    report["checks"] = lifelong.checks(report)
    return report


def test_gap_closed_is_the_share_of_the_oracles_gap():
    assert lifelong.gap_closed(0.74, 0.80, 0.64) == pytest.approx(0.625)
    assert lifelong.gap_closed(0.64, 0.80, 0.64) == 0.0 and lifelong.gap_closed(0.80, 0.80, 0.64) == 1.0
    assert lifelong.gap_closed(0.60, 0.80, 0.64) < 0  # below the oracle blind to the far past
    assert lifelong.gap_closed(None, 0.80, 0.64) is None and lifelong.gap_closed(float("nan"), 0.8, 0.64) is None
    assert lifelong.gap_closed(0.7, 0.64, 0.64) is None  # no gap to close


def test_checks_state_the_issues_targets_from_the_rows_and_paired_differences():
    checks = {c["target"]: c["status"] for c in _report()["checks"]}
    assert checks["SEMINAR at L=10000 closes >= 60% of the lifelong gap (test AUC)"] == "pass"  # 0.6875
    assert checks["SEMINAR at L=10000 beats its L=1000 run by >= 0.03 AUC, paired interval above 0"] == "pass"
    assert checks["SEMINAR at L=10000 beats seminar_no_pretrain (test AUC, paired interval above 0)"] == "pass"
    assert checks["SEMINAR at L=10000 beats sim_hard (test AUC, paired interval above 0)"] == "fail"  # low < 0
    assert checks["SEMINAR at L=10000 beats sim_soft (test AUC, paired interval above 0)"] == "fail"
    assert checks["SEMINAR at L=10000 beats eta (test AUC, paired interval above 0)"] == "not run"
    report = _report()
    report["rows"][2] = _row("seminar", 10_000, 0.70)
    report["paired"]["seminar@1000"] = _diff(0.02, 0.01, 0.03)
    statuses = [c["status"] for c in lifelong.checks(report)]
    assert statuses[:2] == ["fail", "fail"]  # 37.5% of the gap; +0.02 < 0.03


def test_the_markdown_renders_from_the_json_alone(tmp_path):
    text = stamp.write(_report(), str(tmp_path), "lifelong.json")
    assert (tmp_path / "lifelong.md").read_text(encoding="utf-8") == text
    assert stamp.render(json.loads((tmp_path / "lifelong.json").read_text(encoding="utf-8"))) == text
    assert "| seminar | 10,000 | 3 | 0.7500 ± 0.0100 |" in text
    assert "| oracle_without_long_term | – | 1 | 0.6400 |" in text and "| 0.0% |" in text
    assert "| seminar | 1,000 | 3 | 0.6600 ± 0.0100 | 0.5600 ± 0.0100 | 0.6000 ± 0.0100 | 12.5% | -0.0900" in text
    assert "L=10000: eta_s0 failed: boom" in text and "L=10000: eta_s1 not run" in text
    assert cli.main(["render", str(tmp_path / "lifelong.json")]) == 0


def test_paired_intervals_need_the_same_test_samples():
    labels = np.array([0, 1, 0, 1, 1, 0], np.float32)
    users = np.array(["a", "a", "b", "b", "c", "c"], object)
    cell = {"label": labels, "user": users, "probability": np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3])}
    weak = {**cell, "probability": np.array([0.5, 0.4, 0.6, 0.5, 0.5, 0.5])}
    out = lifelong.paired_intervals([cell], {"weak@10": [weak], "none@10": []}, draws=50)
    assert set(out) == {"weak@10"} and out["weak@10"]["difference"] > 0
    with pytest.raises(ValueError, match="same test samples"):
        lifelong.paired_intervals([cell], {"other@10": [{**weak, "label": labels[::-1]}]}, draws=50)


def test_the_config_checks_rows_and_lengths():
    with pytest.raises(ValueError, match="unknown rows"):
        lifelong.LifelongBenchConfig(long_rows=("seminar",))
    with pytest.raises(ValueError, match="lengths"):
        lifelong.LifelongBenchConfig(lengths=())
    config = lifelong.LifelongBenchConfig(lengths=(1000, 100), long_rows=("din",), overrides=("model.top_k=8",))
    assert config.lengths == (100, 1000) and config.rows_at(100) == ("seminar",)
    assert config.rows_at(1000) == ("seminar", "din")
    assert config.overrides_at(1000) == ("model.top_k=8", "build.max_history=1000", "model.align_chunks=10")
    assert config.world_flags()["with_split"] is True
    assert config.cli() == ("seminar-tf bench lifelong --lengths 100,1000 --models din --set model.top_k=8")


@pytest.mark.slow
def test_tiny_lifelong_bench_end_to_end(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["bench", "lifelong", "--out", str(out), "--work-dir", str(work), "--users", "8", "--items", "300",
            "--mean-history", "60", "--impressions-per-user", "30", "--lengths", "10,40", "--models", "sim_hard",
            "--config", "test", "--seeds", "1", "--epochs", "1", "--pretrain-epochs", "1"]
    assert cli.main(argv) == 0
    report = json.loads((out / "lifelong" / "lifelong.json").read_text(encoding="utf-8"))
    assert report["benchmark"] == "lifelong" and report["command"].startswith("seminar-tf bench lifelong --users 8")
    top, bottom = report["oracle_auc"], report["oracle_auc_without_long_term"]
    assert 0 < top <= 1 and 0 < bottom <= 1  # 24 test samples: either may come out higher
    keys = [(r["row"], r["max_history"]) for r in report["rows"]]
    assert keys == [("seminar", 10), ("seminar", 40), ("sim_hard", 40), ("popularity", None), ("oracle", None),
                    ("oracle_without_long_term", None)]
    for row in report["rows"]:
        assert 0 <= row["auc"] <= 1 and row["n"] == 1
    closed = [r["gap_closed"] for r in report["rows"]]
    assert closed[-2:] == ([1.0, 0.0] if top > bottom else [None, None])
    assert all(c is None or c == pytest.approx((r["auc"] - bottom) / (top - bottom)) for c, r in zip(closed,
                                                                                                   report["rows"]))
    assert set(report["paired"]) == {"seminar@10", "sim_hard@40"}
    assert report["checks"][0]["status"] == ("n/a" if closed[-2] is None else "pass" if closed[1] >= 0.6 else "fail")
    assert (out / "lifelong" / "lifelong.md").read_text(encoding="utf-8") == stamp.render(report)
    printed = capsys.readouterr().out
    assert "lifelong.md" in printed and "closes >= 60% of the lifelong gap" in printed
    # --resume reuses the world, the dataset and the finished cells
    assert cli.main(argv + ["--resume"]) == 0
    again = json.loads((out / "lifelong" / "lifelong.json").read_text(encoding="utf-8"))
    assert again["world"]["reused"] and again["build"]["reused"]
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in report["rows"]]
