"""pq.md from the PQ benchmark's report JSON alone (``seminar_tf.bench.pq`` measures; ``seminar-tf render``
re-renders)."""

from __future__ import annotations

from typing import Dict


def _fmt(value, digits=3):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: Dict) -> str:
    config = report["config"]
    lines = [
        "# Product-quantized GSU: recall, speed, model quality",
        "",
        f"Command: `{report['command']}` ({report['machine']}; TF {report['tensorflow']}, faiss "
        f"{report['faiss']}). Wall time {report['wall_s']:.0f} s. docs/design.md §5 has the math; issue 4 the "
        "targets.",
        "",
    ]
    targets = report["targets"]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    lines += [""] + [f"- {t['target']}: {t['why']}" for t in targets if not t["met"] and t.get("why")] + [""]

    quality = report["quality"]
    lines += [
        f"## Model quality (synthetic world, `{quality['preset']}` preset; K={quality['top_k']}, "
        f"L≤{quality['max_history']})",
        "",
        "Paired rows use the same weights (only the GSU differs). Top-K overlap: share of the exact GSU's K "
        "positions the PQ GSU also keeps, on the test split.",
        "",
        "| variant | test AUC (± s.e.) | AUC − exact | GAUC | logloss | top-K overlap with exact | samples |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in quality["rows"]:
        lines.append(f"| {r['variant']} | {r['auc']:.4f} ± {r['auc_standard_error']:.3f} | "
                     f"{r['auc_minus_exact']:+.4f} | {_fmt(r['gauc'], 4)} | "
                     f"{r['logloss']:.4f} | {_fmt(r.get('top_k_overlap_with_exact'))} | {r['num_samples']} |")
    recall = report["recall"]
    ks = config["recall_ks"]
    lines += [
        "",
        f"## Top-K recall of PQ vs the exact GSU (trained embeddings of the exact run: {recall['num_items']} items, "
        f"{recall['num_queries']} queries, channels {', '.join(recall['channels'])}, d={recall['dim']}; S "
        "sub-spaces per channel, C centroids, bytes per history position)",
        "",
        f"{recall['targets']} CTR test targets, each with its own history of L pairs (items uniform over the "
        f"vocabulary, queries drawn from the {recall['distinct_history_queries']} distinct history queries, "
        "browsing included). Recall@K counts a kept position as a hit when its exact score reaches the exact "
        "K-th score (ties count). Reconstruction error: mean over channels of Σ‖x − x̂‖²/Σ‖x‖².",
        "",
        "| L | codebooks | method | rel. reconstruction error | " + " | ".join(f"recall@{k}" for k in ks) + " |",
        "|---:|---|---|---:|" + "---:|" * len(ks),
    ]
    for r in recall["rows"]:
        lines.append(f"| {r['L']:,} | {r['codebooks']} | {r['method']} | {r['reconstruction_error']:.4f} | "
                     + " | ".join(f"{r[f'recall@{k}']:.3f}" for k in ks) + " |")
    speed = report["speed"]
    methods = []
    for r in speed["rows"]:
        for m in r["ms_per_request"]:
            if m not in methods:
                methods.append(m)
    lines += [
        "",
        f"## Speed per request (catalog {speed['catalog_items']:,} items × {len(speed['channels']) - 1} item "
        f"channels + {speed['catalog_queries']:,} queries, d={speed['dim']}; code sizes: S sub-spaces per channel, "
        "C centroids, bytes per history position)",
        "",
        "Milliseconds per request (one history of L positions, N candidate targets), medians of interleaved "
        "rounds measured in this run. Exact: gather the stored float32 embeddings of every position + matmul. "
        "ADC lookup: gather the packed codes + per-target tables, one lookup per code byte. ADC decode: gather "
        "the codes, decode the centroids, one matmul (the same number, the path for many candidates). SDC: the "
        "paper's formula (target quantized too, centroid-product table, L·M²·S lookups). Scoring only (top-K is "
        "the same for every method).",
        "",
        "| L | N | requests/call | " + " | ".join(methods) + " |",
        "|---:|---:|---:|" + "---:|" * len(methods),
    ]
    for r in speed["rows"]:
        cells = [_fmt(r["ms_per_request"].get(m)) for m in methods]
        lines.append(f"| {r['L']:,} | {r['N']} | {r['requests_per_call']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Speed-up of the fastest ADC formulation of each code size over the faster exact (and over exact in "
        "plain TF):",
        "",
        "| L | N | requests/call | " + " | ".join(speed["variants"]) + " |",
        "|---:|---:|---:|" + "---|" * len(speed["variants"]),
    ]
    for r in speed["rows"]:
        cells = [f"{r['speedup_vs_best_exact'][n]:.2f}× ({r['speedup_vs_exact_tf'][n]:.2f}×)"
                 for n in speed["variants"]]
        lines.append(f"| {r['L']:,} | {r['N']} | {r['requests_per_call']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per history step and target: nanoseconds of scoring per (position, candidate) pair, the request's time "
        "divided by L·N (one request per call), exact in plain TF against the fastest ADC of each code size:",
        "",
        "| L | N | exact (TF) ns | " + " | ".join(f"ADC {n} ns" for n in speed["variants"]) + " |",
        "|---:|---:|---:|" + "---:|" * len(speed["variants"]),
    ]
    for r in speed["rows"]:
        if r["requests_per_call"] != 1 or r["ms_per_request"].get("exact (TF)") is None:
            continue
        pairs = r["L"] * r["N"] / 1e6  # ms → ns per pair
        fastest = r.get("fastest_adc", {})
        cells = [_fmt(r["ms_per_request"][fastest[n]] / pairs, 1) if fastest.get(n) in r["ms_per_request"] else "—"
                 for n in speed["variants"]]
        lines.append(f"| {r['L']:,} | {r['N']} | {_fmt(r['ms_per_request']['exact (TF)'] / pairs, 1)} | "
                     + " | ".join(cells) + " |")
    skipped = sorted({s for r in speed["rows"] for s in r["skipped"]})
    if skipped:
        lines += ["", "Not run where too slow to be useful: " + "; ".join(skipped) + "."]
    memory = speed["bytes_per_position"]
    lines += [
        "",
        "Memory per history position: " + ", ".join(f"{k}: {v} B" for k, v in memory.items())
        + ". Catalog tables: " + ", ".join(f"{k}: {v:.0f} MiB" for k, v in speed["catalog_mib"].items()) + ".",
        "",
        "### faiss `IndexPQ` reference (same 8-bit codes and centroids, inner product, one query)",
        "",
        "Both sides score L contiguous codes of one history (no catalog gather) for one target and keep the "
        "top k. ADC runs as one XLA function; its fixed cost per call (a no-op function with the same inputs, "
        "measured alongside) is listed and taken out in the net column.",
        "",
        "| L | k | faiss ns/code | ADC + top-k ns/code | ADC / faiss | call overhead µs | ADC net ns/code | "
        "net / faiss | sub-codes per code | same top-k |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in speed["faiss"]:
        if "error" in r:
            lines.append(f"| {r['error']} |")
            continue
        lines.append(f"| {r['L']:,} | {r['k']} | {r['faiss_ns_per_code']:.1f} | {r['adc_ns_per_code']:.1f} | "
                     f"{r['adc_over_faiss']:.2f}× | {r['call_overhead_us']:.0f} | {r['adc_net_ns_per_code']:.1f} | "
                     f"{r['adc_net_over_faiss']:.2f}× | {r['sub_codes_per_code']} | {r['same_top_k_as_faiss']:.3f} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
