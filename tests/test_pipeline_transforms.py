"""Transform-level tests of beam_pipelines: row parsing and dead-lettering, vocabularies, splits, per-user
sample building (point-in-time property, timelines and cut-offs), negative sampling and the protobuf wire encoder."""

import gzip
import json
import random

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import raw_io
from beam_pipelines import transforms as tx
from seminar_tf import schema

H, S = tx.HISTORY_ROLE, tx.SAMPLE_ROLE
TRAIN, VALID, TEST = range(3)


def fn_api_pipeline():
    return TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"]))


# ----------------------------------------------------------------------------------------------------------
# Values and row validation (plain functions)
def test_canonical_values_agree_across_formats():
    assert tx.canonical_string(42) == tx.canonical_string(42.0) == tx.canonical_string(" 42 ") == "42"
    assert tx.canonical_string(0.5) == "0.5"
    assert tx.canonical_string(True) == "true"
    assert tx.canonical_string("  a \t b\n") == "a b"
    assert tx.canonical_string("   ") is None and tx.canonical_string(float("nan")) is None
    with pytest.raises(TypeError):
        tx.canonical_string([1])
    assert tx.normalize_query("  Red   SHOES ") == "red shoes"
    assert tx.normalize_query(None) == "" and tx.normalize_query("") == ""
    assert [tx.parse_label(v) for v in (1, 0, 1.0, "1", "0.0", True, "false")] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert [tx.parse_label(v) for v in (2, "yes", None, 0.5)] == [None] * 4
    assert tx.attribute_name("Category Name!") == "Category_Name"


def test_validate_event_row_reasons_in_order():
    hist, samp = ("click",), ("impression",)

    def reason(row):
        record, letter = tx.validate_event_row(row, hist, samp)
        return letter["reason"] if letter else None

    base = {"user_id": "u", "timestamp": 10, "item_id": "i"}
    assert reason(base) is None
    assert reason({"timestamp": 10, "item_id": "i"}) == "missing_field:user_id"
    assert reason({"user_id": "u", "item_id": "i"}) == "missing_field:timestamp"
    assert reason({"user_id": "u", "timestamp": 10}) == "missing_field:item_id"
    assert reason(dict(base, timestamp="soon")) == "bad_timestamp"
    assert reason(dict(base, event="purchase")) == "unused_event_type"
    assert reason(dict(base, event="impression")) == "bad_label"
    assert reason(dict(base, event="impression", label=3)) == "bad_label"
    assert reason(dict(base, event="impression", label="1")) is None
    assert reason(dict(base, split="holdout")) == "bad_split"
    assert reason(dict(base, user_id=["u"])) == "bad_field:user_id"
    record, _ = tx.validate_event_row(
        dict(base, timestamp="1970-01-01T00:01:40Z", query=" A  b ", event="Click"), hist, samp
    )
    assert (record["timestamp"], record["query"], record["roles"], record["split"]) == (100, "a b", H, None)
    record, _ = tx.validate_event_row(
        dict(base, event="impression", label=0, split="TEST"), hist, ("impression", "click")
    )
    assert (record["roles"], record["label"], record["split"]) == (S, 0.0, "test")


def test_validate_item_row():
    record, letter = tx.validate_item_row(
        {
            "item_id": 7,
            "title": "Red  Shoes, size-42",
            "image_embedding": "0.5 1.5",
            "image": "x.png",
            "Brand Name": "acme",
            "n": None,
        }
    )
    assert letter is None
    assert record["item_id"] == "7" and record["title_tokens"] == ["red", "shoes", "size", "42"]
    assert record["embedding"] == [0.5, 1.5] and record["has_image"]
    assert record["attrs"] == {"Brand_Name": "acme", "n": None}
    long_title = " ".join(f"w{i}" for i in range(40))
    assert (
        len(tx.validate_item_row({"item_id": "x", "title": long_title})[0]["title_tokens"]) == schema.MAX_TITLE_TOKENS
    )
    assert tx.validate_item_row({"item_id": "x", "image_embedding": "[1, nan]"})[1]["reason"] == "bad_embedding"
    assert tx.validate_item_row({"item_id": "x", "image_embedding": "a b"})[1]["reason"] == "bad_embedding"
    assert tx.validate_item_row({"title": "t"})[1]["reason"] == "missing_field:item_id"
    assert tx.validate_item_row({"item_id": "<PAD>"})[1]["reason"] == "bad_field:item_id"


