"""Offline evaluation: CTR metrics (AUC, GAUC, logloss), sampled ranking metrics (HIT/NDCG@K, MRR), reports.

Everything here is NumPy and model-agnostic: the drivers take a scoring callable, so the SEMINAR model, the
baselines and a served model are evaluated by the same code. TensorFlow is imported only to write reports
to non-local paths (``gs://`` and the like) through ``tf.io.gfile``.

Metric keys used in the returned dicts and reports: ``auc``, ``gauc``, ``gauc_num_users``, ``logloss``,
``num_samples``, ``positive_rate`` (CTR); ``hit@K``, ``ndcg@K``, ``mrr``, ``mean_rank``, ``num_examples``
(ranking).

Example:
    metrics = evaluate_ctr(lambda batch: model.predict_on_batch(batch)["probability"], test_batches)
    write_report(metrics, "reports/", "SEMINAR CTR test")
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from seminar_tf import schema

DEFAULT_KS = (1, 5, 10, 50)


def _to_numpy(value) -> np.ndarray:
    """A NumPy array from a NumPy array, an eager tensor or a Python sequence."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


def _check_finite(name: str, values: np.ndarray) -> None:
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values")


# --------------------------------------------------------------------------------------------------------
# CTR metrics
def _grouped_auc(
    group_index: np.ndarray, labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, num_groups: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact weighted AUC of every group at once (one sort, no Python loop over groups).

    AUC_g = Σ_{i pos, j neg in g} w_i w_j [1(s_i > s_j) + ½·1(s_i = s_j)] / (W⁺_g W⁻_g): the Mann-Whitney
    statistic with tied scores counted as half-correct (the midrank rule).

    group_index [n] int in [0, num_groups), labels [n] bool, scores [n], weights [n].
    Returns (auc [G] with NaN where a group lacks a class, positive weight [G], negative weight [G]).
    """
    order = np.lexsort((scores, group_index))  # by group, then by ascending score
    g, s = group_index[order], scores[order]
    pos_w = np.where(labels[order], weights[order], 0.0)
    neg_w = np.where(labels[order], 0.0, weights[order])

    # A "tie block" is a run of equal (group, score).
    new_block = np.ones(len(g), dtype=bool)
    new_block[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    block = np.cumsum(new_block) - 1
    block_group = g[new_block]
    block_pos = np.bincount(block, weights=pos_w)
    block_neg = np.bincount(block, weights=neg_w)

    # Negative weight strictly below each block within its group = exclusive cumsum minus the group's start.
    exclusive = np.cumsum(block_neg) - block_neg
    group_start = np.ones(len(block_group), dtype=bool)
    group_start[1:] = block_group[1:] != block_group[:-1]
    start_index = np.maximum.accumulate(np.where(group_start, np.arange(len(block_group)), 0))
    neg_below = exclusive - exclusive[start_index]

    block_correct = block_pos * (neg_below + 0.5 * block_neg)
    correct = np.bincount(block_group, weights=block_correct, minlength=num_groups)
    total_pos = np.bincount(group_index, weights=np.where(labels, weights, 0.0), minlength=num_groups)
    total_neg = np.bincount(group_index, weights=np.where(labels, 0.0, weights), minlength=num_groups)
    denominator = total_pos * total_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        per_group = np.where(denominator > 0, correct / np.where(denominator > 0, denominator, 1.0), np.nan)
    return per_group, total_pos, total_neg


def _binary_labels(labels) -> np.ndarray:
    values = _to_numpy(labels).reshape(-1).astype(np.float64)
    _check_finite("labels", values)
    return values > 0.5


def auc(labels, scores, weights=None) -> float:
    """Exact ROC AUC (rank-based; tied scores count ½), optionally with per-sample weights.

    labels [n] 0/1 (a label counts as positive when > 0.5), scores [n] any real scores (probabilities or
    logits give the same AUC), weights [n] non-negative or None. Returns NaN when the (weighted) samples
    lack positives or negatives, where AUC is undefined.
    """
    y = _binary_labels(labels)
    s = _to_numpy(scores).reshape(-1).astype(np.float64)
    if s.shape != y.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    _check_finite("scores", s)
    if weights is None:
        w = np.ones_like(s)
    else:
        w = _to_numpy(weights).reshape(-1).astype(np.float64)
        if w.shape != s.shape:
            raise ValueError(f"weights and scores differ in length: {w.shape[0]} vs {s.shape[0]}")
        _check_finite("weights", w)
        if np.any(w < 0):
            raise ValueError("weights must be non-negative")
    if y.size == 0:
        return float("nan")
    per_group, _, _ = _grouped_auc(np.zeros(len(y), dtype=np.int64), y, s, w, 1)
    return float(per_group[0])


def gauc_with_count(user_ids, labels, scores) -> Tuple[float, int]:
    """``gauc`` and the number of users it averaged over."""
    y = _binary_labels(labels)
    s = _to_numpy(scores).reshape(-1).astype(np.float64)
    users = _to_numpy(user_ids).reshape(-1)
    if not (len(users) == len(y) == len(s)):
        raise ValueError(f"user_ids, labels, scores differ in length: {len(users)}, {len(y)}, {len(s)}")
    _check_finite("scores", s)
    if y.size == 0:
        return float("nan"), 0
    _, user_index = np.unique(users, return_inverse=True)
    user_index = user_index.reshape(-1).astype(np.int64)
    num_users = int(user_index.max()) + 1
    per_user, _, _ = _grouped_auc(user_index, y, s, np.ones_like(s), num_users)
    impressions = np.bincount(user_index, minlength=num_users).astype(np.float64)
    kept = ~np.isnan(per_user)
    if not kept.any():
        return float("nan"), 0
    value = float(np.sum(per_user[kept] * impressions[kept]) / np.sum(impressions[kept]))
    return value, int(kept.sum())


def gauc(user_ids, labels, scores) -> float:
    """Group AUC as in DIN (Zhou et al., 2018): Σ_u n_u · AUC_u / Σ_u n_u over users u.

    n_u is the user's number of impressions. Users whose impressions are all positive or all negative have
    no AUC and are skipped: they count in neither the numerator nor the denominator. Returns NaN when no
    user has both classes.

    user_ids [n] (bytes, str or int), labels [n] 0/1, scores [n].
    """
    return gauc_with_count(user_ids, labels, scores)[0]


def paired_gauc_difference(user_ids, labels, scores, reference, draws: int = 2000, seed: int = 0,
                           level: float = 0.95) -> Dict[str, float]:
    """GAUC(scores) − GAUC(reference) on the same samples, with a paired bootstrap over users: each draw resamples
    the users (with replacement) and recomputes both GAUCs on that one draw, so the interval reflects which users
    the test split happened to hold, not the models' seeds.

    ``scores``: one score vector [n] or a list of them (seeds); a user's AUC is averaged over the list, so the
    difference is that of the seeds' mean GAUC. ``reference`` [n] (e.g. item popularity). Users with one class
    are skipped as in ``gauc``. Returns difference, se (std of the draws), low / high (the central ``level``
    interval of the draws), users, draws.
    """
    y = _binary_labels(labels)
    users = _to_numpy(user_ids).reshape(-1)
    vectors = [scores] if np.ndim(scores) == 1 else list(scores)
    if not vectors:
        raise ValueError("paired_gauc_difference needs at least one score vector")
    user_index, num_users = _user_index(users)

    def per_user(values):
        s = _to_numpy(values).reshape(-1).astype(np.float64)
        if len(s) != len(y) or len(users) != len(y):
            raise ValueError(f"user_ids, labels, scores differ in length: {len(users)}, {len(y)}, {len(s)}")
        _check_finite("scores", s)
        return _grouped_auc(user_index, y, s, np.ones_like(s), num_users)[0]

    model = np.mean([per_user(v) for v in vectors], axis=0)
    base = per_user(reference)
    kept = ~np.isnan(base)
    if not kept.any():
        raise ValueError("paired_gauc_difference: no user has both a positive and a negative sample")
    weight = np.bincount(user_index, minlength=num_users).astype(np.float64)[kept]
    delta = (model - base)[kept]
    picks = np.random.default_rng(seed).integers(0, len(delta), size=(draws, len(delta)))
    boot = np.sum(weight[picks] * delta[picks], axis=1) / np.sum(weight[picks], axis=1)
    return _bootstrap_summary(np.sum(weight * delta) / np.sum(weight), boot, level, int(kept.sum()))


def _user_index(users: np.ndarray) -> Tuple[np.ndarray, int]:
    """(index of each sample's user in [0, U), U)."""
    _, index = np.unique(users, return_inverse=True)
    index = index.reshape(-1).astype(np.int64)
    return index, int(index.max()) + 1 if index.size else 0


def _bootstrap_summary(point: float, boot: np.ndarray, level: float, users: int) -> Dict[str, float]:
    """A paired difference and its bootstrap draws as difference, se, low / high (the central ``level``
    interval), level, users, draws."""
    tail = (1.0 - level) / 2.0
    return {"difference": float(point), "se": float(np.std(boot)), "low": float(np.quantile(boot, tail)),
            "high": float(np.quantile(boot, 1.0 - tail)), "level": level, "users": users, "draws": int(len(boot))}


def paired_auc_difference(user_ids, labels, scores, reference, draws: int = 2000, seed: int = 0,
                          level: float = 0.95) -> Dict[str, float]:
    """AUC(scores) − AUC(reference) on the same samples, with a paired bootstrap over users (a user's samples are
    drawn together, as they are not independent): each draw weights every sample by how often its user was
    drawn and recomputes both AUCs, so the interval reflects which users the test split happened to hold.

    ``scores`` and ``reference``: one score vector [n] each, or a list of them (seeds); the difference is that of
    the seeds' mean AUCs. Returns difference, se (std of the draws), low / high (the central ``level`` interval of
    the draws), users, draws.
    """
    y = _binary_labels(labels)
    users = _to_numpy(user_ids).reshape(-1)
    if len(users) != len(y):
        raise ValueError(f"user_ids and labels differ in length: {len(users)} vs {len(y)}")
    lists = [[v] if np.ndim(v) == 1 else list(v) for v in (scores, reference)]
    if not all(lists):
        raise ValueError("paired_auc_difference needs at least one score vector on each side")
    vectors = []
    for side in lists:
        vectors.append([_to_numpy(v).reshape(-1).astype(np.float64) for v in side])
        for v in vectors[-1]:
            if len(v) != len(y):
                raise ValueError(f"labels and scores differ in length: {len(y)} vs {len(v)}")
            _check_finite("scores", v)
    user_index, num_users = _user_index(users)
    zeros = np.zeros(len(y), np.int64)

    def difference(weights):
        means = [np.mean([_grouped_auc(zeros, y, v, weights, 1)[0][0] for v in side]) for side in vectors]
        return means[0] - means[1]

    point = difference(np.ones(len(y)))
    if np.isnan(point):
        raise ValueError("paired_auc_difference: the samples lack positives or negatives")
    rng = np.random.default_rng(seed)
    boot = np.array([difference(np.bincount(rng.integers(0, num_users, num_users), minlength=num_users)[user_index]
                                .astype(np.float64)) for _ in range(draws)])
    return _bootstrap_summary(point, boot[~np.isnan(boot)], level, num_users)


def logloss(labels, probabilities, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy −[y log p + (1−y) log(1−p)], with p clipped to [eps, 1−eps].

    labels [n] in [0, 1] (soft labels allowed), probabilities [n].
    """
    y = _to_numpy(labels).reshape(-1).astype(np.float64)
    p = _to_numpy(probabilities).reshape(-1).astype(np.float64)
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.shape[0]} vs {p.shape[0]}")
    _check_finite("labels", y)
    _check_finite("probabilities", p)
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


# --------------------------------------------------------------------------------------------------------
# Sampled ranking metrics (leave-last-out, the paper's NDCG@K protocol)
def ranking_metrics(positive_scores, negative_scores, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """HIT@K, NDCG@K and MRR of one relevant item ranked among m sampled negatives per example.

    rank = 1 + #{negatives with score ≥ the positive's}: ties count against the positive (pessimistic),
    so a model that gives every candidate the same score gets rank m+1, not a lucky rank 1.
    HIT@K = mean 1(rank ≤ K); NDCG@K = mean 1(rank ≤ K) / log2(rank + 1) (one relevant item, so IDCG = 1);
    MRR = mean 1/rank.

    positive_scores [n], negative_scores [n, m]. Returns {"hit@K", "ndcg@K" for K in ks, "mrr",
    "mean_rank", "num_examples"}.
    """
    pos = _to_numpy(positive_scores).reshape(-1).astype(np.float64)
    neg = _to_numpy(negative_scores).astype(np.float64)
    if neg.ndim != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"negative_scores must be [n, m] with n = {pos.shape[0]}, got shape {neg.shape}")
    _check_finite("positive_scores", pos)
    _check_finite("negative_scores", neg)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {ks}")
    ranks = _ranks(pos, neg)
    return _ranking_from_ranks(ranks, ks)


def _ranks(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return 1 + np.sum(neg >= pos[:, None], axis=1)


def _ranking_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> Dict[str, float]:
    def mean(values: np.ndarray) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    metrics: Dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        metrics[f"hit@{k}"] = mean(hit)
        metrics[f"ndcg@{k}"] = mean(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0))
    metrics["mrr"] = mean(1.0 / ranks)
    metrics["mean_rank"] = mean(ranks)
    metrics["num_examples"] = int(len(ranks))
    return metrics


def sample_negatives(num_items: int, exclude, m: int, rng, low: int = len(schema.RESERVED)) -> np.ndarray:
    """m distinct item indices drawn uniformly from [low, num_items) minus ``exclude``.

    ``low`` defaults to 2 = len(schema.RESERVED), skipping PAD_INDEX=0 and OOV_INDEX=1. exclude: a set or
    array of the item indices the user touched (history and target). rng: a ``np.random.Generator`` (or a seed); the
    same generator state gives the same draw. Raises ValueError when fewer than m items are eligible.
    Returns int64 [m].
    """
    rng = np.random.default_rng(rng)
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    if isinstance(exclude, (set, frozenset)):
        excluded = np.fromiter(exclude, dtype=np.int64, count=len(exclude))
    else:
        excluded = _to_numpy(exclude).reshape(-1).astype(np.int64)
    excluded = np.unique(excluded)
    excluded = excluded[(excluded >= low) & (excluded < num_items)]
    available = num_items - low - len(excluded)
    if available < m:
        raise ValueError(
            f"cannot sample {m} negatives: only {max(available, 0)} items in [{low}, {num_items}) "
            "are not excluded"
        )
    if m == 0:
        return np.zeros([0], dtype=np.int64)
    if available <= 4 * m:
        # Small pool: enumerate it (rejection sampling would mostly reject).
        pool = np.setdiff1d(np.arange(low, num_items, dtype=np.int64), excluded, assume_unique=True)
        return rng.choice(pool, size=m, replace=False).astype(np.int64)
    chosen = np.zeros([0], dtype=np.int64)
    while len(chosen) < m:
        need = m - len(chosen)
        draw = rng.integers(low, num_items, size=2 * need + 8, dtype=np.int64)
        draw = draw[~np.isin(draw, excluded)]
        draw = draw[~np.isin(draw, chosen)]
        _, first = np.unique(draw, return_index=True)
        chosen = np.concatenate([chosen, draw[np.sort(first)][:need]])
    return chosen


# --------------------------------------------------------------------------------------------------------
# Drivers
def evaluate_ctr(score_fn: Callable[[dict], np.ndarray], dataset: Iterable[dict]) -> Dict[str, float]:
    """CTR metrics of ``score_fn`` over every batch of ``dataset``.

    Batches are dicts (NumPy arrays or tensors) with at least ``schema.CTX_LABEL`` [B] and
    ``schema.CTX_USER_ID`` [B]; ``score_fn(batch)`` returns click probabilities [B] (or [B, 1]).
    Returns {"auc", "gauc", "gauc_num_users", "logloss", "num_samples", "positive_rate"}.
    """
    labels: List[np.ndarray] = []
    users: List[np.ndarray] = []
    probabilities: List[np.ndarray] = []
    for batch in dataset:
        label = _to_numpy(batch[schema.CTX_LABEL]).reshape(-1).astype(np.float64)
        user = _to_numpy(batch[schema.CTX_USER_ID]).reshape(-1)
        prob = _to_numpy(score_fn(batch)).astype(np.float64)
        if prob.ndim == 2 and prob.shape[1] == 1:
            prob = prob[:, 0]
        if prob.shape != label.shape:
            raise ValueError(f"score_fn returned shape {prob.shape} for a batch of {label.shape[0]} labels")
        _check_finite("score_fn output", prob)
        if prob.size and (prob.min() < 0.0 or prob.max() > 1.0):
            raise ValueError(
                f"score_fn must return probabilities in [0, 1], got values in [{prob.min()}, {prob.max()}] "
                "(logits? apply a sigmoid)"
            )
        labels.append(label)
        users.append(user)
        probabilities.append(prob)
    if not labels:
        raise ValueError("dataset yielded no batches")
    y = np.concatenate(labels)
    p = np.concatenate(probabilities)
    u = np.concatenate(users)
    gauc_value, gauc_users = gauc_with_count(u, y, p)
    return {
        "auc": auc(y, p),
        "gauc": gauc_value,
        "gauc_num_users": gauc_users,
        "logloss": logloss(y, p),
        "num_samples": int(len(y)),
        "positive_rate": float(np.mean(y > 0.5)) if len(y) else float("nan"),
    }


def evaluate_ranking(
    rank_fn: Callable[[dict, np.ndarray], np.ndarray],
    dataset: Iterable[dict],
    num_items: int,
    num_negatives: int = 99,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
) -> Dict[str, float]:
    """Leave-last-out sampled ranking: each example's target item against ``num_negatives`` sampled items.

    For every example the candidates are [target_item, m negatives], the negatives drawn uniformly from the
    items the example's history (its first ``history_length`` steps) and target do not contain, reserved
    rows excluded (``sample_negatives``). ``rank_fn(batch, candidate_items [B, 1+m])`` returns scores
    [B, 1+m] with column 0 the positive. Examples with ``schema.CTX_LABEL`` ≤ 0.5 (unclicked CTR
    impressions) are scored but not counted, since their target is not a positive. One generator seeded by
    ``seed`` serves the whole pass, so a run is reproducible for a fixed dataset order.
    Returns ``ranking_metrics`` keys.
    """
    rng = np.random.default_rng(seed)
    ks = [int(k) for k in ks]
    all_ranks: List[np.ndarray] = []
    for batch in dataset:
        targets = _to_numpy(batch[schema.CTX_TARGET_ITEM]).reshape(-1).astype(np.int64)
        history = _to_numpy(batch[schema.SEQ_HISTORY_ITEM]).astype(np.int64)
        history = history.reshape(len(targets), -1)
        if schema.CTX_HISTORY_LENGTH in batch:
            lengths = _to_numpy(batch[schema.CTX_HISTORY_LENGTH]).reshape(-1).astype(np.int64)
        else:
            lengths = np.full(len(targets), history.shape[1], dtype=np.int64)
        candidates = np.empty([len(targets), 1 + num_negatives], dtype=np.int64)
        candidates[:, 0] = targets
        for row, target in enumerate(targets):
            touched = np.append(history[row, : lengths[row]], target)
            candidates[row, 1:] = sample_negatives(num_items, touched, num_negatives, rng)
        scores = _to_numpy(rank_fn(batch, candidates)).astype(np.float64)
        if scores.shape != candidates.shape:
            raise ValueError(f"rank_fn returned shape {scores.shape}, expected {candidates.shape}")
        _check_finite("rank_fn output", scores)
        ranks = _ranks(scores[:, 0], scores[:, 1:])
        if schema.CTX_LABEL in batch:
            ranks = ranks[_to_numpy(batch[schema.CTX_LABEL]).reshape(-1) > 0.5]
        all_ranks.append(ranks)
    if not all_ranks:
        raise ValueError("dataset yielded no batches")
    return _ranking_from_ranks(np.concatenate(all_ranks), ks)


# --------------------------------------------------------------------------------------------------------
# Reports
def _json_ready(value):
    """NumPy scalars/arrays to Python; NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4f}"
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_interval_table(intervals: Mapping[str, dict], difference_column: str, se_column: str = "se") -> str:
    """A Markdown table of paired differences (``paired_auc_difference`` / ``paired_gauc_difference`` results by
    row): the row, the difference, its interval and the bootstrap standard error."""
    level = f"{next(iter(intervals.values()))['level']:.0%} interval" if intervals else "interval"
    rows = [{"row": name, difference_column: f"{d['difference']:+.4f}", level: f"[{d['low']:+.4f}, {d['high']:+.4f}]",
             se_column: f"{d['se']:.4f}"} for name, d in intervals.items()]
    return format_markdown_table(rows, ["row", difference_column, level, se_column])


def format_markdown_table(rows: List[dict], columns: List[str]) -> str:
    """A GitHub Markdown table: one header row of ``columns``, one line per row (missing keys left blank).

    Floats print with 4 decimals, ints as ints, NaN as ``nan``; ``|`` in a cell is escaped.
    """
    if not columns:
        raise ValueError("columns must not be empty")
    lines = [
        "| " + " | ".join(_format_cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _flat(values: Mapping, prefix: str = "") -> dict:
    """Nested mappings as dotted keys (``{"by_length": {"short": 0.7}}`` -> ``{"by_length.short": 0.7}``)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _report_table(metrics: Mapping) -> str:
    """{name: {metric: value}} entries -> one comparison table, a row per name (nested values as dotted columns);
    the other entries -> a Metric | Value table (both when they mix, e.g. experiment.evaluate's model and
    popularity beside its run, data and split). Lists print comma-separated; never a Python dict."""
    groups = {name: _flat(values) for name, values in metrics.items() if isinstance(values, Mapping)}
    scalars = {k: (", ".join(map(_format_cell, v)) if isinstance(v, (list, tuple)) else v)
               for k, v in metrics.items() if not isinstance(v, Mapping)}
    tables = []
    if groups:
        columns: List[str] = []
        for values in groups.values():
            columns.extend(k for k in values if k not in columns)
        rows = [{"name": name, **values} for name, values in groups.items()]
        tables.append(format_markdown_table(rows, ["name"] + columns))
    if scalars or not groups:
        rows = [{"metric": k, "value": v} for k, v in scalars.items()]
        tables.append(format_markdown_table(rows, ["metric", "value"]))
    return "\n".join(tables)


def _slug(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
    return slug or "report"


def _is_url(path: str) -> bool:
    return "://" in path


def write_report(metrics: dict, out_dir: str, title: str) -> Tuple[str, str]:
    """Writes ``<out_dir>/<slug(title)>.json`` ({"title", "metrics"}) and ``.md`` (a heading and a table).

    Local paths use plain files; URLs (``gs://``...) go through ``tf.io.gfile``, imported only then.
    Returns (json_path, md_path).
    """
    name = _slug(title)
    payload = json.dumps({"title": title, "metrics": _json_ready(metrics)}, indent=2, sort_keys=False)
    markdown = f"# {title}\n\n{_report_table(metrics)}"
    if _is_url(out_dir):
        import tensorflow as tf

        base = out_dir.rstrip("/")
        tf.io.gfile.makedirs(base)
        json_path, md_path = f"{base}/{name}.json", f"{base}/{name}.md"
        for path, text in ((json_path, payload), (md_path, markdown)):
            with tf.io.gfile.GFile(path, "w") as f:
                f.write(text)
    else:
        os.makedirs(out_dir, exist_ok=True)
        json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
        for path, text in ((json_path, payload), (md_path, markdown)):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    return json_path, md_path


def read_report(json_path: str) -> dict:
    """The metrics dict of a JSON report written by ``write_report`` (NaN came back as None)."""
    if _is_url(json_path):
        import tensorflow as tf

        with tf.io.gfile.GFile(json_path) as f:
            return json.load(f)["metrics"]
    with open(json_path, encoding="utf-8") as f:
        return json.load(f)["metrics"]
