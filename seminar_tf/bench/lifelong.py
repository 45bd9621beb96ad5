"""`seminar-tf bench lifelong`: does the far history pay, measured against the lifelong world's own oracle
(docs/design.md §7).

The protocol: the lifelong world (default 120 users with 8,000-12,000 history events, 400 labelled impressions
each) with a per-user split (``seminar-tf world --with-split``), built once at the longest L; a row at a shorter
L reads the newest ``max_history`` steps of the same samples (``--set build.max_history=L``), so every row is
scored on the same test samples. Rows: SEMINAR (PSU-initialised) at each L; at the longest L also SEMINAR
without pretraining and the long-sequence baselines (DIN attends over its newest K steps, so its cost does not
grow with L). Each row is a ``seminar-tf report`` grid cell per seed (pretrain, fine-tune with early stopping on
valid, one pass over ctr/test); hyper-parameters come from the config as given. Two oracle rows come from the
world's ``world_truth.json`` (``seminar_tf.data.oracle``): the true click probability, and the same without its
long-term term; gap closed = (AUC − oracle without long term) / (oracle − oracle without long term). Paired
intervals (bootstrap over users): SEMINAR at the longest L minus every other row. ``lifelong_report`` renders
the Markdown from the JSON alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from seminar_tf import schema
from seminar_tf.bench import changed_flags, longseq, stamp
from seminar_tf.bench.lifelong_report import markdown, row_key  # noqa: F401  (markdown: stamp.RENDERERS)

COMMAND = "seminar-tf bench lifelong"
REFERENCE = "seminar"  # the row whose longest-L run the claim is about
LONG_ROWS = ("seminar_no_pretrain", "sim_hard", "sim_soft", "eta", "twin", "din")
METRICS = ("auc", "gauc", "logloss")
TARGET_GAP_CLOSED = 0.60
TARGET_GAIN_OVER_SHORTER = 0.03
WORLD_MARKER = "lifelong_world.json"
BUILD_MARKER = "lifelong_build.json"


@dataclasses.dataclass
class LifelongBenchConfig:
    """The lifelong protocol's world, lengths and rows (defaults: issue-size; the tests shrink them)."""

    out_dir: str = "benchmarks"
    work_dir: str = "runs/bench/lifelong"
    users: int = 120
    items: int = 20_000
    mean_history: int = 10_000  # history events per user lie in [0.8, 1.2] x this
    impressions_per_user: int = 400
    seed: int = 3  # of the world
    lengths: Tuple[int, ...] = (100, 1_000, 10_000)  # max_history of the SEMINAR rows
    long_rows: Tuple[str, ...] = LONG_ROWS  # rows of seminar_tf.report.ROWS at the longest L
    config: str = "demo"  # preset or YAML/JSON config of the build section and every row
    overrides: Tuple[str, ...] = ()
    align_chunk_steps: int = 100  # PSU alignment chunks of this many steps: model.align_chunks = ceil(L / this)
    seeds: int = 3
    epochs: Optional[int] = None
    pretrain_epochs: Optional[int] = None
    resume: bool = False  # reuse the world, the dataset and finished cells of work_dir
    reuse_world: bool = True  # a world of the same flags in work_dir is reused even without resume
    timeout_s: float = 4 * 3600.0  # world and build children
    command: str = ""
    note: str = ""

    def __post_init__(self):
        from seminar_tf.report import ROWS

        self.lengths = tuple(sorted({int(n) for n in self.lengths}))
        self.long_rows, self.overrides = tuple(self.long_rows), tuple(self.overrides)
        if not self.lengths or self.lengths[0] < 1:
            raise ValueError(f"--lengths: need at least one length >= 1, got {self.lengths}")
        unknown = [r for r in self.long_rows if r not in ROWS or r == REFERENCE]
        if unknown:
            raise ValueError(f"--models: unknown rows {unknown}; choose from "
                             f"{sorted(r for r in ROWS if r != REFERENCE)} (SEMINAR runs at every length)")
        for name in ("users", "items", "mean_history", "impressions_per_user", "seeds", "align_chunk_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def longest(self) -> int:
        return self.lengths[-1]

    def world_flags(self) -> Dict[str, object]:
        return {"num_users": self.users, "num_items": self.items, "mean_history": self.mean_history,
                "min_history_events": max(1, int(round(0.8 * self.mean_history))),
                "max_history_events": max(1, int(round(1.2 * self.mean_history))),
                "impressions_per_user": self.impressions_per_user, "seed": self.seed, "with_split": True}

    def rows_at(self, length: int) -> Tuple[str, ...]:
        return (REFERENCE,) + (self.long_rows if length == self.longest else ())

    def overrides_at(self, length: int) -> Tuple[str, ...]:
        chunks = max(1, math.ceil(length / self.align_chunk_steps))
        return self.overrides + (f"build.max_history={length}", f"model.align_chunks={chunks}")

    def cli(self) -> str:
        default = LifelongBenchConfig()
        parts = [COMMAND] + changed_flags(self, default, (
            ("--users", "users"), ("--items", "items"), ("--mean-history", "mean_history"),
            ("--impressions-per-user", "impressions_per_user"), ("--config", "config"), ("--seeds", "seeds"),
            ("--epochs", "epochs"), ("--pretrain-epochs", "pretrain_epochs")))
        if self.lengths != default.lengths:
            parts += ["--lengths", ",".join(map(str, self.lengths))]
        if self.long_rows != default.long_rows:
            parts += ["--models", ",".join(self.long_rows)]
        for text in self.overrides:
            parts += ["--set", text]
        return " ".join(parts)


def _log(progress, message):
    if progress:
        progress(message)


def _load_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def prepare(config: LifelongBenchConfig, preset, progress=None) -> Tuple[str, str, dict, dict]:
    """World (reused when its flags match) and one build at the longest L (reused with ``resume`` when built
    from that world with the same flags): (raw_dir, data_dir, world row, build row)."""
    raw_dir = os.path.join(config.work_dir, "raw")
    data_dir = os.path.join(config.work_dir, "dataset")
    logs_dir = os.path.join(config.work_dir, "logs")
    os.makedirs(logs_dir, exist_ok=True)
    world = longseq.world(config, raw_dir, logs_dir, progress, marker_name=WORLD_MARKER)
    if not world["ok"]:
        raise RuntimeError(f"seminar-tf world failed (rc {world.get('returncode')}): see {logs_dir}/world.err")
    flags = longseq.build_flags(config.longest, preset.build)
    marker = os.path.join(data_dir, BUILD_MARKER)
    previous = _load_json(marker)
    if config.resume and world.get("reused") and previous and previous.get("flags") == flags:
        _log(progress, f"build: reusing {data_dir} (same world and flags)")
        return raw_dir, data_dir, world, {**previous["row"], "reused": True}
    row = longseq.build(config, raw_dir, data_dir, config.longest, logs_dir, flags=flags)
    if not row["ok"]:
        raise RuntimeError(f"seminar-tf build failed: {row.get('error') or row.get('returncode')}; see "
                           f"{logs_dir}/build_L{config.longest}.err")
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"flags": flags, "row": row}, f, indent=2)
    return raw_dir, data_dir, world, {**row, "reused": False}