# ----------------------------------------------------------------------------------------------------------
# Reading raw files (Beam)
def test_read_raw_jsonl_and_csv_dead_letters_unparseable_rows(tmp_path):
    with gzip.open(tmp_path / "items-00000.jsonl.gz", "wt") as handle:
        handle.write('{"item_id": "a", "title": "  Red  "}\n\n{broken\n[1, 2]\n')
    with gzip.open(tmp_path / "items-00001.jsonl.gz", "wt") as handle:
        handle.write('{"item_id": 2, "category": ""}\n')
    (tmp_path / "users.csv").write_text('user_id,age,tags\nu1,20,"a, b"\nu2,,\nu3,30\n', encoding="utf-8")
    items = raw_io.find_table_files(str(tmp_path), "items")
    users = raw_io.find_table_files(str(tmp_path), "users")
    assert (items.fmt, len(items.paths), users.fmt, users.csv_headers) == (
        "jsonl",
        2,
        "csv",
        (("user_id", "age", "tags"),),
    )
    assert raw_io.find_table_files(str(tmp_path), "events") is None

    with fn_api_pipeline() as p:
        item_out = p | "Items" >> raw_io.ReadRawTable(items)
        user_out = p | "Users" >> raw_io.ReadRawTable(users)
        assert_that(
            item_out["rows"],
            equal_to([{"item_id": "a", "title": "Red"}, {"item_id": 2, "category": None}]),
            label="item rows",
        )
        assert_that(
            item_out["dead_letters"] | "ItemDead" >> beam.Map(lambda d: (d["table"], d["reason"], d["row"])),
            equal_to([("items", "unparseable_row", "{broken"), ("items", "unparseable_row", "[1, 2]")]),
            label="item dead",
        )
        assert_that(
            user_out["rows"],
            equal_to([{"user_id": "u1", "age": "20", "tags": "a, b"}, {"user_id": "u2", "age": None, "tags": None}]),
            label="user rows",
        )
        assert_that(
            user_out["dead_letters"] | "UserDead" >> beam.Map(lambda d: (d["reason"], d["row"], d["detail"])),
            equal_to([("unparseable_row", "u3,30", "CSV line has 2 fields, the header has 3")]),
            label="user dead",
        )


def test_read_raw_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist(
            [
                {"item_id": "a", "image_embedding": [0.5, 1.0], "title": " t "},
                {"item_id": "b", "image_embedding": None, "title": None},
            ]
        ),
        tmp_path / "items.parquet",
    )
    files = raw_io.find_table_files(str(tmp_path), "items")
    with fn_api_pipeline() as p:
        out = p | raw_io.ReadRawTable(files)
        assert_that(
            out["rows"],
            equal_to(
                [
                    {"item_id": "a", "image_embedding": [0.5, 1.0], "title": "t"},
                    {"item_id": "b", "image_embedding": None, "title": None},
                ]
            ),
        )


