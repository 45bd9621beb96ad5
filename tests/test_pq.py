"""PQLookup: code tables, encode/decode, ADC and SDC against NumPy references, serialization round trips.

Tolerances: float32 sums of at most a few hundred products of O(1) values, compared with rtol = atol = 1e-5
(ADC vs the decoded inner product, every-vector-its-own-centroid vs exact) and 1e-4 for SDC (two-sided
products summed over channel pairs).
"""

import os

import numpy as np
import pytest

import seminar_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
import tensorflow as tf

from seminar_tf import quantization, schema
from seminar_tf.layers.pq import PQLookup

CHANNEL_SETS = [list(schema.CHANNELS), [schema.TEXT_CHANNEL, schema.ATTRIBUTES_CHANNEL], [schema.QUERY_CHANNEL]]


def _layer(rng, channels, num_centroids, dim=8, subspaces=4, items=40, queries=15, **kwargs):
    layer = PQLookup(channels, dim, subspaces, num_centroids, num_items=items, num_queries=queries, **kwargs)
    layer.set_codebooks(rng.normal(size=[len(layer.channels), subspaces, num_centroids, dim // subspaces]))
    item_codes = rng.integers(0, num_centroids, [items, len(layer.item_channel_ids), subspaces]).astype(np.uint8)
    query_codes = rng.integers(0, num_centroids, [queries, subspaces]).astype(np.uint8)
    layer.set_codes(item_codes if layer.item_channel_ids else None, query_codes if layer.query_channel_ids else None)
    return layer, item_codes, query_codes


def _history_codes(layer, item_codes, query_codes, hq, hi):
    parts = ([query_codes[hq][:, :, None]] if layer.query_channel_ids else []) + (
        [item_codes[hi]] if layer.item_channel_ids else [])
    return np.concatenate(parts, axis=2)  # [B, L, J, S] in channel order (query first)


@pytest.mark.parametrize("num_centroids", [256, 16, 5])
@pytest.mark.parametrize("channels", CHANNEL_SETS)
def test_code_tables_round_trip_through_the_packed_words(num_centroids, channels):
    rng = np.random.default_rng(0)
    layer, item_codes, query_codes = _layer(rng, channels, num_centroids)
    assert layer.bits == (4 if num_centroids <= 16 else 8)
    items, queries = layer.get_codes()
    if layer.item_channel_ids:
        np.testing.assert_array_equal(items, item_codes)
    if layer.query_channel_ids:
        np.testing.assert_array_equal(queries, query_codes)
    hq, hi = rng.integers(0, 15, [3, 7]), rng.integers(0, 40, [3, 7])
    words = layer.lookup_words(hq, hi)
    assert words.shape[-1] * 4 == layer.bytes_per_position
    np.testing.assert_array_equal(layer.unpack(words), _history_codes(layer, item_codes, query_codes, hq, hi))
    if layer.query_channel_ids:  # codes encoded on the fly pack to the same words as the table's
        np.testing.assert_array_equal(layer.lookup_words(hq, hi, query_codes=query_codes[hq]), words)
        np.testing.assert_array_equal(layer.query_codes_of(hq), query_codes[hq])
    if layer.item_channel_ids:
        np.testing.assert_array_equal(layer.item_codes_of(hi), item_codes[hi])


@pytest.mark.parametrize("num_centroids", [256, 16])
@pytest.mark.parametrize("method, jit", [("lookup", False), ("lookup", True), ("decode", False)])
def test_adc_equals_the_decoded_inner_product(num_centroids, method, jit):
    """Σ_j Σ_b T[j, b, code] = Σ_j v_j · x̂_j, x̂ the centroids of the codes (NumPy float64 reference)."""
    rng = np.random.default_rng(1)
    layer, item_codes, query_codes = _layer(rng, list(schema.CHANNELS), num_centroids, jit_compile=jit)
    hq, hi = rng.integers(0, 15, [2, 9]), rng.integers(0, 40, [2, 9])
    targets = rng.normal(size=[2, 3, 4, 8]).astype(np.float32)
    codes = _history_codes(layer, item_codes, query_codes, hq, hi)
    books = layer.codebooks.numpy().astype(np.float64)
    decoded = books[np.arange(4)[:, None], np.arange(4)[None, :], codes].reshape(2, 9, 4, 8)
    reference = np.einsum("bljd,bnjd->bnl", decoded, targets)
    scores = layer.adc_scores(targets, layer.lookup_words(hq, hi), method=method)
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.decode(codes), decoded, rtol=1e-6, atol=1e-6)
    if method == "lookup" and not jit:  # the layer call is ADC over the code tables
        np.testing.assert_allclose(layer(targets, hq, hi), reference, rtol=1e-5, atol=1e-5)


def test_encode_picks_the_nearest_centroid():
    rng = np.random.default_rng(2)
    layer, _, _ = _layer(rng, [schema.TEXT_CHANNEL, schema.IMAGE_CHANNEL], 32)
    x = rng.normal(size=[5, 6, 2, 8]).astype(np.float32)
    codes = layer.encode(x).numpy()
    books = layer.codebooks.numpy()
    distance = ((x.reshape(5, 6, 2, 4, 1, 2) - books[None, None]) ** 2).sum(-1)  # [5, 6, J, S, C]
    np.testing.assert_array_equal(codes, distance.argmin(-1))
    np.testing.assert_array_equal(codes[:, :, 1], quantization.nearest_centroids(
        x[:, :, 1].reshape(-1, 8), books[1]).reshape(5, 6, 4))
    one = layer.encode(x[:, :, 1:], channels=[schema.IMAGE_CHANNEL]).numpy()
    np.testing.assert_array_equal(one[:, :, 0], codes[:, :, 1])


def _own_centroid_layer(rng, subspaces, channels=schema.CHANNELS, dim=8, items=12, queries=7):
    """A layer whose codebooks hold every vocabulary vector (C ≥ number of distinct sub-vectors)."""
    embeddings = {c: rng.normal(size=[queries if c == schema.QUERY_CHANNEL else items, dim]).astype(np.float32)
                  for c in channels}
    for c in channels:  # reserved rows are zero vectors, as the content encoder gives
        embeddings[c][: len(schema.QUERY_RESERVED) if c == schema.QUERY_CHANNEL else len(schema.RESERVED)] = 0
    config = quantization.CodebookConfig(num_subspaces=subspaces, num_centroids=32)
    books = quantization.fit_codebooks(embeddings, list(channels), config)
    item_codes, query_codes, errors = quantization.encode_vocabulary(embeddings, list(channels), books)
    assert max(errors.values()) < 1e-10
    layer = PQLookup(channels, dim, subspaces, 32, num_items=items, num_queries=queries)
    layer.set_codebooks(books)
    layer.set_codes(item_codes, query_codes)
    return layer, embeddings


def _exact_history(embeddings, channels, hq, hi):
    return np.stack([embeddings[c][hq] if c == schema.QUERY_CHANNEL else embeddings[c][hi] for c in channels], 2)


@pytest.mark.parametrize("subspaces", [1, 4])
def test_every_vector_its_own_centroid_gives_exact_adc_and_sdc(subspaces):
    rng = np.random.default_rng(3)
    channels = list(schema.CHANNELS)
    layer, embeddings = _own_centroid_layer(rng, subspaces)
    hq, hi = rng.integers(0, 7, [2, 10]), rng.integers(0, 12, [2, 10])
    history = _exact_history(embeddings, channels, hq, hi).astype(np.float64)  # [B, L, J, d]
    words = layer.lookup_words(hq, hi)
    # ADC: exact for any target vectors v_j.
    targets = rng.normal(size=[2, 3, 4, 8]).astype(np.float32)
    exact = np.einsum("bljd,bnjd->bnl", history, targets)
    np.testing.assert_allclose(layer.adc_scores(targets, words, "lookup"), exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.adc_scores(targets, words, "decode"), exact, rtol=1e-5, atol=1e-5)
    # SDC: the target pair (a vocabulary pair) quantized too; γ_i γ_j x_t^(i) W_ij x_l^(j).
    tq, ti = rng.integers(0, 7, [2, 3]), rng.integers(0, 12, [2, 3])
    target = _exact_history(embeddings, channels, tq, ti).astype(np.float32)  # [B, N, J, d]
    gamma = rng.dirichlet(np.ones(4), size=[2, 3]).astype(np.float32)
    codes = layer.encode(target)
    identity = np.einsum("bnid,bljd,bni,bnj->bnl", target, history, gamma, gamma)
    np.testing.assert_allclose(layer.sdc_scores(codes, gamma, words), identity, rtol=1e-4, atol=1e-4)
    bilinear = rng.normal(size=[4, 4, 8, 8]).astype(np.float32)
    if subspaces == 1:  # one sub-space: the whole bilinear map is its diagonal block, SDC is exact
        full = np.einsum("bnia,ijaf,bljf,bni,bnj->bnl", target, bilinear, history, gamma, gamma)
        np.testing.assert_allclose(layer.sdc_scores(codes, gamma, words, bilinear), full, rtol=1e-4, atol=1e-4)


def test_sdc_table_keeps_the_diagonal_blocks_of_the_bilinear_map():
    rng = np.random.default_rng(4)
    layer, _, _ = _layer(rng, [schema.QUERY_CHANNEL, schema.TEXT_CHANNEL], 6, dim=6, subspaces=3)
    bilinear = rng.normal(size=[2, 2, 6, 6]).astype(np.float32)
    table = layer.sdc_table(bilinear).numpy()  # [J, J, S, C, C]
    books = layer.codebooks.numpy()
    for i, j, b, c, e in [(0, 1, 2, 5, 0), (1, 1, 0, 3, 3), (1, 0, 1, 0, 4)]:
        block = bilinear[i, j, 2 * b: 2 * b + 2, 2 * b: 2 * b + 2]
        np.testing.assert_allclose(table[i, j, b, c, e], books[i, b, c] @ block @ books[j, b, e], rtol=1e-5)
    plain = layer.sdc_table().numpy()
    np.testing.assert_allclose(plain[0, 1, 1, 2, 3], books[0, 1, 2] @ books[1, 1, 3], rtol=1e-5)


def test_unfitted_layer_fails_with_a_clear_message_and_bad_codes_are_rejected():
    layer = PQLookup([schema.TEXT_CHANNEL], 8, 4, 16, num_items=5, num_queries=3)
    assert not layer.is_fitted
    with pytest.raises(tf.errors.InvalidArgumentError, match="fit-codebooks"):
        layer.assert_fitted()
    with pytest.raises(ValueError, match=r"item_codes must have shape \[5, 1, 4\]"):
        layer.set_codes(np.zeros([5, 4], np.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        layer.set_codes(np.full([5, 1, 4], 16))
    with pytest.raises(ValueError, match="codebooks must have shape"):
        layer.set_codebooks(np.zeros([1, 4, 8, 2]))
    with pytest.raises(ValueError, match="must divide dim"):
        PQLookup([schema.TEXT_CHANNEL], 8, 3, 16)


def test_config_round_trip():
    rng = np.random.default_rng(5)
    layer, _, _ = _layer(rng, list(schema.CHANNELS), 16, jit_compile=True, lookup_max_candidates=2)
    clone = PQLookup.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone.set_weights(layer.get_weights())
    targets = rng.normal(size=[2, 1, 4, 8]).astype(np.float32)
    hq, hi = rng.integers(0, 15, [2, 5]), rng.integers(0, 40, [2, 5])
    np.testing.assert_allclose(clone(targets, hq, hi), layer(targets, hq, hi), rtol=1e-6)
    np.testing.assert_array_equal(clone.get_codes()[0], layer.get_codes()[0])


@pytest.mark.parametrize("save_format", ["keras", "tf"])
def test_codes_and_codebooks_survive_save_and_load(tmp_path, save_format):
    rng = np.random.default_rng(6)
    layer, item_codes, query_codes = _layer(rng, list(schema.CHANNELS), 256)
    targets_in = tf.keras.Input([2, 4, 8])
    queries_in = tf.keras.Input([6], dtype=tf.int32)
    items_in = tf.keras.Input([6], dtype=tf.int32)
    model = tf.keras.Model([targets_in, queries_in, items_in], layer(targets_in, queries_in, items_in))
    inputs = [rng.normal(size=[3, 2, 4, 8]).astype(np.float32), rng.integers(0, 15, [3, 6]).astype(np.int32),
              rng.integers(0, 40, [3, 6]).astype(np.int32)]
    expected = model(inputs).numpy()
    path = os.path.join(str(tmp_path), "model.keras" if save_format == "keras" else "saved_model")
    model.save(path)
    restored = tf.keras.models.load_model(path)
    np.testing.assert_allclose(restored(inputs), expected, rtol=1e-6, atol=1e-6)
    pq = next(layer for layer in restored.layers if isinstance(layer, PQLookup))
    items, queries = pq.get_codes()
    np.testing.assert_array_equal(items, item_codes)
    np.testing.assert_array_equal(queries, query_codes)
    np.testing.assert_array_equal(pq.codebooks.numpy(), layer.codebooks.numpy())
    assert pq.is_fitted


def test_padded_8_bit_layout_scores_like_the_decoded_codes():
    """S = 3 per channel: the 8-bit words carry padding bytes, whose table entries must score 0."""
    rng = np.random.default_rng(7)
    layer, item_codes, query_codes = _layer(rng, [schema.QUERY_CHANNEL, schema.TEXT_CHANNEL], 256, dim=6,
                                            subspaces=3)
    assert not layer._identity_bytes and layer.bytes_per_position == 8
    hq, hi = rng.integers(0, 15, [2, 5]), rng.integers(0, 40, [2, 5])
    targets = rng.normal(size=[2, 1, 2, 6]).astype(np.float32)
    decoded = layer.decode(_history_codes(layer, item_codes, query_codes, hq, hi)).numpy()
    reference = np.einsum("bljd,bnjd->bnl", decoded, targets)
    np.testing.assert_allclose(layer(targets, hq, hi), reference, rtol=1e-5, atol=1e-5)
