"""End to end on the `test` preset's synthetic world: pretrain → finetune (restored) → evaluate, via the CLI."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf import cli, experiment, schema, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset_dir):
    root = tmp_path_factory.mktemp("runs")
    psu, ctr = str(root / "psu"), str(root / "ctr")
    assert cli.main(["pretrain", "--data", dataset_dir, "--model-dir", psu, "--config", "test", "--epochs", "1"]) == 0
    assert cli.main(["finetune", "--data", dataset_dir, "--model-dir", ctr, "--init-from", psu, "--config", "test",
                     "--epochs", "2"]) == 0
    return psu, ctr


@pytest.mark.slow
def test_pretrain_writes_config_checkpoints_and_the_content_checkpoint(runs):
    psu, _ = runs
    config = json.load(open(os.path.join(psu, "config.json")))
    assert config["stage"] == "pretrain" and config["model"]["dim"] == 16
    assert tf.io.gfile.exists(os.path.join(psu, experiment.CONTENT_CHECKPOINT) + ".index")
    assert tf.io.gfile.exists(train.resolve_run_dirs(psu).best_weights + ".index")
    assert tf.io.gfile.glob(os.path.join(psu, "tensorboard", "train", "events.*"))


@pytest.mark.slow
def test_finetune_records_its_init_and_evaluate_writes_the_report(runs, dataset_dir, capsys):
    psu, ctr = runs
    config = json.load(open(os.path.join(ctr, "config.json")))
    assert config["stage"] == "finetune" and config["init_from"] == psu and config["data"] == dataset_dir
    assert cli.main(["evaluate", "--model-dir", ctr, "--num-negatives", "20"]) == 0
    table = capsys.readouterr().out
    assert "| model |" in table and "popularity" in table
    reports = tf.io.gfile.glob(os.path.join(ctr, "eval", "*.json"))
    assert len(reports) == 1
    metrics = json.load(open(reports[0]))["metrics"]
    for name in ("auc", "gauc", "logloss", "hit@1", "hit@5", "hit@10", "hit@50", "ndcg@10", "mrr"):
        assert name in metrics["model"], name
    # The report's CTR numbers are the trained model's: recompute its test AUC and popularity's independently.
    model, preset, _ = experiment.load_model(ctr)
    metadata = experiment.reader.load_metadata(dataset_dir)
    popularity = experiment.popularity_scores(dataset_dir, metadata)
    labels, scores, popular = [], [], []
    for batch in experiment.reader.make_dataset(dataset_dir, schema.CTR_DIR, "test", 16, metadata=metadata,
                                                max_history=preset.build.max_history):
        labels.append(batch[schema.CTX_LABEL].numpy())
        scores.append(model(batch)["probability"].numpy())
        popular.append(popularity[batch[schema.CTX_TARGET_ITEM].numpy()])
    labels, scores, popular = map(np.concatenate, (labels, scores, popular))
    assert metrics["model"]["num_samples"] == len(labels)
    np.testing.assert_allclose(metrics["model"]["auc"], _rank_auc(labels, scores), rtol=1e-4)
    np.testing.assert_allclose(metrics["popularity"]["auc"], _rank_auc(labels, popular), rtol=1e-6)
    hits = [metrics["model"][f"hit@{k}"] for k in (1, 5, 10, 50)]
    assert hits == sorted(hits) and metrics["model"]["hit@1"] <= metrics["model"]["mrr"] <= 1.0
    assert metrics["split"] == "test"

    # --split valid scores the valid split, in a report of its own beside the test one
    assert cli.main(["evaluate", "--model-dir", ctr, "--num-negatives", "20", "--split", "valid"]) == 0
    reports = sorted(tf.io.gfile.glob(os.path.join(ctr, "eval", "*.json")))
    assert len(reports) == 2
    valid = [json.load(open(r))["metrics"] for r in reports]
    valid = next(m for m in valid if m["split"] == "valid")
    labels, scores = [], []
    for batch in experiment.reader.make_dataset(dataset_dir, schema.CTR_DIR, "valid", 16, metadata=metadata,
                                                max_history=preset.build.max_history):
        labels.append(batch[schema.CTX_LABEL].numpy())
        scores.append(model(batch)["probability"].numpy())
    labels, scores = map(np.concatenate, (labels, scores))
    assert valid["model"]["num_samples"] == len(labels)
    np.testing.assert_allclose(valid["model"]["auc"], _rank_auc(labels, scores), rtol=1e-4)
    with pytest.raises(ValueError, match="split 'train'"):
        experiment.evaluate(ctr, split="train")


def _rank_auc(labels, scores):
    """Mann-Whitney AUC with ties counted one half (independent of seminar_tf.evaluate)."""
    positive, negative = scores[labels > 0.5], scores[labels <= 0.5]
    greater = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return greater / (len(positive) * len(negative))


@pytest.mark.slow
def test_reloaded_model_scores_like_the_trained_one(runs, dataset_dir):
    _, ctr = runs
    model, preset, data = experiment.load_model(ctr)
    assert data == dataset_dir and preset.name == "test"
    batch = next(iter(experiment.reader.make_dataset(dataset_dir, schema.CTR_DIR, "test", 8,
                                                     max_history=preset.build.max_history)))
    again, _, _ = experiment.load_model(ctr)
    np.testing.assert_allclose(model(batch)["logit"], again(batch)["logit"], rtol=1e-6)


def test_finetune_refuses_an_init_from_without_a_psu_checkpoint(tmp_path, dataset_dir, cli_refuses):
    cli_refuses(["finetune", "--data", dataset_dir, "--model-dir", str(tmp_path / "ctr"), "--init-from",
                 str(tmp_path / "nothing"), "--config", "test", "--epochs", "1"], "seminar-tf pretrain", code=1)


@pytest.mark.slow
def test_finetune_a_baseline_by_name_and_reload_it(tmp_path, dataset_dir, cli_refuses):
    from seminar_tf.models.baselines import DIN

    run = str(tmp_path / "din")
    assert cli.main(["finetune", "--data", dataset_dir, "--model-dir", run, "--config", "test", "--epochs", "1",
                     "--model", "din", "--no-pretrain"]) == 0
    assert json.load(open(os.path.join(run, "config.json")))["model"]["architecture"] == "din"
    model, _, _ = experiment.load_model(run)
    assert isinstance(model, DIN)
    cli_refuses(["finetune", "--data", dataset_dir, "--model-dir", run, "--config", "test", "--no-pretrain",
                 "--init-from", run], "contradict", code=2)


def test_item_statistics_table_leaves_each_users_fold_out(dataset_dir):
    metadata = experiment.reader.load_metadata(dataset_dir)
    table = experiment.item_statistics_table(dataset_dir, metadata, folds=3)
    assert table.shape == (4, metadata.num_items, 2)
    items, labels, users = [], [], []
    for batch in experiment.reader.make_dataset(dataset_dir, schema.CTR_DIR, "train", 256, metadata=metadata,
                                                max_history=1):
        items.append(batch[schema.CTX_TARGET_ITEM].numpy())
        labels.append(batch[schema.CTX_LABEL].numpy())
        users.append(batch[schema.CTX_USER_INDEX].numpy())
    items, labels, users = map(np.concatenate, (items, labels, users))
    # The full row is the popularity baseline's smoothed rate, as log-odds.
    rate = experiment.popularity_scores(dataset_dir, metadata)
    np.testing.assert_allclose(table[3, :, 0], np.log(rate / (1 - rate)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table[3, :, 1], np.log1p(np.bincount(items, minlength=metadata.num_items)) / 5,
                               rtol=1e-5)
    for fold in range(3):
        kept = users % 3 != fold
        shown = np.bincount(items[kept], minlength=metadata.num_items)
        np.testing.assert_allclose(table[fold, :, 1], np.log1p(shown) / 5, rtol=1e-5)
        # An item shown only to this fold's users is at the prior in its fold row.
        only_here = (np.bincount(items[~kept], minlength=metadata.num_items) > 0) & (shown == 0)
        assert only_here.any()
        prior = labels.mean()
        np.testing.assert_allclose(table[fold, only_here, 0], np.log(prior / (1 - prior)), rtol=1e-5)
    # model.item_statistics_columns picks the columns, in its order
    count_only = experiment.item_statistics_table(dataset_dir, metadata, 3, columns=("log_count",))
    np.testing.assert_array_equal(count_only, table[..., 1:])
    swapped = experiment.item_statistics_table(dataset_dir, metadata, 3, columns=("log_count", "log_odds"))
    np.testing.assert_array_equal(swapped, table[..., ::-1])


@pytest.mark.slow
def test_finetune_with_item_statistics_and_category_affinity_reloads_them(tmp_path, dataset_dir):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"base": "test", "model": {"item_statistics_folds": 3, "category_affinity": True}}))
    run = str(tmp_path / "ctr")
    assert cli.main(["finetune", "--data", dataset_dir, "--model-dir", run, "--config", str(path), "--epochs", "1",
                     "--no-pretrain"]) == 0
    model, _, _ = experiment.load_model(run)
    assert model.affinity_column > 0
    metadata = experiment.reader.load_metadata(dataset_dir)
    np.testing.assert_allclose(model.item_statistics.numpy(),
                               experiment.item_statistics_table(dataset_dir, metadata, 3), rtol=1e-6)
    # only the log-count column (--set model.item_statistics_columns=log_count): a one-column table, reloaded
    count_run = str(tmp_path / "count")
    assert cli.main(["finetune", "--data", dataset_dir, "--model-dir", count_run, "--config", str(path), "--epochs",
                     "1", "--steps-per-epoch", "2", "--no-pretrain",
                     "--set", "model.item_statistics_columns=log_count"]) == 0
    model, preset, _ = experiment.load_model(count_run)
    assert preset.model.item_statistics_columns == ("log_count",)
    np.testing.assert_allclose(model.item_statistics.numpy(),
                               experiment.item_statistics_table(dataset_dir, metadata, 3)[..., 1:], rtol=1e-6)


@pytest.mark.slow
def test_a_run_of_an_older_version_reads_back_unless_it_used_a_retired_field(runs, tmp_path):
    _, ctr = runs
    raw = json.load(open(os.path.join(ctr, "config.json")))
    old = tmp_path / "old"
    old.mkdir()
    raw["model"]["item_statistics_wide"] = False  # a field an earlier version had, off
    (old / "config.json").write_text(json.dumps(raw))
    assert experiment.preset_of_run(str(old)).model == experiment.preset_of_run(ctr).model
    raw["model"]["item_statistics_wide"] = True  # on: this version cannot rebuild that model
    (old / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="no longer has.*item_statistics_wide"):
        experiment.preset_of_run(str(old))