def test_validate_rows_dofn_splits_ok_and_dead():
    rows = [
        {"user_id": "u", "timestamp": 5, "item_id": "i", "event": "impression", "label": "1"},
        {"user_id": "u", "timestamp": 5, "item_id": "i", "event": "impression", "label": "maybe"},
        {"user_id": "u", "timestamp": "x", "item_id": "i"},
        {"user_id": "u", "timestamp": 6, "item_id": "i", "event": "view"},
    ]
    with fn_api_pipeline() as p:
        out = (
            p
            | beam.Create(rows)
            | beam.ParDo(tx.ValidateRows("events", ("click",), ("impression",))).with_outputs(
                raw_io.DEAD_LETTER_TAG, main="ok"
            )
        )
        assert_that(
            out.ok | beam.Map(lambda r: (r["timestamp"], r["roles"], r["label"])), equal_to([(5, S, 1.0)]), label="ok"
        )
        assert_that(
            out[raw_io.DEAD_LETTER_TAG] | beam.Map(lambda d: (d["reason"], d["row"]["timestamp"])),
            equal_to([("bad_label", 5), ("bad_timestamp", "x"), ("unused_event_type", 6)]),
            label="dead",
        )


# ----------------------------------------------------------------------------------------------------------
# Vocabularies
def test_build_vocabulary_min_count_and_reserved():
    pairs = [("b", 1), ("a", 1), ("b", 1), ("c", 1), ("<OOV>", 5), ("d", 0), ("a", 1), ("e", 3)]
    with fn_api_pipeline() as p:
        source = p | beam.Create(pairs)
        assert_that(
            source | "Min1" >> tx.BuildVocabulary(schema.RESERVED, 1),
            equal_to([(["<PAD>", "<OOV>", "e", "a", "b", "c"], [0, 0, 3, 2, 2, 1])]),
            label="min1",
        )
        assert_that(
            source | "Min0Queries" >> tx.BuildVocabulary(schema.QUERY_RESERVED, 0),
            equal_to([(["<PAD>", "<OOV>", "<EMPTY>", "e", "a", "b", "c", "d"], [0, 0, 0, 3, 2, 2, 1, 0])]),
            label="min0",
        )
        assert_that(
            source | "Min3" >> tx.BuildVocabulary(schema.RESERVED, 3),
            equal_to([(["<PAD>", "<OOV>", "e"], [0, 0, 3])]),
            label="min3",
        )
    assert tx.vocabulary_index((["<PAD>", "<OOV>", "x"], [0, 0, 1])) == {"<PAD>": 0, "<OOV>": 1, "x": 2}
    assert tx.lookup({"x": 2}, "y") == schema.OOV_INDEX and tx.lookup({"x": 2}, None) == schema.OOV_INDEX


def test_build_attribute_vocabularies_keeps_empty_attributes():
    pairs = [(("color", "red"), 1), (("color", "blue"), 1), (("color", "red"), 1), (("size", "L"), 1)]
    with fn_api_pipeline() as p:
        names = p | "Names" >> beam.Create([["color", "empty", "size"]])
        vocabs = p | beam.Create(pairs) | tx.BuildAttributeVocabularies(names, 2)
        assert_that(
            vocabs,
            equal_to(
                [
                    {
                        "color": (["<PAD>", "<OOV>", "red"], [0, 0, 2]),
                        "empty": (["<PAD>", "<OOV>"], [0, 0]),
                        "size": (["<PAD>", "<OOV>"], [0, 0]),
                    }
                ]
            ),
        )


# ----------------------------------------------------------------------------------------------------------
# Splits
def test_time_split_cutoffs():
    counts = [(t, 1) for t in range(10)]  # 10 events at t = 0..9
    assert tx.time_split_cutoffs(counts, 0.2, 0.3) == (5, 7)
    assert [tx.time_split(t, 5, 7) for t in (4, 5, 6, 7, 9)] == ["train", "valid", "valid", "test", "test"]
    assert tx.time_split_cutoffs(counts, 0.0, 0.3) == (7, 7)
    assert tx.time_split_cutoffs(counts, 0.0, 0.0) == (None, None)
    assert [tx.time_split(t, None, None) for t in (0, 9)] == ["train", "train"]
    # ties: the cutoff second goes entirely to the later split
    assert tx.time_split_cutoffs([(1, 5), (2, 5)], 0.0, 0.2) == (2, 2)
    assert tx.time_split_cutoffs([], 0.1, 0.1) == (None, None)


