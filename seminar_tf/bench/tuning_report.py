"""A tuning report's Markdown from its JSON alone: how a preset's default was chosen on the validation split
(``seminar-tf render`` re-renders it).

The JSON (``"benchmark": "tuning"``) carries the stamp (command, commit, machine, finished_at), ``title``,
``question``, ``protocol`` (the data and what was held fixed), ``rows`` (one training run each: ``label``,
``settings`` (the ``--set`` values that differ between rows), ``preset``, ``seed``, ``val_auc_by_epoch``,
``ms_per_step`` by epoch, ``command``) and ``choice`` (``setting``, ``where``: the preset(s) that take it,
``why``). The test split is not read in a tuning report.
"""

from __future__ import annotations

from typing import Dict, List, Sequence


def best(values: Sequence[float]):
    """The best validation AUC over the epochs (early stopping keeps that epoch's weights); None when empty."""
    return max(values) if values else None


def _fmt(value, digits=4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _means(rows: Sequence[Dict]) -> List[Dict]:
    """Mean best val AUC per (preset, settings) over the seeds that ran."""
    groups: Dict[tuple, List[Dict]] = {}
    for row in rows:
        groups.setdefault((row.get("preset") or "—", ", ".join(row["settings"]) or "(preset)"), []).append(row)
    out = []
    for (preset, settings), members in groups.items():
        values = [best(r["val_auc_by_epoch"]) for r in members if r["val_auc_by_epoch"]]
        out.append({"preset": preset, "settings": settings, "seeds": len(values),
                    "mean_best_val_auc": sum(values) / len(values) if values else None})
    return out


def markdown(report: Dict) -> str:
    lines = [f"# Tuning: {report['title']}", ""]
    lines.append(f"Command: `{report['command']}`. Commit: {report['commit']}. Machine: {report['machine']}. "
                 f"Finished {report['finished_at']}.")
    lines += ["", f"Question: {report['question']}", "", f"Protocol: {report['protocol']}", ""]
    lines += ["| run | settings | seed | val AUC by epoch | best val AUC | ms per training step by epoch |",
              "|---|---|---:|---|---:|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['label']} | {', '.join(f'`{s}`' for s in row['settings']) or '(preset)'} | "
                     f"{row['seed']} | {', '.join(_fmt(v) for v in row['val_auc_by_epoch']) or '—'} | "
                     f"{_fmt(best(row['val_auc_by_epoch']))} | "
                     f"{', '.join(str(v) for v in row.get('ms_per_step', [])) or '—'} |")
    lines += ["", "Mean of the best validation AUC over seeds:", "",
              "| preset | settings | seeds | mean best val AUC |", "|---|---|---:|---:|"]
    for mean in _means(report["rows"]):
        lines.append(f"| {mean['preset']} | {mean['settings']} | {mean['seeds']} | "
                     f"{_fmt(mean['mean_best_val_auc'])} |")
    choice = report["choice"]
    lines += ["", f"Choice: `{choice['setting']}` in {choice['where']}. {choice['why']}", ""]
    lines += ["Commands, in order: `" + "`, `".join(row["command"] for row in report["rows"]) + "`.", ""]
    return "\n".join(lines)
