"""Tests of seminar_tf.tasks: every loss against an independent NumPy reference, masking, metrics, and
training inside a tiny tfrs.Model."""

import numpy as np
import pytest

import seminar_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
import tensorflow as tf
import tensorflow_recommenders as tfrs

from seminar_tf import schema
from seminar_tf.tasks import (
    ALIGNMENT_CHANNELS,
    AlignmentTask,
    ContentIdContrastiveTask,
    CTRTask,
    GSUAuxiliaryTask,
    NextPairTask,
    QueryItemRelevanceTask,
    UserRankingTask,
    chunked_clip_loss,
)

TEXT, IMAGE, ATTRS = schema.TEXT_CHANNEL, schema.IMAGE_CHANNEL, schema.ATTRIBUTES_CHANNEL


# ---------------------------------------------------------------------------------------------------------
# NumPy references (written independently of the TF code: explicit loops over rows / candidates)
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_next_pair(query, positive, negatives, temperature, pos_ids=None, neg_ids=None, neg_mask=None,
                 weights=None, in_batch=True, remove_hits=True):
    batch = query.shape[0]
    weights = np.ones(batch) if weights is None else weights
    losses, ranks = [], []
    for b in range(batch):
        cands = [positive[b]]
        if negatives is not None:
            for n in range(negatives.shape[1]):
                if neg_mask is not None and not neg_mask[b, n]:
                    continue
                if remove_hits and neg_ids is not None and pos_ids is not None and neg_ids[b, n] == pos_ids[b]:
                    continue
                cands.append(negatives[b, n])
        if in_batch:
            for j in range(batch):
                if j == b or weights[j] <= 0:
                    continue
                if remove_hits and pos_ids is not None and pos_ids[j] == pos_ids[b]:
                    continue
                cands.append(positive[j])
        logits = np.array([query[b] @ c for c in cands], np.float64) / temperature
        losses.append(-np_log_softmax(logits)[0])
        ranks.append(int((logits[1:] > logits[0]).sum()))
    losses, ranks = np.array(losses), np.array(ranks)
    loss = (losses * weights).sum() / weights.sum()
    hit = {k: ((ranks < k) * weights).sum() / weights.sum() for k in (1, 5)}
    return loss, hit


def np_clip_anchor_losses(a, b, temperature):
    """Symmetric CLIP per anchor for one set of valid positions: a, b [n, d]."""
    a, b = np_normalize(a), np_normalize(b)
    logits = a @ b.T / temperature
    out = []
    for i in range(len(a)):
        out.append(0.5 * (-np_log_softmax(logits[i, :])[i] - np_log_softmax(logits[:, i])[i]))
    return out


def np_chunked_clip(x_a, x_b, mask, num_chunks, temperature):
    batch, length, _ = x_a.shape
    sub = -(-length // num_chunks)
    losses = []
    for bi in range(batch):
        for k in range(num_chunks):
            idx = [step for step in range(k * sub, min((k + 1) * sub, length)) if mask[bi, step]]
            if idx:
                losses += np_clip_anchor_losses(x_a[bi, idx], x_b[bi, idx], temperature)
    return float(np.mean(losses)) if losses else 0.0


def np_bce_logits(labels, logits):
    return np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))


def np_weighted_auc(labels, scores, weights):
    pos = [(s, w) for y, s, w in zip(labels, scores, weights) if y == 1 and w > 0]
    neg = [(s, w) for y, s, w in zip(labels, scores, weights) if y == 0 and w > 0]
    num = sum(wp * wn * (1.0 if sp > sn else 0.5 if sp == sn else 0.0) for sp, wp in pos for sn, wn in neg)
    return num / (sum(w for _, w in pos) * sum(w for _, w in neg))


def np_relevance(query, item, mask, shift, item_ids=None, scale=1.0):
    q = query.reshape(-1, query.shape[-1])[mask.reshape(-1) > 0]
    it = item.reshape(-1, item.shape[-1])[mask.reshape(-1) > 0]
    n = len(q)
    labels, logits = [], []
    for k in range(n):
        labels.append(1.0)
        logits.append(scale * q[k] @ it[k])
    if n >= 2:
        ids = None if item_ids is None else item_ids.reshape(-1)[mask.reshape(-1) > 0]
        for k in range(n):
            other = (k + shift) % n
            if ids is not None and ids[other] == ids[k]:
                continue
            labels.append(0.0)
            logits.append(scale * q[k] @ it[other])
    labels, logits = np.array(labels), np.array(logits)
    return float(np_bce_logits(labels, logits).mean()), labels, logits