def test_evenly_spaced():
    assert tx.evenly_spaced(10, 3) == [2, 5, 9]
    assert tx.evenly_spaced(4, 8) == [0, 1, 2, 3]
    assert tx.evenly_spaced(5, 0) == [0, 1, 2, 3, 4]
    assert tx.evenly_spaced(0, 3) == []
    for count in range(1, 30):
        for wanted in range(1, count):
            positions = tx.evenly_spaced(count, wanted)
            assert len(set(positions)) == wanted and positions[-1] == count - 1 and positions == sorted(positions)


# ----------------------------------------------------------------------------------------------------------
# Negative sampling
def test_negative_sampler_excludes_positive_follows_frequency_and_is_deterministic():
    item_counts = [0, 0, 10, 30, 60]
    query_counts = [0, 0, 50, 50, 0]
    sampler = tx.NegativeSampler(item_counts, query_counts, num_negatives=4, seed=3)
    assert sampler.sample("u|1", 4) == sampler.sample("u|1", 4)
    assert sampler.sample("u|1", 4) != sampler.sample("u|2", 4) or sampler.sample("u|3", 4) != sampler.sample("u|1", 4)
    drawn_items, drawn_queries = [], []
    for k in range(500):
        items, queries = sampler.sample(f"k{k}", 4)
        drawn_items += items
        drawn_queries += queries
    assert set(drawn_items) == {2, 3} and set(drawn_queries) == {2, 3}
    assert 0.65 < drawn_items.count(3) / len(drawn_items) < 0.85  # 30 / (10 + 30)
    assert 0.4 < drawn_queries.count(2) / len(drawn_queries) < 0.6
    # only the positive has events: fall back to the other vocabulary items, uniformly
    lonely = tx.NegativeSampler([0, 0, 0, 5, 0], [0, 0, 1], num_negatives=50, seed=0)
    assert set(lonely.sample("x", 3)[0]) == {2, 4}
    assert tx.NegativeSampler([0, 0, 5], [0, 0, 0], 3, 0).sample("x", 2) == (
        [schema.OOV_INDEX] * 3,
        [schema.EMPTY_QUERY_INDEX] * 3,
    )


# ----------------------------------------------------------------------------------------------------------
# Per-user samples: point-in-time property
def _reference_history(events, t, max_history):
    past = sorted(e[:3] for e in events if e[3] & H and e[0] < t)
    return past[-max_history:] if max_history else past


@pytest.mark.parametrize("seed", range(6))
def test_plan_user_samples_is_point_in_time_correct(seed):
    rng = random.Random(seed)
    max_history, min_history = rng.choice([(1, 0), (3, 1), (5, 2), (50, 1)])
    events = []
    for _ in range(rng.randint(5, 60)):
        roles = rng.choice([H, H, S, H | S])
        events.append(
            (
                rng.randint(0, 12),
                rng.randint(2, 9),
                rng.randint(2, 5),
                roles,
                float(rng.random() < 0.5),
                rng.randint(0, 2),
            )
        )
    sampler = tx.NegativeSampler([0, 0] + [1] * 8, [0, 0, 1, 1, 1, 1], num_negatives=2, seed=seed)
    history, samples, too_short = tx.plan_user_samples(
        events,
        max_history=max_history,
        min_history=min_history,
        pretrain_samples_per_user=3,
        sampler=sampler,
        user_key="u",
    )
    assert [h[0] for h in history] == sorted(h[0] for h in history)
    for sample in samples:
        steps = history[sample.history_start : sample.history_end]
        assert all(step[0] < sample.timestamp for step in steps), "history must be strictly before the sample"
        assert min_history <= len(steps) <= max_history
        assert [s[:3] for s in steps] == _reference_history(events, sample.timestamp, max_history)
        if sample.kind == schema.PRETRAIN_DIR:
            assert (
                sample.label == 1.0
                and len(sample.negative_items) == 2
                and sample.target_item not in sample.negative_items
            )
    ctr = [s for s in samples if s.kind == schema.CTR_DIR]
    sample_events = [e for e in events if e[3] & S]
    num_short = sum(v for (kind, _), v in too_short.items() if kind == schema.CTR_DIR)
    assert len(ctr) + num_short == len(sample_events)
    assert sorted((s.timestamp, s.target_item, s.target_query, s.label) for s in ctr) == sorted(
        e[:3] + (e[4],) for e in sample_events if len(_reference_history(events, e[0], 0)) >= min_history
    )
    for split_index, split in enumerate(schema.SPLITS):
        num_history = sum(1 for e in events if e[3] & H and e[5] == split_index)
        num_pretrain = sum(1 for s in samples if s.kind == schema.PRETRAIN_DIR and s.split == split)
        assert num_pretrain + too_short[(schema.PRETRAIN_DIR, split)] == min(3, num_history)


