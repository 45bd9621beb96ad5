"""`seminar-tf bench longseq` (seminar_tf/bench/longseq.py): targets, ratios and the Markdown from a hand-made
report; the child-process runner; and a tiny end-to-end run through the CLI."""

import json

import pytest

from seminar_tf import cli
from seminar_tf.bench import longseq, stamp

GIB = 1024 ** 3


def _build(length, ok=True, per_sample=5000.0):
    return {"L": length, "command": f"seminar-tf build --max-history {length}", "ok": ok, "returncode": 0 if ok else 1,
            "wall_s": 10.0, "peak_rss_bytes": 2 * GIB, "events_read": 1000, "events_per_s": 100.0,
            "ctr_samples": 100, "ctr_samples_by_split": {"train": 80, "valid": 10, "test": 10},
            "bytes_total": int(per_sample * 100),
            "bytes_by_dir": {"ctr/": 1000, "timelines/": int(per_sample * 100) - 1000},
            "bytes_per_ctr_sample": per_sample, **({} if ok else {"error": "exit code 1"})}


def _cell(model, length, batch=64, ok=True, epochs=(5.0, 0.5, 0.4), rss=1.0):
    trained = 2 * batch
    row = {"model": model, "L": length, "batch_size": batch, "epochs": max(1, len(epochs)), "steps_per_epoch": 2,
           "validation_steps": 1, "command": f"seminar-tf finetune --model {model}", "ok": ok,
           "returncode": 0 if ok else -9, "wall_s": 30.0, "peak_rss_bytes": int(rss * GIB),
           "epoch_time_s": list(epochs), "epoch_train_time_s": [e / 2 for e in epochs], "epochs_run": len(epochs)}
    if epochs:
        row.update(last_epoch_s=epochs[-1], train_samples_per_s=round(trained / epochs[-1], 1),
                   samples_per_s_with_validation=round((trained + batch) / epochs[-1], 1),
                   train_step_samples_per_s=round(trained / (epochs[-1] / 2), 1))
    if not ok:
        row.update(error="killed by signal 9 (SIGKILL: out of memory?)", stderr_tail="Killed")
    return row


def _report():
    config = longseq.LongSeqBenchConfig()
    builds = [_build(1000, per_sample=1500.0), _build(10_000, per_sample=8000.0)]
    cells = [_cell("seminar", 1000, epochs=(9.0, 0.3, 0.2)), _cell("din", 1000, rss=0.5),
             _cell("seminar", 10_000, epochs=(20.0, 0.5, 0.4)), _cell("din", 10_000, rss=0.8),
             dict(_cell("seminar", 10_000, epochs=(21.0, 0.9, 0.8), rss=1.5), variant="model.aux_scope=history")]
    peaks = [_cell("seminar", 10_000, batch=256, ok=False, epochs=(), rss=5.0), _cell("din", 10_000, batch=256,
                                                                                      epochs=(3.0,), rss=2.0)]
    world = {"command": "seminar-tf world --out raw", "ok": True, "returncode": 0, "wall_s": 60.0,
             "peak_rss_bytes": GIB, "num_events": 1_200_000, "num_clicks": 1_000_000, "num_impressions": 4800,
             "history_length_mean": 9_900.5, "history_length_max": 12_000, "reused": False}
    return {"benchmark": "longseq", **stamp.stamp(config.command()), "preset": longseq.PRESET,
            "config": {**config.__dict__, "lengths": list(config.lengths), "models": list(config.models)},
            "world_flags": config.world_flags(), "world": world, "builds": builds, "training": cells, "peak": peaks,
            "targets": longseq.targets(builds, cells, peaks), "ratios": longseq.ratios(builds, cells, peaks),
            "units": {}, "load_average_before": [1.0, 1.0, 1.0], "load_average_after": [2.0, 2.0, 2.0],
            "wall_s": 1234.0}