def np_content_id(content, id_emb, temperature, ids=None, weights=None):
    c, e = np_normalize(content), np_normalize(id_emb)
    batch = len(c)
    weights = np.ones(batch) if weights is None else weights
    logits = c @ e.T / temperature
    losses, correct = [], []
    for b in range(batch):
        if weights[b] <= 0:  # a padding row is no anchor (weight 0)
            losses.append(0.0)
            correct.append(0.0)
            continue
        keep = [j for j in range(batch)
                if weights[j] > 0 and (j == b or ids is None or ids[j] != ids[b])]
        pos = keep.index(b)
        row = logits[b, keep]
        col = logits[keep, b]
        losses.append(0.5 * (-np_log_softmax(row)[pos] - np_log_softmax(col)[pos]))
        correct.append(float(np.argmax(row) == pos))
    losses, correct = np.array(losses), np.array(correct)
    return (losses * weights).sum() / weights.sum(), (correct * weights).sum() / weights.sum()


def metric_values(layer):
    return {m.name: float(m.result()) for m in layer.metrics}


# ---------------------------------------------------------------------------------------------------------
# NextPairTask
def test_next_pair_matches_numpy_with_sampled_inbatch_and_accidental_hits():
    rng = np.random.default_rng(0)
    batch, num_neg, dim = 6, 4, 5
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    positive = rng.normal(size=(batch, dim)).astype(np.float32)
    negatives = rng.normal(size=(batch, num_neg, dim)).astype(np.float32)
    pos_ids = np.array([3, 7, 3, 9, 11, 7])  # rows 0/2 and 1/5 share a pair: accidental hits
    neg_ids = rng.integers(0, 12, size=(batch, num_neg))
    neg_ids[0, 1] = 3  # a sampled negative that is the positive itself
    neg_mask = rng.random((batch, num_neg)) > 0.25
    weights = np.array([1.0, 2.0, 0.5, 1.0, 1.0, 1.5])

    task = NextPairTask(temperature=0.5)
    loss = task(query, positive, negatives, positive_ids=pos_ids, negative_ids=neg_ids,
                negative_mask=neg_mask, sample_weight=weights)
    want, hits = np_next_pair(query, positive, negatives, 0.5, pos_ids, neg_ids, neg_mask, weights)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    values = metric_values(task)
    assert values["next_pair_hit_rate_at_1"] == pytest.approx(hits[1], abs=1e-6)
    assert values["next_pair_hit_rate_at_5"] == pytest.approx(hits[5], abs=1e-6)
    assert values["next_pair_loss"] == pytest.approx(want, rel=1e-5)

    # Keeping accidental hits is a different (larger) loss, and matches the reference without removal.
    keep = NextPairTask(temperature=0.5, remove_accidental_hits=False)
    loss_keep = keep(query, positive, negatives, positive_ids=pos_ids, negative_ids=neg_ids,
                     negative_mask=neg_mask, sample_weight=weights)
    want_keep, _ = np_next_pair(query, positive, negatives, 0.5, pos_ids, neg_ids, neg_mask, weights,
                                remove_hits=False)
    np.testing.assert_allclose(float(loss_keep), want_keep, rtol=1e-5)
    assert abs(want_keep - want) > 1e-3


def test_next_pair_in_batch_only_and_sampled_only():
    rng = np.random.default_rng(1)
    query, positive = rng.normal(size=(2, 5, 4)).astype(np.float32)
    negatives = rng.normal(size=(5, 3, 4)).astype(np.float32)
    in_batch_only = NextPairTask(temperature=2.0)(query, positive)
    np.testing.assert_allclose(float(in_batch_only), np_next_pair(query, positive, None, 2.0)[0], rtol=1e-5)
    sampled_only = NextPairTask(use_in_batch_negatives=False)(query, positive, negatives)
    np.testing.assert_allclose(
        float(sampled_only), np_next_pair(query, positive, negatives, 1.0, in_batch=False)[0], rtol=1e-5)
    with pytest.raises(ValueError):
        NextPairTask(use_in_batch_negatives=False)(query, positive)


