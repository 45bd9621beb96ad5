"""End-to-end tests of beam_pipelines.build_dataset on tiny raw directories written here.

Every output TFRecord is parsed with the schema's specs through TensorFlow and compared with a plain-Python
reference computed from the raw rows; JSONL, CSV and Parquet inputs of the same data must give the same
examples; dead letters are accounted for exactly.
"""

import collections
import csv
import dataclasses
import glob
import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from beam_pipelines import build_dataset as bd
from seminar_tf import cli_args, schema
from seminar_tf.data import reader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["red", "blue", "shoe", "hat", "Sock", "wool", "cotton", "big"]
QUERIES = ["Red shoe", "red  SHOE", "blue hat", "wool sock", "cotton", " hat "]
CONFIG = bd.BuildConfig(
    max_history=4,
    min_history=1,
    num_negatives=3,
    pretrain_samples_per_user=3,
    valid_fraction=0.2,
    test_fraction=0.2,
    num_shards=1,
    seed=5,
)


# ----------------------------------------------------------------------------------------------------------
# Raw fixtures
def make_world():
    """12 items (dim-3 embeddings, titles, category/brand attributes), 5 users + 1 without a users row,
    100 events over 41 seconds (many ties), clicks with and without queries, labelled impressions."""
    rng = random.Random(11)
    items = []
    for i in range(12):
        row = {
            "item_id": f"it{i:02d}",
            "image_embedding": [round(rng.uniform(-1, 1), 3) for _ in range(3)],
            "category": rng.choice(["shoes", "hats", "socks"]),
        }
        if i != 5:
            row["title"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        if i % 3:
            row["brand"] = rng.choice(["acme", "zenith"])
        if i % 4 == 0:
            row["image"] = f"img/{i}.png"
        items.append(row)
    users = [{"user_id": f"u{u}", "age_bucket": rng.choice(["18-24", "25-34"])} for u in range(5)]
    for user in users[:4]:
        user["gender"] = rng.choice("fm")
    events = []
    for k in range(100):
        row = {"user_id": f"u{k % 6}", "timestamp": rng.randint(1000, 1040), "item_id": f"it{rng.randrange(11):02d}"}
        if rng.random() < 0.6:
            if rng.random() < 0.8:
                row["event"] = "click"  # otherwise the default event type, click
        else:
            row.update(event="impression", label=rng.randint(0, 1))
        if rng.random() < 0.5:
            row["query"] = rng.choice(QUERIES)
        events.append(row)
    return items, events, users


def _columns(rows):
    return list(dict.fromkeys(k for row in rows for k in row))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def write_csv(path, rows):
    columns = _columns(rows)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            values = [row.get(c) for c in columns]
            writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, list) else v for v in values])


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = _columns(rows)
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)


def write_world(directory, fmt):
    items, events, users = make_world()
    os.makedirs(directory, exist_ok=True)
    write = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[fmt]
    write(os.path.join(directory, f"items.{fmt}"), items)
    write(os.path.join(directory, f"users.{fmt}"), users)
    write(os.path.join(directory, f"events-00000-of-00002.{fmt}"), events[:50])
    write(os.path.join(directory, f"events-00001-of-00002.{fmt}"), events[50:])
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{format: (dataset_dir, stats)} for the same world in JSONL, CSV and Parquet."""
    out = {}
    for fmt in ("jsonl", "csv", "parquet"):
        root = tmp_path_factory.mktemp(fmt)
        config = dataclasses.replace(CONFIG, num_shards=2) if fmt == "parquet" else CONFIG
        stats = bd.build_dataset(write_world(str(root / "raw"), fmt), str(root / "dataset"), config)
        out[fmt] = (str(root / "dataset"), stats)
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading the outputs with TensorFlow
def load_metadata(dataset):
    with open(os.path.join(dataset, schema.METADATA_FILE)) as handle:
        return schema.DatasetMetadata.from_json(handle.read())


def read_vocab(dataset, name):
    with open(os.path.join(dataset, schema.VOCAB_DIR, name), encoding="utf-8") as handle:
        return handle.read().split("\n")[:-1]


def _records(pattern):
    files = sorted(glob.glob(pattern))
    assert files, pattern
    return list(tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator())


def read_timelines(dataset):
    """{user_id: (context dict, {history feature: tuple of steps})} from the timeline SequenceExamples."""
    context_spec, sequence_spec = schema.timeline_spec(load_metadata(dataset))
    timelines = {}
    for record in _records(schema.timeline_pattern(dataset)):
        context, sequence = tf.io.parse_single_sequence_example(record, context_spec, sequence_spec)
        user = context["user_id"].numpy().decode()
        assert user not in timelines, user
        timelines[user] = ({k: np.asarray(v.numpy()).tolist() for k, v in context.items()},
                           {k: tuple(v.numpy().tolist()) for k, v in sequence.items()})
    return timelines


def read_samples(dataset, kind, split):
    """Parsed samples joined with their users' timelines, as tuples: (user, ts, item, query, label, history_length,
    items, queries, timestamps, user attrs..., negative items, negative queries)."""
    metadata = load_metadata(dataset)
    spec = schema.sample_spec(metadata, kind)
    timelines = read_timelines(dataset)
    user_features = [schema.user_attribute_feature(n) for n in sorted(metadata.user_attributes)]
    samples = []
    for record in _records(schema.shard_pattern(dataset, kind, split)):
        example = {k: v.numpy() for k, v in tf.io.parse_single_example(record, spec).items()}
        user_context, steps = timelines[example["user_id"].decode()]
        end = int(example["history_end"])
        assert end <= len(steps["history_item"])
        window = slice(max(0, end - metadata.max_history), end)
        samples.append(
            (
                example["user_id"].decode(),
                int(example["timestamp"]),
                int(example["target_item"]),
                int(example["target_query"]),
                float(example["label"]),
                len(steps["history_item"][window]),
                steps["history_item"][window],
                steps["history_query"][window],
                steps["history_timestamp"][window],
                tuple(int(user_context[f]) for f in user_features),
                tuple(example.get("negative_items", np.zeros(0)).tolist()),
                tuple(example.get("negative_queries", np.zeros(0)).tolist()),
            )
        )
    return sorted(samples)


def reader_rows(dataset, kind, split, **kwargs):
    """``reader.make_dataset``'s output, one dict of numpy values per sample."""
    rows = []
    for batch in reader.make_dataset(dataset, kind, split, 5, **kwargs):
        batch = {k: v.numpy() for k, v in batch.items()}
        rows.extend({k: v[r] for k, v in batch.items()} for r in range(len(batch[schema.CTX_LABEL])))
    return rows