def oracle_rows(raw_dir: str, data_dir: str) -> Dict[str, Dict[str, float]]:
    """AUC, GAUC and logloss of the world's two oracle scorers on ctr/test (``oracle.oracle_metrics``)."""
    from seminar_tf.data import oracle, reader

    truth = _load_json(os.path.join(raw_dir, "world_truth.json"))
    if truth is None:
        raise ValueError(f"{raw_dir}: no world_truth.json (the oracle rows need the world's truth)")
    metadata = reader.load_metadata(data_dir)
    batches = ({k: v.numpy() for k, v in batch.items()} for batch in reader.make_dataset(
        data_dir, schema.CTR_DIR, "test", 1024, metadata=metadata, max_history=1))
    return oracle.oracle_metrics(truth, batches)


def gap_closed(auc: Optional[float], oracle_auc: float, without_long_term: float) -> Optional[float]:
    """(AUC − oracle without long term) / (oracle − oracle without long term); None without a finite AUC or gap."""
    span = oracle_auc - without_long_term
    if auc is None or not math.isfinite(auc) or not span > 0:
        return None
    return (auc - without_long_term) / span


def _grid(config: LifelongBenchConfig, data_dir: str, length: int):
    from seminar_tf import report as report_lib

    return report_lib.GridConfig(
        data_dir=data_dir, out_dir=os.path.join(config.work_dir, f"grid_L{length}"),
        runs_dir=os.path.join(config.work_dir, f"runs_L{length}"), config=config.config,
        overrides=config.overrides_at(length), seeds=config.seeds, models=config.rows_at(length),
        epochs=config.epochs, pretrain_epochs=config.pretrain_epochs, resume=config.resume, pq_recall=False,
        command=f"{config.command or config.cli()} (rows at L={length})")