def test_next_pair_padding_rows_do_not_contribute():
    rng = np.random.default_rng(2)
    query, positive = rng.normal(size=(2, 4, 6)).astype(np.float32)
    negatives = rng.normal(size=(4, 3, 6)).astype(np.float32)
    ids = np.arange(4)
    base = NextPairTask()(query, positive, negatives, positive_ids=ids)
    # Two padding rows of garbage with weight 0: neither anchors nor in-batch negatives.
    pad_q, pad_p = (100 * rng.normal(size=(2, 2, 6))).astype(np.float32)
    pad_n = rng.normal(size=(2, 3, 6)).astype(np.float32)
    padded = NextPairTask()(
        np.concatenate([query, pad_q]), np.concatenate([positive, pad_p]), np.concatenate([negatives, pad_n]),
        positive_ids=np.arange(6), sample_weight=np.array([1, 1, 1, 1, 0, 0], np.float32))
    np.testing.assert_allclose(float(padded), float(base), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# chunked_clip_loss / AlignmentTask
def _random_channels(rng, batch, length, dim):
    return [rng.normal(size=(batch, length, dim)).astype(np.float32) for _ in range(3)]


def test_chunked_clip_matches_numpy_with_mask_and_uneven_chunks():
    rng = np.random.default_rng(3)
    x_a, x_b, _ = _random_channels(rng, 3, 7, 4)
    mask = rng.random((3, 7)) > 0.3
    for num_chunks in (1, 2, 3):  # 7 is not a multiple of 2 or 3: padded to 8 / 9
        got = chunked_clip_loss(x_a, x_b, mask, num_chunks=num_chunks, temperature=0.2)
        np.testing.assert_allclose(float(got), np_chunked_clip(x_a, x_b, mask, num_chunks, 0.2), rtol=1e-5)


def test_chunked_clip_one_chunk_is_full_clip_and_two_chunks_average_halves():
    rng = np.random.default_rng(4)
    x_a, x_b, _ = _random_channels(rng, 2, 8, 4)
    mask = np.ones((2, 8), bool)
    full = np.mean([v for b in range(2) for v in np_clip_anchor_losses(x_a[b], x_b[b], 0.1)])
    np.testing.assert_allclose(float(chunked_clip_loss(x_a, x_b, mask, 1, 0.1)), full, rtol=1e-5)

    # N_ch = 2: the (anchor-weighted) average of the halves computed separately as full-sequence losses.
    first = float(chunked_clip_loss(x_a[:, :4], x_b[:, :4], mask[:, :4], 1, 0.1))
    second = float(chunked_clip_loss(x_a[:, 4:], x_b[:, 4:], mask[:, 4:], 1, 0.1))
    two = float(chunked_clip_loss(x_a, x_b, mask, 2, 0.1))
    np.testing.assert_allclose(two, 0.5 * (first + second), rtol=1e-5)
    assert abs(two - float(full)) > 1e-3  # chunking really changes which positions are negatives

    # Unequal valid counts per half: weighted by the number of valid anchors, as documented.
    mask[:, 5:] = False
    first = float(chunked_clip_loss(x_a[:, :4], x_b[:, :4], mask[:, :4], 1, 0.1))
    second = float(chunked_clip_loss(x_a[:, 4:], x_b[:, 4:], mask[:, 4:], 1, 0.1))
    np.testing.assert_allclose(float(chunked_clip_loss(x_a, x_b, mask, 2, 0.1)), (8 * first + 2 * second) / 10,
                               rtol=1e-5)


def test_chunked_clip_padding_positions_do_not_change_loss():
    rng = np.random.default_rng(5)
    x_a, x_b, _ = _random_channels(rng, 2, 6, 4)
    mask = np.array([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]], bool)
    for num_chunks in (1, 2):
        base = float(chunked_clip_loss(x_a, x_b, mask, num_chunks, 0.1))
        garbage_a, garbage_b = x_a.copy(), x_b.copy()
        garbage_a[~mask] = 50 * rng.normal(size=(int((~mask).sum()), 4))
        garbage_b[~mask] = -50 * rng.normal(size=(int((~mask).sum()), 4))
        np.testing.assert_allclose(float(chunked_clip_loss(garbage_a, garbage_b, mask, num_chunks, 0.1)), base,
                                   rtol=1e-6)
    # Trailing masked positions (a longer padded batch) leave the one-chunk loss unchanged.
    longer = [np.concatenate([x, rng.normal(size=(2, 3, 4)).astype(np.float32)], axis=1) for x in (x_a, x_b)]
    longer_mask = np.concatenate([mask, np.zeros((2, 3), bool)], axis=1)
    np.testing.assert_allclose(float(chunked_clip_loss(*longer, longer_mask, 1, 0.1)),
                               float(chunked_clip_loss(x_a, x_b, mask, 1, 0.1)), rtol=1e-6)