def read_item_table(dataset):
    spec = schema.item_table_spec(load_metadata(dataset))
    rows = {}
    for record in _records(os.path.join(dataset, schema.ITEM_TABLE_DIR, "*" + schema.TFRECORD_SUFFIX)):
        parsed = tf.io.parse_single_example(record, spec)
        row = {
            k: (v.values.numpy().tolist() if isinstance(v, tf.SparseTensor) else v.numpy()) for k, v in parsed.items()
        }
        row = {
            k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
            for k, v in row.items()
        }
        rows[row[schema.ITEM_INDEX]] = row
    return rows


def read_query_table(dataset):
    rows = {}
    for record in _records(os.path.join(dataset, schema.QUERY_TABLE_DIR, "*" + schema.TFRECORD_SUFFIX)):
        parsed = tf.io.parse_single_example(record, schema.query_table_spec())
        rows[int(parsed["query_index"])] = (
            parsed["query"].numpy().decode(),
            parsed["query_tokens"].values.numpy().tolist(),
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# Plain-Python reference
def _vocab(counter, reserved, min_count):
    return list(reserved) + sorted((e for e, c in counter.items() if c >= min_count), key=lambda e: (-counter[e], e))


def reference(items, events, users, config):
    norm = lambda q: " ".join(str(q).split()).lower() if q else ""  # noqa: E731
    item_counts = collections.Counter({row["item_id"]: 0 for row in items})
    item_counts.update(e["item_id"] for e in events)
    item_vocab = _vocab(item_counts, schema.RESERVED, config.item_min_count)
    query_vocab = _vocab(
        collections.Counter(norm(e.get("query")) for e in events if norm(e.get("query"))), schema.QUERY_RESERVED, 1
    )
    by_id = {row["item_id"]: row for row in items}
    titles = {i: schema.tokenize(by_id[i].get("title"))[: schema.MAX_TITLE_TOKENS] for i in item_vocab[2:]}
    tokens = collections.Counter(t for ts in titles.values() for t in ts)
    tokens.update(t for q in query_vocab[3:] for t in schema.tokenize(q)[: schema.MAX_QUERY_TOKENS])
    token_vocab = _vocab(tokens, schema.RESERVED, 1)
    attr_vocab = {
        a: _vocab(collections.Counter(r[a] for r in items if r.get(a)), schema.RESERVED, 1)
        for a in ("brand", "category")
    }
    user_vocab = {
        a: _vocab(collections.Counter(r[a] for r in users if r.get(a)), schema.RESERVED, 1)
        for a in ("age_bucket", "gender")
    }
    item_idx, query_idx, token_idx = ({e: i for i, e in enumerate(v)} for v in (item_vocab, query_vocab, token_vocab))

    stamps = sorted(e["timestamp"] for e in events)
    n = len(stamps)
    test_from = stamps[n - round(n * config.test_fraction)]
    valid_from = stamps[n - round(n * config.test_fraction) - round(n * config.valid_fraction)]
    split_of = lambda t: "test" if t >= test_from else "valid" if t >= valid_from else "train"  # noqa: E731

    def user_attrs(user_id):
        row = next((r for r in users if r["user_id"] == user_id), {})
        return tuple({e: i for i, e in enumerate(user_vocab[a])}.get(row.get(a), 1) for a in sorted(user_vocab))

    def step(e):
        q = norm(e.get("query"))
        return (e["timestamp"], item_idx[e["item_id"]], query_idx.get(q, 1) if q else 2)

    expected = collections.defaultdict(list)
    for user in sorted({e["user_id"] for e in events}):
        mine = [e for e in events if e["user_id"] == user]
        clicks = sorted(step(e) for e in mine if e.get("event", "click") == "click")

        def add(kind, target, label):
            history = [c for c in clicks if c[0] < target[0]][-config.max_history :]
            if len(history) < config.min_history:
                return
            columns = tuple(zip(*history)) if history else ((), (), ())
            expected[(kind, split_of(target[0]))].append(
                (
                    user,
                    target[0],
                    target[1],
                    target[2],
                    label,
                    len(history),
                    columns[1],
                    columns[2],
                    columns[0],
                    user_attrs(user),
                )
            )

        for e in mine:
            if e.get("event") == "impression":
                add("ctr", step(e), float(e["label"]))
        for split in schema.SPLITS:
            candidates = [c for c in clicks if split_of(c[0]) == split]
            m, count = config.pretrain_samples_per_user, len(candidates)
            positions = range(count) if m >= count else [((k + 1) * count) // m - 1 for k in range(m)]
            for p in positions:
                add("pretrain", candidates[p], 1.0)
    tables = {
        "items": item_vocab,
        "queries": query_vocab,
        "tokens": token_vocab,
        "attrs": attr_vocab,
        "user_attrs": user_vocab,
        "titles": {item_idx[i]: [token_idx.get(t, 1) for t in ts] for i, ts in titles.items()},
        "split": (valid_from, test_from),
    }
    return {k: sorted(v) for k, v in expected.items()}, tables


# ----------------------------------------------------------------------------------------------------------
# Tests
def test_outputs_match_plain_python_reference(built):
    dataset, stats = built["jsonl"]
    items, events, users = make_world()
    expected, tables = reference(items, events, users, CONFIG)
    metadata = load_metadata(dataset)

    assert read_vocab(dataset, schema.ITEM_VOCAB) == tables["items"]
    assert read_vocab(dataset, schema.QUERY_VOCAB) == tables["queries"]
    assert read_vocab(dataset, schema.TOKEN_VOCAB) == tables["tokens"]
    for name, vocab in tables["attrs"].items():
        assert read_vocab(dataset, schema.item_attribute_vocab(name)) == vocab
    for name, vocab in tables["user_attrs"].items():
        assert read_vocab(dataset, schema.user_attribute_vocab(name)) == vocab
    assert (metadata.num_items, metadata.num_queries, metadata.num_tokens) == tuple(
        len(tables[k]) for k in ("items", "queries", "tokens")
    )
    assert metadata.item_attributes == {k: len(v) for k, v in tables["attrs"].items()}
    assert metadata.user_attributes == {k: len(v) for k, v in tables["user_attrs"].items()}
    assert (metadata.image_dim, metadata.max_history, metadata.num_negatives) == (3, 4, 3)
    assert (stats["split"]["valid_from"], stats["split"]["test_from"]) == tables["split"]

    total = 0
    for kind in schema.EXAMPLE_KINDS:
        for split in schema.SPLITS:
            got = read_samples(dataset, kind, split)
            assert [g[:10] for g in got] == expected[(kind, split)], (kind, split)
            assert stats["samples"][kind][split] == len(got)
            total += len(got)
            for sample in got:
                _, ts, target_item, _, _, length, h_items, h_queries, h_ts, _, neg_items, neg_queries = sample
                assert length == len(h_items) == len(h_queries) == len(h_ts) <= CONFIG.max_history
                assert list(h_ts) == sorted(h_ts) and all(t < ts for t in h_ts)
                if kind == "pretrain":
                    assert len(neg_items) == len(neg_queries) == CONFIG.num_negatives
                    assert target_item not in neg_items
                    assert all(2 <= i < metadata.num_items for i in neg_items)
                    assert all(2 <= q < metadata.num_queries for q in neg_queries)
    assert total > 40 and sum(stats["too_short_history"]["ctr"].values()) > 0
    assert len(expected[("ctr", "test")]) > 0 and len(expected[("pretrain", "valid")]) > 0

    item_rows = read_item_table(dataset)
    by_id = {row["item_id"]: row for row in items}
    assert sorted(item_rows) == list(range(2, len(tables["items"])))
    for index, row in item_rows.items():
        raw = by_id[tables["items"][index]]
        assert row["item_id"] == raw["item_id"].encode()
        assert row["title_tokens"] == tables["titles"][index]
        np.testing.assert_array_equal(np.float32(row["image_embedding"]), np.float32(raw["image_embedding"]))
        for name, vocab in tables["attrs"].items():
            assert row[f"attr_{name}"] == (vocab.index(raw[name]) if raw.get(name) else schema.OOV_INDEX)
    token_idx = {t: i for i, t in enumerate(tables["tokens"])}
    assert read_query_table(dataset) == {
        i: (q, [token_idx[t] for t in schema.tokenize(q)]) for i, q in enumerate(tables["queries"]) if i >= 3
    }


def test_stats_account_for_every_row(built):
    _, stats = built["jsonl"]
    for table in ("items", "events", "users"):
        assert stats["rows_read"][table] == stats["rows_ok"][table] + sum(stats["dead_letters"][table].values())
    assert stats["rows_read"] == {"items": 12, "events": 100, "users": 5}
    assert stats["dead_letters"] == {"items": {}, "events": {}, "users": {}}
    assert stats["channels"] == ["query", "text", "image", "attributes"]
    assert stats["image_dim"] == 3 and stats["split"]["mode"] == "time"
    assert (
        stats["items"]["with_image"] == 3
        and stats["items"]["with_title"] == 11
        and stats["items"]["in_vocabulary"] == 12
    )
    assert stats["columns"]["items"] == ["brand", "category", "image", "image_embedding", "item_id", "title"]
    assert stats["item_attributes"] == ["brand", "category"] and stats["user_attributes"] == ["age_bucket", "gender"]
    assert stats["config"]["max_history"] == 4
    _, events, _ = make_world()
    assert stats["events"]["history"] + stats["events"]["sample"] == 100
    assert stats["events"]["sample"] == sum(e.get("event") == "impression" for e in events)
    assert stats["timelines"] == {"users": 6, "steps": stats["events"]["history"]}  # one per user, every step


def test_csv_and_parquet_inputs_give_identical_examples(built):
    jsonl_dir, jsonl_stats = built["jsonl"]
    for fmt in ("csv", "parquet"):
        other_dir, other_stats = built[fmt]
        for kind in schema.EXAMPLE_KINDS:
            for split in schema.SPLITS:
                assert read_samples(other_dir, kind, split) == read_samples(jsonl_dir, kind, split), (fmt, kind, split)
        assert read_item_table(other_dir) == read_item_table(jsonl_dir)
        assert read_timelines(other_dir) == read_timelines(jsonl_dir)
        assert read_query_table(other_dir) == read_query_table(jsonl_dir)
        for name in os.listdir(os.path.join(jsonl_dir, schema.VOCAB_DIR)):
            assert read_vocab(other_dir, name) == read_vocab(jsonl_dir, name)
        assert load_metadata(other_dir) == load_metadata(jsonl_dir)
        for key in (
            "rows_read",
            "rows_ok",
            "dead_letters",
            "samples",
            "too_short_history",
            "timelines",
            "vocab_sizes",
            "channels",
            "split",
        ):
            assert other_stats[key] == jsonl_stats[key], (fmt, key)
    assert len(glob.glob(schema.shard_pattern(built["parquet"][0], "ctr", "train"))) == 2


def test_ordered_shards_write_identical_files_on_every_build(built, tmp_path):
    """ordered_shards: two builds of the same input write byte-identical shard files (the default sink's shard
    assignment and order vary between runs), holding the same examples as the default build, empty shards included."""
    config = dataclasses.replace(CONFIG, num_shards=3, ordered_shards=True)
    raw = write_world(str(tmp_path / "raw"), "jsonl")
    outs = [str(tmp_path / name) for name in ("a", "b")]
    for out in outs:
        bd.build_dataset(raw, out, config)
    pattern = os.path.join(outs[0], "**", "*" + schema.TFRECORD_SUFFIX)
    files = sorted(os.path.relpath(p, outs[0]) for p in glob.glob(pattern, recursive=True))
    assert len(files) == 3 * (len(schema.EXAMPLE_KINDS) * len(schema.SPLITS) + 3)  # every shard of every output
    for name in files:
        with open(os.path.join(outs[0], name), "rb") as a, open(os.path.join(outs[1], name), "rb") as b:
            assert a.read() == b.read(), name
    assert not glob.glob(os.path.join(outs[0], "**", "*.tmp"), recursive=True)
    jsonl_dir = built["jsonl"][0]
    for kind in schema.EXAMPLE_KINDS:
        for split in schema.SPLITS:
            assert sorted(map(repr, read_samples(outs[0], kind, split))) == sorted(
                map(repr, read_samples(jsonl_dir, kind, split))), (kind, split)
    assert sorted(map(repr, read_item_table(outs[0]))) == sorted(map(repr, read_item_table(jsonl_dir)))
    for shard in range(3):  # a record sits in the shard its hash names
        for record in _records(schema.shard_pattern(outs[0], "ctr", "train").replace("*", f"{shard:05d}-of-00003")):
            assert bd.shard_key(record, 3)[0] == shard


def test_reader_gives_every_sample_its_point_in_time_history(built):
    """make_dataset joins each sample with its user's timeline: for every sample of every kind and split the same
    target, label, history (items, queries, timestamps, feedback) and user features as the older layout stored per
    sample, computed here from the raw events; at the build's max_history, below it (the newest steps) and above it
    (padding only)."""
    dataset, _ = built["jsonl"]
    items, events, users = make_world()
    expected, _ = reference(items, events, users, CONFIG)
    feedback = read_vocab(dataset, schema.FEEDBACK_VOCAB)
    user_vocab = read_vocab(dataset, schema.USER_VOCAB)
    history = (schema.SEQ_HISTORY_ITEM, schema.SEQ_HISTORY_QUERY, schema.SEQ_HISTORY_TIMESTAMP)
    for max_history in (None, 2, 7):
        width = max_history or CONFIG.max_history
        keep = min(width, CONFIG.max_history)
        for kind in schema.EXAMPLE_KINDS:
            for split in schema.SPLITS:
                got, negatives = [], []
                for row in reader_rows(dataset, kind, split, max_history=max_history):
                    user, length = row["user_id"].decode(), int(row[schema.CTX_HISTORY_LENGTH])
                    for name in history + (schema.SEQ_HISTORY_FEEDBACK,):
                        assert row[name].shape == (width,) and (row[name][length:] == schema.PAD_INDEX).all()
                    assert [feedback[i] for i in row[schema.SEQ_HISTORY_FEEDBACK][:length]] == ["click"] * length
                    assert row[schema.CTX_USER_INDEX] == (user_vocab.index(user) if user in user_vocab else 1)
                    got.append((user, int(row["timestamp"]), int(row["target_item"]), int(row["target_query"]),
                                float(row["label"]), length) + tuple(tuple(row[n][:length].tolist()) for n in history)
                               + (tuple(int(row[f"user_{a}"]) for a in ("age_bucket", "gender")),))
                    if kind == schema.PRETRAIN_DIR:
                        negatives.append((user, got[-1][1], got[-1][2], tuple(row["negative_items"].tolist()),
                                          tuple(row["negative_queries"].tolist())))
                want = [e[:5] + (min(e[5], keep),) + tuple(c[len(c) - min(e[5], keep):] for c in e[6:9]) + e[9:]
                        for e in expected[(kind, split)]]
                assert sorted(got) == want, (max_history, kind, split)
                if kind == schema.PRETRAIN_DIR:
                    assert sorted(negatives) == [s[:3] + s[10:] for s in read_samples(dataset, kind, split)]


def test_sample_files_do_not_grow_with_max_history(tmp_path):
    """Histories live once per user in timelines/ (untruncated), samples hold a cut-off: building the same input at
    max_history 4 and 40 writes byte-identical timeline and sample files."""
    raw = write_world(str(tmp_path / "raw"), "jsonl")
    outs = {}
    for max_history in (4, 40):
        outs[max_history] = str(tmp_path / f"h{max_history}")
        config = dataclasses.replace(CONFIG, max_history=max_history, ordered_shards=True)
        stats = bd.build_dataset(raw, outs[max_history], config)
        assert stats["timelines"] == {"users": 6, "steps": stats["events"]["history"]}
    for directory in (schema.TIMELINE_DIR,) + schema.EXAMPLE_KINDS:
        names = sorted(os.listdir(os.path.join(outs[4], directory)))
        assert names and names == sorted(os.listdir(os.path.join(outs[40], directory)))
        for name in names:
            with open(os.path.join(outs[4], directory, name), "rb") as a, \
                    open(os.path.join(outs[40], directory, name), "rb") as b:
                assert a.read() == b.read(), (directory, name)
    for record in _records(schema.shard_pattern(outs[40], schema.CTR_DIR, "train")):
        assert len(record) < 160  # feature names, ids, target, label and a cut-off: no history steps
    assert load_metadata(outs[40]).history_layout == schema.TIMELINES_LAYOUT


def write_broken_world(directory):
    os.makedirs(directory)
    item_lines = [
        '{"item_id": "a", "title": "x", "image_embedding": [1, 2]}',
        '{"item_id": "b", "image_embedding": [3, 4]}',
        '{"item_id": "c", "image_embedding": [5, 6]}',
        '{"item_id": "d", "image_embedding": [1, 2, 3]}',
        '{"title": "no id"}',
        '{"item_id": "a", "title": "y", "image_embedding": [1, 2]}',
        "{broken",
        '{"item_id": "e", "image_embedding": "not numbers"}',
    ]
    event_lines = [
        '{"user_id": "u1", "timestamp": 10, "item_id": "a", "event": "click"}',
        '{"user_id": "u1", "timestamp": 20, "item_id": "b", "event": "click", "query": "q"}',
        '{"user_id": "u1", "timestamp": 30, "item_id": "c", "event": "impression", "label": 1}',
        '{"user_id": "u1", "timestamp": 40, "item_id": "a", "event": "impression", "label": 0}',
        '{"timestamp": 11, "item_id": "a"}',
        '{"user_id": "u1", "item_id": "a"}',
        '{"user_id": "u1", "timestamp": 12}',
        '{"user_id": "u1", "timestamp": "yesterday", "item_id": "a"}',
        '{"user_id": "u1", "timestamp": 13, "item_id": "zzz"}',
        '{"user_id": "u1", "timestamp": 14, "item_id": "d"}',
        '{"user_id": "u1", "timestamp": 15, "item_id": "b", "event": "impression", "label": 2}',
        '{"user_id": "u1", "timestamp": 16, "item_id": "b", "event": "impression"}',
        "not json at all",
        '{"user_id": "u1", "timestamp": 17, "item_id": "b", "event": "purchase"}',
        '{"user_id": "u1", "timestamp": 18, "item_id": "b", "split": "holdout"}',
    ]
    for name, lines in (("items.jsonl", item_lines), ("events.jsonl", event_lines)):
        with open(os.path.join(directory, name), "w") as handle:
            handle.write("\n".join(lines) + "\n")
    with open(os.path.join(directory, "users.csv"), "w") as handle:
        handle.write("user_id,age\nu1,20\n,30\nu1,40\nu2,50,extra\n")
    return item_lines, event_lines


def test_dead_letters_exact_accounting(tmp_path):
    item_lines, event_lines = write_broken_world(str(tmp_path / "raw"))
    dataset = str(tmp_path / "dataset")
    stale = [os.path.join(dataset, "ctr", "train-00002-of-00003.tfrecord.gz"), os.path.join(dataset, schema.STATS_FILE)]
    for path in stale:  # a previous build's files must not survive (they would match the shard globs)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    stats = bd.build_dataset(str(tmp_path / "raw"), dataset, CONFIG)
    assert not os.path.exists(stale[0])
    assert [os.path.basename(p) for p in glob.glob(schema.shard_pattern(dataset, "ctr", "train"))] == [
        "train-00000-of-00001.tfrecord.gz"
    ]
    assert not [d for d in os.listdir(os.path.join(dataset, "ctr")) if d.startswith("beam-temp")]
    assert stats["rows_read"] == {"items": 8, "events": 15, "users": 4}
    assert stats["rows_ok"] == {"items": 3, "events": 4, "users": 1}
    assert stats["dead_letters"] == {
        "items": {
            "bad_embedding_dim": 1,
            "missing_field:item_id": 1,
            "duplicate_item": 1,
            "unparseable_row": 1,
            "bad_embedding": 1,
        },
        "events": {
            "missing_field:user_id": 1,
            "missing_field:timestamp": 1,
            "missing_field:item_id": 1,
            "bad_timestamp": 1,
            "unknown_item": 2,
            "bad_label": 2,
            "unparseable_row": 1,
            "unused_event_type": 1,
            "bad_split": 1,
        },
        "users": {"missing_field:user_id": 1, "duplicate_user": 1, "unparseable_row": 1},
    }
    for table in ("items", "events", "users"):
        assert stats["rows_read"][table] == stats["rows_ok"][table] + sum(stats["dead_letters"][table].values())

    letters = collections.defaultdict(list)
    for path in glob.glob(os.path.join(dataset, schema.DEAD_LETTER_DIR, "*.jsonl")):
        with open(path) as handle:
            for line in handle:
                letter = json.loads(line)
                assert set(letter) == {"table", "reason", "row", "detail"} and letter["detail"]
                letters[letter["table"]].append((letter["reason"], json.dumps(letter["row"], sort_keys=True)))

    def as_row(line):
        try:
            return json.dumps(json.loads(line), sort_keys=True)
        except ValueError:
            return json.dumps(line)

    item_reasons = [
        None,
        None,
        None,
        "bad_embedding_dim",
        "missing_field:item_id",
        "duplicate_item",
        "unparseable_row",
        "bad_embedding",
    ]
    assert sorted(letters["items"]) == sorted((r, as_row(line)) for r, line in zip(item_reasons, item_lines) if r)
    event_reasons = [None] * 4 + [
        "missing_field:user_id",
        "missing_field:timestamp",
        "missing_field:item_id",
        "bad_timestamp",
        "unknown_item",
        "unknown_item",
        "bad_label",
        "bad_label",
        "unparseable_row",
        "unused_event_type",
        "bad_split",
    ]
    assert sorted(letters["events"]) == sorted((r, as_row(line)) for r, line in zip(event_reasons, event_lines) if r)
    assert sorted(letters["users"]) == sorted(
        [
            ("missing_field:user_id", json.dumps({"age": "30", "user_id": None}, sort_keys=True)),
            ("duplicate_user", json.dumps({"age": "40", "user_id": "u1"}, sort_keys=True)),
            ("unparseable_row", json.dumps("u2,50,extra")),
        ]
    )
    assert read_vocab(dataset, schema.ITEM_VOCAB) == ["<PAD>", "<OOV>", "a", "b", "c"]
    assert read_item_table(dataset)[2]["title_tokens"] == [read_vocab(dataset, schema.TOKEN_VOCAB).index("x")]
    # 4 valid events at t = 10, 20, 30, 40: 20 % valid and 20 % test -> valid from t=30, test from t=40
    assert [s[1:3] for s in read_samples(dataset, "ctr", "valid")] == [(30, 4)]
    assert [s[1:3] + s[6:7] for s in read_samples(dataset, "ctr", "test")] == [(40, 2, (2, 3))]


def write_minimal_world(directory):
    """Only item ids (no titles, images or attributes), no queries, no users; explicit split column, ISO
    timestamps, gzipped shards. The test split is the *oldest* period, so a time split would disagree."""
    os.makedirs(directory)
    items = [{"item_id": f"m{i}"} for i in range(6)]
    events = []
    for user in range(3):
        for k in range(8):
            split = "test" if k < 2 else "train" if k < 6 else "valid"
            ts = f"2024-01-0{k + 1}T10:00:0{user}Z"
            events.append(
                {
                    "user_id": f"v{user}",
                    "timestamp": ts,
                    "item_id": f"m{(k + user) % 6}",
                    "event": "click",
                    "split": split,
                }
            )
            events.append(
                {
                    "user_id": f"v{user}",
                    "timestamp": ts,
                    "item_id": f"m{(k * 2) % 6}",
                    "event": "impression",
                    "label": k % 2,
                    "split": split,
                }
            )
    events.append({"user_id": "v0", "timestamp": "2024-02-01T00:00:00Z", "item_id": "m1", "event": "click"})  # no split
    for shard in range(2):
        for name, rows in (("items", items), ("events", events)):
            with gzip.open(os.path.join(directory, f"{name}-{shard:05d}-of-00002.jsonl.gz"), "wt") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows[shard::2])
    return items, events


def test_minimal_dataset_explicit_split_via_cli(tmp_path):
    items, events = write_minimal_world(str(tmp_path / "raw"))
    dataset = str(tmp_path / "dataset")
    assert (
        bd.main(
            [
                "--input",
                str(tmp_path / "raw"),
                "--output",
                dataset,
                "--max-history",
                "3",
                "--num-shards",
                "1",
                "--pretrain-samples-per-user",
                "0",
                "--history-events",
                "click",
                "--direct_num_workers=1",
            ]
        )
        == 0
    )
    with open(os.path.join(dataset, schema.STATS_FILE)) as handle:
        stats = json.load(handle)
    metadata = load_metadata(dataset)
    assert stats["channels"] == metadata.channels == ["attributes"]
    assert (metadata.image_dim, metadata.item_attributes, metadata.user_attributes, metadata.num_queries) == (
        0,
        {},
        {},
        3,
    )
    assert stats["columns"] == {
        "items": ["item_id"],
        "events": ["event", "item_id", "label", "split", "timestamp", "user_id"],
    }
    assert stats["rows_read"] == {"items": 6, "events": 49} and stats["dead_letters"] == {
        "items": {},
        "events": {"missing_field:split": 1},
    }
    assert stats["split"]["mode"] == "column" and stats["config"]["max_history"] == 3
    assert sorted(os.listdir(os.path.join(dataset, schema.VOCAB_DIR))) == [
        "feedback.txt", "items.txt", "queries.txt", "tokens.txt", "users.txt"]
    assert read_vocab(dataset, schema.TOKEN_VOCAB) == list(schema.RESERVED)
    assert read_query_table(dataset) == {}
    assert sorted(r["item_id"] for r in read_item_table(dataset).values()) == [f"m{i}".encode() for i in range(6)]
    assert set(read_item_table(dataset)[2]) == {"item_index", "item_id", "title_tokens"}

    split_of = {
        (e["user_id"], schema.parse_timestamp(e["timestamp"]), e["item_id"]): e["split"] for e in events if "split" in e
    }
    item_vocab = read_vocab(dataset, schema.ITEM_VOCAB)
    for kind in schema.EXAMPLE_KINDS:
        for split in schema.SPLITS:
            got = read_samples(dataset, kind, split)
            assert got and len(got) == stats["samples"][kind][split]
            for sample in got:
                user, ts, item = sample[0], sample[1], item_vocab[sample[2]]
                assert split_of[(user, ts, item)] == split
                assert sample[3] == schema.EMPTY_QUERY_INDEX and set(sample[7]) <= {schema.EMPTY_QUERY_INDEX}
                assert len(sample[6]) <= 3 and all(t < ts for t in sample[8])
    # every impression but the users' first (no earlier click) is written
    assert sum(stats["samples"]["ctr"].values()) == 3 * 8 - 3 and sum(stats["too_short_history"]["ctr"].values()) == 3


def test_help_lists_every_flag():
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-m", "beam_pipelines.build_dataset", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for field in dataclasses.fields(bd.BuildConfig):
        assert "--" + field.name.replace("_", "-") in result.stdout
    assert "--input" in result.stdout and "FnApiRunner" in result.stdout


def test_config_from_args_round_trip():
    import argparse

    parser = cli_args.add_build_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--input", "i", "--output", "o", "--sample-events", "impression,View", "--valid-fraction", "0.25"]
    )
    config = cli_args.build_config_from_args(args)
    assert config == dataclasses.replace(bd.BuildConfig(), sample_events=("impression", "view"), valid_fraction=0.25)
    with pytest.raises(ValueError):
        bd.BuildConfig(valid_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError):
        bd.BuildConfig(history_events=())
    assert bd.pipeline_options([]).view_as(bd.StandardOptions).runner == "FnApiRunner"
    assert bd.pipeline_options(["--runner=DirectRunner"]).view_as(bd.StandardOptions).runner == "DirectRunner"


