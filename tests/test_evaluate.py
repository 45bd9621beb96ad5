"""Tests for seminar_tf.evaluate: metrics against brute-force references, drivers with oracle/random scorers."""

import json
import math
import os

import numpy as np
import pytest

from seminar_tf import evaluate, schema


def brute_force_auc(labels, scores, weights=None):
    """O(n²) pairwise reference: Σ w_i w_j [1(s_i>s_j) + ½ 1(s_i=s_j)] over (pos i, neg j) / Σ w_i w_j."""
    labels = np.asarray(labels) > 0.5
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)
    num, den = 0.0, 0.0
    for i in np.flatnonzero(labels):
        for j in np.flatnonzero(~labels):
            pair = weights[i] * weights[j]
            den += pair
            num += pair * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
    return num / den


# ------------------------------------------------------------------------------------------------ AUC
@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 200
    labels = rng.integers(0, 2, size=n)
    scores = rng.integers(0, 8, size=n).astype(np.float64)  # few distinct values: many ties
    assert evaluate.auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_auc_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n = 150
    labels = rng.integers(0, 2, size=n).astype(np.float32)
    scores = np.round(rng.normal(size=n), 1)  # rounded: ties across classes
    weights = rng.uniform(0.0, 3.0, size=n)
    expected = brute_force_auc(labels, scores, weights)
    assert evaluate.auc(labels, scores, weights) == pytest.approx(expected, abs=1e-12)
    # Integer weights equal repeating the samples.
    counts = rng.integers(1, 4, size=n)
    repeated = evaluate.auc(np.repeat(labels, counts), np.repeat(scores, counts))
    assert evaluate.auc(labels, scores, counts) == pytest.approx(repeated, abs=1e-12)


def test_auc_perfect_inverted_constant_and_degenerate():
    labels = np.array([0, 0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9])
    assert evaluate.auc(labels, scores) == 1.0
    assert evaluate.auc(labels, -scores) == 0.0
    assert evaluate.auc(labels, np.full(6, 0.4)) == 0.5
    # Logits and probabilities (a monotone map) give the same AUC.
    logits = np.random.default_rng(0).normal(size=50)
    y = np.random.default_rng(1).integers(0, 2, size=50)
    assert evaluate.auc(y, logits) == pytest.approx(evaluate.auc(y, 1 / (1 + np.exp(-logits))), abs=1e-12)
    # One class only: undefined.
    assert math.isnan(evaluate.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(evaluate.auc([], []))


def test_auc_hand_computed_and_input_checks():
    # Pairs (pos, neg): (0.8,0.3)=1, (0.8,0.8)=½, (0.2,0.3)=0, (0.2,0.8)=0 → 1.5 / 4.
    assert evaluate.auc([1, 0, 1, 0], [0.8, 0.3, 0.2, 0.8]) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="NaN"):
        evaluate.auc([1, 0], [0.5, np.nan])
    with pytest.raises(ValueError, match="length"):
        evaluate.auc([1, 0, 1], [0.5, 0.2])
    with pytest.raises(ValueError, match="non-negative"):
        evaluate.auc([1, 0], [0.5, 0.2], [1.0, -1.0])


# ------------------------------------------------------------------------------------------------ GAUC
def manual_gauc(users, labels, scores):
    total, weight = 0.0, 0
    for user in sorted(set(users)):
        mask = np.array([u == user for u in users])
        y = np.asarray(labels)[mask]
        if y.min() == y.max():
            continue  # one class only: skipped
        total += mask.sum() * brute_force_auc(y, np.asarray(scores)[mask])
        weight += mask.sum()
    return total / weight


