"""Benchmark reports as data: every report is a JSON stamped with the commit, the command and the machine, and its
Markdown is rendered from that JSON alone (``render``), so the two never disagree and tests assert on the JSON.

``seminar-tf render PATH.json`` re-renders a committed report's Markdown from its JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import subprocess
import time
from typing import Callable, Dict, Optional, Tuple

from seminar_tf.bench import REPO_ROOT

# benchmark name -> (module, Markdown file written beside the JSON); each module has ``markdown(report) -> str``
RENDERERS: Dict[str, Tuple[str, str]] = {
    "pipeline": ("seminar_tf.bench.pipeline", "pipeline.md"),
    "pq": ("seminar_tf.bench.pq_report", "pq.md"),
    "serving": ("seminar_tf.bench.serving_report", "serving.md"),
    "longseq": ("seminar_tf.bench.longseq_report", "longseq.md"),
    "lifelong": ("seminar_tf.bench.lifelong_report", "lifelong.md"),
    "movielens": ("seminar_tf.bench.movielens", "REPORT.md"),
    "report": ("seminar_tf.report_render", "REPORT.md"),
    "tuning": ("seminar_tf.bench.tuning_report", "tuning.md"),
}


def commit() -> str:
    """HEAD of the repository this package runs from, marked when tracked files differ from it; "unknown" outside
    a git checkout."""
    try:
        head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True)
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> str:
    import tensorflow as tf

    return (f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or platform.platform()}), "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}")


def stamp(command: str, revision: Optional[str] = None) -> dict:
    """The provenance fields every report JSON carries: command, commit (``revision``, read before the run wrote
    its outputs; default: ``commit()`` now), machine, finished_at (UTC)."""
    return {"command": command, "commit": revision or commit(), "machine": machine(),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def benchmark_of(report: dict) -> str:
    """The report's kind: its ``benchmark`` field (the grid report of ``seminar-tf report`` writes "report")."""
    kind = report.get("benchmark") or ("report" if "cells" in report else None)
    if kind not in RENDERERS:
        raise ValueError(f"not a seminar-tf benchmark report (benchmark={kind!r}); known: {sorted(RENDERERS)}")
    return kind


def render(report: dict) -> str:
    """The report's Markdown, from its JSON payload alone."""
    module, _ = RENDERERS[benchmark_of(report)]
    return importlib.import_module(module).markdown(report)


def round_trip(report: dict, default: Optional[Callable] = None) -> dict:
    """The payload as it reads back from its JSON file (what ``render`` sees when re-rendering)."""
    return json.loads(json.dumps(report, default=default))


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # a killed run never leaves a half-written report


def portable(report: dict, places: Optional[Dict[str, Optional[str]]] = None) -> dict:
    """The payload with this machine's paths taken out: a path under one of ``places`` (token -> directory, e.g.
    {"WORK_DIR": "/scratch/ml"}) is written TOKEN/rest when that directory lies outside the repository, and every
    other path inside the repository is written relative to it. A committed report then names no machine path."""
    root = os.path.realpath(REPO_ROOT)
    prefixes = []
    for token, directory in (places or {}).items():
        if directory:
            absolute = os.path.abspath(os.path.expanduser(directory))
            if not (absolute + os.sep).startswith(root + os.sep):
                prefixes.append((absolute, token))
    prefixes.sort(key=lambda pair: -len(pair[0]))  # the deepest directory first (an input under a cache)
    text = json.dumps(report)
    for absolute, token in prefixes:
        text = re.sub(re.escape(json.dumps(absolute)[1:-1]) + r'(?=[/"\s]|$)', token, text)
    text = re.sub(re.escape(json.dumps(root + os.sep)[1:-1]), "", text)
    text = re.sub(re.escape(json.dumps(root)[1:-1]) + r'(?=["\s]|$)', ".", text)
    return json.loads(text)


def write(report: dict, out_dir: str, json_name: str, default: Optional[Callable] = None,
          places: Optional[Dict[str, Optional[str]]] = None) -> str:
    """Writes ``out_dir/json_name`` and the Markdown rendered from it (the JSON as read back), each replaced
    atomically; returns the Markdown. With ``places`` (the directories given on the command line), machine paths
    are taken out first (``portable``), for a report that nothing reads paths back from."""
    payload = round_trip(report, default)
    if places is not None:
        payload = portable(payload, places)
    os.makedirs(out_dir, exist_ok=True)
    _write_text(os.path.join(out_dir, json_name), json.dumps(payload, indent=2) + "\n")
    text = render(payload)
    _write_text(os.path.join(out_dir, RENDERERS[benchmark_of(payload)][1]), text)
    return text


def render_file(json_path: str, out: Optional[str] = None) -> str:
    """Re-renders a report JSON's Markdown (default: the benchmark's Markdown file beside it); returns its path."""
    with open(json_path, encoding="utf-8") as f:
        report = json.load(f)
    path = out or os.path.join(os.path.dirname(json_path) or ".", RENDERERS[benchmark_of(report)][1])
    _write_text(path, render(report))
    return path
