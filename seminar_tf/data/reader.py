"""TFRecord → batched, padded ``tf.data`` pipelines, driven by ``seminar_tf.schema``.

Every batch is a dict of dense tensors with static history length ``max_history`` (right-padded with
``schema.PAD_INDEX``; real steps are the first ``history_length`` of each row, oldest first):

  user_id [B] string, timestamp [B] int64, target_item [B], target_query [B], label [B] float32,
  history_length [B], history_item / history_query / history_timestamp (/ history_feedback) [B, max_history],
  user_<attr> [B] (when the dataset has a users table), user_index [B], negative_items / negative_queries
  [B, num_negatives] (pretrain only).

A dataset stores each user's history once (``timelines/``, ``load_timelines``: held in memory); a sample
record holds its cut-off ``history_end`` into that timeline, and ``make_dataset`` joins the two per batch.
Item and query content (tokens, image embeddings, attributes) are not repeated in the examples: they live
once in the item/query tables (``load_item_table``/``load_query_table``), looked up by index in the model.
``synthetic_dataset`` yields the same structure from random in-memory data, for tests that need no files.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Dict, List, Optional

import numpy as np

from seminar_tf import schema


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def load_metadata(dataset_dir: str) -> schema.DatasetMetadata:
    """Reads ``metadata.json`` written by the pipeline."""
    path = f"{dataset_dir.rstrip('/')}/{schema.METADATA_FILE}"
    if not _gfile().exists(path):
        raise FileNotFoundError(
            f"{path} not found: {dataset_dir!r} is not a built dataset. Build one with "
            "`seminar-tf build --input RAW_DIR --output DATASET_DIR`."
        )
    with _gfile().GFile(path) as f:
        return schema.DatasetMetadata.from_json(f.read())


def load_stats(dataset_dir: str) -> dict:
    with _gfile().GFile(f"{dataset_dir.rstrip('/')}/{schema.STATS_FILE}") as f:
        return json.load(f)


def split_size(dataset_dir: str, kind: str, split: str) -> Optional[int]:
    """Examples the Beam job wrote to ``kind/split`` (its stats.json ``samples``); None without that record."""
    path = f"{dataset_dir.rstrip('/')}/{schema.STATS_FILE}"
    if not _gfile().exists(path):
        return None
    count = load_stats(dataset_dir).get("samples", {}).get(kind, {}).get(split)
    return None if count is None else int(count)


def load_vocabulary(dataset_dir: str, filename: str) -> List[str]:
    """Entries of ``vocab/<filename>`` in index order (line number = index)."""
    with _gfile().GFile(f"{dataset_dir.rstrip('/')}/{schema.VOCAB_DIR}/{filename}") as f:
        lines = f.read().split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


@dataclasses.dataclass
class ItemTable:
    """Item content by item index (row 0 = padding, row 1 = OOV; both all-zero).

    title_tokens [num_items, max_title_tokens] int32; image_embedding [num_items, image_dim] float32 or
    None; attributes [num_items, 1 + A] int32 whose column 0 is the item index itself (the item id is an
    attribute, docs/design.md §4) and columns 1.. follow ``attribute_names``; item_ids [num_items] str.
    """

    title_tokens: np.ndarray
    image_embedding: Optional[np.ndarray]
    attributes: np.ndarray
    attribute_names: List[str]
    item_ids: List[str]


@dataclasses.dataclass
class QueryTable:
    """Query tokens by query index: tokens [num_queries, max_query_tokens] int32; queries [num_queries]."""

    tokens: np.ndarray
    queries: List[str]


def _table_examples(dataset_dir: str, subdir: str, spec: dict):
    import tensorflow as tf

    pattern = f"{dataset_dir.rstrip('/')}/{subdir}/*{schema.TFRECORD_SUFFIX}"
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no table shards match {pattern}")
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096)
    for batch in ds.map(lambda x: tf.io.parse_example(x, spec)):
        yield {k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v).numpy() for k, v in batch.items()}


def _fill_tokens(target: np.ndarray, rows: np.ndarray, tokens: np.ndarray) -> None:
    width = min(target.shape[1], tokens.shape[1])
    target[rows, :width] = tokens[:, :width]


def load_item_table(dataset_dir: str, metadata: Optional[schema.DatasetMetadata] = None) -> ItemTable:
    """Reads ``item_table/`` into dense arrays indexed by item index."""
    metadata = metadata or load_metadata(dataset_dir)
    names = sorted(metadata.item_attributes)
    n = metadata.num_items
    titles = np.zeros([n, metadata.max_title_tokens], np.int32)
    images = np.zeros([n, metadata.image_dim], np.float32) if metadata.image_dim else None
    attributes = np.zeros([n, 1 + len(names)], np.int32)
    item_ids = [""] * n
    for i, token in enumerate(schema.RESERVED):
        item_ids[i] = token
    for batch in _table_examples(dataset_dir, schema.ITEM_TABLE_DIR, schema.item_table_spec(metadata)):
        rows = batch[schema.ITEM_INDEX].astype(np.int64)
        if rows.size and (rows.min() < len(schema.RESERVED) or rows.max() >= n):
            raise ValueError(f"item_table has item_index outside [2, {n}): the dataset is inconsistent")
        _fill_tokens(titles, rows, batch[schema.TITLE_TOKENS])
        if images is not None:
            images[rows] = batch[schema.IMAGE_EMBEDDING]
        attributes[rows, 0] = rows
        for j, name in enumerate(names):
            attributes[rows, 1 + j] = batch[schema.item_attribute_feature(name)]
        for row, item_id in zip(rows, batch[schema.ITEM_ID]):
            item_ids[row] = item_id.decode("utf-8")
    return ItemTable(titles, images, attributes, names, item_ids)


def load_query_table(dataset_dir: str, metadata: Optional[schema.DatasetMetadata] = None) -> QueryTable:
    """Reads ``query_table/`` into dense arrays indexed by query index (reserved rows all-zero)."""
    metadata = metadata or load_metadata(dataset_dir)
    n = metadata.num_queries
    tokens = np.zeros([n, metadata.max_query_tokens], np.int32)
    queries = list(schema.QUERY_RESERVED) + [""] * (n - len(schema.QUERY_RESERVED))
    if n <= len(schema.QUERY_RESERVED):
        return QueryTable(tokens, queries)
    for batch in _table_examples(dataset_dir, schema.QUERY_TABLE_DIR, schema.query_table_spec()):
        rows = batch[schema.QUERY_INDEX].astype(np.int64)
        _fill_tokens(tokens, rows, batch[schema.QUERY_TOKENS])
        for row, text in zip(rows, batch[schema.QUERY_TEXT]):
            queries[row] = text.decode("utf-8")
    return QueryTable(tokens, queries)


@dataclasses.dataclass
class Timelines:
    """Every user's whole history (``timelines/``), as flat arrays: user ``user_ids[r]``'s steps, oldest first, are
    ``steps[name][offsets[r]:offsets[r + 1]]`` for each history feature; ``users[name][r]`` holds its user_<attr>
    and user_index features."""

    user_ids: np.ndarray  # [U] bytes
    offsets: np.ndarray  # [U + 1] int64
    steps: Dict[str, np.ndarray]  # history_* -> [total steps] int64
    users: Dict[str, np.ndarray]  # user_<attr>, user_index -> [U] int64


_TIMELINES: "collections.OrderedDict[tuple, Timelines]" = collections.OrderedDict()
_TIMELINES_CACHED = 4  # datasets whose timelines one process keeps in memory


def check_layout(dataset_dir: str) -> schema.DatasetMetadata:
    """The dataset's own metadata; ValueError unless it stores histories as per-user timelines."""
    metadata = load_metadata(dataset_dir)
    if metadata.history_layout != schema.TIMELINES_LAYOUT:
        raise ValueError(
            f"dataset {dataset_dir!r} has the older layout (a history copied into every sample), which this reader "
            f"does not read; rebuild it with `seminar-tf build --input RAW_DIR --output {dataset_dir}`"
        )
    return metadata


