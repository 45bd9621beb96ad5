"""The training stages as functions: pretrain (PSU), finetune (SEMINAR CTR/PSR), evaluate.

Each stage reads a built dataset directory, meets the config only through ``models.builders``, trains with
``seminar_tf.train.fit`` (Keras fit, checkpoints, resume, TensorBoard, tf.distribute) and writes into a run
directory. The CLI subcommands ``pretrain``, ``finetune`` and ``evaluate`` are thin wrappers around these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from seminar_tf import config as config_lib
from seminar_tf import evaluate as evaluate_lib
from seminar_tf import quantization, schema, train
from seminar_tf.data import reader
from seminar_tf.models import builders
from seminar_tf.models.seminar import PQ_MODES

CONTENT_CHECKPOINT = "content/ckpt"  # PSU content weights, restored by finetune --init-from
EVAL_DIR = "eval"
# A run keeps a copy of its dataset's contract (metadata.json, stats.json and vocab/: what the model's shapes and the
# serving lookups depend on, not the examples), so the run reloads, fits codebooks and exports without the dataset.
RUN_DATASET_DIR = "dataset"

LOG = logging.getLogger("seminar_tf.experiment")


# Report titles of ``evaluate`` by ``model.architecture``.
ARCHITECTURE_TITLES = {"seminar": "SEMINAR", "din": "DIN", "sim_hard": "SIM (hard search)",
                       "sim_soft": "SIM (soft search)", "eta": "ETA", "twin": "TWIN", "qin": "QIN"}


def _log(progress, message):
    if progress:
        progress(message)


def _dataset_fn(data_dir, kind, metadata, train_config: train.TrainConfig, max_history: int):
    def make(split: str, input_context=None):
        return reader.make_dataset(
            data_dir, kind, split, train_config.batch_size, metadata=metadata, max_history=max_history,
            shuffle=split == "train", input_context=input_context, seed=train_config.seed)
    return make


def _resolved(preset: config_lib.Preset, data: Optional[str] = None, **extra) -> dict:
    """What a run's config.json records: the preset as trained, with ``build`` = the dataset's own build settings
    (its stats.json) except ``max_history``, which stays the history length the model read; ``dataset`` = the
    dataset directory, its build settings verbatim and its metadata's shape facts."""
    out = preset.to_dict()
    if data is not None:
        out["data"] = data
        dataset = dataset_facts(data)
        if dataset.get("build"):
            fields = {f.name for f in dataclasses.fields(config_lib.BuildConfig)}
            out["build"] = {**{k: v for k, v in dataset["build"].items() if k in fields},
                            "max_history": preset.build.max_history}
        out["dataset"] = dataset
    out.update(extra)
    return out


def dataset_facts(data_dir: str) -> dict:
    """The dataset's build settings (stats.json ``config``, absent from datasets of older builds) and shape."""
    metadata = reader.load_metadata(data_dir)
    facts = {"dir": data_dir, "max_history": metadata.max_history, "channels": list(metadata.channels),
             "num_items": metadata.num_items, "num_queries": metadata.num_queries}
    try:
        stats = reader.load_stats(data_dir)
    except (OSError, ValueError, tf.errors.NotFoundError):
        return facts
    facts["build"] = stats.get("config")
    facts["samples"] = stats.get("samples")
    return facts


def _config_path(model_dir: str) -> str:
    return os.path.join(run_model_dir(model_dir), train.CONFIG_FILE)


