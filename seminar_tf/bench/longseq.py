"""`seminar-tf bench longseq`: the project at lifelong history length (L = 10^3 and 10^4 by default).

Every measured step is the real CLI in a fresh child process (``python -m seminar_tf.cli ...``), so its peak RSS
(``os.wait4``'s ``ru_maxrss``) and wall time are that command's own:

1. ``seminar-tf world``: a synthetic world of lifelong users (default 120 users with 8,000-12,000 history events
   each, mean 10^4); reused from the work directory when its parameters match.
2. ``seminar-tf build --max-history L`` for each L, with the ``paper_kuaisar`` preset's build config: wall time,
   events read and events/s, peak RSS, the dataset's bytes on disk (in all and per top-level directory), CTR
   samples (stats.json) and bytes per CTR sample.
3. ``seminar-tf finetune --config paper_kuaisar --no-pretrain`` for each model and L (3 epochs of 2 steps, one
   validation step, batch 64): peak RSS and each epoch's wall time (the ``epoch_time_s`` the trainer adds to its
   history, read from the run's TensorBoard logs); and one step at batch 256 per model at the longest L for peak
   RSS.

A failed child (non-zero exit, killed, out of memory, timed out) is a row marked failed with its return code and
peak RSS; the bench goes on. Only the CLI and the dataset's stats.json and files are read, so the bench does not
depend on the dataset's record layout or the model's code. ``seminar_tf.bench.longseq_report`` renders the
Markdown from the JSON alone.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from seminar_tf.bench import changed_flags, child_env, stamp
from seminar_tf.bench.longseq_report import GIB, KIB, markdown  # noqa: F401  (markdown re-exported: stamp.RENDERERS)

COMMAND = "seminar-tf bench longseq"
PRESET = "paper_kuaisar"  # build and fine-tuning config of every step
WORLD_MARKER = "longseq_world.json"  # in the raw directory: the world's flags and summary, written after success
TARGET_LENGTH = 10_000  # the targets are stated for L = 10^4
TARGET_BYTES_PER_CTR_SAMPLE = 7 * KIB  # "7 KB" read as 7 KiB = 7,168 bytes
TARGET_PEAK_RSS_BYTES = 4 * GIB  # "4 GB" read as 4 GiB
TARGET_EPOCH_S = 0.43  # third epoch of SEMINAR: 2 steps of 64 in 0.43 s is about 300 training samples/s
TARGET_TRAIN_SAMPLES_PER_S = 300
EPOCH_TIME_TAGS = ("epoch_time_s", "epoch_train_time_s")  # seminar_tf.train.EPOCH_TIME / EPOCH_TRAIN_TIME


@dataclasses.dataclass
class LongSeqBenchConfig:
    """Sizes of the long-sequence benchmark (defaults: the lifelong setting; the tests shrink them)."""

    users: int = 120
    items: int = 20_000
    mean_history: int = 10_000  # the world's history lengths lie in [0.8, 1.2] x this
    impressions_per_user: int = 40
    seed: int = 0  # of the world
    lengths: Tuple[int, ...] = (1_000, 10_000)  # build.max_history of each build and training cell
    models: Tuple[str, ...] = ("seminar", "din")  # finetune --model
    # extra SEMINAR cells at the longest L, one `--set` each, timed beside the preset's (same run, same batches)
    seminar_variants: Tuple[str, ...] = ("model.aux_scope=history",)
    batch_size: int = 64
    epochs: int = 3  # the last epoch's time is the throughput row (the first ones trace and warm up)
    steps_per_epoch: int = 2
    validation_steps: int = 1
    peak_batch_size: int = 256  # one step per model at the longest L: the peak-RSS run of the target
    timeout_s: float = 4 * 3600.0  # per child; a child past it is killed and its row marked failed
    reuse_world: bool = True

    def __post_init__(self):
        self.lengths, self.models = tuple(int(n) for n in self.lengths), tuple(self.models)
        self.seminar_variants = tuple(self.seminar_variants)
        if not self.lengths or min(self.lengths) < 1 or not self.models:
            raise ValueError(f"need at least one length >= 1 and one model, got {self.lengths} and {self.models}")
        for name in ("users", "items", "mean_history", "batch_size", "epochs", "steps_per_epoch", "peak_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def world_flags(self) -> Dict[str, int]:
        return {"num_users": self.users, "num_items": self.items, "mean_history": self.mean_history,
                "min_history_events": max(1, int(round(0.8 * self.mean_history))),
                "max_history_events": max(1, int(round(1.2 * self.mean_history))),
                "impressions_per_user": self.impressions_per_user, "seed": self.seed}

    def command(self) -> str:
        default = LongSeqBenchConfig()
        parts = [COMMAND] + changed_flags(self, default, (
            ("--users", "users"), ("--items", "items"), ("--mean-history", "mean_history"),
            ("--impressions-per-user", "impressions_per_user"), ("--batch-size", "batch_size"),
            ("--epochs", "epochs"), ("--peak-batch-size", "peak_batch_size")))
        if self.lengths != default.lengths:
            parts += ["--lengths", ",".join(map(str, self.lengths))]
        if self.models != default.models:
            parts += ["--models", ",".join(self.models)]
        if self.seminar_variants != default.seminar_variants:
            parts += ["--variants", repr(",".join(self.seminar_variants))]
        return " ".join(parts)


def _log(progress, message):
    if progress:
        progress(f"bench longseq: {message}")


# ---------------------------------------------------------------------------------------------- child processes
def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])
    except OSError:
        return ""


def run_cli(args: Sequence[str], log_prefix: str, timeout_s: float) -> Dict:
    """``seminar-tf ARGS`` in a child process (stdout/stderr to ``log_prefix``.out/.err); its own peak RSS from
    ``os.wait4`` (Linux ``ru_maxrss``, KiB), wall time and exit code (negative: killed by that signal)."""
    os.makedirs(os.path.dirname(log_prefix) or ".", exist_ok=True)
    command = "seminar-tf " + " ".join(shlex.quote(str(a)) for a in args)
    with open(log_prefix + ".out", "w", encoding="utf-8") as out, \
            open(log_prefix + ".err", "w", encoding="utf-8") as err:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "seminar_tf.cli", *map(str, args)], stdout=out,
                                   stderr=err, stdin=subprocess.DEVNULL, env=child_env())
        lock, state = threading.Lock(), {"reaped": False, "timed_out": False}

        def kill():
            with lock:
                if not state["reaped"]:
                    state["timed_out"] = True
                    os.kill(process.pid, signal.SIGKILL)  # unreaped, so the pid is still this child's

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            with lock:
                state["reaped"] = True
            timer.cancel()
        wall_s = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    row = {"command": command, "returncode": process.returncode, "ok": process.returncode == 0,
           "wall_s": round(wall_s, 3), "peak_rss_bytes": int(usage.ru_maxrss) * KIB,
           "log": os.path.abspath(log_prefix) + ".{out,err}"}
    if state["timed_out"]:
        row["error"] = f"killed after the {timeout_s:.0f} s timeout"
    elif not row["ok"]:
        row["error"] = (f"killed by signal {-process.returncode}" + (" (SIGKILL: out of memory?)" if
                        process.returncode == -signal.SIGKILL else "") if process.returncode < 0 else
                        f"exit code {process.returncode}")
        row["stderr_tail"] = _tail(log_prefix + ".err")
    return row


def last_json(path: str) -> Optional[dict]:
    """The last top-level JSON object a CLI printed (``world``, ``build`` and ``finetune`` end with one)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for start in range(len(lines) - 1, -1, -1):
        if lines[start] == "{":
            try:
                value = json.loads("\n".join(lines[start:]))
            except ValueError:
                continue
            return value if isinstance(value, dict) else None
    return None


