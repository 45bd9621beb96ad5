"""The synthetic world's own click model as a scorer: the ceiling a model can reach on a world, and what the far
history is worth on it (docs/design.md §7).

Each impression of ``world_truth.json`` carries its true click probability p = sigmoid(z) with
z = bias + w_long · Σ_{k ∈ long-term topics} mixture[item, k] + (short-term, query and popularity terms).
``oracle`` scores a sample by p; ``oracle_without_long_term`` by sigmoid(z − w_long · Σ_k mixture[item, k]): the
best a model that never sees the user's long-term topics (the oldest part of the history) can do. Samples are
matched to impressions by (user_id, timestamp).
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np

from seminar_tf import evaluate, schema

ORACLE = "oracle"
ORACLE_WITHOUT_LONG_TERM = "oracle_without_long_term"


def truth_probabilities(truth: dict) -> Dict[Tuple[str, int], Tuple[float, float]]:
    """{(user_id, timestamp): (p, p without the long-term term)} of every impression of a world's truth."""
    items = truth["items"]
    index = {item: i for i, item in enumerate(items["item_id"])}
    users = truth["users"]
    long_term = {user: set(topics) for user, topics in zip(users["user_id"], users["long_term_topics"])}
    weight = float(truth["click_model"]["long_term_weight"])
    impressions = truth["impressions"]
    out = {}
    for user, timestamp, item, p in zip(impressions["user_id"], impressions["timestamp"], impressions["item_id"],
                                        impressions["probability"]):
        row = index[item]
        match = sum(w for k, w in zip(items["mixture_topics"][row], items["mixture_weights"][row])
                    if k in long_term[user])
        p = min(max(float(p), 1e-6), 1.0 - 1e-6)  # the truth rounds p to 6 decimals
        logit = np.log(p) - np.log1p(-p)
        out[(user, int(timestamp))] = (p, float(1.0 / (1.0 + np.exp(-(logit - weight * match)))))
    return out


def oracle_scores(truth: dict, batches: Iterable[dict]) -> Dict[str, np.ndarray]:
    """The oracle's two scores for the CTR samples of ``batches`` (reader batches: user_id, timestamp, label):
    {"user_id", "label", ORACLE, ORACLE_WITHOUT_LONG_TERM} arrays in sample order. A sample with no impression
    in the truth (a dataset built from another world) raises ValueError naming it."""
    probabilities = truth_probabilities(truth)
    users, labels, scores = [], [], []
    for batch in batches:
        for user, timestamp, label in zip(np.asarray(batch[schema.CTX_USER_ID]), np.asarray(
                batch[schema.CTX_TIMESTAMP]), np.asarray(batch[schema.CTX_LABEL])):
            user = user.decode("utf-8") if isinstance(user, bytes) else str(user)
            key = (user, int(timestamp))
            if key not in probabilities:
                raise ValueError(f"sample of user {user!r} at timestamp {int(timestamp)} is no impression of this "
                                 "world's truth: give the raw directory the dataset was built from")
            users.append(user)
            labels.append(float(label))
            scores.append(probabilities[key])
    pairs = np.asarray(scores, np.float64).reshape(-1, 2)
    return {"user_id": np.asarray(users, object), "label": np.asarray(labels, np.float64), ORACLE: pairs[:, 0],
            ORACLE_WITHOUT_LONG_TERM: pairs[:, 1]}


def oracle_metrics(truth: dict, batches: Iterable[dict]) -> Dict[str, Dict[str, float]]:
    """AUC, GAUC and logloss of both oracle scorers on the samples of ``batches``: {scorer: metrics}."""
    scored = oracle_scores(truth, batches)
    out = {}
    for name in (ORACLE, ORACLE_WITHOUT_LONG_TERM):
        out[name] = {"auc": evaluate.auc(scored["label"], scored[name]),
                     "gauc": evaluate.gauc(scored["user_id"], scored["label"], scored[name]),
                     "logloss": evaluate.logloss(scored["label"], scored[name]),
                     "num_samples": int(len(scored["label"]))}
    return out
