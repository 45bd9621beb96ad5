"""Fine-tuning tasks (docs/design.md §4): the CTR / PSR loss L_ctr, the GSU auxiliary loss of SIM / TWIN and an
optional within-user pairwise ranking loss.

CTRTask and GSUAuxiliaryTask wrap ``tfrs.tasks.Ranking`` with a from-logits binary cross-entropy and AUC /
logloss metrics. The Ranking loss is sum-reduced and divided here by Σ sample_weight, so the loss is the
sample-weighted mean BCE: padding rows (weight 0) change neither its value nor its scale, it equals the
``logloss`` metric, and a sum reduction is what Keras allows under ``tf.distribute`` strategies.
"""

from typing import Dict, Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs


class _BinaryLogitTask(tf.keras.layers.Layer, tfrs.tasks.base.Task):
    """weight · Σ_i w_i BCE(y_i, σ(logit_i)) / Σ_i w_i, with ``{prefix}auc`` and ``{prefix}logloss``."""

    def __init__(self, weight: float, metric_prefix: str, name: Optional[str] = None, **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.weight = float(weight)
        self.metric_prefix = metric_prefix
        self._ranking = tfrs.tasks.Ranking(
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.SUM),
            metrics=[
                tf.keras.metrics.AUC(name=f"{metric_prefix}auc", from_logits=True),
                tf.keras.metrics.BinaryCrossentropy(name=f"{metric_prefix}logloss", from_logits=True),
            ],
        )

    def _binary_loss(
        self,
        labels: tf.Tensor,
        logits: tf.Tensor,
        sample_weight: Optional[tf.Tensor],
        compute_metrics: bool,
    ) -> tf.Tensor:
        # [B, 1] everywhere: Keras' BCE averages over the last axis, so 1-D [B] inputs would collapse to
        # one number before the sample weights are applied.
        labels = tf.reshape(tf.cast(labels, tf.float32), [-1, 1])
        logits = tf.reshape(tf.cast(logits, tf.float32), [-1, 1])
        if sample_weight is None:
            weights = tf.ones_like(labels)
        else:
            weights = tf.reshape(tf.cast(sample_weight, tf.float32), [-1, 1])
        loss_sum = self._ranking(labels, logits, sample_weight=weights, compute_metrics=compute_metrics)
        return self.weight * tf.math.divide_no_nan(loss_sum, tf.reduce_sum(weights))

    def get_config(self) -> Dict:
        config = super().get_config()
        config.update(weight=self.weight, metric_prefix=self.metric_prefix)
        return config


class CTRTask(_BinaryLogitTask):
    """CTR / PSR loss, L_ctr = Σ_i L_ce(y_i, ŷ_i) (SEMINAR fine-tuning; docs/design.md §4).

    Sample-weighted mean binary cross-entropy of the tower's logit, through
    ``tfrs.tasks.Ranking(loss=BinaryCrossentropy(from_logits=True), metrics=[AUC, logloss])``.

    Shapes: labels [B] (0/1), logits [B], sample_weight [B] (optional); returns a scalar.
    Metrics: ``{prefix}auc`` and ``{prefix}logloss`` (weighted), i.e. ``auc`` / ``logloss`` by default.

    Example:
        task = CTRTask()
        loss = task(features[schema.LABEL], outputs["logit"], sample_weight=weights)
    """

    def __init__(self, weight: float = 1.0, metric_prefix: str = "", name: Optional[str] = None, **kwargs) -> None:
        super().__init__(weight=weight, metric_prefix=metric_prefix, name=name, **kwargs)

    def call(
        self,
        labels: tf.Tensor,
        logits: tf.Tensor,
        sample_weight: Optional[tf.Tensor] = None,
        compute_metrics: bool = True,
    ) -> tf.Tensor:
        return self._binary_loss(labels, logits, sample_weight, compute_metrics)