# ---------------------------------------------------------------------------------------------- measurements
def directory_bytes(path: str) -> Tuple[int, Dict[str, int]]:
    """Bytes of the regular files under ``path``: in all, and per top-level entry (a directory's files summed;
    a top-level file under its own name)."""
    by_entry: Dict[str, int] = {}
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            size = 0
            for root, _, files in os.walk(full):
                for name in files:
                    file_path = os.path.join(root, name)
                    if os.path.isfile(file_path) and not os.path.islink(file_path):
                        size += os.path.getsize(file_path)
            by_entry[entry + "/"] = size
        elif os.path.isfile(full) and not os.path.islink(full):
            by_entry[entry] = os.path.getsize(full)
    return sum(by_entry.values()), by_entry


def build_flags(length: int, build=None) -> List[str]:
    """``build`` flags of a build config (default: the preset's): --max-history L and a --set for each field
    that differs from BuildConfig's default (the Beam job takes no --config)."""
    from seminar_tf import config as config_lib

    build = build or config_lib.get_preset(PRESET).build
    default = config_lib.BuildConfig()
    flags = ["--max-history", str(length)]
    for field in dataclasses.fields(build):
        value = getattr(build, field.name)
        if field.name == "max_history" or value == getattr(default, field.name):
            continue
        text = (",".join(map(str, value)) if isinstance(value, (tuple, list)) else
                str(value).lower() if isinstance(value, bool) else str(value))
        flags += ["--set", f"build.{field.name}={text}"]
    return flags