def test_gauc_matches_manual_per_user_computation():
    rng = np.random.default_rng(7)
    n = 300
    users = np.array([f"user{u}".encode() for u in rng.integers(0, 25, size=n)], dtype=object)
    labels = rng.integers(0, 2, size=n)
    scores = np.round(rng.uniform(size=n), 1)
    # Two users with a single class, so skipping is exercised.
    users = np.concatenate([users, [b"only_pos"] * 3, [b"only_neg"] * 4])
    labels = np.concatenate([labels, [1, 1, 1], [0, 0, 0, 0]])
    scores = np.concatenate([scores, [0.1, 0.2, 0.3], [0.9, 0.8, 0.7, 0.6]])
    expected = manual_gauc(list(users), labels, scores)
    value, num_users = evaluate.gauc_with_count(users, labels, scores)
    assert value == pytest.approx(expected, abs=1e-12)
    assert evaluate.gauc(users, labels, scores) == pytest.approx(expected, abs=1e-12)
    both_classes = {u for u in set(users) if len(set(labels[users == u].tolist())) == 2}
    assert num_users == len(both_classes) and b"only_pos" not in both_classes


def test_gauc_hand_example_differs_from_auc():
    # User a: perfect (AUC 1, 4 impressions); user b: inverted (AUC 0, 2 impressions); user c: one class.
    users = ["a", "a", "a", "a", "b", "b", "c"]
    labels = [1, 0, 1, 0, 1, 0, 1]
    scores = [0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.5]
    value, num_users = evaluate.gauc_with_count(users, labels, scores)
    assert value == pytest.approx((4 * 1.0 + 2 * 0.0) / 6)
    assert num_users == 2
    assert math.isnan(evaluate.gauc(["a", "b"], [1, 0], [0.2, 0.3]))  # no user has both classes
    # Integer user ids work too.
    assert evaluate.gauc([1, 1, 2, 2], [1, 0, 0, 1], [0.9, 0.1, 0.9, 0.1]) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ logloss
