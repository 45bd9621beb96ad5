"""Retrievers (seminar_tf.models.retrievers): config round trips, each retriever's scores / keep mask against
NumPy, SEMINAR's GSU paths against each other, and the architecture → retriever registry."""

import dataclasses
import types

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf import quantization, schema
from seminar_tf.config import ARCHITECTURES, GSU_MODES
from seminar_tf.layers import top_k_positions
from seminar_tf.models import baselines, builders, retrievers
from seminar_tf.models.psu import history_mask
from seminar_tf.models.retrievers import HistoryEntries, RetrievalContext
from seminar_tf.models.seminar import SeminarModel

import model_fixtures
from model_fixtures import CONFIG, METADATA

TABLES = model_fixtures.tables()
ALL = [
    retrievers.ProjectedGSU(), retrievers.IndexedGSU(), retrievers.StoredChannelGSU(), retrievers.ExactGSU(),
    retrievers.ExactGSU(stored_channels=True), retrievers.PQADC(rerank=3), retrievers.PQSDC(rerank=2),
    retrievers.DINRetriever(), retrievers.SIMHardRetriever(2), retrievers.SIMSoftRetriever(),
    retrievers.ETARetriever(num_bits=12, dim=8, seed=3), retrievers.TWINRetriever(), retrievers.QINRetriever(),
]


@pytest.mark.parametrize("retriever", ALL, ids=lambda r: type(r).__name__)
def test_every_retriever_round_trips_its_config(retriever):
    config = retriever.get_config()
    again = type(retriever).from_config(config)
    assert type(again) is type(retriever) and again.get_config() == config
    assert (again.gsu_mode, again.rerank) == (retriever.gsu_mode, retriever.rerank)
    # registered: Keras' own (de)serialization finds the class by its name
    restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(retriever))
    assert type(restored) is type(retriever) and restored.get_config() == config
    if isinstance(retriever, retrievers.ETARetriever):  # same seed, same fixed hyperplanes
        assert not again.hyperplanes.trainable and again.hyperplanes.shape == (8, 12)
        np.testing.assert_array_equal(again.hyperplanes.numpy(), retriever.hyperplanes.numpy())
    if isinstance(retriever, retrievers.ExactGSU):
        assert isinstance(again.inference_path, (retrievers.StoredChannelGSU if config["stored_channels"]
                                                 else retrievers.IndexedGSU))


def test_pq_rerank_must_be_positive():
    with pytest.raises(ValueError, match="pq_rerank"):
        retrievers.PQADC(rerank=0)


# ------------------------------------------------------------------------------- hand-built batch, NumPy
B, N, L, C, D, U = 2, 3, 5, 2, 4, 4


