"""`seminar-tf report`: train and evaluate the comparison grid, write REPORT.md, report.json and PNG plots.

A grid cell is one row (SEMINAR, an ablation or a baseline) at one seed: a PSU pretraining (shared between
the rows that pretrain with the same config at the same seed) and a CTR fine-tuning through
``seminar_tf.experiment``, then ``experiment.evaluate`` (AUC, GAUC, logloss on ctr/test; HIT/NDCG@K and MRR
of the leave-last-out protocol) plus one more pass over ctr/test for per-sample scores: the cold-id subset
(samples whose history holds an item id never seen as a target in ctr/train) and AUC per history-length
bucket. Rows change the preset's ``ModelConfig`` through ``dataclasses.replace`` only.

Every finished cell writes ``OUT/runs/<row>_s<seed>/cell.json``; ``--resume`` reuses those (long grids get
killed), and an unfinished training resumes from its last epoch (``train.fit``'s BackupAndRestore).

This module runs and measures the grid; the rows, tables and checks are ``seminar_tf.report_tables`` and
REPORT.md / the figures ``seminar_tf.report_render`` (both re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from seminar_tf import schema
from seminar_tf.bench import stamp
from seminar_tf.report_render import markdown, plot_bars, plot_learning_curves, plot_recall  # noqa: F401
from seminar_tf.report_tables import (CTR_METRICS, DEFAULT_ROWS, MIN_SUBSET_SAMPLES, MUST_BEAT,  # noqa: F401
                                      RANKING_METRICS, ROWS, TABLE_METRICS, Row, aggregate, build_tables, checks,
                                      format_mean_std)

COMMAND = "seminar-tf report"
REPORT_FILE = "REPORT.md"
JSON_FILE = "report.json"
CELL_FILE = "cell.json"
PSU_FILE = "psu.json"
TRAINED_FILE = "trained.json"
RUNS_DIR = "runs"


def _progress_fn(progress):
    return progress or (lambda message: None)


# ---------------------------------------------------------------------------------------------- configs
def _replace_model(model_config, changes, row_name: str):
    """``dataclasses.replace`` of a ModelConfig; a field the config lacks is an error naming it."""
    from seminar_tf.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = sorted(set(changes) - known)
    if missing:
        raise ValueError(f"row {row_name!r} needs ModelConfig fields {missing}, which this version of "
                         "seminar_tf.config.ModelConfig does not have; drop the row from --models")
    return dataclasses.replace(model_config, **changes)


def _channels_without(preset, metadata, drop: Sequence[str]) -> Tuple[str, ...]:
    from seminar_tf.models import builders

    channels = tuple(c for c in builders.resolve_channels(preset.model, metadata) if c not in drop)
    if not channels:
        raise ValueError(f"removing channels {list(drop)} leaves none")
    return channels


def stage_presets(base, row: Row, seed: int, metadata):
    """(pretrain preset, finetune preset) of a row at a seed: copies of ``base`` changed by the row."""
    def copy():
        return dataclasses.replace(base, model=dataclasses.replace(base.model, seed=seed),
                                   pretrain=dataclasses.replace(base.pretrain, seed=seed),
                                   finetune=dataclasses.replace(base.finetune, seed=seed))

    common = {}
    if row.drop_channels:
        common["channels"] = _channels_without(base, metadata, row.drop_channels)
    pre, fine = copy(), copy()
    pre.model = _replace_model(pre.model, {**common, **dict(row.pretrain_changes)}, row.name)
    fine.model = _replace_model(fine.model, {**common, **dict(row.finetune_changes),
                                             "architecture": row.architecture}, row.name)
    if row.finetune_epochs is not None:
        fine.finetune = dataclasses.replace(fine.finetune, epochs=row.finetune_epochs)
    return pre, fine


def psu_key(row: Row) -> str:
    """Name of the PSU a row restores: rows with the same pretraining changes share one per seed."""
    parts = [f"{k}={v}" for k, v in row.pretrain_changes] + [f"no_{c}" for c in row.drop_channels]
    return "psu" + ("_" + "_".join(p.replace(".", "p").replace("=", "") for p in parts) if parts else "")


# ---------------------------------------------------------------------------------------------- cold ids, buckets
def seen_targets(data_dir: str, metadata=None) -> np.ndarray:
    """Sorted unique item indices that occur as a target in ctr/train."""
    from seminar_tf.data import reader

    metadata = metadata or reader.load_metadata(data_dir)
    found = [batch[schema.CTX_TARGET_ITEM].numpy().reshape(-1)
             for batch in reader.make_dataset(data_dir, schema.CTR_DIR, "train", 1024, metadata=metadata,
                                              max_history=1)]
    return np.unique(np.concatenate(found)) if found else np.zeros([0], np.int64)


def cold_history(history_items, history_lengths, seen, first_real: int = len(schema.RESERVED)):
    """Which samples' histories hold an item id never seen as a training target.

    history_items [n, L] item indices (oldest first, padded after ``history_lengths``), history_lengths [n],
    seen: item indices seen as ctr/train targets. Padding and reserved rows (< ``first_real``: PAD, OOV) are
    not ids. Returns (has_cold bool [n], cold_share float [n] = cold steps / real steps, 0 for no history).
    """
    items = np.asarray(history_items, dtype=np.int64)
    lengths = np.asarray(history_lengths, dtype=np.int64).reshape(-1)
    if items.ndim != 2 or items.shape[0] != lengths.shape[0]:
        raise ValueError(f"history_items must be [n, L] with n = {lengths.shape[0]}, got shape {items.shape}")
    valid = (np.arange(items.shape[1])[None, :] < lengths[:, None]) & (items >= first_real)
    cold = valid & ~np.isin(items, np.asarray(seen, dtype=np.int64))
    counts = valid.sum(axis=1)
    share = np.where(counts > 0, cold.sum(axis=1) / np.maximum(counts, 1), 0.0)
    return cold.any(axis=1), share


def ctr_test_targets(data_dir: str, metadata=None) -> Dict[str, np.ndarray]:
    """Target item index and label of every ctr/test sample, in the order ``_per_sample_scores`` reads them."""
    from seminar_tf.data import reader

    metadata = metadata or reader.load_metadata(data_dir)
    items, labels = [], []
    for batch in reader.make_dataset(data_dir, schema.CTR_DIR, "test", 1024, metadata=metadata, max_history=1):
        items.append(batch[schema.CTX_TARGET_ITEM].numpy().reshape(-1))
        labels.append(batch[schema.CTX_LABEL].numpy().reshape(-1))
    if not items:
        return {"item": np.zeros([0], np.int64), "label": np.zeros([0])}
    return {"item": np.concatenate(items), "label": np.concatenate(labels)}


def cold_targets(target_items, seen, first_real: int = len(schema.RESERVED)) -> np.ndarray:
    """bool [n]: the sample's target item never occurs as a ctr/train target (reserved rows are not ids)."""
    items = np.asarray(target_items, dtype=np.int64).reshape(-1)
    return (items >= first_real) & ~np.isin(items, np.asarray(seen, dtype=np.int64))


