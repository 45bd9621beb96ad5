"""PSU and SEMINAR models on synthetic in-memory data: training, restore, padding, bad input."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf import schema
from seminar_tf.data import reader
from seminar_tf.models import builders
from seminar_tf.models.content import ContentEncoder

from model_fixtures import BATCH, CONFIG, METADATA
from model_fixtures import batch as _batch
from model_fixtures import tables as _tables


@pytest.mark.slow
def test_psu_trains_and_every_loss_decreases():
    tf.keras.utils.set_random_seed(0)
    psu = builders.build_psu(CONFIG, METADATA, *_tables())
    psu.compile(tf.keras.optimizers.Adam(1e-2))
    data = reader.synthetic_dataset(METADATA, "pretrain", 16, 4, seed=0).cache()
    history = psu.fit(data, epochs=6, verbose=0).history
    for name in ("next_pair_loss", "alignment_loss", "loss"):
        assert history[name][-1] < history[name][0] * 0.95, (name, history[name])
    assert np.isfinite(history["query_item_loss"]).all()


def test_psu_alignment_projection_heads_carry_the_alignment_loss(tmp_path):
    """``align_projection``: L_align is computed on PSU-only heads, which receive its gradient, and the loss
    differs from the one on the raw channel embeddings; the content still restores into the CTR model."""
    tf.keras.utils.set_random_seed(0)
    config = dataclasses.replace(CONFIG, align_projection=True, next_pair_weight=0.0, relevance_weight=0.0)
    psu = builders.build_psu(config, METADATA, *_tables())
    batch = next(iter(reader.synthetic_dataset(METADATA, "pretrain", 16, 1, seed=0)))
    with tf.GradientTape() as tape:
        loss = psu.compute_loss(batch, training=True)
    heads = [v for head in psu.align_heads.values() for v in head.trainable_variables]
    assert heads and all(g is not None for g in tape.gradient(loss, heads))
    plain = builders.build_psu(dataclasses.replace(config, align_projection=False), METADATA, *_tables())
    plain(batch)
    plain.content.set_weights(psu.content.get_weights())
    assert plain.align_heads is None
    assert abs(float(plain.compute_loss(batch)) - float(psu.compute_loss(batch))) > 1e-4
    model = builders.build_seminar(config, METADATA)
    model(_batch())
    path = tf.train.Checkpoint(content=psu.content).write(str(tmp_path / "content"))
    tf.train.Checkpoint(content=model.content).read(path).assert_existing_objects_matched()


def test_seminar_outputs_and_candidate_scoring_agree():
    model = builders.build_seminar(CONFIG, METADATA, *_tables())
    batch = _batch()
    outputs = model(batch)
    assert outputs["logit"].shape == [16]
    assert outputs["gsu_scores"].shape == [16, METADATA.max_history]
    assert outputs["top_k"].shape == [16, CONFIG.top_k]
    np.testing.assert_allclose(outputs["probability"], tf.sigmoid(outputs["logit"]), rtol=1e-6)
    # Scoring the target among candidates gives exactly the row-format logit.
    candidates_items = tf.stack([batch[schema.CTX_TARGET_ITEM], tf.fill([16], tf.constant(7, tf.int64))], axis=1)
    candidates_queries = tf.stack([batch[schema.CTX_TARGET_QUERY]] * 2, axis=1)
    scores = model.score_candidates(batch, candidates_queries, candidates_items)
    np.testing.assert_allclose(scores[:, 0], outputs["logit"], rtol=1e-4, atol=1e-5)


def test_top_k_picks_the_highest_gsu_scores_among_real_steps():
    model = builders.build_seminar(CONFIG, METADATA, *_tables())
    batch = _batch()
    outputs = model(batch)
    scores = outputs["gsu_scores"].numpy()
    lengths = batch[schema.CTX_HISTORY_LENGTH].numpy()
    for row in range(16):
        k = min(CONFIG.top_k, lengths[row])
        expected = set(np.argsort(-scores[row, : lengths[row]], kind="stable")[:k])
        assert set(outputs["top_k"].numpy()[row, :k]) == expected


def test_padding_never_changes_an_output():
    model = builders.build_seminar(CONFIG, METADATA, *_tables())
    batch = _batch()
    padded = dict(batch)
    for name in schema.SEQUENCE_FEATURES:
        padded[name] = tf.pad(batch[name], [[0, 0], [0, 10]])
    np.testing.assert_allclose(model(batch)["logit"], model(padded)["logit"], rtol=1e-5, atol=1e-6)
    # Garbage in padded slots beyond history_length is masked too.
    noisy = dict(padded)
    noisy[schema.SEQ_HISTORY_ITEM] = tf.where(
        tf.sequence_mask(batch[schema.CTX_HISTORY_LENGTH], METADATA.max_history + 10),
        padded[schema.SEQ_HISTORY_ITEM], tf.constant(5, tf.int64))
    np.testing.assert_allclose(model(batch)["logit"], model(noisy)["logit"], rtol=1e-5, atol=1e-6)


def test_empty_and_all_padding_histories_give_finite_outputs_and_gradients():
    model = builders.build_seminar(CONFIG, METADATA, *_tables())
    batch = dict(_batch())
    batch[schema.CTX_HISTORY_LENGTH] = tf.zeros_like(batch[schema.CTX_HISTORY_LENGTH])
    batch[schema.SEQ_HISTORY_ITEM] = tf.zeros_like(batch[schema.SEQ_HISTORY_ITEM])
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(loss.numpy())
    assert all(np.isfinite(g.numpy() if not isinstance(g, tf.IndexedSlices) else g.values.numpy()).all()
               for g in grads if g is not None)


@pytest.mark.slow
def test_psu_weights_restore_into_the_ctr_model(tmp_path):
    psu = builders.build_psu(CONFIG, METADATA, *_tables())
    psu.compile(tf.keras.optimizers.Adam(1e-2))
    psu.fit(reader.synthetic_dataset(METADATA, "pretrain", 16, 2), epochs=1, verbose=0)
    path = tf.train.Checkpoint(content=psu.content).write(str(tmp_path / "content"))
    model = builders.build_seminar(CONFIG, METADATA)
    model(_batch())  # build variables
    before = [v.numpy().copy() for v in model.content.variables]
    tf.train.Checkpoint(content=model.content).read(path).assert_existing_objects_matched()
    assert len(psu.content.variables) == len(model.content.variables) > 5
    changed = 0
    for old, variable, saved in zip(before, model.content.variables, psu.content.variables):
        assert variable.name.split("/")[-2:] == saved.name.split("/")[-2:]
        np.testing.assert_array_equal(variable.numpy(), saved.numpy())
        changed += not np.array_equal(old, variable.numpy())
    assert changed >= 5  # the restore really replaced fresh initial values


def test_freeze_switches_keep_content_and_projections_fixed():
    config = dataclasses.replace(CONFIG, freeze_content=True, freeze_projections=True)
    model = builders.build_seminar(config, METADATA, *_tables())
    model.compile(tf.keras.optimizers.Adam(1e-2))
    model(_batch())
    frozen = [v.numpy().copy() for v in model.content.variables + model.projection.variables]
    model.fit(reader.synthetic_dataset(METADATA, "ctr", 16, 2), epochs=1, verbose=0)
    for before, variable in zip(frozen, model.content.variables + model.projection.variables):
        np.testing.assert_array_equal(before, variable.numpy())
    assert model.trainable_variables  # the rest still trains


@pytest.mark.parametrize("missing", ["image", "query", "both"])
def test_models_train_with_the_channels_a_dataset_has(missing):
    channels = [c for c in schema.CHANNELS
                if not (c == schema.IMAGE_CHANNEL and missing in ("image", "both"))
                and not (c == schema.QUERY_CHANNEL and missing in ("query", "both"))]
    metadata = dataclasses.replace(
        METADATA, channels=channels, image_dim=0 if missing in ("image", "both") else METADATA.image_dim)
    psu = builders.build_psu(CONFIG, metadata, *_tables(metadata))
    assert psu.content.channels == channels
    psu.compile(tf.keras.optimizers.Adam(1e-2))
    psu.fit(reader.synthetic_dataset(metadata, "pretrain", 8, 1), epochs=1, verbose=0)
    model = builders.build_seminar(CONFIG, metadata, *_tables(metadata))
    assert np.isfinite(model(_batch(metadata=metadata))["logit"].numpy()).all()


def test_content_is_encoded_once_per_unique_item():
    content = builders.build_content_encoder(CONFIG, METADATA, *_tables())
    seen = []
    original = content.text_encoder.call
    content.text_encoder.call = lambda tokens, training=None: (seen.append(tokens.shape[0]), original(tokens))[1]
    items = tf.constant([[5, 5, 9, 0], [9, 5, 7, 0]], tf.int64)
    encoded = content.encode_items(items)
    assert seen == [4]  # 0, 5, 7, 9
    single = content.encode_items(tf.constant([5, 9, 7], tf.int64))[schema.TEXT_CHANNEL].numpy()
    np.testing.assert_allclose(encoded[schema.TEXT_CHANNEL][0, 0], single[0], rtol=1e-6)
    np.testing.assert_allclose(encoded[schema.TEXT_CHANNEL][1, 2], single[2], rtol=1e-6)
    np.testing.assert_array_equal(encoded[schema.TEXT_CHANNEL][:, 3], 0.0)  # padding has no content


def test_unknown_ids_out_of_range_are_rejected_with_the_feature_name():
    model = builders.build_seminar(CONFIG, METADATA, *_tables())
    batch = dict(_batch())
    batch[schema.SEQ_HISTORY_ITEM] = tf.where(
        tf.equal(batch[schema.SEQ_HISTORY_ITEM], 0), batch[schema.SEQ_HISTORY_ITEM],
        tf.constant(METADATA.num_items + 3, tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="item index"):
        model(batch)
    oov = dict(_batch())
    oov[schema.CTX_TARGET_ITEM] = tf.fill([16], tf.constant(schema.OOV_INDEX, tf.int64))
    assert np.isfinite(model(oov)["logit"].numpy()).all()


def test_nan_image_embeddings_are_rejected_naming_the_rows():
    item_table, query_table = _tables()
    item_table.image_embedding[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"image_embedding .*rows \[7\]"):
        builders.build_content_encoder(CONFIG, METADATA, item_table, query_table)


def test_content_encoder_config_round_trip():
    content = builders.build_content_encoder(CONFIG, METADATA, *_tables())
    clone = ContentEncoder.from_config(content.get_config())
    items = tf.constant([[3, 4, 0]], tf.int64)
    queries = tf.constant([[2, 5, 0]], tf.int64)
    content(queries, items)
    clone(queries, items)
    clone.set_weights(content.get_weights())
    np.testing.assert_allclose(content(queries, items), clone(queries, items), rtol=1e-6)


@pytest.mark.parametrize("change, error, pattern", [
    (lambda b: b.pop(schema.SEQ_HISTORY_ITEM), ValueError, "missing feature 'history_item'"),
    (lambda b: b.update({schema.CTX_TARGET_ITEM: tf.cast(b[schema.CTX_TARGET_ITEM], tf.float32)}), TypeError,
     "'target_item' must hold integer"),
    (lambda b: b.update({schema.SEQ_HISTORY_QUERY: b[schema.SEQ_HISTORY_QUERY][:, :, None]}), ValueError,
     "'history_query' must have rank 2"),
])
def test_wrong_inputs_are_rejected_naming_the_feature(change, error, pattern):
    model = builders.build_seminar(CONFIG, METADATA, *_tables())
    batch = dict(_batch())
    change(batch)
    with pytest.raises(error, match=pattern):
        model(batch)


def test_folded_gsu_scores_equal_the_papers_multi_head_attention_logits():
    """score_l = (1/H) Σ_h (q_t W_h^Q)(k_l W_h^K)^T / √d with k_l = Σ_j γ_j x_l^{GSU(j)}, computed directly."""
    model = builders.build_seminar(CONFIG, METADATA, *_tables())
    batch = _batch()
    model(batch)
    history, mask = model.encode_history(batch)
    queries = tf.stack([batch[schema.CTX_TARGET_QUERY], tf.fill([16], tf.constant(2, tf.int64))], axis=1)
    items = tf.stack([batch[schema.CTX_TARGET_ITEM], tf.fill([16], tf.constant(9, tf.int64))], axis=1)
    q_t, gamma = model.encode_targets(queries, items)
    folded = model.gsu_scores(q_t, gamma, history, mask).numpy()
    wq = model.gsu.query_kernel.numpy()  # [d, H, k]
    wk = model.gsu.key_kernel.numpy()
    h = np.asarray(history)
    for n in range(2):
        keys = np.einsum("bljd,bj->bld", h, gamma[:, n].numpy())
        q = np.einsum("bd,dhk->bhk", q_t[:, n].numpy(), wq)
        k = np.einsum("bld,dhk->blhk", keys, wk)
        reference = np.einsum("bhk,blhk->bhl", q, k).mean(axis=1) / np.sqrt(wq.shape[-1])
        valid = mask.numpy()
        np.testing.assert_allclose(folded[:, n][valid], reference[valid], rtol=1e-4, atol=1e-4)


def test_query_tokens_replace_the_query_table_lookup_exactly():
    item_table, query_table = _tables()
    model = builders.build_seminar(CONFIG, METADATA, item_table, query_table)
    batch = _batch()
    by_index = model(batch)["logit"].numpy()
    tokens = dict(batch)
    tokens[schema.HISTORY_QUERY_TOKENS] = tf.gather(query_table.tokens, batch[schema.SEQ_HISTORY_QUERY])
    tokens[schema.TARGET_QUERY_TOKENS] = tf.gather(query_table.tokens, batch[schema.CTX_TARGET_QUERY])
    np.testing.assert_allclose(model(tokens)["logit"].numpy(), by_index, rtol=1e-5, atol=1e-6)
    # Words of a query outside the vocabulary still count: OOV index with real tokens differs from the OOV row.
    unknown = dict(tokens)
    unknown[schema.CTX_TARGET_QUERY] = tf.fill([16], tf.constant(schema.OOV_INDEX, tf.int64))
    np.testing.assert_allclose(model(unknown)["logit"].numpy(), by_index, rtol=1e-5, atol=1e-6)


def test_serving_cache_gives_the_same_channels_without_running_the_encoders():
    content = builders.build_content_encoder(CONFIG, METADATA, *_tables())
    queries = tf.constant([[2, 3, 4, 3], [1, 3, 2, 0]], tf.int64)
    items = tf.constant([[5, 5, 9, 0], [9, 5, 7, 1]], tf.int64)
    want = content(queries, items).numpy()
    weights = len(content.weights)
    size = content.build_cache()
    assert content.has_cache and size == 4 * CONFIG.dim * (
        METADATA.num_items * len(content.item_channels) + METADATA.num_queries)
    calls = []
    for name in ("text_encoder", "query_encoder"):
        encoder = getattr(content, name)
        encoder.call = (lambda original: lambda tokens, training=None: (calls.append(tokens.shape[0]),
                                                                       original(tokens))[1])(encoder.call)
    np.testing.assert_allclose(content(queries, items, training=False).numpy(), want, rtol=1e-6, atol=1e-7)
    assert calls == []  # inference reads the cache
    content(queries, items, training=True)
    assert len(calls) == 2  # training always runs the encoders (the weights change)
    content.clear_cache()
    assert not content.has_cache and len(content.weights) == weights


def test_projected_serving_cache_gives_the_channels_after_g():
    model = builders.build_seminar(CONFIG, METADATA, *_tables())
    queries = tf.constant([[2, 3, 1, 3], [1, 3, 2, 0]], tf.int64)
    items = tf.constant([[5, 5, 9, 0], [9, 5, 7, 1]], tf.int64)
    tokens = tf.constant(np.random.default_rng(0).integers(2, METADATA.num_tokens, (2, 4, METADATA.max_query_tokens)))
    model.projection.kernel.assign(tf.random.normal(model.projection.kernel.shape))  # G_j away from the identity
    want = model.projection(model.pair_channels(queries, items, False, query_tokens=tokens)).numpy()
    size = model.build_serving_cache()
    assert size == 2 * 4 * CONFIG.dim * (METADATA.num_items * len(model.content.item_channels) + METADATA.num_queries)
    np.testing.assert_allclose(model.projected_channels(queries, items, False, query_tokens=tokens).numpy(), want,
                               rtol=1e-5, atol=1e-6)  # the OOV queries (index 1) from their tokens
    model.clear_serving_cache()
    assert getattr(model, "_projected_items", None) is None and not model.content.has_cache


def test_query_tokens_encode_only_the_out_of_vocabulary_queries():
    item_table, query_table = _tables()
    content = builders.build_content_encoder(CONFIG, METADATA, item_table, query_table)
    queries = tf.constant([[2, 3, 1, 3], [1, 4, 2, 0]], tf.int64)  # two OOV positions (index 1)
    tokens = tf.gather(query_table.tokens, queries).numpy()
    tokens[0, 2] = tokens[1, 0] = query_table.tokens[5]  # their raw text: the words of query 5
    items = tf.constant([[5, 5, 9, 0], [9, 5, 7, 1]], tf.int64)
    seen = []
    original = content.query_encoder.call
    content.query_encoder.call = lambda t, training=None: (seen.append(t.shape[0]), original(t))[1]
    got = content(queries, items, query_tokens=tf.constant(tokens)).numpy()
    assert 2 in seen and max(seen) <= 5  # the 2 OOV rows; the known ones once per distinct index (0, 2, 3, 4)
    want = content(tf.constant([[2, 3, 5, 3], [5, 4, 2, 0]], tf.int64), items).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 16])  # 1 row: per distinct item; 16 rows hold more distinct items than L
def test_indexed_inference_gsu_scores_equal_the_projected_history_scores(rows):
    """score_l = Σ_j γ_j u·x_l^{GSU(j)} over the projected history (training path) equals the inference path's
    per-channel split (item part once per distinct item, query part per position, unknown text by tokens)."""
    item_table, query_table = _tables()
    model = builders.build_seminar(CONFIG, METADATA, item_table, query_table)
    batch = {k: v[:rows] for k, v in _batch().items()}
    model(batch)
    queries = tf.stack([batch[schema.CTX_TARGET_QUERY], tf.fill([rows], tf.constant(2, tf.int64))], axis=1)
    items = tf.stack([batch[schema.CTX_TARGET_ITEM], tf.fill([rows], tf.constant(9, tf.int64))], axis=1)
    q_t, gamma = model.encode_targets(queries, items)
    history, mask = model.encode_history(batch)
    want = model.gsu_scores(q_t, gamma, history, mask).numpy()
    got = model._mask_scores(model.indexed_gsu_scores(q_t, gamma, batch), mask).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Unknown query text: OOV index plus its tokens scores as the known query with those words.
    oov = dict(batch)
    history_queries = batch[schema.SEQ_HISTORY_QUERY].numpy().copy()
    tokens = np.zeros(history_queries.shape + (METADATA.max_query_tokens,), np.int64)
    tokens[0, 0] = query_table.tokens[5]
    history_queries[0, 0] = schema.OOV_INDEX
    oov[schema.SEQ_HISTORY_QUERY] = tf.constant(history_queries)
    oov[schema.HISTORY_QUERY_TOKENS] = tf.constant(tokens)
    known = dict(batch)
    history_queries[0, 0] = 5
    known[schema.SEQ_HISTORY_QUERY] = tf.constant(history_queries)
    np.testing.assert_allclose(model.indexed_gsu_scores(q_t, gamma, oov).numpy(),
                               model.indexed_gsu_scores(q_t, gamma, known).numpy(), rtol=1e-5, atol=1e-5)
    # The inference call ranks with these scores.
    outputs = model.score_pairs(batch, queries, items, training=False)
    np.testing.assert_allclose(outputs["gsu_scores"].numpy(), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- ids, feedback
ID_METADATA = dataclasses.replace(METADATA, num_users=40, num_feedback=6)


@pytest.mark.parametrize("architecture", ["seminar", "din"])
def test_id_and_feedback_features_follow_the_data(architecture):
    """User ids reach the tower, feedback reaches the kept steps and the tower's history mean; padded steps'
    feedback never matters; a batch without user_index scores everyone as the OOV user; a missing
    history_feedback is named."""
    config = dataclasses.replace(CONFIG, architecture=architecture)
    model = builders.build_model(config, ID_METADATA, *_tables(ID_METADATA))
    assert model.user_id_embedding is not None and model.feedback_embedding is not None
    batch = dict(_batch(metadata=ID_METADATA))
    logit = model(batch)["logit"].numpy()
    # Feedback: every real step's token matters; a padded step's never does.
    mask = tf.sequence_mask(batch[schema.CTX_HISTORY_LENGTH], ID_METADATA.max_history)
    feedback = batch[schema.SEQ_HISTORY_FEEDBACK]
    padded_changed = model({**batch, schema.SEQ_HISTORY_FEEDBACK: tf.where(mask, feedback, 5)})["logit"].numpy()
    np.testing.assert_allclose(padded_changed, logit, rtol=1e-5, atol=1e-6)
    real_changed = model({**batch, schema.SEQ_HISTORY_FEEDBACK: tf.where(mask, 2 + (feedback - 1) % 4, 0)})
    rows = batch[schema.CTX_HISTORY_LENGTH].numpy() > 0
    assert np.all(np.abs(real_changed["logit"].numpy() - logit)[rows] > 1e-7)
    # The history mean equals a plain masked mean of the embedding rows.
    table = model.feedback_embedding.embeddings.numpy()
    want = np.stack([table[f[:n]].mean(0) if n else np.zeros(table.shape[1]) for f, n in
                     zip(feedback.numpy(), batch[schema.CTX_HISTORY_LENGTH].numpy())])
    np.testing.assert_allclose(model.history_feedback_mean(batch), want, rtol=1e-5, atol=1e-6)
    # User ids: another index changes the logit; no user_index at all = the OOV user.
    other = model({**batch, schema.CTX_USER_INDEX: (batch[schema.CTX_USER_INDEX] + 1) % 40})["logit"].numpy()
    assert np.all(np.abs(other - logit) > 1e-7)
    without = {k: v for k, v in batch.items() if k != schema.CTX_USER_INDEX}
    oov = {**batch, schema.CTX_USER_INDEX: tf.fill([BATCH], tf.constant(schema.OOV_INDEX, tf.int64))}
    np.testing.assert_allclose(model(without)["logit"], model(oov)["logit"], rtol=1e-6)
    with pytest.raises(ValueError, match=schema.SEQ_HISTORY_FEEDBACK):
        model({k: v for k, v in batch.items() if k != schema.SEQ_HISTORY_FEEDBACK})


def test_id_arguments_switch_off_what_the_data_does_not_carry():
    one_kind = dataclasses.replace(ID_METADATA, num_feedback=len(schema.RESERVED) + 1)  # e.g. only "click"
    assert builders.id_arguments(CONFIG, one_kind)["num_feedback"] == 0
    assert builders.id_arguments(CONFIG, ID_METADATA)["num_feedback"] == 6
    assert builders.id_arguments(CONFIG, METADATA)["num_users"] == 0  # a dataset built before user ids
    off = dataclasses.replace(CONFIG, use_user_id=False, use_item_id=False, use_feedback=False)
    assert builders.id_arguments(off, ID_METADATA) == dict(num_users=0, user_id_dim=CONFIG.user_id_dim,
                                                          use_item_id=False, num_feedback=0, embedding_l2=0.0,
                                                          recent_history=0, id_dropout=0.0, affinity_column=0,
                                                          category_affinity=False,
                                                          gsu_category_prior=False, item_statistics_folds=0,
                                                          item_statistics_columns=2)
    model = builders.build_seminar(off, ID_METADATA, *_tables(ID_METADATA))
    assert model.user_id_embedding is None and model.item_id_embedding is None and model.feedback_embedding is None


@pytest.mark.parametrize("architecture", ["seminar", "twin"])
def test_recent_branch_attends_over_the_newest_real_steps(architecture):
    config = dataclasses.replace(CONFIG, architecture=architecture, recent_history=4)
    model = builders.build_model(config, ID_METADATA, *_tables(ID_METADATA))
    batch = dict(_batch(metadata=ID_METADATA))
    logit = model(batch)["logit"].numpy()
    seen = []

    def pick(positions):
        seen.append(positions.numpy())
        return tf.zeros(tf.concat([tf.shape(positions), [len(model.channels), CONFIG.dim]], 0))

    q_t, gamma = model.encode_targets(batch[schema.CTX_TARGET_QUERY][:, None], batch[schema.CTX_TARGET_ITEM][:, None])
    from seminar_tf.models.psu import history_mask

    target_id = model.target_id_embedding(batch[schema.CTX_TARGET_ITEM][:, None])
    model.recent_readout(batch, target_id, q_t, gamma, history_mask(batch), pick)
    for row, length in enumerate(batch[schema.CTX_HISTORY_LENGTH].numpy()):
        newest = list(range(length - 1, max(length - 4, 0) - 1, -1))
        assert seen[0][row][:len(newest)].tolist() == newest
    # The newest real step changes the output through the recent branch (DIN is the branch itself).
    rows = batch[schema.CTX_HISTORY_LENGTH].numpy() > 0
    last = tf.equal(tf.range(ID_METADATA.max_history, dtype=tf.int64)[None, :],
                    batch[schema.CTX_HISTORY_LENGTH][:, None] - 1)
    changed = model({**batch, schema.SEQ_HISTORY_FEEDBACK: tf.where(last, 5, batch[schema.SEQ_HISTORY_FEEDBACK])})
    assert np.any(np.abs(changed["logit"].numpy() - logit)[rows] > 1e-7)
    assert builders.build_model(dataclasses.replace(config, architecture="din"), ID_METADATA).recent is None


def test_id_dropout_replaces_real_ids_by_oov_in_training_only():
    model = builders.build_seminar(dataclasses.replace(CONFIG, id_dropout=0.5), ID_METADATA, *_tables(ID_METADATA))
    model(_batch(metadata=ID_METADATA))
    table = model.item_id_embedding
    ids = tf.constant(np.arange(2, 42).reshape(4, 10) % ID_METADATA.num_items, tf.int64)
    rows = model.embed_ids(table, ids, training=True).numpy()
    oov = table(tf.constant(schema.OOV_INDEX)).numpy()
    dropped = np.all(np.isclose(rows, oov), axis=-1)
    assert 0.2 < dropped.mean() < 0.8  # about half, at p = 0.5
    np.testing.assert_allclose(model.embed_ids(table, ids, training=False), table(ids))  # inference: never
    pad = tf.zeros([3], tf.int64)
    np.testing.assert_allclose(model.embed_ids(table, pad, training=True), table(pad))  # padding stays padding


@pytest.mark.parametrize("architecture", ["seminar", "sim_hard"])
def test_category_affinity_counts_the_real_steps_of_the_targets_category(architecture):
    """Share and log-count of the real history steps in the target's category, and their mean feedback embedding,
    equal a plain numpy count; a padded step never counts; the tower reads them."""
    config = dataclasses.replace(CONFIG, architecture=architecture, category_affinity=True)
    model = builders.build_model(config, ID_METADATA, *_tables(ID_METADATA))
    assert model.affinity_column == 2  # sorted attributes: author_id (1), category_id (2)
    batch = dict(_batch(metadata=ID_METADATA))
    logit = model(batch)["logit"].numpy()
    categories = model.content.attributes.numpy()[:, 2]
    items = batch[schema.CTX_TARGET_ITEM].numpy()
    stats, feedback = model.affinity_features(batch, batch[schema.CTX_TARGET_ITEM][:, None])
    table = model.feedback_embedding.embeddings.numpy()
    for row, length in enumerate(batch[schema.CTX_HISTORY_LENGTH].numpy()):
        history = batch[schema.SEQ_HISTORY_ITEM].numpy()[row, :length]
        same = categories[history] == categories[items[row]]
        if categories[items[row]] < len(schema.RESERVED):
            same[:] = False
        want = [same.mean() if length else 0.0, np.log1p(same.sum()) / 5.0]
        np.testing.assert_allclose(stats[row, 0], want, rtol=1e-5, atol=1e-6)
        steps = batch[schema.SEQ_HISTORY_FEEDBACK].numpy()[row, :length][same]
        mean = table[steps].mean(0) if len(steps) else np.zeros(table.shape[1])
        np.testing.assert_allclose(feedback[row, 0], mean, rtol=1e-5, atol=1e-6)
    mask = tf.sequence_mask(batch[schema.CTX_HISTORY_LENGTH], ID_METADATA.max_history)
    padded = model({**batch, schema.SEQ_HISTORY_ITEM: tf.where(mask, batch[schema.SEQ_HISTORY_ITEM], 7)})
    np.testing.assert_allclose(padded["logit"], logit, rtol=1e-5, atol=1e-6)
    # The tower reads the statistics: counting another attribute column as the category changes the logit.
    model.affinity_column = 1
    assert np.any(np.abs(model(batch)["logit"].numpy() - logit) > 1e-7)
    with pytest.raises(ValueError, match="category_attribute 'genre'"):
        builders.build_model(dataclasses.replace(config, category_attribute="genre"), ID_METADATA)


def test_item_statistics_read_the_users_fold_in_training_and_the_full_row_otherwise():
    config = dataclasses.replace(CONFIG, item_statistics_folds=3)
    model = builders.build_seminar(config, ID_METADATA, *_tables(ID_METADATA))
    batch = dict(_batch(metadata=ID_METADATA))
    model(batch)
    table = np.random.default_rng(0).normal(size=[4, ID_METADATA.num_items, 2]).astype(np.float32)
    model.set_item_statistics(table)
    items = batch[schema.CTX_TARGET_ITEM][:, None]
    users = batch[schema.CTX_USER_INDEX].numpy()
    np.testing.assert_allclose(model.item_statistics_features(batch, items, training=True)[:, 0],
                               table[users % 3, items.numpy()[:, 0]])
    np.testing.assert_allclose(model.item_statistics_features(batch, items, training=False)[:, 0],
                               table[3, items.numpy()[:, 0]])
    logit = model(batch)["logit"].numpy()
    table[3] += 1.0
    model.set_item_statistics(table)
    assert np.all(np.abs(model(batch)["logit"].numpy() - logit) > 1e-7)  # the tower reads the serving row
    assert not model.item_statistics.trainable
    with pytest.raises(ValueError, match="item_statistics_folds"):
        builders.build_seminar(CONFIG, ID_METADATA, *_tables(ID_METADATA)).set_item_statistics(table)
    # one column (model.item_statistics_columns): a [F+1, items, 1] table, and the config round-trips it
    one = builders.build_seminar(dataclasses.replace(config, item_statistics_columns=("log_count",)), ID_METADATA,
                                 *_tables(ID_METADATA))
    one(batch)
    assert one.item_statistics.shape == (4, ID_METADATA.num_items, 1)
    one.set_item_statistics(table[..., 1:])
    assert one.item_statistics_features(batch, items).shape[-1] == 1
    assert one.get_config()["item_statistics_columns"] == 1


def test_gsu_category_prior_keeps_the_targets_category_first():
    """With the prior, the K kept steps are the target category's real steps (all of them when there are at most
    K), ordered among themselves by the learned GSU score; without it, the learned score alone decides."""
    config = dataclasses.replace(CONFIG, gsu_category_prior=True)
    model = builders.build_seminar(config, ID_METADATA, *_tables(ID_METADATA))
    assert model.gsu_category_prior and not model.category_affinity
    batch = dict(_batch(metadata=ID_METADATA))
    outputs = model(batch)
    plain = builders.build_seminar(CONFIG, ID_METADATA, *_tables(ID_METADATA))
    plain(batch)
    plain.set_weights(model.get_weights())
    learned = plain(batch)["gsu_scores"].numpy()  # [B, L]
    categories = model.content.attributes.numpy()[:, 2]
    items = batch[schema.CTX_TARGET_ITEM].numpy()
    kept = outputs["top_k"].numpy()  # [B, K]
    differs = False
    for row, length in enumerate(batch[schema.CTX_HISTORY_LENGTH].numpy()):
        history = batch[schema.SEQ_HISTORY_ITEM].numpy()[row, :length]
        same = np.flatnonzero(categories[history] == categories[items[row]])
        if categories[items[row]] < len(schema.RESERVED):
            same = np.array([], int)
        want = same[np.argsort(-learned[row, same], kind="stable")][:CONFIG.top_k]
        assert kept[row, :len(want)].tolist() == want.tolist()
        plain_kept = plain(batch)["top_k"].numpy()[row]
        differs |= set(plain_kept[:len(want)].tolist()) != set(want.tolist())
    assert differs  # the prior changed which steps some row keeps
    with pytest.raises(ValueError, match="category_attribute"):
        builders.build_seminar(dataclasses.replace(config, category_attribute="genre"), ID_METADATA)


@pytest.mark.parametrize("architecture", ["seminar", "din"])
def test_ranking_weight_adds_the_within_user_pairwise_loss(architecture):
    """model.ranking_weight adds weight · RankNet over the batch's same-user pairs to L_ctr (the batch's
    user_id groups them); 0 builds no ranking task, and serving inputs need no user_id."""
    config = dataclasses.replace(CONFIG, architecture=architecture, aux_weight=0.0)
    batch = dict(_batch())
    plain = builders.build_model(config, METADATA, *_tables())
    assert plain.ranking_task is None
    model = builders.build_model(dataclasses.replace(config, ranking_weight=0.5), METADATA, *_tables())
    logits = model(batch)["logit"].numpy()
    labels = batch[schema.CTX_LABEL].numpy()
    users = batch[schema.CTX_USER_ID].numpy()
    bce = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
    pairs = [(i, j) for i in range(len(labels)) for j in range(len(labels))
             if users[i] == users[j] and labels[i] > labels[j]]
    assert pairs
    rank = np.mean([np.log1p(np.exp(logits[j] - logits[i])) for i, j in pairs])
    np.testing.assert_allclose(float(model.compute_loss(batch)), bce + 0.5 * rank, rtol=1e-4)
    serving = {k: v for k, v in batch.items() if k != schema.CTX_USER_ID}
    np.testing.assert_allclose(model(serving)["logit"].numpy(), logits, rtol=1e-6)


@pytest.mark.parametrize("mode", ["zero", "text"])
def test_an_item_without_an_image_is_never_encoded_as_an_image_of_zeros(mode):
    item_table, query_table = _tables()
    item_table.image_embedding[[5, 9]] = 0.0  # what the pipeline writes for a missing image
    content = builders.build_content_encoder(dataclasses.replace(CONFIG, missing_image=mode), METADATA,
                                             item_table, query_table)
    content.encode_items(tf.constant([7], tf.int64))
    for weight in content.image_encoder.weights:  # a trained encoder: biases no longer zero
        weight.assign(tf.random.stateless_normal(weight.shape, seed=[1, 2]))
    items = tf.constant([[5, 7, 9, 0], [1, 9, 7, 5]], tf.int64)
    np.testing.assert_array_equal(content.image_present(items).numpy(),
                                  [[False, True, False, False], [False, False, True, False]])
    encoded = {c: v.numpy() for c, v in content.encode_items(items).items()}
    image = encoded[schema.IMAGE_CHANNEL]
    expected = content.image_encoder(tf.constant(item_table.image_embedding[[7]])).numpy()[0]
    np.testing.assert_allclose(image[0, 1], expected, rtol=1e-5, atol=1e-6)  # an item with an image: unchanged
    assert np.abs(content.image_encoder(tf.zeros([1, METADATA.image_dim])).numpy()).sum() > 0  # zeros encode to
    # the encoder's bias, which would make every image-less item look alike
    missing = image[[0, 0, 1, 1], [0, 2, 1, 3]]
    if mode == "zero":
        np.testing.assert_array_equal(missing, 0.0)
    else:
        np.testing.assert_allclose(missing, encoded[schema.TEXT_CHANNEL][[0, 0, 1, 1], [0, 2, 1, 3]], rtol=1e-6)
    np.testing.assert_array_equal(image[0, 3], 0.0)  # padding has no content either way
    assert ContentEncoder.from_config(content.get_config()).missing_image == mode


def test_missing_image_settings_are_checked():
    with pytest.raises(ValueError, match="missing_image must be one of"):
        builders.build_content_encoder(dataclasses.replace(CONFIG, missing_image="mean"), METADATA)
    with pytest.raises(ValueError, match="model.missing_image 'mean'"):
        dataclasses.replace(CONFIG, missing_image="mean").validate()
    with pytest.raises(ValueError, match="needs the text channel"):
        builders.build_content_encoder(dataclasses.replace(CONFIG, missing_image="text",
                                                           channels=("query", "image", "attributes")), METADATA)


def test_psu_aligns_image_pairs_only_at_steps_whose_item_has_an_image():
    features = _batch("pretrain")
    ids = features[schema.SEQ_HISTORY_ITEM].numpy()
    item_table, query_table = _tables()
    item_table.image_embedding[ids[0, 0]] = 0.0
    model = builders.build_psu(CONFIG, METADATA, item_table, query_table)
    seen = {}
    original = model.alignment_task.call

    def spy(channel_embeddings, mask, compute_metrics=True, ids=None, present=None):
        seen.update(present=present, ids=ids)
        return original(channel_embeddings, mask, compute_metrics, ids, present)

    model.alignment_task.call = spy
    model.compute_loss(features)
    np.testing.assert_array_equal(seen["present"][schema.IMAGE_CHANNEL].numpy(), (ids != ids[0, 0]) & (ids > 1))
