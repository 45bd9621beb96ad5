"""The comparison grid's rows, and the tables and claims computed over its cells (``seminar-tf report``).

``ROWS`` says how each row is pretrained and fine-tuned; ``aggregate`` / ``build_tables`` turn finished cells into
mean ± std over seeds; ``checks`` states the issue's expected claims with this run's numbers (each check carries
its numbers as fields, so tests read them, not the prose). ``seminar_tf.report`` runs the grid;
``seminar_tf.report_render`` writes REPORT.md and the figures from the report JSON.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from seminar_tf import schema

CTR_METRICS = ("auc", "gauc", "logloss")
RANKING_METRICS = ("hit@1", "hit@5", "hit@10", "hit@50", "ndcg@5", "ndcg@10", "ndcg@50", "mrr")
TABLE_METRICS = CTR_METRICS + RANKING_METRICS
MIN_SUBSET_SAMPLES = 50  # smaller subsets are too noisy to compare AUC gains on
MUST_BEAT = ("twin", "eta", "sim_soft", "sim_hard", "din")  # the claim "SEMINAR beats TWIN, ETA, SIM and DIN"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the grid: how its PSU is pretrained and how it is fine-tuned / evaluated."""

    name: str
    description: str
    architecture: str = "seminar"
    pretrained: bool = True  # fine-tuning restores the PSU's content weights (--init-from)
    pretrain_changes: Tuple[Tuple[str, object], ...] = ()  # ModelConfig changes of the PSU stage
    finetune_changes: Tuple[Tuple[str, object], ...] = ()  # ModelConfig changes of the fine-tuning stage
    drop_channels: Tuple[str, ...] = ()  # channels removed in both stages
    pq_eval_of: Optional[str] = None  # no training: evaluate that row's run with a pq_adc GSU
    finetune_epochs: Optional[int] = None  # fine-tuning epochs of this row (default: the config's / --epochs)


ROWS: Dict[str, Row] = {r.name: r for r in [
    Row("seminar", "SEMINAR, PSU-initialised (next pair + alignment + relevance), exact GSU"),
    Row("seminar_no_pretrain", "SEMINAR trained from scratch (no PSU)", pretrained=False),
    Row("din", "DIN: target attention over the newest K history steps (from scratch)", "din", pretrained=False),
    Row("sim_hard", "SIM hard search: history steps of the target's category (from scratch)", "sim_hard",
        pretrained=False),
    Row("sim_soft", "SIM soft search: top-K by embedding inner product (from scratch)", "sim_soft", pretrained=False),
    Row("eta", "ETA: top-K by SimHash Hamming distance (from scratch)", "eta", pretrained=False),
    Row("twin", "TWIN: consistent GSU/ESU target attention (from scratch)", "twin", pretrained=False),
    Row("no_history", "the SEMINAR tower without the user history (use_history=False, from scratch)",
        finetune_changes=(("use_history", False),), pretrained=False),
    Row("seminar_no_alignment", "SEMINAR, PSU pretrained without the alignment loss (align_weight=0)",
        pretrain_changes=(("align_weight", 0.0),)),
    Row("seminar_no_relevance", "SEMINAR, PSU pretrained without the query-item relevance loss "
        "(relevance_weight=0)", pretrain_changes=(("relevance_weight", 0.0),)),
    Row("seminar_no_query_channel", "SEMINAR without the query channel in both stages",
        drop_channels=(schema.QUERY_CHANNEL,)),
    Row("seminar_pq_adc", "the seminar run evaluated with a pq_adc GSU (codebooks fitted on it by fit-codebooks); "
        "no extra training", pq_eval_of="seminar"),
    Row("seminar_em3_fusion", "SEMINAR + EM3 Fusion-Q-Former (fusion_queries=2)",
        finetune_changes=(("fusion_queries", 2),)),
    Row("seminar_em3_content_id", "SEMINAR + EM3 content-ID contrastive loss (content_id_weight=0.1)",
        finetune_changes=(("content_id_weight", 0.1),)),
    Row("seminar_em3_lora", "SEMINAR + EM3 LoRA adapters on the restored content (lora_rank=4)",
        finetune_changes=(("lora_rank", 4),)),
    # Longer fine-tuning (a check that the comparison is not decided by under-trained baselines)
    Row("seminar_ep4", "seminar with 4 fine-tuning epochs (early stopping keeps the best)", finetune_epochs=4),
    Row("din_ep4", "din with 4 fine-tuning epochs", "din", pretrained=False, finetune_epochs=4),
    Row("twin_ep4", "twin with 4 fine-tuning epochs", "twin", pretrained=False, finetune_epochs=4),
    Row("sim_hard_ep4", "sim_hard with 4 fine-tuning epochs", "sim_hard", pretrained=False, finetune_epochs=4),
]}
DEFAULT_ROWS = ("seminar", "seminar_no_pretrain", "din", "twin", "eta", "sim_soft", "seminar_no_alignment",
                "seminar_pq_adc", "sim_hard", "seminar_no_relevance", "seminar_no_query_channel",
                "seminar_em3_fusion", "seminar_em3_content_id", "seminar_em3_lora")