def test_logloss_formula_and_clipping():
    y = np.array([1, 0, 1, 0], dtype=np.float32)
    p = np.array([0.9, 0.2, 0.6, 0.5])
    expected = -np.mean([math.log(0.9), math.log(0.8), math.log(0.6), math.log(0.5)])
    assert evaluate.logloss(y, p) == pytest.approx(expected, rel=1e-12)
    # Certain and wrong: clipped to eps, so finite and equal to -log(eps).
    assert evaluate.logloss([1.0], [0.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-9)
    assert evaluate.logloss([0.0], [1.0], eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-9)
    assert evaluate.logloss([1.0, 0.0], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)
    # Soft labels.
    assert evaluate.logloss([0.25], [0.5]) == pytest.approx(math.log(2.0))


# ------------------------------------------------------------------------------------------------ ranking
def test_ranking_metrics_hand_cases():
    m = 99
    negatives = np.zeros([4, m])
    positives = np.zeros(4)
    # Row 0: rank 1 (positive above all). Row 1: rank 3 (two negatives above).
    positives[0] = 1.0
    positives[1] = 0.5
    negatives[1, :2] = 0.9
    # Row 2: rank 60 (59 negatives above).
    positives[2] = 0.5
    negatives[2, :59] = 0.9
    # Row 3: every candidate tied → pessimistic rank m+1 = 100.
    negatives[3, :] = 0.0
    metrics = evaluate.ranking_metrics(positives, negatives, ks=(1, 5, 10, 50, 100))
    ranks = np.array([1, 3, 60, 100])
    for k in (1, 5, 10, 50, 100):
        hit = ranks <= k
        assert metrics[f"hit@{k}"] == pytest.approx(hit.mean())
        assert metrics[f"ndcg@{k}"] == pytest.approx(np.sum(1 / np.log2(ranks[hit] + 1)) / 4)
    assert metrics["hit@1"] == 0.25
    assert metrics["hit@5"] == 0.5
    assert metrics["hit@50"] == 0.5
    assert metrics["hit@100"] == 1.0
    assert metrics["ndcg@5"] == pytest.approx((1.0 + 0.5) / 4)  # 1/log2(2) + 1/log2(4)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 60 + 1 / 100) / 4)
    assert metrics["mean_rank"] == pytest.approx(41.0)
    assert metrics["num_examples"] == 4


def test_ranking_metrics_single_cases_and_ties():
    one = evaluate.ranking_metrics([0.5], [[0.9, 0.8, 0.1, 0.2]], ks=(1, 3))
    assert one["hit@1"] == 0.0 and one["hit@3"] == 1.0
    assert one["ndcg@3"] == pytest.approx(0.5)  # rank 3 → 1/log2(4)
    assert one["mrr"] == pytest.approx(1 / 3)
    # One tie with the positive counts against it: rank 2, not 1.
    tie = evaluate.ranking_metrics([0.5], [[0.5, 0.1, 0.2]], ks=(1, 2))
    assert tie["hit@1"] == 0.0 and tie["hit@2"] == 1.0
    assert tie["ndcg@2"] == pytest.approx(1 / math.log2(3))
    with pytest.raises(ValueError, match=r"\[n, m\]"):
        evaluate.ranking_metrics([0.5, 0.2], [[0.1, 0.2]])
    with pytest.raises(ValueError, match=">= 1"):
        evaluate.ranking_metrics([0.5], [[0.1]], ks=(0,))


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("num_items", [30, 5000])  # small pool (enumerated) and large (rejection)
def test_sample_negatives_excludes_and_is_deterministic(num_items):
    exclude = {2, 3, 7, 11, num_items - 1}
    for seed in range(20):
        draw = evaluate.sample_negatives(num_items, exclude, 20, np.random.default_rng(seed))
        assert draw.dtype == np.int64 and draw.shape == (20,)
        assert len(set(draw.tolist())) == 20  # distinct
        assert not set(draw.tolist()) & exclude
        assert draw.min() >= 2 and draw.max() < num_items  # reserved 0 (PAD), 1 (OOV) never drawn
        again = evaluate.sample_negatives(num_items, np.array(sorted(exclude)), 20, np.random.default_rng(seed))
        np.testing.assert_array_equal(draw, again)
    first = evaluate.sample_negatives(num_items, exclude, 20, np.random.default_rng(0))
    other = evaluate.sample_negatives(num_items, exclude, 20, np.random.default_rng(1))
    assert not np.array_equal(first, other)


def test_sample_negatives_exhausts_small_pool_and_refuses_too_many():
    # Items 2..9 minus {4, 5} = 6 eligible; asking for all 6 returns exactly them.
    draw = evaluate.sample_negatives(10, [4, 5, 0, 1, 12], 6, np.random.default_rng(3))
    assert sorted(draw.tolist()) == [2, 3, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="only 6 items"):
        evaluate.sample_negatives(10, [4, 5], 7, np.random.default_rng(3))
    assert evaluate.sample_negatives(10, [], 0, 0).shape == (0,)


def test_sample_negatives_is_roughly_uniform():
    counts = np.zeros(1000)
    rng = np.random.default_rng(5)
    for _ in range(200):
        np.add.at(counts, evaluate.sample_negatives(1000, {10, 20}, 50, rng), 1)
    eligible = np.setdiff1d(np.arange(2, 1000), [10, 20])
    assert counts[[0, 1, 10, 20]].sum() == 0
    assert abs(counts[eligible].mean() - 200 * 50 / len(eligible)) < 1e-9
    assert counts[eligible].std() < 4.0  # binomial std ≈ sqrt(10) ≈ 3.2


# ------------------------------------------------------------------------------------------------ drivers
def ctr_batches(num_batches=8, batch_size=250, num_users=40, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(num_batches):
        yield {
            schema.CTX_USER_ID: np.array(
                [f"u{u}".encode() for u in rng.integers(0, num_users, size=batch_size)], dtype=object
            ),
            schema.CTX_LABEL: rng.integers(0, 2, size=batch_size).astype(np.float32),
        }


def test_evaluate_ctr_oracle_and_random():
    oracle = evaluate.evaluate_ctr(lambda b: 0.1 + 0.8 * b[schema.CTX_LABEL], ctr_batches())
    assert oracle["auc"] == 1.0 and oracle["gauc"] == 1.0
    assert oracle["num_samples"] == 2000
    assert oracle["gauc_num_users"] == 40
    assert oracle["logloss"] == pytest.approx(-math.log(0.9), rel=1e-6)
    labels = np.concatenate([b[schema.CTX_LABEL] for b in ctr_batches()])
    assert oracle["positive_rate"] == pytest.approx(labels.mean())

    rng = np.random.default_rng(1)
    random = evaluate.evaluate_ctr(lambda b: rng.uniform(size=[len(b[schema.CTX_LABEL]), 1]), ctr_batches())
    assert abs(random["auc"] - 0.5) < 0.04  # std of AUC on 1000 × 1000 pairs ≈ 0.013
    assert abs(random["gauc"] - 0.5) < 0.06
    assert random["logloss"] == pytest.approx(1.0, abs=0.08)  # E[-log U] = 1 for either class


def test_evaluate_ctr_rejects_logits_and_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        evaluate.evaluate_ctr(lambda b: np.full(len(b[schema.CTX_LABEL]), 3.0), ctr_batches(1))
    with pytest.raises(ValueError, match="shape"):
        evaluate.evaluate_ctr(lambda b: np.full(3, 0.5), ctr_batches(1))
    with pytest.raises(ValueError, match="no batches"):
        evaluate.evaluate_ctr(lambda b: b, [])


def ranking_batches(num_items, num_batches=5, batch_size=40, max_history=12, seed=0, with_labels=False):
    rng = np.random.default_rng(seed)
    for _ in range(num_batches):
        lengths = rng.integers(0, max_history + 1, size=batch_size)
        steps = np.arange(max_history)[None, :] < lengths[:, None]
        batch = {
            schema.CTX_TARGET_ITEM: rng.integers(2, num_items, size=batch_size),
            schema.CTX_HISTORY_LENGTH: lengths,
            schema.SEQ_HISTORY_ITEM: np.where(steps, rng.integers(2, num_items, size=steps.shape), 0),
        }
        if with_labels:
            batch[schema.CTX_LABEL] = rng.integers(0, 2, size=batch_size).astype(np.float32)
        yield batch


def test_evaluate_ranking_oracle_candidates_and_random():
    num_items, m = 500, 99
    seen = []

    def oracle(batch, candidates):
        assert candidates.shape == (len(batch[schema.CTX_TARGET_ITEM]), 1 + m)
        np.testing.assert_array_equal(candidates[:, 0], batch[schema.CTX_TARGET_ITEM])
        for row in range(len(candidates)):
            history = batch[schema.SEQ_HISTORY_ITEM][row, : batch[schema.CTX_HISTORY_LENGTH][row]]
            negatives = candidates[row, 1:]
            assert not set(negatives.tolist()) & (set(history.tolist()) | {candidates[row, 0]})
            assert negatives.min() >= 2 and len(set(negatives.tolist())) == m
        seen.append(candidates.copy())
        return (candidates == batch[schema.CTX_TARGET_ITEM][:, None]).astype(np.float32)

    metrics = evaluate.evaluate_ranking(oracle, ranking_batches(num_items), num_items, m, seed=3)
    assert metrics["hit@1"] == 1.0 and metrics["ndcg@10"] == 1.0 and metrics["mrr"] == 1.0
    assert metrics["num_examples"] == 200
    # Same seed → same candidates.
    first = np.concatenate(seen)
    seen.clear()
    evaluate.evaluate_ranking(oracle, ranking_batches(num_items), num_items, m, seed=3)
    np.testing.assert_array_equal(first, np.concatenate(seen))

    rng = np.random.default_rng(0)
    random = evaluate.evaluate_ranking(
        lambda b, c: rng.normal(size=c.shape), ranking_batches(num_items, num_batches=25), num_items, m
    )
    # Random scores: rank uniform on 1..100 → HIT@K = K/100, MRR = H_100/100 ≈ 0.0519.
    assert random["num_examples"] == 1000
    assert random["hit@10"] == pytest.approx(0.10, abs=0.03)
    assert random["hit@50"] == pytest.approx(0.50, abs=0.05)
    assert random["mrr"] == pytest.approx(np.sum(1 / np.arange(1, 101)) / 100, abs=0.015)

    # Constant scores rank the positive last (pessimistic ties): HIT@50 = 0.
    constant = evaluate.evaluate_ranking(lambda b, c: np.zeros(c.shape), ranking_batches(num_items), num_items)
    assert constant["hit@50"] == 0.0 and constant["mrr"] == pytest.approx(1 / 100)


def test_evaluate_ranking_counts_only_positive_labels():
    num_items = 300
    batches = list(ranking_batches(num_items, num_batches=2, with_labels=True))
    positives = int(sum((b[schema.CTX_LABEL] > 0.5).sum() for b in batches))
    # Oracle only for label-1 rows, worst for label-0 rows: the label-0 rows must not count.
    def score(batch, candidates):
        scores = np.zeros(candidates.shape)
        scores[:, 0] = np.where(batch[schema.CTX_LABEL] > 0.5, 1.0, -1.0)
        return scores

    metrics = evaluate.evaluate_ranking(score, batches, num_items, num_negatives=20, ks=(1,))
    assert metrics["num_examples"] == positives
    assert metrics["hit@1"] == 1.0
    with pytest.raises(ValueError, match="expected"):
        evaluate.evaluate_ranking(lambda b, c: c[:, :3], batches, num_items, num_negatives=20)


def test_drivers_accept_tensors_from_the_reader():
    from seminar_tf.data import reader

    metadata = schema.DatasetMetadata(
        num_items=200, num_queries=20, num_tokens=30, item_attributes={}, user_attributes={}, image_dim=0,
        has_image_pixels=False, channels=[schema.ATTRIBUTES_CHANNEL], max_history=10, num_negatives=4,
    )
    ctr = reader.synthetic_dataset(metadata, schema.CTR_DIR, batch_size=64, num_batches=4, seed=1)
    oracle = evaluate.evaluate_ctr(lambda b: b[schema.CTX_LABEL] * 0.5 + 0.25, ctr)
    assert oracle["auc"] == 1.0 and oracle["gauc"] == 1.0 and oracle["num_samples"] == 256
    assert oracle["logloss"] == pytest.approx(-math.log(0.75), rel=1e-6)

    pretrain = reader.synthetic_dataset(metadata, schema.PRETRAIN_DIR, batch_size=32, num_batches=2, seed=2)
    ranking = evaluate.evaluate_ranking(
        lambda b, c: (c == b[schema.CTX_TARGET_ITEM].numpy()[:, None]).astype(np.float32),
        pretrain, metadata.num_items, num_negatives=50, ks=(1, 10),
    )
    assert ranking["hit@1"] == 1.0 and ranking["num_examples"] == 64


# ------------------------------------------------------------------------------------------------ reports
def test_format_markdown_table():
    table = evaluate.format_markdown_table(
        [{"model": "SEMINAR", "auc": 0.71234, "n": 10}, {"model": "a|b", "auc": float("nan")}],
        ["model", "auc", "n"],
    )
    assert table.splitlines() == [
        "| model | auc | n |",
        "|---|---|---|",
        "| SEMINAR | 0.7123 | 10 |",
        "| a\\|b | nan |  |",
    ]


def test_write_report_round_trips(tmp_path):
    metrics = {
        "auc": np.float64(0.75), "gauc": 0.7, "num_samples": np.int64(12), "hit@10": np.float32(0.5),
        "mrr": float("nan"),
    }
    json_path, md_path = evaluate.write_report(metrics, str(tmp_path / "reports"), "SEMINAR CTR: test")
    assert os.path.basename(json_path) == "seminar_ctr_test.json"
    assert os.path.basename(md_path) == "seminar_ctr_test.md"
    with open(json_path) as f:
        loaded = json.load(f)
    assert loaded["title"] == "SEMINAR CTR: test"
    assert loaded["metrics"] == {"auc": 0.75, "gauc": 0.7, "num_samples": 12, "hit@10": 0.5, "mrr": None}
    assert evaluate.read_report(json_path) == loaded["metrics"]
    with open(md_path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "# SEMINAR CTR: test"
    assert lines[2:5] == ["| metric | value |", "|---|---|", "| auc | 0.7500 |"]
    assert "| num_samples | 12 |" in lines and "| mrr | nan |" in lines


def test_write_report_comparison_table_and_gfile_path(tmp_path):
    import tensorflow as tf

    comparison = {"SEMINAR": {"auc": 0.8, "gauc": 0.7}, "DIN": {"auc": 0.75, "logloss": 0.5}}
    json_path, md_path = evaluate.write_report(comparison, "ram://reports/run1", "Baselines")
    assert json_path == "ram://reports/run1/baselines.json"
    assert evaluate.read_report(json_path) == comparison
    with tf.io.gfile.GFile(md_path) as f:
        lines = f.read().splitlines()
    assert lines[2:6] == [
        "| name | auc | gauc | logloss |",
        "|---|---|---|---|",
        "| SEMINAR | 0.8000 | 0.7000 |  |",
        "| DIN | 0.7500 |  | 0.5000 |",
    ]


def test_paired_gauc_difference_matches_gauc_and_its_interval_follows_the_users():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 10)
    labels = rng.integers(0, 2, users.size)
    labels[::10] = 1 - labels[1::10]  # every user holds both classes
    noise = rng.standard_normal(users.size)
    good, weak = labels + 0.8 * noise, labels + 3.0 * rng.standard_normal(users.size)
    out = evaluate.paired_gauc_difference(users, labels, good, weak, draws=500)
    assert out["difference"] == pytest.approx(
        evaluate.gauc(users, labels, good) - evaluate.gauc(users, labels, weak))
    assert out["users"] == 200 and out["draws"] == 500
    assert 0 < out["low"] < out["difference"] < out["high"]  # a clear win: the interval excludes 0
    same = evaluate.paired_gauc_difference(users, labels, weak, weak, draws=100)
    assert same["difference"] == 0.0 and same["se"] == 0.0  # paired: identical scores never differ
    # a list of seeds: the difference of their mean GAUC
    seeds = evaluate.paired_gauc_difference(users, labels, [good, weak], weak, draws=100)
    mean_gauc = (evaluate.gauc(users, labels, good) + evaluate.gauc(users, labels, weak)) / 2
    assert seeds["difference"] == pytest.approx(mean_gauc - evaluate.gauc(users, labels, weak))
    # fewer users, wider interval
    few = evaluate.paired_gauc_difference(users[:200], labels[:200], good[:200], weak[:200], draws=500)
    assert few["high"] - few["low"] > out["high"] - out["low"]
    with pytest.raises(ValueError, match="differ in length"):
        evaluate.paired_gauc_difference(users, labels, good[:-1], weak)


def test_paired_auc_difference_matches_auc_and_resamples_whole_users():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(300), 4)
    labels = rng.integers(0, 2, users.size)
    good, weak = labels + 0.8 * rng.standard_normal(users.size), labels + 3.0 * rng.standard_normal(users.size)
    out = evaluate.paired_auc_difference(users, labels, good, weak, draws=400)
    assert out["difference"] == pytest.approx(evaluate.auc(labels, good) - evaluate.auc(labels, weak))
    assert out["users"] == 300 and out["draws"] == 400
    assert 0 < out["low"] < out["difference"] < out["high"]  # a clear win: the interval excludes 0
    same = evaluate.paired_auc_difference(users, labels, [good, weak], [good, weak], draws=50)
    assert same["difference"] == 0.0 and same["se"] == 0.0  # paired: identical scores never differ
    seeds = evaluate.paired_auc_difference(users, labels, [good, weak], weak, draws=50)
    assert seeds["difference"] == pytest.approx((evaluate.auc(labels, good) - evaluate.auc(labels, weak)) / 2)
    # one draw: every sample weighted by how often its user was drawn
    picks = np.random.default_rng(7).integers(0, 300, 300)
    weights = np.bincount(picks, minlength=300)[users]
    one = evaluate.paired_auc_difference(users, labels, good, weak, draws=1, seed=7)
    assert one["low"] == pytest.approx(evaluate.auc(labels, good, weights) - evaluate.auc(labels, weak, weights))
    # the same scores with every user's samples duplicated within the user: as many users, the same interval
    # (a per-sample bootstrap would narrow it)
    twice = evaluate.paired_auc_difference(np.repeat(users, 2), np.repeat(labels, 2), np.repeat(good, 2),
                                           np.repeat(weak, 2), draws=400)
    assert twice["se"] == pytest.approx(out["se"], rel=0.2)
    with pytest.raises(ValueError, match="differ in length"):
        evaluate.paired_auc_difference(users, labels, good[:-1], weak)
