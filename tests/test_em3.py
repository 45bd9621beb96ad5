"""EM3 components: Fusion-Q-Former, LoRA adapters on the content encoders, content-ID loss inside a model."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf import schema
from seminar_tf.data import reader
from seminar_tf.layers.em3 import FusionQFormer, LoRADense, apply_lora, merge_lora
from seminar_tf.models import builders
from seminar_tf.models import em3 as em3_models
from seminar_tf.models.seminar import SeminarModel

import model_fixtures
from model_fixtures import BATCH, CONFIG, METADATA, tables

TABLES = tables()


def _batch(seed=0):
    return model_fixtures.batch(seed=seed)


def _content_outputs(content, batch):
    return content(batch[schema.SEQ_HISTORY_QUERY], batch[schema.SEQ_HISTORY_ITEM]).numpy()


def np_content_id_loss(content, ids_emb, item_ids, temperature):
    """In-batch InfoNCE both ways on L2-normalised rows; other rows of the same item are not negatives."""
    c = content / np.linalg.norm(content, axis=-1, keepdims=True)
    e = ids_emb / np.linalg.norm(ids_emb, axis=-1, keepdims=True)
    logits = (c @ e.T).astype(np.float64) / temperature
    losses = []
    for i in range(len(item_ids)):
        keep = [j for j in range(len(item_ids)) if j == i or item_ids[j] != item_ids[i]]
        row = logits[i, keep]
        column = logits[keep, i]
        position = keep.index(i)
        row_loss = -(row[position] - np.log(np.exp(row - row.max()).sum()) - row.max())
        column_loss = -(column[position] - np.log(np.exp(column - column.max()).sum()) - column.max())
        losses.append(0.5 * (row_loss + column_loss))
    return float(np.mean(losses))


def np_bce(labels, logits):
    probability = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return float(np.mean(-(labels * np.log(probability) + (1 - labels) * np.log(1 - probability))))


# ---------------------------------------------------------------------------------------------------------
# Fusion-Q-Former
def test_fusion_qformer_shapes_mask_and_gradients_to_the_query_tokens():
    tf.keras.utils.set_random_seed(0)
    fusion = FusionQFormer(num_queries=3, num_layers=2, num_heads=2, dim=16)
    modalities = tf.random.normal([4, 5, 2, 8])  # [B, L, M, d_in]: two modality tokens per history item
    with tf.GradientTape() as tape:
        tokens, pooled = fusion(modalities)
        loss = tf.reduce_sum(pooled ** 2) + tf.reduce_sum(tokens[..., 0, :])
    assert tokens.shape == [4, 5, 3, 16] and pooled.shape == [4, 5, 16]
    np.testing.assert_allclose(pooled, tf.reduce_mean(tokens, axis=-2), rtol=1e-5, atol=1e-6)
    gradient = tape.gradient(loss, fusion.query_tokens)
    assert gradient is not None and np.abs(gradient.numpy()).sum(axis=-1).min() > 0  # every query token
    # The fixed-length output does not depend on how many modality tokens an item has.
    assert fusion(tf.random.normal([4, 7, 8]))[0].shape == [4, 3, 16]
    # A masked modality's value never matters.
    mask = tf.constant([True, False])
    noisy = tf.concat([modalities[..., :1, :], 100.0 + modalities[..., 1:, :]], axis=-2)
    np.testing.assert_allclose(fusion(modalities, mask=tf.broadcast_to(mask, [4, 5, 2]))[0],
                               fusion(noisy, mask=tf.broadcast_to(mask, [4, 5, 2]))[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(fusion(modalities)[0], fusion(noisy)[0])


@pytest.mark.slow
def test_fusion_qformer_and_lora_config_round_trip_and_savedmodel_reload(tmp_path):
    fusion = FusionQFormer(num_queries=2, num_layers=1, num_heads=2, dim=16, mlp_dim=24, dropout=0.1, name="fusion")
    clone = FusionQFormer.from_config(fusion.get_config())
    assert clone.get_config() == fusion.get_config()
    dense = tf.keras.layers.Dense(4, activation="relu", name="head")
    dense.build([None, 16])
    lora = LoRADense(dense, rank=2, alpha=8.0)
    lora_clone = LoRADense.from_config(lora.get_config())
    assert (lora_clone.rank, lora_clone.alpha, lora_clone.scale) == (2, 8.0, 4.0)
    assert lora_clone.base.get_config()["activation"] == "relu" and lora_clone.base.units == 4

    inputs = tf.keras.Input([3, 8])
    tokens, pooled = fusion(inputs)
    model = tf.keras.Model(inputs, [tokens, lora(pooled)])
    lora.lora_b.assign(tf.random.normal(lora.lora_b.shape))  # a non-trivial adapter must survive too
    x = np.random.default_rng(0).normal(size=[5, 3, 8]).astype(np.float32)
    want = model(x)
    model.save(str(tmp_path / "savedmodel"))
    loaded = tf.keras.models.load_model(str(tmp_path / "savedmodel"))
    assert {type(layer).__name__ for layer in loaded.layers} >= {"FusionQFormer", "LoRADense"}
    for expected, got in zip(want, loaded(x)):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# LoRA
def test_lora_dense_starts_as_the_frozen_base_and_follows_the_low_rank_formula():
    tf.keras.utils.set_random_seed(1)
    dense = tf.keras.layers.Dense(6, activation="tanh")
    x = tf.random.normal([3, 4, 5])
    dense.build(x.shape)
    dense.bias.assign(tf.random.normal([6]))
    base_out = dense(x).numpy()
    lora = LoRADense(dense, rank=2, alpha=6.0)
    np.testing.assert_array_equal(lora(x), base_out)  # B = 0: exactly the base layer
    assert [w.name.split("/")[-1] for w in lora.trainable_weights] == ["lora_a:0", "lora_b:0"]
    assert not dense.trainable and len(lora.non_trainable_weights) == 2
    b = np.random.default_rng(0).normal(size=[2, 6]).astype(np.float32)
    lora.lora_b.assign(b)
    w, bias, a = dense.kernel.numpy(), dense.bias.numpy(), lora.lora_a.numpy()
    expected = np.tanh(x.numpy() @ w + bias + 3.0 * (x.numpy() @ a) @ b)  # scale α/r = 3
    np.testing.assert_allclose(lora(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.merged_kernel(), w + 3.0 * a @ b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        LoRADense(dense, rank=0)


def test_apply_lora_on_content_encoders_is_the_identity_and_only_adapters_train(tmp_path):
    tf.keras.utils.set_random_seed(2)
    model = builders.build_seminar(CONFIG, METADATA, *TABLES)
    batch = _batch()
    model(batch)
    before = _content_outputs(model.content, batch)
    logits_before = model(batch)["logit"].numpy()
    adapters = apply_lora(model.content, rank=2)
    # Every Dense of the four encoders (query/text projection, image MLP ×2, attribute projection).
    assert len(adapters) == 5 and all(isinstance(a, LoRADense) for a in adapters)
    assert isinstance(model.content.text_encoder.projection, LoRADense)
    np.testing.assert_allclose(_content_outputs(model.content, batch), before, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model(batch)["logit"], logits_before, rtol=0, atol=1e-6)
    adapter_names = {v.name for a in adapters for v in (a.lora_a, a.lora_b)}
    assert {v.name for v in model.content.trainable_variables} == adapter_names
    assert len(adapter_names) == 10

    frozen = {v.name: v.numpy().copy() for v in model.content.variables if v.name not in adapter_names}
    tower = [v.numpy().copy() for v in model.tower.variables]
    b_before = [a.lora_b.numpy().copy() for a in adapters]
    model.compile(tf.keras.optimizers.Adam(1e-2), run_eagerly=True)
    model.fit(reader.synthetic_dataset(METADATA, "ctr", BATCH, 2, seed=4), epochs=1, verbose=0)
    for variable in model.content.variables:
        if variable.name in frozen:
            np.testing.assert_array_equal(variable.numpy(), frozen[variable.name], err_msg=variable.name)
    assert all(not np.array_equal(a.lora_b.numpy(), b) for a, b in zip(adapters, b_before))
    assert all(not np.array_equal(v.numpy(), t) for v, t in zip(model.tower.variables, tower))
    trained = _content_outputs(model.content, batch)
    assert not np.allclose(trained, before)

    # Checkpoint round trip: rebuild → apply_lora → restore.
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    rebuilt = builders.build_seminar(CONFIG, METADATA, *TABLES)
    rebuilt(batch)
    apply_lora(rebuilt.content, rank=2)
    tf.train.Checkpoint(model=rebuilt).read(path).assert_existing_objects_matched()
    np.testing.assert_allclose(rebuilt(batch)["logit"], model(batch)["logit"], rtol=1e-6, atol=1e-6)
    # merge_lora folds the adapters into plain Dense layers with the same outputs.
    assert merge_lora(model.content) == 5
    assert not any(isinstance(m, LoRADense) for m in model.content.submodules)
    np.testing.assert_allclose(_content_outputs(model.content, batch), trained, rtol=1e-5, atol=1e-5)


def test_apply_lora_targets_and_errors():
    content = builders.build_content_encoder(CONFIG, METADATA, *TABLES)
    with pytest.raises(ValueError, match="not built"):
        apply_lora(content, rank=2)
    batch = _batch()
    _content_outputs(content, batch)
    adapters = apply_lora(content, rank=3, alpha=1.5, targets=["text_encoder/projection"])
    assert len(adapters) == 1 and adapters[0].scale == 0.5
    assert isinstance(content.text_encoder.projection, LoRADense)
    assert not isinstance(content.query_encoder.projection, LoRADense)
    # Only the targets are frozen; everything else keeps training.
    assert not content.text_encoder.projection.base.trainable
    assert content.text_encoder.token_embedding.trainable and content.attribute_encoder.projection.trainable
    whole = apply_lora(content, rank=2, targets=["attribute_encoder"])
    assert len(whole) == 1 and not any(e.trainable for e in content.attribute_encoder.embeddings)
    with pytest.raises(ValueError, match="no attribute"):
        apply_lora(content, rank=2, targets=["video_encoder"])
    assert apply_lora(content, rank=2, targets=["text_encoder/projection"]) == []  # already adapted


# ---------------------------------------------------------------------------------------------------------
# SEMINAR + EM3 options
@pytest.mark.parametrize("fusion_queries", [0, 2])
def test_content_id_loss_in_the_model_matches_numpy(fusion_queries):
    tf.keras.utils.set_random_seed(3)
    model = em3_models.build_em3_seminar(CONFIG, METADATA, *TABLES, fusion_queries=fusion_queries,
                                        content_id_weight=0.5, content_id_temperature=0.2)
    batch = dict(_batch())
    items = batch[schema.CTX_TARGET_ITEM].numpy()
    items[:4] = items[4:8]  # duplicate items in the batch are not each other's negatives
    batch[schema.CTX_TARGET_ITEM] = tf.constant(items)
    logits = model(batch)["logit"].numpy()
    content, ids = (t.numpy() for t in model.content_id_embeddings(batch[schema.CTX_TARGET_ITEM]))
    assert content.shape == ids.shape == (BATCH, CONFIG.dim)
    contrastive = np_content_id_loss(content, ids, items, temperature=0.2)
    loss = float(model.compute_loss(batch, training=False))  # no auxiliary GSU logit outside training
    expected = np_bce(batch[schema.CTX_LABEL].numpy(), logits) + 0.5 * contrastive
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    no_duplicate_masking = np_content_id_loss(content, ids, np.arange(BATCH), temperature=0.2)
    assert abs(no_duplicate_masking - contrastive) > 1e-3
    if fusion_queries:
        _, pooled = model.fusion(tf.stack([model.content.encode_items(items)[m] for m in ("text", "image")], -2))
        np.testing.assert_allclose(content, pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_em3_fusion_model_trains_and_round_trips_a_checkpoint(tmp_path):
    config = dataclasses.replace(CONFIG, seed=5)
    tf.keras.utils.set_random_seed(5)
    model = em3_models.build_em3_seminar(config, METADATA, *TABLES, fusion_queries=3, content_id_weight=0.5)
    assert model.channels == ["query", "fused_0", "fused_1", "fused_2", "attributes"]
    batch = _batch()
    outputs = model(batch)
    assert outputs["gsu_scores"].shape == [BATCH, METADATA.max_history]
    assert model.projection.kernel.shape == [5, CONFIG.dim, CONFIG.dim]
    # The fused channels are what the model scores with: other query tokens, other logits and GSU scores.
    query_tokens = model.fusion.query_tokens.numpy()
    model.fusion.query_tokens.assign(query_tokens + tf.random.normal(query_tokens.shape))
    changed = model(batch)
    assert np.abs(changed["logit"] - outputs["logit"]).min() > 0
    assert not np.allclose(changed["gsu_scores"], outputs["gsu_scores"])
    model.fusion.query_tokens.assign(query_tokens)
    model.compile(tf.keras.optimizers.Adam(1e-2), run_eagerly=True)
    history = model.fit(reader.synthetic_dataset(METADATA, "ctr", BATCH, 2, seed=3).cache(), epochs=3,
                        verbose=0).history
    assert history["loss"][-1] < history["loss"][0] and history["content_id_loss"][-1] < history["content_id_loss"][0]
    assert "auc" in history and np.isfinite(history["loss"]).all()
    # Padding never changes the fused channels' scores.
    padded = {k: (tf.pad(v, [[0, 0], [0, 5]]) if k in schema.SEQUENCE_FEATURES else v) for k, v in batch.items()}
    np.testing.assert_allclose(model(padded)["logit"], model(batch)["logit"], rtol=1e-5, atol=1e-6)

    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    tf.keras.utils.set_random_seed(9)
    rebuilt = em3_models.build_em3_seminar(config, METADATA, *TABLES, fusion_queries=3, content_id_weight=0.5)
    rebuilt(batch)
    tf.train.Checkpoint(model=rebuilt).read(path).assert_existing_objects_matched()
    np.testing.assert_allclose(rebuilt(batch)["logit"], model(batch)["logit"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="text or image"):
        em3_models.build_em3_seminar(dataclasses.replace(CONFIG, channels=("query", "attributes")), METADATA,
                                    fusion_queries=2)


def test_build_model_dispatches_the_em3_options_from_the_config():
    plain = builders.build_model(CONFIG, METADATA, *TABLES)
    assert type(plain) is SeminarModel
    fused = builders.build_model(dataclasses.replace(CONFIG, fusion_queries=3, fusion_layers=2), METADATA, *TABLES)
    assert isinstance(fused, em3_models.EM3SeminarModel) and fused.content_id_task is None
    assert (fused.fusion.num_queries, fused.fusion.num_layers, fused.fusion.dim) == (3, 2, CONFIG.dim)
    contrastive = builders.build_model(
        dataclasses.replace(CONFIG, content_id_weight=0.25, content_id_temperature=0.3, gsu="pq_adc", pq_subspaces=4,
                            pq_centroids=16, pq_rerank=2), METADATA, *TABLES)
    assert isinstance(contrastive, em3_models.EM3SeminarModel) and contrastive.fusion is None
    assert contrastive.content_id_weight == 0.25 and contrastive.content_id_task.temperature == pytest.approx(0.3)
    # Without fusion the content-ID model keeps SEMINAR's PQ GSU, sized by the config.
    assert contrastive.gsu_mode == "pq_adc" and contrastive.pq_rerank == 2
    assert (contrastive.pq.num_subspaces, contrastive.pq.num_centroids) == (4, 16)
    # LoRA alone is placed by experiment.finetune after the PSU restore: the model is plain SEMINAR.
    lora_only = builders.build_model(dataclasses.replace(CONFIG, lora_rank=2), METADATA, *TABLES)
    assert type(lora_only) is SeminarModel


@pytest.mark.parametrize("changes, message", [
    (dict(architecture="din", fusion_queries=2), r"'din' is a baseline; the EM3 options \['fusion_queries'\]"),
    (dict(architecture="twin", lora_rank=2, content_id_weight=0.1), r"\['content_id_weight', 'lora_rank'\]"),
    (dict(fusion_layers=0, fusion_queries=1), "fusion_layers must be >= 1"),
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(content_id_weight=0.1, content_id_temperature=-1.0), "content_id_temperature must be > 0"),
    (dict(lora_targets=("text_encoder",)), "needs model.lora_rank > 0"),
    (dict(lora_rank=2, lora_targets=("text_encoder", "gsu")), r"lora_targets \['gsu'\]"),
    (dict(fusion_queries=2, gsu="pq_adc"), "fusion_queries needs model.gsu 'exact'"),
])
def test_build_model_rejects_bad_em3_options(changes, message):
    with pytest.raises(ValueError, match=message):
        builders.build_model(dataclasses.replace(CONFIG, **changes), METADATA, *TABLES)