class GSUAuxiliaryTask(_BinaryLogitTask):
    """Auxiliary CTR loss that trains the GSU's scores (SIM soft search / TWIN; docs/design.md §4).

    The GSU's relevance scores over the whole history are otherwise trained only through the hard top-K,
    which passes no gradient to them. As in SIM's soft-search unit, the model forms a soft retrieval
    representation u = Σ_l softmax(score)_l · v_l over all L pairs, maps (u, target) to one logit
    ``aux_logit`` (e.g. a dot product with the target, or a small head), and this task adds
    weight · BCE(label, σ(aux_logit)) (sample-weighted mean) to the CTR loss. The task itself only sees
    the logit, so any GSU (exact, PQ, SimHash) fits.

    Shapes: labels [B], aux_logits [B], sample_weight [B] (optional); returns a scalar.
    Metrics (unweighted by ``weight``): ``{prefix}auc``, ``{prefix}logloss``, default prefix ``gsu_aux_``.

    Example:
        task = GSUAuxiliaryTask(weight=0.1)
        loss = ctr_task(labels, outputs["logit"]) + task(labels, outputs["gsu_aux_logit"])
    """

    def __init__(
        self, weight: float = 1.0, metric_prefix: str = "gsu_aux_", name: Optional[str] = None, **kwargs
    ) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        super().__init__(weight=weight, metric_prefix=metric_prefix, name=name, **kwargs)

    def call(
        self,
        labels: tf.Tensor,
        aux_logits: tf.Tensor,
        sample_weight: Optional[tf.Tensor] = None,
        compute_metrics: bool = True,
    ) -> tf.Tensor:
        return self._binary_loss(labels, aux_logits, sample_weight, compute_metrics)


class UserRankingTask(tf.keras.layers.Layer, tfrs.tasks.base.Task):
    """Within-user pairwise ranking loss (RankNet over the batch; Sculley's combined regression and ranking).

    The pointwise L_ctr is dominated by how often a user clicks at all (the user id alone moves AUC by
    0.04), which says nothing about which of a user's items comes first: GAUC. This loss ranks inside a user:
    over the batch's pairs (i, j) of one group (user) with y_i > y_j,

        L_rank = weight · Σ w_i w_j log(1 + exp(-(s_i - s_j))) / Σ w_i w_j,

    0 when the batch has no such pair. It is added to L_ctr, which keeps the logits calibrated.

    Shapes: labels [B], logits [B], groups [B] (any dtype tf.equal compares, e.g. the raw user id bytes),
    sample_weight [B] (optional); returns a scalar. Metric ``{prefix}pairs``: mean pairs per batch.

    Example:
        task = UserRankingTask(weight=0.5)
        loss = ctr_task(labels, logits) + task(labels, logits, features[schema.CTX_USER_ID])
    """

    def __init__(self, weight: float = 1.0, metric_prefix: str = "user_rank_", name: Optional[str] = None,
                 **kwargs) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        super().__init__(name=name, **kwargs)
        self.weight = float(weight)
        self.metric_prefix = metric_prefix
        self.pairs = tf.keras.metrics.Mean(name=f"{metric_prefix}pairs")

    def call(self, labels: tf.Tensor, logits: tf.Tensor, groups: tf.Tensor, sample_weight: Optional[tf.Tensor] = None,
             compute_metrics: bool = True) -> tf.Tensor:
        labels = tf.reshape(tf.cast(labels, tf.float32), [-1])
        logits = tf.reshape(tf.cast(logits, tf.float32), [-1])
        groups = tf.reshape(groups, [-1])
        weights = (tf.ones_like(labels) if sample_weight is None
                   else tf.reshape(tf.cast(sample_weight, tf.float32), [-1]))
        ordered = tf.logical_and(tf.equal(groups[:, None], groups[None, :]), labels[:, None] > labels[None, :])
        pair_weights = tf.cast(ordered, tf.float32) * weights[:, None] * weights[None, :]
        pair_losses = tf.nn.softplus(logits[None, :] - logits[:, None])  # -log σ(s_i - s_j)
        if compute_metrics:
            self.pairs.update_state(tf.reduce_sum(tf.cast(pair_weights > 0, tf.float32)))
        return self.weight * tf.math.divide_no_nan(tf.reduce_sum(pair_weights * pair_losses),
                                                   tf.reduce_sum(pair_weights))

    def get_config(self) -> Dict:
        config = super().get_config()
        config.update(weight=self.weight, metric_prefix=self.metric_prefix)
        return config