def _hand_built(seed=0):
    """A context over hand-built entries (U distinct items of C channels) with a random G_j, and the history
    after G_j [B, L, C, d] the NumPy references read."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=[U, C, D]).astype(np.float32)
    index = rng.integers(0, U, size=[B, L]).astype(np.int32)
    kernel = (np.eye(D)[None] + rng.normal(scale=0.3, size=[C, D, D])).astype(np.float32)
    history = np.einsum("bljd,jde->blje", rows[index], kernel)
    q_t = rng.normal(size=[B, N, D]).astype(np.float32)
    gamma = rng.dirichlet(np.ones(C), size=[B, N]).astype(np.float32)
    mask = np.arange(L)[None, :] < np.array([[5], [3]])  # row 1: two padding steps
    model = types.SimpleNamespace(projection=types.SimpleNamespace(kernel=tf.constant(kernel)))
    context = RetrievalContext(features={}, queries=tf.zeros([B, N], tf.int64), items=tf.zeros([B, N], tf.int64),
                               q_t=tf.constant(q_t), gamma=tf.constant(gamma), mask=tf.constant(mask), model=model,
                               entries=HistoryEntries(None, None, tf.constant(rows), tf.constant(index)))
    return context, history, q_t, gamma, mask


def test_din_scores_the_newest_steps_highest_and_keeps_every_real_step():
    context, _, _, _, mask = _hand_built()
    scores, keep = retrievers.DINRetriever()(context)
    np.testing.assert_array_equal(scores.numpy(), np.broadcast_to(np.arange(L, dtype=np.float32), [B, N, L]))
    np.testing.assert_array_equal(keep.numpy(), np.broadcast_to(mask[:, None, :], [B, N, L]))


def test_sim_soft_scores_are_the_inner_products_of_the_merged_embeddings():
    context, history, q_t, gamma, mask = _hand_built()
    scores, keep = retrievers.SIMSoftRetriever()(context)
    keys = np.einsum("bljd,bnj->bnld", history, gamma)  # k_l = Σ_j γ_j x_l^(j), per target
    np.testing.assert_allclose(scores.numpy(), np.einsum("bnld,bnd->bnl", keys, q_t), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(keep.numpy(), np.broadcast_to(mask[:, None, :], [B, N, L]))


def test_eta_scores_are_minus_the_hamming_distance_of_simhash_signatures():
    context, history, q_t, gamma, mask = _hand_built()
    retriever = retrievers.ETARetriever(num_bits=16, dim=D, seed=1)
    scores, keep = retriever(context)
    planes = retriever.hyperplanes.numpy()
    target_bits = q_t @ planes > 0  # [B, N, m]
    history_bits = np.einsum("bljd,bnj->bnld", history, gamma) @ planes > 0  # [B, N, L, m]
    np.testing.assert_array_equal(scores.numpy(), -(target_bits[:, :, None, :] != history_bits).sum(-1))
    np.testing.assert_array_equal(keep.numpy(), np.broadcast_to(mask[:, None, :], [B, N, L]))
    np.testing.assert_array_equal(retriever.signatures(tf.constant(q_t)).numpy(), target_bits)


# ------------------------------------------------------------------------------- on a model's batch
def _model(architecture, metadata=METADATA, **changes):
    tf.keras.utils.set_random_seed(0)
    config = dataclasses.replace(CONFIG, architecture=architecture, **changes)
    model = builders.build_model(config, metadata, *model_fixtures.tables(metadata))
    batch = model_fixtures.batch(metadata=metadata)
    model(batch)
    return model, batch


def _context(model, batch, training=None, entries=True):
    """A model's context for its row-format targets (N = 1), with the history's entries unless ``entries`` is
    False."""
    queries, items = batch[schema.CTX_TARGET_QUERY][:, None], batch[schema.CTX_TARGET_ITEM][:, None]
    target, q_t, gamma = model._targets(queries, items)
    mask = history_mask(batch)
    return RetrievalContext(features=batch, queries=queries, items=items, q_t=q_t, gamma=gamma, mask=mask,
                            model=model, training=training, target=target,
                            entries=model.history_entries(batch) if entries else None)


def test_sim_hard_keeps_the_steps_of_the_targets_category():
    model, batch = _model("sim_hard")
    scores, keep = model.retriever(_context(model, batch))
    categories = TABLES[0].attributes[:, 2]
    history = categories[batch[schema.SEQ_HISTORY_ITEM].numpy()]  # [B, L]
    target = categories[batch[schema.CTX_TARGET_ITEM].numpy()]  # [B]
    want = (history == target[:, None]) & (target >= len(schema.RESERVED))[:, None]
    np.testing.assert_array_equal(keep.numpy()[:, 0], want)
    assert want.any()
    np.testing.assert_array_equal(scores.numpy()[:, 0], np.broadcast_to(np.arange(want.shape[1]), want.shape))


def test_twin_scores_with_the_esu_attention_logits():
    model, batch = _model("twin")
    context = _context(model, batch)
    scores, keep = model.retriever(context)
    keys = tf.einsum("bljd,bnj->bld", model.encode_history(batch)[0], context.gamma)
    _, logits = model.esu(context.q_t[:, 0], keys, mask=context.mask, return_scores=True)
    mask = context.mask.numpy()
    np.testing.assert_allclose(scores.numpy()[:, 0][mask], tf.reduce_mean(logits, 1).numpy()[mask], rtol=1e-4,
                               atol=1e-5)
    assert np.all(scores.numpy()[:, 0][~mask] == -1e9) and np.array_equal(keep.numpy()[:, 0], mask)


def test_qin_ranks_by_the_target_query_and_falls_back_to_the_merged_target():
    model, batch = _model("qin")
    batch = dict(batch)
    queries = batch[schema.CTX_TARGET_QUERY].numpy().copy()
    queries[:8] = np.arange(8) + len(schema.QUERY_RESERVED)
    queries[8:] = schema.EMPTY_QUERY_INDEX
    batch[schema.CTX_TARGET_QUERY] = tf.constant(queries)
    context = _context(model, batch)
    scores, _ = model.retriever(context)
    history, gamma = model.encode_history(batch)[0].numpy(), context.gamma.numpy()[:, 0]
    q_t = context.q_t.numpy()[:, 0]
    query = model.channels.index(schema.QUERY_CHANNEL)
    encoded = model.content.encode_queries(tf.constant(queries)).numpy()
    probe = encoded @ model.projection.kernel.numpy()[query]  # e_q [B, d]
    items = gamma * (np.arange(len(model.channels)) != query)
    items = items / items.sum(-1, keepdims=True)
    by_query = history[:, :, query] @ probe[:, :, None] + np.einsum("bljd,bj,bd->bl", history, items, probe)[..., None]
    by_target = np.einsum("bljd,bj,bd->bl", history, gamma, q_t)
    want = np.where(np.arange(len(queries))[:, None] < 8, by_query[..., 0], by_target)
    np.testing.assert_allclose(scores.numpy()[:, 0], want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- SEMINAR's GSU paths
def _top_k(scores, k=CONFIG.top_k):
    indices, valid = top_k_positions(tf.reshape(scores, [-1, scores.shape[-1]]), None, k)
    return [row[ok].tolist() for row, ok in zip(indices.numpy(), valid.numpy())]


def test_exact_training_indexed_and_stored_channel_paths_agree():
    """Over the projected history [B, L, C, d] (the reference), over the history's entries (training), from the
    history's ids and over the entries of the stored channels (inference): the same scores, the same top K and
    the same picked channels."""
    model, batch = _model("seminar")
    rng = np.random.default_rng(0)  # non-trivial G_j: the entry and inference paths fold it into the target
    model.projection.kernel.assign(np.eye(CONFIG.dim)[None] + rng.normal(scale=0.3, size=model.projection.kernel.shape))
    history, mask = model.encode_history(batch)
    context = _context(model, batch)
    reference = retrievers.mask_scores(
        retrievers.projected_scores(model.gsu, context.q_t, context.gamma, history), mask)
    projected, _ = retrievers.ProjectedGSU()(context)
    indexed, keep = retrievers.IndexedGSU()(_context(model, batch))
    stored, _ = retrievers.StoredChannelGSU()(context)
    assert keep is None  # every real step
    mask = mask.numpy()
    for scores in (projected, indexed, stored):
        np.testing.assert_allclose(scores.numpy(), reference.numpy(), rtol=1e-4, atol=1e-4)
        assert np.all(scores.numpy()[:, 0][~mask] == -1e9)
        assert _top_k(scores) == _top_k(reference)
    positions = tf.constant(np.array(_top_k(reference, 1)).reshape(-1, 1), tf.int32)
    want = tf.gather(history, positions, batch_dims=1).numpy()
    for retriever, context in ((retrievers.ProjectedGSU(), _context(model, batch)),
                               (retrievers.IndexedGSU(), _context(model, batch)),
                               (retrievers.StoredChannelGSU(), _context(model, batch))):
        np.testing.assert_allclose(retriever.pick(context, positions).numpy(), want, rtol=1e-5, atol=1e-5)
    # The "exact" mode's retriever takes the training path in training and the indexed one otherwise.
    exact = model.retriever
    assert isinstance(exact, retrievers.ExactGSU) and exact.gsu_mode == "exact"
    inputs = exact.history_inputs(model, batch, training=True)
    assert set(inputs) == {"entries"} and isinstance(inputs["entries"], HistoryEntries)
    # Inference encodes the entries once (from the serving cache once an export built it) and picks the kept
    # steps from them, or from the projected cache: the same scores and picked channels either way.
    def inference_context():
        inputs = exact.history_inputs(model, batch, training=False)
        assert set(inputs) == {"entries"} and isinstance(inputs["entries"], HistoryEntries)
        return dataclasses.replace(_context(model, batch, entries=False), entries=inputs["entries"])

    assert not model.has_serving_cache()
    with_entries = inference_context()
    np.testing.assert_allclose(exact(with_entries)[0].numpy(), indexed.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exact.pick(with_entries, positions).numpy(), want, rtol=1e-5, atol=1e-5)
    model.build_serving_cache()
    assert model.has_serving_cache()
    cached = inference_context()
    np.testing.assert_allclose(exact(cached)[0].numpy(), indexed.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exact.pick(cached, positions).numpy(), want, rtol=1e-5, atol=1e-5)
    model.clear_serving_cache()
    assert not model.has_serving_cache()
    np.testing.assert_array_equal(exact(_context(model, batch, training=True))[0].numpy(), projected.numpy())


def test_pq_adc_equals_the_exact_gsu_when_every_vector_is_its_own_centroid_and_set_gsu_mode_switches():
    model, batch = _model("seminar", pq_subspaces=4, pq_centroids=256)
    quantization.apply_codebooks(model, quantization.quantize_vocabulary(
        model.content, quantization.CodebookConfig(4, 256)))
    exact, _ = retrievers.ProjectedGSU()(_context(model, batch))
    adc, keep = retrievers.PQADC()(_context(model, batch, entries=False))
    assert keep is None
    np.testing.assert_allclose(adc.numpy(), exact.numpy(), rtol=1e-4, atol=1e-4)
    assert _top_k(adc) == _top_k(exact)
    for mode in GSU_MODES:
        model.set_gsu_mode(mode, pq_rerank=2)
        assert model.retriever.gsu_mode == mode and model.gsu_mode == mode
        assert model.retriever.rerank == (2 if mode != "exact" else 1)
    # A baseline keeps its own retriever.
    din, _ = _model("din")
    own = din.retriever
    din.set_gsu_mode("exact")
    assert din.retriever is own and own.gsu_mode is None
    with pytest.raises(ValueError, match="fitted codebooks"):
        din.set_gsu_mode("pq_adc")


def test_em3_fused_channels_score_the_stored_channels_at_inference():
    from seminar_tf.models import em3
    tf.keras.utils.set_random_seed(0)
    model = em3.build_em3_seminar(CONFIG, METADATA, *TABLES, fusion_queries=2)
    assert isinstance(model.retriever, retrievers.ExactGSU) and model.retriever.stored_channels
    plain, _ = _model("seminar")
    assert not plain.retriever.stored_channels


# ------------------------------------------------------------------------------- registry
def test_the_registry_covers_every_architecture_with_the_configs_options():
    assert set(retrievers.RETRIEVERS) == set(ARCHITECTURES)
    config = dataclasses.replace(CONFIG, simhash_bits=12, seed=4, gsu="pq_sdc", pq_rerank=3)
    for architecture in ARCHITECTURES:
        retriever = retrievers.build_retriever(architecture, config, category_column=2)
        assert isinstance(retriever, retrievers.RETRIEVERS[architecture] if architecture != "seminar"
                          else retrievers.PQSDC)
    assert retrievers.build_retriever("sim_hard", config, category_column=2).category_column == 2
    eta = retrievers.build_retriever("eta", config)
    assert (eta.num_bits, eta.dim, eta.seed) == (12, CONFIG.dim, 4)
    assert retrievers.build_retriever("seminar", config).rerank == 3
    assert type(retrievers.build_retriever("seminar", CONFIG)) is retrievers.ExactGSU
    with pytest.raises(ValueError, match="unknown architecture"):
        retrievers.build_retriever("dien", CONFIG)
    # The baselines' builder uses it: each model's retriever is its architecture's.
    for name in baselines.BASELINES:
        model = baselines.build_baseline(name, CONFIG, METADATA, *TABLES)
        assert type(model.retriever) is retrievers.RETRIEVERS[name] and model.pq is None


# ------------------------------------------------------------------------------- the category prior's top-K
@pytest.mark.parametrize("grouping", ["partition", "argsort"])
def test_category_top_k_keeps_what_the_prior_ranked_scores_of_every_step_keep(grouping, monkeypatch):
    """Scoring only the target's category (when it has ≥ K steps) keeps the same steps, in the same order (ties to
    the lower position), as ranking every step with the category prior; targets with fewer steps of their
    category, a reserved category (-1), padding and K > L included. Integer scores make ties common."""
    if grouping == "argsort":
        monkeypatch.setattr(retrievers, "_PARTITIONED_CATEGORIES", 0)
    rng = np.random.default_rng(1)
    for _ in range(60):
        batch, m, length, k = rng.integers(1, 4), rng.integers(1, 7), rng.integers(1, 40), int(rng.integers(1, 9))
        entries = HistoryEntries(
            tf.constant(rng.integers(-2, 3, size=(5, 3)), tf.float32),
            tf.constant(rng.integers(0, 5, size=(batch, length)), tf.int32),
            tf.constant(rng.integers(-2, 3, size=(12, 2, 3)), tf.float32),
            tf.constant(rng.integers(0, 12, size=(batch, length)), tf.int32))
        targets = tf.constant(rng.integers(-2, 3, size=(batch, m, 3, 3)), tf.float32)
        mask = tf.constant(np.arange(length)[None, :] < rng.integers(0, length + 1, size=batch)[:, None])
        categories = tf.constant(rng.integers(0, 4, size=(batch, length)))
        target_categories = tf.constant(rng.integers(-1, 4, size=(batch, m)))
        prior = SeminarModel.category_prior
        same = tf.equal(categories[:, None, :], target_categories[:, :, None])
        ranked = prior(retrievers.mask_scores(retrievers.entry_scores(entries, targets), mask), mask, same)
        want = top_k_positions(tf.reshape(ranked, [-1, length]), None, k)
        got = retrievers.category_top_k(retrievers.entry_part_scores(entries, targets), categories,
                                        target_categories, mask, k, prior, num_categories=4)
        real = np.repeat(mask.numpy(), m, axis=0)
        (want_index, want_valid), (got_index, got_valid) = [
            (index.numpy(), valid.numpy() & np.take_along_axis(real, index.numpy(), 1)) for index, valid in (want, got)]
        np.testing.assert_array_equal(got_valid, want_valid)
        np.testing.assert_array_equal(np.where(got_valid, got_index, 0), np.where(want_valid, want_index, 0))


def test_with_the_category_prior_and_the_serving_cache_inference_ranks_without_scoring_every_step():
    """An export's model (serving cache built) with the GSU category prior keeps the same steps and gives the
    same logits as the inference path that scores every step (no cache), without a gsu_scores output."""
    model, batch = _model("seminar", gsu_category_prior=True)
    rng = np.random.default_rng(0)
    items = tf.constant(rng.integers(len(schema.RESERVED), METADATA.num_items, size=(model_fixtures.BATCH, 5)))
    queries = tf.constant(rng.integers(0, METADATA.num_queries, size=(model_fixtures.BATCH, 5)))
    same = model.category_match(batch, items).numpy() & history_mask(batch).numpy()[:, None, :]
    counts = same.sum(-1)
    assert (counts >= CONFIG.top_k).any() and (counts < CONFIG.top_k).any()  # both kinds of target
    every_step = model.score_pairs(batch, queries, items, training=False)
    assert "gsu_scores" in every_step
    model.build_serving_cache()
    try:
        ranked = model.score_pairs(batch, queries, items, training=False)
    finally:
        model.clear_serving_cache()
    assert "gsu_scores" not in ranked
    valid = every_step["top_k_valid"].numpy()
    np.testing.assert_array_equal(ranked["top_k_valid"].numpy(), valid)
    np.testing.assert_array_equal(np.where(valid, ranked["top_k"].numpy(), 0),
                                  np.where(valid, every_step["top_k"].numpy(), 0))
    np.testing.assert_allclose(ranked["logit"].numpy(), every_step["logit"].numpy(), rtol=1e-5, atol=1e-5)
