"""Tests of seminar_tf.layers: numerics against NumPy references, masking, serialization round trips."""

import os

import numpy as np
import pytest

import seminar_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
import tensorflow as tf

from seminar_tf import schema
from seminar_tf.layers import (
    AttributeEncoder,
    ChannelGate,
    ImageEncoder,
    MultiHeadTargetAttention,
    TextEncoder,
    TransformerBlock,
    gather_positions,
    merge_channels,
    top_k_positions,
)

SAVE_FORMATS = ("keras", "tf")  # .keras (Keras v3 format) and SavedModel directory


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(7)


def _randomize(layer, rng):
    """Random weights, so that a round trip that silently re-initialises a weight cannot pass."""
    layer.set_weights([rng.normal(scale=0.5, size=w.shape).astype(w.dtype) for w in layer.get_weights()])


def _as_list(outputs):
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _assert_config_round_trip(layer, call):
    """from_config(get_config()) rebuilds the same layer: same config and, after copying weights, same outputs."""
    expected = _as_list(call(layer))
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    call(clone)  # builds the clone's weights
    assert [w.shape for w in clone.get_weights()] == [w.shape for w in layer.get_weights()]
    clone.set_weights(layer.get_weights())
    for got, want in zip(_as_list(call(clone)), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _assert_save_load(model, inputs, tmp_path, save_format):
    expected = _as_list(model(inputs))
    path = os.path.join(str(tmp_path), "model.keras" if save_format == "keras" else "saved_model")
    model.save(path)
    restored = tf.keras.models.load_model(path)
    got = _as_list(restored(inputs))
    assert len(got) == len(expected)
    for g, want in zip(got, expected):
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# MultiHeadTargetAttention


def _reference_attention(query, keys, values, mask, layer):
    """NumPy float64 version of the paper's formula, one head at a time, then Concat(heads) W^O."""
    kernels = (layer.query_kernel, layer.key_kernel, layer.value_kernel, layer.output_kernel)
    wq, wk, wv, wo = [np.asarray(w, np.float64) for w in kernels]
    num_heads, key_dim = wq.shape[1], wq.shape[2]
    query, keys, values = [np.asarray(x, np.float64) for x in (query, keys, values)]
    batch, num_candidates, _ = query.shape
    outputs = np.zeros([batch, num_candidates, wo.shape[-1]])
    logits = np.zeros([batch, num_candidates, num_heads, keys.shape[1]])
    for b in range(batch):
        valid = mask[b]
        for n in range(num_candidates):
            heads = []
            for h in range(num_heads):
                alpha = (query[b, n] @ wq[:, h]) @ (keys[b] @ wk[:, h]).T / np.sqrt(key_dim)  # [L]
                logits[b, n, h] = alpha
                weights = np.zeros_like(alpha)
                if valid.any():
                    e = np.exp(alpha[valid] - alpha[valid].max())
                    weights[valid] = e / e.sum()
                heads.append(weights @ (values[b] @ wv[:, h]))
            concat = np.concatenate(heads)  # [H * value_dim]
            outputs[b, n] = concat @ wo.reshape(-1, wo.shape[-1]) if valid.any() else 0.0
    return outputs, logits


def _attention_inputs(rng, batch=3, num_candidates=None, length=6, dim=8, value_dim=None):
    query_shape = [batch, dim] if num_candidates is None else [batch, num_candidates, dim]
    query = rng.normal(size=query_shape).astype(np.float32)
    keys = rng.normal(size=[batch, length, dim]).astype(np.float32)
    values = rng.normal(size=[batch, length, value_dim or dim]).astype(np.float32)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[-1] = 0 if batch > 2 else lengths[-1]  # one empty history
    mask = np.arange(length)[None, :] < lengths[:, None]
    mask[0, 0] = False  # a hole in the middle of a history, not only trailing padding
    return query, keys, values, mask


@pytest.mark.parametrize("num_candidates", [None, 4])
def test_attention_matches_numpy_reference(num_candidates):
    rng = np.random.default_rng(0)
    query, keys, values, mask = _attention_inputs(rng, num_candidates=num_candidates, value_dim=5)
    layer = MultiHeadTargetAttention(num_heads=3, key_dim=4, output_dim=7, value_dim=2, value_input_dim=5)
    output, logits = layer(query, keys=keys, values=values, mask=mask, return_scores=True)

    ref_query = query if num_candidates else query[:, None]
    ref_output, ref_logits = _reference_attention(ref_query, keys, values, mask, layer)
    if num_candidates is None:
        ref_output, ref_logits = ref_output[:, 0], ref_logits[:, 0]
    expected_shape = [3, 7] if num_candidates is None else [3, num_candidates, 7]
    assert output.shape.as_list() == expected_shape
    np.testing.assert_allclose(output.numpy(), ref_output, rtol=1e-4, atol=1e-5)

    head_axis_mask = mask[:, None, :] if num_candidates is None else mask[:, None, None, :]
    masked_value = np.float32(tf.float32.min / 2)
    np.testing.assert_allclose(
        np.where(head_axis_mask, logits.numpy(), 0), np.where(head_axis_mask, ref_logits, 0), rtol=1e-4, atol=1e-5
    )
    assert np.all(logits.numpy()[np.broadcast_to(~head_axis_mask, logits.shape)] == masked_value)

    # scores(): head-averaged logits, masked the same way; folded_query(): scores == K u.
    scores = layer.scores(query, keys, mask).numpy()
    ref_scores = ref_logits.mean(axis=-2)
    score_mask = np.broadcast_to(mask if num_candidates is None else mask[:, None, :], scores.shape)
    np.testing.assert_allclose(scores[score_mask], ref_scores[score_mask], rtol=1e-4, atol=1e-5)
    assert np.all(scores[~score_mask] == masked_value)
    folded = layer.folded_query(query).numpy()  # [B, d] or [B, N, d]
    via_fold = np.einsum("bld,b...d->b...l", keys, folded)
    np.testing.assert_allclose(via_fold, ref_scores, rtol=1e-4, atol=1e-4)


def test_attention_defaults_values_to_keys_and_mask_to_all_valid():
    rng = np.random.default_rng(1)
    query, keys, _, _ = _attention_inputs(rng)
    layer = MultiHeadTargetAttention(num_heads=2, key_dim=3, output_dim=4)
    output = layer(query, keys=keys).numpy()
    ref_output, _ = _reference_attention(query[:, None], keys, keys, np.ones(keys.shape[:2], bool), layer)
    np.testing.assert_allclose(output, ref_output[:, 0], rtol=1e-4, atol=1e-5)


def test_attention_fully_masked_row_gives_zeros_and_finite_gradients():
    rng = np.random.default_rng(2)
    query = tf.constant(rng.normal(size=[2, 3, 8]), tf.float32)
    keys = tf.constant(rng.normal(size=[2, 5, 8]), tf.float32)
    mask = tf.constant([[True, True, False, False, False], [False] * 5])
    layer = MultiHeadTargetAttention(num_heads=2, key_dim=4, output_dim=6)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([query, keys])
        output = layer(query, keys=keys, mask=mask)
        loss = tf.reduce_sum(output**2) + tf.reduce_sum(output)
    assert np.all(output.numpy()[1] == 0.0)
    assert np.abs(output.numpy()[0]).sum() > 0
    gradients = tape.gradient(loss, [query, keys] + layer.trainable_variables)
    for gradient in gradients:
        assert np.all(np.isfinite(gradient.numpy()))
    assert np.all(gradients[0].numpy()[1] == 0.0)  # the empty row's target gets no gradient
    assert np.abs(gradients[2].numpy()).sum() > 0  # the valid row still trains the query projection


def test_attention_padding_never_changes_outputs():
    rng = np.random.default_rng(3)
    query, keys, values, mask = _attention_inputs(rng, num_candidates=2)
    layer = MultiHeadTargetAttention(num_heads=2, key_dim=4, output_dim=5)
    output, logits = layer(query, keys=keys, values=values, mask=mask, return_scores=True)
    extra = 4
    # Padded positions hold large garbage: with weight exactly 0 they still cannot move an output.
    padded_keys = np.concatenate([keys, 50 * rng.normal(size=[3, extra, 8]).astype(np.float32)], axis=1)
    padded_values = np.concatenate([values, 1e6 * np.ones([3, extra, 8], np.float32)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros([3, extra], bool)], axis=1)
    padded_output, padded_logits = layer(
        query, keys=padded_keys, values=padded_values, mask=padded_mask, return_scores=True
    )
    np.testing.assert_allclose(padded_output.numpy(), output.numpy(), rtol=1e-6, atol=1e-6)
    # Same logits up to float rounding (the [N·H, d] x [d, L] product's blocking depends on L).
    np.testing.assert_allclose(padded_logits.numpy()[..., : keys.shape[1]], logits.numpy(), rtol=1e-6, atol=1e-7)
    padded_scores = layer.scores(query, padded_keys, padded_mask).numpy()
    np.testing.assert_allclose(padded_scores[..., : keys.shape[1]], layer.scores(query, keys, mask).numpy(), rtol=1e-6)


def test_attention_config_round_trip():
    rng = np.random.default_rng(4)
    query, keys, values, mask = _attention_inputs(rng, num_candidates=2, value_dim=6)
    layer = MultiHeadTargetAttention(num_heads=2, key_dim=4, output_dim=5, dropout=0.1, value_input_dim=6, name="esu")
    _assert_config_round_trip(
        layer, lambda lyr: lyr(query, keys=keys, values=values, mask=mask, return_scores=True)
    )


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_attention_save_load(tmp_path, save_format):
    rng = np.random.default_rng(5)
    query, keys, _, mask = _attention_inputs(rng)
    query_in = tf.keras.Input([8], name="target")
    keys_in = tf.keras.Input([6, 8], name="history")
    mask_in = tf.keras.Input([6], dtype=tf.bool, name="history_mask")
    layer = MultiHeadTargetAttention(num_heads=2, key_dim=4, output_dim=5)
    output, logits = layer(query_in, keys=keys_in, mask=mask_in, return_scores=True)
    model = tf.keras.Model([query_in, keys_in, mask_in], [output, logits])
    _assert_save_load(model, [query, keys, mask], tmp_path, save_format)


# ------------------------------------------------------------------------------------------------------
# top_k_positions / gather_positions


def _reference_top_k(scores, mask, k):
    indices = np.zeros([scores.shape[0], k], np.int64)
    valid = np.zeros([scores.shape[0], k], bool)
    for b in range(scores.shape[0]):
        positions = np.flatnonzero(mask[b])
        order = positions[np.argsort(-scores[b, positions], kind="stable")][:k]
        indices[b, : len(order)] = order
        valid[b, : len(order)] = True
    return indices, valid


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_top_k_positions_matches_numpy_argsort(k):
    rng = np.random.default_rng(6)
    scores = rng.normal(size=[4, 6]).astype(np.float32)
    scores[2, 1] = scores[2, 4]  # a tie: the lower position comes first
    mask = np.array(
        [[True] * 6, [True, False, True, False, False, True], [False] * 6, [False, True, True, True, True, True]]
    )
    indices, valid = top_k_positions(scores, mask, k)
    ref_indices, ref_valid = _reference_top_k(scores, mask, k)
    assert indices.shape.as_list() == [4, k]
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    assert valid.numpy()[1].sum() == min(k, 3) and not valid.numpy()[2].any()

    history = rng.normal(size=[4, 6, 2, 3]).astype(np.float32)
    gathered = gather_positions(history, indices).numpy()
    assert gathered.shape == (4, k, 2, 3)
    np.testing.assert_array_equal(gathered, history[np.arange(4)[:, None], ref_indices])


@pytest.mark.parametrize("k", [1, 5, 16])
def test_top_k_positions_on_long_rows_takes_the_filtered_path_with_the_same_result(k):
    """Rows of ≥ 16k positions go through the group-maximum bound filter: same indices as a full sort, ties included."""
    rng = np.random.default_rng(8)
    length = 40 * k + 7  # not a multiple of the chunk size
    scores = np.round(rng.normal(size=[5, length]) * 2).astype(np.float32)  # many ties
    mask = rng.random([5, length]) < 0.7
    mask[1] = False
    mask[2] = False
    mask[2, [3, length - 1]] = True  # fewer valid positions than k (for k > 2)
    mask[3] = True
    scores[3] = 1.0  # all equal: the lowest positions win
    indices, valid = top_k_positions(scores, mask, k)
    ref_indices, ref_valid = _reference_top_k(scores, mask, k)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    np.testing.assert_array_equal(indices.numpy()[3], np.arange(k))
    from seminar_tf.layers import attention

    assert length >= attention._FILTERED_TOP_K_FACTOR * k


def test_top_k_positions_without_mask_and_on_attention_scores():
    rng = np.random.default_rng(7)
    query, keys, _, mask = _attention_inputs(rng)
    layer = MultiHeadTargetAttention(num_heads=2, key_dim=4, output_dim=5)
    scores = layer.scores(query, keys, mask).numpy()
    indices, valid = top_k_positions(scores, mask, 4)
    ref_indices, ref_valid = _reference_top_k(scores, mask, 4)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    all_indices, all_valid = top_k_positions(scores, None, 2)
    np.testing.assert_array_equal(all_indices.numpy(), np.argsort(-scores, axis=1, kind="stable")[:, :2])
    assert all_valid.numpy().all()


# ------------------------------------------------------------------------------------------------------
# ChannelGate / merge_channels


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_gate_sums_to_one_and_zeroes_absent_channels(mode):
    rng = np.random.default_rng(8)
    target = rng.normal(size=[5, 4, 6]).astype(np.float32)
    gate = ChannelGate(num_channels=4, hidden_units=8, mode=mode)
    gate(target)
    _randomize(gate, rng)
    gamma = gate(target).numpy()
    assert gamma.shape == (5, 4)
    np.testing.assert_allclose(gamma.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(gamma > 0)

    shared_mask = np.array([True, False, True, True])
    gamma_shared = gate(target, channel_mask=shared_mask).numpy()
    assert np.all(gamma_shared[:, 1] == 0.0)
    np.testing.assert_allclose(gamma_shared.sum(axis=1), 1.0, rtol=1e-6)

    row_mask = np.array([[True] * 4, [False, True, False, True], [False] * 4, [True, False, False, False], [True] * 4])
    gamma_rows = gate(target, channel_mask=row_mask).numpy()
    assert np.all(gamma_rows[~row_mask] == 0.0)
    np.testing.assert_allclose(gamma_rows.sum(axis=1), [1, 1, 0, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(gamma_rows[3], [1, 0, 0, 0])

    if mode == "static":
        logits = gate.get_weights()[0]
        softmax = np.exp(logits) / np.exp(logits).sum()
        np.testing.assert_allclose(gamma, np.broadcast_to(softmax, gamma.shape), rtol=1e-5)
    else:
        assert np.std(gamma, axis=0).max() > 1e-3  # input dependent
        garbage = target.copy()
        garbage[:, 1] = 1e3 * rng.normal(size=garbage[:, 1].shape)  # absent channel contents never matter
        np.testing.assert_allclose(gate(garbage, channel_mask=shared_mask).numpy(), gamma_shared, rtol=1e-6)


def test_merge_channels_equals_explicit_weighted_sum():
    rng = np.random.default_rng(9)
    gamma = rng.dirichlet(np.ones(4), size=3).astype(np.float32)  # [B, C]
    target = rng.normal(size=[3, 4, 5]).astype(np.float32)
    history = rng.normal(size=[3, 7, 4, 5]).astype(np.float32)
    nested = rng.normal(size=[3, 2, 7, 4, 5]).astype(np.float32)

    explicit_target = sum(gamma[:, m, None] * target[:, m] for m in range(4))
    np.testing.assert_allclose(merge_channels(target, gamma).numpy(), explicit_target, rtol=1e-5)
    explicit = sum(gamma[:, None, m, None] * history[:, :, m] for m in range(4))
    merged = merge_channels(history, gamma).numpy()
    assert merged.shape == (3, 7, 5)
    np.testing.assert_allclose(merged, explicit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        merge_channels(nested, gamma).numpy()[:, 1], merge_channels(nested[:, 1], gamma).numpy(), rtol=1e-6
    )
    static_gamma = gamma[0]
    np.testing.assert_allclose(
        merge_channels(history, static_gamma).numpy(),
        merge_channels(history, np.tile(static_gamma, [3, 1])).numpy(),
        rtol=1e-6,
    )


def test_gated_score_is_linear_in_each_history_channel():
    """score_l = Σ_j γ_j u·x_l^(j): what the PQ path relies on (one gate for target and history)."""
    rng = np.random.default_rng(10)
    target = rng.normal(size=[2, 4, 8]).astype(np.float32)
    history = rng.normal(size=[2, 6, 4, 8]).astype(np.float32)
    gate = ChannelGate(num_channels=4)
    attention = MultiHeadTargetAttention(num_heads=2, key_dim=4, output_dim=8)
    gamma = gate(target)
    scores = attention.scores(merge_channels(target, gamma), merge_channels(history, gamma)).numpy()
    u = attention.folded_query(merge_channels(target, gamma)).numpy()  # [B, d]
    per_channel = np.einsum("blcd,bd->blc", history, u)
    np.testing.assert_allclose(scores, np.einsum("blc,bc->bl", per_channel, gamma.numpy()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_gate_config_round_trip(mode):
    rng = np.random.default_rng(11)
    target = rng.normal(size=[3, 4, 6]).astype(np.float32)
    mask = np.array([True, True, False, True])
    gate = ChannelGate(num_channels=4, hidden_units=5, mode=mode)
    gate(target)
    _randomize(gate, rng)
    _assert_config_round_trip(gate, lambda g: g(target, channel_mask=mask))


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_gate_save_load(tmp_path, save_format):
    rng = np.random.default_rng(12)
    target_in = tf.keras.Input([4, 6])
    history_in = tf.keras.Input([5, 4, 6])
    mask_in = tf.keras.Input([4], dtype=tf.bool)
    gate = ChannelGate(num_channels=4, hidden_units=5)
    gamma = gate(target_in, channel_mask=mask_in)
    merged = tf.keras.layers.Lambda(lambda x: merge_channels(x[0], x[1]))([history_in, gamma])
    model = tf.keras.Model([target_in, history_in, mask_in], [gamma, merged])
    inputs = [
        rng.normal(size=[3, 4, 6]).astype(np.float32),
        rng.normal(size=[3, 5, 4, 6]).astype(np.float32),
        np.array([[True, False, True, True]] * 3),
    ]
    if save_format == "keras":
        # A Lambda holding a Python lambda is not loadable from .keras without safe_mode=False; use SavedModel
        # for the Lambda and test the gate alone in the .keras format.
        model = tf.keras.Model([target_in, mask_in], gamma)
        inputs = [inputs[0], inputs[2]]
    _assert_save_load(model, inputs, tmp_path, save_format)


# ------------------------------------------------------------------------------------------------------
# TextEncoder


def test_text_encoder_masked_mean_and_all_padding():
    rng = np.random.default_rng(13)
    encoder = TextEncoder(vocab_size=20, embedding_dim=4, output_dim=3)
    tokens = np.array([[5, 7, 0, 0], [0, 0, 0, 0], [3, 3, 9, 11]], np.int32)
    encoder(tokens)
    _randomize(encoder, rng)
    output = encoder(tokens).numpy()
    embeddings, kernel = encoder.get_weights()
    expected = np.stack(
        [embeddings[[5, 7]].mean(0) @ kernel, np.zeros(3), embeddings[[3, 3, 9, 11]].mean(0) @ kernel]
    )
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)
    assert np.all(output[1] == 0.0) and np.all(np.isfinite(output))
    # Trailing padding never changes the vector, and leading axes pass through ([B, L, T] → [B, L, out]).
    longer = np.concatenate([tokens, np.zeros([3, 5], np.int32)], axis=1)
    np.testing.assert_allclose(encoder(longer).numpy(), output, rtol=1e-6)
    np.testing.assert_allclose(encoder(tokens[None]).numpy()[0], output, rtol=1e-6)
    assert schema.PAD_INDEX == 0


def test_text_encoder_all_padding_has_finite_gradients():
    encoder = TextEncoder(vocab_size=10, embedding_dim=4, output_dim=3)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(encoder(tf.zeros([2, 5], tf.int32)))
    gradients = tape.gradient(loss, encoder.trainable_variables)
    assert all(np.all(np.isfinite(tf.convert_to_tensor(g).numpy())) for g in gradients)


def test_text_encoder_embedding_gradient_is_dense_and_exact():
    # Repeated tokens across rows (as in a batch of histories) reach the optimizer as one dense [V, E] gradient
    # that equals the masked mean's, not one row per token occurrence.
    rng = np.random.default_rng(16)
    encoder = TextEncoder(vocab_size=12, embedding_dim=4, output_dim=3)
    tokens = np.array([[5, 5, 7, 0], [0, 0, 0, 0], [3, 5, 0, 0], [11, 3, 3, 3]], np.int32)
    encoder(tokens)
    _randomize(encoder, rng)
    upstream = tf.constant(rng.normal(size=[4, 3]), tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(encoder(tokens) * upstream)
    gradient = tape.gradient(loss, encoder.token_embedding.embeddings)
    assert isinstance(gradient, tf.Tensor)
    kernel = encoder.projection.kernel.numpy()
    want = np.zeros([12, 4], np.float32)
    for row, ids in enumerate(tokens):
        real = ids[ids != 0]
        for token in real:
            want[token] += kernel @ upstream.numpy()[row] / len(real)
    np.testing.assert_allclose(gradient.numpy(), want, rtol=1e-5, atol=1e-6)


def test_text_encoder_config_round_trip():
    rng = np.random.default_rng(14)
    tokens = rng.integers(0, 30, size=[4, 6]).astype(np.int32)
    encoder = TextEncoder(vocab_size=30, embedding_dim=5, output_dim=4, dropout=0.2, name="query_encoder")
    _assert_config_round_trip(encoder, lambda e: e(tokens))


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_text_encoder_save_load(tmp_path, save_format):
    rng = np.random.default_rng(15)
    tokens_in = tf.keras.Input([6], dtype=tf.int32)
    model = tf.keras.Model(tokens_in, TextEncoder(vocab_size=30, embedding_dim=5, output_dim=4)(tokens_in))
    tokens = rng.integers(0, 30, size=[4, 6]).astype(np.int32)
    tokens[1] = 0
    _assert_save_load(model, tokens, tmp_path, save_format)


# ------------------------------------------------------------------------------------------------------
# ImageEncoder


def test_image_encoder_embedding_mode():
    rng = np.random.default_rng(16)
    encoder = ImageEncoder(output_dim=6, mode="embedding", hidden_dim=10)
    embeddings = rng.normal(size=[2, 3, 12]).astype(np.float32)
    output = encoder(embeddings).numpy()
    assert output.shape == (2, 3, 6)
    w1, b1, w2, b2 = encoder.get_weights()
    hidden = tf.nn.gelu(embeddings @ w1 + b1, approximate=False).numpy()
    np.testing.assert_allclose(output, hidden @ w2 + b2, rtol=1e-5, atol=1e-5)


def test_image_encoder_nan_embedding_raises_naming_the_feature():
    encoder = ImageEncoder(output_dim=4, mode="embedding")
    embeddings = np.ones([3, 8], np.float32)
    embeddings[1, 2] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=schema.IMAGE_EMBEDDING):
        encoder(embeddings)
    traced = tf.function(lambda x: encoder(x))
    with pytest.raises(tf.errors.InvalidArgumentError, match=schema.IMAGE_EMBEDDING):
        traced(tf.constant(embeddings))
    embeddings[1, 2] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        encoder(embeddings)
    unchecked = ImageEncoder(output_dim=4, mode="embedding", check_numerics=False)
    assert np.isnan(unchecked(np.where(np.isinf(embeddings), np.nan, embeddings)).numpy()[1]).all()


def test_image_encoder_pixels_mode_shapes_and_gradients():
    rng = np.random.default_rng(17)
    encoder = ImageEncoder(
        output_dim=6, mode="pixels", hidden_dim=8, patch_size=4, num_layers=2, num_heads=2, image_size=8
    )
    images = rng.integers(0, 256, size=[3, 8, 8, 3]).astype(np.uint8)
    with tf.GradientTape() as tape:
        output = encoder(images, training=True)
        loss = tf.reduce_sum(output**2)
    assert output.shape.as_list() == [3, 6]
    assert np.all(np.isfinite(output.numpy()))
    by_name = {v.name: v for v in encoder.trainable_variables}
    patch_kernel = next(v for name, v in by_name.items() if "patch_embedding" in name and "kernel" in name)
    assert patch_kernel.shape.as_list() == [4, 4, 3, 8]
    gradients = dict(zip(by_name, tape.gradient(loss, list(by_name.values()))))
    assert np.abs(gradients[patch_kernel.name].numpy()).sum() > 0
    assert np.abs(gradients[encoder.position_embedding.name].numpy()).sum() > 0
    assert np.abs(gradients[encoder.cls_token.name].numpy()).sum() > 0
    # uint8 is scaled by 1/255; a leading history axis passes through.
    np.testing.assert_allclose(encoder(images.astype(np.float32) / 255.0).numpy(), output.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encoder(np.stack([images, images])).numpy()[1], output.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="8, 8, 3"):
        encoder(np.zeros([2, 16, 16, 3], np.uint8))
    nan_images = np.zeros([1, 8, 8, 3], np.float32)
    nan_images[0, 1, 1, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"'{schema.IMAGE}'"):
        encoder(nan_images)


@pytest.mark.parametrize("mode", ["embedding", "pixels"])
def test_image_encoder_config_round_trip(mode):
    rng = np.random.default_rng(18)
    if mode == "embedding":
        inputs = rng.normal(size=[3, 12]).astype(np.float32)
        encoder = ImageEncoder(output_dim=5, mode=mode, hidden_dim=7)
    else:
        inputs = rng.integers(0, 256, size=[2, 8, 8, 3]).astype(np.uint8)
        encoder = ImageEncoder(output_dim=5, mode=mode, hidden_dim=8, patch_size=4, image_size=8, num_layers=1)
    encoder(inputs)
    _randomize(encoder, rng)
    _assert_config_round_trip(encoder, lambda e: e(inputs))


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_image_encoder_save_load(tmp_path, save_format):
    rng = np.random.default_rng(19)
    pixels_in = tf.keras.Input([8, 8, 3], dtype=tf.uint8)
    embedding_in = tf.keras.Input([12])
    vit = ImageEncoder(output_dim=5, mode="pixels", hidden_dim=8, patch_size=4, image_size=8)
    mlp = ImageEncoder(output_dim=5, mode="embedding")
    model = tf.keras.Model([pixels_in, embedding_in], [vit(pixels_in), mlp(embedding_in)])
    _randomize(vit, rng)
    inputs = [rng.integers(0, 256, size=[2, 8, 8, 3]).astype(np.uint8), rng.normal(size=[2, 12]).astype(np.float32)]
    _assert_save_load(model, inputs, tmp_path, save_format)


def test_transformer_block_config_round_trip():
    rng = np.random.default_rng(20)
    tokens = rng.normal(size=[2, 5, 8]).astype(np.float32)
    block = TransformerBlock(num_heads=2, mlp_dim=16)
    block(tokens)
    _randomize(block, rng)
    _assert_config_round_trip(block, lambda b: b(tokens))


def test_transformer_block_matches_keras_multi_head_attention():
    """The block's self-attention equals tf.keras MultiHeadAttention with the same weights (pre-norm residuals)."""
    rng = np.random.default_rng(24)
    tokens = rng.normal(size=[2, 5, 8]).astype(np.float32)
    block = TransformerBlock(num_heads=2, mlp_dim=16)
    block(tokens)
    _randomize(block, rng)
    reference = tf.keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    reference(tokens, tokens)
    weights = []
    for dense in (block.query, block.key, block.value):
        kernel, bias = dense.get_weights()
        weights += [kernel.reshape(8, 2, 4), bias.reshape(2, 4)]
    kernel, bias = block.attention_output.get_weights()
    reference.set_weights(weights + [kernel.reshape(2, 4, 8), bias])
    normed = block.attention_norm(tokens)
    after_attention = tokens + reference(normed, normed)
    expected = after_attention + block.mlp_output(block.mlp_hidden(block.mlp_norm(after_attention)))
    np.testing.assert_allclose(block(tokens).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# AttributeEncoder


def test_attribute_encoder_matches_reference():
    rng = np.random.default_rng(21)
    encoder = AttributeEncoder(vocab_sizes=[10, 4, 3], embedding_dim=2, output_dim=5)
    ids = np.array([[[9, 3, 2], [0, 0, 0]], [[4, 1, 1], [7, 2, 0]]], np.int64)  # [B, L, A]
    encoder(ids)
    _randomize(encoder, rng)
    output = encoder(ids).numpy()
    assert output.shape == (2, 2, 5)
    item_table, author_table, category_table, kernel, bias = encoder.get_weights()
    concat = np.concatenate([item_table[ids[..., 0]], author_table[ids[..., 1]], category_table[ids[..., 2]]], axis=-1)
    np.testing.assert_allclose(output, concat @ kernel + bias, rtol=1e-5, atol=1e-6)


def test_attribute_encoder_rejects_out_of_range_ids():
    encoder = AttributeEncoder(vocab_sizes=[10, 4, 3], embedding_dim=2, output_dim=5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"attribute 1 id out of range \[0, 4\)"):
        encoder(np.array([[1, 4, 0]], np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"attribute 2 id out of range \[0, 3\)"):
        encoder(np.array([[1, 0, -1]], np.int32))
    traced = tf.function(lambda x: encoder(x))
    with pytest.raises(tf.errors.InvalidArgumentError, match="attribute 0 id out of range"):
        traced(tf.constant([[10, 0, 0]], tf.int32))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        encoder(np.array([[1, 0]], np.int32))


def test_attribute_encoder_config_round_trip():
    rng = np.random.default_rng(22)
    ids = np.stack([rng.integers(0, n, size=6) for n in (10, 4, 3)], axis=-1)
    encoder = AttributeEncoder(vocab_sizes=[10, 4, 3], embedding_dim=2, output_dim=5, name="attributes")
    encoder(ids)
    _randomize(encoder, rng)
    _assert_config_round_trip(encoder, lambda e: e(ids))


@pytest.mark.parametrize("save_format", SAVE_FORMATS)
def test_attribute_encoder_save_load(tmp_path, save_format):
    rng = np.random.default_rng(23)
    ids_in = tf.keras.Input([4, 3], dtype=tf.int64)
    model = tf.keras.Model(ids_in, AttributeEncoder(vocab_sizes=[10, 4, 3], embedding_dim=2, output_dim=5)(ids_in))
    ids = np.stack([rng.integers(0, n, size=[2, 4]) for n in (10, 4, 3)], axis=-1)
    _assert_save_load(model, ids, tmp_path, save_format)
    restored = tf.keras.models.load_model(
        os.path.join(str(tmp_path), "model.keras" if save_format == "keras" else "saved_model")
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="attribute 0 id out of range"):
        restored(np.array([[[10, 0, 0]] * 4] * 2, np.int64))


def test_gated_call_equals_call_on_explicitly_merged_keys():
    """gated_call folds γ per target; it must equal call() on keys Σ_j γ_{n,j} x_l^(j) for every target n."""
    rng = np.random.default_rng(3)
    batch, targets, length, channels, dim = 2, 3, 7, 4, 8
    layer = MultiHeadTargetAttention(num_heads=2, key_dim=dim, output_dim=5)
    query = tf.constant(rng.normal(size=[batch, targets, dim]), tf.float32)
    history = tf.constant(rng.normal(size=[batch, length, channels, dim]), tf.float32)
    gamma = tf.nn.softmax(tf.constant(rng.normal(size=[batch, targets, channels]), tf.float32))
    mask = tf.constant([[True] * 5 + [False] * 2, [False] * 7])
    output, scores = layer.gated_call(query, history, gamma, mask)
    for n in range(targets):
        keys = tf.einsum("bljd,bj->bld", history, gamma[:, n])
        expected = layer(query[:, n], keys, mask=mask)
        np.testing.assert_allclose(output[:, n], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scores[0, n, :5], layer.scores(query[:, n], keys, mask)[0, :5], rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_array_equal(output[1], 0.0)  # no history → zeros


def test_identity_init_starts_as_a_dot_product_search():
    """identity_init: every head's W^Q, W^K start near I, so the head-averaged score ranks keys as q·k does."""
    rng = np.random.default_rng(6)
    query = tf.constant(rng.normal(size=[4, 8]), tf.float32)
    keys = tf.constant(rng.normal(size=[4, 30, 8]), tf.float32)
    layer = MultiHeadTargetAttention(num_heads=2, key_dim=8, output_dim=8, identity_init=True)
    scores = layer.scores(query, keys).numpy()
    dot = tf.einsum("bd,bld->bl", query, keys).numpy() / np.sqrt(8)
    assert min(np.corrcoef(s, d)[0, 1] for s, d in zip(scores, dot)) > 0.95
    assert MultiHeadTargetAttention.from_config(layer.get_config()).identity_init
    with pytest.raises(ValueError, match="identity_init"):
        MultiHeadTargetAttention(num_heads=2, key_dim=4, output_dim=8, identity_init=True)(query, keys=keys)