def cell_scores(runs_dir: str, row: str, seeds: int) -> List[dict]:
    """The finished seeds' per-sample test scores of a row (``report.load_finished_cell``): [{"probability",
    "label", "user", ...}]."""
    from seminar_tf import report as report_lib

    cells = (report_lib.load_finished_cell(runs_dir, f"{row}_s{seed}") for seed in range(seeds))
    return [cell["_scores"] for cell in cells if cell is not None]


def paired_intervals(reference: List[dict], others: Dict[str, List[dict]], draws: int = 2000) -> Dict[str, dict]:
    """Test AUC of the reference cells minus each other key's (seeds' means), paired bootstrap over users
    (``report.paired_differences``); every cell must hold the same test samples in the same order."""
    from seminar_tf import report as report_lib

    if not reference:
        return {}
    labels, users = reference[0]["label"], reference[0]["user"]
    for key, cells in [(REFERENCE, reference), *others.items()]:
        for cell in cells:
            if not (np.array_equal(cell["label"], labels) and np.array_equal(cell["user"], users)):
                raise ValueError(f"{key}: its cells did not score the same test samples as the reference; rerun the "
                                 "rows on one dataset")
    payloads = {f"{key}_s{seed}": {"_scores": cell}
                for key, cells in [(REFERENCE, reference), *others.items()] for seed, cell in enumerate(cells)}
    seeds = max(len(cells) for cells in [reference, *others.values()])
    return report_lib.paired_differences(payloads, list(others), seeds, reference=REFERENCE, draws=draws)


def checks(report: dict) -> List[dict]:
    """The issue's targets, from the JSON: gap closed, the gain over the next shorter SEMINAR run, and SEMINAR
    at the longest L against every other row there (paired differences)."""
    longest = report["lengths"][-1]
    by_key = {row_key(r["row"], r["max_history"]): r for r in report["rows"]}
    mine = by_key.get(row_key(REFERENCE, longest))
    paired = report.get("paired", {})
    out = []

    def add(target, status, numbers):
        out.append({"target": target, "status": status, "numbers": numbers})

    closed = mine.get("gap_closed") if mine else None
    oracles = (f"oracle {report['oracle_auc']:.4f}, without long term "
               f"{report['oracle_auc_without_long_term']:.4f}")
    target = f"SEMINAR at L={longest} closes >= {TARGET_GAP_CLOSED:.0%} of the lifelong gap (test AUC)"
    if mine is None or mine.get("auc") is None:
        add(target, "not run", "—")
    elif closed is None:  # the oracles leave no gap on this test split
        add(target, "n/a", f"no gap to close: {oracles}")
    else:
        add(target, "pass" if closed >= TARGET_GAP_CLOSED else "fail",
            f"{closed:.1%} (AUC {mine['auc']:.4f}; {oracles})")
    if len(report["lengths"]) > 1:
        shorter = report["lengths"][-2]
        diff = paired.get(row_key(REFERENCE, shorter))
        add(f"SEMINAR at L={longest} beats its L={shorter} run by >= {TARGET_GAIN_OVER_SHORTER} AUC, paired interval "
            "above 0", "not run" if diff is None else (
                "pass" if diff["difference"] >= TARGET_GAIN_OVER_SHORTER and diff["low"] > 0 else "fail"),
            "—" if diff is None else _difference_text(diff))
    for row in report["long_rows"]:
        diff = paired.get(row_key(row, longest))
        add(f"SEMINAR at L={longest} beats {row} (test AUC, paired interval above 0)",
            "not run" if diff is None else ("pass" if diff["low"] > 0 else "fail"),
            "—" if diff is None else _difference_text(diff))
    return out


def _difference_text(diff: dict) -> str:
    return (f"difference {diff['difference']:+.4f}, 95% interval [{diff['low']:+.4f}, {diff['high']:+.4f}] "
            f"(paired bootstrap over {diff['users']} users)")


