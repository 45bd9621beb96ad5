"""SEMINAR with the EM3 options (docs/design.md §4): Fusion-Q-Former channels and the content-ID contrastive loss.

LoRA adapters are placed on the restored content encoder with ``seminar_tf.layers.em3.apply_lora``
(``seminar_tf.experiment`` does it after the PSU restore).
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from seminar_tf import schema
from seminar_tf.config import ModelConfig
from seminar_tf.data.reader import ItemTable, QueryTable
from seminar_tf.layers import ChannelGate
from seminar_tf.layers.em3 import FusionQFormer
from seminar_tf.models import seminar_builders
from seminar_tf.models.content import ContentEncoder
from seminar_tf.models.psu import history_mask, per_replica_loss
from seminar_tf.models.seminar import ChannelProjection, SeminarModel
from seminar_tf.models.seminar_builders import given, seminar_arguments
from seminar_tf.tasks import ContentIdContrastiveTask


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class EM3SeminarModel(SeminarModel):
    """SEMINAR with EM3's Fusion-Q-Former channels and content-ID contrastive loss.

    - ``fusion``: a ``FusionQFormer`` (dim = content.dim) reads each item's content modalities (text and
      image channels) and replaces them by ``fusion.num_queries`` fused channels, so the model's channels are
      [query] + fused_0..fused_{Q-1} + [attributes] (those present); G_j and the gate follow that list. It
      runs once per distinct item of a call, as the content encoders do.
    - ``content_id_weight`` > 0 adds weight · ``ContentIdContrastiveTask`` (in-batch InfoNCE both ways)
      between each target item's content embedding c (the fused pooled embedding, or the mean of the text /
      image channels without fusion) and its ID embedding e = (item-id embedding of the attribute encoder)
      W_id, a d-wide projection.

    The fused channels enter through ``encode_history`` and ``_targets`` / ``encode_targets`` (the hooks
    ``SeminarModel.score_pairs`` encodes through). Other arguments are ``SeminarModel``'s. LoRA:
    ``apply_lora(model.content, rank)`` after restoring PSU weights (``experiment.finetune`` does it when
    ``ModelConfig.lora_rank`` > 0; see ``seminar_tf.layers.em3``).

    Example:

    ```python
    fusion = FusionQFormer(num_queries=2, num_layers=1, num_heads=2, dim=content.dim)
    model = EM3SeminarModel(content, fusion=fusion, content_id_weight=0.1, top_k=50)
    ```
    """

    def __init__(
        self,
        content: ContentEncoder,
        fusion: Optional[FusionQFormer] = None,
        content_id_weight: float = 0.0,
        content_id_temperature: float = 0.1,
        **kwargs,
    ):
        super().__init__(content, **kwargs)
        self.modalities = [c for c in (schema.TEXT_CHANNEL, schema.IMAGE_CHANNEL) if c in content.channels]
        if (fusion is not None or content_id_weight) and not self.modalities:
            raise ValueError("Fusion-Q-Former and the content-ID loss need a text or image channel; the model has "
                             f"{content.channels}")
        self.fusion = fusion
        if fusion is not None:
            if fusion.dim != content.dim:
                raise ValueError(f"FusionQFormer dim {fusion.dim} must equal the content dim {content.dim}")
            if self.gsu_mode != "exact":
                raise ValueError(f"the Fusion-Q-Former channels need gsu='exact', got {self.gsu_mode!r}")
            self.pq = None  # codebooks would cover the content channels, not the fused ones
            self.channels = (
                [c for c in content.channels if c == schema.QUERY_CHANNEL]
                + [f"fused_{i}" for i in range(fusion.num_queries)]
                + [c for c in content.channels if c == schema.ATTRIBUTES_CHANNEL])
            self.projection = ChannelProjection(len(self.channels), content.dim, name="gsu_projection")
            self.projection.trainable = not kwargs.get("freeze_projections", False)
            self.gate = ChannelGate(len(self.channels), mode="dynamic", name="gate")
            self.retriever = self._gsu_retriever(self.gsu_mode)  # exact inference over the stored fused channels
        self.content_id_weight = float(content_id_weight)
        self.content_id_task = None
        if self.content_id_weight:
            if schema.ATTRIBUTES_CHANNEL not in content.channels:
                raise ValueError("the content-ID loss needs the attributes channel (it holds the item-id embedding)")
            self.id_projection = tf.keras.layers.Dense(content.dim, use_bias=False, name="id_projection")
            # Built now: only compute_loss uses it, and Keras' optimizer must see its kernel from the first step.
            self.id_projection.build([None, content.attribute_encoder.embedding_dim])
            self.content_id_task = ContentIdContrastiveTask(content_id_temperature, name="content_id")

    # ------------------------------------------------------------------------------------------- channels
    def _fused_items(self, item_indices, training=None):
        """Fused item channels of items [...]: {"tokens": [..., Q, d], "pooled": [..., d], "attributes": [..., d]
        (when the model has that channel)}; content is encoded and fused once per distinct item."""
        unique, position = tf.unique(tf.reshape(tf.cast(item_indices, tf.int32), [-1]))
        encoded = self.content.encode_items(unique, training=training)
        tokens, pooled = self.fusion(tf.stack([encoded[m] for m in self.modalities], axis=-2), training=training)
        fused = {"tokens": tokens, "pooled": pooled}
        if schema.ATTRIBUTES_CHANNEL in self.channels:
            fused[schema.ATTRIBUTES_CHANNEL] = encoded[schema.ATTRIBUTES_CHANNEL]
        shape = tf.shape(item_indices)
        return {name: tf.reshape(tf.gather(value, position), tf.concat([shape, tf.shape(value)[1:]], 0))
                for name, value in fused.items()}

    def pair_channels(self, queries, items, training=None, query_tokens=None):
        """The model's channels [..., C, d] of (query, item) pairs before G_j (content, or fused content)."""
        if self.fusion is None:
            return self.content(queries, items, training=training, query_tokens=query_tokens)
        fused = self._fused_items(items, training)
        parts = []
        if schema.QUERY_CHANNEL in self.channels:
            query = self.content.query_channel(queries, query_tokens, training=training)
            parts.append(query[..., None, :])
        parts.append(fused["tokens"])
        if schema.ATTRIBUTES_CHANNEL in self.channels:
            parts.append(fused[schema.ATTRIBUTES_CHANNEL][..., None, :])
        return tf.concat(parts, axis=-2)

    def _channels_are_content(self) -> bool:
        return getattr(self, "fusion", None) is None  # None also while SeminarModel.__init__ builds the GSU

    def encode_history(self, features, training=None):
        if self.fusion is None:
            return super().encode_history(features, training)
        channels = self.pair_channels(features[schema.SEQ_HISTORY_QUERY], features[schema.SEQ_HISTORY_ITEM],
                                      training, features.get(schema.HISTORY_QUERY_TOKENS))
        return self.projection(channels), history_mask(features)

    def _targets(self, queries, items, training=None, query_tokens=None):
        """(channels before G_j [B, N, C, d], q_t [B, N, d], γ [B, N, C]); SeminarModel.score_pairs' hook."""
        if self.fusion is None:
            return super()._targets(queries, items, training, query_tokens)
        stored = self.pair_channels(queries, items, training, query_tokens)
        target = self.projection(stored)  # [B, N, C, d]
        flat = tf.reshape(target, [-1, len(self.channels), self.content.dim])
        gamma = tf.reshape(self.gate(flat), tf.shape(target)[:-1])
        return stored, tf.einsum("bncd,bnc->bnd", target, gamma), gamma

    def encode_targets(self, queries, items, training=None, query_tokens=None):
        if self.fusion is None:
            return super().encode_targets(queries, items, training, query_tokens)
        _, q_t, gamma = self._targets(queries, items, training, query_tokens)
        return q_t, gamma

    # ------------------------------------------------------------------------------------------- content-ID
    def content_id_embeddings(self, items, training=None):
        """(content c [..., d], ID e [..., d]) of items [...] for the content-ID contrastive loss."""
        if self.fusion is not None:
            content = self._fused_items(items, training)["pooled"]
        else:
            encoded = self.content.encode_items(items, training=training)
            content = tf.add_n([encoded[m] for m in self.modalities]) / len(self.modalities)
        item_ids = self.content.attribute_encoder.embeddings[0](tf.cast(items, tf.int32))  # column 0: item id
        return content, self.id_projection(item_ids)

    def compute_loss(self, features, training=False) -> tf.Tensor:
        loss = super().compute_loss(features, training)
        if self.content_id_task is None:
            return loss
        items = features[schema.CTX_TARGET_ITEM]
        content, ids = self.content_id_embeddings(items, training)
        return loss + per_replica_loss(self.content_id_weight * self.content_id_task(content, ids, ids=items))



