"""Retrieval as a component: the GSU step of SEMINAR and of every baseline (docs/design.md §4, §5).

A ``Retriever`` scores every history step for every target; the host model (``SeminarModel``) takes the top K
(``top_k_positions``), picks the kept steps, runs the ESU read-out and the tower. A retriever reads a
``RetrievalContext`` (the targets, the history inputs it asked for with ``history_inputs``, and the host model
for the shared parts: content encoder, G_j, GSU / ESU attention, PQ layer) and returns
(scores [B, N, L], keep bool [B, N, L] or None = keep every real step).

No step of a training or inference call builds a float tensor per history step and channel ([B, L, C, d]): the
history enters as its distinct entries (``HistoryEntries``: each distinct query and item of the batch encoded
once, [U, C, d]); scores are computed per entry ([B, N, U], under ``stop_gradient``: top-K is not
differentiable) and gathered to the positions; the K kept steps are gathered from the entries (with gradients,
into the ESU); the GSU auxiliary read-out over all L steps is linear in its keys and values, so it sums the
softmax weights per entry (``entry_readout``) and attends without building the keys (``entry_attention``).

SEMINAR's GSU modes ("exact", "pq_adc", "pq_sdc", ``gsu_retriever``): ``ExactGSU`` is ``ProjectedGSU`` (over
the projected history) in training and ``IndexedGSU`` (from the history's ids) or ``StoredChannelGSU`` (over
stored channels, EM3's fused ones) at inference; ``PQADC`` / ``PQSDC`` score from PQ codes and may re-rank r·K
candidates exactly. Baselines (``baselines``): ``DINRetriever``, ``SIMHardRetriever``, ``SIMSoftRetriever``,
``ETARetriever``, ``TWINRetriever``, ``QINRetriever``. ``RETRIEVERS`` maps ``ModelConfig.architecture`` to its
retriever; ``build_retriever`` builds it from the config's fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

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
    [B, N, C, d]; entries: the history's distinct entries before G_j (``HistoryEntries``), None unless the
    retriever's ``history_inputs`` asked for them; mask: bool [B, L], the real steps; training: the call's
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
    entries: Optional["HistoryEntries"] = None


@dataclasses.dataclass(frozen=True)
class HistoryEntries:
    """The history as its distinct entries, each encoded once: step l of row b is the pair (query row
    ``query_index[b, l]``, item row ``item_index[b, l]``).

    query: the query channel x^{PSU(query)} [U_q, d] of each distinct query (unknown query text: one row per
    such step), None without a query channel; items: the item channels x^{PSU(j)} [U_i, J, d] of each distinct
    item, None without item channels; query_index / item_index: int32 [B, L]. Channels before G_j, in the
    model's order (the query channel first). ``model.history_entries`` builds them.
    """

    query: Optional[tf.Tensor]
    query_index: Optional[tf.Tensor]
    items: Optional[tf.Tensor]
    item_index: Optional[tf.Tensor]

    def parts(self):
        """[(rows [U, J, d], index int32 [B, L], first channel, J)]: the query part, then the item part."""
        parts, first = [], 0
        for rows, index in ((self.query, self.query_index), (self.items, self.item_index)):
            if rows is None:
                continue
            rows = rows[:, None, :] if rows.shape.rank == 2 else rows
            width = rows.shape[1]
            parts.append((rows, index, first, width))
            first += width
        return parts

    def stop_gradient(self) -> "HistoryEntries":
        """The same entries, constant for backprop (retrieval scores: top-K is not differentiable)."""
        return dataclasses.replace(self, query=None if self.query is None else tf.stop_gradient(self.query),
                                   items=None if self.items is None else tf.stop_gradient(self.items))


# -------------------------------------------------------------------------------------------------- math
def mask_scores(scores, mask):
    """GSU scores [B, N, L] with the positions masked out by ``mask`` [B, L] at -1e9 (no [B, N, L] select
    when every position is real, as in a serving request without padding)."""
    return tf.cond(tf.reduce_all(mask), lambda: scores,
                   lambda: tf.where(mask[:, None, :], scores, tf.constant(-1e9, scores.dtype)))


def target_vectors(kernel, u, gamma):
    """v_j = γ_j G_j u: u [B, N, d] (or [B, N, H, d], one per head) → [B, N, C, d] ([B, N, H, C, d]), so that
    u·Σ_j γ_j x^{PSU(j)} G_j = Σ_j v_j·x^{PSU(j)}."""
    if u.shape.rank == 4:
        return tf.einsum("cde,bnhe->bnhcd", kernel, u) * gamma[:, :, None, :, None]
    return tf.einsum("cde,bne->bncd", kernel, u) * gamma[..., None]


def entry_part_scores(entries: HistoryEntries, targets):
    """Each part's scores per distinct entry: targets [B, M, C, d] → [(per_entry [U, B, M], index int32 [B, L])],
    one [U, J·d] x [J·d, B·M] matmul per part; step l of row b scores Σ_parts per_entry[index[b, l], b, m]."""
    batch, m = tf.shape(targets)[0], tf.shape(targets)[1]
    parts = []
    for rows, index, first, width in entries.parts():
        count = tf.shape(rows)[0]
        w = tf.reshape(targets[:, :, first:first + width], [batch * m, -1])
        # 2-D matmuls: a batched one against the shared rows would take its gradient as [B, U, J·d]
        per_entry = tf.matmul(tf.reshape(rows, [count, -1]), w, transpose_b=True)  # [U, B·M]
        parts.append((tf.reshape(per_entry, [count, batch, m]), index))
    return parts


def entry_scores(entries: HistoryEntries, targets):
    """Σ_j t_{b,m,j}·x_{l}^{(j)} for every step: targets [B, M, C, d] (one vector per row, target and channel)
    → [B, M, L]. Each part (query, items) is scored once per distinct entry ([B, M, U], one matmul) and gathered
    to the steps, so the cost is B·M·U·C·d and nothing per step is wider than M."""
    scores = None  # built as [B, L, M] (each step gathers its entry's M scores as one row), transposed at the end
    for per_entry, index in entry_part_scores(entries, targets):
        part = tf.gather(tf.transpose(per_entry, [1, 0, 2]), index, batch_dims=1)  # [B, L, M]
        scores = part if scores is None else scores + part
    return tf.transpose(scores, [0, 2, 1])


_PARTITIONED_CATEGORIES = 4096  # category vocabularies up to this size are grouped by dynamic_partition, not sorted


def _steps_by_category(categories, mask, num_categories):
    """The real steps grouped by (category, row), in position order within a group: (flat positions int32 [R]
    (row·L + position), start int32 [V·B] and count int32 [V·B] of group (category c, row b) at c·B + b).
    Categories lie in [0, num_categories); a stable counting sort (``dynamic_partition``) for vocabularies up to
    ``_PARTITIONED_CATEGORIES``, else a stable argsort."""
    batch, length = tf.shape(categories)[0], tf.shape(categories)[1]
    categories = tf.cast(categories, tf.int32)
    flat = tf.reshape(tf.where(mask, categories, num_categories), [-1])  # padding: one more group, dropped
    if num_categories <= _PARTITIONED_CATEGORIES:
        order = tf.concat(tf.dynamic_partition(tf.range(batch * length), flat, num_categories + 1)[:-1], 0)
    else:
        order = tf.argsort(flat, stable=True)
        order = order[: tf.reduce_sum(tf.cast(mask, tf.int32))]
    groups = tf.reshape(categories * batch + tf.range(batch)[:, None], [-1])  # c·B + b
    count = tf.math.unsorted_segment_sum(tf.reshape(tf.cast(mask, tf.int32), [-1]), groups,
                                         num_categories * batch)
    return order, tf.math.cumsum(count, exclusive=True), count


def category_top_k(parts, categories, target_categories, mask, k: int, prior, num_categories: int):
    """The GSU's top-K with the category prior (``SeminarModel.category_prior``), reading only the steps of each
    target's category when it has at least K of them.

    parts: ``entry_part_scores`` (score of step l for target m = Σ_parts per_entry[index[b, l], b, m]);
    categories: int [B, L], each step's category in [0, num_categories); target_categories: int [B, M] (-1: none);
    mask: bool [B, L], the real steps; prior: ``category_prior``. Returns (indices int32 [B·M, k], valid bool
    [B·M, k]), the same as ``top_k_positions`` over the prior-ranked scores of every step: the prior ranks a
    target's category first, so a target with ≥ k real steps of its category keeps the k best of those (ties to
    the lower position) and only those are scored (about L / #categories steps instead of L). The other targets
    are ranked over all L steps, as without this function.
    """
    batch, m, length = tf.shape(mask)[0], tf.shape(target_categories)[1], tf.shape(mask)[1]
    targets = tf.reshape(tf.cast(target_categories, tf.int32), [-1])  # [B·M]
    order, group_start, group_count = _steps_by_category(categories, mask, num_categories)
    target_rows = tf.repeat(tf.range(batch), m)
    real_target = targets >= 0
    group = tf.where(real_target, targets, 0) * batch + target_rows
    count = tf.where(real_target, tf.gather(group_count, group), 0)
    fast = count >= k
    fast_rows = tf.cast(tf.where(fast)[:, 0], tf.int32)
    slow_rows = tf.cast(tf.where(~fast)[:, 0], tf.int32)

    # targets with ≥ k steps of their category: the k best of those steps
    start = tf.gather(tf.gather(group_start, group), fast_rows)
    slots = tf.ragged.range(start, start + tf.gather(count, fast_rows), row_splits_dtype=tf.int32)  # [F, (S)]
    owner = tf.gather(fast_rows, slots.value_rowids())  # [P]: row·M + target
    flat_positions = tf.gather(order, slots.flat_values)  # [P]: row·L + position, ascending per target
    rows = flat_positions // length
    total = None
    for per_entry, index in parts:  # each part's per-entry score, summed in part order (as entry_scores)
        entry = tf.gather(tf.reshape(index, [-1]), flat_positions)
        part = tf.gather(tf.reshape(per_entry, [-1]), (entry * batch + rows) * m + owner % m)
        total = part if total is None else total + part
    width = tf.maximum(tf.reduce_max(tf.concat([slots.row_lengths(), [0]], 0)), k)
    shape = tf.stack([tf.size(fast_rows), width])
    _, local = tf.math.top_k(slots.with_flat_values(total).to_tensor(-math.inf, shape=shape), k=k, sorted=True)
    positions = slots.with_flat_values(flat_positions - rows * length).to_tensor(0, shape=shape)
    fast_indices = tf.gather(positions, local, batch_dims=1)

    def every_step():  # the other targets: every step scored, masked and prior-ranked as the GSU does
        rows, columns = slow_rows // m, slow_rows % m
        total = None
        for per_entry, index in parts:
            per_target = tf.gather_nd(tf.transpose(per_entry, [1, 2, 0]), tf.stack([rows, columns], 1))  # [S, U]
            part = tf.gather(per_target, tf.gather(index, rows), batch_dims=1)  # [S, L]
            total = part if total is None else total + part
        row_mask = tf.gather(mask, rows)
        same = tf.equal(tf.gather(tf.cast(categories, tf.int32), rows), tf.gather(targets, slow_rows)[:, None])
        scores = prior(mask_scores(total[:, None, :], row_mask), row_mask, same[:, None, :])
        return top_k_positions(tf.reshape(scores, [-1, length]), None, k)

    slow_indices, slow_valid = tf.cond(
        tf.size(slow_rows) > 0, every_step,
        lambda: (tf.zeros([0, k], tf.int32), tf.zeros([0, k], tf.bool)))
    indices = tf.dynamic_stitch([fast_rows, slow_rows], [fast_indices, slow_indices])
    valid = tf.dynamic_stitch([fast_rows, slow_rows], [tf.ones_like(fast_indices, tf.bool), slow_valid])
    size = batch * m
    return tf.reshape(indices, [size, k]), tf.reshape(valid, [size, k])


def entry_readout(entries: HistoryEntries, weights):
    """Σ_l w_{b,m,l} x_l^{(j)} per channel: weights [B, M, L] → [B, M, C, d]. The weights are summed per
    (row, entry) first (``unsorted_segment_sum``), then each part is one [B, M, U] x [U, J·d] matmul: the
    adjoint of ``entry_scores``."""
    batch, m, length = tf.shape(weights)[0], tf.shape(weights)[1], tf.shape(weights)[2]
    pooled = []
    for rows, index, _, width in entries.parts():
        count = tf.shape(rows)[0]
        slots = tf.range(batch * m, dtype=index.dtype)[:, None] * count + tf.repeat(index, m, axis=0)  # [B·M, L]
        per_entry = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1, length]), slots, batch * m * count)
        per_entry = tf.reshape(per_entry, [batch * m, count])  # Σ_{l: entry(l) = u} w_l
        part = tf.matmul(per_entry, tf.reshape(rows, [count, -1]))  # [B·M, J·d]
        pooled.append(tf.reshape(part, [batch, m, width, rows.shape[-1]]))
    return pooled[0] if len(pooled) == 1 else tf.concat(pooled, axis=2)


def gather_entries(entries: HistoryEntries, positions):
    """The channels before G_j of the steps at positions [B, P] → [B, P, C, d] (gathered from the entries)."""
    parts = []
    for rows, index, _, _ in entries.parts():
        parts.append(tf.gather(rows, tf.gather(index, positions, batch_dims=1)))  # [B, P, J, d]
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=2)


def _linear_scores(context, u, gamma):
    """Σ_j γ_j u·x_l^{GSU(j)} for every step: u [B, N, d], γ [B, N, C] → [B, N, L], per entry and without
    gradients (the retrieval's top-K is not differentiable)."""
    targets = target_vectors(context.model.projection.kernel, u, gamma)
    return entry_scores(context.entries.stop_gradient(), tf.stop_gradient(targets))


def entry_attention(attention, kernel, q_t, gamma, entries: HistoryEntries, mask, training=None):
    """``attention`` of the targets over all L steps with keys = values k_l = Σ_j γ_j x_l^{PSU(j)} G_j (the GSU
    read-out head^GSU = Attention(q_t, K^GSU, V^GSU)), from the distinct entries: per-head logits
    α_{n,h,l} = Σ_j (γ_j G_j u_{n,h})·x_l^{PSU(j)} (``entry_scores``), read-out Σ_j γ_j (Σ_l w_{n,h,l}
    x_l^{PSU(j)}) G_j (``entry_readout``). Memory O(B·N·H·(L + U) + U·C·d); equals
    ``attention.gated_call(q_t, x^{PSU} G, γ, mask)``. Returns (output [B, N, d_out], head-averaged logits
    [B, N, L])."""
    kernel = tf.cast(kernel, attention.compute_dtype)
    gamma = tf.cast(gamma, attention.compute_dtype)
    batch, n = tf.shape(q_t)[0], tf.shape(q_t)[1]
    heads, length = attention.num_heads, tf.shape(mask)[1]
    channels, dim = kernel.shape[0], kernel.shape[1]

    def head_logits(folded):  # u_{n,h} [B, N, H, d]
        targets = tf.reshape(target_vectors(kernel, folded, gamma), [batch, n * heads, channels, dim])
        return tf.reshape(entry_scores(entries, targets), [batch, n, heads, length])

    def pool(weights):  # [B, N, H, L]
        pooled = tf.reshape(entry_readout(entries, tf.reshape(weights, [batch, n * heads, length])),
                            [batch, n, heads, channels, dim])
        return tf.einsum("bnhcd,cde,bnc->bnhe", pooled, kernel, gamma)

    return attention.factored_call(q_t, head_logits, pool, mask, training=training)


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

    score_l = Σ_j v_j·x_l^{PSU(j)} with v_j = γ_j G_j u (``pq_targets``), scored once per distinct item (query)
    of the batch (``model.history_entries``, ``entry_scores``) and gathered back to the L positions (a long
    history repeats items and, much more, queries); unknown query text (OOV index with tokens) gets one row
    per position, encoded from its tokens.
    """
    return entry_scores(model.history_entries(features, training=False), model.pq_targets(q_t, gamma))


def unique_positions(indices, length):
    """Distinct (row, position) pairs of indices [B, P] into rows of ``length``: (where int64 [U, 2], inverse
    int32 [B·P] such that pair i of the flattened indices is where[inverse[i]])."""
    length = tf.cast(length, tf.int64)
    rows = tf.range(tf.shape(indices, out_type=tf.int64)[0])[:, None]
    keys = tf.reshape(rows * length + tf.cast(indices, tf.int64), [-1])
    unique, inverse = tf.unique(keys, out_idx=tf.int32)
    return tf.stack([unique // length, unique % length], axis=-1), inverse


def encode_positions(model, features, indices, training=None):
    """History channels after G_j at the given positions only: indices [B, P] → [B, P, C, d], each distinct
    (row, position) encoded once (at L=10^4, N=100, K=64 about a third of the N·K positions are distinct)."""
    where, inverse = unique_positions(indices, tf.shape(features[schema.SEQ_HISTORY_ITEM])[1])

    def pick(name):
        return tf.gather_nd(features[name], where)[None]  # [1, U, ...]

    tokens = features.get(schema.HISTORY_QUERY_TOKENS)
    encoded = model.projected_channels(
        pick(schema.SEQ_HISTORY_QUERY), pick(schema.SEQ_HISTORY_ITEM), training=training,
        query_tokens=None if tokens is None else pick(schema.HISTORY_QUERY_TOKENS))[0]  # [U, C, d]
    return tf.reshape(tf.gather(encoded, inverse),
                      tf.concat([tf.shape(indices), tf.shape(encoded)[1:]], axis=0))


# ------------------------------------------------------------------------------------------- interface
@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class Retriever(tf.keras.layers.Layer):
    """The retrieval step: ``retriever(context)`` → (scores float [B, N, L], keep bool [B, N, L] or None).

    ``keep`` None keeps every real step (the scores then already hold -1e9 at padding); otherwise the host
    keeps ``keep & mask`` and scores every other step -1e9. The host asks, in this order:
    ``history_inputs`` (what to encode before the call), the call, ``pick`` (channels after G_j of the kept
    positions), ``refine`` when ``rerank`` > 1, and ``aux_readout`` for the GSU auxiliary read-out.

    ``gsu_mode``: the SEMINAR GSU mode this retriever implements (``set_gsu_mode`` replaces it), None for a
    baseline's own retrieval. ``rerank``: r, the host keeps r·K candidates before ``refine``.
    """

    gsu_mode: Optional[str] = None
    rerank: int = 1

    def history_inputs(self, model, features, training=None) -> Dict[str, Any]:
        """The context fields to encode before the call: {"entries": the history's distinct entries} (an empty
        dict for a retriever that reads only ids and positions)."""
        return {"entries": model.history_entries(features, training)}

    def call(self, context: RetrievalContext):
        raise NotImplementedError

    def pick(self, context: RetrievalContext, positions):
        """History channels after G_j at positions [B, P] → [B, P, C, d]: gathered from the entries when the
        context has them, else each distinct kept (row, position) encoded (``encode_positions``)."""
        if context.entries is None:
            return encode_positions(context.model, context.features, positions, context.training)
        return context.model.projection(gather_entries(context.entries, positions))

    def top_k(self, context: RetrievalContext, k: int):
        """(indices int32 [B·N, k], valid bool [B·N, k]) of the k best steps per target, for a retriever that ranks
        without scoring every step; None (the default): the host ranks the call's scores."""
        return None

    def refine(self, context: RetrievalContext, candidates, valid, top_k: int):
        """Re-ranks r·K candidates [B·N, rK, C, d] (``valid`` [B·N, rK]) → (local indices, valid) [B·N, K]."""
        raise NotImplementedError(f"{type(self).__name__} does not re-rank")

    def aux_readout(self, context: RetrievalContext):
        """The GSU auxiliary read-out head^GSU = Attention(q_t, K^GSU, V^GSU) over all L steps (training only):
        [B, N, d] (``entry_attention`` over the context's entries, encoded here when the context has none)."""
        model = context.model
        entries = context.entries
        if entries is None:
            entries = model.history_entries(context.features, context.training)
        readout, _ = entry_attention(model.gsu, model.projection.kernel, context.q_t, context.gamma, entries,
                                     context.mask, context.training)
        return readout

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
    """Exact GSU over the history's distinct entries (the training path): score_l = Σ_j v_j·x_l^{PSU(j)},
    v_j = γ_j G_j u (= u·Σ_j γ_j x_l^{GSU(j)}), scored per entry without gradients; the kept steps are gathered
    from the entries and projected by G_j (with gradients, into the ESU); the auxiliary read-out trains the GSU."""

    gsu_mode = "exact"

    def scores(self, context):
        return _linear_scores(context, context.model.gsu.folded_query(context.q_t), context.gamma)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class IndexedGSU(ProjectedGSU):
    """Exact GSU from the history's item / query indices (inference): the training path's scores over the
    batch's distinct entries (read from the serving cache once ``build_serving_cache`` has run, as in an export),
    and, with that cache, the kept steps gathered from the projected cache instead of projected per position."""

    def pick(self, context, positions):
        if context.model.has_serving_cache():
            return encode_positions(context.model, context.features, positions, context.training)
        return super().pick(context, positions)

    def top_k(self, context, k):
        """With the category prior and the serving cache (an export): ``category_top_k``, which scores only the
        steps of each target's category when it has at least k of them."""
        model = context.model
        if not (model.gsu_category_prior and model.has_serving_cache()):
            return None
        parts = entry_part_scores(context.entries, model.pq_targets(context.q_t, context.gamma))
        return category_top_k(parts, model.history_categories(context.features),
                              model.target_categories(context.items), context.mask, k, model.category_prior,
                              model.num_categories())


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class StoredChannelGSU(ProjectedGSU):
    """Exact GSU over the model's own channels x^{PSU} (``model.history_entries``, e.g. EM3's fused channels),
    G_j folded into the target; only the kept positions are projected (inference)."""


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

    def top_k(self, context, k):
        return self._path(context.training).top_k(context, k)

    def aux_readout(self, context):
        return self._path(context.training).aux_readout(context)

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
        return {}

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

    def aux_readout(self, context):
        # over the decoded history, x̂^{PSU(j)} G_j, as the GSU sees it
        model = context.model
        history = model.projection(model.pq.decode(model.pq.unpack(model.history_codes(context.features,
                                                                                       context.training))))
        readout, _ = model.gsu.gated_call(context.q_t, history, context.gamma, context.mask, context.training)
        return readout

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
def _positions(mask, n):
    """Recency scores [B, N, L]: the step's position (newest = largest; histories are oldest first)."""
    length = tf.shape(mask)[1]
    positions = tf.cast(tf.range(length), tf.float32)
    return tf.broadcast_to(positions[None, None, :], [tf.shape(mask)[0], n, length])


class _PositionRetriever(Retriever):
    """A retriever that ranks by position (and ids): it encodes only the kept steps (``encode_positions``)."""

    def history_inputs(self, model, features, training=None):
        return {}


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class DINRetriever(_PositionRetriever):
    """DIN: no search; the newest steps first (the host's K is DIN's ``short_history``)."""

    def call(self, context):
        n = tf.shape(context.q_t)[1]
        return _positions(context.mask, n), self.for_every_target(context.mask, n)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class SIMHardRetriever(_PositionRetriever):
    """SIM hard search: the steps whose item category (column ``category_column`` of the item attributes)
    equals the target item's, newest first; targets of a reserved category keep no step."""

    def __init__(self, category_column: int, **kwargs):
        super().__init__(**kwargs)
        self.category_column = int(category_column)

    def call(self, context):
        n = tf.shape(context.q_t)[1]
        return (_positions(context.mask, n),
                context.model.category_match(context.features, context.items, self.category_column))

    def get_config(self):
        config = super().get_config()
        config.update(category_column=self.category_column)
        return config


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class SIMSoftRetriever(Retriever):
    """SIM soft search: score_l = q_t · k_l = Σ_j γ_j q_t · x_l^(j) (inner product, no projections)."""

    def call(self, context):
        return (_linear_scores(context, context.q_t, context.gamma),
                self.for_every_target(context.mask, tf.shape(context.q_t)[1]))


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class ETARetriever(Retriever):
    """ETA: SimHash signatures s(x) = [x R > 0] ∈ {0,1}^m with fixed random hyperplanes R [d, m] (a
    non-trainable weight drawn from N(0, 1) with ``seed``); score_l = -Hamming(s(q_t), s(k_l)),
    k_l = Σ_j γ_j x_l^(j); ties go to the older step.

    x R is linear, so k_l R = Σ_j γ_j (x_l^{PSU(j)} G_j R): each distinct entry is projected to m once, and the
    steps' signatures are computed in chunks of ``chunk`` steps without gradients (a signature is not
    differentiable), so no [B, L, C, m] tensor is kept.
    """

    chunk = 1024  # steps per signature chunk

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
        q_t, gamma = tf.stop_gradient(context.q_t), tf.stop_gradient(context.gamma)
        target_bits = tf.cast(self.signatures(q_t), q_t.dtype)  # [B, N, m]
        model, entries = context.model, context.entries.stop_gradient()
        kernel = tf.stop_gradient(model.projection.kernel)
        # each part's entries projected to the m hyperplanes: x^{PSU(j)} G_j R [U, J, m]
        parts = [(tf.einsum("uje,em->ujm", tf.einsum("ujd,jde->uje", rows, kernel[first:first + width]),
                            self.hyperplanes), index, gamma[..., first:first + width])
                 for rows, index, first, width in entries.parts()]
        length = tf.shape(context.mask)[1]
        chunks = (length + self.chunk - 1) // self.chunk
        padding = chunks * self.chunk - length

        def chunk_of(index):  # int32 [B, L] → [chunks, B, chunk]
            padded = tf.pad(index, [[0, 0], [0, padding]])
            return tf.transpose(tf.reshape(padded, [tf.shape(index)[0], chunks, self.chunk]), [1, 0, 2])

        def distance(steps):  # one chunk of every part's step indices → Hamming distances [B, N, chunk]
            merged = tf.add_n([tf.einsum("bkjm,bnj->bnkm", tf.gather(projected, index), weights)
                               for (projected, _, weights), index in zip(parts, steps)])
            bits = tf.cast(merged > 0, q_t.dtype)
            # Hamming = Σ_m s_t + s_l - 2 s_t s_l
            return (tf.reduce_sum(target_bits, -1)[:, :, None] + tf.reduce_sum(bits, -1)
                    - 2.0 * tf.einsum("bnm,bnkm->bnk", target_bits, bits))

        steps = tuple(chunk_of(index) for _, index, _ in parts)
        distances = tf.map_fn(distance, steps, fn_output_signature=q_t.dtype)  # [chunks, B, N, chunk]
        distances = tf.transpose(distances, [1, 2, 0, 3])
        distances = tf.reshape(distances, [tf.shape(q_t)[0], tf.shape(q_t)[1], -1])[:, :, :length]
        return -distances, self.for_every_target(context.mask, tf.shape(q_t)[1])

    def get_config(self):
        config = super().get_config()
        config.update(num_bits=self.num_bits, dim=self.dim, seed=self.seed)
        return config


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class TWINRetriever(Retriever):
    """TWIN: the GSU scores all L steps with the ESU's own attention, score_l = (1/H) Σ_h α_h^{ESU}(q_t, k_l)
    (per entry, as SEMINAR's GSU)."""

    def call(self, context):
        scores = _linear_scores(context, context.model.esu.folded_query(context.q_t), context.gamma)
        return mask_scores(scores, context.mask), self.for_every_target(context.mask, tf.shape(context.q_t)[1])


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
        model, q_t, gamma = context.model, context.q_t, context.gamma
        probe = self.target_query(model, context.queries, context.features.get(schema.TARGET_QUERY_TOKENS))
        query_weight = tf.one_hot(model.channels.index(schema.QUERY_CHANNEL), len(model.channels),
                                  dtype=gamma.dtype)
        weights = item_gamma(gamma, model.channels) + query_weight  # [B, N, C]
        by_query = _linear_scores(context, probe, weights)
        by_target = _linear_scores(context, q_t, gamma)
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


__all__ = ["DINRetriever", "ETARetriever", "EXCLUDED", "ExactGSU", "HistoryEntries", "IndexedGSU", "PQADC", "PQSDC",
           "ProjectedGSU", "QINRetriever", "RETRIEVERS", "RetrievalContext", "Retriever", "SIMHardRetriever",
           "SIMSoftRetriever", "StoredChannelGSU", "TWINRetriever", "build_retriever", "entry_attention",
           "entry_readout", "entry_scores", "gsu_retriever"]