def length_bucket_edges(lengths: np.ndarray, buckets: int = 4) -> List[int]:
    """Quantile edges [e_0 = min, ..., e_B = max + 1) of history lengths, duplicates removed."""
    lengths = np.asarray(lengths)
    qs = np.quantile(lengths, np.linspace(0, 1, buckets + 1)[1:-1]) if len(lengths) else []
    edges = sorted({int(lengths.min()) if len(lengths) else 0, *[int(math.ceil(q)) for q in qs],
                    int(lengths.max()) + 1 if len(lengths) else 1})
    return edges


def subset_metrics(labels, probabilities, users, mask) -> Dict[str, float]:
    """AUC, GAUC, logloss and size of the samples selected by ``mask``."""
    from seminar_tf import evaluate as evaluate_lib

    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    out = {"num_samples": n, "positive_rate": float(np.mean(labels[mask])) if n else float("nan")}
    if n == 0:
        return {**out, "auc": float("nan"), "gauc": float("nan"), "logloss": float("nan")}
    out["auc"] = evaluate_lib.auc(labels[mask], probabilities[mask])
    out["gauc"] = evaluate_lib.gauc(users[mask], labels[mask], probabilities[mask])
    out["logloss"] = evaluate_lib.logloss(labels[mask], probabilities[mask])
    return out


def _per_sample_scores(run_dir, data_dir, seen, gsu=None, codebooks=None) -> Dict[str, np.ndarray]:
    """One pass over ctr/test: probability, label, user, history length and cold flags of every sample."""
    import tensorflow as tf

    from seminar_tf import experiment
    from seminar_tf.data import reader

    model, preset, data_dir = experiment.load_model(run_dir, data_dir, gsu=gsu, codebooks=codebooks)
    metadata = reader.load_metadata(data_dir)
    predict = tf.function(lambda b: model(b)["probability"])
    parts = {k: [] for k in ("probability", "label", "user", "length", "has_cold", "cold_share")}
    for batch in reader.make_dataset(data_dir, schema.CTR_DIR, "test", 128, metadata=metadata,
                                     max_history=preset.build.max_history):
        lengths = batch[schema.CTX_HISTORY_LENGTH].numpy().reshape(-1)
        has_cold, share = cold_history(batch[schema.SEQ_HISTORY_ITEM].numpy(), lengths, seen)
        parts["probability"].append(np.asarray(predict(batch)).reshape(-1))
        parts["label"].append(batch[schema.CTX_LABEL].numpy().reshape(-1))
        parts["user"].append(batch[schema.CTX_USER_ID].numpy().reshape(-1))
        parts["length"].append(lengths)
        parts["has_cold"].append(has_cold)
        parts["cold_share"].append(share)
    return {k: np.concatenate(v) for k, v in parts.items()}


