"""Synthetic world generator (docs/design.md §7): formats, determinism and every planted structure, on tiny worlds."""

import collections
import csv
import dataclasses
import filecmp
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seminar_tf import schema
from seminar_tf.data import world as world_lib
from seminar_tf.data.world import WorldConfig, generate_world, load_truth

TINY = WorldConfig(num_users=40, num_items=300, num_topics=8, mean_history=60, max_history_events=300,
                   min_history_events=20, impressions_per_user=20, words_per_topic=20, queries_per_topic=8,
                   num_authors=40, num_categories=16, image_dim=16, short_term_phase_events=20, seed=3)
TABLE_COLUMNS = {
    "items": list(world_lib.ITEM_COLUMNS),
    "events": list(world_lib.EVENT_COLUMNS),
    "users": list(world_lib.USER_COLUMNS),
}


def read_table(out_dir: str, table: str, fmt: str) -> tuple:
    """(column names, rows as dicts with typed values) read with json / csv / pyarrow."""
    path = os.path.join(out_dir, f"{table}.{fmt}")
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        return list(rows[0]), rows
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        for row in rows:
            for name in (schema.TIMESTAMP, schema.LABEL):
                if name in row:
                    row[name] = int(row[name])
            if schema.IMAGE_EMBEDDING in row:
                row[schema.IMAGE_EMBEDDING] = json.loads(row[schema.IMAGE_EMBEDDING])
        return list(reader.fieldnames), rows
    table_ = pq.read_table(path)
    return table_.column_names, table_.to_pylist()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The tiny world in each format: fmt -> (out_dir, summary)."""
    out = {}
    for fmt in schema.RAW_FORMATS:
        out_dir = str(tmp_path_factory.mktemp(f"world_{fmt}"))
        out[fmt] = (out_dir, generate_world(dataclasses.replace(TINY, format=fmt), out_dir))
    return out


@pytest.fixture(scope="module")
def tiny(worlds):
    """The jsonl world read back: rows of each table, the truth and per-item / per-user lookups."""
    out_dir, summary = worlds["jsonl"]
    truth = load_truth(out_dir)
    items = truth["items"]
    tables = {table: read_table(out_dir, table, "jsonl")[1] for table in TABLE_COLUMNS}
    clicks_by_user = collections.defaultdict(list)
    for row in tables["events"]:
        if row[schema.EVENT] == world_lib.CLICK_EVENT:
            clicks_by_user[row[schema.USER_ID]].append(row)
    return dict(
        out_dir=out_dir, summary=summary, truth=truth, **tables,
        topic=dict(zip(items["item_id"], items["topic"])),
        mixture={i: dict(zip(t, w)) for i, t, w in zip(items["item_id"], items["mixture_topics"],
                                                       items["mixture_weights"])},
        long_term=dict(zip(truth["users"]["user_id"], truth["users"]["long_term_topics"])),
        clicks_by_user=clicks_by_user,
        impressions=[row for row in tables["events"] if row[schema.EVENT] == world_lib.IMPRESSION_EVENT],
    )


def auc(scores, labels) -> float:
    """ROC AUC (Mann-Whitney, ties averaged)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels) == 1
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - counts + (counts + 1) / 2)[inverse]
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ------------------------------------------------------------------------------------------------ formats
def test_same_seed_writes_same_bytes_and_another_seed_differs(tmp_path):
    for fmt in ("jsonl", "parquet"):
        config = dataclasses.replace(TINY, format=fmt)
        first, second, other = (str(tmp_path / f"{fmt}_{name}") for name in ("a", "b", "c"))
        generate_world(config, first)
        generate_world(config, second)
        generate_world(dataclasses.replace(config, seed=TINY.seed + 1), other)
        names = sorted(os.listdir(first))
        assert names == sorted([f"{t}.{fmt}" for t in TABLE_COLUMNS] + [world_lib.TRUTH_FILE])
        match, mismatch, errors = filecmp.cmpfiles(first, second, names, shallow=False)
        assert (mismatch, errors) == ([], [])
        assert not filecmp.cmp(os.path.join(first, f"events.{fmt}"), os.path.join(other, f"events.{fmt}"),
                               shallow=False)
        assert not filecmp.cmp(os.path.join(first, f"items.{fmt}"), os.path.join(other, f"items.{fmt}"),
                               shallow=False)