def _decode(serialized):
    example = tf.train.Example.FromString(serialized).features.feature
    return (
        example["user_id"].bytes_list.value[0].decode(),
        example["timestamp"].int64_list.value[0],
        example["target_item"].int64_list.value[0],
        example["label"].float_list.value[0],
        example["history_end"].int64_list.value[0],
        len(example["negative_items"].int64_list.value),
    )


def _decode_timeline(serialized):
    example = tf.train.SequenceExample.FromString(serialized)
    ctx = example.context.feature
    lists = example.feature_lists.feature_list
    return (
        ctx["user_id"].bytes_list.value[0].decode(),
        ctx["user_age"].int64_list.value[0],
        ctx["user_index"].int64_list.value[0],
        tuple(f.int64_list.value[0] for f in lists["history_item"].feature),
        tuple(f.int64_list.value[0] for f in lists["history_timestamp"].feature),
        "history_feedback" in lists,
    )


def test_build_user_samples_dofn():
    events = [
        (10, 5, 2, H, 0.0, TRAIN),
        (20, 6, 3, H, 0.0, TRAIN),
        (20, 7, 2, S, 1.0, TRAIN),  # sees only t=10: the click at the same second is excluded
        (20, 8, 2, H, 0.0, VALID),
        (30, 9, 4, H | S, 0.0, TEST),  # newest 2 of {10, 20, 20}
    ]
    element = ("u1", {"events": events, "users": [{"age": 3}]})
    sampling = {"item_counts": [0, 0] + [1] * 8, "query_counts": [0, 0, 1, 1, 1]}
    tags = [tx.output_tag(k, s) for k in schema.EXAMPLE_KINDS for s in schema.SPLITS]
    with fn_api_pipeline() as p:
        out = (
            p
            | beam.Create([element, ("u2", {"events": [], "users": [{"age": 2}]})])
            | beam.ParDo(
                tx.BuildUserSamples(max_history=2, min_history=1, pretrain_samples_per_user=0, num_negatives=3, seed=0),
                beam.pvalue.AsSingleton(p | "Sampling" >> beam.Create([sampling])),
                beam.pvalue.AsSingleton(p | "Names" >> beam.Create([["age"]])),
            ).with_outputs(tx.COUNTER_TAG, tx.TIMELINE_TAG, *tags)
        )
        expect = {  # history = the timeline's first history_end steps, newest max_history=2 of them (the reader cuts)
            "ctr_train": [("u1", 20, 7, 1.0, 1, 0)],
            "ctr_test": [("u1", 30, 9, 0.0, 3, 0)],
            "pretrain_train": [("u1", 20, 6, 1.0, 1, 3)],
            "pretrain_valid": [("u1", 20, 8, 1.0, 1, 3)],
            "pretrain_test": [("u1", 30, 9, 1.0, 3, 3)],
            "ctr_valid": [],
        }
        assert_that(out[tx.TIMELINE_TAG] | "DecodeTimelines" >> beam.Map(_decode_timeline),
                    equal_to([("u1", 3, schema.OOV_INDEX, (5, 6, 8, 9), (10, 20, 20, 30), False)]), label="timelines")
        for tag, expected in expect.items():
            assert_that(out[tag] | f"Decode{tag}" >> beam.Map(_decode), equal_to(expected), label=f"check {tag}")
        assert_that(
            out[tx.COUNTER_TAG],
            equal_to(
                [
                    (("samples", "ctr", "train"), 1),
                    (("samples", "ctr", "test"), 1),
                    (("samples", "pretrain", "train"), 1),
                    (("samples", "pretrain", "valid"), 1),
                    (("samples", "pretrain", "test"), 1),
                    (("too_short_history", "pretrain", "train"), 1),
                    (("timelines",), 1),
                    (("timeline_steps",), 4),
                ]
            ),
            label="counters",
        )


