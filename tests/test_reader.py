"""The tf.data reader against the pipeline's real output, and its synthetic in-memory path."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf import schema
from seminar_tf.data import reader


def _records(pattern):
    files = sorted(tf.io.gfile.glob(pattern))
    assert files, pattern
    return list(tf.data.TFRecordDataset(files, compression_type="GZIP"))


def _raw_records(dataset_dir, kind, split, metadata):
    """(sample features, the user's whole timeline steps) per sample record, parsed without the reader."""
    context_spec, sequence_spec = schema.timeline_spec(metadata)
    timelines = {}
    for record in _records(schema.timeline_pattern(dataset_dir)):
        context, sequence = tf.io.parse_single_sequence_example(record, context_spec, sequence_spec)
        timelines[context[schema.CTX_USER_ID].numpy()] = (context, sequence)
    spec = schema.sample_spec(metadata, kind)
    out = []
    for record in _records(schema.shard_pattern(dataset_dir, kind, split)):
        sample = tf.io.parse_single_example(record, spec)
        out.append((sample, timelines[sample[schema.CTX_USER_ID].numpy()]))
    return out


def test_round_trip_matches_the_pipeline_records(dataset_dir):
    metadata = reader.load_metadata(dataset_dir)
    raw = _raw_records(dataset_dir, schema.CTR_DIR, "train", metadata)
    assert raw, "the test world must produce CTR train samples"
    batches = list(reader.make_dataset(dataset_dir, schema.CTR_DIR, "train", 7, metadata=metadata))
    assert sum(int(b[schema.CTX_LABEL].shape[0]) for b in batches) == len(raw)
    flat = {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}
    keys = list(zip(flat[schema.CTX_USER_ID], flat[schema.CTX_TIMESTAMP], flat[schema.CTX_TARGET_ITEM]))
    assert len(set(keys)) == len(keys)
    position = {key: row for row, key in enumerate(keys)}
    truncated = 0
    for sample, (user, timeline) in raw:
        row = position[(sample[schema.CTX_USER_ID].numpy(), sample[schema.CTX_TIMESTAMP].numpy(),
                        sample[schema.CTX_TARGET_ITEM].numpy())]
        end = int(sample[schema.CTX_HISTORY_END])
        start = max(0, end - metadata.max_history)
        truncated += start > 0
        length = end - start
        assert flat[schema.CTX_HISTORY_LENGTH][row] == length
        assert flat[schema.CTX_TARGET_ITEM][row] == int(sample[schema.CTX_TARGET_ITEM])
        assert flat[schema.CTX_LABEL][row] == float(sample[schema.CTX_LABEL])
        for name in schema.history_features(metadata):
            np.testing.assert_array_equal(flat[name][row, :length], timeline[name].numpy()[start:end])
            assert (flat[name][row, length:] == schema.PAD_INDEX).all()
        assert (flat[schema.SEQ_HISTORY_TIMESTAMP][row, :length] < int(sample[schema.CTX_TIMESTAMP])).all()
        if end < len(timeline[schema.SEQ_HISTORY_TIMESTAMP]):  # the cut-off is the sample's time
            assert timeline[schema.SEQ_HISTORY_TIMESTAMP][end] >= int(sample[schema.CTX_TIMESTAMP])
        for name in user:
            assert flat[name][row] == user[name].numpy(), name
    assert truncated, "some test-world histories must be longer than max_history"
    assert flat[schema.SEQ_HISTORY_ITEM].shape[1] == metadata.max_history  # static, padded


def test_shorter_max_history_keeps_the_newest_steps(dataset_dir):
    metadata = reader.load_metadata(dataset_dir)
    full = next(iter(reader.make_dataset(dataset_dir, schema.CTR_DIR, "train", 32, metadata=metadata)))
    short = next(iter(reader.make_dataset(dataset_dir, schema.CTR_DIR, "train", 32, metadata=metadata,
                                          max_history=5)))
    assert short[schema.SEQ_HISTORY_ITEM].shape[1] == 5
    for row in range(32):
        n = int(full[schema.CTX_HISTORY_LENGTH][row])
        m = int(short[schema.CTX_HISTORY_LENGTH][row])
        assert m == min(n, 5)
        np.testing.assert_array_equal(short[schema.SEQ_HISTORY_TIMESTAMP][row, :m],
                                      full[schema.SEQ_HISTORY_TIMESTAMP][row, n - m:n])


def test_pretrain_batches_carry_negatives(dataset_dir):
    metadata = reader.load_metadata(dataset_dir)
    batch = next(iter(reader.make_dataset(dataset_dir, schema.PRETRAIN_DIR, "train", 8, metadata=metadata)))
    assert batch[schema.CTX_NEGATIVE_ITEMS].shape == [8, metadata.num_negatives]
    assert (batch[schema.CTX_NEGATIVE_ITEMS].numpy() >= len(schema.RESERVED)).all()
    assert (batch[schema.CTX_LABEL].numpy() == 1.0).all()


def test_sharding_by_input_context_splits_the_files(dataset_dir):
    metadata = reader.load_metadata(dataset_dir)
    whole = sum(int(b[schema.CTX_LABEL].shape[0]) for b in reader.make_dataset(
        dataset_dir, schema.CTR_DIR, "train", 16, metadata=metadata))
    parts = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        batches = list(reader.make_dataset(dataset_dir, schema.CTR_DIR, "train", 16, metadata=metadata,
                                           input_context=context))
        assert all(int(b[schema.CTX_LABEL].shape[0]) <= 8 for b in batches)  # per-replica batch size
        parts.append({(u, int(t)) for b in batches for u, t in zip(b[schema.CTX_USER_ID].numpy(),
                                                                  b[schema.CTX_TIMESTAMP].numpy())})
    assert not parts[0] & parts[1]
    assert sum(len(p) for p in parts) <= whole


def test_item_and_query_tables_are_indexed_by_vocabulary(dataset_dir):
    metadata = reader.load_metadata(dataset_dir)
    items = reader.load_item_table(dataset_dir, metadata)
    vocab = reader.load_vocabulary(dataset_dir, schema.ITEM_VOCAB)
    assert len(vocab) == metadata.num_items == len(items.item_ids)
    assert items.item_ids[2:] == vocab[2:]
    assert (items.title_tokens[:2] == 0).all() and (items.title_tokens[2:].max(axis=1) > 0).mean() > 0.9
    if metadata.image_dim:
        assert items.image_embedding.shape == (metadata.num_items, metadata.image_dim)
        assert np.abs(items.image_embedding[2:]).sum(axis=1).min() > 0
    np.testing.assert_array_equal(items.attributes[:, 0], np.where(np.arange(metadata.num_items) >= 2,
                                                                   np.arange(metadata.num_items), 0))
    queries = reader.load_query_table(dataset_dir, metadata)
    query_vocab = reader.load_vocabulary(dataset_dir, schema.QUERY_VOCAB)
    assert queries.queries[3:] == query_vocab[3:]
    assert (queries.tokens[3:].max(axis=1) > 0).all()
    tokens = reader.load_vocabulary(dataset_dir, schema.TOKEN_VOCAB)
    row = 3
    words = [tokens[t] for t in queries.tokens[row] if t]
    assert words == schema.tokenize(queries.queries[row])[: metadata.max_query_tokens]


def test_missing_dataset_has_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="seminar-tf build"):
        reader.load_metadata(str(tmp_path))