def read_run_config(model_dir: str) -> dict:
    path = _config_path(model_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: {model_dir!r} is not a run directory of seminar-tf")
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def is_run(model_dir: str) -> bool:
    """True when ``model_dir`` holds a seminar-tf run (its config.json)."""
    return tf.io.gfile.exists(_config_path(model_dir))


def preset_of_run(model_dir: str) -> config_lib.Preset:
    """The resolved preset a run was trained with (from its config.json)."""
    raw = read_run_config(model_dir)
    known = {f.name for f in dataclasses.fields(config_lib.Preset)}
    return config_lib.Preset.from_dict(_without_retired_fields({k: v for k, v in raw.items() if k in known},
                                                               model_dir))


def _without_retired_fields(raw: dict, model_dir: str) -> dict:
    """A run written by an older version may record a field the code has since removed: one that was off (False,
    0, empty) changed nothing and is dropped with a log line; one that was on is an error naming it, since this
    code cannot rebuild that model."""
    out = dict(raw)
    for name, kind in config_lib.SECTION_CLASSES.items():
        if not isinstance(raw.get(name), dict):
            continue
        fields = {f.name for f in dataclasses.fields(kind)}
        retired = {k: v for k, v in raw[name].items() if k not in fields}
        active = {k: v for k, v in retired.items() if v not in (None, False, 0, 0.0, "", [], ())}
        if active:
            raise ValueError(f"{model_dir}: config.json sets {name} fields this version no longer has: {active}; "
                             "rebuild the run with the version that wrote it")
        if retired:
            LOG.info("%s: ignoring retired %s fields that were off: %s", model_dir, name, sorted(retired))
            out[name] = {k: v for k, v in raw[name].items() if k in fields}
    return out


def run_model_dir(model_dir: str) -> str:
    """The directory a run keeps its config, content checkpoint and codebooks in (Vertex's AIP_MODEL_DIR wins)."""
    return train.resolve_run_dirs(model_dir).model_dir


def snapshot_dataset(data_dir: str, model_dir: str) -> str:
    """Copies the dataset's contract (metadata.json, stats.json, vocab/*) into ``<run>/dataset``; returns that path.

    Chief only (the caller checks). The copy is written under a temporary name and renamed into place, so a reader
    never sees half of it."""
    target = os.path.join(run_model_dir(model_dir), RUN_DATASET_DIR)
    tmp = f"{target}.tmp-{os.getpid()}"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.io.gfile.makedirs(os.path.join(tmp, schema.VOCAB_DIR))
    source = data_dir.rstrip("/")
    for name in (schema.METADATA_FILE, schema.STATS_FILE):
        if tf.io.gfile.exists(f"{source}/{name}"):
            tf.io.gfile.copy(f"{source}/{name}", os.path.join(tmp, name), overwrite=True)
    vocab = f"{source}/{schema.VOCAB_DIR}"
    for name in (tf.io.gfile.listdir(vocab) if tf.io.gfile.isdir(vocab) else []):
        if not tf.io.gfile.isdir(f"{vocab}/{name}"):
            tf.io.gfile.copy(f"{vocab}/{name}", os.path.join(tmp, schema.VOCAB_DIR, name), overwrite=True)
    if tf.io.gfile.exists(target):
        tf.io.gfile.rmtree(target)
    tf.io.gfile.rename(tmp, target)
    return target


def run_dataset_dir(model_dir: str) -> Optional[str]:
    """The run's copy of its dataset's contract (``snapshot_dataset``), or None for runs written before it."""
    path = os.path.join(run_model_dir(model_dir), RUN_DATASET_DIR)
    return path if tf.io.gfile.exists(os.path.join(path, schema.METADATA_FILE)) else None


def contract_dir(model_dir: str, data_dir: Optional[str] = None) -> str:
    """Where a run's metadata and vocabularies are read: ``data_dir`` when given (checked against the run's copy:
    the model's tables must match it), else the run's own copy, else the dataset recorded in config.json."""
    own = run_dataset_dir(model_dir)
    if data_dir:
        if own:
            _check_same_contract(reader.load_metadata(own), reader.load_metadata(data_dir), model_dir, data_dir)
        return data_dir
    if own:
        return own
    recorded = read_run_config(model_dir).get("data")
    if not recorded:
        raise ValueError(f"{model_dir}: the run records no dataset and holds no copy of one; pass --data DATASET_DIR")
    return recorded


def _check_same_contract(own: schema.DatasetMetadata, given: schema.DatasetMetadata, model_dir: str,
                         data_dir: str) -> None:
    fields = ("num_items", "num_queries", "num_tokens", "num_users", "num_feedback", "image_dim",
              "max_title_tokens", "max_query_tokens", "item_attributes", "user_attributes")
    differ = {f: (getattr(own, f), getattr(given, f)) for f in fields if getattr(own, f) != getattr(given, f)}
    if differ:
        raise ValueError(f"--data {data_dir!r} is not the dataset run {model_dir!r} was trained on: "
                         + ", ".join(f"{f} {a} (run) vs {b} (data)" for f, (a, b) in sorted(differ.items()))
                         + "; evaluate it on a dataset built with the run's vocabularies, or retrain")


def _snapshot_if_chief(data_dir: str, model_dir: str, progress=None) -> None:
    if tf.distribute.get_strategy().extended.should_checkpoint:
        _log(progress, f"run: dataset contract (metadata, stats, vocabularies) -> "
                       f"{snapshot_dataset(data_dir, model_dir)}")


def variables_batch(metadata: schema.DatasetMetadata, kind: str):
    """A small synthetic batch with the dataset's structure: calling a model on it creates its variables."""
    return next(iter(reader.synthetic_dataset(metadata, kind, 2, 1, max_history=4)))


def pretrain(data_dir: str, model_dir: str, preset: config_lib.Preset,
             progress: Optional[Callable[[str], None]] = None) -> Dict:
    """PSU pretraining on ``pretrain/`` examples; writes the content checkpoint fine-tuning restores."""
    metadata = reader.load_metadata(data_dir)
    item_table = reader.load_item_table(data_dir, metadata)
    query_table = reader.load_query_table(data_dir, metadata)
    _log(progress, f"pretrain: channels {builders.resolve_channels(preset.model, metadata)}, "
                   f"{metadata.num_items} items, {metadata.num_queries} queries")
    result = train.fit(
        lambda: builders.build_psu(preset.model, metadata, item_table, query_table),
        _dataset_fn(data_dir, schema.PRETRAIN_DIR, metadata, preset.pretrain, preset.build.max_history),
        preset.pretrain, model_dir, resolved_config=_resolved(preset, stage="pretrain", data=data_dir))
    model = result["model"]
    dirs = result["run_dirs"]
    path = os.path.join(dirs.model_dir, CONTENT_CHECKPOINT)
    if tf.distribute.get_strategy().extended.should_checkpoint:
        tf.train.Checkpoint(content=model.content).write(path)
    _snapshot_if_chief(data_dir, model_dir, progress)
    _log(progress, f"pretrain: content weights -> {path}")
    return {"history": result["history"], "content_checkpoint": path, "model": model}


def restore_content(model, init_from: str) -> str:
    """Restores a PSU run's content weights (embeddings, encoders, W_m) into ``model.content``."""
    path = os.path.join(train.resolve_run_dirs(init_from).model_dir, CONTENT_CHECKPOINT)
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(f"--init-from {init_from!r}: no PSU content checkpoint at {path}; run "
                                "`seminar-tf pretrain` into that directory first")
    tf.train.Checkpoint(content=model.content).read(path).assert_existing_objects_matched()
    return path


def _codebooks_source(codebooks: Optional[str], init_from: Optional[str]) -> str:
    """Where a PQ fine-tuning takes its codebooks: --codebooks (file or run), else the --init-from run's."""
    if codebooks:
        return quantization.resolve_path(codebooks)
    if init_from:
        path = os.path.join(run_model_dir(init_from), quantization.CODEBOOKS_FILE)
        if tf.io.gfile.exists(path):
            return path
    raise FileNotFoundError(
        "a pq_adc / pq_sdc GSU needs codebooks: run `seminar-tf fit-codebooks --model-dir RUN` on a trained run "
        f"(the PSU run or an exact CTR run) and pass --codebooks RUN (none found in --init-from {init_from!r})")


class RefreshCodes(tf.keras.callbacks.Callback):
    """Re-encodes the PQ code tables from the current content weights at the start of every epoch after the
    first (the codes must quantize the embeddings the model has while the content trains)."""

    def __init__(self, progress=None):
        super().__init__()
        self._progress = progress

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0:
            errors = quantization.refresh_codes(self.model)
            _log(self._progress, f"finetune: PQ codes re-encoded (reconstruction error {errors})")


def _freeze_if_pretrained(preset: config_lib.Preset, init_from: Optional[str], progress=None) -> config_lib.Preset:
    """``model.freeze_pretrained_content``: a PSU-initialised run keeps its restored content fixed (a copy of the
    preset with ``freeze_content`` set, so the run's config.json records what trained); a run from scratch, or one
    with LoRA adapters, is left as it is."""
    model_config = preset.model
    if not (model_config.freeze_pretrained_content and init_from) or model_config.lora_rank \
            or model_config.freeze_content:
        return preset
    _log(progress, "finetune: the restored PSU content stays fixed (model.freeze_pretrained_content)")
    return dataclasses.replace(preset, model=dataclasses.replace(model_config, freeze_content=True))


def _apply_lora(model, model_config: config_lib.ModelConfig, progress=None) -> list:
    """LoRA adapters on the content encoders of a built (called) model when ``model_config.lora_rank`` > 0:
    ``layers.em3.apply_lora(model.content, rank, alpha or None, targets or None)``, base weights frozen.

    Finetune calls this after the PSU restore; ``load_model`` rebuilds the same way (build → call → LoRA →
    weights), so a LoRA run's checkpoint reads back."""
    if not model_config.lora_rank:
        return []
    from seminar_tf.layers.em3 import apply_lora

    model_config.validate()
    adapters = apply_lora(model.content, model_config.lora_rank, model_config.lora_alpha or None,
                          list(model_config.lora_targets) or None)
    if not adapters:
        raise ValueError(f"model.lora_targets {list(model_config.lora_targets)} hold no Dense layer to adapt")
    where = ", ".join(model_config.lora_targets) or "all encoders"
    _log(progress, f"finetune: LoRA rank {model_config.lora_rank} on {len(adapters)} Dense layers of the content "
                   f"encoders ({where}); their base weights are frozen")
    return adapters


def finetune(data_dir: str, model_dir: str, preset: config_lib.Preset, init_from: Optional[str] = None,
             progress: Optional[Callable[[str], None]] = None, codebooks: Optional[str] = None) -> Dict:
    """SEMINAR CTR/PSR fine-tuning on ``ctr/`` examples, optionally restoring a PSU run's content weights.

    With ``preset.model.gsu`` = pq_adc / pq_sdc the codebooks come from ``codebooks`` (an .npz or a run
    directory holding codebooks.npz) or else from the ``init_from`` run; the model takes their S and C. The
    vocabulary is re-encoded with them from the model's content after the restore, at every epoch start while
    the content trains, and after training (then the best weights are saved again and the run gets its own
    ``codebooks.npz``), so the codes always quantize the embeddings the model holds.

    EM3 options come from ``preset.model`` (``builders.build_model``); with ``lora_rank`` > 0 LoRA adapters go
    on the content encoders after the PSU restore and only they train there (``_apply_lora``).
    """
    preset.model.validate()  # bad or contradictory options fail before any data is read
    preset = _freeze_if_pretrained(preset, init_from, progress)
    metadata = reader.load_metadata(data_dir)
    item_table = reader.load_item_table(data_dir, metadata)
    query_table = reader.load_query_table(data_dir, metadata)
    make_dataset = _dataset_fn(data_dir, schema.CTR_DIR, metadata, preset.finetune, preset.build.max_history)
    pq_codebooks, source, callbacks = None, None, []
    if preset.model.gsu in PQ_MODES and preset.model.use_history:
        source = _codebooks_source(codebooks, init_from)
        pq_codebooks = quantization.load_codebooks(source)
        preset.model = dataclasses.replace(preset.model, pq_subspaces=pq_codebooks.num_subspaces,
                                           pq_centroids=pq_codebooks.num_centroids)
        _log(progress, f"finetune: {preset.model.gsu} GSU with {pq_codebooks.kind} codebooks from {source} "
                       f"(S={pq_codebooks.num_subspaces}, C={pq_codebooks.num_centroids})")
        if not preset.model.freeze_content:
            callbacks.append(RefreshCodes(progress))

    def build_model():
        model = builders.build_model(preset.model, metadata, item_table, query_table)
        if pq_codebooks is not None:
            quantization.apply_codebooks(model, pq_codebooks)
        model(next(iter(make_dataset("valid", None))))  # create the variables, then restore into them
        if getattr(model, "item_statistics", None) is not None:
            model.set_item_statistics(item_statistics_table(data_dir, metadata, model.item_statistics_folds,
                                                            preset.model.item_statistics_columns))
        if init_from:
            _log(progress, f"finetune: restored PSU content from {restore_content(model, init_from)}")
        _apply_lora(model, preset.model, progress)
        if pq_codebooks is not None:
            errors = quantization.refresh_codes(model)
            _log(progress, f"finetune: vocabulary coded from the model's content (reconstruction error {errors})")
        return model

    result = train.fit(build_model, make_dataset, preset.finetune, model_dir, extra_callbacks=callbacks,
                       resolved_config=_resolved(preset, stage="finetune", data=data_dir, init_from=init_from,
                                                 codebooks=source))
    model = result["model"]
    _snapshot_if_chief(data_dir, model_dir, progress)
    if pq_codebooks is not None:
        final = quantization.model_codebooks(model, kind=pq_codebooks.kind, source=source)
        if tf.distribute.get_strategy().extended.should_checkpoint:
            if not preset.model.freeze_content:
                model.save_weights(result["best_weights"])  # the best weights with codes of their own content
            path = quantization.save_codebooks(final, os.path.join(result["run_dirs"].model_dir,
                                                                   quantization.CODEBOOKS_FILE))
            _log(progress, f"finetune: final codes of the run's embeddings -> {path} "
                           f"(reconstruction error {final.reconstruction_error})")
    return {"history": result["history"], "model": model}


def load_model(model_dir: str, data_dir: Optional[str] = None, gsu: Optional[str] = None,
               codebooks: Optional[str] = None, pq_rerank: Optional[int] = None):
    """Rebuilds a fine-tuned run's model from its config.json, its copy of the dataset's metadata and its best
    weights (the item and query tables are weights too): no dataset is read. Returns (model, preset, data_dir),
    ``data_dir`` = the given one, else the dataset recorded in config.json (where ``evaluate`` reads examples).

    ``gsu`` overrides the run's GSU mode (e.g. evaluate an exact-trained run with pq_adc); ``codebooks`` (an
    .npz or a run directory) replaces the PQ codebooks and codes saved with the weights; ``pq_rerank``
    overrides how many K of PQ candidates are re-scored exactly.
    """
    raw = read_run_config(model_dir)
    preset = preset_of_run(model_dir)
    metadata = reader.load_metadata(contract_dir(model_dir, data_dir))
    data_dir = data_dir or raw.get("data")
    mode = gsu or preset.model.gsu
    # Built (called once) in exact mode: the PQ variables exist in every mode and get their values from the weights.
    model = builders.build_model(dataclasses.replace(preset.model, gsu="exact"), metadata)
    model(variables_batch(metadata, schema.CTR_DIR))
    _apply_lora(model, preset.model)  # as finetune placed them: the adapters' weights are in the checkpoint
    train.load_weights(model, model_dir)
    if codebooks:
        loaded = quantization.load_codebooks(codebooks)
        pq = getattr(model, "pq", None)
        if pq is not None and (pq.num_subspaces, pq.num_centroids) != (loaded.num_subspaces, loaded.num_centroids):
            model.resize_pq(loaded.num_subspaces, loaded.num_centroids)
            preset.model = dataclasses.replace(preset.model, pq_subspaces=loaded.num_subspaces,
                                               pq_centroids=loaded.num_centroids)
        quantization.apply_codebooks(model, loaded)
    rerank = pq_rerank or preset.model.pq_rerank
    if mode != "exact" or rerank != getattr(model, "pq_rerank", 1):
        model.set_gsu_mode(mode, pq_rerank=rerank)
    preset.model = dataclasses.replace(preset.model, gsu=mode, pq_rerank=rerank)
    return model, preset, data_dir


def load_content(model_dir: str, data_dir: Optional[str] = None):
    """The content encoder of a run with its final weights: a finetune run's best weights or a pretrain run's
    PSU content checkpoint (tables included; no dataset is read). Returns (content, preset, data_dir, stage)."""
    raw = read_run_config(model_dir)
    if raw.get("stage") != "pretrain":
        model, preset, data_dir = load_model(model_dir, data_dir)
        return model.content, preset, data_dir, raw.get("stage", "finetune")
    preset = preset_of_run(model_dir)
    metadata = reader.load_metadata(contract_dir(model_dir, data_dir))
    data_dir = data_dir or raw.get("data")
    content = builders.build_content_encoder(preset.model, metadata)
    content(tf.zeros([1, 1], tf.int64), tf.zeros([1, 1], tf.int64))  # create the variables
    path = os.path.join(run_model_dir(model_dir), CONTENT_CHECKPOINT)
    tf.train.Checkpoint(content=content).read(path).assert_existing_objects_matched()
    return content, preset, data_dir, "pretrain"


def _train_item_counts(data_dir: str, metadata, folds: int = 1):
    """Per user fold (user_index % folds) and item: (clicks, impressions) of the ctr/train split, [folds, items]."""
    clicks = np.zeros([folds, metadata.num_items])
    shown = np.zeros([folds, metadata.num_items])
    for batch in reader.make_dataset(data_dir, schema.CTR_DIR, "train", 1024, metadata=metadata, max_history=1):
        items = batch[schema.CTX_TARGET_ITEM].numpy()
        fold = batch[schema.CTX_USER_INDEX].numpy() % folds
        np.add.at(clicks, (fold, items), batch[schema.CTX_LABEL].numpy())
        np.add.at(shown, (fold, items), 1)
    return clicks, shown


def _smoothed_rate(clicks, shown, prior: float, prior_weight: float = 5.0):
    """Click rate smoothed toward ``prior`` with ``prior_weight`` pseudo-impressions."""
    return (clicks + prior_weight * prior) / (shown + prior_weight)


def item_statistics_table(data_dir: str, metadata, folds: int,
                          columns: Sequence[str] = config_lib.ITEM_STATISTICS_COLUMNS) -> np.ndarray:
    """The item-statistics table [folds + 1, num_items, len(columns)] of ``SeminarModel.set_item_statistics``: per
    item the train-split click log-odds ("log_odds"), smoothed toward the global rate as ``popularity_scores``
    smooths it, and log1p(impressions)/5 ("log_count"), in the order of ``columns``. Row f < folds counts only the
    rows whose user is not in fold f (user_index % folds), so a training row's feature never holds its own label;
    row ``folds`` counts every row (evaluation and serving)."""
    clicks, shown = _train_item_counts(data_dir, metadata, folds)
    total_clicks, total_shown = clicks.sum(0), shown.sum(0)
    clicks = np.concatenate([total_clicks - clicks, total_clicks[None]])  # leave each fold out; then every fold
    shown = np.concatenate([total_shown - shown, total_shown[None]])
    rate = _smoothed_rate(clicks, shown, total_clicks.sum() / max(total_shown.sum(), 1))
    values = {"log_odds": np.log(rate / (1 - rate)), "log_count": np.log1p(shown) / 5.0}
    return np.stack([values[c] for c in columns], axis=-1).astype(np.float32)


def popularity_scores(data_dir: str, metadata) -> np.ndarray:
    """Baseline: the train-split click-through rate of each target item (smoothed toward the global rate)."""
    clicks, shown = (counts[0] for counts in _train_item_counts(data_dir, metadata))
    return _smoothed_rate(clicks, shown, clicks.sum() / max(shown.sum(), 1))


def evaluate(model_dir: str, data_dir: Optional[str] = None, out_dir: Optional[str] = None,
             num_negatives: int = 99, batch_size: int = 64,
             progress: Optional[Callable[[str], None]] = None, gsu: Optional[str] = None,
             codebooks: Optional[str] = None, pq_rerank: Optional[int] = None, split: str = "test") -> Dict:
    """CTR metrics (AUC, GAUC, logloss) on ctr/test and the leave-last-out ranking protocol on pretrain/test;
    ``split="valid"`` reads the valid split instead (for choosing hyper-parameters without reading test).

    Ranking: each pretrain/test example's true next pair against ``num_negatives`` sampled items the user
    never touched, scored by the CTR model as targets (HIT/NDCG@1,5,10,50, MRR). A popularity baseline is
    reported beside the model. ``gsu`` / ``codebooks`` / ``pq_rerank``: as in ``load_model`` (e.g. evaluate an
    exact-trained run with a pq_adc GSU).
    """
    if split not in ("valid", "test"):
        raise ValueError(f"evaluate: split {split!r}: choose 'valid' or 'test'")
    model, preset, data_dir = load_model(model_dir, data_dir, gsu=gsu, codebooks=codebooks, pq_rerank=pq_rerank)
    if not data_dir or not tf.io.gfile.exists(f"{data_dir.rstrip('/')}/{schema.METADATA_FILE}"):
        raise FileNotFoundError(f"evaluate {model_dir}: the dataset {data_dir!r} it was trained on is not there; "
                                "pass --data DATASET_DIR (a dataset built with the run's vocabularies)")
    metadata = reader.load_metadata(data_dir)
    max_history = preset.build.max_history

    def ctr_data():
        return reader.make_dataset(data_dir, schema.CTR_DIR, split, batch_size, metadata=metadata,
                                   max_history=max_history)

    _log(progress, f"evaluate: CTR {split} split")
    predict = tf.function(lambda b: model(b)["probability"])
    ctr = evaluate_lib.evaluate_ctr(lambda b: predict(b).numpy(), ctr_data())
    popularity = popularity_scores(data_dir, metadata)
    ctr_popularity = evaluate_lib.evaluate_ctr(lambda b: popularity[b[schema.CTX_TARGET_ITEM].numpy()], ctr_data())

    _log(progress, f"evaluate: ranking protocol (1 positive vs {num_negatives} negatives)")
    score_candidates = tf.function(lambda b, q, i: model.score_candidates(b, q, i))

    def rank_fn(batch, candidates):
        queries = np.repeat(batch[schema.CTX_TARGET_QUERY].numpy()[:, None], candidates.shape[1], axis=1)
        return score_candidates(batch, tf.constant(queries), tf.constant(candidates, tf.int64)).numpy()

    ranking_data = reader.make_dataset(data_dir, schema.PRETRAIN_DIR, split, 8, metadata=metadata,
                                       max_history=max_history)
    ranking = evaluate_lib.evaluate_ranking(rank_fn, ranking_data, metadata.num_items, num_negatives=num_negatives)
    ranking_popularity = evaluate_lib.evaluate_ranking(
        lambda b, c: popularity[c], reader.make_dataset(data_dir, schema.PRETRAIN_DIR, split, 8, metadata=metadata,
                                                        max_history=max_history),
        metadata.num_items, num_negatives=num_negatives)
    metrics = {"model": {**ctr, **ranking}, "popularity": {**ctr_popularity, **ranking_popularity},
               "run": model_dir, "data": data_dir, "gsu": preset.model.gsu, "split": split}
    out_dir = out_dir or os.path.join(train.resolve_run_dirs(model_dir).model_dir, EVAL_DIR)
    architecture = ARCHITECTURE_TITLES.get(preset.model.architecture, preset.model.architecture)
    on = "" if split == "test" else f" on the {split} split"  # a valid-split report never replaces the test one
    evaluate_lib.write_report(metrics, out_dir, title=f"{architecture} evaluation ({preset.name} preset){on}")
    _log(progress, f"evaluate: report -> {out_dir}")
    return metrics