def collect(config: LifelongBenchConfig, grids: Dict[int, dict], oracle: Dict[str, Dict[str, float]]) -> dict:
    """Rows (one per row and length, then popularity and the two oracles), gap closed, paired intervals."""
    from seminar_tf import report as report_lib
    from seminar_tf.data.oracle import ORACLE, ORACLE_WITHOUT_LONG_TERM

    top, bottom = oracle[ORACLE]["auc"], oracle[ORACLE_WITHOUT_LONG_TERM]["auc"]
    rows, popularity = [], None
    for length in config.lengths:
        tables = grids[length]["tables"]
        for name in config.rows_at(length):
            metrics = {m: tables["metrics"].get(name, {}).get(m) or {"mean": math.nan, "std": math.nan, "n": 0}
                       for m in METRICS}
            auc = metrics["auc"]["mean"] if metrics["auc"]["n"] else None
            rows.append({"row": name, "max_history": length, "description": report_lib.ROWS[name].description,
                         "n": metrics["auc"]["n"], "auc": auc, "metrics": metrics,
                         "gap_closed": gap_closed(auc, top, bottom)})
        popularity = popularity or next((tables["popularity"][r] for r in config.rows_at(length)
                                         if r in tables["popularity"]), None)
    if popularity:
        rows.append({"row": "popularity", "max_history": None, "n": popularity["auc"]["n"],
                     "description": "item popularity: smoothed train-split CTR of the target item",
                     "auc": popularity["auc"]["mean"], "metrics": {m: popularity[m] for m in METRICS},
                     "gap_closed": gap_closed(popularity["auc"]["mean"], top, bottom)})
    for name, text in ((ORACLE, "the world's true click probability (world_truth.json)"),
                       (ORACLE_WITHOUT_LONG_TERM, "the true click probability without its long-term term: the best "
                                                  "a model blind to the oldest part of the history can do")):
        rows.append({"row": name, "max_history": None, "n": 1, "description": text, "auc": oracle[name]["auc"],
                     "metrics": {m: {"mean": oracle[name][m], "std": 0.0, "n": 1} for m in METRICS},
                     "gap_closed": gap_closed(oracle[name]["auc"], top, bottom)})
    runs = {length: os.path.join(config.work_dir, f"runs_L{length}") for length in config.lengths}
    reference = cell_scores(runs[config.longest], REFERENCE, config.seeds)
    others = {row_key(name, length): cell_scores(runs[length], name, config.seeds)
              for length in config.lengths for name in config.rows_at(length)
              if not (name == REFERENCE and length == config.longest)}
    return {"rows": rows, "oracle_auc": top, "oracle_auc_without_long_term": bottom,
            "paired": paired_intervals(reference, others)}


def run(config: LifelongBenchConfig, progress: Optional[Callable[[str], None]] = None) -> dict:
    """World → build → one report grid per length → OUT/lifelong/lifelong.json + lifelong.md; returns the JSON."""
    from seminar_tf import config as config_lib
    from seminar_tf import report as report_lib
    from seminar_tf.evaluate import _json_ready

    started = time.time()
    revision = stamp.commit()
    for length in config.lengths:
        runs_dir = os.path.join(config.work_dir, f"runs_L{length}")
        if not config.resume and os.path.isdir(runs_dir) and any(os.scandir(runs_dir)):
            raise ValueError(f"{runs_dir!r} already holds runs; pass --resume to reuse them or choose another "
                             "--work-dir")
    preset = config_lib.load_config(config.config, config.overrides)
    raw_dir, data_dir, world, build = prepare(config, preset, progress)
    oracle = oracle_rows(raw_dir, data_dir)
    _log(progress, f"oracle on ctr/test: {oracle}")
    grids = {}
    for length in config.lengths:
        _log(progress, f"bench lifelong: rows at L={length}: {', '.join(config.rows_at(length))}")
        grids[length] = report_lib.run(_grid(config, data_dir, length), progress=progress)
    with open(os.path.join(data_dir, schema.STATS_FILE), encoding="utf-8") as f:
        stats = json.load(f)
    report = {
        "benchmark": "lifelong", **stamp.stamp(config.command or config.cli(), revision), "config": config.config,
        "overrides": list(config.overrides), "seeds": config.seeds, "lengths": list(config.lengths),
        "long_rows": list(config.long_rows), "align_chunk_steps": config.align_chunk_steps,
        "world": {"flags": config.world_flags(), **{k: v for k, v in world.items() if k not in ("cmd",)}},
        "build": {k: v for k, v in build.items() if k not in ("cmd",)},
        "samples": stats.get("samples", {}).get("ctr"), "oracle": oracle,
        "failed": {str(n): grids[n]["failed"] for n in config.lengths},
        "missing": {str(n): grids[n]["missing"] for n in config.lengths},
        "note": config.note, "wall_seconds": round(time.time() - started, 1),
        **collect(config, grids, oracle),
    }
    report["checks"] = checks(report)
    places = {"OUT_DIR": config.out_dir, "WORK_DIR": config.work_dir}
    out = os.path.join(config.out_dir, "lifelong")
    stamp.write(_json_ready(report), out, "lifelong.json", places=places)
    _log(progress, f"wrote {os.path.join(out, 'lifelong.md')}")
    return _load_json(os.path.join(out, "lifelong.json"))

