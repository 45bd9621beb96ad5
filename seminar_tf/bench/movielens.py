"""`seminar-tf bench movielens`: SEMINAR and the in-project baselines on real data (MovieLens).

MovieLens-100K (RecBole 1.2.1's atomic files, or ``--input`` with any layout the adapter reads) → the
MovieLens adapter (label = rating >= 4, per-user 80/10/10 split by time) → the project's Beam pipeline →
the comparison-grid machinery of ``seminar_tf.report`` (rows × seeds) → ``OUT/movielens/movielens.json`` and,
rendered from it, ``OUT/movielens/REPORT.md``: test AUC, GAUC, logloss, HIT@10, NDCG@10 and seconds per
fine-tuning epoch per row (mean ± std over seeds), the popularity reference, FuxiCTR's figures on the same
protocol, and the issue's targets checked against the JSON's numbers.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time
import zipfile
from typing import Callable, Dict, List, Optional, Tuple

from seminar_tf import report as report_lib
from seminar_tf import schema
from seminar_tf.bench import stamp

COMMAND = "seminar-tf bench movielens"
RECBOLE_VERSION = "1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
DEFAULT_MODELS = ("seminar", "din", "sim_hard", "sim_soft", "eta", "twin", "no_history")
METRICS = ("auc", "gauc", "logloss", "hit@10", "ndcg@10")
SEMINAR_AUC_TARGET = 0.800
# The bench's protocol: every rating is a labelled sample and, for later samples, a history step.
PROTOCOL_BUILD = {"history_events": ("impression", "click"), "sample_events": ("impression",), "min_history": 0}
EXTERNAL = {
    "library": "FuxiCTR", "version": "2.3.10", "framework": "PyTorch", "models": "LongCTR", "epochs": 5,
    "embedding_dim": 16,
    "note": "FuxiCTR 2.3.10 (PyTorch) LongCTR models on the same samples and split (5 epochs, embedding 16); "
            "test AUC measured by the project on the same protocol, not rerun by this command.",
    "auc": {"din": ("DIN", 0.780), "sim_hard": ("SIM", 0.792), "sim_soft": ("SIM", 0.792), "eta": ("ETA", 0.791),
            "twin": ("TWIN", 0.791)},
}


@dataclasses.dataclass
class MovieLensBenchConfig:
    input_dir: Optional[str] = None  # MovieLens files; None: RecBole's ml-100k (downloaded into cache_dir)
    out_dir: str = "benchmarks"
    work_dir: str = "runs/bench/movielens"
    cache_dir: str = "~/.cache/seminar-tf/recbole"
    config: str = "movielens"
    overrides: Tuple[str, ...] = ()  # --set SECTION.FIELD=VALUE texts applied to the config
    seeds: int = 3
    models: Tuple[str, ...] = DEFAULT_MODELS
    epochs: Optional[int] = None  # fine-tuning epochs (default: the config's)
    pretrain_epochs: Optional[int] = None
    num_negatives: int = 99
    label_threshold: float = 4.0
    resume: bool = False
    note: str = ""  # a paragraph under the report's header (e.g. where reused cells were trained)
    command: str = ""

    def cli(self) -> str:
        """The ``seminar-tf bench movielens`` command line of this config (non-default flags only)."""
        parts = ["seminar-tf", "bench", "movielens"]
        default = MovieLensBenchConfig()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("command", "resume") or value == getattr(default, field.name):
                continue
            if field.name == "overrides":
                for text in value:
                    parts += ["--set", text]
                continue
            flag = "--" + {"input_dir": "input", "out_dir": "out"}.get(field.name, field.name).replace("_", "-")
            parts += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
        return " ".join(shlex.quote(p) for p in parts + (["--resume"] if self.resume else []))


def _log(progress, message):
    if progress:
        progress(f"bench movielens: {message}")


# ---------------------------------------------------------------------------------------------- data
def fetch_ml100k(cache_dir: str, progress=None) -> str:
    """RecBole's ml-100k atomic files under ``cache_dir/ml-100k`` (pip downloads the wheel once)."""
    cache_dir = os.path.expanduser(cache_dir)
    target = os.path.join(cache_dir, "ml-100k")
    if all(os.path.exists(os.path.join(target, name)) for name in ML100K_FILES):
        return target
    os.makedirs(target, exist_ok=True)
    wheels = sorted(glob.glob(os.path.join(cache_dir, f"recbole-{RECBOLE_VERSION}-*.whl")))
    if not wheels:
        _log(progress, f"pip download recbole=={RECBOLE_VERSION} -> {cache_dir}")
        subprocess.run([sys.executable, "-m", "pip", "download", f"recbole=={RECBOLE_VERSION}", "--no-deps",
                        "-d", cache_dir], check=True)
        wheels = sorted(glob.glob(os.path.join(cache_dir, f"recbole-{RECBOLE_VERSION}-*.whl")))
        if not wheels:
            raise FileNotFoundError(f"pip download left no recbole-{RECBOLE_VERSION} wheel in {cache_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in ML100K_FILES:
            tmp = os.path.join(target, name + ".tmp")
            with wheel.open(ML100K_MEMBER + name) as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(tmp, os.path.join(target, name))
    _log(progress, f"extracted {', '.join(ML100K_FILES)} from {os.path.basename(wheels[0])} -> {target}")
    return target


def build_config(preset):
    """The --config's build section with the bench's protocol fields (``PROTOCOL_BUILD``)."""
    return dataclasses.replace(preset.build, **PROTOCOL_BUILD)


def prepare_dataset(config: MovieLensBenchConfig, preset, progress=None) -> Tuple[str, dict]:
    """Adapter + Beam build into WORK/dataset (reused with --resume when its metadata.json exists).
    Returns (dataset dir, adapter stats)."""
    from beam_pipelines.adapters import movielens as adapter
    from beam_pipelines.build_dataset import build_dataset

    data_dir = os.path.join(config.work_dir, "dataset")
    raw_dir = os.path.join(config.work_dir, "raw")
    stats_path = os.path.join(raw_dir, "adapter_stats.json")  # written by the adapter
    if config.resume and os.path.exists(os.path.join(data_dir, schema.METADATA_FILE)):
        _log(progress, f"reusing the dataset in {data_dir}")
        return data_dir, report_lib._load_json(stats_path) or {}
    input_dir = config.input_dir or fetch_ml100k(config.cache_dir, progress)
    _log(progress, f"adapter {input_dir} -> {raw_dir}")
    stats = adapter.convert(input_dir, raw_dir, label_threshold=config.label_threshold, split="user_fraction")
    _log(progress, f"Beam build (FnApiRunner) -> {data_dir}")
    build_dataset(raw_dir, data_dir, build_config(preset), pipeline_args=["--runner=FnApiRunner"])
    return data_dir, stats


# ---------------------------------------------------------------------------------------------- numbers
def _stat(value: Optional[dict]) -> Optional[dict]:
    return value if value and value.get("n") else None


def collect_rows(grid_report: dict, models) -> List[dict]:
    """One entry per row (failed / missing rows too, with n = 0), then the popularity reference."""
    tables, cells = grid_report["tables"], grid_report["cells"]
    rows = []
    for name in models:
        finished = {name: cells.get(name, [])}
        metrics = {m: tables["metrics"].get(name, {}).get(m) or {"mean": math.nan, "std": math.nan, "n": 0}
                   for m in METRICS}
        external = EXTERNAL["auc"].get(name)
        rows.append({
            "row": name, "kind": "model" if name == "seminar" else "baseline",
            "description": report_lib.ROWS[name].description, "n": metrics["auc"]["n"], "metrics": metrics,
            "epoch_seconds": report_lib.aggregate(finished, lambda c: c.get("epoch_seconds"))[name],
            "pretrain_seconds": report_lib.aggregate(finished, lambda c: c.get("pretrain_seconds"))[name],
            "external": {"model": external[0], "auc": external[1]} if external else None})
    popularity = next((tables["popularity"][r] for r in models if r in tables["popularity"]), None)
    if popularity:
        rows.append({"row": "popularity", "kind": "reference",
                     "description": "item popularity: smoothed train-split CTR of the target item "
                                    "(experiment.evaluate's popularity baseline)",
                     "n": popularity["auc"]["n"], "metrics": {m: popularity[m] for m in METRICS},
                     "epoch_seconds": None, "pretrain_seconds": None, "external": None})
    return rows


def gauc_intervals(data_dir: str, runs_dir: str, grid_report: dict, models, draws: int = 2000) -> Dict[str, dict]:
    """Per row: its seeds' mean GAUC minus popularity's on ctr/test, with a paired bootstrap over users
    (``evaluate.paired_gauc_difference``), from the scores the grid stored per cell (``<cell>/scores.npz``)."""
    import numpy as np

    from seminar_tf import evaluate as evaluate_lib
    from seminar_tf import experiment
    from seminar_tf.data import reader

    targets = report_lib.ctr_test_targets(data_dir)
    popularity = experiment.popularity_scores(data_dir, reader.load_metadata(data_dir))[targets["item"]]
    out = {}
    for name in models:
        scores, users = [], None
        for cell in grid_report["cells"].get(name, []):
            cell_dir = os.path.join(runs_dir, f"{name}_s{cell['seed']}")
            with open(os.path.join(cell_dir, report_lib.CELL_FILE)) as f:
                users = np.asarray(json.load(f)["users"], dtype=object)
            stored = np.load(os.path.join(cell_dir, "scores.npz"))
            if not np.array_equal(stored["label"], targets["label"]):
                raise ValueError(f"{cell_dir}: its per-sample labels are not ctr/test's in reading order")
            scores.append(stored["probability"])
        if scores:
            out[name] = evaluate_lib.paired_gauc_difference(users, targets["label"], scores, popularity, draws=draws)
    return out


def _check(target: str, row: str, metric: str, value, op: str, reference: str, reference_value) -> dict:
    known = all(v is not None and not math.isnan(v) for v in (value, reference_value))
    passed = known and (value >= reference_value if op == ">=" else value > reference_value)
    return {"target": target, "row": row, "metric": metric, "value": value if known else None, "op": op,
            "reference": reference, "reference_value": reference_value if known else None,
            "status": "not evaluated" if not known else "pass" if passed else "fail"}


def checks(rows: List[dict], intervals: Optional[Dict[str, dict]] = None,
           auc_intervals: Optional[Dict[str, dict]] = None) -> List[dict]:
    """The issue's targets, each computed from the rows' means (``value op reference_value``); the GAUC check
    carries SEMINAR's paired-bootstrap interval of the difference (``gauc_intervals``) when given, and each
    "SEMINAR >= baseline" check the paired interval of SEMINAR's test AUC minus the baseline's
    (``auc_intervals``: the grid report's ``paired_auc``) when given."""
    by_name = {r["row"]: r for r in rows}

    def mean(name, metric):
        stat = by_name.get(name, {}).get("metrics", {}).get(metric)
        return stat["mean"] if stat and stat.get("n") else None

    out = [_check(f"SEMINAR test AUC >= {SEMINAR_AUC_TARGET:.3f} (mean of seeds)", "seminar", "auc",
                  mean("seminar", "auc"), ">=", "target", SEMINAR_AUC_TARGET)]
    baselines = [r["row"] for r in rows if r["kind"] == "baseline"]
    for b in baselines:
        out.append(_check(f"SEMINAR >= {b} (test AUC)", "seminar", "auc", mean("seminar", "auc"), ">=", b,
                          mean(b, "auc")))
        if auc_intervals and b in auc_intervals:
            out[-1]["interval"] = auc_intervals[b]
    for b in baselines:
        if by_name[b]["external"]:
            ext = by_name[b]["external"]
            out.append(_check(f"{b} >= FuxiCTR {ext['model']} (test AUC)", b, "auc", mean(b, "auc"), ">=",
                              f"FuxiCTR {EXTERNAL['version']} {ext['model']}", ext["auc"]))
    for metric in ("gauc", "hit@10"):
        out.append(_check(f"SEMINAR {metric.upper()} > popularity", "seminar", metric, mean("seminar", metric), ">",
                          "popularity", mean("popularity", metric)))
        if metric == "gauc" and intervals and "seminar" in intervals:
            out[-1]["interval"] = intervals["seminar"]
    return out


# ---------------------------------------------------------------------------------------------- report
def protocol_text(report: dict) -> str:
    build, samples = report["build"], report["dataset_stats"]["samples"]
    source = (f"MovieLens files from `{report['input']}`" if report["input"] else
              f"MovieLens-100K (RecBole {RECBOLE_VERSION}'s `ml-100k` atomic files)")
    return (f"{source}, converted by `beam_pipelines.adapters.movielens` and built by the project's Beam pipeline "
            f"(FnApiRunner). Label = rating >= {report['label_threshold']:g}. Per user, ratings sorted by time "
            "(ties in file order) are split 80/10/10 into train/valid/test. Every rating is a labelled CTR sample "
            "and, for the user's later samples, a history step (history_events "
            f"{','.join(build['history_events'])}); a sample's history holds only ratings strictly before its "
            f"timestamp, newest {build['max_history']} steps, no minimum length (min_history "
            f"{build['min_history']}). CTR samples train/valid/test: {samples['ctr']['train']}/"
            f"{samples['ctr']['valid']}/{samples['ctr']['test']} (the dataset's stats.json). AUC, GAUC (per-user "
            "AUC weighted by samples, users with one class skipped) and logloss on ctr/test; HIT@10 / NDCG@10: "
            "experiment.evaluate's ranking protocol on pretrain/test (the true next rated item against "
            f"{report['num_negatives']} sampled items the user never rated).")


def _interval(value: dict) -> str:
    return (f"{value['difference']:+.4f}, {value['level']:.0%} interval [{value['low']:+.4f}, {value['high']:+.4f}]"
            f" (paired bootstrap over {value['users']} users)")


def markdown(report: dict) -> str:
    from seminar_tf.evaluate import format_interval_table, format_markdown_table

    fmt = report_lib.format_mean_std
    external = report["external"]
    columns = ["row", "n", "AUC", "GAUC", "logloss", "HIT@10", "NDCG@10", "s / epoch",
               f"external AUC ({external['library']} {external['version']})"]
    table = []
    for r in report["rows"]:
        entry = {"row": r["row"], "n": r["n"]}
        entry.update({c: fmt(r["metrics"][m]) for c, m in zip(columns[2:7], METRICS)})
        entry["s / epoch"] = fmt(r["epoch_seconds"], 1) if _stat(r["epoch_seconds"]) else "–"
        entry[columns[-1]] = f"{r['external']['auc']:.3f} ({r['external']['model']})" if r["external"] else "–"
        table.append(entry)
    psu = "; ".join(f"{r['row']} {fmt(r['pretrain_seconds'], 0)} s" for r in report["rows"]
                    if _stat(r["pretrain_seconds"]) and r["pretrain_seconds"]["mean"] > 0)
    check_rows = [{"target": c["target"], "status": c["status"],
                   "numbers": ("–" if c["value"] is None else
                               f"{c['value']:.4f} {c['op']} {c['reference_value']:.4f} ({c['reference']})")
                   + (f"; difference {_interval(c['interval'])}" if c.get("interval") else "")}
                  for c in report["checks"]]
    lines = [f"# SEMINAR on MovieLens ({report['config']} config)", "",
             f"Command: `{report['command']}`", "",
             f"Commit: {report['commit']}. Machine: {report['machine']}. Wall time {report['wall_seconds']:.0f} s "
             f"(cells reused with --resume: {len(report['reused'])}). Finished {report['finished_at']}.", "",
             *([report["note"], ""] if report.get("note") else []),
             "## Protocol", "", report["protocol"], "",
             f"Seeds: {report['seeds']} per row (model init, data order); values are mean ± sample std over the "
             "seeds that finished (n). Hyper-parameters are not chosen here: every row trains with the "
             f"`{report['config']}` config's values as given (early stopping reads the valid split only), and the "
             "test split is read once per configuration (row × seed).", "",
             "## Test metrics", "",
             format_markdown_table(table, columns).rstrip("\n"), "",
             "s / epoch: fine-tuning wall time over the epochs run (model build and the validation pass "
             "included)." + (f" PSU pretraining before fine-tuning: {psu}." if psu else ""), "",
             "Rows: " + "; ".join(f"`{r['row']}`: {r['description']}" for r in report["rows"]) + ".", "",
             f"External reference: {external['note']} SIM's figure stands beside both sim_hard and sim_soft.", "",
             "## Checks", "", "Computed from movielens.json (means over seeds); a row that loses stays in the "
             "tables.", "", format_markdown_table(check_rows, ["target", "status", "numbers"]).rstrip("\n"), ""]
    intervals = report.get("gauc_vs_popularity")
    if intervals:
        first = next(iter(intervals.values()))
        lines += ["## GAUC against popularity", "",
                  f"Each row's mean GAUC over its seeds minus item popularity's, on the same test samples, with a "
                  f"paired bootstrap over the {first['users']} users who have both classes ({first['draws']} draws; "
                  "each draw resamples users and recomputes both GAUCs). The interval is the test split's sampling "
                  "noise, not the seeds' spread.", "",
                  format_interval_table(intervals, "GAUC − popularity", "bootstrap SE").rstrip("\n"), ""]
    if report["failed"] or report["missing"]:
        lines += ["## Cells without results", "",
                  *[f"- `{f['cell']}` failed: {f['error']}" for f in report["failed"]],
                  *[f"- `{m}` not run or not finished" for m in report["missing"]], ""]
    lines += [f"Training runs and the grid's own report (cold-id subsets, AUC by history length, plots): "
              f"`{report['grid_report']}`.", ""]
    return "\n".join(lines)


def run(config: MovieLensBenchConfig, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Data → dataset → grid → OUT/movielens/movielens.json + REPORT.md; returns the JSON payload."""
    from seminar_tf import config as config_lib

    started = time.time()
    unknown = [m for m in config.models if m not in report_lib.ROWS]
    if unknown or not config.models:
        raise ValueError(f"--models: unknown rows {unknown}; choose from {sorted(report_lib.ROWS)}")
    runs_dir = os.path.join(config.work_dir, "runs")
    if not config.resume and os.path.isdir(runs_dir) and any(os.scandir(runs_dir)):
        raise ValueError(f"{runs_dir!r} already holds runs; pass --resume to reuse them or choose another "
                         "--work-dir")
    preset = config_lib.load_config(config.config, config.overrides)
    data_dir, adapter_stats = prepare_dataset(config, preset, progress)
    grid = report_lib.GridConfig(
        data_dir=data_dir, out_dir=os.path.join(config.work_dir, "grid"), runs_dir=runs_dir, config=config.config,
        overrides=tuple(config.overrides), seeds=config.seeds, models=tuple(config.models), epochs=config.epochs,
        pretrain_epochs=config.pretrain_epochs, num_negatives=config.num_negatives, resume=config.resume,
        pq_recall=False, command=config.command or config.cli())
    grid_report = report_lib.run(grid, progress=progress)
    with open(os.path.join(data_dir, schema.STATS_FILE)) as f:
        dataset_stats = json.load(f)
    rows = collect_rows(grid_report, config.models)
    report = {
        "benchmark": "movielens", **stamp.stamp(grid.command), "config": config.config, "seeds": config.seeds,
        "input": config.input_dir, "label_threshold": config.label_threshold, "num_negatives": config.num_negatives,
        "build": dataclasses.asdict(build_config(preset)),
        "dataset_stats": {k: dataset_stats.get(k) for k in ("rows_ok", "samples", "vocab_sizes", "channels")},
        "adapter_stats": adapter_stats, "rows": rows, "external": {k: v for k, v in EXTERNAL.items() if k != "auc"},
        "failed": grid_report["failed"], "missing": grid_report["missing"], "reused": grid_report["reused"],
        "grid_report": os.path.join(grid.out_dir, report_lib.REPORT_FILE), "note": config.note,
        "wall_seconds": time.time() - started,
    }
    report["protocol"] = protocol_text(report)
    report["gauc_vs_popularity"] = gauc_intervals(data_dir, runs_dir, grid_report, config.models)
    report["checks"] = checks(rows, report["gauc_vs_popularity"], grid_report.get("paired_auc"))
    out = os.path.join(config.out_dir, "movielens")
    from seminar_tf.evaluate import _json_ready

    places = {"OUT_DIR": config.out_dir, "WORK_DIR": config.work_dir, "CACHE_DIR": config.cache_dir,
              "INPUT_DIR": config.input_dir}
    stamp.write(_json_ready(report), out, "movielens.json", places=places)  # the Markdown renders the JSON as written
    with open(os.path.join(out, "movielens.json")) as f:
        written = json.load(f)
    _log(progress, f"wrote {os.path.join(out, report_lib.REPORT_FILE)}")
    return written
