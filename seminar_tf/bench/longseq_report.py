"""longseq.md from the long-sequence benchmark's report JSON alone (``seminar_tf.bench.longseq`` measures;
``seminar-tf render`` re-renders)."""

from __future__ import annotations

from typing import Dict, List, Optional

KIB = 1024
MIB = 1024 ** 2
GIB = 1024 ** 3


def _fmt(value, digits=2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _gib(value: Optional[int]) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def _size(value: Optional[int]) -> str:
    """Bytes in the largest binary unit that keeps them >= 1 (B, KiB, MiB, GiB)."""
    if value is None:
        return "—"
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,} B"


def _measured(t: Dict) -> str:
    value = t.get("measured")
    if value is None:
        return "—"
    if t.get("unit") == "B" and t.get("limit", 0) >= GIB:
        return f"{value / GIB:.2f} GiB ({value:,} B)"
    if t.get("unit") == "B":
        return f"{value / KIB:,.2f} KiB ({value:,.0f} B)"
    text = f"{value:.3f} {t.get('unit', '')}".strip()
    if t.get("samples_per_s") is not None:
        text += f" ({t['samples_per_s']:,.0f} training samples/s)"
    return text


def _met(t: Dict) -> str:
    return "not measured" if t.get("met") is None else "met" if t["met"] else "missed"


def _status(row: Dict) -> str:
    return "ok" if row.get("ok") else f"failed: {row.get('error') or 'exit code ' + str(row.get('returncode'))}"


def _epochs(values: List[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values) if values else "—"


def markdown(report: Dict) -> str:
    config, flags, world = report["config"], report["world_flags"], report["world"]
    lines = [
        "# Lifelong sequences: dataset size, build and training at long L",
        "",
        f"Command: `{report['command']}` ({report['machine']}). Wall time {report['wall_s']:.0f} s.",
        f"Commit: {report.get('commit', 'not recorded')}. Finished {report.get('finished_at', '—')}.",
        f"Load average (1/5/15 min) before: {report['load_average_before']}, after: {report['load_average_after']}.",
        "",
        f"Every step is the real CLI in its own child process (build and fine-tuning config: the "
        f"`{report['preset']}` preset); peak RSS is that process's own (`ru_maxrss` from `os.wait4`). "
        "KiB = 1,024 B, MiB = 1,024² B, GiB = 1,024³ B.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {_measured(t)} | {_met(t)} |")
    notes = [f"- {t['target']}: {t['why']}" for t in report["targets"]
             if t.get("met") is not True and t.get("why") and not t["why"].startswith("not measured")]
    lines += ([""] + notes if notes else [])
    lines += [
        "",
        "## World",
        "",
        "`seminar-tf world " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()) + "`"
        + (" (reused from an earlier run: its time and memory are that run's)" if world.get("reused") else ""),
        "",
        "| events | clicks | impressions | mean history | longest history | wall s | peak RSS GiB | status |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {_fmt(world.get('num_events'))} | {_fmt(world.get('num_clicks'))} | {_fmt(world.get('num_impressions'))} | "
        f"{_fmt(world.get('history_length_mean'), 0)} | {_fmt(world.get('history_length_max'))} | "
        f"{_fmt(world.get('wall_s'), 1)} | {_gib(world.get('peak_rss_bytes'))} | {_status(world)} |",
        "",
        "## Build (`seminar-tf build --max-history L`)",
        "",
        "Bytes: the regular files of the dataset directory. Bytes per CTR sample: all of them over the CTR samples "
        "of every split (stats.json).",
        "",
        "| L | events read | wall s | events/s | peak RSS GiB | dataset size | CTR samples | bytes per CTR sample | "
        "status |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    builds = report["builds"]
    for b in builds:
        lines.append(f"| {b['L']:,} | {_fmt(b.get('events_read'))} | {_fmt(b.get('wall_s'), 1)} | "
                     f"{_fmt(b.get('events_per_s'), 0)} | {_gib(b.get('peak_rss_bytes'))} | "
                     f"{_size(b.get('bytes_total'))} | {_fmt(b.get('ctr_samples'))} | "
                     f"{_fmt(b.get('bytes_per_ctr_sample'), 0)} | {_status(b)} |")
    directories = []
    for b in builds:
        for name in b.get("bytes_by_dir") or {}:
            if name not in directories:
                directories.append(name)
    if directories:
        lines += ["", "Bytes on disk per top-level entry of the dataset:", "",
                  "| entry | " + " | ".join(f"L={b['L']:,}" for b in builds if b.get("bytes_by_dir")) + " |",
                  "|---|" + "---:|" * sum(1 for b in builds if b.get("bytes_by_dir"))]
        for name in directories:
            lines.append(f"| {name} | " + " | ".join(_size(b["bytes_by_dir"].get(name)) for b in builds
                                                     if b.get("bytes_by_dir")) + " |")
    lines += [
        "",
        f"## Fine-tuning (`seminar-tf finetune --no-pretrain`, {config['epochs']} epochs of "
        f"{config['steps_per_epoch']} steps at batch {config['batch_size']}, {config['validation_steps']} "
        "validation step)",
        "",
        "Epoch times are wall seconds from the epoch's start to its end (training steps and validation; the "
        "trainer's `epoch_time_s`). Training samples/s: steps x batch over the last epoch's time; with "
        "validation: (steps + validation steps) x batch over the same time; training steps only: steps x batch "
        "over the last epoch's training part alone.",
        "",
        "| model | L | peak RSS GiB | epoch times s | training samples/s | with validation | training steps "
        "only | process wall s | status |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for c in report["training"]:
        model = c["model"] + (f" (`--set {c['variant']}`)" if c.get("variant") else "")
        lines.append(f"| {model} | {c['L']:,} | {_gib(c.get('peak_rss_bytes'))} | "
                     f"{_epochs(c.get('epoch_time_s') or [])} | {_fmt(c.get('train_samples_per_s'), 0)} | "
                     f"{_fmt(c.get('samples_per_s_with_validation'), 0)} | "
                     f"{_fmt(c.get('train_step_samples_per_s'), 0)} | {_fmt(c.get('wall_s'), 1)} | {_status(c)} |")
    peaks = report["peak"]
    if peaks:
        lines += ["", f"## Peak memory at batch {peaks[0]['batch_size']} (one training step, one validation step)",
                  "", "| model | L | peak RSS GiB | process wall s | status |", "|---|---:|---:|---:|---|"]
        for p in peaks:
            lines.append(f"| {p['model']} | {p['L']:,} | {_gib(p.get('peak_rss_bytes'))} | "
                         f"{_fmt(p.get('wall_s'), 1)} | {_status(p)} |")
    if report["ratios"]:
        lines += ["", "## Ratios (same run)", "", "| ratio | value |", "|---|---:|"]
        lines += [f"| {r['what']} | {_fmt(r['value'], 3)} |" for r in report["ratios"]]
    failed = [r for r in [world, *builds, *report["training"], *peaks] if not r.get("ok")]
    if failed:
        lines += ["", "## Failed steps", ""]
        for r in failed:
            lines.append(f"- `{r['command']}`: {_status(r)}; peak RSS {_gib(r.get('peak_rss_bytes'))} GiB"
                         + (f"; stderr ends: `{r['stderr_tail'].splitlines()[-1]}`" if r.get("stderr_tail") else ""))
    lines += ["", "Commands, in order: `" + "`, `".join(r["command"] for r in [world, *builds, *report["training"],
                                                                              *peaks] if r.get("command")) + "`."]
    return "\n".join(lines) + "\n"