def test_a_dataset_of_the_older_layout_is_refused(dataset_dir, tmp_path):
    """A metadata.json without history_layout (samples that each carry their history): one line naming the
    directory and the rebuild command, before any file is read."""
    with open(os.path.join(dataset_dir, schema.METADATA_FILE)) as f:
        raw = json.load(f)
    del raw["history_layout"]
    old = str(tmp_path / "old")
    shutil.copytree(dataset_dir, old)
    with open(os.path.join(old, schema.METADATA_FILE), "w") as f:
        json.dump(raw, f)
    for kind in schema.EXAMPLE_KINDS:
        with pytest.raises(ValueError) as error:
            reader.make_dataset(old, kind, "train", 4)
        message = str(error.value)
        assert "\n" not in message and repr(old) in message and "older layout" in message
        assert f"rebuild it with `seminar-tf build --input RAW_DIR --output {old}`" in message
    with pytest.raises(ValueError, match="older layout"):  # a metadata object passed in does not bypass the check
        reader.make_dataset(old, schema.CTR_DIR, "train", 4, metadata=reader.load_metadata(dataset_dir))


def test_a_sample_without_its_users_timeline_is_an_error(dataset_dir, tmp_path):
    """A sample whose user has no timeline fails naming the user_id (never an empty or another user's history)."""
    metadata = reader.load_metadata(dataset_dir)
    broken = str(tmp_path / "broken")
    shutil.copytree(dataset_dir, broken)
    first = _raw_records(dataset_dir, schema.CTR_DIR, "test", metadata)[0][0][schema.CTX_USER_ID].numpy()
    for path in tf.io.gfile.glob(schema.timeline_pattern(broken)):
        kept = [r for r in _records(path)
                if tf.train.SequenceExample.FromString(r.numpy()).context.feature["user_id"].bytes_list.value[0]
                != first]
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for record in kept:
                writer.write(record.numpy())
    assert len(reader.load_timelines(broken).user_ids) == len(reader.load_timelines(dataset_dir).user_ids) - 1
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"no timeline .* for user_id {first.decode()}"):
        for _ in reader.make_dataset(broken, schema.CTR_DIR, "test", 4):
            pass