def sample_groups(scores: Dict[str, np.ndarray], edges: Sequence[int], share_median: float) -> Dict[str, np.ndarray]:
    """Masks of the subsets reported per model: cold / warm, high / low cold share, cold / warm target (when
    ``scores`` has ``cold_target``), history-length buckets."""
    groups = {"cold": scores["has_cold"], "warm": ~scores["has_cold"],
              "cold_share_high": scores["cold_share"] > share_median,
              "cold_share_low": scores["cold_share"] <= share_median}
    if "cold_target" in scores:
        groups.update(cold_target=scores["cold_target"], warm_target=~scores["cold_target"])
    for lo, hi in zip(edges[:-1], edges[1:]):
        groups[f"length[{lo},{hi})"] = (scores["length"] >= lo) & (scores["length"] < hi)
    return groups


# ---------------------------------------------------------------------------------------------- grid
@dataclasses.dataclass
class GridConfig:
    """What ``seminar-tf report`` trains and evaluates."""

    data_dir: str
    out_dir: str
    config: str = "demo"
    overrides: Tuple[str, ...] = ()  # --set SECTION.FIELD=VALUE texts applied to the config
    seeds: int = 2
    models: Tuple[str, ...] = DEFAULT_ROWS
    epochs: Optional[int] = None
    pretrain_epochs: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    num_negatives: int = 99
    resume: bool = False
    pq_subspaces: Optional[int] = None  # default: the preset's ModelConfig.pq_subspaces
    pq_centroids: Optional[int] = None
    recall_ks: Tuple[int, ...] = (1, 5, 10, 20, 50, 100, 200)
    recall_targets: int = 32
    length_buckets: int = 4
    command: str = ""
    note: str = ""  # free text printed under the command (e.g. how the dataset was built)
    runs_dir: Optional[str] = None  # where the cells' run directories go (default: OUT/runs)
    report_only: bool = False  # train nothing: report the finished cells, list the others as not run
    pq_recall: bool = True  # the PQ top-K recall section (on the seminar run of seed 0)

    def runs(self) -> str:
        return self.runs_dir or os.path.join(self.out_dir, RUNS_DIR)

    def validate(self) -> None:
        unknown = [m for m in self.models if m not in ROWS]
        if unknown:
            raise ValueError(f"--models: unknown rows {unknown}; choose from {sorted(ROWS)}")
        if not self.models:
            raise ValueError("--models: empty list; name at least one row, e.g. seminar,din")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        for name in self.models:
            source = ROWS[name].pq_eval_of
            if source and source not in self.models:
                raise ValueError(f"--models: row {name!r} evaluates the {source!r} run; add {source!r} to --models")


def _load_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_finished_cell(runs_dir: str, cell: str) -> Optional[dict]:
    """A finished grid cell (its ``cell.json``) with its per-sample test scores under ``"_scores"`` (probability,
    label, user, ...); None when the cell has not finished."""
    done = _load_json(os.path.join(runs_dir, cell, CELL_FILE))
    if done is None:
        return None
    scores = dict(np.load(os.path.join(runs_dir, cell, "scores.npz")))
    scores["user"] = np.asarray(done["users"], dtype=object)
    done["_scores"] = scores
    return done


def _write_json(path, payload):
    from seminar_tf.evaluate import _json_ready

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_ready(payload), f, indent=2)
    os.replace(tmp, path)  # a killed run never leaves a half-written marker


def _base_preset(grid: GridConfig):
    from seminar_tf import config as config_lib

    preset = config_lib.load_config(grid.config, grid.overrides)
    if grid.epochs is not None:
        preset.finetune = dataclasses.replace(preset.finetune, epochs=grid.epochs)
    if grid.pretrain_epochs is not None:
        preset.pretrain = dataclasses.replace(preset.pretrain, epochs=grid.pretrain_epochs)
    if grid.steps_per_epoch is not None:
        preset.pretrain = dataclasses.replace(preset.pretrain, steps_per_epoch=grid.steps_per_epoch)
        preset.finetune = dataclasses.replace(preset.finetune, steps_per_epoch=grid.steps_per_epoch)
    return preset