def test_targets_at_lifelong_length_say_met_missed_or_not_measured():
    report = _report()
    size, rss, epoch = report["targets"]
    assert size["measured"] == 8000.0 and size["limit"] == 7 * 1024 and size["met"] is False
    assert rss["measured"] == 5 * GIB and rss["met"] is False and "killed by signal 9" in rss["why"]
    assert epoch["measured"] == 0.4 and epoch["met"] is True and epoch["samples_per_s"] == 320.0
    assert len(report["targets"]) == 3
    # nothing at L = 10^4: every target "not measured", never met
    small = longseq.targets([_build(200)], [_cell("seminar", 200)], [_cell("seminar", 200, batch=256)])
    assert [t["met"] for t in small] == [None, None, None]
    assert all(t["measured"] is None and "not measured at L=10,000" in t["why"] for t in small)
    # a failed timed run: its epoch time does not count
    failed = longseq.targets([], [_cell("seminar", 10_000, ok=False)], [])
    assert failed[2]["met"] is None and "out of memory" in failed[2]["why"]
    # another batch than the target's: measured, but neither met nor missed
    other = longseq.targets([], [_cell("seminar", 10_000, batch=16)], [_cell("seminar", 10_000, batch=32)])
    assert other[1]["met"] is None and other[1]["why"] == "measured at batch 32, not 256"
    assert other[2]["met"] is None and other[2]["measured"] == 0.4 and "at batch 16" in other[2]["why"]


def test_ratios_compare_lengths_and_models_of_the_same_run():
    ratios = {r["what"]: r["value"] for r in _report()["ratios"]}
    assert ratios["bytes per CTR sample, L=10,000 over L=1,000"] == pytest.approx(8000 / 1500, abs=1e-3)
    assert ratios["SEMINAR over DIN peak RSS, training, L=1,000"] == pytest.approx(2.0)
    assert ratios["SEMINAR over DIN last epoch time, L=10,000"] == pytest.approx(1.0)
    assert ratios["last epoch time, seminar, L=10,000 over L=1,000"] == pytest.approx(2.0)
    assert not any("batch 256" in what for what in ratios)  # the SEMINAR batch-256 run failed: no ratio
    # a SEMINAR variant is timed beside the preset's row, never taken for it
    assert ratios["last epoch time, seminar, L=10,000, preset over model.aux_scope=history"] == pytest.approx(0.5)
    assert ratios["training peak RSS, seminar, L=10,000, preset over model.aux_scope=history"] == pytest.approx(
        1 / 1.5, abs=1e-3)
    assert _report()["targets"][2]["measured"] == 0.4


def test_markdown_renders_from_the_json_alone(tmp_path):
    text = stamp.write(_report(), str(tmp_path), "longseq.json")
    assert (tmp_path / "longseq.md").read_text(encoding="utf-8") == text
    assert stamp.render(json.loads((tmp_path / "longseq.json").read_text(encoding="utf-8"))) == text
    lines = text.splitlines()
    assert "| bytes per CTR sample at L=10,000 <= 7 KiB (7,168 B; whole dataset on disk / CTR samples) | " \
           "7.81 KiB (8,000 B) | missed |" in lines
    assert any(line.startswith("| SEMINAR third epoch at L=10,000") and line.endswith("| met |") for line in lines)
    assert "| 10,000 | 1,000 | 10.0 | 100 | 2.00 | 781.2 KiB | 100 | 8,000 | ok |" in lines
    assert "| seminar | 10,000 | 1.00 | 20.000, 0.500, 0.400 | 320 | 480 | 640 | 30.0 | ok |" in lines
    assert "| seminar (`--set model.aux_scope=history`) | 10,000 | 1.50 | 21.000, 0.900, 0.800 | 160 | 240 | 320 | " \
           "30.0 | ok |" in lines
    assert "| timelines/ | 145.5 KiB | 780.3 KiB |" in lines and "| ctr/ | 1,000 B | 1,000 B |" in lines
    assert any("failed: killed by signal 9" in line and "stderr ends: `Killed`" in line for line in lines)
    assert cli.main(["render", str(tmp_path / "longseq.json")]) == 0


def test_run_cli_reports_exit_code_and_peak_rss_of_the_child(tmp_path):
    row = longseq.run_cli(["world", "--help"], str(tmp_path / "logs" / "help"), timeout_s=300)
    assert row["ok"] and row["returncode"] == 0 and row["peak_rss_bytes"] > 10 * 1024 ** 2
    assert row["command"] == "seminar-tf world --help" and "--num-users" in (tmp_path / "logs" / "help.out").read_text()
    bad = longseq.run_cli(["world", "--no-such-flag"], str(tmp_path / "logs" / "bad"), timeout_s=300)
    assert not bad["ok"] and bad["returncode"] == 2 and bad["error"] == "exit code 2" and bad["stderr_tail"]