def test_samples_do_not_repeat_histories(dataset_dir):
    """The samples hold a cut-off, not steps: all CTR files together are smaller than the timelines' bytes times
    the number of samples would be (the per-sample layout) by far."""
    def size(pattern):
        return sum(tf.io.gfile.stat(f).length for f in tf.io.gfile.glob(pattern))

    stats = reader.load_stats(dataset_dir)
    samples = sum(stats["samples"][schema.CTR_DIR].values())
    ctr = sum(size(schema.shard_pattern(dataset_dir, schema.CTR_DIR, split)) for split in schema.SPLITS)
    per_user_timeline = size(schema.timeline_pattern(dataset_dir)) / stats["timelines"]["users"]
    assert ctr < 0.1 * per_user_timeline * samples
    assert stats["timelines"]["steps"] == stats["events"]["history"]


def test_synthetic_dataset_has_the_reader_structure(dataset_dir):
    metadata = reader.load_metadata(dataset_dir)
    for kind in schema.EXAMPLE_KINDS:
        real = next(iter(reader.make_dataset(dataset_dir, kind, "train", 4, metadata=metadata)))
        fake = next(iter(reader.synthetic_dataset(metadata, kind, 4, 1)))
        assert set(real) == set(fake)
        for name in real:
            assert real[name].dtype == fake[name].dtype, name
            assert real[name].shape == fake[name].shape, name


@pytest.mark.parametrize("kind, split, drop_remainder", [
    (schema.CTR_DIR, "train", False), (schema.CTR_DIR, "valid", True), (schema.PRETRAIN_DIR, "train", False)])
def test_the_dataset_knows_its_batch_count(dataset_dir, kind, split, drop_remainder):
    """Keras shows "N/N" steps from the first epoch: the cardinality is the split's batch count, and it is right."""
    examples = reader.split_size(dataset_dir, kind, split)
    assert examples and examples > 7
    ds = reader.make_dataset(dataset_dir, kind, split, 7, drop_remainder=drop_remainder, shuffle=True, seed=1)
    expected = examples // 7 if drop_remainder else -(-examples // 7)
    assert int(ds.cardinality()) == expected
    assert sum(1 for _ in ds) == expected  # the stats are the records written (assert_cardinality would raise)
    repeated = reader.make_dataset(dataset_dir, kind, split, 7, repeat=True)
    assert int(repeated.cardinality()) == int(tf.data.INFINITE_CARDINALITY)
