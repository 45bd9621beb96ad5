"""Retrieval as a component: the GSU step of SEMINAR and of every baseline (docs/design.md §4, §5).

A ``Retriever`` scores every history step for every target; the host model (``SeminarModel``) takes the top K
(``top_k_positions``), picks the kept steps, runs the ESU read-out and the tower. A retriever reads a
``RetrievalContext`` (the targets, the history inputs it asked for with ``history_inputs``, and the host model
for the shared parts: content encoder, G_j, GSU / ESU attention, PQ layer) and returns
(scores [B, N, L], keep bool [B, N, L] or None = keep every real step).

SEMINAR's GSU modes ("exact", "pq_adc", "pq_sdc", ``gsu_retriever``): ``ExactGSU`` is ``ProjectedGSU`` (over
the projected history) in training and ``IndexedGSU`` (from the history's ids) or ``StoredChannelGSU`` (over
stored channels, EM3's fused ones) at inference; ``PQADC`` / ``PQSDC`` score from PQ codes and may re-rank r·K
candidates exactly. Baselines (``baselines``): ``DINRetriever``, ``SIMHardRetriever``, ``SIMSoftRetriever``,
``ETARetriever``, ``TWINRetriever``, ``QINRetriever``. ``RETRIEVERS`` maps ``ModelConfig.architecture`` to its
retriever; ``build_retriever`` builds it from the config's fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import tensorflow as tf

from seminar_tf import schema
from seminar_tf.config import ARCHITECTURES, GSU_MODES, ModelConfig
from seminar_tf.layers import top_k_positions
from seminar_tf.models.psu import item_gamma

EXCLUDED = -1e9  # score of the steps a retriever does not keep (as the GSU masks padding)


@dataclasses.dataclass(frozen=True)
class RetrievalContext:
    """What a retriever may read (a plain object: Keras passes it to ``call`` untouched).

    features: the batch's features (history ids, lengths, tokens, feedback); queries, items: target indices
    [B, N]; q_t [B, N, d] and γ [B, N, C] of the targets; target: their channels before G_j x_t^{PSU}
    [B, N, C, d]; history: the history channels after G_j [B, L, C, d] and stored: before G_j, each None unless
    the retriever's ``history_inputs`` asked for it; mask: bool [B, L], the real steps; training: the call's
    flag; model: the host ``SeminarModel`` (content, projection, gate, gsu, esu, pq).
    """

    features: Dict[str, tf.Tensor]
    queries: tf.Tensor
    items: tf.Tensor
    q_t: tf.Tensor
    gamma: tf.Tensor
    mask: tf.Tensor
    model: Any
    training: Optional[bool] = None
    target: Optional[tf.Tensor] = None
    history: Optional[tf.Tensor] = None
    stored: Optional[tf.Tensor] = None


# -------------------------------------------------------------------------------------------------- math
def mask_scores(scores, mask):
    """GSU scores [B, N, L] with the positions masked out by ``mask`` [B, L] at -1e9 (no [B, N, L] select
    when every position is real, as in a serving request without padding)."""
    return tf.cond(tf.reduce_all(mask), lambda: scores,
                   lambda: tf.where(mask[:, None, :], scores, tf.constant(-1e9, scores.dtype)))


def projected_scores(attention, q_t, gamma, history):
    """(1/H) Σ_h α_h of ``attention`` for every pair, unmasked [B, N, L], over the history after G_j
    [B, L, C, d]: the folded target u = (1/H) Σ_h W_h^K (q_t W_h^Q)^T / √d, score_l = Σ_j γ_j u·x_l^{GSU(j)},
    without materialising a key matrix per target."""
    u = attention.folded_query(q_t)  # [B, N, d]
    # Fold γ into u: one [L, C·d] x [C·d, N] matmul per row instead of a [N, L, C] intermediate.
    shape = tf.shape(history)
    weights = tf.reshape(gamma[..., None] * u[:, :, None, :], [shape[0], -1, shape[2] * shape[3]])
    return tf.einsum("blk,bnk->bnl", tf.reshape(history, [shape[0], shape[1], -1]), weights)


def stored_scores(model, q_t, gamma, stored):
    """Exact GSU scores [B, N, L] (unmasked) over the stored history channels x^{PSU} [B, L, C, d]: G_j folded
    into the target too (v_j = γ_j G_j u, ``model.pq_targets``), so the L stored channels need no projection.
    One [N, C·d] x [C·d, L] matmul."""
    shape = tf.shape(stored)
    v = tf.reshape(model.pq_targets(q_t, gamma), [shape[0], -1, shape[2] * shape[3]])
    return tf.matmul(v, tf.reshape(stored, [shape[0], shape[1], -1]), transpose_b=True)


def pq_scores(model, kind, q_t, gamma, features, target):
    """GSU scores [B, N, L] (unmasked) from the history's PQ codes in ``model.pq`` ("adc" or "sdc"; SDC also
    needs the targets' stored channels ``target`` [B, N, C, d])."""
    with tf.control_dependencies([model.pq.assert_fitted()]):
        words = model.history_codes(features)
    if kind == "adc":
        return model.pq.adc_scores(model.pq_targets(q_t, gamma), words)
    return model.pq.sdc_scores(model.pq.encode(target), gamma, words, model.gsu_bilinear())