def build_em3_seminar(
    model_config: ModelConfig,
    metadata: schema.DatasetMetadata,
    item_table: Optional[ItemTable] = None,
    query_table: Optional[QueryTable] = None,
    *,
    fusion_queries: Optional[int] = None,
    fusion_layers: Optional[int] = None,
    content_id_weight: Optional[float] = None,
    content_id_temperature: Optional[float] = None,
) -> EM3SeminarModel:
    """SEMINAR with EM3 options: ``fusion_queries`` > 0 adds a Fusion-Q-Former of that many queries and
    ``fusion_layers`` layers (default 1); ``content_id_weight`` > 0 adds the content-ID contrastive loss
    (temperature default 0.1). Each option: the argument, else the ``ModelConfig`` field of the same name. LoRA is
    applied after restoring PSU weights: ``apply_lora(model.content, rank, alpha, targets)``."""
    fusion_queries = int(given(fusion_queries, model_config.fusion_queries))
    fusion_layers = int(given(fusion_layers, model_config.fusion_layers))
    content = seminar_builders.build_content_encoder(model_config, metadata, item_table, query_table)
    fusion = (FusionQFormer(fusion_queries, fusion_layers, model_config.num_heads, model_config.dim,
                            dropout=model_config.dropout, name="fusion_qformer") if fusion_queries else None)
    weight = float(given(content_id_weight, model_config.content_id_weight))
    temperature = float(given(content_id_temperature, model_config.content_id_temperature))
    return EM3SeminarModel(
        content, fusion=fusion, content_id_weight=weight, content_id_temperature=temperature,
        aux_weight=model_config.aux_weight, aux_scope=model_config.aux_scope, gsu=model_config.gsu,
        pq_subspaces=model_config.pq_subspaces, pq_centroids=model_config.pq_centroids,
        pq_jit_compile=model_config.pq_jit_compile, pq_rerank=model_config.pq_rerank,
        gsu_identity_init=model_config.gsu_identity_init,
        **seminar_arguments(model_config, metadata))


__all__ = ["EM3SeminarModel", "build_em3_seminar"]