def load_timelines(dataset_dir: str, metadata: Optional[schema.DatasetMetadata] = None) -> Timelines:
    """Reads ``timelines/`` into memory (once per process while its files are unchanged). ``metadata``: the
    dataset's, its layout already checked (``check_layout``, as ``make_dataset`` does); default: read and checked
    here."""
    import tensorflow as tf

    metadata = metadata or check_layout(dataset_dir)
    pattern = schema.timeline_pattern(dataset_dir)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no timeline shards match {pattern}: rebuild the dataset with `seminar-tf build`")
    context_spec, sequence_spec = schema.timeline_spec(metadata)
    user_features = sorted(name for name in context_spec if name != schema.CTX_USER_ID)
    file_stats = [tf.io.gfile.stat(f) for f in files]
    key = (dataset_dir.rstrip("/"), tuple(sequence_spec), tuple(user_features),
           tuple((f, stat.length, stat.mtime_nsec) for f, stat in zip(files, file_stats)))
    if key in _TIMELINES:
        _TIMELINES.move_to_end(key)
        return _TIMELINES[key]
    ragged = {name: tf.io.RaggedFeature(tf.int64) for name in sequence_spec}
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(1024)
    ds = ds.map(lambda x: tf.io.parse_sequence_example(x, context_spec, ragged)[:2])
    user_ids, lengths = [], []
    users = {name: [] for name in user_features}
    steps = {name: [] for name in sequence_spec}
    for context, sequence in ds:
        user_ids.append(context[schema.CTX_USER_ID].numpy())
        for name in user_features:
            users[name].append(context[name].numpy())
        for name in sequence_spec:
            steps[name].append(sequence[name].flat_values.numpy())
        lengths.append(sequence[schema.SEQ_HISTORY_ITEM].row_lengths().numpy())
    user_ids = np.concatenate(user_ids) if user_ids else np.zeros([0], object)
    offsets = np.concatenate([[0], np.cumsum(_joined(lengths))]).astype(np.int64)
    unique, counts = np.unique(user_ids, return_counts=True)
    if len(unique) < len(user_ids):
        raise ValueError(f"{pattern}: user_id {unique[counts > 1][0].decode('utf-8')!r} has more than one timeline")
    timelines = Timelines(user_ids, offsets, {name: _joined(v) for name, v in steps.items()},
                          {name: _joined(v) for name, v in users.items()})
    if any(len(v) != offsets[-1] for v in timelines.steps.values()):
        raise ValueError(f"{pattern}: the history features of a timeline differ in length")
    _TIMELINES[key] = timelines
    while len(_TIMELINES) > _TIMELINES_CACHED:
        _TIMELINES.popitem(last=False)
    return timelines