def indexed_scores(model, q_t, gamma, features):
    """Exact GSU scores [B, N, L] (unmasked) from the history's item / query indices, at inference.

    score_l = Σ_j v_j·x_l^{PSU(j)} with v_j = γ_j G_j u (``pq_targets``), split into the item channels' part and
    the query channel's part. Each is scored once per distinct item (query) of the batch and gathered back
    to the L positions (a long history repeats items and, much more, queries); unknown query text (OOV
    index with tokens) gets one row per position, encoded from its tokens. When the batch holds more
    distinct entries than L per row, that part is scored per position instead.
    """
    content = model.content
    v = model.pq_targets(q_t, gamma)  # [B, N, C, d]
    items = tf.cast(features[schema.SEQ_HISTORY_ITEM], tf.int32)
    shape = tf.shape(items)
    scores = None  # built as [B, L, N] (row gathers), transposed once at the end
    item_channels = content.item_channels
    if item_channels:
        unique, inverse = tf.unique(tf.reshape(items, [-1]), out_idx=tf.int32)

        scores = _score_rows(model, v, item_channels, tf.size(unique), inverse, shape,
                             lambda: content.encode_items_stacked(unique, training=False),
                             lambda: content.encode_items_stacked(items, training=False))
    if schema.QUERY_CHANNEL in model.channels:
        queries = tf.cast(features[schema.SEQ_HISTORY_QUERY], tf.int32)
        tokens = features.get(schema.HISTORY_QUERY_TOKENS)
        flat = tf.reshape(queries, [-1])
        unique, inverse = tf.unique(flat, out_idx=tf.int32)
        count = tf.size(unique)
        if tokens is not None:  # unknown text: one extra row per OOV position, encoded from its tokens
            unknown = tf.where(tf.equal(flat, schema.OOV_INDEX))  # [P, 1]
            inverse = tf.tensor_scatter_nd_update(
                inverse, unknown, count + tf.range(tf.shape(unknown)[0], dtype=tf.int32))
            count += tf.shape(unknown)[0]

        def distinct_queries():
            rows = content.encode_queries(unique, training=False)  # [U, d]
            if tokens is None:
                return rows
            unknown_tokens = tf.gather_nd(tf.reshape(tokens, [-1, tf.shape(tokens)[-1]]), unknown)
            return tf.concat([rows, tf.cast(content.encode_query_tokens(unknown_tokens, training=False),
                                            rows.dtype)], axis=0)

        part = _score_rows(model, v, [schema.QUERY_CHANNEL], count, inverse, shape, distinct_queries,
                           lambda: content.query_channel(queries, tokens, training=False))
        scores = part if scores is None else scores + part
    return tf.transpose(scores, [0, 2, 1])


def _score_rows(model, v, channels, count, inverse, shape, rows, per_position):
    """Σ_{j ∈ channels} v_j·x_l^{(j)} as [B, L, N] for the history positions of ``shape`` [B, L].

    ``rows()`` gives the channels of the ``count`` distinct entries [U, |channels|·d] and ``inverse`` [B·L]
    each position's entry: scored once per entry, then gathered back per position, when U ≤ L (always for one
    history); otherwise ``per_position()`` [B, L, |channels|·d] is scored directly.
    """
    batch, n = tf.shape(v)[0], tf.shape(v)[1]
    w = tf.reshape(tf.gather(v, [model.channels.index(c) for c in channels], axis=2), [batch, n, -1])

    def distinct():
        s = tf.einsum("uk,bnk->bun", rows(), w)  # [B, U, N]
        return tf.gather(s, tf.reshape(inverse, shape), batch_dims=1)  # [B, L, N]

    return tf.cond(count <= shape[1], distinct, lambda: tf.matmul(per_position(), w, transpose_b=True))