def _history(result_history: dict) -> Dict[str, List[float]]:
    return {k: [float(x) for x in v] for k, v in result_history.items()}


def _pretrain(grid, base, row, seed, metadata, progress) -> Tuple[str, dict]:
    from seminar_tf import experiment

    psu_dir = os.path.join(grid.runs(), f"{psu_key(row)}_s{seed}")
    marker = os.path.join(psu_dir, PSU_FILE)
    done = _load_json(marker)
    if done is not None:
        return psu_dir, done
    pre, _ = stage_presets(base, row, seed, metadata)
    progress(f"report: pretrain {os.path.basename(psu_dir)}")
    started = time.time()
    result = experiment.pretrain(grid.data_dir, psu_dir, pre, progress=progress)
    done = {"history": _history(result["history"]), "seconds": time.time() - started}
    _write_json(marker, done)
    return psu_dir, done


def _evaluate_run(grid, run_dir, cell_dir, seen, progress, gsu=None, codebooks=None) -> dict:
    from seminar_tf import experiment

    metrics = experiment.evaluate(run_dir, grid.data_dir, os.path.join(cell_dir, "eval"),
                                  num_negatives=grid.num_negatives, progress=progress, gsu=gsu,
                                  codebooks=codebooks)
    scores = _per_sample_scores(run_dir, grid.data_dir, seen, gsu=gsu, codebooks=codebooks)
    return {"metrics": metrics["model"], "popularity": metrics["popularity"], "scores": scores}


def run_cell(grid: GridConfig, base, row: Row, seed: int, metadata, seen, progress) -> dict:
    """Trains (or reuses) and evaluates one cell; writes and returns its cell.json payload."""
    from seminar_tf import experiment, pq_runs, quantization

    cell_dir = os.path.join(grid.runs(), f"{row.name}_s{seed}")
    started = time.time()
    pretrain_seconds, history, psu_dir, extra = 0.0, {}, None, {}
    if row.pq_eval_of:
        source = os.path.join(grid.runs(), f"{row.pq_eval_of}_s{seed}")
        if _load_json(os.path.join(source, CELL_FILE)) is None:
            raise RuntimeError(f"the {row.pq_eval_of!r} cell of seed {seed} did not finish")
        os.makedirs(cell_dir, exist_ok=True)
        subspaces = grid.pq_subspaces or base.model.pq_subspaces
        centroids = grid.pq_centroids or base.model.pq_centroids
        codebooks = os.path.join(cell_dir, quantization.CODEBOOKS_FILE)
        progress(f"report: fit-codebooks on {source} (S={subspaces}, C={centroids})")
        summary = pq_runs.fit_run(source, quantization.CodebookConfig(subspaces, centroids, seed=seed),
                                       out=codebooks)
        extra = {"codebooks": codebooks, "reconstruction_error": summary["reconstruction_error"],
                 "evaluated_run": source}
        evaluation = _evaluate_run(grid, source, cell_dir, seen, progress, gsu="pq_adc", codebooks=codebooks)
    else:
        _, fine = stage_presets(base, row, seed, metadata)
        init_from = None
        if row.pretrained:
            psu_dir, psu = _pretrain(grid, base, row, seed, metadata, progress)
            init_from = psu_dir
            pretrain_seconds = psu.get("seconds", 0.0)
        trained_marker = os.path.join(cell_dir, TRAINED_FILE)
        trained = _load_json(trained_marker) if grid.resume else None
        if trained is None:
            progress(f"report: finetune {row.name} seed {seed} ({row.architecture}, init from {init_from})")
            train_started = time.time()
            result = experiment.finetune(grid.data_dir, cell_dir, fine, init_from=init_from, progress=progress)
            trained = {"history": _history(result["history"]), "seconds": time.time() - train_started,
                       "epochs": len(next(iter(result["history"].values()), []))}
            del result
            _write_json(trained_marker, trained)  # an evaluation failure after this does not retrain
        history = trained["history"]
        extra["finetune_seconds"] = trained["seconds"]
        if trained.get("epochs"):  # fine-tuning wall time (model build and validation included) per epoch run
            extra["epoch_seconds"] = trained["seconds"] / trained["epochs"]
        evaluation = _evaluate_run(grid, cell_dir, cell_dir, seen, progress)
    scores = evaluation.pop("scores")
    np.savez_compressed(os.path.join(cell_dir, "scores.npz"), **{k: v for k, v in scores.items() if k != "user"})
    payload = {"row": row.name, "seed": seed, "psu": psu_dir, "history": history, **evaluation, **extra,
               "pretrain_seconds": pretrain_seconds, "seconds": time.time() - started}
    payload["_scores"] = scores
    return payload


