"""Training tasks: each owns its loss and metrics (TFRS style); models call them from ``compute_loss``."""

from seminar_tf.tasks.pretrain import (
    ALIGNMENT_CHANNELS,
    AlignmentTask,
    ContentIdContrastiveTask,
    NextPairTask,
    QueryItemRelevanceTask,
    chunked_clip_loss,
)
from seminar_tf.tasks.ranking import CTRTask, GSUAuxiliaryTask, UserRankingTask

__all__ = [
    "ALIGNMENT_CHANNELS",
    "AlignmentTask",
    "CTRTask",
    "ContentIdContrastiveTask",
    "GSUAuxiliaryTask",
    "NextPairTask",
    "QueryItemRelevanceTask",
    "UserRankingTask",
    "chunked_clip_loss",
]
