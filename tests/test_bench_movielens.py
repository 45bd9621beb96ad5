"""`seminar-tf bench movielens`: the whole bench on a tiny MovieLens fixture (RecBole atomic files written here),
the ml-100k extraction from a (fake) RecBole wheel, and the checks computed from the rows' numbers."""

import json
import math
import os
import zipfile

import numpy as np
import pytest

from seminar_tf.bench import movielens

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance")


def _write_fixture(root, users=30, items=60, per_user=25, seed=0):
    """RecBole atomic files (ml-100k.inter/.item/.user): users like two genres; ratings follow them."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    genre = rng.integers(0, len(GENRES), items)
    with open(os.path.join(root, "ml-100k.item"), "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for i in range(items):
            f.write(f"{i + 1}\tMovie {GENRES[genre[i]]} {i + 1}\t{1980 + i % 20}\t{GENRES[genre[i]]}\n")
    with open(os.path.join(root, "ml-100k.user"), "w") as f:
        f.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
        for u in range(users):
            f.write(f"{u + 1}\t{20 + u % 40}\t{'MF'[u % 2]}\tother\t{10000 + u}\n")
    with open(os.path.join(root, "ml-100k.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(users):
            liked = set(rng.choice(len(GENRES), 2, replace=False))
            start = 880000000 + int(rng.integers(0, 10 ** 6))
            for step, i in enumerate(rng.choice(items, per_user, replace=False)):
                rating = int(np.clip(round(rng.normal(4.3 if genre[i] in liked else 2.7, 0.8)), 1, 5))
                f.write(f"{u + 1}\t{i + 1}\t{rating}\t{start + 3600 * step}\n")
    return str(root)


def _mean(rows, row, metric):
    return rows[row]["metrics"][metric]["mean"]


@pytest.mark.slow
def test_bench_movielens_end_to_end(tmp_path):
    from seminar_tf import cli

    raw = _write_fixture(tmp_path / "ml")
    out = tmp_path / "benchmarks"
    argv = ["bench", "movielens", "--input", raw, "--out", str(out), "--work-dir", str(tmp_path / "work"),
            "--config", "test", "--seeds", "1", "--models", "seminar,din", "--epochs", "1", "--pretrain-epochs", "1",
            "--num-negatives", "15"]
    assert cli.main(argv) == 0
    with open(out / "movielens" / "movielens.json") as f:
        payload = json.load(f)
    assert (out / "movielens" / "REPORT.md").stat().st_size > 0
    assert "--input" in payload["command"] and payload["seeds"] == 1
    assert not os.path.exists(out / "movielens" / "runs")  # runs stay under the work dir
    assert payload["dataset_stats"]["samples"]["ctr"]["test"] > 0

    rows = {r["row"]: r for r in payload["rows"]}
    assert list(rows) == ["seminar", "din", "popularity"]
    for name in ("seminar", "din"):
        assert rows[name]["n"] == 1 and rows[name]["metrics"]["auc"]["n"] == 1
        assert 0.0 < _mean(rows, name, "auc") < 1.0 and 0.0 < _mean(rows, name, "gauc") < 1.0
        assert _mean(rows, name, "logloss") > 0 and 0.0 <= _mean(rows, name, "hit@10") <= 1.0
        assert rows[name]["epoch_seconds"]["n"] == 1 and rows[name]["epoch_seconds"]["mean"] > 0
    assert 0.0 < _mean(rows, "popularity", "auc") < 1.0 and rows["popularity"]["kind"] == "reference"
    assert rows["din"]["external"] == {"model": "DIN", "auc": 0.780} and rows["seminar"]["external"] is None

    by_target = {c["target"]: c for c in payload["checks"]}
    assert len(by_target) == 5  # AUC target, seminar >= din, din >= FuxiCTR DIN, GAUC and HIT@10 vs popularity
    for check in payload["checks"]:
        assert check["value"] == _mean(rows, check["row"], check["metric"])
        if check["reference"] in rows:
            assert check["reference_value"] == _mean(rows, check["reference"], check["metric"])
        passed = (check["value"] >= check["reference_value"] if check["op"] == ">="
                  else check["value"] > check["reference_value"])
        assert check["status"] == ("pass" if passed else "fail")
    assert by_target["SEMINAR test AUC >= 0.800 (mean of seeds)"]["reference_value"] == 0.8
    assert by_target["din >= FuxiCTR DIN (test AUC)"]["reference_value"] == 0.780

    # GAUC against popularity: the difference of the means, with a paired bootstrap interval over users
    intervals = payload["gauc_vs_popularity"]
    assert set(intervals) == {"seminar", "din"}
    for name, value in intervals.items():
        assert value["difference"] == pytest.approx(_mean(rows, name, "gauc") - _mean(rows, "popularity", "gauc"))
        assert value["low"] <= value["difference"] <= value["high"] and value["se"] > 0 and value["users"] > 1
    assert by_target["SEMINAR GAUC > popularity"]["interval"] == intervals["seminar"]
    # SEMINAR >= din carries the paired interval of the AUC difference (the grid's paired_auc)
    auc_interval = by_target["SEMINAR >= din (test AUC)"]["interval"]
    assert auc_interval["difference"] == pytest.approx(_mean(rows, "seminar", "auc") - _mean(rows, "din", "auc"))
    assert auc_interval["low"] <= auc_interval["difference"] <= auc_interval["high"]
    report_md = (out / "movielens" / "REPORT.md").read_text()
    assert "## GAUC against popularity" in report_md and "paired bootstrap over" in report_md

    # --resume reuses the dataset and the finished cells: the same numbers, no retraining
    assert cli.main(argv + ["--resume", "--note", "Cells trained on an earlier commit."]) == 0
    with open(out / "movielens" / "movielens.json") as f:
        again = json.load(f)
    assert sorted(again["reused"]) == ["din_s0", "seminar_s0"]
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in payload["rows"]]
    assert again["gauc_vs_popularity"] == intervals  # the stored scores give the same bootstrap
    assert again["checks"] == payload["checks"]
    assert again["note"] == "Cells trained on an earlier commit." and "--note" in again["command"]
    assert "Cells trained on an earlier commit." in (out / "movielens" / "REPORT.md").read_text()


def test_fetch_ml100k_extracts_from_a_cached_wheel_without_pip(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / f"recbole-{movielens.RECBOLE_VERSION}-py3-none-any.whl", "w") as wheel:
        for name in movielens.ML100K_FILES:
            wheel.writestr(movielens.ML100K_MEMBER + name, f"contents of {name}\n")
    monkeypatch.setattr(movielens.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    target = movielens.fetch_ml100k(str(cache))
    assert sorted(os.listdir(target)) == sorted(movielens.ML100K_FILES)
    with open(os.path.join(target, "ml-100k.inter")) as f:
        assert f.read() == "contents of ml-100k.inter\n"
    assert movielens.fetch_ml100k(str(cache)) == target  # already extracted: nothing to do


def test_checks_follow_the_numbers():
    def row(name, kind, auc, gauc=0.6, hit=0.5, external=None):
        stat = lambda v: {"mean": v, "std": 0.0, "n": 1}  # noqa: E731
        return {"row": name, "kind": kind, "external": external,
                "metrics": {"auc": stat(auc), "gauc": stat(gauc), "hit@10": stat(hit)}}

    rows = [row("seminar", "model", 0.81, gauc=0.7, hit=0.4),
            row("din", "baseline", 0.79, external={"model": "DIN", "auc": 0.780}),
            row("twin", "baseline", 0.82, external={"model": "TWIN", "auc": 0.791}),
            row("no_history", "baseline", math.nan),
            row("popularity", "reference", 0.7, gauc=0.65, hit=0.45)]
    status = {c["target"]: c["status"] for c in movielens.checks(rows)}
    assert status == {
        "SEMINAR test AUC >= 0.800 (mean of seeds)": "pass",
        "SEMINAR >= din (test AUC)": "pass", "SEMINAR >= twin (test AUC)": "fail",
        "SEMINAR >= no_history (test AUC)": "not evaluated",
        "din >= FuxiCTR DIN (test AUC)": "pass", "twin >= FuxiCTR TWIN (test AUC)": "pass",
        "SEMINAR GAUC > popularity": "pass", "SEMINAR HIT@10 > popularity": "fail"}
    interval = {"difference": 0.05, "se": 0.01, "low": 0.03, "high": 0.07, "level": 0.95, "users": 9, "draws": 10}
    by_target = {c["target"]: c for c in movielens.checks(rows, {"seminar": interval})}
    assert by_target["SEMINAR GAUC > popularity"]["interval"] == interval
    assert "interval" not in by_target["SEMINAR HIT@10 > popularity"]
    assert "interval" not in by_target["SEMINAR >= din (test AUC)"]
    by_target = {c["target"]: c for c in movielens.checks(rows, auc_intervals={"din": interval})}
    assert by_target["SEMINAR >= din (test AUC)"]["interval"] == interval
    assert "interval" not in by_target["SEMINAR >= twin (test AUC)"]