def user_strings(users) -> List[str]:
    """A cell's per-sample user ids (bytes from the reader, str once reloaded from cell.json) as str."""
    return [u.decode() if isinstance(u, bytes) else str(u) for u in users]


def paired_differences(payloads: Dict[str, dict], rows: Sequence[str], seeds: int,
                       reference: str = "seminar", draws: int = 2000) -> Dict[str, dict]:
    """Test AUC of ``reference`` minus each other row's (means over their finished seeds), with the paired
    bootstrap over users of ``evaluate.paired_auc_difference``; {} without a finished reference cell."""
    from seminar_tf.evaluate import paired_auc_difference

    def finished(row):
        return [payloads[f"{row}_s{s}"]["_scores"] for s in range(seeds) if f"{row}_s{s}" in payloads]

    mine = finished(reference)
    if not mine:
        return {}
    users = np.asarray(user_strings(mine[0]["user"]))
    out = {}
    for row in rows:
        other = finished(row) if row != reference else []
        if other:
            out[row] = paired_auc_difference(users, mine[0]["label"], [c["probability"] for c in mine],
                                             [c["probability"] for c in other], draws=draws)
    return out


def _cell_summary(payload: dict, edges, share_median) -> dict:
    scores = payload.pop("_scores")
    groups = sample_groups(scores, edges, share_median)
    payload["subsets"] = {name: subset_metrics(scores["label"], scores["probability"], scores["user"], mask)
                          for name, mask in groups.items()}
    return payload


def error_summary(error: BaseException, limit: int = 400) -> str:
    """``Type: message`` of an exception, cut to its innermost error line (TF errors carry whole traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    inner = [line for line in lines if "Error:" in line or "Error(" in line]
    text = inner[-1] if inner else (lines[0] if lines else "")
    text = f"{type(error).__name__}: {text}" if not text.startswith(type(error).__name__) else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------- plots
def pq_recall(run_dir: str, grid: GridConfig, base, progress) -> dict:
    """Top-K recall of PQ vs exact GSU on a run's embeddings, trained vs random codebooks (bench pq's code)."""
    from seminar_tf.bench import pq as pq_bench

    length = base.build.max_history
    ks = tuple(k for k in grid.recall_ks if k <= length)
    config = pq_bench.PQBenchConfig(
        variants=((grid.pq_subspaces or base.model.pq_subspaces, grid.pq_centroids or base.model.pq_centroids),),
        recall_lengths=(length,), recall_ks=ks, recall_targets=grid.recall_targets, rerank=4, seed=0)
    result = pq_bench._recall({"ctr": run_dir}, config, progress)
    return {"L": length, "ks": list(ks), "rows": result["rows"], "targets": result["targets"],
            "channels": result["channels"]}


# ---------------------------------------------------------------------------------------------- report
def _config_summary(grid: GridConfig, base, cells: Dict[str, List[dict]]) -> str:
    """The sizes the cells were trained with: from a finished cell's config.json (flags of an earlier
    invocation included), else from this invocation's config."""
    from seminar_tf import experiment

    fine = pre = base
    for finished in cells.values():
        for cell in finished:
            run_dir = os.path.join(grid.runs(), f"{cell['row']}_s{cell['seed']}")
            if ROWS[cell["row"]].pq_eval_of is None and os.path.exists(os.path.join(run_dir, "config.json")):
                fine = experiment.preset_of_run(run_dir)
                if cell.get("psu") and os.path.exists(os.path.join(cell["psu"], "config.json")):
                    pre = experiment.preset_of_run(cell["psu"])
                break
        if fine is not base:
            break
    return (f"`{grid.config}` → preset {fine.name}: world {fine.world.num_users} users / "
            f"{fine.world.num_items} items "
            f"(mean history {fine.world.mean_history}), max_history {fine.build.max_history}, d={fine.model.dim}, "
            f"K={fine.model.top_k}, PSU {pre.pretrain.epochs} epoch(s) × {pre.pretrain.steps_per_epoch or 'all'} "
            f"steps, fine-tuning {fine.finetune.epochs} epoch(s) × {fine.finetune.steps_per_epoch or 'all'} steps "
            f"(early stopping on {fine.finetune.monitor}, patience {fine.finetune.early_stopping_patience}), "
            f"batch {fine.finetune.batch_size}, learning rate {fine.finetune.learning_rate}.")