def _mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    vals = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                      dtype=np.float64)
    if not len(vals):
        return float("nan"), float("nan"), 0
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, int(len(vals))


def aggregate(cells: Dict[str, List[dict]], key: Callable[[dict], Optional[float]]) -> Dict[str, dict]:
    """{row: {"mean", "std", "n"}} of ``key(cell)`` over the row's finished seeds (std: sample std, 0 for one)."""
    out = {}
    for row, finished in cells.items():
        mean, std, n = _mean_std([key(c) for c in finished])
        out[row] = {"mean": mean, "std": std, "n": n}
    return out


def format_mean_std(stat: dict, digits: int = 4) -> str:
    if not stat or stat.get("n", 0) == 0:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


# ---------------------------------------------------------------------------------------------- checks
def _delta(tables, row_a, row_b, metric="auc", table="metrics"):
    a, b = tables[table].get(row_a, {}).get(metric), tables[table].get(row_b, {}).get(metric)
    if not a or not b or not a["n"] or not b["n"]:
        return None
    return {"a": a, "b": b, "delta": a["mean"] - b["mean"], "noise": math.hypot(a["std"], b["std"])}


def _beats_check(tables: dict, rows: Sequence[str], suffix: str = "") -> Optional[dict]:
    """"SEMINAR beats the baselines" on the rows named with ``suffix`` (None if a suffixed grid has none)."""
    seminar = "seminar" + suffix
    beaten = [b + suffix for b in MUST_BEAT if b + suffix in rows]
    deltas = {b: _delta(tables, seminar, b) for b in beaten}
    found = {b: d for b, d in deltas.items() if d}
    claim = "SEMINAR beats TWIN, ETA, SIM and DIN (test AUC, mean over seeds)"
    if suffix:
        claim += f" — rows {seminar}, " + ", ".join(beaten)
    if seminar not in rows or not found:
        if suffix:
            return None
        return {"claim": claim, "status": "not evaluated", "detail": "needs the seminar row and a baseline row"}
    lost = [b for b, d in found.items() if d["delta"] <= 0]
    detail = "; ".join(f"{seminar} − {b} = {d['delta']:+.4f} (seed std {d['a']['std']:.4f} / "
                       f"{d['b']['std']:.4f})" for b, d in found.items())
    weak = [b for b, d in found.items() if 0 < d["delta"] <= d["noise"]]
    missing = [b + suffix for b in MUST_BEAT if b + suffix not in found] if not suffix else []
    status = "supported" if not lost else "not supported"
    if not lost and weak:
        status = "supported (means only; within seed noise for " + ", ".join(weak) + ")"
    if missing:
        detail += f"; rows not run or failed: {', '.join(missing)}"
    improving = [r for r in [seminar, *found] if tables.get("still_improving", {}).get(r)]
    if improving:
        detail += (f". Validation AUC still rising at the last epoch (under-trained, the gap may shrink with "
                   f"more epochs): {', '.join(improving)}")
    scratch = {b: _delta(tables, "seminar_no_pretrain", b) for b in found} if not suffix else {}
    scratch = {b: d for b, d in scratch.items() if d}
    if scratch:
        detail += ". Architecture only (seminar_no_pretrain, also from scratch, vs each): " + "; ".join(
            f"{b} {d['delta']:+.4f}" for b, d in scratch.items())
    return {"claim": claim, "status": status, "detail": detail,
            "deltas": {b: d["delta"] for b, d in found.items()}, "rows_missing": missing}


def _interval_text(difference: Optional[dict]) -> str:
    if not difference:
        return ""
    return (f"; paired over the {difference['users']} test users: {difference['difference']:+.4f}, "
            f"{difference['level']:.0%} interval [{difference['low']:+.4f}, {difference['high']:+.4f}]")