def world(config, raw_dir: str, logs_dir: str, progress=None, marker_name: str = WORLD_MARKER) -> Dict:
    """Generates the world of ``config.world_flags()`` (a bool flag: --name / --no-name) unless ``raw_dir`` holds
    one of the same flags (the marker file) and ``config.reuse_world``."""
    flags = config.world_flags()
    marker = os.path.join(raw_dir, marker_name)
    if config.reuse_world and os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("flags") == flags:
            _log(progress, f"world: reusing {raw_dir} (same parameters)")
            return {**previous["row"], "reused": True}
    if os.path.isdir(raw_dir):
        shutil.rmtree(raw_dir)
    args = ["world", "--out", raw_dir]
    for name, value in flags.items():
        flag = name.replace("_", "-")
        args += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    _log(progress, f"world: {' '.join(args)}")
    row = run_cli(args, os.path.join(logs_dir, "world"), config.timeout_s)
    summary = last_json(os.path.join(logs_dir, "world.out")) or {}
    for key in ("num_events", "num_clicks", "num_impressions", "history_length_mean", "history_length_max",
                "num_items", "num_users", "positive_rate"):
        if key in summary:
            row[key] = summary[key]
    if row["ok"]:
        with open(marker, "w", encoding="utf-8") as f:
            json.dump({"flags": flags, "row": row}, f, indent=2)
    return {**row, "reused": False}


