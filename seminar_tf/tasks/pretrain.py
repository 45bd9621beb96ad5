"""PSU pretraining tasks (docs/design.md §4): L_PSU = L_next^pair + L_align + L_query-item, plus EM3's content-ID
contrastive loss.

Each task is a Keras layer that owns its loss *and* its metrics (TFRS style): a model's ``compute_loss`` is
``outputs = self(features); return task(labels, outputs)``. ``call`` returns a scalar float32 loss and
updates the task's metrics. Every loss takes a mask or sample weight; masked rows / positions are neither
anchors nor negatives, and losses are means over the valid anchors (so padding changes nothing, and an
all-masked batch gives loss 0 with finite gradients).

Tasks import neither ``seminar_tf.config`` nor ``seminar_tf.models``.
"""

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
import tensorflow_recommenders as tfrs

from seminar_tf import schema

# Logit given to masked candidates: exp(-1e9 - max) is exactly 0 in float32, and unlike -inf it keeps
# log_softmax finite on rows where everything is masked (those rows then carry weight 0).
MASKED_LOGIT = -1e9

# Channels aligned by L_align (the paper's (i, j) ∈ {T, I, A}; the query channel is not aligned).
ALIGNMENT_CHANNELS = (schema.TEXT_CHANNEL, schema.IMAGE_CHANNEL, schema.ATTRIBUTES_CHANNEL)
# Where L_align's negatives come from: "sequence" = the other steps of the anchor's chunk (the paper's chunked
# CLIP); "batch" = the steps at the same position in the other users' sequences (a different user's items).
ALIGN_NEGATIVES = ("sequence", "batch")