def checks(tables: dict, rows: Sequence[str], paired: Optional[dict] = None) -> List[dict]:
    """The issue's expected claims, each with whether this run supports it and the numbers. With ``*_ep4``
    rows (longer fine-tuning) the first claim is checked again on them. ``paired`` (``report.paired_differences``)
    adds the paired interval of seminar − seminar_no_alignment to the alignment claim."""
    out = [_beats_check(tables, rows)]
    longer = _beats_check(tables, rows, "_ep4")

    claim = "pretraining helps most on the cold-id subset"
    if "seminar" in rows and "seminar_no_pretrain" in rows:
        parts, statuses, gains, too_small = [], [], {}, {}
        for hi, lo, label in (("cold", "warm", "history holds a cold id vs not"),
                              ("cold_share_high", "cold_share_low", "cold-id share of the history above vs at "
                                                                     "or below the median"),
                              ("cold_target", "warm_target", "target item cold vs not")):
            if f"subset:{hi}" not in tables:
                continue
            d_hi = _delta(tables, "seminar", "seminar_no_pretrain", table=f"subset:{hi}")
            d_lo = _delta(tables, "seminar", "seminar_no_pretrain", table=f"subset:{lo}")
            small = [(name, int(size)) for name in (hi, lo)
                     for size in [tables.get(f"subset:{name}", {}).get("seminar", {}).get("num_samples", {}).get(
                         "mean", 0) or 0] if size < MIN_SUBSET_SAMPLES]
            too_small.update(small)
            if small:
                parts.append(f"{label}: not compared, " + ", ".join(f"{n} has {k} samples" for n, k in small)
                             + f" (< {MIN_SUBSET_SAMPLES})")
            elif d_hi and d_lo:
                parts.append(f"{label}: AUC gain of pretraining {d_hi['delta']:+.4f} vs {d_lo['delta']:+.4f}")
                statuses.append(d_hi["delta"] > d_lo["delta"])
                gains[hi] = {hi: d_hi["delta"], lo: d_lo["delta"]}
            else:
                parts.append(f"{label}: a subset is empty, not comparable")
        full = _delta(tables, "seminar", "seminar_no_pretrain")
        if full:
            parts.append(f"all samples: {full['delta']:+.4f}")
        status = ("not evaluated" if not statuses else "supported" if all(statuses)
                  else "partly supported" if any(statuses) else "not supported")
        out.append({"claim": claim, "status": status, "detail": "; ".join(parts), "gains": gains,
                    "too_small": too_small, "all_samples": full["delta"] if full else None})
    else:
        out.append({"claim": claim, "status": "not evaluated", "detail": "needs seminar and seminar_no_pretrain"})

    claim = "the alignment loss matters when channels are misaligned (the world plants misaligned image/text)"
    d = _delta(tables, "seminar", "seminar_no_alignment") if "seminar_no_alignment" in rows else None
    if d:
        status = ("supported" if d["delta"] > d["noise"] else "supported (means only; within seed noise)"
                  if d["delta"] > 0 else "not supported")
        out.append({"claim": claim, "status": status, "delta": d["delta"],
                    "detail": f"seminar − seminar_no_alignment AUC = {d['delta']:+.4f} (seed std "
                              f"{d['a']['std']:.4f} / {d['b']['std']:.4f})" + _interval_text(
                                  (paired or {}).get("seminar_no_alignment"))})
    else:
        out.append({"claim": claim, "status": "not evaluated", "detail": "needs seminar and seminar_no_alignment"})
    if longer:
        out.append(longer)
    return out


def build_tables(cells: Dict[str, List[dict]]) -> dict:
    """{"metrics": {row: {metric: stat}}, "subset:<name>": {...}, "popularity": {...}}."""
    tables = {"metrics": {}, "popularity": {}, "still_improving": {}}
    for row, finished in cells.items():
        curves = [c.get("history", {}).get("val_auc") or [] for c in finished]
        tables["still_improving"][row] = bool(curves) and all(len(v) > 1 and v[-1] > v[-2] for v in curves)
        tables["metrics"][row] = {m: aggregate({row: finished}, lambda c, m=m: c["metrics"].get(m))[row]
                                  for m in TABLE_METRICS}
        tables["popularity"][row] = {m: aggregate({row: finished}, lambda c, m=m: c["popularity"].get(m))[row]
                                     for m in TABLE_METRICS}
        subsets = finished[0]["subsets"] if finished else {}
        for name in subsets:
            table = tables.setdefault(f"subset:{name}", {})
            table[row] = {m: aggregate({row: finished}, lambda c, m=m, s=name: c["subsets"][s].get(m))[row]
                          for m in ("auc", "gauc", "logloss", "num_samples")}
    return tables