# ----------------------------------------------------------------------------------------------------------
# Wire encoder == tf.train protos
def test_wire_encoder_matches_tf_protos():
    feature = tf.train.Feature
    ints = [0, 1, 127, 128, 300, 2**40, -1, -(2**63)]
    assert tf.train.Feature.FromString(tx.int64_feature(ints)) == feature(int64_list=tf.train.Int64List(value=ints))
    assert tf.train.Feature.FromString(tx.int64_feature([])) == feature(int64_list=tf.train.Int64List())
    assert tf.train.Feature.FromString(tx.float_feature([0.5, -2.25])) == feature(
        float_list=tf.train.FloatList(value=[0.5, -2.25])
    )
    assert tf.train.Feature.FromString(tx.bytes_feature([b"a", b""])) == feature(
        bytes_list=tf.train.BytesList(value=[b"a", b""])
    )
    example = tf.train.Example.FromString(
        tx.example_bytes({"b": tx.int64_feature([3]), "a": tx.bytes_feature([b"x" * 300])})
    )
    assert example == tf.train.Example(
        features=tf.train.Features(
            feature={
                "a": feature(bytes_list=tf.train.BytesList(value=[b"x" * 300])),
                "b": feature(int64_list=tf.train.Int64List(value=[3])),
            }
        )
    )
    history = [(1, 5, 2, H, 0.0, 0, 4), (2, 6, 3, H, 0.0, 0, 3), (3, 7, 2, H, 0.0, 0, 4)]
    expected = tf.train.SequenceExample()
    ctx = expected.context.feature
    ctx["user_id"].bytes_list.value.append("ü1".encode())
    ctx["user_age"].int64_list.value.append(2)
    ctx["user_index"].int64_list.value.append(7)
    for name, column in (("history_item", 1), ("history_query", 2), ("history_timestamp", 0), ("history_feedback", 6)):
        for event in history:
            expected.feature_lists.feature_list[name].feature.add().int64_list.value.append(event[column])
    timeline = tx.timeline_bytes("ü1", history, {"age": 2}, 7, with_feedback=True)
    assert tf.train.SequenceExample.FromString(timeline) == expected
    sample = tx.Sample("pretrain", "train", 9, 4, 2, 1.0, 1, 3, [8, 9], [2, 2])
    expected = tf.train.Example()
    ctx = expected.features.feature
    ctx["user_id"].bytes_list.value.append("ü1".encode())
    for name, value in (("timestamp", 9), ("target_item", 4), ("target_query", 2), ("history_end", 3)):
        ctx[name].int64_list.value.append(value)
    ctx["label"].float_list.value.append(1.0)
    ctx["negative_items"].int64_list.value.extend([8, 9])
    ctx["negative_queries"].int64_list.value.extend([2, 2])
    assert tf.train.Example.FromString(tx.sample_bytes("ü1", sample)) == expected
    empty = sample._replace(kind="ctr", history_start=0, history_end=0)
    ctr = tf.train.Example.FromString(tx.sample_bytes("ü1", empty))
    assert "negative_items" not in ctr.features.feature and ctr.features.feature["history_end"].int64_list.value == [0]
    # the schema's specs parse both records; an empty timeline (a user without history events) is length 0
    metadata = schema.DatasetMetadata(
        num_items=10,
        num_queries=4,
        num_tokens=2,
        item_attributes={},
        user_attributes={"age": 4},
        image_dim=0,
        has_image_pixels=False,
        channels=["attributes"],
        max_history=4,
        num_negatives=2,
        num_users=8,
        num_feedback=5,
    )
    context_spec, sequence_spec = schema.timeline_spec(metadata)
    for steps in (history, []):
        context, sequence = tf.io.parse_single_sequence_example(
            tx.timeline_bytes("ü1", steps, {"age": 2}, 7, with_feedback=True), context_spec, sequence_spec)
        assert (int(context["user_age"]), int(context["user_index"])) == (2, 7)
        assert sequence["history_item"].numpy().tolist() == [e[1] for e in steps]
        assert sequence["history_feedback"].numpy().tolist() == [e[6] for e in steps]
    for kind in schema.EXAMPLE_KINDS:
        parsed = tf.io.parse_single_example(tx.sample_bytes("ü1", sample._replace(kind=kind)),
                                            schema.sample_spec(metadata, kind))
        assert int(parsed["history_end"]) == 3 and parsed["user_id"].numpy() == "ü1".encode()
        assert ("negative_items" in parsed) == (kind == schema.PRETRAIN_DIR)