@pytest.mark.parametrize("fmt", schema.RAW_FORMATS)
def test_every_table_has_the_documented_columns_and_types(worlds, fmt):
    out_dir, summary = worlds[fmt]
    counts = {"items": TINY.num_items, "events": summary["num_events"], "users": TINY.num_users}
    for table, expected in TABLE_COLUMNS.items():
        names, rows = read_table(out_dir, table, fmt)
        assert names == expected, table
        assert len(rows) == counts[table], table
        for row in rows:
            for name in expected:
                if name in (schema.TIMESTAMP, schema.LABEL):
                    assert type(row[name]) is int, (table, name, row)
                elif name == schema.IMAGE_EMBEDDING:
                    assert len(row[name]) == TINY.image_dim and all(type(v) is float for v in row[name])
                else:
                    assert type(row[name]) is str, (table, name, row)
    _, events = read_table(out_dir, "events", fmt)
    assert {row[schema.EVENT] for row in events} == {world_lib.CLICK_EVENT, world_lib.IMPRESSION_EVENT}
    assert world_lib.CLICK_EVENT in schema.DEFAULT_HISTORY_EVENTS
    assert world_lib.IMPRESSION_EVENT in schema.DEFAULT_SAMPLE_EVENTS
    assert all(row[schema.LABEL] == 1 for row in events if row[schema.EVENT] == world_lib.CLICK_EVENT)
    assert {row[schema.LABEL] for row in events if row[schema.EVENT] == world_lib.IMPRESSION_EVENT} == {0, 1}
    assert sum(row[schema.EVENT] == world_lib.IMPRESSION_EVENT for row in events) == summary["num_impressions"]
    if fmt == "parquet":
        assert pq.read_schema(os.path.join(out_dir, "items.parquet")).field(schema.IMAGE_EMBEDDING).type == \
            pa.list_(pa.float32())
        events_schema = pq.read_schema(os.path.join(out_dir, "events.parquet"))
        assert events_schema.field(schema.TIMESTAMP).type == pa.int64()
        assert events_schema.field(schema.QUERY).type == pa.string()


def test_the_three_formats_hold_the_same_rows(worlds):
    for table in TABLE_COLUMNS:
        reference = read_table(worlds["jsonl"][0], table, "jsonl")[1]
        for fmt in ("csv", "parquet"):
            rows = read_table(worlds[fmt][0], table, fmt)[1]
            if table == "items":  # parquet stores float32
                for row, ref in zip(rows, reference):
                    np.testing.assert_allclose(row.pop(schema.IMAGE_EMBEDDING), ref[schema.IMAGE_EMBEDDING],
                                               rtol=1e-6, atol=1e-6)
                reference_rest = [{k: v for k, v in r.items() if k != schema.IMAGE_EMBEDDING} for r in reference]
                assert rows == reference_rest, fmt
            else:
                assert rows == reference, (table, fmt)


def test_summary_counts_match_the_files(tiny):
    summary, events = tiny["summary"], tiny["events"]
    assert summary["num_events"] == len(events)
    assert summary["num_clicks"] + summary["num_impressions"] == len(events)
    assert summary["num_impressions"] == TINY.num_users * TINY.impressions_per_user
    assert summary["positive_rate"] == pytest.approx(np.mean([r[schema.LABEL] for r in tiny["impressions"]]))
    assert summary["num_search_clicks"] == sum(
        r[schema.QUERY] != "" for r in events if r[schema.EVENT] == world_lib.CLICK_EVENT)
    assert set(summary["paths"]) == {"items", "events", "users", "truth"}
    assert all(os.path.exists(p) for p in summary["paths"].values())


# ------------------------------------------------------------------------------------------------ planted structure
def test_history_only_items_are_never_impression_targets(tiny):
    history_only = set(tiny["truth"]["items"]["history_only_item_ids"])
    assert len(history_only) == round(TINY.history_only_item_fraction * TINY.num_items)
    targets = {r[schema.ITEM_ID] for r in tiny["impressions"]}
    clicked = {r[schema.ITEM_ID] for r in tiny["events"] if r[schema.EVENT] == world_lib.CLICK_EVENT}
    assert not history_only & targets
    assert len(history_only & clicked) >= 0.8 * len(history_only)  # they do live in histories


