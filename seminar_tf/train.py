"""The generic trainer: Keras ``fit`` under ``tf.distribute`` with checkpoints, TensorBoard and resumption.

Model-agnostic: it takes a model builder and a dataset factory, so the PSU pretraining model and the SEMINAR
CTR model (and the baselines) all train through :func:`fit`. Directories follow Vertex AI's custom-training
contract (``AIP_MODEL_DIR``, ``AIP_CHECKPOINT_DIR``, ``AIP_TENSORBOARD_LOG_DIR``) when those are set, and all
file access goes through ``tf.io.gfile``, so ``gs://`` paths work.

Example:
    >>> result = fit(build_model, lambda split, ctx: reader.make_dataset(
    ...     data_dir, "ctr", split, config.batch_size, input_context=ctx), config, "runs/ctr")
    >>> model = build_model(); load_weights(model, "runs/ctr")   # the best epoch's weights
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

import seminar_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
import tensorflow as tf

from seminar_tf.config import TrainConfig  # noqa: F401  (defined in the leaf config module)

LOG = logging.getLogger("seminar_tf")

CONFIG_FILE = "config.json"
BEST_WEIGHTS = os.path.join("best", "weights")  # TF-format weights: <dir>/best/weights.{index,data-*}
LAST_WEIGHTS = os.path.join("last", "weights")
MONITOR_STATE_FILE = "monitor_state.json"  # in backup_dir; see _ResumeMonitorState
EPOCH_TIME = "epoch_time_s"  # history key: wall seconds of the epoch (training steps + validation); _EpochTimes
EPOCH_TRAIN_TIME = "epoch_train_time_s"  # history key: wall seconds of the epoch's training steps alone

MakeDataset = Callable[[str, Optional[tf.distribute.InputContext]], tf.data.Dataset]


def keras_verbosity(verbose: int, stream=None) -> int:
    """Keras ``fit`` verbosity: a progress bar (1) only on a terminal; written to a file or a pipe it becomes one
    line per epoch (2), since a bar there is a single line of carriage returns hundreds of KB long."""
    stream = sys.stdout if stream is None else stream
    if verbose == 1 and not (hasattr(stream, "isatty") and stream.isatty()):
        return 2
    return verbose


@dataclasses.dataclass
class RunDirs:
    """Where a run writes: exported artefacts + config, weight checkpoints, TensorBoard logs, fault-tolerance backup."""

    model_dir: str
    checkpoint_dir: str
    tensorboard_dir: str
    backup_dir: str

    @property
    def best_weights(self) -> str:
        return os.path.join(self.checkpoint_dir, BEST_WEIGHTS)

    @property
    def last_weights(self) -> str:
        return os.path.join(self.checkpoint_dir, LAST_WEIGHTS)


def resolve_run_dirs(model_dir: Optional[str]) -> RunDirs:
    """The run's directories; Vertex AI's ``AIP_*`` variables win over ``model_dir`` when set.

    Without them: ``model_dir/{checkpoints,tensorboard,backup}``. With ``AIP_CHECKPOINT_DIR`` the backup lives
    under it too, because Vertex keeps that directory across restarts of a preempted job.
    """
    model_dir = os.environ.get("AIP_MODEL_DIR") or model_dir
    if not model_dir:
        raise ValueError("no model directory: pass model_dir or set AIP_MODEL_DIR")
    checkpoint_env = os.environ.get("AIP_CHECKPOINT_DIR")
    checkpoint_dir = checkpoint_env or os.path.join(model_dir, "checkpoints")
    return RunDirs(
        model_dir=model_dir,
        checkpoint_dir=checkpoint_dir,
        tensorboard_dir=os.environ.get("AIP_TENSORBOARD_LOG_DIR") or os.path.join(model_dir, "tensorboard"),
        backup_dir=os.path.join(checkpoint_env, "backup") if checkpoint_env else os.path.join(model_dir, "backup"),
    )


def make_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when ``TF_CONFIG`` describes a cluster (>1 worker, or a chief); else the default.

    Create it before any other TensorFlow work in the process (MWMS must configure the runtime first).
    """
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = tf_config.get("cluster", {})
    if "chief" in cluster or len(cluster.get("worker", [])) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def monitor_mode(monitor: str) -> str:
    """``"min"`` for losses, ``"max"`` for everything else (AUC, accuracy, recall...)."""
    return "min" if "loss" in monitor else "max"


