"""Config → SEMINAR's parts: ModelConfig + dataset metadata → the content encoder, the PSU model, SEMINAR.

The architectures built on these parts (the baselines, ``seminar_tf.models.em3``) import this module;
``seminar_tf.models.builders`` maps ``ModelConfig.architecture`` to all of them.
"""

from __future__ import annotations

from typing import List, Optional

from seminar_tf import schema
from seminar_tf.config import ModelConfig
from seminar_tf.data.reader import ItemTable, QueryTable
from seminar_tf.models.content import ContentEncoder
from seminar_tf.models.psu import PSUModel
from seminar_tf.models.seminar import SeminarModel


def resolve_channels(config: ModelConfig, metadata: schema.DatasetMetadata) -> List[str]:
    """Channels the model uses: the config's (all by default) among those the dataset has."""
    wanted = list(config.channels) or list(schema.CHANNELS)
    unknown = [c for c in wanted if c not in schema.CHANNELS]
    if unknown:
        raise ValueError(f"model.channels has unknown channels {unknown}; choose from {schema.CHANNELS}")
    channels = [c for c in schema.CHANNELS if c in wanted and c in metadata.channels]
    if not channels:
        raise ValueError(f"none of the channels {wanted} is in the dataset (it has {metadata.channels})")
    return channels


def build_content_encoder(config: ModelConfig, metadata: schema.DatasetMetadata,
                          item_table: Optional[ItemTable] = None,
                          query_table: Optional[QueryTable] = None) -> ContentEncoder:
    attribute_sizes = [metadata.num_items] + [metadata.item_attributes[n] for n in sorted(metadata.item_attributes)]
    content = ContentEncoder(
        num_items=metadata.num_items, num_queries=metadata.num_queries, num_tokens=metadata.num_tokens,
        title_length=metadata.max_title_tokens, query_length=metadata.max_query_tokens,
        image_dim=metadata.image_dim, attribute_vocab_sizes=attribute_sizes,
        channels=resolve_channels(config, metadata), dim=config.dim, token_dim=config.token_dim,
        dropout=config.dropout, missing_image=config.missing_image, name="content")
    if item_table is not None and query_table is not None:
        content.set_tables(item_table.title_tokens, item_table.attributes, query_table.tokens,
                           item_table.image_embedding)
    return content


def build_psu(config: ModelConfig, metadata: schema.DatasetMetadata, item_table: Optional[ItemTable] = None,
              query_table: Optional[QueryTable] = None) -> PSUModel:
    content = build_content_encoder(config, metadata, item_table, query_table)
    return PSUModel(
        content, num_heads=config.num_heads, next_pair_temperature=config.next_pair_temperature,
        align_chunks=config.align_chunks, align_temperature=config.align_temperature,
        next_pair_weight=config.next_pair_weight, align_weight=config.align_weight,
        relevance_weight=config.relevance_weight, align_projection=config.align_projection,
        align_negatives=config.align_negatives, seed=config.seed)


def id_arguments(config: ModelConfig, metadata: schema.DatasetMetadata) -> dict:
    """The id/feedback constructor arguments of ``SeminarModel`` (and every baseline): user ids only when the
    dataset has a user vocabulary, feedback only when its history steps carry more than one kind of feedback
    (a feedback that is always "click" says nothing)."""
    informative_feedback = metadata.num_feedback > len(schema.RESERVED) + 1
    return dict(num_users=metadata.num_users if config.use_user_id else 0, user_id_dim=config.user_id_dim,
                use_item_id=config.use_item_id,
                num_feedback=metadata.num_feedback if config.use_feedback and informative_feedback else 0,
                embedding_l2=config.embedding_l2, recent_history=config.recent_history, id_dropout=config.id_dropout,
                affinity_column=(attribute_column(metadata, config.category_attribute)
                                 if config.category_affinity or config.gsu_category_prior else 0),
                category_affinity=config.category_affinity, gsu_category_prior=config.gsu_category_prior,
                item_statistics_folds=config.item_statistics_folds,
                item_statistics_columns=len(config.item_statistics_columns))


def attribute_column(metadata: schema.DatasetMetadata, attribute: str) -> int:
    """Column of the item attribute ``attribute`` in the item table / ``ContentEncoder.attributes``."""
    names = sorted(metadata.item_attributes)
    if attribute not in names:
        raise ValueError(f"model.category_attribute {attribute!r} is not an item attribute of the dataset; it has "
                         f"{names} (set model.category_attribute in the --config file)")
    return 1 + names.index(attribute)  # column 0 is the item id (ItemTable.attributes)


def build_seminar(config: ModelConfig, metadata: schema.DatasetMetadata, item_table: Optional[ItemTable] = None,
                  query_table: Optional[QueryTable] = None) -> SeminarModel:
    content = build_content_encoder(config, metadata, item_table, query_table)
    return SeminarModel(
        content, num_heads=config.num_heads, top_k=config.top_k, gsu=config.gsu,
        user_attribute_sizes=dict(metadata.user_attributes), user_embedding_dim=config.user_embedding_dim,
        tower_units=config.tower_units, aux_weight=config.aux_weight, aux_scope=config.aux_scope,
        use_history=config.use_history,
        freeze_content=config.freeze_content, freeze_projections=config.freeze_projections,
        dropout=config.dropout, pq_subspaces=config.pq_subspaces, pq_centroids=config.pq_centroids,
        pq_jit_compile=config.pq_jit_compile, pq_rerank=config.pq_rerank, gsu_identity_init=config.gsu_identity_init,
        ranking_weight=config.ranking_weight, **id_arguments(config, metadata))


def given(argument, field):
    """An explicit builder argument, else the ModelConfig field."""
    return field if argument is None else argument


def seminar_arguments(config: ModelConfig, metadata: schema.DatasetMetadata) -> dict:
    """The ``SeminarModel`` arguments every architecture shares (heads, K, tower, freezing, ids)."""
    return dict(num_heads=config.num_heads, top_k=config.top_k,
                user_attribute_sizes=dict(metadata.user_attributes), user_embedding_dim=config.user_embedding_dim,
                tower_units=config.tower_units, use_history=config.use_history,
                freeze_content=config.freeze_content, freeze_projections=config.freeze_projections,
                dropout=config.dropout, ranking_weight=config.ranking_weight, **id_arguments(config, metadata))
