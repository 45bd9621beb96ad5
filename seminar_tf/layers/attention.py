"""Multi-head target attention shared by PSU, GSU and ESU, and the GSU's top-K helpers.

Paper (one formula for the three units, superscript PSU/GSU/ESU):
    α_h = (q_t W_h^Q)(K W_h^K)^T / √d_k,   head_h = softmax(α_h) (V W_h^V),
    output = Concat(head_1, …, head_H) W^O.
The GSU ranks the L history pairs by the head-averaged α and keeps the top K for the ESU.
"""

from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

_PACKAGE = "seminar_tf"


def _near_identity(shape, dtype=None):
    """[d, H, d] kernels whose every head starts as I_d plus small noise, so α_h starts as q·k / √d (a plain
    dot-product search, SIM soft) and the heads still differ."""
    dtype = dtype or tf.float32
    eye = tf.eye(shape[0], shape[2], dtype=dtype)[:, None, :]
    noise = tf.keras.initializers.GlorotUniform()(shape, dtype=dtype) * 0.1
    return eye + noise


def _masked_value(dtype: tf.DType) -> float:
    # Half the dtype's minimum: far below any real logit, yet subtracting a logit cannot overflow to -inf.
    return dtype.min / 2


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class MultiHeadTargetAttention(tf.keras.layers.Layer):
    """Multi-head target attention: α_h = (q_t W_h^Q)(K W_h^K)^T / √key_dim (paper α_h^PSU/GSU/ESU).

    head_h = softmax_L(α_h) (V W_h^V) and output = Concat(head_1..head_H) W^O. The projections have no
    bias, as in the paper, so the head-averaged score is linear in each key: ``scores(q, K) = K u`` with
    ``u = folded_query(q)`` (what product quantization folds into the target side, docs/design.md §5).

    Masking: positions with ``mask`` False get the logit ``dtype.min / 2`` and softmax weight exactly 0,
    so padding never changes an output (padded positions must hold finite values). A row with no valid
    position (empty history) outputs zeros, with finite gradients.

    Inputs:
      query: [B, d_q] (one target per row) or [B, N, d_q] (N candidate targets sharing one history).
      keys: [B, L, d_k]; values: [B, L, d_v] (default: keys); mask: bool [B, L] (default: all valid).
    Output: [B, output_dim] or [B, N, output_dim]; with ``return_scores=True`` also the raw logits
      α [B, H, L] or [B, N, H, L] (masked positions = dtype.min / 2).

    ``key_input_dim`` / ``value_input_dim`` default to the query's and the keys' last dimension; set them
    when keys or values live in a space of another width than the query.

    Example:

    ```python
    attention = MultiHeadTargetAttention(num_heads=2, key_dim=16, output_dim=32)
    target = tf.random.normal([8, 32])                  # q_t [B, d]
    history = tf.random.normal([8, 100, 32])            # K [B, L, d]
    mask = tf.sequence_mask([100, 40, 0, 7, 1, 2, 3, 4], 100)
    interest = attention(target, keys=history, mask=mask)     # [8, 32]; row 2 (empty) is zeros
    gsu_scores = attention.scores(target, history, mask)      # [8, 100]
    indices, valid = top_k_positions(gsu_scores, mask, k=10)  # [8, 10] each
    esu_keys = gather_positions(history, indices)             # [8, 10, 32]
    ```
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        output_dim: int,
        dropout: float = 0.0,
        value_dim: Optional[int] = None,
        key_input_dim: Optional[int] = None,
        value_input_dim: Optional[int] = None,
        identity_init: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.identity_init = bool(identity_init)
        self.num_heads = int(num_heads)
        self.key_dim = int(key_dim)
        self.output_dim = int(output_dim)
        self.dropout = float(dropout)
        self.value_dim = int(value_dim) if value_dim is not None else self.key_dim
        self.key_input_dim = int(key_input_dim) if key_input_dim is not None else None
        self.value_input_dim = int(value_input_dim) if value_input_dim is not None else None
        self.dropout_layer = tf.keras.layers.Dropout(self.dropout)

    def build(self, query_shape):
        query_dim = tf.TensorShape(query_shape)[-1]
        if query_dim is None:
            raise ValueError(f"MultiHeadTargetAttention needs a known query width, got shape {query_shape}")
        query_dim = int(query_dim)
        key_dim_in = self.key_input_dim or query_dim
        value_dim_in = self.value_input_dim or key_dim_in
        heads = self.num_heads
        scoring = "glorot_uniform"
        if self.identity_init:
            if not query_dim == key_dim_in == self.key_dim:
                raise ValueError(f"identity_init needs query, key input and key_dim of one width, got {query_dim}, "
                                 f"{key_dim_in} and {self.key_dim}")
            scoring = _near_identity
        self.query_kernel = self.add_weight("query_kernel", shape=[query_dim, heads, self.key_dim], initializer=scoring)
        self.key_kernel = self.add_weight("key_kernel", shape=[key_dim_in, heads, self.key_dim], initializer=scoring)
        self.value_kernel = self.add_weight(
            "value_kernel", shape=[value_dim_in, heads, self.value_dim], initializer="glorot_uniform"
        )
        self.output_kernel = self.add_weight(
            "output_kernel", shape=[heads, self.value_dim, self.output_dim], initializer="glorot_uniform"
        )
        super().build(query_shape)

    def compute_mask(self, inputs, mask=None):
        # ``mask`` here is the history mask argument, not a Keras mask to carry over to the output.
        return None

    # ----------------------------------------------------------------------------------------------------
    def _ensure_built(self, query):
        if not self.built:
            with tf.init_scope():
                self.build(query.shape)

    def _prepare(self, query, keys, mask):
        """Casts inputs; query → [B, N, d_q], mask → bool [B, L] or None; returns them and ``single``."""
        query = tf.cast(query, self.compute_dtype)
        keys = tf.cast(keys, self.compute_dtype)
        single = query.shape.rank == 2
        if single:
            query = query[:, None, :]
        elif query.shape.rank != 3:
            raise ValueError(f"MultiHeadTargetAttention query must be [B, d] or [B, N, d], got {query.shape}")
        if keys.shape.rank != 3:
            raise ValueError(f"MultiHeadTargetAttention keys must be [B, L, d], got {keys.shape}")
        if mask is not None:
            mask = tf.cast(mask, tf.bool)
        return query, keys, mask, single

    def _kernel(self, variable):
        return tf.cast(variable, self.compute_dtype)

    def _folded_heads(self, query):
        """u_h = W_h^K (q W_h^Q)^T / √key_dim per head, so that α_h = K u_h.

        query [B, N, d_q] → [B, N, H, d_k_in] (d_k_in: the keys' input width).
        """
        projected_query = tf.einsum("bnd,dhk->bnhk", query, self._kernel(self.query_kernel))
        scale = tf.cast(1.0 / math.sqrt(self.key_dim), query.dtype)
        return tf.einsum("bnhk,ehk->bnhe", projected_query, self._kernel(self.key_kernel)) * scale

    def _head_logits(self, query, keys):
        """Unmasked α: query [B, N, d_q], keys [B, L, d_k] → [B, N, H, L].

        α_h = (q W_h^Q)(K W_h^K)^T / √d_k computed as K u_h (``_folded_heads``): one [N·H, d_k] x [d_k, L] matmul
        per row, without the [B, L, H, k] projected keys (L·d_k·H·k fewer multiply-adds; at the ESU's serving
        shapes, N·H = 2 query rows against K = 64 keys, the projection was most of the attention's cost).
        """
        folded = self._folded_heads(query)
        batch, n = tf.shape(folded)[0], tf.shape(folded)[1]
        logits = tf.matmul(tf.reshape(folded, [batch, n * self.num_heads, -1]), keys, transpose_b=True)
        return tf.reshape(logits, [batch, n, self.num_heads, tf.shape(keys)[1]])

    def call(self, query, keys, values=None, mask=None, return_scores=False, training=None):
        query, keys, mask, single = self._prepare(query, keys, mask)
        values = keys if values is None else tf.cast(values, self.compute_dtype)
        logits = self._head_logits(query, keys)  # [B, N, H, L]
        if mask is not None:
            logits = tf.where(mask[:, None, None, :], logits, _masked_value(logits.dtype))
        weights = self.dropout_layer(tf.nn.softmax(logits, axis=-1), training=training)
        # head_h = softmax(α_h) (V W_h^V) = (softmax(α_h) V) W_h^V: pool the raw values first, project N·H rows.
        batch, n, length = tf.shape(weights)[0], tf.shape(weights)[1], tf.shape(weights)[3]
        pooled = tf.matmul(tf.reshape(weights, [batch, n * self.num_heads, length]), values)  # [B, N·H, d_v_in]
        pooled = tf.reshape(pooled, [batch, n, self.num_heads, tf.shape(values)[-1]])
        heads = tf.einsum("bnhe,ehv->bnhv", pooled, self._kernel(self.value_kernel))  # [B, N, H, d_v]
        output = tf.einsum("bnhv,hvo->bno", heads, self._kernel(self.output_kernel))  # [B, N, output_dim]
        if mask is not None:
            # A fully masked row has a uniform softmax over padding; its output is defined as zeros.
            has_history = tf.cast(tf.reduce_any(mask, axis=-1), output.dtype)
            output = output * has_history[:, None, None]
        if not return_scores:
            return output[:, 0] if single else output
        if single:
            output, logits = output[:, 0], logits[:, 0]
        return output, logits

    def gated_call(self, query, channels, gamma, mask=None, training=None):
        """Attention over keys = values = Σ_j γ_{n,j} x_l^(j), one gate per target, without building them.

        The GSU of SEMINAR (head^{GSU_h} = Attention_h(q_t, K^GSU, V^GSU)) with N targets per history, each
        merging the history channels with its own γ: α_{n,h,l} = Σ_j γ_{n,j} u_{n,h}·x_l^(j) with
        u_{n,h} = W_h^K (q_n W_h^Q)^T / √key_dim, and the value read-out Σ_j γ_{n,j} Σ_l w_{n,h,l} x_l^(j),
        so the cost is linear in N·L·C and no [N, L, d] key tensor is materialised (``factored_call``).

        query [B, N, d_q]; channels [B, L, C, d_k]; gamma [B, N, C]; mask bool [B, L].
        Returns (output [B, N, output_dim], head-averaged logits [B, N, L]; masked = dtype.min / 2).
        Equals ``call(query_n, Σ_j γ_{n,j} channels_j, mask)`` for each target n.
        """
        channels = tf.cast(channels, self.compute_dtype)
        gamma = tf.cast(gamma, self.compute_dtype)

        def head_logits(folded):
            return tf.einsum("bnhlj,bnj->bnhl", tf.einsum("blje,bnhe->bnhlj", channels, folded), gamma)

        def pool(weights):
            return tf.einsum("bnhje,bnj->bnhe", tf.einsum("bnhl,blje->bnhje", weights, channels), gamma)

        return self.factored_call(query, head_logits, pool, mask, training=training)

    def factored_call(self, query, head_logits, pool, mask=None, training=None):
        """Attention whose keys = values v_l are reached only through two linear maps, never materialised.

        α_{n,h,l} = v_l·u_{n,h} with u_{n,h} = W_h^K (q_n W_h^Q)^T / √key_dim: ``head_logits(u [B, N, H, d_k_in])``
        → α [B, N, H, L]; the value read-out Σ_l softmax(α_h)_l v_l: ``pool(weights [B, N, H, L])`` →
        [B, N, H, d_v_in]; then W_h^V and W^O as in ``call`` (head_h = (softmax(α_h) V) W_h^V). ``gated_call``
        passes per-target gated channels; SEMINAR's GSU passes the history's distinct entries, so its read-out
        over L steps needs no [B, L, d] keys (``retrievers.entry_attention``).

        query [B, N, d_q]; mask bool [B, L]. Returns (output [B, N, output_dim], head-averaged logits [B, N, L];
        masked = dtype.min / 2).
        """
        self._ensure_built(query)
        query = tf.cast(query, self.compute_dtype)
        logits = head_logits(self._folded_heads(query))  # [B, N, H, L]
        if mask is not None:
            mask = tf.cast(mask, tf.bool)
            logits = tf.where(mask[:, None, None, :], logits, _masked_value(logits.dtype))
        weights = self.dropout_layer(tf.nn.softmax(logits, axis=-1), training=training)
        heads = tf.einsum("bnhe,ehv->bnhv", pool(weights), self._kernel(self.value_kernel))
        output = tf.einsum("bnhv,hvo->bno", heads, self._kernel(self.output_kernel))
        averaged = tf.reduce_mean(logits, axis=2)
        if mask is not None:
            output = output * tf.cast(tf.reduce_any(mask, axis=-1), output.dtype)[:, None, None]
            averaged = tf.where(mask[:, None, :], averaged, _masked_value(averaged.dtype))
        return output, averaged

    def scores(self, query, keys, mask=None):
        """Head-averaged logits (1/H) Σ_h α_h: the GSU relevance of each history position.

        query [B, d_q] or [B, N, d_q], keys [B, L, d_k], mask bool [B, L] → [B, L] or [B, N, L]
        (masked positions = dtype.min / 2).
        """
        self._ensure_built(query)
        query, keys, mask, single = self._prepare(query, keys, mask)
        averaged = tf.reduce_mean(self._head_logits(query, keys), axis=2)  # [B, N, L]
        if mask is not None:
            averaged = tf.where(mask[:, None, :], averaged, _masked_value(averaged.dtype))
        return averaged[:, 0] if single else averaged

    def folded_query(self, query):
        """u = (1/H) Σ_h W_h^K (q W_h^Q)^T / √key_dim, so that ``scores(q, K) == K u`` (before masking).

        query [B, d_q] or [B, N, d_q] → u [B, d_k] or [B, N, d_k]. The target-side vector that product
        quantization scores stored key embeddings against (docs/design.md §5).
        """
        self._ensure_built(query)
        query = tf.cast(query, self.compute_dtype)
        projected_query = tf.einsum("...d,dhk->...hk", query, self._kernel(self.query_kernel))
        scale = tf.cast(1.0 / (self.num_heads * math.sqrt(self.key_dim)), query.dtype)
        return tf.einsum("...hk,ehk->...e", projected_query, self._kernel(self.key_kernel)) * scale

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            key_dim=self.key_dim,
            output_dim=self.output_dim,
            dropout=self.dropout,
            value_dim=self.value_dim,
            key_input_dim=self.key_input_dim,
            value_input_dim=self.value_input_dim,
            identity_init=self.identity_init,
        )
        return config


_FILTERED_TOP_K_FACTOR = 16  # rows of at least this many times k positions take the filtered top-k


def _filtered_top_k(ranked, k: int):
    """``tf.math.top_k(ranked, k).indices`` (same order, ties to the lower position), faster for long rows.

    Split the first ⌊L/2k⌋·2k positions of each row into 2k strided groups (position mod 2k); the k-th largest
    group maximum t is a lower bound of the row's k-th largest value (k groups each hold an element ≥ t), so
    only the elements ≥ t (typically about 1.5k of 10^4) enter the final top-k, in position order. Strided
    groups need no padding copy and reduce over the outer axis. About 1.4× faster than one top-k at L=10^4,
    k=64 (``_FILTERED_TOP_K_FACTOR`` keeps shorter rows on the plain top-k).
    """
    rows, length = tf.shape(ranked)[0], tf.shape(ranked)[1]
    groups = 2 * k
    depth = length // groups
    maxima = tf.reduce_max(tf.reshape(ranked[:, : depth * groups], [rows, depth, groups]), axis=1)  # [rows, 2k]
    bound = tf.reduce_min(tf.math.top_k(maxima, k=k, sorted=False).values, axis=-1, keepdims=True)
    where = tf.where(ranked >= bound)  # [P, 2], row-major: position order within a row
    row_ids, nrows = where[:, 0], tf.cast(rows, tf.int64)
    values = tf.RaggedTensor.from_value_rowids(tf.gather_nd(ranked, where), row_ids, nrows=nrows)
    columns = tf.RaggedTensor.from_value_rowids(tf.cast(where[:, 1], tf.int32), row_ids, nrows=nrows)
    _, local = tf.math.top_k(values.to_tensor(default_value=-math.inf), k=k, sorted=True)
    return tf.gather(columns.to_tensor(default_value=0), local, batch_dims=1)


def top_k_positions(scores, mask, k: int):
    """The k best unmasked history positions per row (the GSU's TopK).

    scores: float [B, L]; mask: bool [B, L] or None (all valid: the caller has already pushed masked positions
    below every real score and checks the returned positions itself); k: int (may exceed L or the number of
    valid positions). Returns (indices int32 [B, k], valid bool [B, k]), best first, ties to the lower
    position. Slots past the valid positions have valid = False and index 0, a safe index for
    ``gather_positions`` whose result the caller masks with ``valid``. Needs L ≥ 1.
    """
    scores = tf.convert_to_tensor(scores)
    if not scores.dtype.is_floating:
        scores = tf.cast(scores, tf.float32)
    k = int(k)
    ranked = scores if mask is None else tf.where(tf.cast(mask, tf.bool), scores,
                                                   tf.constant(-math.inf, scores.dtype))
    missing = tf.maximum(k - tf.shape(scores)[1], 0)  # k > L: pad with invalid slots
    ranked = tf.pad(ranked, [[0, 0], [0, missing]], constant_values=-math.inf)
    length = tf.shape(ranked)[1]
    indices = tf.cond(length >= _FILTERED_TOP_K_FACTOR * k, lambda: _filtered_top_k(ranked, k),
                      lambda: tf.math.top_k(ranked, k=k, sorted=True).indices)
    if mask is None:
        valid = indices < tf.shape(scores)[1]
    else:
        padded_mask = tf.pad(tf.cast(mask, tf.bool), [[0, 0], [0, missing]], constant_values=False)
        valid = tf.gather(padded_mask, indices, batch_dims=1)
    indices = tf.where(valid, indices, tf.zeros_like(indices))
    return indices, valid


def gather_positions(tensor, indices):
    """Rows of each batch element at the given positions: tensor [B, L, ...], indices [B, k] → [B, k, ...]."""
    return tf.gather(tensor, indices, batch_dims=1)