def build(config, raw_dir: str, data_dir: str, length: int, logs_dir: str, flags: Optional[List[str]] = None) -> Dict:
    """One ``seminar-tf build`` at max_history ``length`` (``flags``: default the preset's, ``build_flags``): time,
    events/s, peak RSS, bytes, CTR samples."""
    if os.path.isdir(data_dir):
        shutil.rmtree(data_dir)
    flags = flags or build_flags(length)
    row = {"L": length, **run_cli(["build", "--input", raw_dir, "--output", data_dir, *flags],
                                  os.path.join(logs_dir, f"build_L{length}"), config.timeout_s)}
    stats_path = os.path.join(data_dir, "stats.json")
    if not row["ok"] or not os.path.exists(stats_path):
        row["ok"] = False
        row.setdefault("error", "no stats.json written")
        return row
    total, by_dir = directory_bytes(data_dir)
    row.update(bytes_total=total, bytes_by_dir=by_dir)
    try:
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        events = int(stats["rows_read"]["events"])
        ctr = {split: int(n) for split, n in stats["samples"].get("ctr", {}).items()}
        by_kind = {kind: sum(int(n) for n in splits.values()) for kind, splits in stats["samples"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # a stats.json of another shape
        row.update(ok=False, error=f"stats.json unreadable: {type(error).__name__}: {error}")
        return row
    samples = sum(ctr.values())
    row.update(events_read=events, events_per_s=round(events / row["wall_s"], 1) if row["wall_s"] else None,
               ctr_samples=samples, ctr_samples_by_split=ctr, samples_by_kind=by_kind,
               bytes_per_ctr_sample=round(total / samples, 1) if samples else None)
    return row


def epoch_times(model_dir: str) -> Dict[str, List[float]]:
    """Per-epoch values of ``EPOCH_TIME_TAGS`` from the run's TensorBoard logs (``tensorboard/train``), in epoch
    order; empty when the run wrote none."""
    import tensorflow as tf

    values: Dict[str, Dict[int, float]] = {tag: {} for tag in EPOCH_TIME_TAGS}
    for path in sorted(glob.glob(os.path.join(model_dir, "tensorboard", "train", "events.out.tfevents*"))):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    tag = value.tag[len("epoch_"):] if value.tag.startswith("epoch_") else value.tag
                    if tag in values:
                        number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                                  else float(value.simple_value))
                        values[tag][int(event.step)] = number
        except tf.errors.DataLossError:  # a killed run's last record may be cut
            continue
    return {tag: [round(by_step[s], 4) for s in sorted(by_step)] for tag, by_step in values.items() if by_step}


def finetune(config: LongSeqBenchConfig, data_dir: str, runs_dir: str, model: str, length: int, logs_dir: str, *,
             batch_size: int, epochs: int, steps_per_epoch: int, validation_steps: int,
             variant: Optional[str] = None) -> Dict:
    """One ``seminar-tf finetune`` from scratch; peak RSS and every epoch's wall time (the last one's throughput).
    ``variant``: one more ``--set SECTION.FIELD=VALUE`` (the row keeps it in ``variant``)."""
    name = f"{model}_L{length}_b{batch_size}"
    if variant:
        name += "_" + "".join(ch if ch.isalnum() else "_" for ch in variant)
    model_dir = os.path.join(runs_dir, name)
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)  # a left-over backup would resume instead of train
    args = ["finetune", "--data", data_dir, "--model-dir", model_dir, "--config", PRESET, "--model", model,
            "--no-pretrain", "--set", f"build.max_history={length}", "--epochs", str(epochs),
            "--set", f"finetune.steps_per_epoch={steps_per_epoch}",
            "--set", f"finetune.validation_steps={validation_steps}", "--batch-size", str(batch_size)]
    if variant:
        args += ["--set", variant]
    row = {"model": model, "variant": variant, "L": length, "batch_size": batch_size, "epochs": epochs,
           "steps_per_epoch": steps_per_epoch, "validation_steps": validation_steps,
           **run_cli(args, os.path.join(logs_dir, name), config.timeout_s)}
    try:
        times = epoch_times(model_dir) if os.path.isdir(model_dir) else {}
    except Exception as error:  # noqa: BLE001  (unreadable logs: fall back to the printed last epoch)
        times, row["tensorboard_error"] = {}, f"{type(error).__name__}: {error}"
    if not times.get("epoch_time_s"):
        last = last_json(os.path.join(logs_dir, name + ".out")) or {}  # the CLI prints the last epoch's logs
        times = {tag: [round(float(last[tag]), 4)] for tag in EPOCH_TIME_TAGS if tag in last}
        row["epoch_times_from"] = "stdout (last epoch only)" if times else None
    else:
        row["epoch_times_from"] = "tensorboard"
    row["epoch_time_s"] = times.get("epoch_time_s", [])
    row["epoch_train_time_s"] = times.get("epoch_train_time_s", [])
    row["epochs_run"] = len(row["epoch_time_s"]) if row["epoch_times_from"] == "tensorboard" else None
    if row["epoch_time_s"]:
        last_s, train_s = row["epoch_time_s"][-1], (row["epoch_train_time_s"] or [None])[-1]
        trained = steps_per_epoch * batch_size
        row["last_epoch_s"] = last_s
        row["train_samples_per_s"] = round(trained / last_s, 1) if last_s > 0 else None
        row["samples_per_s_with_validation"] = (round((trained + validation_steps * batch_size) / last_s, 1)
                                                if last_s > 0 else None)
        row["train_step_samples_per_s"] = round(trained / train_s, 1) if train_s else None
    if row["ok"] and row["epochs_run"] is not None and row["epochs_run"] < epochs:
        row["ok"] = False
        row["error"] = (f"ran {row['epochs_run']} of {epochs} epochs (training split shorter than "
                        f"{epochs}x{steps_per_epoch} batches of {batch_size}, or early stopping)")
    return row


# ---------------------------------------------------------------------------------------------- targets, ratios
def _find(rows: Sequence[Dict], **match) -> Optional[Dict]:
    match.setdefault("variant", None)  # the preset's own row unless a variant is asked for
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _ratio(a, b, digits=3) -> Optional[float]:
    return round(a / b, digits) if a is not None and b else None