def make_optimizer(config: TrainConfig) -> tf.keras.optimizers.Optimizer:
    """The Keras optimizer named ``config.optimizer`` with ``config.learning_rate``.

    A config dict without ``is_legacy_optimizer`` would give the legacy (v1-style) optimizer, which builds
    its slots lazily so BackupAndRestore could not restore them before the first step.
    """
    settings = {"learning_rate": config.learning_rate, "is_legacy_optimizer": False}
    if config.weight_decay:
        settings["weight_decay"] = config.weight_decay
    return tf.keras.optimizers.get({"class_name": config.optimizer, "config": settings})


def epoch_learning_rate(config: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``learning_rate · learning_rate_decay^epoch``."""
    return float(config.learning_rate * config.learning_rate_decay ** epoch)


def fit(
    build_model: Callable[[], tf.keras.Model],
    make_dataset: MakeDataset,
    config: TrainConfig,
    model_dir: Optional[str],
    *,
    resolved_config: Optional[dict] = None,
    extra_callbacks: Sequence[tf.keras.callbacks.Callback] = (),
    strategy: Optional[tf.distribute.Strategy] = None,
) -> Dict[str, Any]:
    """Trains ``build_model()`` with Keras ``fit``; resumes a killed run from its last finished epoch.

    Args:
      build_model: returns an uncompiled model (e.g. a ``tfrs.models.Model``) callable on the features of a
        dataset element; it is built and compiled inside ``strategy.scope()``.
      make_dataset: ``(split, input_context) -> batched dataset`` for ``"train"`` / ``"valid"``. With an
        ``input_context`` it must shard by ``input_pipeline_id`` and batch by
        ``input_context.get_per_replica_batch_size(config.batch_size)``; with ``None`` it returns the global
        batch (used once to build the model's variables before ``fit``).
      config: epochs, optimizer, early stopping; ``config.seed`` seeds Python, NumPy and TensorFlow.
      model_dir: run directory (Vertex's ``AIP_*`` variables override it, see :func:`resolve_run_dirs`).
      resolved_config: the full configuration of the run, written with ``config`` to ``<model_dir>/config.json``.
      extra_callbacks: appended after the trainer's own callbacks.
      strategy: defaults to :func:`make_strategy`.

    Returns:
      ``{"history", "epochs", "model", "best_weights", "last_weights", "config_path", "run_dirs"}``;
      ``model`` holds the best epoch's weights (EarlyStopping restores them), ``epochs`` the 0-based epochs
      this call ran (a resumed run starts after the last backed-up epoch).

    Under a multi-replica strategy the model's loss must be averaged over the *global* batch
    (``tf.nn.compute_average_loss`` of per-example losses, or the replica's mean / ``num_replicas_in_sync``):
    Keras refuses its default loss reduction there, and the replicas' gradients are summed.
    """
    strategy = strategy or make_strategy()
    tf.keras.utils.set_random_seed(config.seed)
    dirs = resolve_run_dirs(model_dir)
    is_chief = strategy.extended.should_checkpoint  # False on non-chief workers of a multi-worker cluster

    # Present only if an earlier run was killed after finishing an epoch (a finished run deletes it).
    state_path = os.path.join(dirs.backup_dir, MONITOR_STATE_FILE)
    resume_state = _read_json(state_path)
    with strategy.scope():
        model = build_model()
        if not model.built:
            # BackupAndRestore restores into existing variables; an unbuilt model would defer it into fit.
            model(_features_of(next(iter(make_dataset("valid", None)))), training=False)
        resume_best_weights = None
        if resume_state is not None and tf.io.gfile.exists(dirs.best_weights + ".index"):
            # Before compile, so this reads model variables only; BackupAndRestore then restores the backup.
            model.load_weights(dirs.best_weights).expect_partial()
            resume_best_weights = model.get_weights()
        optimizer = make_optimizer(config)
        model.compile(optimizer=optimizer)
    # With >1 replica Keras' default ("auto" -> "sum") adds up what train_step returns over the replicas: right
    # for a loss averaged over the global batch, but it multiplies metric results (AUC), which are already
    # aggregated across replicas, by the replica count. "first" keeps metrics exact; the logged loss is then
    # replica 0's share (loss / num_replicas for a `tf.nn.compute_average_loss` loss).
    model.distribute_reduction_method = "first"

    train_data = strategy.distribute_datasets_from_function(lambda ctx: make_dataset("train", ctx))
    valid_data = strategy.distribute_datasets_from_function(lambda ctx: make_dataset("valid", ctx))
    if not isinstance(train_data, tf.data.Dataset) and None in (config.steps_per_epoch, config.validation_steps):
        # Keras cannot detect the end of a distributed dataset (the replicas' shards may differ in length).
        raise ValueError(
            f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replicas needs "
            "TrainConfig.steps_per_epoch and TrainConfig.validation_steps (got "
            f"{config.steps_per_epoch}, {config.validation_steps})")

    config_path = os.path.join(dirs.model_dir, CONFIG_FILE)
    if is_chief:
        _write_config(config_path, resolved_config, config, dirs, strategy)

    mode = monitor_mode(config.monitor)
    best_checkpoint = tf.keras.callbacks.ModelCheckpoint(
        dirs.best_weights, monitor=config.monitor, mode=mode, save_best_only=True, save_weights_only=True)
    early_stopping = tf.keras.callbacks.EarlyStopping(
        monitor=config.monitor, mode=mode, patience=config.early_stopping_patience, restore_best_weights=True)
    callbacks = [
        _EpochTimes(),  # first: the callbacks after it (TensorBoard, History) see the epoch's times
        tf.keras.callbacks.BackupAndRestore(dirs.backup_dir),
        best_checkpoint,
        tf.keras.callbacks.ModelCheckpoint(dirs.last_weights, save_weights_only=True),
        early_stopping,
        _ResumeMonitorState(state_path, early_stopping, best_checkpoint, resume_state, resume_best_weights,
                            is_chief),
        tf.keras.callbacks.TensorBoard(dirs.tensorboard_dir, profile_batch=0),
        *extra_callbacks,
    ]
    if config.learning_rate_decay != 1.0:  # per epoch, so a resumed run continues the same schedule
        schedule = tf.keras.callbacks.LearningRateScheduler(lambda epoch, _: epoch_learning_rate(config, epoch))
        callbacks.insert(1, schedule)
    history = model.fit(
        train_data,
        validation_data=valid_data,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        validation_steps=config.validation_steps,
        callbacks=callbacks,
        verbose=keras_verbosity(config.verbose),
    )
    return {
        "history": history.history,
        "epochs": list(history.epoch),
        "model": model,
        "best_weights": dirs.best_weights,
        "last_weights": dirs.last_weights,
        "config_path": config_path,
        "run_dirs": dirs,
    }


def load_weights(model: tf.keras.Model, model_dir: Optional[str]) -> str:
    """Restores the best weights :func:`fit` saved for ``model_dir`` into ``model``; returns their path.

    Build ``model`` first (call it on a batch) to restore at once; an unbuilt model restores on first call.
    """
    path = resolve_run_dirs(model_dir).best_weights
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(
            f"no best weights at {path} (.index missing): train with seminar_tf.train.fit into this model_dir "
            "first (with AIP_CHECKPOINT_DIR set, the weights are looked up there)")
    model.load_weights(path).expect_partial()  # the optimizer state saved alongside is not needed here
    return path


class _EpochTimes(tf.keras.callbacks.Callback):
    """Adds each epoch's wall seconds to its logs (so to the history ``fit`` returns): ``EPOCH_TIME`` from the
    epoch's start to its end (training steps and validation), ``EPOCH_TRAIN_TIME`` to the start of validation."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()
        self._trained = None

    def on_test_begin(self, logs=None):
        if getattr(self, "_started", None) is not None and self._trained is None:
            self._trained = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        ended = time.perf_counter()
        if logs is not None and getattr(self, "_started", None) is not None:
            logs[EPOCH_TIME] = ended - self._started
            logs[EPOCH_TRAIN_TIME] = (self._trained or ended) - self._started
        self._started = None


class _ResumeMonitorState(tf.keras.callbacks.Callback):
    """Carries EarlyStopping's and the best checkpoint's running best across a BackupAndRestore resume.

    BackupAndRestore restores weights, optimizer and epoch but not other callbacks' state. Without this a
    resumed run forgets the best score so far: it would overwrite the best checkpoint with a worse epoch,
    restart the patience count and restore a different "best" epoch than an uninterrupted run.
    """

    def __init__(self, state_path, early_stopping, best_checkpoint, resume_state, resume_best_weights, is_chief):
        super().__init__()
        self._state_path = state_path
        self._early_stopping = early_stopping
        self._best_checkpoint = best_checkpoint
        self._pending = resume_state
        self._pending_best_weights = resume_best_weights
        self._is_chief = is_chief

    def on_epoch_begin(self, epoch, logs=None):
        state, self._pending = self._pending, None
        if state is None:
            return
        if state["epoch"] != epoch - 1:
            LOG.warning("monitor state at %s is for epoch %d but training resumes at epoch %d; ignoring it",
                        self._state_path, state["epoch"] + 1, epoch + 1)
            return
        early_stopping = self._early_stopping
        early_stopping.best = state["best"]
        early_stopping.wait = state["wait"]
        early_stopping.best_epoch = state["best_epoch"]
        early_stopping.best_weights = self._pending_best_weights
        self._best_checkpoint.best = state["checkpoint_best"]
        self._pending_best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        if not self._is_chief:
            return
        early_stopping = self._early_stopping
        state = {
            "epoch": epoch,
            "best": float(early_stopping.best),
            "wait": int(early_stopping.wait),
            "best_epoch": int(early_stopping.best_epoch),
            "checkpoint_best": float(self._best_checkpoint.best),
        }
        tf.io.gfile.makedirs(os.path.dirname(self._state_path))
        with tf.io.gfile.GFile(self._state_path, "w") as f:
            json.dump(state, f)

    def on_train_end(self, logs=None):
        state = self._pending
        if state is not None and state["epoch"] == self.params["epochs"] - 1 and self._pending_best_weights:
            # Killed after backing up the last epoch: no epoch ran now, so EarlyStopping restored nothing.
            self.model.set_weights(self._pending_best_weights)
        if self._is_chief and tf.io.gfile.exists(self._state_path):
            tf.io.gfile.remove(self._state_path)


def _features_of(element):
    """A dataset element's features: the element itself (TFRS style) or the first of a (features, labels) pair."""
    return element[0] if isinstance(element, (tuple, list)) else element


def _read_json(path: str) -> Optional[dict]:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def _write_config(path: str, resolved_config: Optional[dict], config: TrainConfig, dirs: RunDirs,
                  strategy: tf.distribute.Strategy) -> None:
    payload = dict(resolved_config or {})
    payload["train"] = dataclasses.asdict(config)
    payload["run_dirs"] = dataclasses.asdict(dirs)
    payload["num_replicas_in_sync"] = strategy.num_replicas_in_sync
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)


def _json_default(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)