def _grid_span(runs_dir: str) -> str:
    """First run's config.json written → last cell.json written (mtimes), across every invocation."""
    starts, ends = [], []
    for entry in os.scandir(runs_dir):
        if entry.is_dir():
            for name, bucket in (("config.json", starts), (CELL_FILE, ends)):
                path = os.path.join(entry.path, name)
                if os.path.exists(path):
                    bucket.append(os.path.getmtime(path))
    if not starts or not ends:
        return "n/a"
    first, last = min(starts), max(ends)
    fmt = lambda t: time.strftime("%H:%M", time.gmtime(t))  # noqa: E731
    return f"{(last - first) / 60:.0f} min, {fmt(first)}–{fmt(last)} UTC"


def _config_text(config: str) -> str:
    """The text of a YAML/JSON --config file ('' for a preset name)."""
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            return f.read()
    return ""


def run(grid: GridConfig, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Trains/evaluates the grid (row-major, seeds inner) and writes REPORT.md, report.json and the PNGs."""
    from seminar_tf.data import reader

    grid.validate()
    progress = _progress_fn(progress)
    started = time.time()
    commit = stamp.commit()  # before this run writes anything (its plots may land in a tracked --out)
    runs_dir = grid.runs()
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(grid.out_dir, exist_ok=True)
    if not grid.resume and not grid.report_only and any(os.scandir(runs_dir)):
        raise ValueError(f"{runs_dir!r} already holds grid runs; pass --resume to reuse the "
                         "finished cells (and continue unfinished ones) or choose another --out")
    commands_path = os.path.join(runs_dir, "commands.txt")
    if not grid.report_only:
        with open(commands_path, "a", encoding="utf-8") as f:
            f.write((grid.command or COMMAND) + "\n")
    grid_commands = []
    if os.path.exists(commands_path):
        with open(commands_path, encoding="utf-8") as f:
            grid_commands = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    base = _base_preset(grid)
    metadata = reader.load_metadata(grid.data_dir)
    seen = seen_targets(grid.data_dir, metadata)
    # Rows whose configs are impossible (e.g. an EM3 field this ModelConfig lacks) fail before any training.
    failed, invalid = [], set()
    for name in grid.models:
        try:
            stage_presets(base, ROWS[name], 0, metadata)
        except ValueError as error:
            invalid.add(name)
            failed += [{"cell": f"{name}_s{s}", "error": str(error)} for s in range(grid.seeds)]
            progress(f"report: row {name} skipped: {error}")
    payloads, reused = {}, []
    for name in grid.models:
        if name in invalid:
            continue
        for seed in range(grid.seeds):
            cell = f"{name}_s{seed}"
            marker = os.path.join(runs_dir, cell, CELL_FILE)
            done = load_finished_cell(runs_dir, cell)
            if done is not None:
                payloads[cell] = done
                reused.append(cell)
                progress(f"report: {cell} finished before, reused")
                continue
            if grid.report_only:
                continue
            try:
                payload = run_cell(grid, base, ROWS[name], seed, metadata, seen, progress)
            except Exception as error:  # a failed cell is reported, the grid goes on
                progress(f"report: {cell} FAILED: {error!r}")
                traceback.print_exc()
                failed.append({"cell": cell, "error": error_summary(error)})
                continue
            stored = {k: v for k, v in payload.items() if k != "_scores"}
            stored["users"] = user_strings(payload["_scores"]["user"])
            _write_json(marker, stored)
            payloads[cell] = {**stored, "_scores": payload["_scores"]}
            progress(f"report: {cell} AUC {payload['metrics']['auc']:.4f} ({payload['seconds']:.0f} s)")
    missing = [f"{n}_s{s}" for n in grid.models for s in range(grid.seeds)
               if f"{n}_s{s}" not in payloads and not any(f["cell"] == f"{n}_s{s}" for f in failed)]

    # Subsets: edges and the cold-share median from the test split (the same samples for every cell).
    any_scores = next(iter(payloads.values()))["_scores"] if payloads else None
    if any_scores is not None:
        targets = ctr_test_targets(grid.data_dir, metadata)
        if not np.array_equal(targets["label"].reshape(-1), np.asarray(any_scores["label"]).reshape(-1)):
            raise ValueError(f"{grid.data_dir}: ctr/test no longer matches the cells' per-sample scores (another "
                             "dataset or order); rerun the grid on this dataset")
        cold_target = cold_targets(targets["item"], seen)
        for payload in payloads.values():
            payload["_scores"]["cold_target"] = cold_target
    paired = paired_differences(payloads, grid.models, grid.seeds)
    edges = length_bucket_edges(any_scores["length"], grid.length_buckets) if any_scores is not None else [0, 1]
    share_median = float(np.median(any_scores["cold_share"])) if any_scores is not None else 0.0
    cells: Dict[str, List[dict]] = {}
    sizes = {}
    for cell, payload in payloads.items():
        summary = _cell_summary(payload, edges, share_median)
        summary.pop("users", None)
        cells.setdefault(summary["row"], []).append(summary)
    if any_scores is not None:
        sizes = {name: int(mask.sum()) for name, mask in sample_groups(any_scores, edges, share_median).items()}
        sizes["all"] = int(len(any_scores["label"]))
    tables = build_tables(cells)

    plots = []
    out = grid.out_dir
    plots.append(os.path.basename(plot_learning_curves(cells, os.path.join(out, "learning_curves.png"))))
    buckets = [f"length[{lo},{hi})" for lo, hi in zip(edges[:-1], edges[1:])]
    plots.append(os.path.basename(plot_bars(
        {b.replace("length", ""): {r: tables[f"subset:{b}"][r]["auc"] for r in cells}
         for b in buckets if f"subset:{b}" in tables},
        os.path.join(out, "auc_vs_history_length.png"), "Test AUC by history length", "AUC",
        "history length bucket")))
    plots.append(os.path.basename(plot_bars(
        {s: {r: tables[f"subset:{s}"][r]["auc"] for r in cells} for s in ("cold", "warm", "cold_share_high",
                                                                          "cold_share_low", "cold_target",
                                                                          "warm_target")
         if f"subset:{s}" in tables},
        os.path.join(out, "auc_cold_ids.png"), "Test AUC on cold-id subsets", "AUC")))
    recall = None if grid.pq_recall else {"error": "not requested"}
    seminar_cells = [c for c in cells.get("seminar", []) if c["seed"] == 0]
    if seminar_cells and grid.pq_recall:
        try:
            recall = pq_recall(os.path.join(runs_dir, "seminar_s0"), grid, base, progress)
            plots.append(os.path.basename(plot_recall(recall, os.path.join(out, "pq_recall.png"))))
        except Exception as error:
            traceback.print_exc()
            recall = {"error": error_summary(error)}
    pq_note = ("`seminar_pq_adc`: the `seminar` run of the same seed evaluated with gsu=pq_adc (experiment.evaluate"
               " with codebooks fitted by pq_runs.fit_run on that run, "
               f"S={grid.pq_subspaces or base.model.pq_subspaces}, C={grid.pq_centroids or base.model.pq_centroids});"
               " not fine-tuned with PQ.")
    dataset = f"{metadata.num_items} item rows, {metadata.num_queries} queries, channels {list(metadata.channels)}"
    report = {
        "benchmark": "report", **stamp.stamp(grid.command or COMMAND, revision=commit), "preset": base.name,
        "config": grid.config, "config_summary": _config_summary(grid, base, cells),
        "grid_commands": grid_commands, "runs_dir": runs_dir, "grid_span": _grid_span(runs_dir),
        "note": grid.note, "config_text": _config_text(grid.config),
        "data": grid.data_dir, "dataset": dataset, "seeds": grid.seeds, "rows": list(grid.models),
        "num_negatives": grid.num_negatives, "num_items": metadata.num_items, "cold_ids": int(
            metadata.num_items - len(schema.RESERVED) - np.isin(np.arange(len(schema.RESERVED), metadata.num_items),
                                                                seen).sum()),
        "cold_share_median": share_median, "subset_sizes": sizes, "length_edges": edges,
        "tables": tables, "paired_auc": paired, "pq_recall": recall, "pq_note": pq_note,
        "cells": {row: [{k: v for k, v in c.items() if k not in ("popularity",)} for c in finished]
                  for row, finished in cells.items()},
        "reused": reused, "failed": failed, "missing": missing, "plots": plots,
        "wall_seconds": time.time() - started,
        # a cell's seconds include the PSU pretraining when that cell trained it (shared PSUs count once)
        "cell_seconds": float(sum(c.get("seconds", 0.0) for f in cells.values() for c in f)),
    }
    report["checks"] = checks(tables, [r for r in grid.models if r in cells], paired)
    from seminar_tf.evaluate import _json_ready

    report = stamp.round_trip(_json_ready(report))
    stamp.write(report, out, JSON_FILE)  # REPORT.md rendered from the JSON alone (seminar-tf render re-renders it)
    progress(f"report: wrote {os.path.join(out, REPORT_FILE)}")
    return report


# ---------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    """Registers ``seminar-tf report`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "report", help="train/evaluate the comparison grid (SEMINAR, ablations, baselines); write REPORT.md + PNGs",
        description="For every row of --models and every seed: PSU pretraining (shared between rows with the "
        "same pretraining config) and CTR fine-tuning with seminar_tf.experiment, then evaluation (AUC, GAUC, "
        "logloss, HIT/NDCG@1,5,10,50, MRR), the cold-id subset (ctr/test samples whose history holds an item "
        "id never seen as a ctr/train target) and AUC by history length. Writes OUT/REPORT.md (mean ± std over "
        "seeds, checks of the expected claims), OUT/report.json and PNG plots (learning curves, PQ recall vs "
        "K, AUC vs history length); runs go under OUT/runs/.")
    p.add_argument("--data", required=True, help="dataset directory written by `seminar-tf build`")
    p.add_argument("--out", required=True, help="report directory (REPORT.md, report.json, PNGs, runs/)")
    p.add_argument("--config", default="demo",
                   help="preset name (test, demo, paper_kuaisar, paper_amazon) or a YAML/JSON file of overrides "
                        "(default: demo)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per row (default: 2)")
    p.add_argument("--models", default=",".join(DEFAULT_ROWS),
                   help="comma-separated rows, run in this order; known: " + ", ".join(ROWS)
                        + f" (default: {','.join(DEFAULT_ROWS)})")
    p.add_argument("--epochs", type=int, default=None, help="override the fine-tuning epochs of the config")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="override the PSU pretraining epochs")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="override steps per epoch of both stages (default: one pass over the split)")
    p.add_argument("--num-negatives", type=int, default=99,
                   help="sampled negatives per positive in the ranking protocol (default: 99)")
    p.add_argument("--pq-subspaces", type=int, default=None,
                   help="S of the seminar_pq_adc row's and the recall plot's codebooks (default: the config's)")
    p.add_argument("--pq-centroids", type=int, default=None,
                   help="C of the seminar_pq_adc row's and the recall plot's codebooks (default: the config's)")
    p.add_argument("--runs-dir", default=None,
                   help="directory for the cells' training runs (checkpoints, eval reports; default: OUT/runs), "
                        "e.g. outside a committed --out")
    p.add_argument("--note", default="",
                   help="free text printed under the command in REPORT.md, e.g. the commands that built --data")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the cells that finished (e.g. of a killed grid) "
                        "and list the others as not run")
    p.add_argument("--resume", action="store_true",
                   help="reuse cells whose run finished (OUT/runs/<row>_s<seed>/cell.json) and continue "
                        "unfinished trainings from their last epoch")
    from seminar_tf import config as config_lib

    config_lib.add_set_argument(p)
    p.set_defaults(handler=_run_report, takes_extra=False)


def _run_report(args, extra) -> int:
    grid = GridConfig(
        data_dir=args.data, out_dir=args.out, config=args.config, overrides=tuple(args.set), seeds=args.seeds,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()), epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs, steps_per_epoch=args.steps_per_epoch,
        num_negatives=args.num_negatives, resume=args.resume, pq_subspaces=args.pq_subspaces,
        pq_centroids=args.pq_centroids, note=args.note, runs_dir=args.runs_dir, report_only=args.report_only,
        command="seminar-tf " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if os.path.basename(sys.argv[0]).startswith("seminar-tf") else "")
    from seminar_tf.cli_args import UsageError

    try:
        grid.validate()
        _base_preset(grid)  # a bad --config or --set fails here, before any training
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not grid.command:
        grid.command = _reconstruct_command(args)
    report = run(grid, progress=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr,
                                                flush=True))
    print(os.path.join(args.out, REPORT_FILE))
    for check in report["checks"]:
        print(f"{check['status']}: {check['claim']}")
    return 0


def _reconstruct_command(args) -> str:
    parts = ["seminar-tf", "report", "--data", args.data, "--out", args.out, "--config", args.config,
             "--seeds", str(args.seeds), "--models", args.models]
    for flag, value in (("--epochs", args.epochs), ("--pretrain-epochs", args.pretrain_epochs),
                        ("--steps-per-epoch", args.steps_per_epoch), ("--pq-subspaces", args.pq_subspaces),
                        ("--pq-centroids", args.pq_centroids)):
        if value is not None:
            parts += [flag, str(value)]
    for text in args.set:
        parts += ["--set", text]
    if args.num_negatives != 99:
        parts += ["--num-negatives", str(args.num_negatives)]
    if args.runs_dir:
        parts += ["--runs-dir", args.runs_dir]
    if args.note:
        parts += ["--note", args.note]
    if args.resume:
        parts.append("--resume")
    if args.report_only:
        parts.append("--report-only")
    return " ".join(shlex.quote(p) for p in parts)