def _weighted_mean(values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Σ w·v / Σ w, and 0 (not NaN, with zero gradients) when Σ w = 0."""
    return tf.math.divide_no_nan(tf.reduce_sum(values * weights), tf.reduce_sum(weights))


def _row_weights(sample_weight: Optional[tf.Tensor], reference: tf.Tensor) -> tf.Tensor:
    """sample_weight as float32 [B] (ones when None); reference is any [B, ...] tensor."""
    if sample_weight is None:
        return tf.ones(tf.shape(reference)[:1], tf.float32)
    return tf.reshape(tf.cast(sample_weight, tf.float32), [-1])


def _finish(loss: tf.Tensor, update_ops: List) -> tf.Tensor:
    update_ops = [op for op in update_ops if op is not None]
    with tf.control_dependencies(update_ops):
        return tf.identity(loss)


class NextPairTask(tf.keras.layers.Layer, tfrs.tasks.base.Task):
    """Next query-item pair prediction, L_next^pair (SEMINAR PSU; docs/design.md §4).

    The PSU reads x_{1:L-1} followed by <EOS>; the representation at the EOS slot must pick the true next
    pair x_L among negatives: softmax cross-entropy with the positive at index 0 against
    [sampled negatives, in-batch negatives (the other rows' positives)], logits = <s, c> / temperature.
    Candidates equal to the positive (same ``positive_ids``; "accidental hits", as in
    ``tfrs.tasks.Retrieval``) and rows with sample weight 0 (padding) are removed from the candidates.
    The loss is the sample-weighted mean of the per-row cross-entropy.

    Shapes: sequence_embedding s [B, d], positive_embedding [B, d], negative_embeddings [B, N, d] (optional),
    positive_ids [B], negative_ids [B, N], negative_mask [B, N], sample_weight [B]; returns a scalar.
    Metrics: ``{prefix}hit_rate_at_{k}`` (k=1 is the top-1 accuracy) of the positive among the valid
    candidates, and ``{prefix}loss``.

    Example:
        task = NextPairTask(temperature=0.1)
        loss = task(eos_embedding, next_pair_embedding, sampled_pair_embeddings,
                    positive_ids=next_pair_ids, sample_weight=weights)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        use_in_batch_negatives: bool = True,
        remove_accidental_hits: bool = True,
        hit_rate_ks: Sequence[int] = (1, 5),
        metric_prefix: str = "next_pair_",
        name: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.use_in_batch_negatives = bool(use_in_batch_negatives)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.hit_rate_ks = tuple(int(k) for k in hit_rate_ks)
        self.metric_prefix = metric_prefix
        self.hit_rate_metrics = [
            tf.keras.metrics.Mean(name=f"{metric_prefix}hit_rate_at_{k}") for k in self.hit_rate_ks
        ]
        self.loss_metric = tf.keras.metrics.Mean(name=f"{metric_prefix}loss")

    def call(
        self,
        sequence_embedding: tf.Tensor,
        positive_embedding: tf.Tensor,
        negative_embeddings: Optional[tf.Tensor] = None,
        positive_ids: Optional[tf.Tensor] = None,
        negative_ids: Optional[tf.Tensor] = None,
        negative_mask: Optional[tf.Tensor] = None,
        sample_weight: Optional[tf.Tensor] = None,
        compute_metrics: bool = True,
    ) -> tf.Tensor:
        query = tf.cast(sequence_embedding, tf.float32)
        positive = tf.cast(positive_embedding, tf.float32)
        weights = _row_weights(sample_weight, query)
        if positive_ids is not None:
            positive_ids = tf.reshape(positive_ids, [-1])

        positive_logit = tf.reduce_sum(query * positive, axis=-1, keepdims=True)  # [B, 1]
        logits = [positive_logit]
        valid = [tf.ones_like(positive_logit, tf.bool)]
        if negative_embeddings is not None:
            sampled = tf.einsum("bd,bnd->bn", query, tf.cast(negative_embeddings, tf.float32))  # [B, N]
            sampled_valid = tf.ones_like(sampled, tf.bool)
            if negative_mask is not None:
                sampled_valid &= tf.cast(negative_mask, tf.bool)
            if self.remove_accidental_hits and negative_ids is not None and positive_ids is not None:
                sampled_valid &= tf.not_equal(negative_ids, positive_ids[:, None])
            logits.append(sampled)
            valid.append(sampled_valid)
        if self.use_in_batch_negatives:
            in_batch = tf.matmul(query, positive, transpose_b=True)  # [B, B]
            batch_size = tf.shape(query)[0]
            # The diagonal is the row's own positive, already at index 0.
            same = tf.cast(tf.eye(batch_size), tf.bool)
            if self.remove_accidental_hits and positive_ids is not None:
                same |= tf.equal(positive_ids[:, None], positive_ids[None, :])
            logits.append(in_batch)
            valid.append(~same & (weights[None, :] > 0))
        if len(logits) == 1:
            raise ValueError("NextPairTask needs negative_embeddings or use_in_batch_negatives=True.")

        logits = tf.concat(logits, axis=1) / self.temperature  # [B, 1 + N + B]
        valid = tf.concat(valid, axis=1)
        masked = tf.where(valid, logits, MASKED_LOGIT)
        per_row = -tf.nn.log_softmax(masked, axis=-1)[:, 0]
        loss = _weighted_mean(per_row, weights)
        if not compute_metrics:
            return loss

        # Rank of the positive = number of valid candidates scoring strictly higher.
        rank = tf.reduce_sum(tf.cast(masked[:, 1:] > masked[:, :1], tf.float32), axis=1)
        update_ops = [self.loss_metric.update_state(loss)]
        for k, metric in zip(self.hit_rate_ks, self.hit_rate_metrics):
            update_ops.append(metric.update_state(tf.cast(rank < k, tf.float32), sample_weight=weights))
        return _finish(loss, update_ops)

    def get_config(self) -> Dict:
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            use_in_batch_negatives=self.use_in_batch_negatives,
            remove_accidental_hits=self.remove_accidental_hits,
            hit_rate_ks=list(self.hit_rate_ks),
            metric_prefix=self.metric_prefix,
        )
        return config


def _chunked_clip_terms(
    x_a: tf.Tensor, x_b: tf.Tensor, mask: tf.Tensor, num_chunks: int, temperature: float,
    ids: Optional[tf.Tensor] = None,
) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-anchor symmetric CLIP loss inside chunks.

    Returns (per_anchor_loss, valid, correct), each flat [B·N_ch·L_sub]: loss 0.5·(CE_a→b + CE_b→a) of the
    anchor, 1.0 where the anchor is a valid position, 1.0 where a→b ranks the true position first. With ``ids``
    [B, L] (item indices), another position holding the anchor's own item is no negative (an accidental hit, as
    the next-pair task masks them): a user who clicked an item twice must not be taught that its text and
    its attributes disagree.
    """
    if int(num_chunks) < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_chunks = int(num_chunks)
    x_a = tf.math.l2_normalize(tf.cast(x_a, tf.float32), axis=-1)  # x̂^(i)
    x_b = tf.math.l2_normalize(tf.cast(x_b, tf.float32), axis=-1)  # x̂^(j)
    valid = tf.cast(tf.cast(mask, tf.float32) > 0, tf.float32)  # [B, L]

    shape = tf.shape(x_a)
    batch_size, length, dim = shape[0], shape[1], shape[2]
    pad = tf.math.floormod(-length, num_chunks)  # pad L up to a multiple of N_ch (padding is masked)
    x_a = tf.pad(x_a, [[0, 0], [0, pad], [0, 0]])
    x_b = tf.pad(x_b, [[0, 0], [0, pad], [0, 0]])
    valid = tf.pad(valid, [[0, 0], [0, pad]])
    sub_length = (length + pad) // num_chunks  # L_sub
    if ids is not None:
        chunk_ids = tf.reshape(tf.pad(tf.cast(ids, tf.int64), [[0, 0], [0, pad]]),
                               [batch_size * num_chunks, sub_length])
        same_item = tf.equal(chunk_ids[:, :, None], chunk_ids[:, None, :]) & ~tf.eye(sub_length, dtype=tf.bool)[None]

    # [B·N_ch, L_sub, d]: each chunk is its own batch entry, so one chunk costs an [L_sub, L_sub] matrix
    # and the whole sequence O(L²/N_ch), never an [L, L] one.
    chunks_a = tf.reshape(x_a, [batch_size * num_chunks, sub_length, dim])
    chunks_b = tf.reshape(x_b, [batch_size * num_chunks, sub_length, dim])
    chunk_valid = tf.reshape(valid, [batch_size * num_chunks, sub_length]) > 0
    logits = tf.matmul(chunks_a, chunks_b, transpose_b=True) / temperature  # [B·N_ch, L_sub, L_sub]
    pair_valid = chunk_valid[:, :, None] & chunk_valid[:, None, :]
    if ids is not None:
        pair_valid &= ~same_item
    masked = tf.where(pair_valid, logits, MASKED_LOGIT)
    a_to_b = -tf.linalg.diag_part(tf.nn.log_softmax(masked, axis=-1))  # row l of a vs columns of b
    b_to_a = -tf.linalg.diag_part(tf.nn.log_softmax(masked, axis=-2))  # column l of b vs rows of a
    per_anchor = 0.5 * (a_to_b + b_to_a)
    correct = tf.equal(tf.argmax(masked, axis=-1, output_type=tf.int32), tf.range(sub_length)[None, :])
    return (
        tf.reshape(per_anchor, [-1]),
        tf.reshape(tf.cast(chunk_valid, tf.float32), [-1]),
        tf.reshape(tf.cast(correct, tf.float32), [-1]),
    )


def chunked_clip_loss(
    x_a: tf.Tensor, x_b: tf.Tensor, mask: tf.Tensor, num_chunks: int = 1, temperature: float = 0.07
) -> tf.Tensor:
    """Chunked symmetric CLIP (InfoNCE) loss between two channels of one sequence (SEMINAR L_align term).

    L_CLIP(x̂^(i)_{L_k:L_k+1}, x̂^(j)_{L_k:L_k+1}) over N_ch chunks of length L_sub = ceil(L / N_ch) (L padded
    up to a multiple of N_ch; the padding is masked): embeddings are L2-normalized, logits = x̂_a x̂_bᵀ / T
    inside each chunk, position l of channel a must match position l of channel b against the chunk's
    other valid positions, in both directions, 0.5·(CE_a→b + CE_b→a). Masked positions are neither anchors
    nor negatives. Chunks are fixed position ranges [k·L_sub, (k+1)·L_sub) of the padded sequence.

    Reduction: the mean over all valid anchors of the batch. So N_ch = 1 is exactly the full-sequence CLIP
    loss, and for N_ch > 1 the result is the anchor-count-weighted average of the chunks' CLIP losses
    (the plain average when every chunk has the same number of valid positions); the paper's "sum of the
    chunks' losses" is N_ch times that, a constant factor we leave out so the loss scale does not depend on
    N_ch. An anchor that is alone in its chunk has no negatives and contributes loss 0. Cost O(L²/N_ch)·d.

    Args:
        x_a, x_b: [B, L, d] embeddings of two channels (need not be normalized).
        mask: [B, L], nonzero/True at valid positions.
        num_chunks: N_ch >= 1.
        temperature: softmax temperature T.
    Returns:
        scalar float32 loss (0 when nothing is valid).

    Example:
        loss = chunked_clip_loss(text_seq, image_seq, history_mask, num_chunks=4)
    """
    per_anchor, valid, _ = _chunked_clip_terms(x_a, x_b, mask, num_chunks, temperature)
    return _weighted_mean(per_anchor, valid)


class AlignmentTask(tf.keras.layers.Layer, tfrs.tasks.base.Task):
    """Multi-modal alignment along the sequence, L_align (SEMINAR PSU; docs/design.md §4).

    L_align = Σ_{(i,j)} L_CLIP(x̂^(i), x̂^(j)) with L_CLIP the chunked, symmetric CLIP loss of
    ``chunked_clip_loss`` (N_ch chunks, O(L²/N_ch)). The paper writes Σ_i Σ_{j≠i} over ordered pairs of
    {text, image, attributes}; since L_CLIP is symmetric that counts every unordered pair twice, and this
    task sums each unordered pair once, i.e. it is the paper's L_align / 2 (pass both orders in
    ``channel_pairs`` to get the paper's factor).

    ``channel_pairs=None`` aligns every unordered pair of the channels present among text / image /
    attributes (in that order); explicit pairs whose channels are missing from the input are skipped, so
    a dataset without images still trains. Fewer than two channels give loss 0.

    ``negatives="batch"`` takes the negatives of step l from the other users' step l instead (no chunks): the
    sequence's own steps share its topics, so contrasting against them teaches the channels item identity rather
    than topic (the demo world's retrieval needs topic; the notes of issue 14).

    Shapes: channel_embeddings {channel: [B, L, d]}, mask [B, L]; returns a scalar.
    Metrics: ``{prefix}loss`` and ``{prefix}accuracy`` (top-1 of x̂^(i)_l → x̂^(j)_l inside its chunk).

    Example:
        task = AlignmentTask(num_chunks=4, temperature=0.07)
        loss = task({"text": text_seq, "image": image_seq, "attributes": attr_seq}, history_mask)
    """

    def __init__(
        self,
        channel_pairs: Optional[Sequence[Tuple[str, str]]] = None,
        num_chunks: int = 1,
        temperature: float = 0.07,
        metric_prefix: str = "alignment_",
        negatives: str = "sequence",
        name: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if negatives not in ALIGN_NEGATIVES:
            raise ValueError(f"negatives must be one of {ALIGN_NEGATIVES}, got {negatives!r}")
        self.negatives = negatives
        if channel_pairs is not None:
            channel_pairs = tuple((str(a), str(b)) for a, b in channel_pairs)
            for a, b in channel_pairs:
                if a == b:
                    raise ValueError(f"channel pair ({a!r}, {b!r}) aligns a channel with itself")
        if int(num_chunks) < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.channel_pairs = channel_pairs
        self.num_chunks = int(num_chunks)
        self.temperature = float(temperature)
        self.metric_prefix = metric_prefix
        self.loss_metric = tf.keras.metrics.Mean(name=f"{metric_prefix}loss")
        self.accuracy_metric = tf.keras.metrics.Mean(name=f"{metric_prefix}accuracy")

    def active_pairs(self, channels: Sequence[str]) -> List[Tuple[str, str]]:
        """The channel pairs aligned when ``channels`` are present."""
        present = set(channels)
        if self.channel_pairs is not None:
            return [(a, b) for a, b in self.channel_pairs if a in present and b in present]
        ordered = [c for c in ALIGNMENT_CHANNELS if c in present]
        return [(a, b) for n, a in enumerate(ordered) for b in ordered[n + 1:]]

    def call(
        self, channel_embeddings: Mapping[str, tf.Tensor], mask: tf.Tensor, compute_metrics: bool = True,
        ids: Optional[tf.Tensor] = None, present: Optional[Mapping[str, tf.Tensor]] = None,
    ) -> tf.Tensor:
        """``ids`` [B, L] (item indices, optional): positions holding the anchor's own item are no negatives.
        ``present`` {channel: [B, L] bool} (optional): where a channel's content exists (an item's image may be
        missing); a pair of channels is aligned only at the steps that have both, as anchors and as negatives."""
        pairs = self.active_pairs(list(channel_embeddings))
        num_chunks = self.num_chunks
        present = dict(present or {})
        if self.negatives == "batch":  # position l of every user is one "sequence": negatives from other users
            channel_embeddings = {c: tf.transpose(x, [1, 0, 2]) for c, x in channel_embeddings.items()}
            mask = tf.transpose(mask)
            ids = None if ids is None else tf.transpose(ids)
            present = {c: tf.transpose(p) for c, p in present.items()}
            num_chunks = 1
        loss = tf.constant(0.0, tf.float32)
        valid_all, correct_all = [], []
        for a, b in pairs:
            pair_mask = tf.cast(mask, tf.bool)
            for channel in (a, b):
                if channel in present:
                    pair_mask &= tf.cast(present[channel], tf.bool)
            per_anchor, valid, correct = _chunked_clip_terms(
                channel_embeddings[a], channel_embeddings[b], pair_mask, num_chunks, self.temperature, ids
            )
            loss += _weighted_mean(per_anchor, valid)
            valid_all.append(valid)
            correct_all.append(correct)
        if not compute_metrics:
            return loss
        update_ops = [self.loss_metric.update_state(loss)]
        if correct_all:
            update_ops.append(
                self.accuracy_metric.update_state(
                    tf.concat(correct_all, axis=0), sample_weight=tf.concat(valid_all, axis=0)
                )
            )
        return _finish(loss, update_ops)

    def get_config(self) -> Dict:
        config = super().get_config()
        config.update(
            channel_pairs=None if self.channel_pairs is None else [list(p) for p in self.channel_pairs],
            num_chunks=self.num_chunks,
            temperature=self.temperature,
            metric_prefix=self.metric_prefix,
            negatives=self.negatives,
        )
        return config


class QueryItemRelevanceTask(tf.keras.layers.Layer, tfrs.tasks.base.Task):
    """Query-item relevance, L_query-item = Σ_l L_ce(y_l; x_l^query, Σ_m γ_m x_l^item(m)) (SEMINAR PSU).

    Every valid position l (pass a mask that is true only where the query is non-empty, i.e. query index
    > ``schema.EMPTY_QUERY_INDEX``) gives a matched pair (label 1). The task builds one mismatched pair
    (label 0) per matched pair itself: the valid positions of the whole batch are flattened and each query
    is paired with the item of another valid position, by a roll with a random shift in [1, n-1] drawn
    from a seeded ``tf.random.Generator`` (a roll never pairs a query with its own position); when
    ``item_ids`` are given, negatives whose item equals the positive's item are dropped.

    logit = s·<x^query, x^item> with s = exp(log_scale) (learned when ``learnable_scale``), and
    loss = BCE(label, sigmoid(logit)) averaged over the kept pairs. Sign: the positive pair is pushed
    to a large logit. The authors' public code has a sign-inverted form of this loss (it rewards
    mismatched pairs); this task uses the standard BCE, and a test checks that a perfectly separating
    embedding gets ≈0 loss while the inverted sign gets a high one. Implemented with
    ``tfrs.tasks.Ranking`` (sum-reduced BCE, normalized by the number of kept pairs).

    Shapes: query_embeddings [B, L, d], item_embeddings [B, L, d] (the gated item vector
    Σ_m γ_m x^item(m)), mask [B, L], item_ids [B, L] (optional); returns a scalar. ``negative_shift``
    replaces the random roll by a fixed one (deterministic evaluation, tests); a shift that is a multiple
    of n pairs every query with its own item, which ``item_ids`` then drops.
    Metrics: ``{prefix}auc`` (matched vs mismatched) and ``{prefix}loss``.

    Example:
        task = QueryItemRelevanceTask(seed=7)
        loss = task(query_seq, merged_item_seq, query_ids > schema.EMPTY_QUERY_INDEX, item_ids=item_ids)
    """

    def __init__(
        self,
        learnable_scale: bool = False,
        initial_scale: float = 1.0,
        seed: int = 0,
        metric_prefix: str = "query_item_",
        name: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if initial_scale <= 0:
            raise ValueError(f"initial_scale must be > 0, got {initial_scale}")
        self.learnable_scale = bool(learnable_scale)
        self.initial_scale = float(initial_scale)
        self.seed = int(seed)
        self.metric_prefix = metric_prefix
        self.log_scale = self.add_weight(
            name="log_scale",
            shape=(),
            initializer=tf.keras.initializers.Constant(math.log(self.initial_scale)),
            trainable=self.learnable_scale,
        )
        self._rng = tf.random.Generator.from_seed(self.seed)
        self._ranking = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.SUM),
            metrics=[tf.keras.metrics.AUC(name=f"{metric_prefix}auc", from_logits=True)],
        )
        self.loss_metric = tf.keras.metrics.Mean(name=f"{metric_prefix}loss")

    def call(
        self,
        query_embeddings: tf.Tensor,
        item_embeddings: tf.Tensor,
        mask: tf.Tensor,
        item_ids: Optional[tf.Tensor] = None,
        negative_shift: Optional[int] = None,
        compute_metrics: bool = True,
    ) -> tf.Tensor:
        query = tf.cast(query_embeddings, tf.float32)
        item = tf.cast(item_embeddings, tf.float32)
        dim = tf.shape(query)[-1]
        valid = tf.reshape(tf.cast(mask, tf.float32) > 0, [-1])
        queries = tf.boolean_mask(tf.reshape(query, [-1, dim]), valid)  # [n, d]
        items = tf.boolean_mask(tf.reshape(item, [-1, dim]), valid)
        count = tf.shape(queries)[0]

        if negative_shift is None:
            shift = 1 + self._rng.uniform([], 0, tf.maximum(count - 1, 1), dtype=tf.int32)  # in [1, n-1]
        else:
            shift = tf.math.floormod(tf.cast(negative_shift, tf.int32), tf.maximum(count, 1))
        negative_items = tf.roll(items, -shift, axis=0)  # query k meets item (k + shift) mod n
        negative_weight = tf.fill([count], tf.cast(count >= 2, tf.float32))
        if item_ids is not None:
            ids = tf.boolean_mask(tf.reshape(item_ids, [-1]), valid)
            negative_weight *= tf.cast(tf.not_equal(ids, tf.roll(ids, -shift, axis=0)), tf.float32)

        scale = tf.exp(self.log_scale)
        positive_logits = scale * tf.reduce_sum(queries * items, axis=-1)
        negative_logits = scale * tf.reduce_sum(queries * negative_items, axis=-1)
        labels = tf.concat([tf.ones([count]), tf.zeros([count])], axis=0)[:, None]
        logits = tf.concat([positive_logits, negative_logits], axis=0)[:, None]
        weights = tf.concat([tf.ones([count]), negative_weight], axis=0)[:, None]
        loss_sum = self._ranking(labels, logits, sample_weight=weights, compute_metrics=compute_metrics)
        loss = tf.math.divide_no_nan(loss_sum, tf.reduce_sum(weights))
        if not compute_metrics:
            return loss
        return _finish(loss, [self.loss_metric.update_state(loss)])

    def get_config(self) -> Dict:
        config = super().get_config()
        config.update(
            learnable_scale=self.learnable_scale,
            initial_scale=self.initial_scale,
            seed=self.seed,
            metric_prefix=self.metric_prefix,
        )
        return config


class ContentIdContrastiveTask(tf.keras.layers.Layer, tfrs.tasks.base.Task):
    """Content-ID contrastive loss (EM3): in-batch InfoNCE both ways between content and ID embeddings.

    L = 0.5·(CE(content→id) + CE(id→content)), logits = ĉ êᵀ / temperature over the batch (ĉ, ê
    L2-normalized when ``normalize``), the row's own ID embedding is the positive. Other rows with the same
    id (duplicates of one item in the batch) and rows with sample weight 0 are masked out as negatives.
    The loss is the sample-weighted mean over rows.

    Shapes: content_embeddings [B, d], id_embeddings [B, d], ids [B] (optional), sample_weight [B];
    returns a scalar. Metrics: ``{prefix}accuracy`` (top-1 content→id) and ``{prefix}loss``.

    Example:
        task = ContentIdContrastiveTask(temperature=0.1)
        loss = task(fused_content_embedding, item_id_embedding, ids=item_ids)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        normalize: bool = True,
        metric_prefix: str = "content_id_",
        name: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.normalize = bool(normalize)
        self.metric_prefix = metric_prefix
        self.accuracy_metric = tf.keras.metrics.Mean(name=f"{metric_prefix}accuracy")
        self.loss_metric = tf.keras.metrics.Mean(name=f"{metric_prefix}loss")

    def call(
        self,
        content_embeddings: tf.Tensor,
        id_embeddings: tf.Tensor,
        ids: Optional[tf.Tensor] = None,
        sample_weight: Optional[tf.Tensor] = None,
        compute_metrics: bool = True,
    ) -> tf.Tensor:
        content = tf.cast(content_embeddings, tf.float32)
        id_emb = tf.cast(id_embeddings, tf.float32)
        if self.normalize:
            content = tf.math.l2_normalize(content, axis=-1)
            id_emb = tf.math.l2_normalize(id_emb, axis=-1)
        weights = _row_weights(sample_weight, content)
        logits = tf.matmul(content, id_emb, transpose_b=True) / self.temperature  # [B, B]

        row_valid = weights > 0
        pair_valid = row_valid[:, None] & row_valid[None, :]
        if ids is not None:
            ids = tf.reshape(ids, [-1])
            distinct = tf.not_equal(ids[:, None], ids[None, :]) | tf.cast(tf.eye(tf.shape(ids)[0]), tf.bool)
            pair_valid &= distinct
        masked = tf.where(pair_valid, logits, MASKED_LOGIT)
        content_to_id = -tf.linalg.diag_part(tf.nn.log_softmax(masked, axis=-1))
        id_to_content = -tf.linalg.diag_part(tf.nn.log_softmax(masked, axis=-2))
        loss = _weighted_mean(0.5 * (content_to_id + id_to_content), weights)
        if not compute_metrics:
            return loss
        correct = tf.equal(tf.argmax(masked, axis=-1, output_type=tf.int32), tf.range(tf.shape(masked)[0]))
        update_ops = [
            self.accuracy_metric.update_state(tf.cast(correct, tf.float32), sample_weight=weights),
            self.loss_metric.update_state(loss),
        ]
        return _finish(loss, update_ops)

    def get_config(self) -> Dict:
        config = super().get_config()
        config.update(temperature=self.temperature, normalize=self.normalize, metric_prefix=self.metric_prefix)
        return config