def test_image_dim_inference():
    assert tx.image_dim_from_lengths([(0, 5), (3, 2), (4, 2), (2, 1)], 0) == 3  # most common, ties -> smaller
    assert tx.image_dim_from_lengths([(0, 5), (3, 2)], 8) == 8  # configured wins when embeddings exist
    assert tx.image_dim_from_lengths([(0, 5)], 8) == 0  # no embeddings at all: no image channel
    assert tx.image_dim_from_lengths([], 0) == 0


def test_item_and_query_examples_parse_with_schema_specs():
    metadata = schema.DatasetMetadata(
        num_items=3,
        num_queries=4,
        num_tokens=5,
        item_attributes={"color": 3},
        user_attributes={},
        image_dim=2,
        has_image_pixels=False,
        channels=list(schema.CHANNELS),
        max_history=4,
        num_negatives=2,
    )
    record, _ = tx.validate_item_row({"item_id": "it", "title": "red shoe zzz", "color": "red"})
    tokens = {"red": 2, "shoe": 3}
    parsed = tf.io.parse_single_example(
        tx.item_example(2, record, tokens, {"color": {"red": 2}}, image_dim=2), schema.item_table_spec(metadata)
    )
    assert parsed["item_index"].numpy() == 2 and parsed["item_id"].numpy() == b"it"
    assert parsed["title_tokens"].values.numpy().tolist() == [2, 3, schema.OOV_INDEX]
    assert parsed["image_embedding"].numpy().tolist() == [0.0, 0.0] and parsed["attr_color"].numpy() == 2
    parsed = tf.io.parse_single_example(tx.query_example(3, "red shoe", tokens), schema.query_table_spec())
    assert (parsed["query_index"].numpy(), parsed["query"].numpy()) == (3, b"red shoe")
    assert parsed["query_tokens"].values.numpy().tolist() == [2, 3]


def test_dead_letter_json_handles_parquet_values():
    import datetime

    letter = raw_io.dead_letter("items", "x", {"image": b"\x00\x01", "t": datetime.datetime(2024, 1, 2)}, "d")
    assert json.loads(raw_io.dead_letter_json(letter))["row"] == {"image": "<2 bytes>", "t": "2024-01-02T00:00:00"}
    assert tx.parse_event_timestamp(datetime.datetime(1970, 1, 1, 0, 1, 40)) == 100