def targets(builds: Sequence[Dict], cells: Sequence[Dict], peaks: Sequence[Dict]) -> List[Dict]:
    """The project's targets at L = ``TARGET_LENGTH``: measured value and met (None: not measured at that L or at
    the target's batch, or the timed run failed; a failed batch-256 run is a miss)."""
    length = TARGET_LENGTH
    out = []
    b = _find(builds, L=length)
    value = b.get("bytes_per_ctr_sample") if b and b.get("ok") else None
    out.append({"target": f"bytes per CTR sample at L={length:,} <= 7 KiB ({TARGET_BYTES_PER_CTR_SAMPLE:,} B; "
                          "whole dataset on disk / CTR samples)",
                "measured": value, "unit": "B", "limit": TARGET_BYTES_PER_CTR_SAMPLE,
                "met": None if value is None else value <= TARGET_BYTES_PER_CTR_SAMPLE,
                "why": None if b is None or b.get("ok") else f"the build failed ({b.get('error')})"})
    p = _find(peaks, model="seminar", L=length)
    value = p.get("peak_rss_bytes") if p else None
    why = None if p is None or p["ok"] else f"the run failed ({p.get('error')})"
    if p is not None and p["batch_size"] != 256:
        value, why = None, f"measured at batch {p['batch_size']}, not 256"
    out.append({"target": f"SEMINAR finetune at batch 256, L={length:,}: peak RSS <= 4 GiB",
                "measured": value, "unit": "B", "limit": TARGET_PEAK_RSS_BYTES,
                "met": None if value is None else bool(p["ok"] and value <= TARGET_PEAK_RSS_BYTES), "why": why})
    c = _find(cells, model="seminar", L=length)
    value = c.get("last_epoch_s") if c else None
    why = None if c is None or c["ok"] else c.get("error")
    if c is not None and (c["batch_size"], c["steps_per_epoch"], c["epochs"]) != (64, 2, 3):
        why = (f"measured with {c['epochs']} epochs of {c['steps_per_epoch']} steps at batch {c['batch_size']}, "
               "not 3 of 2 at 64")
    out.append({"target": f"SEMINAR third epoch at L={length:,} (2 steps of 64) <= {TARGET_EPOCH_S} s "
                          f"(>= {TARGET_TRAIN_SAMPLES_PER_S} training samples/s)",
                "measured": value, "unit": "s", "limit": TARGET_EPOCH_S,
                "samples_per_s": c.get("train_samples_per_s") if c else None,
                "met": None if value is None or why else value <= TARGET_EPOCH_S, "why": why})
    for t in out:
        if t["measured"] is None and not t["why"]:
            t["why"] = f"not measured at L={length:,}"
    return out


def ratios(builds: Sequence[Dict], cells: Sequence[Dict], peaks: Sequence[Dict]) -> List[Dict]:
    """Ratios of quantities measured in this run: longest over shortest L, SEMINAR over DIN."""
    out = []
    ok_builds = [b for b in builds if b.get("ok")]
    if len(ok_builds) >= 2:
        short, long = min(ok_builds, key=lambda b: b["L"]), max(ok_builds, key=lambda b: b["L"])
        where = f"L={long['L']:,} over L={short['L']:,}"
        for key, what in (("bytes_per_ctr_sample", "bytes per CTR sample"), ("bytes_total", "dataset bytes"),
                          ("wall_s", "build wall time"), ("peak_rss_bytes", "build peak RSS")):
            out.append({"what": f"{what}, {where}", "value": _ratio(long.get(key), short.get(key))})
    for model in sorted({c["model"] for c in cells}):
        ok = [c for c in cells if c["model"] == model and c["ok"] and not c.get("variant")]
        if len(ok) >= 2:
            short, long = min(ok, key=lambda c: c["L"]), max(ok, key=lambda c: c["L"])
            where = f"{model}, L={long['L']:,} over L={short['L']:,}"
            out.append({"what": f"training peak RSS, {where}",
                        "value": _ratio(long["peak_rss_bytes"], short["peak_rss_bytes"])})
            out.append({"what": f"last epoch time, {where}", "value": _ratio(long.get("last_epoch_s"),
                                                                             short.get("last_epoch_s"))})
    for kind, rows in (("training", cells), (f"batch {peaks[0]['batch_size']}" if peaks else "peak", peaks)):
        for length in sorted({r["L"] for r in rows}):
            seminar, din = _find(rows, model="seminar", L=length), _find(rows, model="din", L=length)
            if seminar and din and seminar["ok"] and din["ok"]:
                out.append({"what": f"SEMINAR over DIN peak RSS, {kind}, L={length:,}",
                            "value": _ratio(seminar["peak_rss_bytes"], din["peak_rss_bytes"])})
                if kind == "training":
                    out.append({"what": f"SEMINAR over DIN last epoch time, L={length:,}",
                                "value": _ratio(seminar.get("last_epoch_s"), din.get("last_epoch_s"))})
    for cell in cells:
        seminar = _find(cells, model=cell["model"], L=cell["L"])
        if cell.get("variant") and cell["ok"] and seminar and seminar["ok"]:
            where = f"{cell['model']}, L={cell['L']:,}"
            out.append({"what": f"last epoch time, {where}, preset over {cell['variant']}",
                        "value": _ratio(seminar.get("last_epoch_s"), cell.get("last_epoch_s"))})
            out.append({"what": f"training peak RSS, {where}, preset over {cell['variant']}",
                        "value": _ratio(seminar["peak_rss_bytes"], cell["peak_rss_bytes"])})
    return out


