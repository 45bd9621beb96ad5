"""The Pretraining Search Unit (PSU): SEMINAR's pretraining model over lifelong query-item pair sequences.

L_PSU = L_next^pair + L_align + L_query-item (paper, "Pretraining Search Unit"), each a task that owns its
loss and metrics. The history x_{1:L-1} is merged over channels, x = Σ_m γ_m x^(m), and read by a
multi-head target attention whose query is a learned <EOS> vector (the slot the paper appends after
x_{1:L-1}); that representation must pick the true next pair x_L among sampled and in-batch negatives.
"""

from __future__ import annotations

from typing import Dict

import tensorflow as tf
import tensorflow_recommenders as tfrs

from seminar_tf import schema
from seminar_tf.layers import ChannelGate, MultiHeadTargetAttention, merge_channels
from seminar_tf.models.content import ContentEncoder
from seminar_tf.models.inputs import CONTEXT_INPUTS, PRETRAIN_INPUTS, SEQUENCE_INPUTS, check_features
from seminar_tf.tasks import AlignmentTask, NextPairTask, QueryItemRelevanceTask
from seminar_tf.tasks.pretrain import ALIGNMENT_CHANNELS


def history_mask(features) -> tf.Tensor:
    """bool [B, L]: True at the first ``history_length`` (real) steps of each row."""
    items = features[schema.SEQ_HISTORY_ITEM]
    length = tf.cast(features[schema.CTX_HISTORY_LENGTH], tf.int32)
    return tf.sequence_mask(length, tf.shape(items)[1]) & tf.not_equal(items, schema.PAD_INDEX)


def per_replica_loss(loss):
    """A replica's share of the loss: Keras sums replicas' gradients, so a per-replica mean is divided by
    the number of replicas in sync (1 outside tf.distribute, so single-device training is unchanged)."""
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    return loss / tf.cast(replicas, loss.dtype) if replicas > 1 else loss


def item_gamma(gamma, channels):
    """γ restricted to the item channels and renormalized: Σ_{m∈M} γ_m x^item(m) (relevance task)."""
    keep = tf.constant([c != schema.QUERY_CHANNEL for c in channels], tf.float32)
    restricted = gamma * keep
    return tf.math.divide_no_nan(restricted, tf.reduce_sum(restricted, axis=-1, keepdims=True))


