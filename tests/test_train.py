"""Tests for seminar_tf.train: fit, checkpoints, Vertex dirs, resume, early stopping, multi-worker, load_weights.

The model is a toy: logistic regression as a ``tfrs.models.Model`` with a Ranking task (AUC named "auc") on
linearly separable synthetic data, so each fit takes a second or two.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import seminar_tf  # noqa: F401
import tensorflow as tf
import tensorflow_recommenders as tfrs

from seminar_tf import train

NUM_FEATURES = 4
TRUE_WEIGHTS = np.array([1.5, -2.0, 0.5, 1.0], np.float32)
BATCH_SIZE = 64


class ToyRanker(tfrs.models.Model):
    """Logistic regression: logit = x·w + b; BCE loss and AUC from the TFRS Ranking task.

    The loss is per-example (reduction NONE) averaged over the *global* batch by ``compute_average_loss``:
    Keras refuses AUTO reduction inside a multi-replica strategy, and the replicas' gradients are summed.
    """

    def __init__(self):
        super().__init__()
        self.dense = tf.keras.layers.Dense(1)
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE),
            metrics=[tf.keras.metrics.AUC(name="auc", from_logits=True)],
        )

    def call(self, features, training=False):
        return self.dense(features["x"])

    def compute_loss(self, features, training=False):
        per_example = self.task(labels=features["label"], predictions=self(features, training=training))
        return tf.nn.compute_average_loss(per_example)


def toy_examples(split: str):
    """Separable data: label = [x·w_true > 0]; train and valid drawn with different seeds."""
    n, seed = (512, 1) if split == "train" else (256, 2)
    x = np.random.default_rng(seed).normal(size=(n, NUM_FEATURES)).astype(np.float32)
    return {"x": x, "label": (x @ TRUE_WEIGHTS > 0).astype(np.float32)[:, None]}


def make_toy_dataset(split, input_context, batch_size=BATCH_SIZE):
    """Unshuffled, so every epoch (and a resumed run) sees batches in the same order."""
    ds = tf.data.Dataset.from_tensor_slices(toy_examples(split))
    if input_context is not None:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    return ds.batch(batch_size)


def toy_config(**overrides) -> train.TrainConfig:
    values = dict(epochs=4, batch_size=BATCH_SIZE, learning_rate=0.1, seed=0, verbose=0,
                  early_stopping_patience=2)
    values.update(overrides)
    return train.TrainConfig(**values)


def built_toy() -> ToyRanker:
    model = ToyRanker()
    model({"x": tf.zeros([1, NUM_FEATURES])})
    return model


@pytest.fixture(autouse=True)
def no_vertex_env(monkeypatch):
    for name in ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR", "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)


class WeightRecorder(tf.keras.callbacks.Callback):
    """Weights at train begin (after BackupAndRestore restored them) and at each epoch end."""

    def __init__(self, fail_after_epoch=None):
        super().__init__()
        self.fail_after_epoch = fail_after_epoch
        self.at_train_begin = None
        self.at_epoch_end = {}

    def on_train_begin(self, logs=None):
        self.at_train_begin = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        self.at_epoch_end[epoch] = self.model.get_weights()
        if epoch == self.fail_after_epoch:
            raise RuntimeError(f"simulated kill after epoch {epoch + 1}")


def assert_weights_equal(actual, expected, atol=0.0):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


def event_files(directory):
    return glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"), recursive=True)


# ------------------------------------------------------------------------------------------------ dirs, strategy
def test_keras_progress_bar_only_on_a_terminal():
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert train.keras_verbosity(1, Stream(True)) == 1
    assert train.keras_verbosity(1, Stream(False)) == 2  # a log file gets one line per epoch
    assert train.keras_verbosity(0, Stream(False)) == 0 and train.keras_verbosity(2, Stream(True)) == 2


def test_resolve_run_dirs_defaults_and_gcs_paths():
    dirs = train.resolve_run_dirs("gs://bucket/runs/ctr")
    assert dirs == train.RunDirs("gs://bucket/runs/ctr", "gs://bucket/runs/ctr/checkpoints",
                                 "gs://bucket/runs/ctr/tensorboard", "gs://bucket/runs/ctr/backup")
    assert dirs.best_weights == "gs://bucket/runs/ctr/checkpoints/best/weights"
    with pytest.raises(ValueError, match="AIP_MODEL_DIR"):
        train.resolve_run_dirs(None)


def test_resolve_run_dirs_vertex_env_wins(monkeypatch):
    monkeypatch.setenv("AIP_MODEL_DIR", "gs://b/model")
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", "gs://b/ckpt")
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", "gs://b/tb")
    assert train.resolve_run_dirs("local/dir") == train.RunDirs("gs://b/model", "gs://b/ckpt", "gs://b/tb",
                                                                "gs://b/ckpt/backup")
    monkeypatch.delenv("AIP_CHECKPOINT_DIR")
    assert train.resolve_run_dirs(None).checkpoint_dir == "gs://b/model/checkpoints"


def test_make_strategy_single_worker_is_default(monkeypatch):
    assert train.make_strategy() is tf.distribute.get_strategy()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert train.make_strategy() is tf.distribute.get_strategy()
    assert train.monitor_mode("val_auc") == "max" and train.monitor_mode("val_total_loss") == "min"


def test_make_optimizer_is_the_current_keras_optimizer():
    optimizer = train.make_optimizer(train.TrainConfig(optimizer="adam", learning_rate=0.25))
    assert isinstance(optimizer, tf.keras.optimizers.Adam)
    assert not isinstance(optimizer, tf.keras.optimizers.legacy.Optimizer)
    assert float(optimizer.learning_rate) == 0.25
    assert isinstance(train.make_optimizer(train.TrainConfig(optimizer="sgd")), tf.keras.optimizers.SGD)


def test_weight_decay_and_per_epoch_learning_rate_decay(tmp_path):
    optimizer = train.make_optimizer(train.TrainConfig(optimizer="adam", weight_decay=0.05))
    assert float(optimizer.weight_decay) == pytest.approx(0.05)
    assert train.make_optimizer(train.TrainConfig(optimizer="adam")).weight_decay is None
    config = toy_config(epochs=3, learning_rate=0.1, learning_rate_decay=0.5, early_stopping_patience=5)
    assert [train.epoch_learning_rate(config, e) for e in range(3)] == pytest.approx([0.1, 0.05, 0.025])
    result = train.fit(ToyRanker, make_toy_dataset, config, str(tmp_path / "run"))
    assert float(result["model"].optimizer.learning_rate) == pytest.approx(0.025)  # the last epoch's rate


# ------------------------------------------------------------------------------------------------ fit
def test_fit_trains_and_writes_config_checkpoints_and_tensorboard(tmp_path):
    model_dir = str(tmp_path / "run")
    resolved = {"preset": "toy", "model": {"num_features": NUM_FEATURES}}
    result = train.fit(ToyRanker, make_toy_dataset, toy_config(), model_dir, resolved_config=resolved)
    history = result["history"]

    assert result["epochs"] == [0, 1, 2, 3]
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["val_auc"][-1] > 0.98
    # The learned direction is the planted one.
    kernel = result["model"].dense.kernel.numpy()[:, 0]
    cosine = kernel @ TRUE_WEIGHTS / np.linalg.norm(kernel) / np.linalg.norm(TRUE_WEIGHTS)
    assert cosine > 0.95

    with open(os.path.join(model_dir, "config.json")) as f:
        written = json.load(f)
    assert written["preset"] == "toy" and written["model"] == {"num_features": NUM_FEATURES}
    assert written["train"]["learning_rate"] == 0.1 and written["train"]["monitor"] == "val_auc"
    assert written["run_dirs"]["checkpoint_dir"] == os.path.join(model_dir, "checkpoints")

    assert os.path.exists(os.path.join(model_dir, "checkpoints", "best", "weights.index"))
    assert os.path.exists(os.path.join(model_dir, "checkpoints", "last", "weights.index"))
    assert event_files(os.path.join(model_dir, "tensorboard", "train"))
    assert event_files(os.path.join(model_dir, "tensorboard", "validation"))
    assert not os.listdir(os.path.join(model_dir, "backup"))  # a finished run deletes its backup

    # val_auc rose every epoch, so the best epoch is the last: both checkpoints hold the final weights.
    assert np.all(np.diff(history["val_auc"]) > 0)
    for path in (result["best_weights"], result["last_weights"]):
        saved = built_toy()
        saved.load_weights(path).expect_partial()
        assert_weights_equal(saved.get_weights(), result["model"].get_weights())


def test_fit_writes_to_vertex_dirs(tmp_path, monkeypatch):
    vertex = {name: str(tmp_path / "vertex" / sub) for name, sub in
              [("AIP_MODEL_DIR", "model"), ("AIP_CHECKPOINT_DIR", "ckpt"), ("AIP_TENSORBOARD_LOG_DIR", "tb")]}
    for name, value in vertex.items():
        monkeypatch.setenv(name, value)
    local_dir = tmp_path / "local"
    result = train.fit(ToyRanker, make_toy_dataset, toy_config(epochs=1), str(local_dir))

    assert result["config_path"] == os.path.join(vertex["AIP_MODEL_DIR"], "config.json")
    assert os.path.exists(result["config_path"])
    assert os.path.exists(os.path.join(vertex["AIP_CHECKPOINT_DIR"], "best", "weights.index"))
    assert event_files(vertex["AIP_TENSORBOARD_LOG_DIR"])
    assert not local_dir.exists()


def test_killed_run_resumes_from_last_finished_epoch(tmp_path):
    config = toy_config(epochs=4)
    reference = WeightRecorder()
    uninterrupted = train.fit(ToyRanker, make_toy_dataset, config, str(tmp_path / "reference"),
                              extra_callbacks=[reference])

    model_dir = str(tmp_path / "killed")
    killed = WeightRecorder(fail_after_epoch=1)
    with pytest.raises(RuntimeError, match="simulated kill after epoch 2"):
        train.fit(ToyRanker, make_toy_dataset, config, model_dir, extra_callbacks=[killed])
    assert sorted(killed.at_epoch_end) == [0, 1]
    assert os.listdir(os.path.join(model_dir, "backup"))  # the backup survived the kill

    resumed = WeightRecorder()
    result = train.fit(ToyRanker, make_toy_dataset, config, model_dir, extra_callbacks=[resumed])

    assert result["epochs"] == [2, 3]  # epochs 3 and 4 ran, 1 and 2 did not
    assert sorted(resumed.at_epoch_end) == [2, 3]
    assert_weights_equal(resumed.at_train_begin, killed.at_epoch_end[1])  # starts where the kill left off
    assert_weights_equal(killed.at_epoch_end[1], reference.at_epoch_end[1], atol=1e-6)
    for epoch in (2, 3):  # weights and optimizer state were restored: the same trajectory
        assert_weights_equal(resumed.at_epoch_end[epoch], reference.at_epoch_end[epoch], atol=1e-5)
    np.testing.assert_allclose(result["history"]["val_auc"], uninterrupted["history"]["val_auc"][2:], atol=1e-6)
    assert_weights_equal(result["model"].get_weights(), uninterrupted["model"].get_weights(), atol=1e-5)
    assert not os.listdir(os.path.join(model_dir, "backup"))


@pytest.mark.parametrize("kill_after_epoch, resumed_epochs", [(1, [2, 3]), (3, [])])
def test_resume_keeps_best_epoch_from_before_the_kill(tmp_path, kill_after_epoch, resumed_epochs):
    """The best epoch (2) comes before the kill: the resumed run must keep it (checkpoint and final weights).

    Killed after the last epoch's backup, the rerun trains no epoch and still returns the best weights.
    """
    # Epochs 1-2 learn; from epoch 3 on the learning rate is huge, so val_loss gets worse.
    def schedule(epoch, lr):
        return 0.1 if epoch < 2 else 50.0

    config = toy_config(epochs=4, monitor="val_loss", early_stopping_patience=5)
    model_dir = str(tmp_path / "run")
    killed = WeightRecorder(fail_after_epoch=kill_after_epoch)
    with pytest.raises(RuntimeError):
        train.fit(ToyRanker, make_toy_dataset, config, model_dir,
                  extra_callbacks=[tf.keras.callbacks.LearningRateScheduler(schedule), killed])
    resumed = WeightRecorder()
    result = train.fit(ToyRanker, make_toy_dataset, config, model_dir,
                       extra_callbacks=[tf.keras.callbacks.LearningRateScheduler(schedule), resumed])

    assert result["epochs"] == resumed_epochs
    losses = [val_loss({**killed.at_epoch_end, **resumed.at_epoch_end}[epoch]) for epoch in range(4)]
    assert int(np.argmin(losses)) == 1  # the scenario: epoch 2 is the best, epochs 3 and 4 are worse
    # EarlyStopping restored epoch 2 (before the kill), and the best checkpoint was not overwritten.
    assert_weights_equal(result["model"].get_weights(), killed.at_epoch_end[1])
    best = built_toy()
    train.load_weights(best, model_dir)
    assert_weights_equal(best.get_weights(), killed.at_epoch_end[1])


def val_loss(weights):
    """Mean validation BCE of the toy with ``weights`` (numpy; Keras' val_loss is the last batch's)."""
    valid = toy_examples("valid")
    logits = valid["x"] @ weights[0] + weights[1]
    return float(np.mean(np.logaddexp(0.0, logits) - valid["label"] * logits))


def test_early_stopping_stops_on_plateau(tmp_path):
    # learning_rate 0: val_auc is flat from epoch 1, so with patience 2 training stops after epoch 3 of 20.
    config = toy_config(epochs=20, learning_rate=0.0, early_stopping_patience=2)
    recorder = WeightRecorder()
    result = train.fit(ToyRanker, make_toy_dataset, config, str(tmp_path / "run"), extra_callbacks=[recorder])

    assert result["epochs"] == [0, 1, 2]
    assert len(set(result["history"]["val_auc"])) == 1
    assert_weights_equal(result["model"].get_weights(), recorder.at_train_begin)


def test_load_weights_restores_best(tmp_path):
    model_dir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no best weights"):
        train.load_weights(built_toy(), model_dir)
    result = train.fit(ToyRanker, make_toy_dataset, toy_config(epochs=2), model_dir)

    restored = built_toy()
    assert not np.allclose(restored.dense.kernel.numpy(), result["model"].dense.kernel.numpy())
    path = train.load_weights(restored, model_dir)
    assert path == result["best_weights"]
    assert_weights_equal(restored.get_weights(), result["model"].get_weights())
    x = make_toy_dataset("valid", None)
    features = next(iter(x))
    np.testing.assert_array_equal(restored(features).numpy(), result["model"](features).numpy())


def test_distributed_dataset_needs_explicit_steps(tmp_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])  # any non-default strategy yields distributed datasets
    with pytest.raises(ValueError, match="steps_per_epoch and TrainConfig.validation_steps"):
        train.fit(ToyRanker, make_toy_dataset, toy_config(epochs=1), str(tmp_path / "run"), strategy=strategy)
    result = train.fit(ToyRanker, make_toy_dataset, toy_config(epochs=1, steps_per_epoch=8, validation_steps=4),
                       str(tmp_path / "run"), strategy=strategy)
    assert result["model"].distribute_strategy is strategy
    assert 0.5 < result["history"]["val_auc"][0] <= 1.0


# ------------------------------------------------------------------------------------------------ multi-worker
def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_two_local_workers(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    model_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mw_worker.py")
    processes, logs, timed_out = [], [], False
    try:
        for index in range(2):
            env = {k: v for k, v in os.environ.items() if not k.startswith("AIP_")}
            env.update(
                TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}),
                TF_CPP_MIN_LOG_LEVEL="2",
                CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")])),
            )
            log = open(out_dir / f"worker_{index}.log", "w")
            logs.append(log)
            processes.append(subprocess.Popen(
                [sys.executable, script, str(model_dir), str(out_dir / f"worker_{index}.npz")],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=repo_root))
        deadline = time.monotonic() + 180
        # Stop as soon as one worker fails: its peer would wait for it until the deadline.
        while any(p.poll() is None for p in processes) and not any(p.poll() for p in processes):
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:  # never leave a worker behind
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()

    if timed_out or any(p.returncode for p in processes):
        report = [f"worker {i}: rc {p.returncode} (-9 = killed here{' after 180 s' if timed_out else ''})\n"
                  + (out_dir / f"worker_{i}.log").read_text()[-3000:] for i, p in enumerate(processes)]
        pytest.fail("\n\n".join(report))
    results = [np.load(out_dir / f"worker_{index}.npz") for index in range(2)]
    for result in results:
        assert bool(result["is_multi_worker_mirrored"])
        assert int(result["num_replicas_in_sync"]) == 2
        np.testing.assert_array_equal(result["epochs"], [0, 1])
    # val_auc is the AUC over the whole validation split (both workers' shards), not a sum or one shard's.
    x, label = toy_examples("valid")["x"], toy_examples("valid")["label"]
    auc = tf.keras.metrics.AUC(from_logits=True)
    auc.update_state(label, x @ results[0]["last_epoch_kernel"] + results[0]["last_epoch_bias"])
    for result in results:
        assert 0.9 < result["val_auc"][-1] <= 1.0
        np.testing.assert_allclose(result["val_auc"][-1], auc.result().numpy(), atol=1e-5)
    assert np.allclose(results[0]["kernel"], results[1]["kernel"], atol=1e-6)
    assert np.allclose(results[0]["bias"], results[1]["bias"], atol=1e-6)
    assert not np.allclose(results[0]["kernel"], results[0]["initial_kernel"])  # training moved the weights
    # Only the chief wrote the config and checkpoints; the other worker's temp dirs were cleaned up.
    assert json.loads((model_dir / "config.json").read_text())["num_replicas_in_sync"] == 2
    assert (model_dir / "checkpoints" / "best" / "weights.index").exists()
    assert not glob.glob(str(model_dir / "**" / "workertemp_*"), recursive=True)