def test_directory_bytes_and_last_json(tmp_path):
    (tmp_path / "d" / "ctr").mkdir(parents=True)
    (tmp_path / "d" / "ctr" / "a").write_bytes(b"x" * 10)
    (tmp_path / "d" / "stats.json").write_bytes(b"y" * 3)
    assert longseq.directory_bytes(str(tmp_path / "d")) == (13, {"ctr/": 10, "stats.json": 3})
    (tmp_path / "o").write_text("Epoch 1/1\n{\n  \"a\": {\"b\": 1}\n}\nnoise\n{\n  \"epoch_time_s\": 0.5\n}\n")
    assert longseq.last_json(str(tmp_path / "o")) == {"epoch_time_s": 0.5}


@pytest.mark.slow
def test_tiny_longseq_bench_end_to_end(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["bench", "longseq", "--out", str(out), "--work-dir", str(work), "--users", "6", "--items", "2000",
            "--mean-history", "300", "--lengths", "50,200", "--models", "seminar", "--batch-size", "16",
            "--peak-batch-size", "32"]
    assert cli.main(argv) == 0
    report = json.loads((out / "longseq.json").read_text(encoding="utf-8"))
    assert report["benchmark"] == "longseq" and report["command"].startswith("seminar-tf bench longseq --users 6")
    assert report["world"]["ok"] and report["world"]["num_events"] > 6 * 240 and not report["world"]["reused"]
    assert [b["L"] for b in report["builds"]] == [50, 200]
    for b in report["builds"]:
        stats = json.loads((work / f"data_L{b['L']}" / "stats.json").read_text(encoding="utf-8"))
        assert b["ok"] and b["events_read"] == stats["rows_read"]["events"] > 0
        assert b["ctr_samples"] == sum(stats["samples"]["ctr"].values()) > 0
        assert b["bytes_total"] == sum(b["bytes_by_dir"].values()) > 0 and b["bytes_by_dir"]["stats.json"] > 0
        assert b["bytes_per_ctr_sample"] == pytest.approx(b["bytes_total"] / b["ctr_samples"], abs=0.1)
        assert b["peak_rss_bytes"] > 0 and b["events_per_s"] > 0
    assert [(c["model"], c["L"], c["variant"]) for c in report["training"]] == [
        ("seminar", 50, None), ("seminar", 200, None), ("seminar", 200, "model.aux_scope=history")]
    assert "--set model.aux_scope=history" in report["training"][2]["command"]
    for c in report["training"]:
        assert c["ok"] and c["epochs_run"] == 3 and len(c["epoch_time_s"]) == 3 and c["peak_rss_bytes"] > 0
        assert c["train_samples_per_s"] > 0 and c["epoch_times_from"] == "tensorboard"
    assert [(p["model"], p["L"], p["batch_size"], p["ok"]) for p in report["peak"]] == [("seminar", 200, 32, True)]
    assert [t["met"] for t in report["targets"]] == [None, None, None]  # no L = 10^4 in a tiny run
    assert any(r["what"].startswith("bytes per CTR sample, L=200 over L=50") for r in report["ratios"])
    assert (out / "longseq.md").read_text(encoding="utf-8") == stamp.render(report)
    # a rerun with the same world parameters reuses the world
    rerun = argv[:argv.index("--lengths")] + ["--lengths", "50", "--models", "seminar", "--batch-size", "16",
                                              "--peak-batch-size", "16", "--epochs", "1", "--variants", ""]
    assert cli.main(rerun) == 0
    again = json.loads((out / "longseq.json").read_text(encoding="utf-8"))
    assert again["world"]["reused"] and again["world"]["num_events"] == report["world"]["num_events"]
    assert [c["epochs_run"] for c in again["training"]] == [1]


def test_cli_defaults_are_the_bench_config_defaults():
    default = longseq.LongSeqBenchConfig()
    assert cli.LONGSEQ_VARIANTS.split(",") == list(default.seminar_variants)
    assert cli.LONGSEQ_MODELS.split(",") == list(default.models)
    assert "--variants" not in default.command()
    assert longseq.LongSeqBenchConfig(seminar_variants=()).command().endswith("--variants ''")
