"""`seminar-tf report`: cold-id subset, aggregation, a tiny grid through the CLI, --resume."""

import json
import os

import numpy as np
import pytest

from seminar_tf import evaluate, report
from seminar_tf.bench import stamp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- units
def test_cold_history_on_a_hand_built_case():
    seen = np.array([5, 7, 8])
    items = np.array([
        [5, 7, 9, 0],  # 9 was never a training target -> cold, 1 of 3 real steps
        [5, 8, 7, 5],  # every id seen -> warm
        [1, 7, 0, 0],  # 1 is OOV (reserved), not an id -> warm
        [5, 9, 9, 0],  # the cold 9s lie beyond history_length 1 (padding region) -> warm
        [0, 0, 0, 0],  # no history
        [10, 11, 5, 0],  # two cold of three
    ])
    lengths = np.array([3, 4, 2, 1, 0, 3])
    has_cold, share = report.cold_history(items, lengths, seen)
    np.testing.assert_array_equal(has_cold, [True, False, False, False, False, True])
    np.testing.assert_allclose(share, [1 / 3, 0.0, 0.0, 0.0, 0.0, 2 / 3])


def test_cold_targets_on_a_hand_built_case():
    seen = [2, 5, 7]
    np.testing.assert_array_equal(report.cold_targets([5, 9, 0, 1, 7, 3], seen),
                                  [False, True, False, False, False, True])  # PAD (0) / OOV (1) are not ids


def test_cold_history_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="history_items"):
        report.cold_history(np.zeros([3, 4]), np.zeros([2]), [])


def test_length_bucket_edges_cover_every_sample_once():
    lengths = np.array([1, 2, 2, 3, 5, 8, 13, 21, 34, 55])
    edges = report.length_bucket_edges(lengths, 4)
    assert edges[0] == 1 and edges[-1] == 56 and edges == sorted(set(edges))
    scores = {"length": lengths, "has_cold": np.zeros(10, bool), "cold_share": np.zeros(10)}
    groups = report.sample_groups(scores, edges, 0.0)
    buckets = [m for name, m in groups.items() if name.startswith("length")]
    np.testing.assert_array_equal(np.sum(buckets, axis=0), np.ones(10))


