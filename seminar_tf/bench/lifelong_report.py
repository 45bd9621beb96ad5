"""Markdown of ``seminar-tf bench lifelong`` (``benchmarks/lifelong/lifelong.md``), rendered from its JSON alone."""

from __future__ import annotations

import math
from typing import List, Optional


def _number(value: Optional[float], digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _metric(metric: Optional[dict]) -> str:
    if not metric or not metric.get("n"):
        return "–"
    if metric["n"] > 1:
        return f"{metric['mean']:.4f} ± {metric['std']:.4f}"
    return f"{metric['mean']:.4f}"


def row_key(row: str, length: Optional[int]) -> str:
    """A row's key in ``paired`` and the checks: "row@L" (the row at max_history L), "row" for a reference row."""
    return row if length is None else f"{row}@{length}"


def markdown(report: dict) -> str:
    longest = report["lengths"][-1]
    world = report["world"]
    flags = world.get("flags", {})
    lines: List[str] = [
        "# The lifelong claim: does the far history pay?", "",
        f"Command: `{report['command']}`", "",
        f"Commit: {report['commit']}. Machine: {report['machine']}. Wall time {report['wall_seconds']:.0f} s. "
        f"Finished {report['finished_at']}.", "",
    ]
    if report.get("note"):
        lines += [report["note"], ""]
    samples = report.get("samples") or {}
    lines += [
        "## Protocol", "",
        f"The lifelong world (`seminar-tf world`: {flags.get('num_users')} users, {flags.get('num_items')} items, "
        f"{flags.get('min_history_events')}-{flags.get('max_history_events')} history events per user, "
        f"{flags.get('impressions_per_user')} labelled impressions each, seed {flags.get('seed')}, per-user split), "
        f"built once at L={longest:,}; a row at a shorter L reads the newest L steps of the same samples. CTR samples "
        f"train/valid/test: {samples.get('train')}/{samples.get('valid')}/{samples.get('test')}. Every row: config "
        f"`{report['config']}`" + (f" with {', '.join('`' + o + '`' for o in report['overrides'])}"
                                   if report.get("overrides") else "") +
        f", PSU alignment in chunks of {report['align_chunk_steps']} steps, {report['seeds']} seed(s) per row "
        "(model init and data order), early stopping on valid, the test split read once per row and seed. Values are "
        "the mean ± "
        "sample std over the seeds that finished (n).", "",
        "Oracle rows: the world's true click probability (`world_truth.json`), and the same without its long-term "
        "term (the user's long-term topics appear only in the oldest part of the history). Gap closed = (AUC − "
        "oracle without long term) / (oracle − oracle without long term). Paired: this row's AUC minus SEMINAR's at "
        f"L={longest:,} (means over seeds), 95% interval of a paired bootstrap over users.", "",
        "## Test metrics", "",
        "| row | L | n | AUC | GAUC | logloss | gap closed | minus SEMINAR@" + f"{longest} |",
        "|---|---:|---:|---|---|---|---:|---|",
    ]
    paired = report.get("paired", {})
    for row in report["rows"]:
        diff = paired.get(row_key(row["row"], row["max_history"]))
        versus = "–" if diff is None else (f"{-diff['difference']:+.4f} [{-diff['high']:+.4f}, "
                                          f"{-diff['low']:+.4f}]")
        closed = row.get("gap_closed")
        metrics = row["metrics"]
        length = "–" if row["max_history"] is None else f"{row['max_history']:,}"
        lines.append(f"| {row['row']} | {length} | {row['n']} | {_metric(metrics.get('auc'))} | "
                     f"{_metric(metrics.get('gauc'))} | {_metric(metrics.get('logloss'))} | "
                     f"{'–' if closed is None else f'{closed:.1%}'} | {versus} |")
    lines += ["", "## Checks", "", "| target | status | numbers |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['status']} | {c['numbers']} |" for c in report.get("checks", [])]
    lines += ["", "## Rows", ""]
    seen = set()
    for row in report["rows"]:
        if row["row"] not in seen:
            seen.add(row["row"])
            lines.append(f"- `{row['row']}`: {row['description']}")
    problems = [(length, cell) for length, cells in report.get("failed", {}).items() for cell in cells]
    missing = [(length, cell) for length, cells in report.get("missing", {}).items() for cell in cells]
    if problems or missing:
        lines += ["", "## Cells that did not finish", ""]
        lines += [f"- L={length}: {cell['cell']} failed: {cell['error']}" for length, cell in problems]
        lines += [f"- L={length}: {cell} not run" for length, cell in missing]
    return "\n".join(lines) + "\n"
