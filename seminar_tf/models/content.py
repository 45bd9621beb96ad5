"""Multi-modal content of query-item pairs: item/query tables inside the model, channel encoders, W_m.

The item and query tables (title tokens, image embeddings, attribute ids, query tokens) are
non-trainable variables of this layer, set by ``set_tables`` and saved with the model, so a served
history needs only ids. Content is encoded once per unique item (and query) of a call, then gathered
back to every position that refers to it (a history of 10^4 steps over a few hundred distinct items costs
a few hundred encoder calls, not 10^4).

Paper (PSU): x = [Q W_q, T W_t, I W_i, A W_a] ∈ R^{(M+1)×L×d}; each encoder here ends with its W_m.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf

from seminar_tf import schema
from seminar_tf.layers import AttributeEncoder, ImageEncoder, TextEncoder

MISSING_IMAGE_MODES = ("zero", "text")


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class ContentEncoder(tf.keras.layers.Layer):
    """Encodes (query index, item index) pairs into stacked channel embeddings [..., C, d].

    Args:
      num_items, num_queries, num_tokens: vocabulary sizes (reserved rows included).
      title_length, query_length: token slots per title / query.
      image_dim: width of precomputed image embeddings; 0 when the dataset has none.
      attribute_vocab_sizes: vocabulary size of each item attribute column; column 0 is the item id.
      channels: the channels to produce, a subset of ``schema.CHANNELS`` in that order.
      dim: d, the common width of every channel.
      token_dim: width of token and attribute embeddings before W_m.
      missing_image: the image channel of an item without an image (its image-embedding row is all zeros, which is
        what the pipeline writes for a missing one): ``"zero"`` (default), the zero vector, so it adds nothing to
        the fused item or to any attention score, as a padding step's channels do; ``"text"``, the item's text
        channel in its place (cross-modal completion, which is sound where L_align has put text and image in one
        space). Either way, an item's missing image is never encoded as if it were an image of zeros.

    Example:

    ```python
    content = ContentEncoder(num_items=100, num_queries=20, num_tokens=50, title_length=4,
                             query_length=2, image_dim=8, attribute_vocab_sizes=[100, 5],
                             channels=["query", "text", "image", "attributes"], dim=16)
    content.set_tables(title_tokens, image_embedding, attributes, query_tokens)
    pairs = content(query_idx, item_idx)  # [B, L, 4, 16]
    ```
    """

    def __init__(
        self,
        num_items: int,
        num_queries: int,
        num_tokens: int,
        title_length: int,
        query_length: int,
        image_dim: int,
        attribute_vocab_sizes: Sequence[int],
        channels: Sequence[str],
        dim: int,
        token_dim: int = 32,
        dropout: float = 0.0,
        missing_image: str = "zero",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if missing_image not in MISSING_IMAGE_MODES:
            raise ValueError(f"missing_image must be one of {MISSING_IMAGE_MODES}, got {missing_image!r}")
        unknown = [c for c in channels if c not in schema.CHANNELS]
        if unknown or not channels:
            raise ValueError(f"channels must be a non-empty subset of {schema.CHANNELS}, got {list(channels)}")
        if schema.IMAGE_CHANNEL in channels and not image_dim:
            raise ValueError("the image channel needs image_dim > 0 (the dataset has no image embeddings)")
        self.num_items = int(num_items)
        self.num_queries = int(num_queries)
        self.num_tokens = int(num_tokens)
        self.title_length = int(title_length)
        self.query_length = int(query_length)
        self.image_dim = int(image_dim)
        self.attribute_vocab_sizes = [int(v) for v in attribute_vocab_sizes]
        self.channels = [c for c in schema.CHANNELS if c in channels]
        self.dim = int(dim)
        self.token_dim = int(token_dim)
        self.dropout = float(dropout)
        self.missing_image = missing_image
        if (missing_image == "text" and schema.IMAGE_CHANNEL in self.channels
                and schema.TEXT_CHANNEL not in self.channels):
            raise ValueError("missing_image='text' needs the text channel beside the image channel")

        self.title_tokens = self.add_weight(
            name="title_tokens", shape=[self.num_items, self.title_length], dtype=tf.int32,
            initializer="zeros", trainable=False)
        self.attributes = self.add_weight(
            name="attributes", shape=[self.num_items, len(self.attribute_vocab_sizes)], dtype=tf.int32,
            initializer="zeros", trainable=False)
        self.query_tokens = self.add_weight(
            name="query_tokens", shape=[self.num_queries, self.query_length], dtype=tf.int32,
            initializer="zeros", trainable=False)
        self.image_embedding = (
            self.add_weight(name="image_embedding", shape=[self.num_items, max(1, self.image_dim)],
                            dtype=tf.float32, initializer="zeros", trainable=False)
            if self.image_dim else None
        )
        self.encoders: Dict[str, tf.keras.layers.Layer] = {}
        if schema.QUERY_CHANNEL in self.channels:
            self.query_encoder = TextEncoder(self.num_tokens, self.token_dim, self.dim, dropout, name="query_encoder")
        if schema.TEXT_CHANNEL in self.channels:
            self.text_encoder = TextEncoder(self.num_tokens, self.token_dim, self.dim, dropout, name="text_encoder")
        if schema.IMAGE_CHANNEL in self.channels:
            self.image_encoder = ImageEncoder(self.dim, mode="embedding", name="image_encoder")
        if schema.ATTRIBUTES_CHANNEL in self.channels:
            self.attribute_encoder = AttributeEncoder(
                self.attribute_vocab_sizes, self.token_dim, self.dim, name="attribute_encoder")

    # ------------------------------------------------------------------------------------------ tables
    def set_tables(self, title_tokens, attributes, query_tokens, image_embedding=None) -> None:
        """Assigns the content tables (explicit, so they are saved with the model)."""
        self.title_tokens.assign(np.asarray(title_tokens, np.int32))
        self.attributes.assign(np.asarray(attributes, np.int32))
        self.query_tokens.assign(np.asarray(query_tokens, np.int32))
        if self.image_embedding is not None:
            if image_embedding is None:
                raise ValueError("image_embedding table is required: this encoder has an image channel")
            image_embedding = np.asarray(image_embedding, np.float32)
            if not np.all(np.isfinite(image_embedding)):
                bad = np.unique(np.nonzero(~np.isfinite(image_embedding))[0])[:5]
                raise ValueError(f"image_embedding has NaN/inf values in item rows {bad.tolist()}; fix the "
                                 "item table (the pipeline dead-letters such rows when it builds the dataset)")
            self.image_embedding.assign(image_embedding)

    @property
    def item_channels(self) -> List[str]:
        return [c for c in self.channels if c != schema.QUERY_CHANNEL]

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _unique(indices):
        flat = tf.reshape(tf.cast(indices, tf.int32), [-1])
        unique, position = tf.unique(flat)
        return unique, position

    @staticmethod
    def _scatter_back(encoded, position, indices):
        out = tf.gather(encoded, position)
        return tf.reshape(out, tf.concat([tf.shape(indices), [tf.shape(encoded)[-1]]], axis=0))

    def _check_range(self, indices, size: int, feature: str):
        indices = tf.cast(indices, tf.int32)
        message = f"{feature}: index out of range [0, {size}); map unknown ids to OOV ({schema.OOV_INDEX})"
        checks = [tf.debugging.assert_non_negative(indices, message=message),
                  tf.debugging.assert_less(indices, size, message=message)]
        with tf.control_dependencies(checks):
            return tf.identity(indices)

    # ------------------------------------------------------------------------------------------ serving cache
    @property
    def has_cache(self) -> bool:
        return getattr(self, "item_cache", None) is not None or getattr(self, "query_cache", None) is not None

    def build_cache(self, batch_size: int = 4096) -> int:
        """Precomputes every vocabulary row's channels with the current weights (inference mode) into
        non-trainable variables: item channels [num_items, J_item, d] and the query channel [num_queries, d].

        While the cache exists, inference calls (``training`` falsy) gather from it instead of running the
        encoders: the same numbers, without encoding 10^4 history pairs per request. For serving exports
        (``seminar_tf.export``); ``clear_cache`` drops it (it goes stale as soon as the weights change).
        Returns the cache size in bytes.
        """
        self.clear_cache()
        size = 0
        if self.item_channels:
            rows = []
            for start in range(0, self.num_items, batch_size):
                index = tf.range(start, min(start + batch_size, self.num_items))
                encoded = self.encode_items(index, training=False)
                rows.append(tf.stack([encoded[c] for c in self.item_channels], axis=1))
            self.item_cache = tf.Variable(tf.concat(rows, 0), trainable=False, name="item_cache")
            size += self.item_cache.shape.num_elements() * 4
        if schema.QUERY_CHANNEL in self.channels:
            rows = [self.encode_queries(tf.range(start, min(start + batch_size, self.num_queries)), training=False)
                    for start in range(0, self.num_queries, batch_size)]
            self.query_cache = tf.Variable(tf.concat(rows, 0), trainable=False, name="query_cache")
            size += self.query_cache.shape.num_elements() * 4
        return size

    def clear_cache(self) -> None:
        """Drops the serving cache of ``build_cache`` (no-op without one)."""
        for name in ("item_cache", "query_cache"):
            if getattr(self, name, None) is not None:
                delattr(self, name)

    def _use_cache(self, name: str, training) -> bool:
        return getattr(self, name, None) is not None and not training

    # ------------------------------------------------------------------------------------------ encoding
    def encode_items(self, item_indices, training=None) -> Dict[str, tf.Tensor]:
        """Item channels {text, image, attributes} ∩ channels, each [..., d]; padding rows give zeros."""
        item_indices = self._check_range(item_indices, self.num_items, "item index")
        if self._use_cache("item_cache", training):
            cached = tf.gather(self.item_cache, item_indices)  # [..., J_item, d]
            return {c: cached[..., j, :] for j, c in enumerate(self.item_channels)}
        unique, position = self._unique(item_indices)
        out = {}
        if schema.TEXT_CHANNEL in self.channels:
            tokens = tf.gather(self.title_tokens, unique)
            out[schema.TEXT_CHANNEL] = self.text_encoder(tokens, training=training)
        if schema.IMAGE_CHANNEL in self.channels:
            pixels = tf.gather(self.image_embedding, unique)
            image = self.image_encoder(pixels, training=training)
            present = self._has_image(pixels)[:, None]
            out[schema.IMAGE_CHANNEL] = (image * tf.cast(present, image.dtype) if self.missing_image == "zero"
                                         else tf.where(present, image, out[schema.TEXT_CHANNEL]))
        if schema.ATTRIBUTES_CHANNEL in self.channels:
            ids = tf.gather(self.attributes, unique)
            out[schema.ATTRIBUTES_CHANNEL] = self.attribute_encoder(ids)
        is_item = tf.cast(unique >= len(schema.RESERVED), tf.float32)[:, None]  # PAD/OOV rows carry no content
        return {name: self._scatter_back(value * is_item, position, item_indices) for name, value in out.items()}

    @staticmethod
    def _has_image(pixels) -> tf.Tensor:
        return tf.reduce_any(tf.not_equal(pixels, 0.0), axis=-1)

    def image_present(self, item_indices) -> tf.Tensor:
        """[...] bool: the item has an image (a non-zero image-embedding row); False for PAD/OOV and, without an
        image channel, everywhere."""
        if self.image_embedding is None:
            return tf.zeros(tf.shape(item_indices), tf.bool)
        item_indices = self._check_range(item_indices, self.num_items, "item index")
        return self._has_image(tf.gather(self.image_embedding, item_indices)) & (
            item_indices >= len(schema.RESERVED))

    def encode_items_stacked(self, item_indices, training=None) -> tf.Tensor:
        """``encode_items``' channels concatenated in ``item_channels`` order: [..., J_item·d] (from the serving
        cache a gather and a free reshape, no per-channel slices and concat)."""
        if self._use_cache("item_cache", training):
            item_indices = self._check_range(item_indices, self.num_items, "item index")
            cached = tf.gather(self.item_cache, item_indices)  # [..., J_item, d]
            return tf.reshape(cached, tf.concat([tf.shape(item_indices), [len(self.item_channels) * self.dim]], 0))
        parts = self.encode_items(item_indices, training=training)
        return tf.concat([parts[c] for c in self.item_channels], axis=-1)

    def encode_query_tokens(self, tokens, training=None):
        """Query channel from token ids [..., query_length] (serving path for raw query text)."""
        return self.query_encoder(tokens, training=training)

    def encode_queries(self, query_indices, training=None):
        """Query channel [..., d] from query indices; the empty query (browsing) is the zero vector."""
        query_indices = self._check_range(query_indices, self.num_queries, "query index")
        if self._use_cache("query_cache", training):
            return tf.gather(self.query_cache, query_indices)
        unique, position = self._unique(query_indices)
        encoded = self.query_encoder(tf.gather(self.query_tokens, unique), training=training)
        return self._scatter_back(encoded, position, query_indices)

    def call(self, query_indices, item_indices, training=None, query_tokens=None):
        """Stacked channels [..., C, d] of (query, item) pairs, C = len(self.channels), in schema order.

        ``query_tokens`` [..., query_length] (token ids of raw query text) replaces the query-table lookup.
        """
        parts = self.encode_items(item_indices, training=training)
        if schema.QUERY_CHANNEL in self.channels:
            parts[schema.QUERY_CHANNEL] = self.query_channel(query_indices, query_tokens, training)
        return tf.stack([parts[c] for c in self.channels], axis=-2)

    def query_channel(self, query_indices, query_tokens=None, training=None):
        """Query channel [..., d]. With ``query_tokens`` (raw text, tokenized in the serving graph) only the
        out-of-vocabulary queries (index OOV) are encoded from their tokens; every known query's tokens are
        its table row (same normalization and tokenizer), so it is encoded once per distinct index."""
        if query_tokens is None:
            return self.encode_queries(query_indices, training=training)
        if query_indices is None:
            return self.encode_query_tokens(query_tokens, training=training)
        known = self.encode_queries(query_indices, training=training)
        unknown = tf.where(tf.equal(tf.cast(query_indices, tf.int64), schema.OOV_INDEX))  # [P, rank]
        encoded = self.encode_query_tokens(tf.gather_nd(query_tokens, unknown), training=training)  # [P, d]
        return tf.tensor_scatter_nd_update(known, unknown, tf.cast(encoded, known.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_items=self.num_items, num_queries=self.num_queries, num_tokens=self.num_tokens,
            title_length=self.title_length, query_length=self.query_length, image_dim=self.image_dim,
            attribute_vocab_sizes=list(self.attribute_vocab_sizes), channels=list(self.channels),
            dim=self.dim, token_dim=self.token_dim, dropout=self.dropout, missing_image=self.missing_image,
        )
        return config
