"""Long histories without [B, L, C, d]: SEMINAR and every baseline give the loss, the gradients and the outputs of
the reference path over the full projected history (kept here: the encoded history [B, L, C, d], scores over it,
``gated_call`` over it, feedback embedded per step), and no traced step builds a float tensor per step and
channel."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf import schema
from seminar_tf.layers import MultiHeadTargetAttention
from seminar_tf.models import baselines, builders, em3, retrievers, seminar_builders
from seminar_tf.models.psu import history_mask, item_gamma
from seminar_tf.models.retrievers import HistoryEntries, Retriever, mask_scores, projected_scores
from seminar_tf.models.seminar import SeminarModel

import model_fixtures
from model_fixtures import CONFIG

METADATA = dataclasses.replace(model_fixtures.METADATA, num_users=40, num_feedback=6)
TABLES = model_fixtures.tables(METADATA)
FEATURES = dict(use_item_id=True, use_user_id=True, use_feedback=True)
SEMINAR = dict(FEATURES, category_affinity=True, gsu_category_prior=True, recent_history=4, aux_weight=0.5)
CASES = {
    "seminar": ("seminar", SEMINAR),
    "seminar_plain": ("seminar", {}),
    "din": ("din", FEATURES),
    "sim_hard": ("sim_hard", FEATURES),
    "sim_soft": ("sim_soft", FEATURES),
    "eta": ("eta", FEATURES),
    "twin": ("twin", dict(FEATURES, aux_weight=0.3)),  # TWIN's auxiliary read-out is the ESU's
    "qin": ("qin", FEATURES),
}


# ------------------------------------------------------------------------------------------ the reference path
def _reference_scores(retriever, context, history):
    """The retrievers' scores as computed over the projected history [B, L, C, d] before the entries."""
    model, q_t, gamma, mask = context.model, context.q_t, context.gamma, context.mask
    n = tf.shape(q_t)[1]
    every = Retriever.for_every_target(mask, n)
    positions = tf.broadcast_to(tf.cast(tf.range(tf.shape(mask)[1]), tf.float32)[None, None],
                                tf.shape(every))
    if isinstance(retriever, retrievers.DINRetriever):
        return positions, every
    if isinstance(retriever, retrievers.SIMHardRetriever):
        return positions, model.category_match(context.features, context.items, retriever.category_column)
    if isinstance(retriever, retrievers.SIMSoftRetriever):
        return tf.einsum("bnlj,bnj->bnl", tf.einsum("bljd,bnd->bnlj", history, q_t), gamma), every
    if isinstance(retriever, retrievers.ETARetriever):
        projected = tf.einsum("bljd,dm->bljm", history, retriever.hyperplanes)
        bits = tf.einsum("bljm,bnj->bnlm", projected, gamma) > 0
        distance = tf.not_equal(retriever.signatures(q_t)[:, :, None, :], bits)
        return -tf.reduce_sum(tf.cast(distance, q_t.dtype), -1), every
    if isinstance(retriever, retrievers.TWINRetriever):
        return mask_scores(projected_scores(model.esu, q_t, gamma, history), mask), every
    if isinstance(retriever, retrievers.QINRetriever):
        probe = retriever.target_query(model, context.queries, context.features.get(schema.TARGET_QUERY_TOKENS))
        weights = item_gamma(gamma, model.channels) + tf.one_hot(model.channels.index(schema.QUERY_CHANNEL),
                                                                 len(model.channels))
        by_query = tf.einsum("bnlj,bnj->bnl", tf.einsum("bljd,bnd->bnlj", history, probe), weights)
        by_target = tf.einsum("bnlj,bnj->bnl", tf.einsum("bljd,bnd->bnlj", history, q_t), gamma)
        has_query = tf.reduce_any(tf.not_equal(probe, 0), axis=-1)
        return tf.where(has_query[:, :, None], by_query, by_target), every
    scores = mask_scores(projected_scores(model.gsu, q_t, gamma, history), mask)  # SEMINAR's GSU
    if model.gsu_category_prior:
        scores = model.category_prior(scores, mask, model.category_match(context.features, context.items))
    return scores, None