# ---------------------------------------------------------------------------------------------- run
def run(config: LongSeqBenchConfig, *, out_dir: str, work_dir: str,
        progress: Optional[Callable[[str], None]] = None) -> str:
    """Runs every step (a failed one is recorded and skipped over); writes ``out_dir/longseq.json`` and
    ``longseq.md``; returns the Markdown."""
    revision = stamp.commit()
    started = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]  # other work on the machine skews absolute times
    raw_dir, logs_dir, runs_dir = (os.path.join(work_dir, d) for d in ("raw", "logs", "runs"))
    world_row = world(config, raw_dir, logs_dir, progress)
    _log(progress, f"world: {world_row}")
    builds, cells, peaks = [], [], []
    if world_row["ok"]:
        for length in config.lengths:
            data_dir = os.path.join(work_dir, f"data_L{length}")
            _log(progress, f"build at L={length}")
            builds.append(build(config, raw_dir, data_dir, length, logs_dir))
            _log(progress, f"build L={length}: " + json.dumps({k: v for k, v in builds[-1].items()
                                                                if k not in ("stderr_tail", "bytes_by_dir")}))
            if not builds[-1]["ok"]:
                continue
            for model in config.models:
                _log(progress, f"finetune {model} at L={length}, batch {config.batch_size}")
                cells.append(finetune(config, data_dir, runs_dir, model, length, logs_dir,
                                      batch_size=config.batch_size, epochs=config.epochs,
                                      steps_per_epoch=config.steps_per_epoch,
                                      validation_steps=config.validation_steps))
                _log(progress, f"{model} L={length}: ok={cells[-1]['ok']} peak RSS "
                               f"{cells[-1]['peak_rss_bytes'] / GIB:.2f} GiB, epochs {cells[-1]['epoch_time_s']} s")
        longest = max((b for b in builds if b["ok"]), key=lambda b: b["L"], default=None)
        if longest is not None and "seminar" in config.models:
            for variant in config.seminar_variants:
                _log(progress, f"finetune seminar --set {variant} at L={longest['L']}, batch {config.batch_size}")
                cells.append(finetune(config, os.path.join(work_dir, f"data_L{longest['L']}"), runs_dir, "seminar",
                                      longest["L"], logs_dir, batch_size=config.batch_size, epochs=config.epochs,
                                      steps_per_epoch=config.steps_per_epoch,
                                      validation_steps=config.validation_steps, variant=variant))
        if longest is not None:
            for model in config.models:
                _log(progress, f"finetune {model} at L={longest['L']}, batch {config.peak_batch_size} (peak RSS)")
                peaks.append(finetune(config, os.path.join(work_dir, f"data_L{longest['L']}"), runs_dir, model,
                                      longest["L"], logs_dir, batch_size=config.peak_batch_size, epochs=1,
                                      steps_per_epoch=1, validation_steps=1))
                _log(progress, f"{model} batch {config.peak_batch_size}: ok={peaks[-1]['ok']} peak RSS "
                               f"{peaks[-1]['peak_rss_bytes'] / GIB:.2f} GiB")
    report = {
        "benchmark": "longseq", **stamp.stamp(config.command(), revision),
        "preset": PRESET,
        "config": dataclasses.asdict(config),
        "world_flags": config.world_flags(),
        "world": world_row,
        "builds": builds,
        "training": cells,
        "peak": peaks,
        "targets": targets(builds, cells, peaks),
        "ratios": ratios(builds, cells, peaks),
        "units": {"bytes": "B; KiB = 1024 B, GiB = 1024^3 B", "peak_rss": "ru_maxrss of the child (os.wait4), "
                  "KiB on Linux, stored in B", "train_samples_per_s": "steps_per_epoch x batch_size / last epoch's "
                  "wall time (training steps + validation)", "samples_per_s_with_validation": "(steps_per_epoch + "
                  "validation_steps) x batch_size (nominal: a short validation split has fewer) / last epoch's "
                  "wall time", "train_step_samples_per_s": "steps_per_epoch x batch_size / the epoch's training "
                  "steps alone"},
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return stamp.write(report, out_dir, "longseq.json", places={"WORK_DIR": work_dir, "OUT_DIR": out_dir})