def test_chunked_clip_only_builds_chunk_sized_score_matrices():
    batch, length, dim, num_chunks = 2, 12, 4, 3
    spec = tf.TensorSpec([batch, length, dim], tf.float32)
    fn = tf.function(lambda a, b, m: chunked_clip_loss(a, b, m, num_chunks=num_chunks))
    graph = fn.get_concrete_function(spec, spec, tf.TensorSpec([batch, length], tf.bool)).graph
    matmuls = [op for op in graph.get_operations() if op.type in ("BatchMatMulV2", "BatchMatMulV3", "MatMul")]
    assert matmuls
    for op in matmuls:
        assert op.outputs[0].shape.as_list() == [batch * num_chunks, length // num_chunks, length // num_chunks]
    for op in graph.get_operations():
        for out in op.outputs:
            dims = out.shape.as_list() if out.shape.rank is not None else []
            assert dims.count(length) < 2, f"{op.name} builds an [L, L] tensor: {dims}"


def test_alignment_task_sums_unordered_pairs_of_present_channels():
    rng = np.random.default_rng(6)
    text, image, attrs = _random_channels(rng, 2, 6, 4)
    mask = rng.random((2, 6)) > 0.2
    channels = {TEXT: text, IMAGE: image, ATTRS: attrs,
                schema.QUERY_CHANNEL: rng.normal(size=(2, 6, 4)).astype(np.float32)}  # never aligned

    def ref(a, b):
        return np_chunked_clip(a, b, mask, 2, 0.1)

    task = AlignmentTask(num_chunks=2, temperature=0.1)
    assert task.active_pairs(list(channels)) == [(TEXT, IMAGE), (TEXT, ATTRS), (IMAGE, ATTRS)]
    got = task(channels, mask)
    np.testing.assert_allclose(float(got), ref(text, image) + ref(text, attrs) + ref(image, attrs), rtol=1e-5)
    assert metric_values(task)["alignment_loss"] == pytest.approx(float(got), rel=1e-6)
    assert 0.0 <= metric_values(task)["alignment_accuracy"] <= 1.0

    # Missing image channel: only text-attributes remains. One channel: loss 0.
    np.testing.assert_allclose(float(task({TEXT: text, ATTRS: attrs}, mask)), ref(text, attrs), rtol=1e-5)
    assert float(task({TEXT: text}, mask)) == 0.0

    # The paper's ordered Σ_i Σ_{j≠i} is twice the unordered sum (L_CLIP is symmetric).
    ordered = AlignmentTask(channel_pairs=[(a, b) for a in ALIGNMENT_CHANNELS for b in ALIGNMENT_CHANNELS
                                           if a != b], num_chunks=2, temperature=0.1)
    np.testing.assert_allclose(float(ordered(channels, mask)), 2 * float(got), rtol=1e-5)


def test_alignment_batch_negatives_contrast_other_users_steps_at_the_same_position():
    """negatives="batch": step l is contrasted with step l of the other users (the CLIP loss of the transposed
    [L, B] sequences, one chunk). A user whose steps all share one topic makes the paper's in-sequence negatives
    hard and the other users' steps easy."""
    rng = np.random.default_rng(9)
    batch, length, dim = 4, 6, 8
    topics = rng.normal(size=(batch, 1, dim))
    text = (topics + 0.05 * rng.normal(size=(batch, length, dim))).astype(np.float32)
    attrs = (topics + 0.05 * rng.normal(size=(batch, length, dim))).astype(np.float32)
    mask = np.ones((batch, length), bool)
    mask[0, 4:] = False
    by_batch = AlignmentTask(temperature=0.1, negatives="batch")
    got = float(by_batch({TEXT: text, ATTRS: attrs}, mask))
    want = np_chunked_clip(text.transpose(1, 0, 2), attrs.transpose(1, 0, 2), mask.T, 1, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    in_sequence = float(AlignmentTask(temperature=0.1)({TEXT: text, ATTRS: attrs}, mask))
    assert got < 0.1 < 1.0 < in_sequence
    assert by_batch.get_config()["negatives"] == "batch"
    with pytest.raises(ValueError, match="negatives"):
        AlignmentTask(negatives="users")


@pytest.mark.parametrize("negatives", ["sequence", "batch"])
def test_alignment_pairs_with_a_missing_channel_skip_those_steps(negatives):
    """``present``: a pair of channels is aligned at the steps that have both (as anchors and as negatives); a
    pair without the missing channel is untouched. Checked against the NumPy loss with those steps masked."""
    rng = np.random.default_rng(11)
    batch, length, dim = 3, 8, 8
    text, image, attrs = (rng.normal(size=(batch, length, dim)).astype(np.float32) for _ in range(3))
    mask = np.ones((batch, length), bool)
    mask[2, 6:] = False
    has_image = rng.random((batch, length)) > 0.3
    task = AlignmentTask(num_chunks=2, temperature=0.1, negatives=negatives)
    got = float(task({TEXT: text, IMAGE: image, ATTRS: attrs}, mask, present={IMAGE: has_image}))

    def clip(a, b, m):
        if negatives == "batch":
            return np_chunked_clip(a.transpose(1, 0, 2), b.transpose(1, 0, 2), m.T, 1, 0.1)
        return np_chunked_clip(a, b, m, 2, 0.1)

    want = clip(text, image, mask & has_image) + clip(text, attrs, mask) + clip(image, attrs, mask & has_image)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    everywhere = float(task({TEXT: text, IMAGE: image, ATTRS: attrs}, mask))
    assert abs(everywhere - got) > 1e-3


def test_alignment_accuracy_is_one_for_identical_channels():
    rng = np.random.default_rng(7)
    text = rng.normal(size=(2, 8, 16)).astype(np.float32)
    task = AlignmentTask(temperature=0.05)
    loss = task({TEXT: text, IMAGE: 3.0 * text}, np.ones((2, 8), bool))  # same direction, other norm
    assert metric_values(task)["alignment_accuracy"] == pytest.approx(1.0)
    assert float(loss) < 0.1


# ---------------------------------------------------------------------------------------------------------
# QueryItemRelevanceTask
def test_relevance_matches_numpy_with_mask_and_collisions():
    rng = np.random.default_rng(8)
    batch, length, dim = 3, 5, 4
    query = rng.normal(size=(batch, length, dim)).astype(np.float32)
    item = rng.normal(size=(batch, length, dim)).astype(np.float32)
    mask = rng.random((batch, length)) > 0.3
    item_ids = rng.integers(3, 7, size=(batch, length))  # few ids: same-item collisions happen
    for shift in (1, 2, 5):
        task = QueryItemRelevanceTask()
        got = task(query, item, mask, item_ids=item_ids, negative_shift=shift)
        want, labels, logits = np_relevance(query, item, mask, shift, item_ids)
        assert (labels == 0).sum() < (labels == 1).sum()  # some collisions were skipped
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
        auc = metric_values(task)["query_item_auc"]
        assert auc == pytest.approx(np_weighted_auc(labels, logits, np.ones_like(labels)), abs=0.02)

    # The random roll is one of the shifts 1..n-1, reproducible from the seed, and varies between calls.
    count = int(mask.sum())
    candidates = [np_relevance(query, item, mask, s, item_ids)[0] for s in range(1, count)]
    seeded = [QueryItemRelevanceTask(seed=3) for _ in range(2)]
    draws = [[float(t(query, item, mask, item_ids=item_ids)) for _ in range(6)] for t in seeded]
    assert draws[0] == draws[1]
    assert len(set(np.round(draws[0], 5))) > 1
    for value in draws[0]:
        assert min(abs(value - c) for c in candidates) < 1e-5


def test_relevance_padding_does_not_change_loss():
    rng = np.random.default_rng(9)
    query, item = rng.normal(size=(2, 2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)
    base = float(QueryItemRelevanceTask()(query, item, mask, negative_shift=2))
    query2, item2 = query.copy(), item.copy()
    query2[~mask] = 99.0
    item2[~mask] = -99.0
    padded = float(QueryItemRelevanceTask()(query2, item2, mask, negative_shift=2))
    np.testing.assert_allclose(padded, base, rtol=1e-6)


def test_relevance_sign_separating_embedding_vs_inverted():
    # Simplex embeddings: <v_i, v_j> = s²(δ_ij - 1/K), so matched logits are large positive and mismatched
    # ones negative.
    num_items, scale = 4, 6.0
    simplex = scale * (np.eye(num_items) - 1.0 / num_items)
    ids = np.array([[0, 1, 2, 3], [1, 2, 3, 0]])
    query = simplex[ids].astype(np.float32)
    item = simplex[ids].astype(np.float32)
    mask = np.ones((2, 4), bool)
    task = QueryItemRelevanceTask()
    loss = float(task(query, item, mask, item_ids=ids))
    assert loss < 1e-3
    assert metric_values(task)["query_item_auc"] > 0.99
    inverted = QueryItemRelevanceTask()
    inverted_loss = float(inverted(query, -item, mask, item_ids=ids))  # sign-inverted logits
    assert inverted_loss > 5.0
    assert metric_values(inverted)["query_item_auc"] < 0.01


def test_relevance_learnable_scale_is_trainable():
    fixed = QueryItemRelevanceTask(initial_scale=2.0)
    learned = QueryItemRelevanceTask(learnable_scale=True, initial_scale=2.0)
    assert not fixed.trainable_weights and len(learned.trainable_weights) == 1
    rng = np.random.default_rng(10)
    query, item = rng.normal(size=(2, 1, 3, 4)).astype(np.float32)
    want = np_relevance(query, item, np.ones((1, 3)), 1, scale=2.0)[0]
    np.testing.assert_allclose(float(learned(query, item, np.ones((1, 3)), negative_shift=1)), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# CTRTask / GSUAuxiliaryTask
def test_ctr_task_loss_and_metrics_match_numpy():
    rng = np.random.default_rng(11)
    labels = (rng.random(64) < 0.4).astype(np.float32)
    logits = (rng.normal(size=64) + 1.5 * labels).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=64).astype(np.float32)
    task = CTRTask()
    loss = float(task(labels, logits, sample_weight=weights))
    want = (np_bce_logits(labels, logits) * weights).sum() / weights.sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    values = metric_values(task)
    assert set(values) == {"auc", "logloss"}
    assert values["logloss"] == pytest.approx(want, rel=1e-5)
    assert values["auc"] == pytest.approx(np_weighted_auc(labels, logits, weights), abs=0.01)

    # Padding rows with weight 0 change nothing; [B, 1] inputs are accepted too.
    padded = float(CTRTask()(np.concatenate([labels, [1, 0]])[:, None],
                             np.concatenate([logits, [-30, 30]])[:, None],
                             sample_weight=np.concatenate([weights, [0, 0]])))
    np.testing.assert_allclose(padded, want, rtol=1e-5)


def test_gsu_auxiliary_task_is_weighted_bce():
    rng = np.random.default_rng(12)
    labels = (rng.random(32) < 0.5).astype(np.float32)
    logits = rng.normal(size=32).astype(np.float32)
    task = GSUAuxiliaryTask(weight=0.25)
    loss = float(task(labels, logits))
    bce = np_bce_logits(labels, logits).mean()
    np.testing.assert_allclose(loss, 0.25 * bce, rtol=1e-5)
    values = metric_values(task)
    assert values["gsu_aux_logloss"] == pytest.approx(bce, rel=1e-5)
    assert values["gsu_aux_auc"] == pytest.approx(np_weighted_auc(labels, logits, np.ones(32)), abs=0.01)


def np_user_ranking(labels, logits, groups, weights):
    """Explicit double loop: every same-group pair with label_i > label_j."""
    total = norm = 0.0
    for i in range(len(labels)):
        for j in range(len(labels)):
            if groups[i] == groups[j] and labels[i] > labels[j]:
                w = weights[i] * weights[j]
                total += w * np.log1p(np.exp(-(float(logits[i]) - float(logits[j]))))
                norm += w
    return total / norm if norm else 0.0


def test_user_ranking_task_matches_numpy_over_same_user_pairs_only():
    rng = np.random.default_rng(21)
    labels = (rng.random(40) < 0.45).astype(np.float32)
    logits = rng.normal(size=40).astype(np.float32)
    groups = np.array([b"u%d" % (i % 6) for i in range(40)])
    weights = rng.uniform(0.5, 2.0, size=40).astype(np.float32)
    weights[-3:] = 0.0  # padding rows
    task = UserRankingTask(weight=0.5)
    loss = float(task(labels, logits, groups, sample_weight=weights))
    np.testing.assert_allclose(loss, 0.5 * np_user_ranking(labels, logits, groups, weights), rtol=1e-5)
    pairs = sum(1 for i in range(40) for j in range(40) if groups[i] == groups[j] and labels[i] > labels[j]
                and weights[i] * weights[j] > 0)
    assert metric_values(task)["user_rank_pairs"] == pytest.approx(pairs)

    # Only within-user order counts: a shift of one user's logits, or a cross-user pair, changes nothing ...
    shifted = logits + np.where(groups == b"u2", 5.0, 0.0).astype(np.float32)
    np.testing.assert_allclose(float(UserRankingTask(weight=0.5)(labels, shifted, groups, sample_weight=weights)),
                               loss, rtol=1e-5)
    # ... and with one user per row there is no pair at all.
    unique = np.array([b"u%d" % i for i in range(40)])
    assert float(UserRankingTask()(labels, logits, unique)) == 0.0
    # Ranking a user's positive above the negatives lowers the loss.
    better = logits + 2.0 * labels
    assert float(UserRankingTask()(labels, better, groups)) < float(UserRankingTask()(labels, logits, groups))


def test_user_ranking_task_rejects_a_negative_weight():
    with pytest.raises(ValueError, match="weight"):
        UserRankingTask(weight=-0.1)


# ---------------------------------------------------------------------------------------------------------
# ContentIdContrastiveTask
def test_content_id_contrastive_matches_numpy_with_duplicates_and_padding():
    rng = np.random.default_rng(13)
    content, id_emb = rng.normal(size=(2, 7, 5)).astype(np.float32)
    ids = np.array([4, 8, 4, 2, 9, 8, 5])
    weights = np.array([1, 1, 1, 2, 1, 0.5, 0], np.float32)
    task = ContentIdContrastiveTask(temperature=0.1)
    loss = float(task(content, id_emb, ids=ids, sample_weight=weights))
    want, accuracy = np_content_id(content, id_emb, 0.1, ids, weights)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert metric_values(task)["content_id_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    no_ids = float(ContentIdContrastiveTask(temperature=0.1)(content, id_emb, sample_weight=weights))
    np.testing.assert_allclose(no_ids, np_content_id(content, id_emb, 0.1, None, weights)[0], rtol=1e-5)
    assert abs(no_ids - want) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Shared behaviour: fully-masked inputs, config round trips
def _all_masked_losses(variables):
    v = variables
    q = v[:, None, :] * tf.ones([1, 5, 1])  # [4, 5, 3]
    zeros = tf.zeros([4, 5])
    return {
        "next_pair": NextPairTask()(v, 2 * v, tf.stack([v, -v], axis=1), sample_weight=tf.zeros([4])),
        "clip": chunked_clip_loss(q, 2 * q, zeros, num_chunks=2),
        "alignment": AlignmentTask(num_chunks=3)({TEXT: q, IMAGE: -q, ATTRS: q}, zeros),
        "relevance": QueryItemRelevanceTask(learnable_scale=True)(q, q, zeros),
        "ctr": CTRTask()(tf.ones([4]), tf.reduce_sum(v, -1), sample_weight=tf.zeros([4])),
        "gsu": GSUAuxiliaryTask()(tf.ones([4]), tf.reduce_sum(v, -1), sample_weight=tf.zeros([4])),
        "content_id": ContentIdContrastiveTask()(v, -v, sample_weight=tf.zeros([4])),
        "user_rank": UserRankingTask()(tf.constant([1.0, 0.0, 1.0, 0.0]), tf.reduce_sum(v, -1),
                                       tf.constant([b"a", b"a", b"b", b"b"]), sample_weight=tf.zeros([4])),
    }


def test_fully_masked_inputs_give_zero_loss_and_finite_gradients():
    variables = tf.Variable(np.random.default_rng(14).normal(size=(4, 3)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        losses = _all_masked_losses(variables)
    for name, loss in losses.items():
        assert float(loss) == 0.0, name
        grad = tape.gradient(loss, variables)
        if grad is not None:
            grad = tf.convert_to_tensor(grad)
            assert np.all(np.isfinite(grad.numpy())), name
            assert np.allclose(grad.numpy(), 0.0), name


@pytest.mark.parametrize("task", [
    NextPairTask(temperature=0.3, use_in_batch_negatives=False, hit_rate_ks=(1, 10)),
    AlignmentTask(channel_pairs=[(TEXT, IMAGE)], num_chunks=4, temperature=0.2),
    QueryItemRelevanceTask(learnable_scale=True, initial_scale=3.0, seed=5),
    ContentIdContrastiveTask(temperature=0.2, normalize=False),
    CTRTask(metric_prefix="psr_"),
    GSUAuxiliaryTask(weight=0.3),
    UserRankingTask(weight=0.4, metric_prefix="rank_"),
])
def test_config_round_trip(task):
    clone = type(task).from_config(task.get_config())
    assert clone.get_config() == task.get_config()
    assert [m.name for m in clone.metrics] == [m.name for m in task.metrics]


# ---------------------------------------------------------------------------------------------------------
# Each task inside a tiny tfrs.Model trained with fit: the loss goes down.
class _TinyModel(tfrs.Model):
    def __init__(self, task, loss_fn, num_rows, dim=8):
        super().__init__()
        self.task = task
        self.loss_fn = loss_fn
        self.table_a = tf.keras.layers.Embedding(
            num_rows, dim, embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.3, seed=1))
        self.table_b = tf.keras.layers.Embedding(
            num_rows, dim, embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.3, seed=2))

    def compute_loss(self, features, training=False):
        return self.loss_fn(self, features)


def _fit_losses(task, loss_fn, features, num_rows):
    """Loss before training, the fit history, loss after training, and the model's metric names."""
    model = _TinyModel(task, loss_fn, num_rows)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    batch = {k: tf.constant(v) for k, v in features.items()}
    before = float(model.compute_loss(batch))
    history = model.fit(tf.data.Dataset.from_tensors(features).repeat(12), epochs=1, verbose=0)
    after = float(model.compute_loss(batch))
    return before, history.history["loss"], after, {m.name for m in model.metrics}


@pytest.mark.parametrize("name", ["next_pair", "alignment", "relevance", "ctr", "gsu", "content_id"])
def test_task_trains_inside_tfrs_model(name):
    batch, length = 8, 6
    rng = np.random.default_rng(15)
    if name == "next_pair":
        task = NextPairTask(temperature=0.5)
        features = {"ids": np.arange(batch), "neg": rng.integers(0, 32, (batch, 4))}

        def loss_fn(m, f):
            return m.task(m.table_a(f["ids"]), m.table_b(f["ids"]), m.table_b(f["neg"] + batch),
                          positive_ids=f["ids"], negative_ids=f["neg"] + batch)
        rows, expected = 64, "next_pair_hit_rate_at_1"
    elif name == "alignment":
        task = AlignmentTask(num_chunks=2, temperature=0.1)
        features = {"ids": rng.integers(0, 40, (batch, length)), "mask": rng.random((batch, length)) > 0.2}

        def loss_fn(m, f):
            return m.task({TEXT: m.table_a(f["ids"]), IMAGE: m.table_b(f["ids"])}, f["mask"])
        rows, expected = 40, "alignment_accuracy"
    elif name == "relevance":
        task = QueryItemRelevanceTask(learnable_scale=True)
        features = {"q": rng.integers(0, 40, (batch, length)), "i": rng.integers(0, 40, (batch, length)),
                    "mask": rng.random((batch, length)) > 0.3}

        def loss_fn(m, f):
            return m.task(m.table_a(f["q"]), m.table_b(f["i"]), f["mask"], item_ids=f["i"])
        rows, expected = 40, "query_item_auc"
    elif name in ("ctr", "gsu"):
        task = CTRTask() if name == "ctr" else GSUAuxiliaryTask(weight=0.5)
        features = {"u": rng.integers(0, 16, 32), "i": rng.integers(0, 16, 32),
                    "label": (rng.random(32) < 0.5).astype(np.float32)}

        def loss_fn(m, f):
            logit = tf.reduce_sum(m.table_a(f["u"]) * m.table_b(f["i"]), axis=-1)
            return m.task(f["label"], logit)
        rows, expected = 16, "auc" if name == "ctr" else "gsu_aux_auc"
    else:
        task = ContentIdContrastiveTask(temperature=0.2)
        features = {"ids": rng.integers(0, 6, batch)}

        def loss_fn(m, f):
            return m.task(m.table_a(f["ids"]), m.table_b(f["ids"]), ids=f["ids"])
        rows, expected = 6, "content_id_accuracy"

    before, history, after, metric_names = _fit_losses(task, loss_fn, features, rows)
    assert expected in metric_names
    assert np.all(np.isfinite(history))
    assert after < 0.8 * before, (before, history, after)


def test_alignment_does_not_treat_a_repeated_item_as_a_negative():
    """Positions 0 and 2 hold the same item (same content): without ids the CLIP loss must split the anchor's
    probability between them; with ids the repeat is no negative and a perfect alignment costs ~0."""
    vectors = np.eye(4, dtype=np.float32)[[0, 1, 0, 3]][None]  # [1, L=4, d=4]
    mask = tf.ones([1, 4], tf.bool)
    task = AlignmentTask(num_chunks=1, temperature=0.01)
    channels = {"text": tf.constant(vectors), "attributes": tf.constant(vectors)}
    without = float(task(channels, mask, compute_metrics=False))
    with_ids = float(task(channels, mask, compute_metrics=False, ids=tf.constant([[5, 6, 5, 7]])))
    assert without > 0.3 and with_ids < 1e-3