class PSUModel(tfrs.Model):
    """SEMINAR's PSU pretraining model (TFRS style: ``compute_loss`` = call + tasks).

    Args:
      content: the shared ``ContentEncoder`` (its weights are what fine-tuning restores).
      num_heads: heads of the PSU target attention.
      next_pair_temperature / align_temperature: softmax temperatures.
      align_chunks: N_ch of the chunked CLIP loss.
      next_pair_weight / align_weight / relevance_weight: loss weights (1, 1, 1 in the paper).

    Example:

    ```python
    psu = PSUModel(content, num_heads=2)
    psu.compile(tf.keras.optimizers.Adam(1e-3))
    psu.fit(reader.make_dataset(data_dir, "pretrain", "train", 128), epochs=1)
    ```
    """

    def __init__(
        self,
        content: ContentEncoder,
        num_heads: int = 2,
        next_pair_temperature: float = 0.1,
        align_chunks: int = 4,
        align_temperature: float = 0.1,
        next_pair_weight: float = 1.0,
        align_weight: float = 1.0,
        relevance_weight: float = 1.0,
        align_projection: bool = False,
        align_negatives: str = "sequence",
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.content = content
        dim = content.dim
        self.channels = list(content.channels)
        self.gate = ChannelGate(len(self.channels), mode="static", name="psu_gate")
        self.attention = MultiHeadTargetAttention(num_heads, key_dim=dim, output_dim=dim, name="psu_attention")
        self.eos = self.add_weight(name="eos", shape=[dim], initializer="random_normal", trainable=True)
        self.sequence_projection = tf.keras.layers.Dense(dim, name="sequence_projection")
        self.next_pair_task = NextPairTask(temperature=next_pair_temperature, name="next_pair")
        self.alignment_task = AlignmentTask(num_chunks=align_chunks, temperature=align_temperature,
                                            negatives=align_negatives, name="alignment")
        self.relevance_task = QueryItemRelevanceTask(seed=seed, name="query_item")
        self.weights_by_loss = dict(next_pair=next_pair_weight, alignment=align_weight, relevance=relevance_weight)
        # Projection heads (SimCLR/CLIP): L_align acts on head(x^(i)) instead of x^(i), so its uniformity pressure
        # (every other step of the chunk pushed away) lands on the PSU-only heads, not on the channel embeddings
        # the GSU/ESU retrieve with.
        self.align_heads = ({c: tf.keras.Sequential([tf.keras.layers.Dense(dim, activation="relu"),
                                                     tf.keras.layers.Dense(dim)], name=f"align_head_{c}")
                             for c in self.channels if c in ALIGNMENT_CHANNELS} if align_projection else None)
        for head in (self.align_heads or {}).values():
            head.build((None, None, dim))  # built with the model, so checkpoints and get_weights see them

    def call(self, features, training=None) -> Dict[str, tf.Tensor]:
        check_features(features, SEQUENCE_INPUTS + CONTEXT_INPUTS + PRETRAIN_INPUTS)
        mask = history_mask(features)
        history = self.content(features[schema.SEQ_HISTORY_QUERY], features[schema.SEQ_HISTORY_ITEM],
                               training=training,
                               query_tokens=features.get(schema.HISTORY_QUERY_TOKENS))  # [B, L, C, d]
        target = self.content(features[schema.CTX_TARGET_QUERY], features[schema.CTX_TARGET_ITEM],
                              training=training, query_tokens=features.get(schema.TARGET_QUERY_TOKENS))  # [B, C, d]
        gamma = self.gate(target)  # static: the same γ for every row
        keys = merge_channels(history, gamma)  # [B, L, d]
        eos = tf.broadcast_to(self.eos, tf.shape(keys[:, 0]))
        sequence = self.sequence_projection(self.attention(eos, keys, mask=mask, training=training))
        outputs = {
            "sequence_embedding": sequence,
            "positive_embedding": merge_channels(target, gamma),
            "history_channels": history,
            "history_mask": mask,
            "gamma": gamma,
        }
        negatives = self.content(features[schema.CTX_NEGATIVE_QUERIES], features[schema.CTX_NEGATIVE_ITEMS],
                                 training=training)  # [B, N, C, d]
        outputs["negative_embeddings"] = merge_channels(negatives, gamma)
        return outputs

    def compute_loss(self, features, training=False) -> tf.Tensor:
        outputs = self(features, training=training)
        weights = self.weights_by_loss
        loss = weights["next_pair"] * self.next_pair_task(
            outputs["sequence_embedding"], outputs["positive_embedding"], outputs["negative_embeddings"],
            positive_ids=features[schema.CTX_TARGET_ITEM], negative_ids=features[schema.CTX_NEGATIVE_ITEMS])
        history, mask = outputs["history_channels"], outputs["history_mask"]
        by_channel = {c: history[:, :, i] for i, c in enumerate(self.channels)}
        if weights["alignment"]:
            aligned = by_channel if self.align_heads is None else {c: head(by_channel[c])
                                                                   for c, head in self.align_heads.items()}
            present = ({schema.IMAGE_CHANNEL: self.content.image_present(features[schema.SEQ_HISTORY_ITEM])}
                       if schema.IMAGE_CHANNEL in self.channels else None)  # no image, no image pair to align
            loss += weights["alignment"] * self.alignment_task(aligned, mask, ids=features[schema.SEQ_HISTORY_ITEM],
                                                               present=present)
        if weights["relevance"] and schema.QUERY_CHANNEL in self.channels:
            item_vectors = merge_channels(history, item_gamma(outputs["gamma"], self.channels))
            searched = mask & (features[schema.SEQ_HISTORY_QUERY] > schema.EMPTY_QUERY_INDEX)
            loss += weights["relevance"] * self.relevance_task(
                by_channel[schema.QUERY_CHANNEL], item_vectors, searched,
                item_ids=features[schema.SEQ_HISTORY_ITEM])
        return per_replica_loss(loss)
