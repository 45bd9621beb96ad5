"""The one place where configs meet layers and models: ModelConfig + dataset metadata → Keras models.

``build_model`` maps ``ModelConfig.architecture`` to SEMINAR (``seminar_builders``), SEMINAR with the EM3 options
(``em3``) or a baseline (``baselines``); the parts' builders are re-exported here.
"""

from __future__ import annotations

from typing import Optional

from seminar_tf import schema
from seminar_tf.config import ModelConfig
from seminar_tf.data.reader import ItemTable, QueryTable
from seminar_tf.models import baselines, em3
from seminar_tf.models.seminar_builders import (attribute_column, build_content_encoder, build_psu, build_seminar,
                                               id_arguments, resolve_channels, seminar_arguments)


def build_model(config: ModelConfig, metadata: schema.DatasetMetadata, item_table: Optional[ItemTable] = None,
                query_table: Optional[QueryTable] = None):
    """The fine-tuning model named by ``config.architecture``: SEMINAR or one of the baselines.

    SEMINAR with ``fusion_queries`` > 0 or ``content_id_weight`` > 0 is ``em3.EM3SeminarModel`` (EM3's
    Fusion-Q-Former / content-ID loss); LoRA (``lora_rank``) is placed by ``experiment.finetune`` after the PSU
    restore. The EM3 options are SEMINAR's only: a baseline with one of them is an error.
    """
    config.validate()  # a baseline with an EM3 option is an error there
    if config.architecture != "seminar":
        return baselines.build_baseline(config.architecture, config, metadata, item_table, query_table)
    if config.fusion_queries or config.content_id_weight:
        return em3.build_em3_seminar(config, metadata, item_table, query_table)
    return build_seminar(config, metadata, item_table, query_table)


__all__ = ["attribute_column", "build_content_encoder", "build_model", "build_psu", "build_seminar",
           "id_arguments", "resolve_channels", "seminar_arguments"]