def test_user_ids_and_history_feedback(tmp_path):
    """Every rating is a sample and a later history step (MovieLens shape): each step's feedback token is
    that event's own rating bucket (point in time: only earlier steps appear), users get vocabulary indices
    from their train-split events only (a user seen only in test maps to OOV), a bad rating is dead-lettered."""
    raw = tmp_path / "raw"
    os.makedirs(raw)
    items = [{"item_id": f"m{i}"} for i in range(5)]
    ratings = {"a": [(1, "m0", 5, "train"), (2, "m1", 1, "train"), (3, "m2", 4.5, "valid"), (4, "m3", 2, "test")],
               "b": [(1, "m1", 3, "train"), (2, "m4", 4, "train"), (3, "m0", 1, "test")],
               "c": [(5, "m2", 5, "test"), (6, "m3", 3, "test")]}
    events = [{"user_id": u, "timestamp": ts, "item_id": item, "event": "impression", "label": int(r >= 4),
               "rating": r, "split": split} for u, rows in ratings.items() for ts, item, r, split in rows]
    events.append({"user_id": "a", "timestamp": 9, "item_id": "m1", "event": "impression", "label": 1,
                   "rating": "five", "split": "test"})
    write_jsonl(str(raw / "items.jsonl"), items)
    write_jsonl(str(raw / "events.jsonl"), events)
    dataset = str(tmp_path / "dataset")
    config = dataclasses.replace(CONFIG, min_history=0, history_events=("impression",), sample_events=("impression",))
    stats = bd.build_dataset(str(raw), dataset, config)
    assert stats["dead_letters"]["events"] == {"bad_field:rating": 1}
    metadata = load_metadata(dataset)
    users = read_vocab(dataset, schema.USER_VOCAB)
    assert users[:2] == list(schema.RESERVED) and sorted(users[2:]) == ["a", "b"]  # c has no train event
    assert metadata.num_users == 4
    feedback = read_vocab(dataset, schema.FEEDBACK_VOCAB)
    assert sorted(feedback[2:]) == ["impression:r1", "impression:r2", "impression:r3", "impression:r4",
                                    "impression:r5"]
    assert metadata.num_feedback == len(feedback)
    seen = {}
    for split in schema.SPLITS:
        for row in reader_rows(dataset, schema.CTR_DIR, split):
            user, ts, length = row["user_id"].decode(), int(row["timestamp"]), int(row["history_length"])
            steps = [feedback[i] for i in row[schema.SEQ_HISTORY_FEEDBACK][:length]]
            expected = [schema.feedback_token("impression", int(r >= 4), r)
                        for t, _, r, _ in ratings[user] if t < ts][-config.max_history:]
            assert steps == expected, (user, ts)
            assert int(row[schema.CTX_USER_INDEX]) == (users.index(user) if user in users else schema.OOV_INDEX)
            seen[(user, ts)] = steps
    assert seen[("a", 4)] == ["impression:r5", "impression:r1", "impression:r5"]  # 4.5 stars round up to 5
    assert seen[("c", 5)] == []
    assert sum(stats["samples"]["ctr"].values()) == len(seen)
