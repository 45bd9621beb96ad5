"""A small in-memory dataset description shared by the model tests (no files, no pipeline run)."""

from seminar_tf import schema
from seminar_tf.config import ModelConfig
from seminar_tf.data import reader

METADATA = schema.DatasetMetadata(
    num_items=120, num_queries=30, num_tokens=80, item_attributes={"author_id": 12, "category_id": 6},
    user_attributes={"gender": 4}, image_dim=8, has_image_pixels=False, channels=list(schema.CHANNELS),
    max_history=24, num_negatives=3)
CONFIG = ModelConfig(dim=16, token_dim=8, top_k=6, tower_units=(16,))
BATCH = 16


def tables(metadata=METADATA):
    """(ItemTable, QueryTable) of random content for ``metadata``."""
    return reader.synthetic_tables(metadata, seed=1)


def batch(kind="ctr", batch_size=BATCH, metadata=METADATA, seed=0):
    """One batch with the reader's exact structure."""
    return next(iter(reader.synthetic_dataset(metadata, kind, batch_size, 1, seed=seed)))
