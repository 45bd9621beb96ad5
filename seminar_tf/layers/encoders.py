"""Channel encoders of SEMINAR (paper §PSU; docs/design.md §4): text/query, image and attribute encoders.

Each encoder maps one channel's raw features to a d-dimensional vector; the final projection is the
paper's per-channel matrix W_m in x = [Q W_q, T W_t, I W_i, A W_a] ∈ R^{(M+1)×L×d}.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import tensorflow as tf

from seminar_tf import schema

_PACKAGE = "seminar_tf"


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class TextEncoder(tf.keras.layers.Layer):
    """Bag-of-tokens text encoder: masked mean of token embeddings, then the projection W.

    Used for the query encoder f(·) (Q = f(x^query) W_q) and for the title encoder
    (T = Encoder_text(x^text) W_t). Token id ``schema.PAD_INDEX`` (0) is padding and is left out of the
    mean; a row made only of padding (an empty query) gives the zero vector. The projection has no bias,
    as W_m in the paper, so that zero vector stays zero.

    Input: int token ids [..., T]. Output: float [..., output_dim].

    Example:

    ```python
    encoder = TextEncoder(vocab_size=1000, embedding_dim=32, output_dim=64)
    titles = encoder(tf.constant([[5, 7, 0, 0], [0, 0, 0, 0]]))  # [2, 64]; row 1 is all zeros
    ```
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        output_dim: int,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = int(vocab_size)
        self.embedding_dim = int(embedding_dim)
        self.output_dim = int(output_dim)
        self.dropout = float(dropout)
        self.token_embedding = tf.keras.layers.Embedding(
            self.vocab_size, self.embedding_dim, name="token_embedding"
        )
        self.dropout_layer = tf.keras.layers.Dropout(self.dropout)
        self.projection = tf.keras.layers.Dense(self.output_dim, use_bias=False, name="projection")

    def call(self, token_ids, training=None):
        token_ids = tf.convert_to_tensor(token_ids)
        if not self.token_embedding.built:
            self.token_embedding.build(token_ids.shape)
        # The masked mean as one sparse x dense product: bag [R, V] holds 1/count at (row, token) for each real
        # token, so no [..., T, E] tensor is built and the embedding's gradient is bag^T x grad, a dense [V, E]
        # (not one row per token occurrence for the optimizer to de-duplicate: a batch's histories repeat tokens).
        rows = tf.reshape(token_ids, [-1, tf.shape(token_ids)[-1]])
        real = tf.where(tf.not_equal(rows, schema.PAD_INDEX))  # [P, 2]: (row, slot), row-major
        tokens = tf.cast(tf.gather_nd(rows, real), tf.int64)
        num_rows = tf.shape(rows, out_type=tf.int64)[0]
        count = tf.math.unsorted_segment_sum(tf.ones_like(real[:, 0], self.compute_dtype), real[:, 0], num_rows)
        # reciprocal_no_nan: an all-padding row has no entry in the bag → the zero vector, not NaN.
        weights = tf.gather(tf.math.reciprocal_no_nan(count), real[:, 0])
        bag = tf.SparseTensor(tf.stack([real[:, 0], tokens], axis=1), weights,
                              tf.stack([num_rows, tf.constant(self.vocab_size, tf.int64)]))
        pooled = tf.sparse.sparse_dense_matmul(bag, tf.cast(self.token_embedding.embeddings, self.compute_dtype))
        pooled = tf.reshape(pooled, tf.concat([tf.shape(token_ids)[:-1], [self.embedding_dim]], 0))
        pooled = self.dropout_layer(pooled, training=training)
        return self.projection(pooled)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            embedding_dim=self.embedding_dim,
            output_dim=self.output_dim,
            dropout=self.dropout,
        )
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class TransformerBlock(tf.keras.layers.Layer):
    """Pre-norm transformer encoder block: x + MHA(LN(x)), then x + MLP(LN(x)) (MLP: gelu, mlp_dim).

    Input and output: [B, S, width]. Used by the ViT of ``ImageEncoder``.

    Example:

    ```python
    block = TransformerBlock(num_heads=2, mlp_dim=128)
    tokens = block(tf.zeros([4, 17, 64]))  # [4, 17, 64]
    ```
    """

    def __init__(self, num_heads: int, mlp_dim: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout = float(dropout)

    def build(self, input_shape):
        width = int(input_shape[-1])
        if width % self.num_heads:
            raise ValueError(f"TransformerBlock width {width} is not divisible by num_heads {self.num_heads}")
        self.width = width
        # Self-attention from plain Dense layers: a tf.keras MultiHeadAttention created inside a custom
        # layer's build() is not restored by tf.keras.models.load_model from a SavedModel (its weights come
        # back freshly initialised), which the export path would hit.
        self.attention_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="attention_norm")
        self.query = tf.keras.layers.Dense(width, name="query")
        self.key = tf.keras.layers.Dense(width, name="key")
        self.value = tf.keras.layers.Dense(width, name="value")
        self.attention_output = tf.keras.layers.Dense(width, name="attention_output")
        self.mlp_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="mlp_norm")
        self.mlp_hidden = tf.keras.layers.Dense(self.mlp_dim, activation="gelu", name="mlp_hidden")
        self.mlp_output = tf.keras.layers.Dense(width, name="mlp_output")
        self.dropout_layer = tf.keras.layers.Dropout(self.dropout)
        super().build(input_shape)

    def _split_heads(self, tokens):
        batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
        tokens = tf.reshape(tokens, [batch, length, self.num_heads, self.width // self.num_heads])
        return tf.transpose(tokens, [0, 2, 1, 3])  # [B, H, S, width / H]

    def _self_attention(self, tokens, training):
        query, key, value = (self._split_heads(dense(tokens)) for dense in (self.query, self.key, self.value))
        scale = tf.cast(1.0 / math.sqrt(self.width // self.num_heads), query.dtype)
        weights = tf.nn.softmax(tf.matmul(query, key, transpose_b=True) * scale, axis=-1)
        weights = self.dropout_layer(weights, training=training)
        heads = tf.transpose(tf.matmul(weights, value), [0, 2, 1, 3])  # [B, S, H, width / H]
        heads = tf.reshape(heads, [tf.shape(tokens)[0], tf.shape(tokens)[1], self.width])
        return self.attention_output(heads)

    def call(self, tokens, training=None):
        attended = self._self_attention(self.attention_norm(tokens), training)
        tokens = tokens + self.dropout_layer(attended, training=training)
        hidden = self.mlp_hidden(self.mlp_norm(tokens))
        return tokens + self.dropout_layer(self.mlp_output(hidden), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout)
        return config


IMAGE_ENCODER_MODES = ("embedding", "pixels")


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class ImageEncoder(tf.keras.layers.Layer):
    """Image channel encoder I = Encoder_image(x^image) W_i.

    Two modes:
    - ``"embedding"``: a precomputed image embedding [..., D] (``schema.IMAGE_EMBEDDING``) → MLP
      (Dense(hidden_dim, gelu) → Dense(output_dim)) → [..., output_dim].
    - ``"pixels"``: images [..., S, S, 3] (``schema.IMAGE``; uint8 is scaled by 1/255, floats are used as
      given) → a small ViT, as in the paper: non-overlapping ``patch_size`` patches embedded by a strided
      Conv2D, a learned CLS token and learned position embeddings, ``num_layers`` pre-norm transformer
      blocks, the final CLS token layer-normalized and projected → [..., output_dim].

    Non-finite inputs are not propagated silently: with ``check_numerics=True`` (default) a NaN or Inf in
    the input raises ``tf.errors.InvalidArgumentError`` whose message names the feature
    (``image_embedding`` or ``image``). Turn it off only where the check is unsupported (e.g. XLA on TPU).

    Example:

    ```python
    from_embeddings = ImageEncoder(output_dim=64, mode="embedding")
    vectors = from_embeddings(tf.random.normal([8, 512]))  # [8, 64]
    vit = ImageEncoder(output_dim=64, mode="pixels", image_size=32, patch_size=8)
    vectors = vit(tf.zeros([8, 32, 32, 3], tf.uint8))  # [8, 64]
    ```
    """

    def __init__(
        self,
        output_dim: int,
        mode: str = "embedding",
        hidden_dim: Optional[int] = None,
        patch_size: int = 8,
        num_layers: int = 1,
        num_heads: int = 2,
        image_size: int = 32,
        dropout: float = 0.0,
        check_numerics: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in IMAGE_ENCODER_MODES:
            raise ValueError(f"ImageEncoder mode must be one of {IMAGE_ENCODER_MODES}, got {mode!r}")
        self.output_dim = int(output_dim)
        self.mode = mode
        self.hidden_dim = int(hidden_dim) if hidden_dim is not None else self.output_dim
        self.patch_size = int(patch_size)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.image_size = int(image_size)
        self.dropout = float(dropout)
        self.check_numerics = bool(check_numerics)
        if mode == "embedding":
            self.mlp_hidden = tf.keras.layers.Dense(self.hidden_dim, activation="gelu", name="mlp_hidden")
            self.mlp_output = tf.keras.layers.Dense(self.output_dim, name="mlp_output")
        else:
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"ImageEncoder image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
            self.num_patches = (self.image_size // self.patch_size) ** 2
            self.patch_embedding = tf.keras.layers.Conv2D(
                self.hidden_dim, self.patch_size, strides=self.patch_size, name="patch_embedding"
            )
            self.blocks = [
                TransformerBlock(self.num_heads, 2 * self.hidden_dim, self.dropout, name=f"block_{i}")
                for i in range(self.num_layers)
            ]
            self.final_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")
            self.projection = tf.keras.layers.Dense(self.output_dim, name="projection")

    def build(self, input_shape):
        if self.mode == "pixels":
            self.cls_token = self.add_weight(
                "cls_token", shape=[1, 1, self.hidden_dim], initializer="zeros", trainable=True
            )
            self.position_embedding = self.add_weight(
                "position_embedding",
                shape=[1, self.num_patches + 1, self.hidden_dim],
                initializer=tf.keras.initializers.RandomNormal(stddev=0.02),
                trainable=True,
            )
        super().build(input_shape)

    def call(self, inputs, training=None):
        if self.mode == "embedding":
            return self._encode_embedding(inputs)
        return self._encode_pixels(inputs, training)

    def _encode_embedding(self, image_embedding):
        image_embedding = tf.cast(image_embedding, self.compute_dtype)
        if self.check_numerics:
            image_embedding = tf.debugging.check_numerics(
                image_embedding, f"ImageEncoder input '{schema.IMAGE_EMBEDDING}' contains NaN or Inf"
            )
        return self.mlp_output(self.mlp_hidden(image_embedding))

    def _encode_pixels(self, images, training):
        images = tf.convert_to_tensor(images)
        if images.shape.rank is not None and images.shape.rank < 4:
            raise ValueError(f"ImageEncoder(mode='pixels') expects images [..., S, S, 3], got {images.shape}")
        if tuple(images.shape[-3:]) != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"ImageEncoder(mode='pixels') expects images [..., {self.image_size}, {self.image_size}, 3], "
                f"got {images.shape}"
            )
        if images.dtype == tf.uint8:
            pixels = tf.cast(images, self.compute_dtype) / 255.0
        else:
            pixels = tf.cast(images, self.compute_dtype)
            if self.check_numerics:
                pixels = tf.debugging.check_numerics(
                    pixels, f"ImageEncoder input '{schema.IMAGE}' contains NaN or Inf"
                )
        leading = tf.shape(pixels)[:-3]
        pixels = tf.reshape(pixels, [-1, self.image_size, self.image_size, 3])
        patches = self.patch_embedding(pixels)  # [N, S/p, S/p, hidden]
        patches = tf.reshape(patches, [-1, self.num_patches, self.hidden_dim])
        cls = tf.tile(tf.cast(self.cls_token, patches.dtype), [tf.shape(patches)[0], 1, 1])
        tokens = tf.concat([cls, patches], axis=1) + tf.cast(self.position_embedding, patches.dtype)
        for block in self.blocks:
            tokens = block(tokens, training=training)
        pooled = self.projection(self.final_norm(tokens[:, 0]))  # [N, output_dim]
        return tf.reshape(pooled, tf.concat([leading, [self.output_dim]], axis=0))

    def get_config(self):
        config = super().get_config()
        config.update(
            output_dim=self.output_dim,
            mode=self.mode,
            hidden_dim=self.hidden_dim,
            patch_size=self.patch_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            image_size=self.image_size,
            dropout=self.dropout,
            check_numerics=self.check_numerics,
        )
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class AttributeEncoder(tf.keras.layers.Layer):
    """Attribute encoder g(·): A = g(x^attribute) W_a.

    One embedding table per attribute column (column 0 is the item id, then e.g. author, category); the
    embeddings are concatenated and projected to ``output_dim``.

    Ids are validated (``validate_ids=True``, default): an id outside [0, vocab_sizes[a]) raises
    ``tf.errors.InvalidArgumentError`` naming the attribute index and its vocabulary size, rather than
    reading a wrong row (GPU gathers do not check bounds).

    Input: int ids [..., A] with A = len(vocab_sizes). Output: float [..., output_dim].

    Example:

    ```python
    encoder = AttributeEncoder(vocab_sizes=[1000, 50, 20], embedding_dim=16, output_dim=64)
    vectors = encoder(tf.constant([[17, 3, 2]]))  # [1, 64]
    ```
    """

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        embedding_dim: int,
        output_dim: int,
        validate_ids: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        if not self.vocab_sizes:
            raise ValueError("AttributeEncoder needs at least one attribute (the item id)")
        self.embedding_dim = int(embedding_dim)
        self.output_dim = int(output_dim)
        self.validate_ids = bool(validate_ids)
        self.embeddings = [
            tf.keras.layers.Embedding(size, self.embedding_dim, name=f"attribute_{i}_embedding")
            for i, size in enumerate(self.vocab_sizes)
        ]
        self.projection = tf.keras.layers.Dense(self.output_dim, name="projection")

    def call(self, attribute_ids):
        attribute_ids = tf.convert_to_tensor(attribute_ids)
        num_attributes = len(self.vocab_sizes)
        if attribute_ids.shape[-1] is not None and attribute_ids.shape[-1] != num_attributes:
            raise ValueError(
                f"AttributeEncoder expects ids [..., {num_attributes}] (one column per attribute), "
                f"got {attribute_ids.shape}"
            )
        embedded = []
        for index, (size, embedding) in enumerate(zip(self.vocab_sizes, self.embeddings)):
            ids = attribute_ids[..., index]
            if self.validate_ids:
                message = f"AttributeEncoder: attribute {index} id out of range [0, {size})"
                checks = [
                    tf.debugging.assert_non_negative(ids, message=message),
                    tf.debugging.assert_less(ids, tf.cast(size, ids.dtype), message=message),
                ]
                with tf.control_dependencies(checks):
                    ids = tf.identity(ids)
            embedded.append(embedding(ids))
        return self.projection(tf.concat(embedded, axis=-1))

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_sizes=list(self.vocab_sizes),
            embedding_dim=self.embedding_dim,
            output_dim=self.output_dim,
            validate_ids=self.validate_ids,
        )
        return config