def unique_positions(indices, length):
    """Distinct (row, position) pairs of indices [B, P] into rows of ``length``: (where int64 [U, 2], inverse
    int32 [B·P] such that pair i of the flattened indices is where[inverse[i]])."""
    length = tf.cast(length, tf.int64)
    rows = tf.range(tf.shape(indices, out_type=tf.int64)[0])[:, None]
    keys = tf.reshape(rows * length + tf.cast(indices, tf.int64), [-1])
    unique, inverse = tf.unique(keys, out_idx=tf.int32)
    return tf.stack([unique // length, unique % length], axis=-1), inverse


def gather_unique(values, indices, fn):
    """fn(values at the given positions), computed once per distinct (row, position): values [B, L, ...],
    indices [B, P] → [B, P, ...] (the N targets' top-K lists of one history overlap)."""
    where, inverse = unique_positions(indices, tf.shape(values)[1])
    out = fn(tf.gather_nd(values, where))  # [U, ...]
    return tf.reshape(tf.gather(out, inverse), tf.concat([tf.shape(indices), tf.shape(out)[1:]], axis=0))


def encode_positions(model, features, indices, training=None):
    """History channels after G_j at the given positions only: indices [B, P] → [B, P, C, d], each distinct
    (row, position) encoded once (at L=10^4, N=100, K=64 about a third of the N·K positions are distinct)."""
    where, inverse = unique_positions(indices, tf.shape(features[schema.SEQ_HISTORY_ITEM])[1])

    def pick(name):
        return tf.gather_nd(features[name], where)[None]  # [1, U, ...]

    tokens = features.get(schema.HISTORY_QUERY_TOKENS)
    encoded = model.projection(model.content(
        pick(schema.SEQ_HISTORY_QUERY), pick(schema.SEQ_HISTORY_ITEM), training=training,
        query_tokens=None if tokens is None else pick(schema.HISTORY_QUERY_TOKENS)))[0]  # [U, C, d]
    return tf.reshape(tf.gather(encoded, inverse),
                      tf.concat([tf.shape(indices), tf.shape(encoded)[1:]], axis=0))


def _stored_history(model, features, training=None):
    """The history's channels before G_j x^{PSU} [B, L, C, d] (``model.pair_channels``)."""
    return model.pair_channels(features[schema.SEQ_HISTORY_QUERY], features[schema.SEQ_HISTORY_ITEM], training,
                               features.get(schema.HISTORY_QUERY_TOKENS))


# ------------------------------------------------------------------------------------------- interface
@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class Retriever(tf.keras.layers.Layer):
    """The retrieval step: ``retriever(context)`` → (scores float [B, N, L], keep bool [B, N, L] or None).

    ``keep`` None keeps every real step (the scores then already hold -1e9 at padding); otherwise the host
    keeps ``keep & mask`` and scores every other step -1e9. The host asks, in this order:
    ``history_inputs`` (what to encode before the call), the call, ``pick`` (channels after G_j of the kept
    positions), ``refine`` when ``rerank`` > 1, and ``aux_history`` for the GSU auxiliary read-out.

    ``gsu_mode``: the SEMINAR GSU mode this retriever implements (``set_gsu_mode`` replaces it), None for a
    baseline's own retrieval. ``rerank``: r, the host keeps r·K candidates before ``refine``.
    """

    gsu_mode: Optional[str] = None
    rerank: int = 1

    def history_inputs(self, model, features, training=None) -> Tuple[Optional[tf.Tensor], Optional[tf.Tensor]]:
        """(history after G_j [B, L, C, d] or None, stored channels before G_j [B, L, C, d] or None)."""
        return model.encode_history(features, training)[0], None

    def call(self, context: RetrievalContext):
        raise NotImplementedError

    def pick(self, context: RetrievalContext, positions):
        """History channels after G_j at positions [B, P] → [B, P, C, d]."""
        return tf.gather(context.history, positions, batch_dims=1)

    def refine(self, context: RetrievalContext, candidates, valid, top_k: int):
        """Re-ranks r·K candidates [B·N, rK, C, d] (``valid`` [B·N, rK]) → (local indices, valid) [B·N, K]."""
        raise NotImplementedError(f"{type(self).__name__} does not re-rank")

    def aux_history(self, context: RetrievalContext):
        """The history after G_j [B, L, C, d] the GSU auxiliary read-out attends over (training only)."""
        if context.history is not None:
            return context.history
        if context.stored is not None:
            return context.model.projection(context.stored)
        return context.model.encode_history(context.features, context.training)[0]

    @staticmethod
    def for_every_target(mask, n):
        """The history mask [B, L] as a keep mask [B, N, L]."""
        return tf.repeat(mask[:, None, :], n, axis=1)


# ------------------------------------------------------------------------------------------- SEMINAR's GSU
class _SeminarGSU(Retriever):
    """SEMINAR's GSU: (1/H) Σ_h α_h^{GSU} masked at -1e9, with the model's category prior when it has one."""

    def scores(self, context: RetrievalContext):
        """Unmasked scores [B, N, L]."""
        raise NotImplementedError

    def call(self, context: RetrievalContext):
        model = context.model
        scores = mask_scores(self.scores(context), context.mask)
        if model.gsu_category_prior:
            scores = model.category_prior(scores, context.mask, model.category_match(context.features,
                                                                                     context.items))
        return scores, None


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class ProjectedGSU(_SeminarGSU):
    """Exact GSU over the projected history x^{GSU(j)} = x^{PSU(j)} G_j (the training path)."""

    gsu_mode = "exact"

    def scores(self, context):
        return projected_scores(context.model.gsu, context.q_t, context.gamma, context.history)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class IndexedGSU(_SeminarGSU):
    """Exact GSU from the history's item / query indices (inference: content encoded on the K kept only)."""

    gsu_mode = "exact"

    def history_inputs(self, model, features, training=None):
        return None, None

    def scores(self, context):
        return indexed_scores(context.model, context.q_t, context.gamma, context.features)

    def pick(self, context, positions):
        return encode_positions(context.model, context.features, positions, context.training)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class StoredChannelGSU(_SeminarGSU):
    """Exact GSU over the history's stored channels x^{PSU} (``pair_channels``, e.g. EM3's fused channels),
    G_j folded into the target; only the kept positions are projected."""

    gsu_mode = "exact"

    def history_inputs(self, model, features, training=None):
        return None, _stored_history(model, features, training)

    def scores(self, context):
        return stored_scores(context.model, context.q_t, context.gamma, context.stored)

    def pick(self, context, positions):
        # project each distinct kept position once (the N lists overlap)
        return gather_unique(context.stored, positions, context.model.projection)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class ExactGSU(Retriever):
    """The "exact" GSU mode: ``ProjectedGSU`` in training, ``IndexedGSU`` at inference (``StoredChannelGSU``
    with ``stored_channels``, for channels that are not the content encoder's)."""

    gsu_mode = "exact"

    def __init__(self, stored_channels: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.stored_channels = bool(stored_channels)
        self.training_path = ProjectedGSU(name="projected")
        self.inference_path = (StoredChannelGSU(name="stored") if self.stored_channels
                               else IndexedGSU(name="indexed"))

    def _path(self, training) -> Retriever:
        return self.training_path if training else self.inference_path

    def history_inputs(self, model, features, training=None):
        return self._path(training).history_inputs(model, features, training)

    def call(self, context):
        return self._path(context.training)(context)

    def pick(self, context, positions):
        return self._path(context.training).pick(context, positions)

    def aux_history(self, context):
        return self._path(context.training).aux_history(context)

    def get_config(self):
        config = super().get_config()
        config.update(stored_channels=self.stored_channels)
        return config


class _PQGSU(_SeminarGSU):
    """GSU from the PQ codes of the history's stored channels (``model.pq``); with ``rerank`` r > 1 the host
    keeps r·K candidates and ``refine`` re-scores them exactly (faiss IndexRefine style)."""

    kind = ""

    def __init__(self, rerank: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.rerank = int(rerank)
        if self.rerank < 1:
            raise ValueError(f"pq_rerank must be >= 1, got {rerank}")

    def history_inputs(self, model, features, training=None):
        return None, None

    def scores(self, context):
        return pq_scores(context.model, self.kind, context.q_t, context.gamma, context.features, context.target)

    def pick(self, context, positions):
        return encode_positions(context.model, context.features, positions, context.training)

    def refine(self, context, candidates, valid, top_k):
        # exact GSU scores of the r·K PQ candidates, Σ_j γ_j u·x^{GSU(j)}; keep the K best
        dim = context.model.content.dim
        u = tf.reshape(context.model.gsu.folded_query(context.q_t), [-1, dim])
        exact = tf.einsum("xrcd,xd,xc->xr", candidates, u, tf.reshape(context.gamma, [tf.shape(candidates)[0], -1]))
        return top_k_positions(exact, valid, top_k)

    def aux_history(self, context):
        # the decoded history, x̂^{PSU(j)} G_j, as the GSU sees it
        model = context.model
        return model.projection(model.pq.decode(model.pq.unpack(model.history_codes(context.features,
                                                                                    context.training))))

    def get_config(self):
        config = super().get_config()
        config.update(rerank=self.rerank)
        return config


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class PQADC(_PQGSU):
    """PQ GSU, asymmetric distance: score_l = Σ_j (γ_j G_j u)·x̂_l^{PSU(j)}, exact on the target side."""

    gsu_mode = "pq_adc"
    kind = "adc"


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class PQSDC(_PQGSU):
    """PQ GSU, symmetric distance: the target quantized too, scored with the centroid-product table."""

    gsu_mode = "pq_sdc"
    kind = "sdc"


def gsu_retriever(mode: str, rerank: int = 1, stored_channels: bool = False) -> Retriever:
    """SEMINAR's GSU retriever of a ``GSU_MODES`` mode (``rerank``: PQ modes only)."""
    if mode not in GSU_MODES:
        raise ValueError(f"gsu must be one of {GSU_MODES}, got {mode!r}")
    if mode == "exact":
        return ExactGSU(stored_channels=stored_channels, name="retriever")
    return (PQADC if mode == "pq_adc" else PQSDC)(rerank=rerank, name="retriever")


# ------------------------------------------------------------------------------------------- baselines
def _positions(history, n):
    """Recency scores [B, N, L]: the step's position (newest = largest; histories are oldest first)."""
    length = tf.shape(history)[1]
    positions = tf.cast(tf.range(length), history.dtype)
    return tf.broadcast_to(positions[None, None, :], [tf.shape(history)[0], n, length])


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class DINRetriever(Retriever):
    """DIN: no search; the newest steps first (the host's K is DIN's ``short_history``)."""

    def call(self, context):
        n = tf.shape(context.q_t)[1]
        return _positions(context.history, n), self.for_every_target(context.mask, n)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class SIMHardRetriever(Retriever):
    """SIM hard search: the steps whose item category (column ``category_column`` of the item attributes)
    equals the target item's, newest first; targets of a reserved category keep no step."""

    def __init__(self, category_column: int, **kwargs):
        super().__init__(**kwargs)
        self.category_column = int(category_column)

    def call(self, context):
        n = tf.shape(context.q_t)[1]
        return (_positions(context.history, n),
                context.model.category_match(context.features, context.items, self.category_column))

    def get_config(self):
        config = super().get_config()
        config.update(category_column=self.category_column)
        return config


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class SIMSoftRetriever(Retriever):
    """SIM soft search: score_l = q_t · k_l = Σ_j γ_j q_t · x_l^(j) (inner product, no projections)."""

    def call(self, context):
        per_channel = tf.einsum("bljd,bnd->bnlj", context.history, context.q_t)
        return (tf.einsum("bnlj,bnj->bnl", per_channel, context.gamma),
                self.for_every_target(context.mask, tf.shape(context.q_t)[1]))


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class ETARetriever(Retriever):
    """ETA: SimHash signatures s(x) = [x R > 0] ∈ {0,1}^m with fixed random hyperplanes R [d, m] (a
    non-trainable weight drawn from N(0, 1) with ``seed``); score_l = -Hamming(s(q_t), s(k_l)),
    k_l = Σ_j γ_j x_l^(j); ties go to the older step."""

    def __init__(self, num_bits: int = 32, dim: int = 32, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.num_bits, self.dim, self.seed = int(num_bits), int(dim), int(seed)
        self.hyperplanes = self.add_weight(
            name="simhash_hyperplanes", shape=[self.dim, self.num_bits], trainable=False,
            initializer=tf.keras.initializers.RandomNormal(stddev=1.0, seed=self.seed))

    def signatures(self, vectors):
        """SimHash bits bool [..., m] of vectors [..., d]."""
        return tf.einsum("...d,dm->...m", vectors, self.hyperplanes) > 0

    def call(self, context):
        q_t, gamma = context.q_t, context.gamma
        target_bits = self.signatures(q_t)  # [B, N, m]
        # x R is linear, so the merged keys' projections are Σ_j γ_j (x_l^(j) R): no [B, N, L, d] tensor.
        projected = tf.einsum("bljd,dm->bljm", context.history, self.hyperplanes)
        history_bits = tf.einsum("bljm,bnj->bnlm", projected, gamma) > 0
        distance = tf.reduce_sum(tf.cast(tf.not_equal(target_bits[:, :, None, :], history_bits), q_t.dtype), -1)
        return -distance, self.for_every_target(context.mask, tf.shape(q_t)[1])

    def get_config(self):
        config = super().get_config()
        config.update(num_bits=self.num_bits, dim=self.dim, seed=self.seed)
        return config


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class TWINRetriever(Retriever):
    """TWIN: the GSU scores all L steps with the ESU's own attention, score_l = (1/H) Σ_h α_h^{ESU}(q_t, k_l)."""

    def call(self, context):
        scores = mask_scores(projected_scores(context.model.esu, context.q_t, context.gamma, context.history),
                             context.mask)
        return scores, self.for_every_target(context.mask, tf.shape(context.q_t)[1])


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class QINRetriever(Retriever):
    """QIN's query-first relevance search: probe e_q = x_t^{GSU(query)}; score_l = e_q · x_l^{query} +
    e_q · Σ_{m∈items} γ̃_m x_l^{(m)} (γ̃: γ renormalised over the item channels); a target without a query
    (e_q = 0) is ranked by SIM soft search, q_t · k_l. Needs the query channel."""

    @staticmethod
    def target_query(model, queries, query_tokens=None, training=None):
        """e_q = x_t^{PSU(query)} G_query [B, N, d] of target queries [B, N] (or their tokens)."""
        encoded = (model.content.encode_query_tokens(query_tokens, training=training) if query_tokens is not None
                   else model.content.encode_queries(queries, training=training))
        query_channel = model.channels.index(schema.QUERY_CHANNEL)
        return tf.einsum("bnd,de->bne", encoded, model.projection.kernel[query_channel])

    def call(self, context):
        model, history, q_t, gamma = context.model, context.history, context.q_t, context.gamma
        probe = self.target_query(model, context.queries, context.features.get(schema.TARGET_QUERY_TOKENS))
        query_weight = tf.one_hot(model.channels.index(schema.QUERY_CHANNEL), len(model.channels),
                                  dtype=gamma.dtype)
        weights = item_gamma(gamma, model.channels) + query_weight  # [B, N, C]
        by_query = tf.einsum("bnlj,bnj->bnl", tf.einsum("bljd,bnd->bnlj", history, probe), weights)
        by_target = tf.einsum("bnlj,bnj->bnl", tf.einsum("bljd,bnd->bnlj", history, q_t), gamma)
        has_query = tf.reduce_any(tf.not_equal(probe, 0), axis=-1)  # [B, N]
        scores = tf.where(has_query[:, :, None], by_query, by_target)
        return scores, self.for_every_target(context.mask, tf.shape(q_t)[1])


# ------------------------------------------------------------------------------------------- registry
RETRIEVERS = {"seminar": ExactGSU, "din": DINRetriever, "sim_hard": SIMHardRetriever, "sim_soft": SIMSoftRetriever,
              "eta": ETARetriever, "twin": TWINRetriever, "qin": QINRetriever}
assert set(RETRIEVERS) == set(ARCHITECTURES), "every ModelConfig.architecture needs a retriever"


def build_retriever(architecture: str, config: ModelConfig, *, category_column: int = 0) -> Retriever:
    """``ModelConfig.architecture`` → its retriever, options from the config's fields: SEMINAR's ``gsu`` /
    ``pq_rerank`` (``gsu_retriever``), ETA's ``simhash_bits`` / ``seed`` / ``dim``; SIM hard's
    ``category_column`` is the item-table column of ``config.category_attribute`` (the builders resolve it
    from the dataset metadata). DIN's ``short_history`` is the host's K, not a retriever option."""
    if architecture not in RETRIEVERS:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(RETRIEVERS)}")
    if architecture == "seminar":
        return gsu_retriever(config.gsu, config.pq_rerank)
    if architecture == "sim_hard":
        return SIMHardRetriever(category_column, name="retriever")
    if architecture == "eta":
        return ETARetriever(config.simhash_bits, config.dim, config.seed, name="retriever")
    return RETRIEVERS[architecture](name="retriever")


__all__ = ["DINRetriever", "ETARetriever", "EXCLUDED", "ExactGSU", "IndexedGSU", "PQADC", "PQSDC", "ProjectedGSU",
           "QINRetriever", "RETRIEVERS", "RetrievalContext", "Retriever", "SIMHardRetriever", "SIMSoftRetriever",
           "StoredChannelGSU", "TWINRetriever", "build_retriever", "gsu_retriever"]