class ReferenceRetriever(Retriever):
    """The reference path: the model's own retriever's scores, the kept steps and the auxiliary read-out, all
    over the encoded history after G_j [B, L, C, d] (``model.encode_history``)."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.gsu_mode, self.rerank = inner.gsu_mode, inner.rerank

    def history_inputs(self, model, features, training=None):
        object.__setattr__(self, "history", model.encode_history(features, training)[0])
        return {}

    def call(self, context):
        inner = self.inner
        if isinstance(inner, retrievers.ExactGSU):
            inner = inner.training_path if context.training else inner.inference_path
        return _reference_scores(inner, context, self.history)

    def pick(self, context, positions):
        return tf.gather(self.history, positions, batch_dims=1)

    def aux_readout(self, context):
        return context.model.gsu.gated_call(context.q_t, self.history, context.gamma, context.mask,
                                            context.training)[0]


def _reference_feedback_mean(model, features):
    feedback = model._history_feedback(features)
    real = tf.cast(history_mask(features), tf.float32)[..., None]
    total = tf.reduce_sum(model.feedback_embedding(feedback) * real, axis=1)  # [B, L, d] embedded per step
    return tf.math.divide_no_nan(total, tf.reduce_sum(real, axis=1))


def _reference_affinity(model, features, items):
    real = tf.cast(history_mask(features), tf.float32)
    same = tf.cast(model.category_match(features, items), tf.float32) * real[:, None, :]
    count = tf.reduce_sum(same, -1)
    share = tf.math.divide_no_nan(count, tf.reduce_sum(real, -1)[:, None])
    stats = tf.stack([share, tf.math.log1p(count) / 5.0], axis=-1)
    if model.feedback_embedding is None:
        return stats, None
    feedback = model.feedback_embedding(model._history_feedback(features))
    return stats, tf.math.divide_no_nan(tf.einsum("bnl,bld->bnd", same, feedback), count[..., None])


def _use_reference(model):
    """Switches a model to the reference path (its retriever wrapped, feedback features per step)."""
    model.retriever = ReferenceRetriever(model.retriever, name="reference")
    model.history_feedback_mean = lambda features: _reference_feedback_mean(model, features)
    model.affinity_features = lambda features, items: _reference_affinity(model, features, items)


def _model(architecture, **changes):
    tf.keras.utils.set_random_seed(0)
    config = dataclasses.replace(CONFIG, architecture=architecture, **changes)
    if architecture == "twin" and config.aux_weight:  # the builders give baselines no auxiliary loss
        model = baselines.TWIN(seminar_builders.build_content_encoder(config, METADATA, *TABLES),
                               aux_weight=config.aux_weight, **seminar_builders.seminar_arguments(config, METADATA))
    else:
        model = builders.build_model(config, METADATA, *TABLES)
    batch = model_fixtures.batch(metadata=METADATA, seed=3)
    model(batch)
    rng = np.random.default_rng(0)  # non-trivial G_j: the entry path folds it into the targets
    model.projection.kernel.assign(np.eye(CONFIG.dim)[None] + rng.normal(scale=0.2, size=model.projection.kernel.shape))
    return model, batch


def _loss_and_gradients(model, batch):
    with tf.GradientTape() as tape:
        outputs = model(batch, training=True)
        loss = model.compute_loss(batch, training=True)
    gradients = tape.gradient(loss, model.trainable_variables)
    return loss, outputs, {v.ref(): None if g is None else tf.convert_to_tensor(g).numpy()
                           for v, g in zip(model.trainable_variables, gradients)}


def _assert_same_step(model, batch):
    loss, outputs, gradients = _loss_and_gradients(model, batch)
    inference = model(batch)
    _use_reference(model)
    want_loss, want_outputs, want_gradients = _loss_and_gradients(model, batch)
    want_inference = model(batch)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    np.testing.assert_array_equal(outputs["top_k"].numpy(), want_outputs["top_k"].numpy())
    for name in ("logit", "aux_logit"):
        if name in want_outputs:
            np.testing.assert_allclose(outputs[name].numpy(), want_outputs[name].numpy(), rtol=1e-4, atol=1e-5)
    assert set(gradients) == set(want_gradients)
    for variable in model.trainable_variables:
        got, want = gradients[variable.ref()], want_gradients[variable.ref()]
        assert (got is None) == (want is None), variable.name
        if want is not None:
            scale = max(1e-3, float(np.abs(want).max()))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=variable.name)
    np.testing.assert_allclose(inference["logit"].numpy(), want_inference["logit"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(inference["top_k"].numpy(), want_inference["top_k"].numpy())


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_gradients_and_outputs_equal_the_reference_path(case):
    architecture, changes = CASES[case]
    model, batch = _model(architecture, **changes)
    if "aux_weight" in changes:
        assert model.aux_task is not None
    _assert_same_step(model, batch)


def test_aux_over_the_kept_steps_equals_aux_over_the_history_when_k_covers_it():
    # K >= L: the K kept steps are every real step, so head^GSU over them is head^GSU over the history (the
    # attention does not depend on the order of its keys); the loss and every gradient are the same.
    length = METADATA.max_history
    results = {}
    for scope in ("history", "top_k"):
        model, batch = _model("seminar", **dict(SEMINAR, top_k=length, aux_scope=scope))
        assert model.aux_scope == scope
        results[scope] = _loss_and_gradients(model, batch), model
    (loss, outputs, gradients), model = results["top_k"]
    (want_loss, want_outputs, want_gradients), _ = results["history"]
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(outputs["aux_logit"].numpy(), want_outputs["aux_logit"].numpy(), rtol=1e-4,
                               atol=1e-5)
    for got, want in zip(gradients.values(), want_gradients.values()):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1e-3, float(np.abs(want).max())))


def test_aux_over_the_kept_steps_reads_only_them():
    # K < L: the read-out is gated_call over exactly the kept steps' channels after G_j.
    model, batch = _model("seminar", **dict(SEMINAR, top_k=5, aux_scope="top_k"))
    outputs = model(batch, training=True)
    history, _ = model.encode_history(batch)  # [B, L, C, d]
    q_t, gamma = model.encode_targets(batch[schema.CTX_TARGET_QUERY][:, None], batch[schema.CTX_TARGET_ITEM][:, None])
    top_k, valid = outputs["top_k"], outputs["top_k_valid"]  # [B, K] (row format)
    kept = tf.gather(history, top_k, batch_dims=1)
    readout = model.gsu.gated_call(q_t, kept, gamma, valid)[0]
    want = tf.squeeze(model.aux_head(tf.concat([readout, q_t], -1)), -1)  # [B, 1]
    np.testing.assert_allclose(np.reshape(outputs["aux_logit"].numpy(), [-1]), want.numpy()[:, 0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="aux_scope 'all'"):
        dataclasses.replace(CONFIG, aux_scope="all").validate()


def test_em3_fused_channels_take_the_entry_path_with_the_reference_gradients():
    tf.keras.utils.set_random_seed(0)
    model = em3.build_em3_seminar(dataclasses.replace(CONFIG, **SEMINAR), METADATA, *TABLES, fusion_queries=2,
                                  content_id_weight=0.1)
    batch = model_fixtures.batch(metadata=METADATA, seed=3)
    model(batch)
    entries = model.history_entries(batch)
    assert entries.items.shape[1] == len(model.channels) - 1  # fused_0, fused_1, attributes
    _assert_same_step(model, batch)


def test_unknown_history_query_text_gets_entries_of_its_own():
    """With ``history_query_tokens``, each OOV query step is its own entry, encoded from its tokens."""
    model, batch = _model("seminar", **SEMINAR)
    rng = np.random.default_rng(1)
    queries = batch[schema.SEQ_HISTORY_QUERY].numpy().copy()
    oov = (rng.random(queries.shape) < 0.3) & (queries != schema.PAD_INDEX)
    tokens = rng.integers(2, METADATA.num_tokens, size=queries.shape + (METADATA.max_query_tokens,))
    queries[oov] = schema.OOV_INDEX
    batch = {**batch, schema.SEQ_HISTORY_QUERY: tf.constant(queries), schema.HISTORY_QUERY_TOKENS: tf.constant(tokens)}
    entries = model.history_entries(batch)
    index = entries.query_index.numpy()
    assert len(set(index[oov].tolist())) == int(oov.sum())  # one row per unknown step
    want = model.content.query_channel(batch[schema.SEQ_HISTORY_QUERY], batch[schema.HISTORY_QUERY_TOKENS])
    np.testing.assert_allclose(tf.gather(entries.query, entries.query_index).numpy(), want.numpy(), rtol=1e-5,
                               atol=1e-6)
    _assert_same_step(model, batch)


def test_entry_attention_equals_gated_call_over_the_gathered_history():
    rng = np.random.default_rng(0)
    b, n, length, dim = 3, 2, 9, 8
    entries = HistoryEntries(tf.constant(rng.normal(size=[4, dim]), tf.float32),
                             tf.constant(rng.integers(0, 4, size=[b, length]), tf.int32),
                             tf.constant(rng.normal(size=[5, 2, dim]), tf.float32),
                             tf.constant(rng.integers(0, 5, size=[b, length]), tf.int32))
    kernel = tf.constant(np.eye(dim)[None] + rng.normal(scale=0.3, size=[3, dim, dim]), tf.float32)
    q_t = tf.constant(rng.normal(size=[b, n, dim]), tf.float32)
    gamma = tf.nn.softmax(tf.constant(rng.normal(size=[b, n, 3]), tf.float32))
    mask = tf.sequence_mask([9, 4, 0], length)
    attention = MultiHeadTargetAttention(3, key_dim=dim, output_dim=dim)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([entries.query, entries.items, kernel, gamma])
        got, got_scores = retrievers.entry_attention(attention, kernel, q_t, gamma, entries, mask)
        steps = retrievers.gather_entries(entries, tf.tile(tf.range(length)[None], [b, 1]))
        history = tf.einsum("bljd,jde->blje", steps, kernel)  # [B, L, C, d] after G_j
        want, want_scores = attention.gated_call(q_t, history, gamma, mask)
        got_loss, want_loss = tf.reduce_sum(got * got), tf.reduce_sum(want * want)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_scores.numpy(), want_scores.numpy(), rtol=1e-5, atol=1e-5)
    sources = [entries.query, entries.items, kernel, gamma] + attention.trainable_variables
    for i, a, c in zip(range(len(sources)), tape.gradient(got_loss, sources), tape.gradient(want_loss, sources)):
        assert a is not None and c is not None, i
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(c).numpy(), rtol=1e-4,
                                   atol=1e-5)
    # the history-averaged logits are the GSU scores of the entries
    scores = retrievers.entry_scores(entries, retrievers.target_vectors(kernel, attention.folded_query(q_t), gamma))
    np.testing.assert_allclose(tf.where(mask[:, None], scores, 0.0).numpy(),
                               tf.where(mask[:, None], got_scores, 0.0).numpy(), rtol=1e-4, atol=1e-5)


def test_feedback_features_from_counts_equal_the_per_step_embeddings():
    model, batch = _model("seminar", **SEMINAR)
    items = batch[schema.CTX_TARGET_ITEM][:, None]
    np.testing.assert_allclose(model.history_feedback_mean(batch).numpy(),
                               _reference_feedback_mean(model, batch).numpy(), rtol=1e-5, atol=1e-6)
    for got, want in zip(model.affinity_features(batch, items), _reference_affinity(model, batch, items)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_affinity_counted_per_category_equals_the_per_step_count():
    model, batch = _model("seminar", **SEMINAR)
    items = tf.concat([batch[schema.CTX_TARGET_ITEM][:, None], tf.ones_like(batch[schema.CTX_TARGET_ITEM])[:, None]],
                      axis=1)  # the second target is OOV: a reserved category matches no step
    histogram = model.affinity_features(batch, items)
    model._HISTOGRAM_CATEGORIES = 0  # every vocabulary is "large": counted per (row, target, step)
    per_step = model.affinity_features(batch, items)
    for got, want in zip(histogram, per_step):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert np.all(histogram[0].numpy()[:, 1] == 0)


def test_category_prior_without_padding_equals_the_masked_formula():
    rng = np.random.default_rng(0)
    scores = tf.constant(rng.normal(size=(2, 3, 9)), tf.float32)
    same = tf.constant(rng.random((2, 3, 9)) < 0.4)
    every = tf.ones([2, 9], tf.bool)
    almost = tf.constant([[True] * 9, [True] * 8 + [False]])
    got = SeminarModel.category_prior(scores, every, same).numpy()
    high, low = scores.numpy().max(-1, keepdims=True), scores.numpy().min(-1, keepdims=True)
    np.testing.assert_array_equal(got, np.where(same.numpy(), scores.numpy(), scores.numpy() - (high - low + 1.0)))
    # with a padded step the padded position keeps its score and the span ignores it
    padded = SeminarModel.category_prior(scores, almost, same).numpy()
    np.testing.assert_array_equal(padded[0], got[0])
    assert padded[1, :, 8].tolist() == scores.numpy()[1, :, 8].tolist()


# ------------------------------------------------------------------------------------------ no [B, L, C, d]
LENGTH = 37  # a history length no other axis has


def _per_step_tensors(graph, dim):
    """Float tensors of ``graph`` with a static L axis (after the batch axis) followed by ≥ d values per step."""
    found = []
    for op in graph.get_operations():
        for tensor in op.outputs:
            if not tensor.dtype.is_floating or tensor.shape.rank is None:
                continue
            dims = tensor.shape.as_list()
            for axis in range(1, len(dims)):
                tail = dims[axis + 1:]
                if dims[axis] == LENGTH and tail and all(t is not None for t in tail) and np.prod(tail) >= dim:
                    found.append(f"{op.type} {op.name} {dims}")
    return found


def _traced_step(model, batch):
    signature = {k: tf.TensorSpec(v.shape, v.dtype) for k, v in batch.items()}

    @tf.function(input_signature=[signature])
    def step(features):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(features, training=True)
        return loss, tape.gradient(loss, model.trainable_variables), model(features)["logit"]

    return step.get_concrete_function().graph


@pytest.mark.parametrize("case", ["seminar", "din", "sim_hard", "sim_soft", "eta", "twin", "qin"])
def test_no_traced_training_or_inference_step_builds_a_per_step_channel_tensor(case):
    architecture, changes = CASES[case]
    metadata = dataclasses.replace(METADATA, max_history=LENGTH)
    tf.keras.utils.set_random_seed(0)
    model = builders.build_model(dataclasses.replace(CONFIG, architecture=architecture, **changes), metadata,
                                 *model_fixtures.tables(metadata))
    batch = model_fixtures.batch(metadata=metadata)
    model(batch)
    assert _per_step_tensors(_traced_step(model, batch), CONFIG.dim) == []
    _use_reference(model)  # the check itself finds the reference path's [B, L, C, d]
    assert _per_step_tensors(_traced_step(model, batch), CONFIG.dim)