def test_browse_has_empty_query_and_search_clicks_follow_the_query_topic(tiny):
    truth = tiny["truth"]
    query_topic = {q: t for t, queries in enumerate(truth["topics"]["queries"]) for q in queries}
    assert len(query_topic) == TINY.num_topics * TINY.queries_per_topic  # queries are distinct across topics
    clicks = [r for r in tiny["events"] if r[schema.EVENT] == world_lib.CLICK_EVENT]
    search = [r for r in clicks if r[schema.QUERY] != ""]
    browse = [r for r in clicks if r[schema.QUERY] == ""]
    assert all(r[schema.QUERY] in query_topic for r in search)
    # every search click is on an item of the query's topic; browsing spans every topic
    assert all(tiny["topic"][r[schema.ITEM_ID]] == query_topic[r[schema.QUERY]] for r in search)
    assert {tiny["topic"][r[schema.ITEM_ID]] for r in browse} == set(range(TINY.num_topics))
    assert abs(len(search) / len(clicks) - TINY.search_fraction) < 0.1
    queries = collections.Counter(r[schema.QUERY] for r in search)
    assert queries.most_common(1)[0][1] >= 10 and len(queries) < len(search) / 5  # a finite set that repeats
    # impressions: personalized search (non-empty query, truth's query topic) and recommendation (empty)
    for row, topic_ in zip(tiny["impressions"], truth["impressions"]["query_topic"]):
        assert (row[schema.QUERY] != "") == (topic_ >= 0)
        if topic_ >= 0:
            assert query_topic[row[schema.QUERY]] == topic_
    searched = np.mean([r[schema.QUERY] != "" for r in tiny["impressions"]])
    assert 0.25 < searched < 0.55


def test_long_term_topics_appear_only_in_the_oldest_part_of_the_history(tiny):
    users = tiny["truth"]["users"]
    old_long_term = old_total = 0
    for user, num_old, length, until in zip(users["user_id"], users["num_long_term_events"],
                                            users["history_length"], users["long_term_until"]):
        clicks = tiny["clicks_by_user"][user]
        assert len(clicks) == length
        assert num_old == max(1, round(TINY.long_term_window * length))
        assert clicks[num_old - 1][schema.TIMESTAMP] == until
        long_term = set(tiny["long_term"][user])
        assert 1 <= len(long_term) <= 2
        old_topics = [tiny["topic"][r[schema.ITEM_ID]] for r in clicks[:num_old]]
        recent_topics = {tiny["topic"][r[schema.ITEM_ID]] for r in clicks[num_old:]}
        assert long_term <= set(old_topics), user
        assert not long_term & recent_topics, user
        old_long_term += sum(t in long_term for t in old_topics)
        old_total += num_old
    assert old_long_term > 0.35 * old_total  # a real share of the oldest part, not one click per user
    # and the long-term part is far back: a long tail of recent clicks follows it
    lengths = np.array(users["history_length"])
    assert np.mean(lengths - np.array(users["num_long_term_events"])) > 0.75 * np.mean(lengths)


def test_short_term_interests_drift(tiny):
    phases = tiny["truth"]["users"]["short_term_phases"]
    long_histories = [p for p, n in zip(phases, tiny["truth"]["users"]["history_length"])
                      if n >= 4 * TINY.short_term_phase_events]
    drifting = [p for p in long_histories if len({tuple(topics) for _, topics in p}) >= 3]
    assert len(long_histories) >= 3 and len(drifting) >= 0.7 * len(long_histories)
    for user, user_phases in zip(tiny["truth"]["users"]["user_id"], phases):
        starts = [ts for ts, _ in user_phases]
        assert starts == sorted(starts) and starts[0] == tiny["clicks_by_user"][user][0][schema.TIMESTAMP]
        assert not {t for _, topics in user_phases for t in topics} & set(tiny["long_term"][user])


def test_titles_come_from_topic_vocabularies_and_attributes_follow_topics(tiny):
    words = tiny["truth"]["topics"]["words"]
    word_topic = {w: t for t, ws in enumerate(words) for w in ws}
    common = set(tiny["truth"]["topics"]["common_words"])
    k = TINY.num_topics
    authors_follow = categories_follow = 0
    for row in tiny["items"]:
        tokens = schema.tokenize(row[schema.TITLE])
        assert all(t in word_topic or t in common for t in tokens)
        assert tiny["topic"][row[schema.ITEM_ID]] in {word_topic[t] for t in tokens if t in word_topic}
        mixture = tiny["mixture"][row[schema.ITEM_ID]]
        assert 1 <= len(mixture) <= 3 and sum(mixture.values()) == pytest.approx(1.0, abs=1e-5)
        assert max(mixture, key=mixture.get) == tiny["topic"][row[schema.ITEM_ID]]
        authors_follow += int(row[world_lib.AUTHOR_ID][1:]) % k == tiny["topic"][row[schema.ITEM_ID]]
        categories_follow += int(row[world_lib.CATEGORY_ID][1:]) % k == tiny["topic"][row[schema.ITEM_ID]]
    assert authors_follow > 0.8 * TINY.num_items and categories_follow > 0.8 * TINY.num_items
    dominant = np.array([max(m.values()) for m in tiny["mixture"].values()])
    assert 0.7 < dominant.mean() < 0.95  # sparse mixtures, mostly one topic


