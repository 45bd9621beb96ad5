"""EM3 components (docs/design.md §4): Fusion-Q-Former item embedding and LoRA adapters for the content encoders.

- ``FusionQFormer``: learnable query tokens read the modality tokens of an item by cross-attention, then
  attend to each other (transformer block); the output is a fixed-length item embedding whatever the
  number of modalities: [..., M, d_in] → [..., num_queries, dim] (and the pooled [..., dim]).
- ``LoRADense``: y = φ(x W + b + (α/r) x A B) around a frozen ``Dense`` (W, b); A [d_in, r] random,
  B [r, d_out] zeros, so at initialisation the adapter is exactly the frozen base layer.
- ``apply_lora`` / ``merge_lora``: place adapters on every Dense of named sub-layers of a built layer (the
  content encoders, which run over the long history), and fold them back for export.

Layers here import neither ``seminar_tf.config`` nor ``seminar_tf.models``.
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence

import tensorflow as tf

from seminar_tf.config import CONTENT_ENCODER_NAMES
from seminar_tf.layers.encoders import TransformerBlock

_PACKAGE = "seminar_tf"
LOG = logging.getLogger("seminar_tf")

# CONTENT_ENCODER_NAMES: sub-layers of ``ContentEncoder`` that ``apply_lora`` adapts by default (those that exist
# are used); defined in the config module, where ModelConfig.validate checks lora_targets against them.


def _masked_value(dtype: tf.DType) -> float:
    return dtype.min / 2


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class QueryCrossAttention(tf.keras.layers.Layer):
    """Multi-head cross-attention of S query tokens over M context tokens (Q-Former's cross-attention).

    α_h = (X W_h^Q)(C W_h^K)^T / √(dim/H), out = Concat_h(softmax(α_h) C W_h^V) W^O.
    Inputs: queries [B, S, dim], context [B, M, d_c], mask bool [B, M] (optional). Output [B, S, dim];
    a row whose context is fully masked outputs zeros. Sub-layers are plain ``Dense`` layers created in
    ``__init__`` (a tf.keras ``MultiHeadAttention`` built inside ``build()`` does not survive a SavedModel
    reload).

    Example:

    ```python
    attention = QueryCrossAttention(num_heads=2, dim=16)
    out = attention(tf.zeros([4, 3, 16]), tf.random.normal([4, 5, 8]))  # [4, 3, 16]
    ```
    """

    def __init__(self, num_heads: int, dim: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.dim = int(dim)
        self.dropout = float(dropout)
        if self.dim % self.num_heads:
            raise ValueError(f"QueryCrossAttention dim {self.dim} is not divisible by num_heads {self.num_heads}")
        self.query = tf.keras.layers.Dense(self.dim, name="query")
        self.key = tf.keras.layers.Dense(self.dim, name="key")
        self.value = tf.keras.layers.Dense(self.dim, name="value")
        self.attention_output = tf.keras.layers.Dense(self.dim, name="attention_output")
        self.dropout_layer = tf.keras.layers.Dropout(self.dropout)

    def _split_heads(self, tokens):
        batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
        tokens = tf.reshape(tokens, [batch, length, self.num_heads, self.dim // self.num_heads])
        return tf.transpose(tokens, [0, 2, 1, 3])  # [B, H, S, dim / H]

    def call(self, queries, context, mask=None, training=None):
        query = self._split_heads(self.query(queries))
        key, value = self._split_heads(self.key(context)), self._split_heads(self.value(context))
        scale = tf.cast(1.0 / math.sqrt(self.dim // self.num_heads), query.dtype)
        logits = tf.matmul(query, key, transpose_b=True) * scale  # [B, H, S, M]
        if mask is not None:
            mask = tf.cast(mask, tf.bool)
            logits = tf.where(mask[:, None, None, :], logits, _masked_value(logits.dtype))
        weights = self.dropout_layer(tf.nn.softmax(logits, axis=-1), training=training)
        heads = tf.transpose(tf.matmul(weights, value), [0, 2, 1, 3])  # [B, S, H, dim / H]
        output = self.attention_output(tf.reshape(heads, [tf.shape(queries)[0], tf.shape(queries)[1], self.dim]))
        if mask is not None:
            output = output * tf.cast(tf.reduce_any(mask, axis=-1), output.dtype)[:, None, None]
        return output

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, dim=self.dim, dropout=self.dropout)
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class FusionQFormer(tf.keras.layers.Layer):
    """Fusion-Q-Former (EM3): learnable queries + transformer over modality tokens → fixed-length item embedding.

    Z⁰ = learnable query tokens [num_queries, dim]; for each of ``num_layers`` layers
    Z ← Z + CrossAttn(LN(Z), modality tokens), then Z ← TransformerBlock(Z) (self-attention among the
    queries + MLP, pre-norm); output LN(Z) [..., num_queries, dim] and its mean over the queries [..., dim].

    Inputs: modality tokens [..., M, d_in] (e.g. the text / image channels of each item), optional mask
    bool [..., M] (absent modalities). Outputs: (tokens [..., num_queries, dim], pooled [..., dim]).

    Example:

    ```python
    fusion = FusionQFormer(num_queries=2, num_layers=1, num_heads=2, dim=16)
    tokens, pooled = fusion(tf.random.normal([8, 50, 3, 16]))  # [8, 50, 2, 16], [8, 50, 16]
    ```
    """

    def __init__(
        self,
        num_queries: int,
        num_layers: int,
        num_heads: int,
        dim: int,
        mlp_dim: Optional[int] = None,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_queries < 1 or num_layers < 1:
            raise ValueError(f"FusionQFormer needs num_queries >= 1 and num_layers >= 1, got "
                             f"{num_queries}, {num_layers}")
        self.num_queries = int(num_queries)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.dim = int(dim)
        self.mlp_dim = int(mlp_dim) if mlp_dim is not None else 2 * self.dim
        self.dropout = float(dropout)
        self.query_tokens = self.add_weight(
            name="query_tokens", shape=[self.num_queries, self.dim],
            initializer=tf.keras.initializers.RandomNormal(stddev=0.02), trainable=True)
        self.cross_norms = [tf.keras.layers.LayerNormalization(epsilon=1e-6, name=f"cross_norm_{i}")
                            for i in range(self.num_layers)]
        self.cross_attentions = [QueryCrossAttention(self.num_heads, self.dim, self.dropout, name=f"cross_{i}")
                                 for i in range(self.num_layers)]
        self.blocks = [TransformerBlock(self.num_heads, self.mlp_dim, self.dropout, name=f"block_{i}")
                       for i in range(self.num_layers)]
        self.final_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")
        self.dropout_layer = tf.keras.layers.Dropout(self.dropout)

    def call(self, modality_tokens, mask=None, training=None):
        modality_tokens = tf.cast(modality_tokens, self.compute_dtype)
        leading = tf.shape(modality_tokens)[:-2]
        num_modalities, width = tf.shape(modality_tokens)[-2], modality_tokens.shape[-1]
        context = tf.reshape(modality_tokens, [-1, num_modalities, width])
        if mask is not None:
            mask = tf.reshape(tf.cast(mask, tf.bool), [-1, num_modalities])
        queries = tf.tile(tf.cast(self.query_tokens, context.dtype)[None], [tf.shape(context)[0], 1, 1])
        for norm, cross, block in zip(self.cross_norms, self.cross_attentions, self.blocks):
            attended = cross(norm(queries), context, mask=mask, training=training)
            queries = block(queries + self.dropout_layer(attended, training=training), training=training)
        queries = self.final_norm(queries)
        tokens = tf.reshape(queries, tf.concat([leading, [self.num_queries, self.dim]], axis=0))
        return tokens, tf.reduce_mean(tokens, axis=-2)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        config = super().get_config()
        config.update(num_queries=self.num_queries, num_layers=self.num_layers, num_heads=self.num_heads,
                      dim=self.dim, mlp_dim=self.mlp_dim, dropout=self.dropout)
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class LoRADense(tf.keras.layers.Layer):
    """Low-rank adapter around a frozen ``Dense``: y = φ(x W + b + (α/r) · x A B) (LoRA, Hu et al. 2021).

    W, b (and φ, the base's activation) come from ``base``, which is set non-trainable; A [d_in, r] is
    random (He-uniform), B [r, d_out] zeros, so the layer starts as exactly the base layer and only A, B
    train. ``alpha`` defaults to ``rank`` (scale 1). ``merged_kernel()`` gives W + (α/r) A B for export.

    Input [..., d_in] → output [..., d_out], as the base layer.

    Example:

    ```python
    dense = tf.keras.layers.Dense(16)
    dense.build([None, 8])
    adapted = LoRADense(dense, rank=4)
    y = adapted(tf.ones([2, 8]))          # == dense(tf.ones([2, 8])) at initialisation
    adapted.trainable_weights             # [lora_a, lora_b]
    ```
    """

    def __init__(self, base: tf.keras.layers.Dense, rank: int, alpha: Optional[float] = None, **kwargs):
        if not isinstance(base, tf.keras.layers.Dense):
            raise TypeError(f"LoRADense wraps a tf.keras.layers.Dense, got {type(base).__name__}")
        if int(rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        kwargs.setdefault("name", f"{base.name}_lora")
        super().__init__(**kwargs)
        self.base = base
        self.base.trainable = False
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(self.rank)
        self.scale = self.alpha / self.rank

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        if not self.base.built:
            self.base.build(input_shape)
        input_dim, output_dim = self.base.kernel.shape
        self.lora_a = self.add_weight(name="lora_a", shape=[int(input_dim), self.rank],
                                      initializer="he_uniform", trainable=True)
        self.lora_b = self.add_weight(name="lora_b", shape=[self.rank, int(output_dim)],
                                      initializer="zeros", trainable=True)
        super().build(input_shape)

    def _delta(self, dtype):
        return tf.cast(self.scale, dtype) * tf.matmul(tf.cast(self.lora_a, dtype), tf.cast(self.lora_b, dtype))

    def merged_kernel(self) -> tf.Tensor:
        """W + (α/r) A B [d_in, d_out]: the kernel of a plain Dense that computes the same function."""
        return tf.convert_to_tensor(self.base.kernel) + self._delta(self.base.kernel.dtype)

    def call(self, inputs):
        inputs = tf.cast(inputs, self.compute_dtype)
        kernel = tf.cast(self.base.kernel, self.compute_dtype)
        # The frozen product exactly as Dense computes it (matmul, or tensordot beyond rank 2): with B = 0 the
        # layer is then bit-for-bit the base layer on every CPU kernel path.
        rank = inputs.shape.rank
        outputs = tf.matmul(inputs, kernel) if rank in (None, 2) else tf.tensordot(inputs, kernel, [[rank - 1], [0]])
        # The low-rank path goes through r (x A then · B), never through a d_in × d_out update.
        low_rank = tf.einsum("...r,ro->...o", tf.einsum("...i,ir->...r", inputs, tf.cast(self.lora_a, inputs.dtype)),
                             tf.cast(self.lora_b, inputs.dtype))
        outputs = outputs + tf.cast(self.scale, inputs.dtype) * low_rank
        if self.base.use_bias:
            outputs = outputs + tf.cast(self.base.bias, outputs.dtype)
        if self.base.activation is not None:
            outputs = self.base.activation(outputs)
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(base=tf.keras.layers.serialize(self.base), rank=self.rank, alpha=self.alpha)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        base = tf.keras.layers.deserialize(config.pop("base"))
        return cls(base, **config)


def _resolve(layer: tf.keras.layers.Layer, path: str):
    """(parent, attribute name, object) of a '/'-separated attribute path below ``layer``."""
    parent, obj, name = None, layer, ""
    for name in path.split("/"):
        if not hasattr(obj, name):
            raise ValueError(f"apply_lora target {path!r}: {type(obj).__name__} has no attribute {name!r}")
        parent, obj = obj, getattr(obj, name)
    return parent, name, obj


def _wrap(parent, name: str, dense, rank: int, alpha: Optional[float]) -> "LoRADense":
    if not dense.built:
        raise ValueError(f"apply_lora: Dense {dense.name!r} is not built; call the layer once before apply_lora")
    adapter = LoRADense(dense, rank, alpha)
    # Built now (weights exist before compile/restore), named beside the base kernel: ".../projection/lora_a".
    with tf.name_scope(dense.kernel.name.rsplit("/", 1)[0] + "/"):
        adapter.build(tf.TensorShape([None, dense.kernel.shape[0]]))
    setattr(parent, name, adapter)
    return adapter


def _wrap_all(obj, rank: int, alpha: Optional[float], adapters: List["LoRADense"]) -> None:
    """Wraps every Dense reachable through public attributes (and lists of layers) of ``obj``."""
    for name, value in list(vars(obj).items()):
        if name.startswith("_") or isinstance(value, LoRADense):
            continue
        if isinstance(value, tf.keras.layers.Dense):
            adapters.append(_wrap(obj, name, value, rank, alpha))
        elif isinstance(value, tf.keras.layers.Layer):
            _wrap_all(value, rank, alpha, adapters)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, tf.keras.layers.Dense) and not isinstance(item, LoRADense):
                    raise ValueError(f"apply_lora: Dense {item.name!r} sits in a list ({type(obj).__name__}."
                                     f"{name}); name it as an attribute to adapt it")
                if isinstance(item, tf.keras.layers.Layer):
                    _wrap_all(item, rank, alpha, adapters)


def _freeze_leaves(layer: tf.keras.layers.Layer) -> None:
    """Sets every leaf sub-layer (Embedding, Dense, LayerNorm…) non-trainable, LoRA adapters excepted.

    Containers stay trainable, so the adapters inside them still train (a frozen container would hide
    its children's weights).
    """
    for module in [layer] + list(layer.submodules):
        if not isinstance(module, tf.keras.layers.Layer) or isinstance(module, LoRADense):
            continue
        if not any(isinstance(child, tf.keras.layers.Layer) for child in module.submodules):
            module.trainable = False


def apply_lora(
    layer: tf.keras.layers.Layer,
    rank: int,
    alpha: Optional[float] = None,
    targets: Optional[Sequence[str]] = None,
    freeze_base: bool = True,
) -> List[LoRADense]:
    """Places ``LoRADense`` adapters on every Dense below the ``targets`` of a built ``layer``; returns them.

    Args:
      layer: e.g. a ``ContentEncoder``; it must have been called once (its Dense layers built).
      rank, alpha: LoRA rank r and scaling α (scale α/r; α defaults to r).
      targets: '/'-separated attribute paths below ``layer``: a sub-layer (every Dense inside it is adapted,
        e.g. "text_encoder") or one Dense ("image_encoder/mlp_output"). Default: the content encoders
        ``CONTENT_ENCODER_NAMES`` that ``layer`` has.
      freeze_base: make every leaf layer under the targets non-trainable, so only A and B train there.

    Restore pretrained weights *before* calling this: a wrapped Dense's variables move to
    ``<name>/base/...`` in checkpoints (rebuild → ``apply_lora`` → restore reads a LoRA run back;
    ``merge_lora`` folds the adapters into plain Dense layers again). Don't combine with a frozen container
    (``layer.trainable = False``, e.g. ``freeze_content``): that hides the adapters' weights too.
    """
    if targets is None:
        targets = [name for name in CONTENT_ENCODER_NAMES if hasattr(layer, name)]
        if not targets:
            raise ValueError(f"apply_lora: {type(layer).__name__} has none of {CONTENT_ENCODER_NAMES}; pass targets")
    adapters: List[LoRADense] = []
    for path in targets:
        parent, name, obj = _resolve(layer, path)
        if isinstance(obj, LoRADense):
            continue
        if isinstance(obj, tf.keras.layers.Dense):
            adapters.append(_wrap(parent, name, obj, rank, alpha))
            target = getattr(parent, name)
        elif isinstance(obj, tf.keras.layers.Layer):
            _wrap_all(obj, rank, alpha, adapters)
            target = obj
        else:
            raise ValueError(f"apply_lora target {path!r} is a {type(obj).__name__}, not a layer")
        if freeze_base:
            _freeze_leaves(target)
    if freeze_base:
        adapter_ids = {id(v) for adapter in adapters for v in (adapter.lora_a, adapter.lora_b)}
        for path in targets:
            leftover = [v.name for v in _resolve(layer, path)[2].trainable_weights if id(v) not in adapter_ids]
            if leftover:  # weights a container owns directly (the ViT's CLS / position embeddings)
                LOG.warning("apply_lora: %s keeps trainable weights outside leaf layers: %s", path, leftover)
    return adapters


def merge_lora(layer: tf.keras.layers.Layer) -> int:
    """Folds every ``LoRADense`` below ``layer`` into its base Dense (W ← W + (α/r) A B) and puts the base
    back in its place (its trainable flag as the adapter left it); returns how many were merged. Outputs are
    unchanged."""
    merged = 0
    for module in [layer] + list(layer.submodules):
        if not isinstance(module, tf.keras.layers.Layer):
            continue
        for name, value in list(vars(module).items()):
            if not name.startswith("_") and isinstance(value, LoRADense):
                value.base.kernel.assign(value.merged_kernel())
                setattr(module, name, value.base)
                merged += 1
    return merged