def _joined(parts: List[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros([0], np.int64)


def padded_shapes(metadata: schema.DatasetMetadata, kind: str, max_history: int) -> Dict:
    """Static per-example shapes of every feature, for ``padded_batch`` and serving signatures."""
    shapes = {
        schema.CTX_USER_ID: [],
        schema.CTX_TIMESTAMP: [],
        schema.CTX_TARGET_ITEM: [],
        schema.CTX_TARGET_QUERY: [],
        schema.CTX_LABEL: [],
        schema.CTX_HISTORY_LENGTH: [],
    }
    for name in schema.history_features(metadata):
        shapes[name] = [max_history]
    for name in sorted(metadata.user_attributes):
        shapes[schema.user_attribute_feature(name)] = []
    if metadata.num_users:
        shapes[schema.CTX_USER_INDEX] = []
    if kind == schema.PRETRAIN_DIR:
        shapes[schema.CTX_NEGATIVE_ITEMS] = [metadata.num_negatives]
        shapes[schema.CTX_NEGATIVE_QUERIES] = [metadata.num_negatives]
    return shapes


def make_dataset(
    dataset_dir: str,
    kind: str,
    split: str,
    batch_size: int,
    *,
    metadata: Optional[schema.DatasetMetadata] = None,
    max_history: Optional[int] = None,
    shuffle: bool = False,
    shuffle_buffer: int = 10_000,
    repeat: bool = False,
    drop_remainder: bool = False,
    input_context=None,
    seed: Optional[int] = None,
):
    """Batched, padded examples of ``kind`` (``pretrain``/``ctr``) and ``split`` (``train``/``valid``/``test``).

    Each sample's history is its user's timeline (``load_timelines``, held in memory) cut at the sample's
    ``history_end``: the newest ``max_history`` steps before it. ``input_context`` (a ``tf.distribute.InputContext``)
    shards the sample files across input pipelines (every pipeline holds all timelines) and turns ``batch_size``
    (global) into the per-replica batch size. ``max_history`` below the dataset's keeps the newest steps; above it
    only pads. Unsharded and not repeated, the dataset carries its batch count (from stats.json; ``split_size``) as
    its cardinality, so Keras shows known step counts from the first epoch.
    """
    import tensorflow as tf

    if kind not in schema.EXAMPLE_KINDS:
        raise ValueError(f"kind must be one of {schema.EXAMPLE_KINDS}, got {kind!r}")
    if split not in schema.SPLITS:
        raise ValueError(f"split must be one of {schema.SPLITS}, got {split!r}")
    built = check_layout(dataset_dir)
    metadata = metadata or built
    max_history = int(max_history or metadata.max_history)
    timelines = load_timelines(dataset_dir, metadata)
    pattern = schema.shard_pattern(dataset_dir, kind, split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {kind}/{split} shards match {pattern}")
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(files) < input_context.num_input_pipelines:
            raise ValueError(
                f"{len(files)} {kind}/{split} shard(s) cannot be split over {input_context.num_input_pipelines} "
                "input pipelines; rebuild the dataset with --num-shards >= the number of workers"
            )
        files_ds = files_ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    if shuffle:
        files_ds = files_ds.shuffle(len(files), seed=seed)
    ds = files_ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(4, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle or seed is not None,  # a seeded run reads in a reproducible order
    )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    kept = min(max_history, built.max_history)  # the steps a sample of this build holds; the rest is padding
    ds = ds.map(_history_join(dataset_dir, metadata, kind, timelines, max_history, kept),
                num_parallel_calls=tf.data.AUTOTUNE)
    sharded = input_context is not None and input_context.num_input_pipelines > 1
    examples = None if repeat or sharded else split_size(dataset_dir, kind, split)
    if examples is not None:
        batches = examples // batch_size if drop_remainder else -(-examples // batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(tf.data.AUTOTUNE)


def _history_join(dataset_dir: str, metadata: schema.DatasetMetadata, kind: str, timelines: Timelines,
                  max_history: int, kept: int):
    """A batch of serialized samples -> the batch dict of ``make_dataset``: samples parsed, each joined with the
    newest ``kept`` steps of its user's timeline before its ``history_end`` (padded to ``max_history``) and with the
    user's features."""
    import tensorflow as tf

    spec = schema.sample_spec(metadata, kind)
    rows = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(timelines.user_ids, tf.string),
                                            tf.range(len(timelines.user_ids), dtype=tf.int64)),
        default_value=-1)
    offsets = tf.constant(timelines.offsets, tf.int64)
    padding = int(timelines.offsets[-1])  # one PAD step after every timeline: the padding positions gather it
    steps = {name: tf.constant(np.append(values, schema.PAD_INDEX), tf.int64)
             for name, values in timelines.steps.items()}
    users = {name: tf.constant(values, tf.int64) for name, values in timelines.users.items()}
    where = dataset_dir.rstrip("/")

    def join(serialized):
        features = tf.io.parse_example(serialized, spec)
        user_id = features[schema.CTX_USER_ID]
        end = features.pop(schema.CTX_HISTORY_END)
        row = rows.lookup(user_id)
        known = row >= 0
        row = tf.maximum(row, 0)
        start = tf.gather(offsets, row)
        within = end <= tf.gather(offsets, row + 1) - start
        checks = [
            tf.debugging.Assert(tf.reduce_all(known), [tf.strings.join([
                f"{where}: no timeline in {schema.TIMELINE_DIR}/ for user_id ",
                tf.strings.reduce_join(tf.boolean_mask(user_id, ~known)[:1]),
                "; the dataset is incomplete: rebuild it with `seminar-tf build`"])]),
            tf.debugging.Assert(tf.reduce_all(within | ~known), [tf.strings.join([
                f"{where}: a sample's history_end lies past its user's timeline, user_id ",
                tf.strings.reduce_join(tf.boolean_mask(user_id, known & ~within)[:1]),
                "; the samples and timelines come from different builds: rebuild it with `seminar-tf build`"])]),
        ]
        with tf.control_dependencies(checks):
            length = tf.minimum(end, kept)
        first = start + end - length
        positions = tf.range(max_history, dtype=tf.int64)[None, :]
        real = positions < length[:, None]
        index = tf.where(real, first[:, None] + positions, padding)
        for name, values in steps.items():
            features[name] = tf.gather(values, index)
        features[schema.CTX_HISTORY_LENGTH] = length
        for name, values in users.items():
            features[name] = tf.gather(values, row)
        return features

    return join


def synthetic_dataset(
    metadata: schema.DatasetMetadata,
    kind: str,
    batch_size: int,
    num_batches: int,
    *,
    max_history: Optional[int] = None,
    seed: int = 0,
):
    """In-memory random batches with exactly the structure of ``make_dataset`` (for fast tests).

    Histories have random lengths in [0, max_history]; ids are drawn from the non-reserved vocabulary;
    labels are Bernoulli(0.5) for ``ctr`` and 1 for ``pretrain``.
    """
    import tensorflow as tf

    max_history = int(max_history or metadata.max_history)
    rng = np.random.default_rng(seed)
    n = batch_size * num_batches
    lengths = rng.integers(0, max_history + 1, size=n)
    steps = np.arange(max_history)[None, :] < lengths[:, None]
    low_item = len(schema.RESERVED)
    low_query = len(schema.QUERY_RESERVED) - 1  # EMPTY_QUERY_INDEX is a valid query of a browse step
    features = {
        schema.CTX_USER_ID: np.array([f"u{i % max(1, n // 4)}" for i in range(n)]),
        schema.CTX_TIMESTAMP: np.full([n], 10 ** 9, np.int64) + np.arange(n),
        schema.CTX_TARGET_ITEM: rng.integers(low_item, metadata.num_items, size=n),
        schema.CTX_TARGET_QUERY: rng.integers(low_query, max(low_query + 1, metadata.num_queries), size=n),
        schema.CTX_LABEL: (
            np.ones([n], np.float32) if kind == schema.PRETRAIN_DIR else rng.integers(0, 2, size=n).astype(np.float32)
        ),
        schema.CTX_HISTORY_LENGTH: lengths.astype(np.int64),
        schema.SEQ_HISTORY_ITEM: np.where(steps, rng.integers(low_item, metadata.num_items, size=steps.shape), 0),
        schema.SEQ_HISTORY_QUERY: np.where(
            steps, rng.integers(low_query, max(low_query + 1, metadata.num_queries), size=steps.shape), 0
        ),
        schema.SEQ_HISTORY_TIMESTAMP: np.where(steps, np.cumsum(np.ones(steps.shape, np.int64), axis=1), 0),
    }
    for name, size in sorted(metadata.user_attributes.items()):
        features[schema.user_attribute_feature(name)] = rng.integers(1, max(2, size), size=n)
    if metadata.num_users:
        features[schema.CTX_USER_INDEX] = rng.integers(1, max(2, metadata.num_users), size=n)
    if metadata.num_feedback:
        features[schema.SEQ_HISTORY_FEEDBACK] = np.where(
            steps, rng.integers(low_item, max(low_item + 1, metadata.num_feedback), size=steps.shape), 0)
    if kind == schema.PRETRAIN_DIR:
        shape = [n, metadata.num_negatives]
        features[schema.CTX_NEGATIVE_ITEMS] = rng.integers(low_item, metadata.num_items, size=shape)
        features[schema.CTX_NEGATIVE_QUERIES] = rng.integers(
            low_query, max(low_query + 1, metadata.num_queries), size=shape
        )
    features = {
        k: (v.astype(np.int64) if v.dtype.kind in "iu" else v) for k, v in features.items()
    }
    return tf.data.Dataset.from_tensor_slices(features).batch(batch_size)


def synthetic_tables(metadata: schema.DatasetMetadata, seed: int = 0):
    """Random item and query tables matching ``metadata`` (pairs with ``synthetic_dataset``)."""
    rng = np.random.default_rng(seed)
    reserved = len(schema.RESERVED)
    names = sorted(metadata.item_attributes)
    n = metadata.num_items
    titles = np.zeros([n, metadata.max_title_tokens], np.int32)
    titles[reserved:, :3] = rng.integers(reserved, max(reserved + 1, metadata.num_tokens), size=[n - reserved, 3])
    images = (
        rng.normal(size=[n, metadata.image_dim]).astype(np.float32) if metadata.image_dim else None
    )
    if images is not None:
        images[:reserved] = 0.0
    attributes = np.zeros([n, 1 + len(names)], np.int32)
    attributes[:, 0] = np.arange(n)
    for j, name in enumerate(names):
        attributes[reserved:, 1 + j] = rng.integers(reserved, max(reserved + 1, metadata.item_attributes[name]),
                                                    size=n - reserved)
    query_tokens = np.zeros([metadata.num_queries, metadata.max_query_tokens], np.int32)
    first_query = len(schema.QUERY_RESERVED)
    query_tokens[first_query:, :2] = rng.integers(
        reserved, max(reserved + 1, metadata.num_tokens), size=[max(0, metadata.num_queries - first_query), 2])
    item_table = ItemTable(titles, images, attributes, names, [f"i{i}" for i in range(n)])
    query_table = QueryTable(query_tokens, [f"q{i}" for i in range(metadata.num_queries)])
    return item_table, query_table
