"""REPORT.md and the figures of ``seminar-tf report``, from the report's JSON payload (``markdown``; the row
descriptions come from ``report_tables.ROWS``)."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from seminar_tf.report_tables import ROWS, TABLE_METRICS, format_mean_std

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 20 distinct colours: a full grid has more rows than the default cycle's 10
    plt.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=[plt.cm.tab20(i) for i in range(20)])
    return plt


def plot_learning_curves(cells: Dict[str, List[dict]], path: str, metric: str = "val_auc") -> Optional[str]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    drawn = 0
    for row, finished in cells.items():
        curves = [c["history"].get(metric) for c in finished if c.get("history", {}).get(metric)]
        if not curves:
            continue
        length = max(len(c) for c in curves)
        mean = [np.mean([c[i] for c in curves if len(c) > i]) for i in range(length)]
        ax.plot(range(1, length + 1), mean, marker="o", label=row)
        drawn += 1
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (mean over seeds)")
    ax.set_title("Learning curves")
    if drawn:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_bars(values: Dict[str, Dict[str, dict]], path: str, title: str, ylabel: str,
              xlabel: str = "") -> str:
    """values: {group (x tick): {series: {"mean", "std"}}} as grouped bars with seed-std error bars."""
    plt = _plt()
    groups = list(values)
    series = list(dict.fromkeys(s for g in values.values() for s in g))
    fig, ax = plt.subplots(figsize=(min(12, max(6, 0.8 * len(groups) * max(1, len(series)) / 3)), 4.5))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        means = [values[g].get(name, {}).get("mean", np.nan) for g in groups]
        stds = [values[g].get(name, {}).get("std", 0.0) for g in groups]
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, means, width, yerr=stds, label=name)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    finite = [v.get("mean") for g in values.values() for v in g.values()
              if v.get("mean") is not None and np.isfinite(v.get("mean"))]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.05))
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_recall(recall: dict, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = recall["ks"]
    for row in recall["rows"]:
        ax.plot(ks, [row[f"recall@{k}"] for k in ks], marker="o", label=f"{row['codebooks']} {row['method']}")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("top-K recall vs exact GSU")
    ax.set_title(f"PQ recall, L={recall['L']} (seminar run, seed 0)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def markdown(report: dict) -> str:
    from seminar_tf.evaluate import format_interval_table, format_markdown_table

    tables = report["tables"]
    rows = [r for r in report["rows"] if r in tables["metrics"]]
    lines = [f"# SEMINAR comparison grid ({report['preset']} config)", "",
             f"Command: `{report['command']}`", "",
             *(["The cells were trained by: " + "; ".join(f"`{c}`" for c in report["grid_commands"]), ""]
               if report.get("grid_commands") and report["grid_commands"] != [report["command"]] else []),
             *([report["note"], ""] if report.get("note") else []),
             f"Machine: {report['machine']}. Wall time of this invocation {report['wall_seconds']:.0f} s "
             f"(cells reused with --resume: {len(report['reused'])}; summed cell time "
             f"{report['cell_seconds']:.0f} s; grid span {report['grid_span']}). Finished {report['finished_at']}.",
             "",
             f"Data: `{report['data']}` ({report['dataset']}). Config: {report['config_summary']}", "",
             *([f"`{report['config']}`:", "", "```yaml", report["config_text"].rstrip(), "```", ""]
               if report.get("config_text") else []),
             f"Seeds: {report['seeds']} (model init, data order); the world and dataset are fixed. "
             "Values are mean ± sample std over the seeds that finished (n column).", "",
             "## Rows", "", format_markdown_table(
                 [{"row": r, "what": ROWS[r].description} for r in report["rows"]], ["row", "what"]),
             "PSU: shared by the rows with the same pretraining config at a seed; the baselines (DIN, SIM, ETA, "
             "TWIN) are trained from scratch as in the paper, so `seminar_no_pretrain` is their "
             "architecture-only counterpart. " + report["pq_note"], "",
             "## Test metrics", "",
             "AUC, GAUC, logloss on ctr/test; HIT/NDCG@K and MRR: each pretrain/test next pair against "
             f"{report['num_negatives']} sampled negatives (NDCG@1 = HIT@1).", ""]
    columns = ["model", "n"] + [m.upper() for m in TABLE_METRICS]
    table_rows = []
    for r in rows:
        stats = tables["metrics"][r]
        entry = {"model": r, "n": stats["auc"]["n"],
                 "val AUC rising at last epoch": "yes" if tables["still_improving"].get(r) else "no"}
        entry.update({c: format_mean_std(stats[m]) for c, m in zip(columns[2:], TABLE_METRICS)})
        table_rows.append(entry)
    pop = tables["popularity"].get(rows[0]) if rows else None
    if pop:
        entry = {"model": "popularity (reference)", "n": pop["auc"]["n"]}
        entry.update({c: format_mean_std(pop[m]) for c, m in zip(columns[2:], TABLE_METRICS)})
        table_rows.append(entry)
    lines += [format_markdown_table(table_rows, columns + ["val AUC rising at last epoch"]),
              "Last column: yes when every seed's validation AUC rose in the last epoch (still learning when the "
              "epoch budget ran out; early stopping keeps the best epoch's weights otherwise).", ""]

    sizes = report["subset_sizes"]
    lines += ["## Cold-id subset", "",
              f"Cold ids: item ids that never occur as a target in ctr/train ({report['cold_ids']} of "
              f"{report['num_items']} item rows). **cold**: ctr/test samples whose history holds at least one "
              f"({sizes['cold']} of {sizes['all']} samples); **warm**: the others ({sizes['warm']}). Because "
              "most histories hold some cold id, the samples are also split at the median share of cold ids in "
              f"the history ({report['cold_share_median']:.3f}): **high** ({sizes['cold_share_high']}) vs "
              f"**low** ({sizes['cold_share_low']}). **cold target**: samples whose target item is a cold id "
              f"({sizes.get('cold_target', 0)}); **warm target**: the others ({sizes.get('warm_target', 0)}).", ""]
    names = {"cold": "cold", "warm": "warm", "high": "cold_share_high", "low": "cold_share_low",
             "cold target": "cold_target", "warm target": "warm_target"}
    columns = ["model"] + [f"{s} AUC" for s in names] + ["cold GAUC", "cold logloss"]
    table_rows = []
    for r in rows:
        entry = {"model": r}
        for short, subset in names.items():
            entry[f"{short} AUC"] = format_mean_std(tables.get(f"subset:{subset}", {}).get(r, {}).get("auc"))
        entry["cold GAUC"] = format_mean_std(tables.get("subset:cold", {}).get(r, {}).get("gauc"))
        entry["cold logloss"] = format_mean_std(tables.get("subset:cold", {}).get(r, {}).get("logloss"))
        table_rows.append(entry)
    lines += [format_markdown_table(table_rows, columns), ""]

    buckets = [k.split(":", 1)[1] for k in tables if k.startswith("subset:length")]
    lines += ["## AUC by history length", "",
              "ctr/test samples bucketed by history length (quantile edges, [lo, hi)); sizes: " + ", ".join(
                  f"{b} {sizes.get(b, 0)}" for b in buckets) + ".", ""]
    columns = ["model"] + buckets
    table_rows = [{"model": r, **{b: format_mean_std(tables[f"subset:{b}"].get(r, {}).get("auc")) for b in buckets}}
                  for r in rows]
    lines += [format_markdown_table(table_rows, columns), ""]

    recall = report.get("pq_recall")
    lines += ["## PQ top-K recall", ""]
    if recall and recall.get("rows"):
        lines += [f"On the seminar run's (seed 0) final embeddings, `seminar_tf.bench.pq` recall code: "
                  f"{recall['targets']} ctr/test targets, random histories of L={recall['L']} pairs; "
                  "recall@K = share of the PQ top K whose exact score reaches the exact K-th score.", ""]
        columns = ["codebooks", "method"] + [f"recall@{k}" for k in recall["ks"]]
        lines += [format_markdown_table(recall["rows"], columns), ""]
    else:
        lines += [f"Not computed: {recall.get('error') if recall else 'no finished seminar run'}", ""]

    paired = report.get("paired_auc")
    if paired:
        first = next(iter(paired.values()))
        lines += ["## Paired test-AUC differences against seminar", "",
                  f"seminar's test AUC minus each row's (means over the finished seeds), with a paired bootstrap "
                  f"over the {first['users']} test users ({first['draws']} draws; each draw reweights every sample "
                  "by how often its user was drawn and recomputes both AUCs). The interval reflects which users the "
                  "test split holds, not the seeds: where it holds 0, this test split cannot tell the two rows "
                  "apart.", ""]
        lines += [format_interval_table(paired, "seminar − row"), ""]
    lines += ["## Checks", "", "Expected on the planted world; each stated with this run's numbers.", ""]
    lines += [format_markdown_table(report["checks"], ["claim", "status", "detail"]), ""]
    if report["failed"]:
        lines += ["## Failed cells", "", format_markdown_table(report["failed"], ["cell", "error"]), ""]
    if report["missing"]:
        lines += [f"Cells without a finished run (not run, killed, or --report-only): "
                  f"{', '.join(report['missing'])}.", ""]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in report["plots"]] + [""]
    return "\n".join(lines)
