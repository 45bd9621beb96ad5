"""Baselines (DIN, SIM hard/soft, ETA, TWIN, QIN): training, checkpoints, and what each GSU retrieves."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf import schema
from seminar_tf.data import reader
from seminar_tf.models import baselines

import model_fixtures
from model_fixtures import BATCH, CONFIG, METADATA, tables

TABLES = tables()


def _batch(seed=0):
    return model_fixtures.batch(seed=seed)


def _build(name, config=CONFIG, **options):
    tf.keras.utils.set_random_seed(config.seed)
    model = baselines.build_baseline(name, config, METADATA, *TABLES, **options)
    model(_batch())  # variables exist before fit / restore, as in train.fit
    return model


def _valid_top_k(outputs, row):
    return outputs["top_k"].numpy()[row][outputs["top_k_valid"].numpy()[row]]


def _merged(model, batch):
    """NumPy q_t [B, d], γ [B, C], merged history k_l = Σ_j γ_j x_l^(j) [B, L, d], mask [B, L]."""
    q_t, gamma = model.encode_targets(batch[schema.CTX_TARGET_QUERY][:, None], batch[schema.CTX_TARGET_ITEM][:, None])
    history, mask = model.encode_history(batch)
    q_t, gamma, history = q_t.numpy()[:, 0], gamma.numpy()[:, 0], history.numpy()
    return q_t, gamma, np.einsum("bljd,bj->bld", history, gamma), mask.numpy()


def _np_top_k(scores, mask, k):
    """Best-first positions among the valid ones, ties to the lower position (top_k_positions' contract)."""
    valid = np.flatnonzero(mask)
    order = valid[np.argsort(-scores[valid], kind="stable")]
    return order[:k]


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", baselines.BASELINES)
def test_baseline_trains_scores_candidates_and_round_trips_a_checkpoint(name, tmp_path):
    model = _build(name)
    data = reader.synthetic_dataset(METADATA, "ctr", BATCH, 2, seed=3).cache()
    model.compile(tf.keras.optimizers.Adam(1e-2), run_eagerly=True)
    history = model.fit(data, epochs=3, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    assert 0.0 <= history["auc"][-1] <= 1.0 and "logloss" in history
    assert not any(key.startswith("gsu_aux") for key in history)  # no separate GSU to train
    assert getattr(model, "pq", None) is None  # SEMINAR's PQ codebooks don't apply to another GSU

    batch = _batch()
    outputs = model(batch)
    assert outputs["logit"].shape == [BATCH] and outputs["gsu_scores"].shape == [BATCH, METADATA.max_history]
    np.testing.assert_allclose(outputs["probability"], tf.sigmoid(outputs["logit"]), rtol=1e-6)
    # The target scored among candidates gives the row-format logit; the traced graph gives the eager one.
    items = tf.stack([batch[schema.CTX_TARGET_ITEM], tf.fill([BATCH], tf.constant(7, tf.int64))], axis=1)
    queries = tf.stack([batch[schema.CTX_TARGET_QUERY]] * 2, axis=1)
    candidates = tf.function(model.score_candidates)(batch, queries, items)
    np.testing.assert_allclose(candidates[:, 0], outputs["logit"], rtol=1e-4, atol=1e-5)
    # Padding appended to the history changes nothing.
    padded = {k: (tf.pad(v, [[0, 0], [0, 5]]) if k in schema.SEQUENCE_FEATURES else v) for k, v in batch.items()}
    np.testing.assert_allclose(model(padded)["logit"], outputs["logit"], rtol=1e-5, atol=1e-6)

    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    restored = _build(name, dataclasses.replace(CONFIG, seed=7))  # other initial weights (and ETA hyperplanes)
    assert not np.allclose(restored(batch)["logit"], outputs["logit"])
    tf.train.Checkpoint(model=restored).read(path).assert_existing_objects_matched()
    again = restored(batch)
    np.testing.assert_allclose(again["logit"], outputs["logit"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(again["top_k"], outputs["top_k"])


def test_din_attends_only_over_the_newest_steps():
    model = _build("din", short_history=4)
    batch = _batch()
    lengths = batch[schema.CTX_HISTORY_LENGTH].numpy()
    outputs = model(batch)
    for row in range(BATCH):
        newest = list(range(lengths[row] - 1, max(lengths[row] - 4, 0) - 1, -1))
        assert _valid_top_k(outputs, row).tolist() == newest
    items = batch[schema.SEQ_HISTORY_ITEM].numpy().copy()
    old = np.arange(METADATA.max_history)[None, :] < (lengths - 4)[:, None]
    changed_old = dict(batch, **{schema.SEQ_HISTORY_ITEM: tf.constant(np.where(old, 5, items))})
    np.testing.assert_allclose(model(changed_old)["logit"], outputs["logit"], rtol=1e-6, atol=1e-7)
    newest_step = np.arange(METADATA.max_history)[None, :] == (lengths - 1)[:, None]
    changed_new = dict(batch, **{schema.SEQ_HISTORY_ITEM: tf.constant(np.where(newest_step, 5, items))})
    differs = np.abs(model(changed_new)["logit"].numpy() - outputs["logit"].numpy()) > 1e-6
    assert differs[(lengths > 0) & (items[np.arange(BATCH), np.maximum(lengths - 1, 0)] != 5)].all()
    assert not differs[lengths == 0].any()


def test_sim_hard_keeps_the_newest_same_category_steps():
    model = _build("sim_hard")
    column = baselines.category_column(METADATA)
    assert column == 2 and model.category_column == 2  # attributes: [item id, author_id, category_id]
    category = TABLES[0].attributes[:, column]
    batch = _batch()
    outputs = model(batch)
    lengths = batch[schema.CTX_HISTORY_LENGTH].numpy()
    kept_any = 0
    for row in range(BATCH):
        history_items = batch[schema.SEQ_HISTORY_ITEM].numpy()[row, : lengths[row]]
        target_category = category[batch[schema.CTX_TARGET_ITEM].numpy()[row]]
        same = np.flatnonzero(category[history_items] == target_category)[::-1][: CONFIG.top_k]
        assert _valid_top_k(outputs, row).tolist() == same.tolist()
        kept_any += len(same) > 0
    assert kept_any >= BATCH // 2  # the check is not vacuous


def test_sim_soft_ranks_by_the_inner_product_of_merged_embeddings():
    model = _build("sim_soft")
    batch = _batch()
    outputs = model(batch)
    q_t, _, keys, mask = _merged(model, batch)
    for row in range(BATCH):
        scores = keys[row] @ q_t[row]
        assert _valid_top_k(outputs, row).tolist() == _np_top_k(scores, mask[row], CONFIG.top_k).tolist()


def test_eta_hamming_top_k_matches_numpy_simhash():
    model = _build("eta", simhash_bits=8)
    hyperplanes = model.hyperplanes.numpy()
    assert hyperplanes.shape == (CONFIG.dim, 8) and not model.hyperplanes.trainable
    batch = _batch()
    outputs = model(batch)
    q_t, _, keys, mask = _merged(model, batch)
    target_bits = q_t @ hyperplanes > 0  # [B, m]
    history_bits = keys @ hyperplanes > 0  # [B, L, m]
    hamming = (target_bits[:, None, :] != history_bits).sum(-1)
    scores = outputs["gsu_scores"].numpy()
    for row in range(BATCH):
        np.testing.assert_array_equal(scores[row][mask[row]], -hamming[row][mask[row]])
        expected = _np_top_k(-hamming[row].astype(float), mask[row], CONFIG.top_k)
        assert _valid_top_k(outputs, row).tolist() == expected.tolist()


def test_twin_gsu_scores_are_the_esu_attention_logits():
    model = _build("twin")
    assert model.gsu is model.esu
    batch = _batch()
    outputs = model(batch)
    q_t, _, keys, mask = _merged(model, batch)
    _, logits = model.esu(tf.constant(q_t), tf.constant(keys), mask=tf.constant(mask), return_scores=True)
    expected = tf.reduce_mean(logits, axis=1).numpy()  # heads averaged, [B, L]
    np.testing.assert_allclose(outputs["gsu_scores"].numpy()[mask], expected[mask], rtol=1e-4, atol=1e-5)
    for row in range(BATCH):
        assert _valid_top_k(outputs, row).tolist() == _np_top_k(expected[row], mask[row], CONFIG.top_k).tolist()


def test_qin_searches_by_the_target_query_first():
    model = _build("qin")
    batch = dict(_batch())
    queries = batch[schema.CTX_TARGET_QUERY].numpy().copy()
    queries[: BATCH // 2] = np.arange(BATCH // 2) % 20 + len(schema.QUERY_RESERVED)  # real queries
    queries[BATCH // 2:] = schema.EMPTY_QUERY_INDEX  # browsing rows
    batch[schema.CTX_TARGET_QUERY] = tf.constant(queries)
    outputs = model(batch)
    q_t, gamma, keys, mask = _merged(model, batch)
    history, _ = model.encode_history(batch)
    probe = model.target_query(batch[schema.CTX_TARGET_QUERY][:, None]).numpy()[:, 0]
    query_channel = model.channels.index(schema.QUERY_CHANNEL)
    item_weights = gamma * (np.arange(len(model.channels)) != query_channel)
    item_weights = item_weights / item_weights.sum(-1, keepdims=True)
    for row in range(BATCH):
        if row < BATCH // 2:
            assert np.abs(probe[row]).sum() > 0
            items = np.einsum("ljd,j->ld", history.numpy()[row], item_weights[row])
            scores = history.numpy()[row, :, query_channel] @ probe[row] + items @ probe[row]
        else:
            assert np.abs(probe[row]).sum() == 0  # no query: SIM soft search on the merged target
            scores = keys[row] @ q_t[row]
        assert _valid_top_k(outputs, row).tolist() == _np_top_k(scores, mask[row], CONFIG.top_k).tolist()
    # Query-first: another target item with the same query retrieves the same steps.
    other_item = dict(batch, **{schema.CTX_TARGET_ITEM: batch[schema.CTX_TARGET_ITEM] % 50 + 60})
    np.testing.assert_array_equal(model(other_item)["top_k"][: BATCH // 2], outputs["top_k"][: BATCH // 2])


def test_build_baseline_options_and_errors():
    assert set(baselines.MODELS) == set(baselines.BASELINES) | {"seminar"}
    assert type(baselines.build_baseline("seminar", CONFIG, METADATA)).__name__ == "SeminarModel"
    din = baselines.build_baseline("din", CONFIG, METADATA)
    assert din.top_k == CONFIG.top_k == din.short_history  # DIN's default budget is the others' K
    with pytest.raises(ValueError, match="unknown model"):
        baselines.build_baseline("dien", CONFIG, METADATA)
    no_category = dataclasses.replace(METADATA, item_attributes={"author_id": 12})
    with pytest.raises(ValueError, match="category_id"):
        baselines.build_baseline("sim_hard", CONFIG, no_category)
    assert baselines.build_baseline("sim_hard", CONFIG, METADATA, category_attribute="author_id").category_column == 1
    # Every retriever option is a ModelConfig field that reaches the model (an argument still wins).
    configured = dataclasses.replace(CONFIG, short_history=3, simhash_bits=12, category_attribute="author_id")
    assert baselines.build_baseline("din", configured, METADATA).short_history == 3
    assert baselines.build_baseline("din", configured, METADATA, short_history=5).short_history == 5
    assert baselines.build_baseline("eta", configured, METADATA).num_bits == 12
    assert baselines.build_baseline("sim_hard", configured, METADATA).category_column == 1
    with pytest.raises(ValueError, match="query"):
        baselines.build_baseline("qin", dataclasses.replace(CONFIG, channels=("text", "attributes")), METADATA)


def test_sim_hard_reads_its_category_from_the_config():
    config = dataclasses.replace(CONFIG, category_attribute="author_id")
    assert baselines.build_baseline("sim_hard", config, METADATA).category_column == 1
    with pytest.raises(ValueError, match="no_such"):
        baselines.build_baseline("sim_hard", dataclasses.replace(CONFIG, category_attribute="no_such"), METADATA)