def test_aggregate_is_mean_and_sample_std_over_seeds():
    cells = {"a": [{"x": 0.6}, {"x": 0.8}, {"x": None}], "b": [{"x": 0.5}]}
    stats = report.aggregate(cells, lambda c: c["x"])
    assert stats["a"]["n"] == 2 and stats["a"]["mean"] == pytest.approx(0.7)
    assert stats["a"]["std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert stats["b"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert report.format_mean_std(stats["a"]) == "0.7000 ± 0.1414"


def test_a_missing_model_config_field_is_a_clear_error(test_preset):
    row = report.Row("x", "a row needing a field", finetune_changes=(("no_such_field", 2),))
    with pytest.raises(ValueError, match=r"row 'x' needs ModelConfig fields \['no_such_field'\]"):
        report.stage_presets(test_preset, row, 0, None)


def test_rows_change_only_what_they_name(test_preset):
    pre, fine = report.stage_presets(test_preset, report.ROWS["seminar_no_alignment"], 1, None)
    assert pre.model.align_weight == 0.0 and fine.model.align_weight == test_preset.model.align_weight
    assert pre.model.seed == fine.model.seed == fine.finetune.seed == 1
    _, din = report.stage_presets(test_preset, report.ROWS["din"], 0, None)
    assert din.model.architecture == "din" and din.finetune.epochs == test_preset.finetune.epochs
    _, longer = report.stage_presets(test_preset, report.ROWS["din_ep4"], 0, None)
    assert longer.finetune.epochs == 4 and longer.model.architecture == "din"
    assert report.psu_key(report.ROWS["din"]) == report.psu_key(report.ROWS["seminar"]) == "psu"
    assert report.psu_key(report.ROWS["seminar_no_alignment"]) != "psu"


def test_unknown_model_row_is_refused(tmp_path, cli_refuses):

    cli_refuses(["report", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--models", "seminar,nope"],
                "unknown rows")


# ---------------------------------------------------------------------------------------------- the grid
def _table_rows(markdown: str, heading: str) -> dict:
    """{first cell: {column: cell}} of the first table after ``heading``."""
    lines = []
    for line in markdown.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def _written(out: str):
    """(report.json as a dict, REPORT.md text) of a report directory."""
    with open(os.path.join(out, "report.json")) as f:
        payload = json.load(f)
    with open(os.path.join(out, "REPORT.md"), encoding="utf-8") as f:
        return payload, f.read()


@pytest.fixture(scope="module")
def grid(dataset_dir, tmp_path_factory):
    from seminar_tf import cli

    out = str(tmp_path_factory.mktemp("report"))
    argv = ["report", "--data", dataset_dir, "--out", out, "--config", "test", "--seeds", "2",
            "--models", "seminar,din", "--epochs", "1", "--pretrain-epochs", "1", "--steps-per-epoch", "2",
            "--num-negatives", "10", "--pq-subspaces", "4", "--pq-centroids", "16"]
    assert cli.main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_report_table_matches_report_json(grid):
    out, _ = grid
    payload, markdown = _written(out)
    assert payload["command"].startswith("seminar-tf report --data") and "--models seminar,din" in payload["command"]
    assert payload["commit"] == stamp.commit() and markdown == stamp.render(payload)  # the Markdown is the JSON
    assert payload["failed"] == [] and payload["missing"] == []
    rows = _table_rows(markdown, "## Test metrics")
    assert {"seminar", "din"} <= set(rows)
    for row in ("seminar", "din"):
        cells = payload["cells"][row]
        assert sorted(c["seed"] for c in cells) == [0, 1]
        for metric, column in (("auc", "AUC"), ("logloss", "LOGLOSS"), ("mrr", "MRR"), ("hit@10", "HIT@10")):
            values = [c["metrics"][metric] for c in cells]
            stat = payload["tables"]["metrics"][row][metric]
            assert stat["n"] == 2
            assert stat["mean"] == pytest.approx(np.mean(values))
            assert stat["std"] == pytest.approx(np.std(values, ddof=1))
            assert rows[row][column] == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
        # the cell metrics are experiment.evaluate's, as written to the run's eval report
        for cell in cells:
            eval_dir = os.path.join(out, "runs", f"{row}_s{cell['seed']}", "eval")
            (name,) = [n for n in os.listdir(eval_dir) if n.endswith(".json")]
            with open(os.path.join(eval_dir, name)) as f:
                evaluated = json.load(f)["metrics"]["model"]
            assert cell["metrics"]["auc"] == pytest.approx(evaluated["auc"])
            # the full-sample AUC recomputed from the per-sample scores of the cold/warm pass
            assert cell["subsets"]["cold_share_high"]["num_samples"] + cell["subsets"]["cold_share_low"][
                "num_samples"] == evaluated["num_samples"]


@pytest.mark.slow
def test_cold_table_and_checks_are_computed_from_the_cells(grid):
    out, _ = grid
    payload, markdown = _written(out)
    cold = _table_rows(markdown, "## Cold-id subset")
    values = [c["subsets"]["cold_share_high"]["auc"] for c in payload["cells"]["seminar"]]
    assert cold["seminar"]["high AUC"] == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
    sizes = payload["subset_sizes"]
    assert sizes["cold"] + sizes["warm"] == sizes["all"] > 0
    # cold target: the test samples whose target item never is a ctr/train target, from the dataset itself
    seen = report.seen_targets(payload["data"])
    targets = report.ctr_test_targets(payload["data"])
    want = int(report.cold_targets(targets["item"], seen).sum())
    assert sizes["cold_target"] == want and sizes["cold_target"] + sizes["warm_target"] == sizes["all"]
    values = [c["subsets"]["warm_target"]["auc"] for c in payload["cells"]["din"]]
    assert cold["din"]["warm target AUC"] == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
    first = payload["checks"][0]
    delta = payload["tables"]["metrics"]["seminar"]["auc"]["mean"] - payload["tables"]["metrics"]["din"]["auc"]["mean"]
    assert f"seminar − din = {delta:+.4f}" in first["detail"]
    assert first["status"].startswith("supported") == (delta > 0)
    assert payload["checks"][1]["status"] == "not evaluated"  # no seminar_no_pretrain row in this grid
    # seminar − din, paired over the test users, from the cells' per-sample scores
    scores = {row: [np.load(os.path.join(out, "runs", f"{row}_s{s}", "scores.npz")) for s in (0, 1)]
              for row in ("seminar", "din")}
    labels = scores["seminar"][0]["label"]
    want = np.mean([evaluate.auc(labels, c["probability"]) for c in scores["seminar"]]) - np.mean(
        [evaluate.auc(labels, c["probability"]) for c in scores["din"]])
    paired = payload["paired_auc"]
    assert set(paired) == {"din"} and paired["din"]["difference"] == pytest.approx(want)
    assert paired["din"]["low"] <= paired["din"]["difference"] <= paired["din"]["high"]
    with open(os.path.join(out, "runs", "seminar_s0", "cell.json")) as f:
        assert paired["din"]["users"] == len(set(json.load(f)["users"]))
    row = _table_rows(markdown, "## Paired test-AUC differences against seminar")["din"]
    assert row["seminar − row"] == f"{paired['din']['difference']:+.4f}"


@pytest.mark.slow
def test_plots_are_valid_pngs(grid):
    out, _ = grid
    from matplotlib import image

    for name in ("learning_curves.png", "pq_recall.png", "auc_vs_history_length.png", "auc_cold_ids.png"):
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
        pixels = image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01, f"{name} is blank"


@pytest.mark.slow
def test_resume_skips_finished_cells_and_refuses_to_overwrite(grid, monkeypatch, cli_refuses):
    from seminar_tf import cli, experiment

    out, argv = grid
    cli_refuses(argv, "--resume", code=1)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(experiment, "pretrain", refuse)
    monkeypatch.setattr(experiment, "finetune", refuse)
    before, _ = _written(out)
    assert cli.main(argv + ["--resume"]) == 0
    after, text = _written(out)
    assert sorted(after["reused"]) == ["din_s0", "din_s1", "seminar_s0", "seminar_s1"]
    assert after["tables"]["metrics"] == before["tables"]["metrics"]
    assert text == stamp.render(after)

    # --report-only trains nothing and lists the cells without a finished run
    models = argv.index("--models") + 1
    only = argv[:models] + ["seminar,din,twin"] + argv[models + 1:] + ["--report-only"]
    assert cli.main(only) == 0
    partial, text = _written(out)
    assert partial["missing"] == ["twin_s0", "twin_s1"] and "twin" not in partial["cells"]
    assert partial["grid_commands"] != [partial["command"]] and text == stamp.render(partial)


def test_checks_follow_the_numbers():
    def stat(mean, std=0.01, n=2):
        return {"mean": mean, "std": std, "n": n}

    def subset(auc_by_row, samples):
        return {r: {"auc": stat(a), "num_samples": stat(samples, 0.0)} for r, a in auc_by_row.items()}

    rows = ["seminar", "seminar_no_pretrain", "din", "twin", "seminar_no_alignment"]
    tables = {"metrics": {"seminar": {"auc": stat(0.64)}, "seminar_no_pretrain": {"auc": stat(0.53)},
                          "din": {"auc": stat(0.54)}, "twin": {"auc": stat(0.65)},
                          "seminar_no_alignment": {"auc": stat(0.60)}},
              "subset:cold": subset({"seminar": 0.70, "seminar_no_pretrain": 0.50}, 990),
              "subset:warm": subset({"seminar": 0.60, "seminar_no_pretrain": 0.55}, 10),
              "subset:cold_share_high": subset({"seminar": 0.66, "seminar_no_pretrain": 0.52}, 500),
              "subset:cold_share_low": subset({"seminar": 0.62, "seminar_no_pretrain": 0.54}, 500),
              "subset:cold_target": subset({"seminar": 0.60, "seminar_no_pretrain": 0.50}, 60),
              "subset:warm_target": subset({"seminar": 0.65, "seminar_no_pretrain": 0.56}, 940)}
    beat, cold, align = report.checks(tables, rows)
    assert beat["status"] == "not supported"  # twin is ahead
    assert beat["deltas"] == pytest.approx({"twin": -0.01, "din": 0.10})
    assert beat["rows_missing"] == ["eta", "sim_soft", "sim_hard"]  # not run
    assert cold["status"] == "supported"  # high share 0.14 > low 0.08; cold target 0.10 > warm 0.09; warm small
    assert cold["too_small"] == {"warm": 10} and "cold" not in cold["gains"]
    assert cold["gains"]["cold_share_high"] == pytest.approx({"cold_share_high": 0.14, "cold_share_low": 0.08})
    assert cold["gains"]["cold_target"] == pytest.approx({"cold_target": 0.10, "warm_target": 0.09})
    assert align["status"] == "supported" and align["delta"] == pytest.approx(0.04)
    assert "paired" not in align["detail"]
    interval = {"difference": 0.04, "low": -0.01, "high": 0.09, "level": 0.95, "users": 500}
    _, _, align = report.checks(tables, rows, {"seminar_no_alignment": interval})
    assert align["detail"].endswith("paired over the 500 test users: +0.0400, 95% interval [-0.0100, +0.0900]")
    tables["metrics"]["twin"]["auc"] = stat(0.60)
    tables["subset:cold_share_low"]["seminar"]["auc"] = stat(0.70)
    beat, cold, _ = report.checks(tables, rows)
    assert beat["status"] == "supported" and cold["status"] == "partly supported"  # only the target split
    tables["subset:cold_target"]["seminar"]["auc"] = stat(0.55)
    beat, cold, _ = report.checks(tables, rows)
    assert cold["status"] == "not supported"