def test_image_channel_is_misaligned_with_text(tiny):
    """Text-bag vector (title words -> topic axes) vs image: ~image_scale x the norm, rotated, offset."""
    truth = tiny["truth"]
    word_topic = {w: t for t, ws in enumerate(truth["topics"]["words"]) for w in ws}
    topic_embedding = np.array(truth["image"]["topic_embedding"])
    rotation, offset = np.array(truth["image"]["rotation"]), np.array(truth["image"]["offset"])
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(TINY.image_dim), atol=1e-8)
    text, image = [], []
    for row in tiny["items"]:
        tokens = schema.tokenize(row[schema.TITLE])
        bag = np.bincount([word_topic[t] for t in tokens if t in word_topic], minlength=TINY.num_topics)
        text.append(bag / len(tokens) @ topic_embedding)
        image.append(row[schema.IMAGE_EMBEDDING])
    text, image = np.array(text), np.array(image)

    def cosine(a, b):
        return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    norm_ratio = np.linalg.norm(image, axis=1).mean() / np.linalg.norm(text, axis=1).mean()
    raw = cosine(image, text).mean()
    aligned = cosine((image - offset) @ rotation / truth["image"]["scale"], text).mean()
    assert norm_ratio > 3.0
    assert abs(raw) < 0.3
    assert aligned > 0.6 and aligned - raw > 0.4
    # the image still carries the topic: same-topic items are closer than different-topic ones
    topics = np.array([tiny["topic"][r[schema.ITEM_ID]] for r in tiny["items"]])
    centred = image - image.mean(axis=0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    sims = unit @ unit.T
    same = topics[:, None] == topics[None, :]
    assert sims[same].mean() - sims[~same].mean() > 0.5


def test_label_depends_on_long_term_and_short_term_interest(tiny):
    truth = tiny["truth"]["impressions"]
    labels = np.array([r[schema.LABEL] for r in tiny["impressions"]])
    assert [r[schema.ITEM_ID] for r in tiny["impressions"]] == truth["item_id"]
    assert labels.tolist() == truth["label"]
    long_match = np.array([tiny["topic"][r[schema.ITEM_ID]] in tiny["long_term"][r[schema.USER_ID]]
                           for r in tiny["impressions"]])
    short_match = np.array([tiny["topic"][r[schema.ITEM_ID]] in topics
                            for r, topics in zip(tiny["impressions"], truth["short_term_topics"])])
    neither = ~long_match & ~short_match
    assert long_match.sum() > 50 and neither.sum() > 50
    assert labels[long_match].mean() - labels[~long_match].mean() > 0.15
    assert labels[long_match].mean() - labels[neither].mean() > 0.25
    assert labels[short_match].mean() - labels[neither].mean() > 0.15
    assert 0.15 < labels.mean() < 0.45
    # labels follow the recorded click probabilities
    assert auc(truth["probability"], labels) > 0.7


def test_the_whole_lifelong_history_predicts_labels_better_than_the_recent_part(tiny):
    """A topic-affinity score from every earlier click beats the same score from the newest half."""
    k = TINY.num_topics
    scores = {"lifelong": [], "recent": []}
    for row in tiny["impressions"]:
        history = [tiny["topic"][c[schema.ITEM_ID]] for c in tiny["clicks_by_user"][row[schema.USER_ID]]
                   if c[schema.TIMESTAMP] < row[schema.TIMESTAMP]]
        mixture = tiny["mixture"][row[schema.ITEM_ID]]
        for name, part in (("lifelong", history), ("recent", history[len(history) // 2:])):
            seen = np.bincount(part, minlength=k) > 0
            scores[name].append(sum(w for t, w in mixture.items() if seen[t]))
    labels = [r[schema.LABEL] for r in tiny["impressions"]]
    assert auc(scores["lifelong"], labels) - auc(scores["recent"], labels) > 0.05


def test_timestamps_increase_per_user_users_interleave_and_impressions_come_last(tiny):
    events = tiny["events"]
    timestamps = [r[schema.TIMESTAMP] for r in events]
    assert timestamps == sorted(timestamps)  # the log is in time order
    by_user = collections.defaultdict(list)
    for row in events:
        by_user[row[schema.USER_ID]].append(row)
    for user, rows in by_user.items():
        ts = [r[schema.TIMESTAMP] for r in rows]
        assert all(a < b for a, b in zip(ts, ts[1:])), user
        clicks = [r for r in rows if r[schema.EVENT] == world_lib.CLICK_EVENT]
        first_impression = min(r[schema.TIMESTAMP] for r in rows if r[schema.EVENT] == world_lib.IMPRESSION_EVENT)
        clicks_after = sum(r[schema.TIMESTAMP] > first_impression for r in clicks)
        assert clicks_after <= math.ceil(TINY.impression_window * len(clicks)), user
    switches = sum(a[schema.USER_ID] != b[schema.USER_ID] for a, b in zip(events, events[1:]))
    assert switches > len(events) / 4  # users interleave, the file is not grouped by user


def test_history_lengths_are_heavy_tailed_and_clipped(tmp_path):
    config = dataclasses.replace(TINY, num_users=300, impressions_per_user=1, mean_history=40,
                                 max_history_events=200, min_history_events=5)
    generate_world(config, str(tmp_path))
    lengths = np.array(load_truth(str(tmp_path))["users"]["history_length"])
    assert lengths.min() >= 5 and lengths.max() == 200
    assert np.percentile(lengths, 99) > 4 * np.median(lengths)
    assert abs(lengths.mean() - 40) < 10


def test_split_column_follows_each_users_timeline(tmp_path):
    summary = generate_world(dataclasses.replace(TINY, with_split=True, num_users=10), str(tmp_path))
    names, rows = read_table(str(tmp_path), "events", "jsonl")
    assert names == list(world_lib.EVENT_COLUMNS) + [schema.SPLIT]
    order = {name: i for i, name in enumerate(schema.SPLITS)}
    by_user = collections.defaultdict(list)
    for row in rows:
        by_user[row[schema.USER_ID]].append(row)
    for user, user_rows in by_user.items():
        codes = [order[r[schema.SPLIT]] for r in user_rows]
        assert codes == sorted(codes), user  # train, then valid, then test along the timeline
        impressions = collections.Counter(r[schema.SPLIT] for r in user_rows
                                          if r[schema.EVENT] == world_lib.IMPRESSION_EVENT)
        assert impressions == {"train": 16, "valid": 2, "test": 2}, user
    assert summary["num_events"] == len(rows)


def test_invalid_configs_are_refused(tmp_path):
    for bad in (dict(format="xml"), dict(num_topics=3), dict(search_fraction=1.5),
                dict(min_history_events=50, max_history_events=10),
                dict(impression_long_term_share=0.7, impression_short_term_share=0.5),
                dict(image_missing_fraction=1.0)):
        with pytest.raises(ValueError, match="invalid WorldConfig"):
            generate_world(dataclasses.replace(TINY, **bad), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_image_missing_fraction_drops_only_those_items_images(tmp_path, tiny):
    """A catalog with missing images: that share of items is written without an image embedding (null in JSONL,
    an empty cell in CSV); every other byte of the world is the default world's."""
    config = dataclasses.replace(TINY, image_missing_fraction=0.25)
    out_dir = str(tmp_path / "jsonl")
    generate_world(config, out_dir)
    _, items = read_table(out_dir, "items", "jsonl")
    missing = {row[schema.ITEM_ID] for row in items if row[schema.IMAGE_EMBEDDING] is None}
    assert len(missing) == round(0.25 * TINY.num_items)
    assert missing == set(load_truth(out_dir)["image"]["missing_item_ids"])
    for row, full in zip(items, tiny["items"]):
        assert row == (dict(full, **{schema.IMAGE_EMBEDDING: None}) if row[schema.ITEM_ID] in missing else full)
    assert filecmp.cmp(os.path.join(out_dir, "events.jsonl"), os.path.join(tiny["out_dir"], "events.jsonl"),
                       shallow=False)
    assert load_truth(tiny["out_dir"])["image"]["missing_item_ids"] == []
    csv_dir = str(tmp_path / "csv")
    generate_world(dataclasses.replace(config, format="csv"), csv_dir)
    with open(os.path.join(csv_dir, "items.csv"), newline="", encoding="utf-8") as f:
        cells = {row[schema.ITEM_ID]: row[schema.IMAGE_EMBEDDING] for row in csv.DictReader(f)}
    assert {item for item, cell in cells.items() if cell == ""} == missing


@pytest.mark.slow
def test_default_world_rates_and_sizes(tmp_path):
    summary = generate_world(WorldConfig(), str(tmp_path))
    assert 0.2 <= summary["positive_rate"] <= 0.4
    assert summary["history_length_max"] == WorldConfig().max_history_events
    assert abs(summary["history_length_mean"] - 300) < 30
    assert summary["num_impressions"] == 20000
    assert summary["num_history_only_items_clicked"] > 0.9 * summary["num_history_only_items"]
