"""The world's click model as a scorer (seminar_tf/data/oracle.py): every CTR sample matched to its impression,
the probabilities of the truth, the long-term term taken out exactly, metrics as seminar_tf.evaluate computes
them."""

import math

import numpy as np
import pytest

from seminar_tf import evaluate, schema
from seminar_tf.data import oracle, reader
from seminar_tf.data.world import load_truth


def _batches(dataset_dir, split):
    return [{k: v.numpy() for k, v in batch.items()}
            for batch in reader.make_dataset(dataset_dir, schema.CTR_DIR, split, 64)]


def test_every_sample_scores_with_its_impressions_truth(world_dir, dataset_dir):
    truth = load_truth(world_dir)
    batches = _batches(dataset_dir, "test")
    scored = oracle.oracle_scores(truth, batches)
    labels = np.concatenate([b[schema.CTX_LABEL] for b in batches])
    assert len(scored["label"]) == len(labels) > 0
    np.testing.assert_array_equal(scored["label"], labels)
    impressions = truth["impressions"]
    by_key = {(u, t): (p, item) for u, t, p, item in zip(impressions["user_id"], impressions["timestamp"],
                                                          impressions["probability"], impressions["item_id"])}
    first = batches[0]
    user, timestamp = first[schema.CTX_USER_ID][0].decode(), int(first[schema.CTX_TIMESTAMP][0])
    p, item = by_key[(user, timestamp)]
    assert scored[oracle.ORACLE][0] == pytest.approx(max(p, 1e-6), abs=1e-12)
    # without the long-term term: the logit less w_long · Σ_{k ∈ the user's long-term topics} mixture[item, k]
    items, users = truth["items"], truth["users"]
    row = items["item_id"].index(item)
    topics = set(users["long_term_topics"][users["user_id"].index(user)])
    match = sum(w for k, w in zip(items["mixture_topics"][row], items["mixture_weights"][row]) if k in topics)
    q = min(max(p, 1e-6), 1 - 1e-6)
    want = 1 / (1 + math.exp(-(math.log(q / (1 - q)) - truth["click_model"]["long_term_weight"] * match)))
    assert scored[oracle.ORACLE_WITHOUT_LONG_TERM][0] == pytest.approx(want, rel=1e-9)
    # the long-term term only raises p (weights and mixtures are non-negative)
    assert np.all(scored[oracle.ORACLE_WITHOUT_LONG_TERM] <= scored[oracle.ORACLE] + 1e-12)
    metrics = oracle.oracle_metrics(truth, batches)
    assert metrics[oracle.ORACLE]["auc"] == pytest.approx(evaluate.auc(labels, scored[oracle.ORACLE]))
    assert metrics[oracle.ORACLE_WITHOUT_LONG_TERM]["num_samples"] == len(labels)
    for name in (oracle.ORACLE, oracle.ORACLE_WITHOUT_LONG_TERM):
        assert 0.0 <= metrics[name]["auc"] <= 1.0 and metrics[name]["logloss"] > 0


def test_a_sample_from_another_world_is_named(world_dir, dataset_dir):
    truth = load_truth(world_dir)
    batch = _batches(dataset_dir, "test")[0]
    batch[schema.CTX_TIMESTAMP] = batch[schema.CTX_TIMESTAMP] + 10 ** 9
    with pytest.raises(ValueError, match="no impression of this world's truth"):
        oracle.oracle_scores(truth, [batch])
