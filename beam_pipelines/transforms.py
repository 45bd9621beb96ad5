"""Row validation, vocabularies, per-user sample building and proto encoding for ``build_dataset``.

Plain functions hold the logic (so tests can check them without Beam); the DoFns and PTransforms below them
only wire those functions to PCollections. Nothing here reads a config object or module state: every
parameter arrives through a constructor.

Protos are serialized by a small wire-format encoder (``int64_feature``, ``example_bytes``,
``sequence_example_bytes``) instead of ``tf.train`` messages, so Dataflow workers never import TensorFlow.
A user's history is written once, as a timeline record; each sample is a small record holding a cut-off into
it, so the output grows with events + samples, not samples x history length. Tests check the bytes against
``tf.train`` protos.
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import math
import random
import re
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from seminar_tf import schema

from beam_pipelines import raw_io

logger = logging.getLogger(__name__)

HISTORY_ROLE = 1  # the event enters histories (and pretrain targets)
SAMPLE_ROLE = 2  # the event is a labelled CTR sample
COUNTER_TAG = "counters"
TIMELINE_TAG = "timelines"  # BuildUserSamples' output of one timeline record per user

# Compact event tuple after indexing; tuples sort by time first, then by ids, so ties are deterministic.
# FEEDBACK (the feedback-vocabulary index of ``schema.feedback_token``) is optional: 6-tuples have none.
TS, ITEM, QUERY, ROLES, LABEL, SPLIT_INDEX, FEEDBACK = range(7)


# ----------------------------------------------------------------------------------------------------------
# Values
def canonical_string(value) -> Optional[str]:
    """The one string form of an id / attribute value, equal across JSONL, CSV and Parquet inputs.

    ``42``, ``42.0`` and ``"42"`` all give ``"42"``; booleans give ``"true"``/``"false"``; whitespace runs
    collapse to one space; None/empty give None. Lists and dicts raise TypeError.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return " ".join(value.split()) or None
    raise TypeError(f"expected a scalar, got {type(value).__name__}")


def normalize_query(value) -> str:
    """Query text as it enters the query vocabulary: strip, collapse whitespace, lower-case; "" = browse.

    Lower-cased because the tokenizer (``schema.tokenize``) lower-cases anyway, so "Red Shoes" and
    "red shoes" are one query with one set of tokens. Serving must apply the same normalization.
    """
    text = canonical_string(value)
    return schema.normalize_query(text) if text else ""


def attribute_name(column: str) -> str:
    """Attribute name of a raw column, safe in file names and feature names (``[A-Za-z0-9_]``)."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", column).strip("_")
    return name or "column"


def parse_label(value) -> Optional[float]:
    """1.0 / 0.0 from 1, 0, 1.0, "1", "0", true, false; None for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value) if value in (0, 1) else None
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true"):
        return 1.0
    if text in ("0", "0.0", "false"):
        return 0.0
    return None


def parse_rating(value) -> Optional[float]:
    """A finite float rating; None when the column is absent or empty. Raises ValueError otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"rating must be a number, got {value!r}")
    rating = float(value)
    if not math.isfinite(rating):
        raise ValueError(f"rating must be finite, got {value!r}")
    return rating


def parse_event_timestamp(value) -> int:
    """``schema.parse_timestamp`` plus ``datetime`` values (Parquet timestamp columns; naive = UTC)."""
    import datetime as dt

    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp())
    return schema.parse_timestamp(value)


def _id_value(row: dict, column: str):
    """(canonical id, None) or (None, dead-letter reason)."""
    value = row.get(column)
    if value is None:
        return None, raw_io.missing_field(column)
    try:
        text = canonical_string(value)
    except (TypeError, UnicodeDecodeError):
        return None, raw_io.bad_field(column)
    if text is None:
        return None, raw_io.missing_field(column)
    if text in schema.QUERY_RESERVED:
        return None, raw_io.bad_field(column)
    return text, None


def _attributes(row: dict, content_columns: Sequence[str]) -> Dict[str, Optional[str]]:
    attrs = {}
    for column in sorted(row):
        if column in content_columns:
            continue
        value = row[column]
        try:
            text = canonical_string(value)
        except TypeError:
            text = canonical_string(json.dumps(value, sort_keys=True, default=str))
        attrs[attribute_name(column)] = text
    return attrs


# ----------------------------------------------------------------------------------------------------------
# Row validation: each returns (record, None) or (None, dead letter)
def validate_item_row(row: dict) -> Tuple[Optional[dict], Optional[dict]]:
    """items row -> ``{"item_id", "title", "title_tokens", "embedding", "has_image", "attrs", "row"}``.

    ``title_tokens`` are the first ``MAX_TITLE_TOKENS`` tokens (``schema.tokenize``); ``embedding`` is None
    when the row has none; ``attrs`` maps ``attribute_name(column)`` to a canonical string or None.
    """
    item_id, reason = _id_value(row, schema.ITEM_ID)
    if reason:
        return None, raw_io.dead_letter("items", reason, row, f"{schema.ITEM_ID}={row.get(schema.ITEM_ID)!r}")
    embedding = None
    if row.get(schema.IMAGE_EMBEDDING) is not None:
        try:
            embedding = schema.parse_float_list(row[schema.IMAGE_EMBEDDING])
        except (TypeError, ValueError) as err:
            return None, raw_io.dead_letter("items", raw_io.BAD_EMBEDDING, row, f"image_embedding: {err}")
        if not all(math.isfinite(v) for v in embedding):
            return None, raw_io.dead_letter("items", raw_io.BAD_EMBEDDING, row, "image_embedding is not finite")
        embedding = embedding or None
    try:
        title = canonical_string(row.get(schema.TITLE)) or ""
    except TypeError:
        return None, raw_io.dead_letter("items", raw_io.bad_field(schema.TITLE), row, "title is not text")
    record = {
        "item_id": item_id,
        "title": title,
        "title_tokens": schema.tokenize(title)[: schema.MAX_TITLE_TOKENS],
        "embedding": embedding,
        "has_image": row.get(schema.IMAGE) is not None,
        "attrs": _attributes(row, schema.ITEM_CONTENT_COLUMNS),
        "row": row,
    }
    return record, None


def validate_user_row(row: dict) -> Tuple[Optional[dict], Optional[dict]]:
    """users row -> ``{"user_id", "attrs", "row"}``."""
    user_id, reason = _id_value(row, schema.USER_ID)
    if reason:
        return None, raw_io.dead_letter("users", reason, row, f"{schema.USER_ID}={row.get(schema.USER_ID)!r}")
    return {"user_id": user_id, "attrs": _attributes(row, (schema.USER_ID,)), "row": row}, None


def validate_event_row(
    row: dict, history_events: Sequence[str], sample_events: Sequence[str]
) -> Tuple[Optional[dict], Optional[dict]]:
    """events row -> ``{"user_id", "timestamp", "item_id", "query", "event", "roles", "label", "split",
    "feedback", "row"}``.

    Checks, in order: required fields, timestamp, event type (history and/or sample type), label (sample
    events: 0/1), rating (a number when given), split (train/valid/test when given). ``query`` is
    ``normalize_query``'d, "" = browse. ``feedback`` is the step's ``schema.feedback_token``: the event type
    with its rating bucket, or its 0/1 label (a history-only event's label is used when it parses).
    """
    ids = {}
    for column in schema.EVENT_REQUIRED_COLUMNS:
        if column == schema.TIMESTAMP:
            if row.get(column) is None:
                return None, raw_io.dead_letter("events", raw_io.missing_field(column), row, "timestamp is missing")
            continue
        ids[column], reason = _id_value(row, column)
        if reason:
            return None, raw_io.dead_letter("events", reason, row, f"{column}={row.get(column)!r}")
    try:
        timestamp = parse_event_timestamp(row[schema.TIMESTAMP])
    except (TypeError, ValueError, OverflowError) as err:
        return None, raw_io.dead_letter("events", raw_io.BAD_TIMESTAMP, row, str(err))
    try:
        event = (canonical_string(row.get(schema.EVENT)) or "click").lower()
    except TypeError:
        return None, raw_io.dead_letter("events", raw_io.bad_field(schema.EVENT), row, "event is not a string")
    roles = (HISTORY_ROLE if event in history_events else 0) | (SAMPLE_ROLE if event in sample_events else 0)
    if not roles:
        detail = (
            f"event {event!r} is neither a history type {tuple(history_events)} "
            f"nor a sample type {tuple(sample_events)}"
        )
        return None, raw_io.dead_letter("events", raw_io.UNUSED_EVENT_TYPE, row, detail)
    label = parse_label(row.get(schema.LABEL))
    if roles & SAMPLE_ROLE and label is None:
        detail = f"label={row.get(schema.LABEL)!r} is not 0/1"
        return None, raw_io.dead_letter("events", raw_io.BAD_LABEL, row, detail)
    try:
        rating = parse_rating(row.get(schema.RATING))
    except (TypeError, ValueError, OverflowError) as err:
        detail = f"rating={row.get(schema.RATING)!r}: {err}; send a number or leave it empty"
        return None, raw_io.dead_letter("events", raw_io.bad_field(schema.RATING), row, detail)
    split = row.get(schema.SPLIT)
    if split is not None:
        split = str(split).strip().lower()
        if split not in schema.SPLITS:
            detail = f"split={row.get(schema.SPLIT)!r} not in {schema.SPLITS}"
            return None, raw_io.dead_letter("events", raw_io.BAD_SPLIT, row, detail)
    try:
        query = normalize_query(row.get(schema.QUERY))
    except TypeError:
        return None, raw_io.dead_letter("events", raw_io.bad_field(schema.QUERY), row, "query is not text")
    record = {
        "user_id": ids[schema.USER_ID],
        "timestamp": timestamp,
        "item_id": ids[schema.ITEM_ID],
        "query": query,
        "event": event,
        "roles": roles,
        "label": label if roles & SAMPLE_ROLE else None,
        "split": split,
        "feedback": schema.feedback_token(event, label, rating),
        "row": row,
    }
    return record, None


class ValidateRows(beam.DoFn):
    """Cleaned row dicts -> validated records (main output) and dead letters (``dead_letter`` output)."""

    def __init__(self, table: str, history_events: Sequence[str] = (), sample_events: Sequence[str] = ()):
        self._table = table
        self._history_events = tuple(history_events)
        self._sample_events = tuple(sample_events)

    def start_bundle(self):
        self._ok = self._dead = 0

    def finish_bundle(self):
        if self._ok or self._dead:
            logger.info("%s: %d rows valid, %d dead-lettered in this bundle", self._table, self._ok, self._dead)

    def process(self, row):
        if self._table == "items":
            record, letter = validate_item_row(row)
        elif self._table == "users":
            record, letter = validate_user_row(row)
        else:
            record, letter = validate_event_row(row, self._history_events, self._sample_events)
        if letter is not None:
            self._dead += 1
            yield beam.pvalue.TaggedOutput(raw_io.DEAD_LETTER_TAG, letter)
        else:
            self._ok += 1
            yield record


def image_dim_from_lengths(length_counts: Sequence[Tuple[int, int]], configured: int) -> int:
    """The dataset's image_dim: ``configured`` if > 0, else the most common embedding length; 0 without any."""
    if not any(length for length, _ in length_counts):
        return 0
    return configured or most_common_length(length_counts)


def most_common_length(length_counts: Iterable[Tuple[int, int]]) -> int:
    """The embedding dimension: most frequent length, ties to the smaller one; 0 when there is none."""
    best = sorted(((-count, length) for length, count in length_counts if length > 0))
    return best[0][1] if best else 0


def check_embedding_dim(record: dict, image_dim: int):
    """Yields the record, or a ``bad_embedding_dim`` dead letter (no embedding is fine: the item table zero-fills)."""
    embedding = record["embedding"]
    if embedding is not None and len(embedding) != image_dim:
        detail = f"image_embedding has {len(embedding)} values, the dataset's dimension is {image_dim}"
        yield beam.pvalue.TaggedOutput(
            raw_io.DEAD_LETTER_TAG, raw_io.dead_letter("items", raw_io.BAD_EMBEDDING_DIM, record["row"], detail)
        )
    else:
        yield record


def keep_first_row(table: str, key_field: str, reason: str):
    """(key, records) -> the record with the smallest canonical row, others as ``reason`` dead letters.

    Rows of one key arrive in no defined order, so "first" is the deterministic choice, not file order.
    """

    def split_duplicates(element):
        key, records = element
        records = list(records)
        if len(records) == 1:
            yield records[0]
            return
        records.sort(key=lambda r: raw_io.dead_letter_json({"row": r["row"]}))
        yield records[0]
        for record in records[1:]:
            detail = f"{key_field} {key!r} already has a row; kept one, dropped this one"
            letter = raw_io.dead_letter(table, reason, record["row"], detail)
            yield beam.pvalue.TaggedOutput(raw_io.DEAD_LETTER_TAG, letter)

    return split_duplicates


# ----------------------------------------------------------------------------------------------------------
# Vocabularies: line number = index; reserved entries first, then count desc, ties by string.
def sorted_vocabulary(
    counts: Iterable[Tuple[str, int]], reserved: Sequence[str], min_count: int
) -> Tuple[List[str], List[int]]:
    """(entries, counts): ``reserved`` first (count 0), then entries with count >= min_count."""
    kept = sorted(((-c, e) for e, c in counts if c >= min_count and e not in reserved))
    return list(reserved) + [e for _, e in kept], [0] * len(reserved) + [-c for c, _ in kept]


def vocabulary_index(vocab: Tuple[List[str], List[int]]) -> Dict[str, int]:
    return {entry: index for index, entry in enumerate(vocab[0])}


def lookup(index: Dict[str, int], value: Optional[str]) -> int:
    return schema.OOV_INDEX if value is None else index.get(value, schema.OOV_INDEX)


class BuildVocabulary(beam.PTransform):
    """PCollection[(entry, count)] (entries may repeat) -> one element ``(entries, counts)``.

    Example:
        ``p | beam.Create([("b", 1), ("a", 1), ("b", 1)]) | BuildVocabulary(schema.RESERVED, 1)``
        gives ``(["<PAD>", "<OOV>", "b", "a"], [0, 0, 2, 1])``.
    """

    def __init__(self, reserved: Sequence[str], min_count: int):
        super().__init__()
        self._reserved = tuple(reserved)
        self._min_count = min_count

    def expand(self, pairs):
        reserved, min_count = self._reserved, self._min_count
        return (
            pairs
            | "Sum" >> beam.CombinePerKey(sum)
            | "Gather" >> beam.combiners.ToList()
            | "Sort" >> beam.Map(lambda counts: sorted_vocabulary(counts, reserved, min_count))
        )


class BuildAttributeVocabularies(beam.PTransform):
    """PCollection[((name, value), count)] + names -> one element ``{name: (entries, counts)}``.

    ``names`` is a singleton PCollection listing every attribute, so an attribute without any value still
    gets its (reserved-only) vocabulary.
    """

    def __init__(self, names, min_count: int):
        super().__init__()
        self._names = names
        self._min_count = min_count

    def expand(self, pairs):
        min_count = self._min_count

        def per_attribute(counts, names):
            grouped = {name: [] for name in names}
            for (name, value), count in counts:
                grouped.setdefault(name, []).append((value, count))
            return {name: sorted_vocabulary(c, schema.RESERVED, min_count) for name, c in sorted(grouped.items())}

        return (
            pairs
            | "Sum" >> beam.CombinePerKey(sum)
            | "Gather" >> beam.combiners.ToList()
            | "Split" >> beam.Map(per_attribute, beam.pvalue.AsSingleton(self._names))
        )


# ----------------------------------------------------------------------------------------------------------
# Splits
def time_split_cutoffs(
    timestamp_counts: Iterable[Tuple[int, int]], valid_fraction: float, test_fraction: float
) -> Tuple[Optional[int], Optional[int]]:
    """Global time cutoffs (valid_from, test_from): the newest ``test_fraction`` of events is test, the
    ``valid_fraction`` before it valid, the rest train. Events at a cutoff's second all fall on the later
    side. None = no cutoff (empty split)."""
    ordered = sorted(timestamp_counts)
    total = sum(count for _, count in ordered)
    if not total:
        return None, None

    def timestamp_at(position):  # the timestamp of the position-th event in time order
        seen = 0
        for timestamp, count in ordered:
            seen += count
            if seen > position:
                return timestamp
        return ordered[-1][0]

    num_test = int(math.floor(total * test_fraction + 0.5))
    num_valid = int(math.floor(total * valid_fraction + 0.5))
    test_from = timestamp_at(total - num_test) if num_test else None
    valid_from = timestamp_at(max(total - num_test - num_valid, 0)) if num_valid else test_from
    return valid_from, test_from


def time_split(timestamp: int, valid_from: Optional[int], test_from: Optional[int]) -> str:
    if test_from is not None and timestamp >= test_from:
        return "test"
    if valid_from is not None and timestamp >= valid_from:
        return "valid"
    return "train"


class AssignSplitAndItem(beam.DoFn):
    """Event record -> record with ``split`` and ``item_index``; ``missing_field:split`` (explicit-split
    datasets) and ``unknown_item`` dead letters."""

    def start_bundle(self):
        self._counts = collections.Counter()

    def finish_bundle(self):
        if self._counts:
            logger.info("events: split and item index assigned: %s in this bundle", dict(self._counts))

    def process(self, record, split_info, item_index):
        if split_info["mode"] == "column":
            split = record["split"]
            if split is None:
                self._counts["missing_split"] += 1
                detail = "the events carry a split column but this row has no split"
                reason = raw_io.missing_field(schema.SPLIT)
                yield beam.pvalue.TaggedOutput(
                    raw_io.DEAD_LETTER_TAG, raw_io.dead_letter("events", reason, record["row"], detail)
                )
                return
        else:
            split = time_split(record["timestamp"], split_info["valid_from"], split_info["test_from"])
        index = item_index.get(record["item_id"])
        if index is None:
            self._counts["unknown_item"] += 1
            detail = f"item_id {record['item_id']!r} is not in the item vocabulary"
            yield beam.pvalue.TaggedOutput(
                raw_io.DEAD_LETTER_TAG, raw_io.dead_letter("events", raw_io.UNKNOWN_ITEM, record["row"], detail)
            )
            return
        self._counts[split] += 1
        yield dict(record, split=split, item_index=index)


def item_counter_keys(record: dict) -> List[tuple]:
    keys = [("rows_ok", "items")]
    if record["has_image"]:
        keys.append(("items_with_image",))
    if record["embedding"] is not None:
        keys.append(("items_with_image_embedding",))
    return keys


def vocabulary_item_counter_keys(indexed_record: Tuple[int, dict]) -> List[tuple]:
    keys = [("items_in_vocabulary",)]
    if indexed_record[1]["title_tokens"]:
        keys.append(("items_with_title",))
    return keys


def event_counter_keys(record: dict) -> List[tuple]:
    keys = [("rows_ok", "events"), ("events_with_query",) if record["query"] else ("events_browse",)]
    if record["roles"] & HISTORY_ROLE:
        keys.append(("events_history",))
    if record["roles"] & SAMPLE_ROLE:
        keys.append(("events_sample",))
    return keys


def attribute_value_pairs(record: dict) -> List[Tuple[Tuple[str, str], int]]:
    """``((attribute, value), 1)`` per present attribute of an item/user record (attribute vocab input)."""
    return [((name, value), 1) for name, value in record["attrs"].items() if value is not None]


def attribute_indexes(vocabs: Dict[str, tuple]) -> Dict[str, Dict[str, int]]:
    return {name: vocabulary_index(vocab) for name, vocab in vocabs.items()}


class CountKeys(beam.DoFn):
    """Counts the keys ``keys(element)`` returns; emits ``(key, count)`` once per bundle, so counting a
    million events adds a handful of elements, not a million."""

    def __init__(self, keys):
        self._keys = keys

    def start_bundle(self):
        self._counts = collections.Counter()

    def process(self, element):
        self._counts.update(self._keys(element))
        return ()

    def finish_bundle(self):
        for key, count in self._counts.items():
            yield GlobalWindows.windowed_value((key, count))


def compact_event(
    record: dict, query_index: Dict[str, int], feedback_index: Optional[Dict[str, int]] = None
) -> Tuple[str, tuple]:
    """Indexed event record -> ``(user_id, (timestamp, item, query, roles, label, split_index, feedback))``
    (``feedback`` only with a ``feedback_index``)."""
    query = record["query"]
    query_idx = lookup(query_index, query) if query else schema.EMPTY_QUERY_INDEX
    label = record["label"] if record["label"] is not None else 0.0
    split_index = schema.SPLITS.index(record["split"])
    event = (record["timestamp"], record["item_index"], query_idx, record["roles"], label, split_index)
    if feedback_index is not None:
        event += (lookup(feedback_index, record["feedback"]),)
    return record["user_id"], event


# ----------------------------------------------------------------------------------------------------------
# Per-user samples (docs/design.md §3)
Sample = collections.namedtuple(
    "Sample",
    "kind split timestamp target_item target_query label history_start history_end negative_items negative_queries",
)
Sample.__doc__ = """One example: target event, label, and the history as ``history[history_start:history_end]``
of the user's time-sorted history events (all strictly before ``timestamp``, newest ``max_history``)."""


def evenly_spaced(count: int, wanted: int) -> List[int]:
    """``wanted`` positions out of ``range(count)``, evenly spaced and ending at the last one; all if
    ``wanted`` is 0 or >= count."""
    if wanted <= 0 or wanted >= count:
        return list(range(count))
    return [((k + 1) * count) // wanted - 1 for k in range(wanted)]


class NegativeSampler:
    """Draws negative (query, item) pairs: items by event frequency excluding the positive item, queries by
    event frequency (the empty browse query included), seeded per sample so reruns give the same bytes.

    item_counts / query_counts: per vocabulary index (reserved entries 0; query index 2 = browse count).
    """

    def __init__(self, item_counts: Sequence[int], query_counts: Sequence[int], num_negatives: int, seed: int):
        self.num_negatives = num_negatives
        self._seed = seed
        self._num_items = len(item_counts)
        self._item_cum = list(_cumulative(item_counts))
        self._query_cum = list(_cumulative(query_counts))

    def sample(self, key: str, positive_item: int) -> Tuple[List[int], List[int]]:
        rng = random.Random(f"{self._seed}|{key}")
        items = [self._item(rng, positive_item) for _ in range(self.num_negatives)]
        queries = [self._draw(rng, self._query_cum, schema.EMPTY_QUERY_INDEX) for _ in range(self.num_negatives)]
        return items, queries

    def _item(self, rng, positive):
        for _ in range(16):
            item = self._draw(rng, self._item_cum, None)
            if item is None:
                break
            if item != positive:
                return item
        first, last = len(schema.RESERVED), self._num_items - 1  # uniform over the others
        others = last - first + (0 if first <= positive <= last else 1)
        if others <= 0:
            return schema.OOV_INDEX
        item = rng.randint(first, first + others - 1)
        return item + 1 if first <= positive <= item else item

    @staticmethod
    def _draw(rng, cumulative, default):
        if not cumulative or cumulative[-1] <= 0:
            return default
        return bisect.bisect_right(cumulative, rng.random() * cumulative[-1])


def _cumulative(counts):
    total = 0
    for count in counts:
        total += count
        yield total


def plan_user_samples(
    events: Iterable[tuple],
    *,
    max_history: int,
    min_history: int,
    pretrain_samples_per_user: int,
    sampler: Optional[NegativeSampler],
    user_key: str = "",
):
    """A user's events -> (history events, samples, too_short counter keyed by (kind, split)).

    events: compact tuples ``(timestamp, item, query, roles, label, split_index)``. History = the user's
    history-role events sorted by time; a sample at time t takes exactly those with timestamp < t (``bisect``
    on timestamps), newest ``max_history``. CTR: one sample per sample-role event. Pretrain: per split,
    ``pretrain_samples_per_user`` evenly spaced history events of that split as targets (label 1) with
    ``sampler`` negatives. Cost: O(#events log #events + #samples).
    """
    ordered = sorted(events)
    history = [e for e in ordered if e[ROLES] & HISTORY_ROLE]
    history_ts = [e[TS] for e in history]
    samples: List[Sample] = []
    too_short: collections.Counter = collections.Counter()

    def add(kind, event, negatives):
        end = bisect.bisect_left(history_ts, event[TS])
        split = schema.SPLITS[event[SPLIT_INDEX]]
        if end < min_history:
            too_short[(kind, split)] += 1
            return
        start = max(0, end - max_history)
        label = 1.0 if kind == schema.PRETRAIN_DIR else event[LABEL]
        samples.append(Sample(kind, split, event[TS], event[ITEM], event[QUERY], label, start, end, *negatives))

    for event in ordered:
        if event[ROLES] & SAMPLE_ROLE:
            add(schema.CTR_DIR, event, ((), ()))
    if sampler is not None:
        for split_index in range(len(schema.SPLITS)):
            candidates = [i for i, e in enumerate(history) if e[SPLIT_INDEX] == split_index]
            for k in evenly_spaced(len(candidates), pretrain_samples_per_user):
                position = candidates[k]
                event = history[position]
                negatives = sampler.sample(f"{user_key}|{position}", event[ITEM])
                add(schema.PRETRAIN_DIR, event, negatives)
    return history, samples, too_short


# ----------------------------------------------------------------------------------------------------------
# Protobuf wire format for tf.train.Example / SequenceExample (example.proto, feature.proto)
_ONE_BYTE = [bytes((v,)) for v in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    if value < 0:
        value += 1 << 64  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag byte(s), varint length, payload."""
    return tag + _varint(len(payload)) + payload


def int64_feature(values: Iterable[int]) -> bytes:
    """Serialized ``tf.train.Feature(int64_list=Int64List(value=values))``."""
    packed = b"".join(_varint(int(v)) for v in values)
    return _field(b"\x1a", _field(b"\x0a", packed) if packed else b"")


def float_feature(values: Sequence[float]) -> bytes:
    """Serialized ``tf.train.Feature(float_list=FloatList(value=values))``."""
    values = list(values)
    packed = struct.pack(f"<{len(values)}f", *values)
    return _field(b"\x12", _field(b"\x0a", packed) if values else b"")


def bytes_feature(values: Iterable[bytes]) -> bytes:
    """Serialized ``tf.train.Feature(bytes_list=BytesList(value=values))``."""
    return _field(b"\x0a", b"".join(_field(b"\x0a", v) for v in values))


def _feature_map(features: Dict[str, bytes]) -> bytes:
    """Serialized ``tf.train.Features`` from name -> serialized Feature (map entries sorted by name)."""
    return b"".join(
        _field(b"\x0a", _field(b"\x0a", name.encode("utf-8")) + _field(b"\x12", value))
        for name, value in sorted(features.items())
    )


def example_bytes(features: Dict[str, bytes]) -> bytes:
    """Serialized ``tf.train.Example`` from name -> serialized Feature."""
    return _field(b"\x0a", _feature_map(features))


def feature_list_step(feature: bytes) -> bytes:
    """One step of a ``tf.train.FeatureList``; a FeatureList's bytes are its steps joined."""
    return _field(b"\x0a", feature)


def sequence_example_bytes(context: Dict[str, bytes], feature_lists: Dict[str, bytes]) -> bytes:
    """Serialized ``tf.train.SequenceExample``; feature_lists maps name -> joined ``feature_list_step``s."""
    lists = b"".join(
        _field(b"\x0a", _field(b"\x0a", name.encode("utf-8")) + _field(b"\x12", steps))
        for name, steps in sorted(feature_lists.items())
    )
    return _field(b"\x0a", _feature_map(context)) + _field(b"\x12", lists)


def timeline_bytes(user_id: str, history: Sequence[tuple], user_attributes: Dict[str, int],
                   user_index: Optional[int] = None, with_feedback: bool = False) -> bytes:
    """Serialized timeline SequenceExample of one user (``schema.timeline_spec``): every history step, oldest first."""
    context = {schema.CTX_USER_ID: bytes_feature([user_id.encode("utf-8")])}
    for name, index in user_attributes.items():
        context[schema.user_attribute_feature(name)] = int64_feature([index])
    if user_index is not None:
        context[schema.CTX_USER_INDEX] = int64_feature([user_index])
    columns = {schema.SEQ_HISTORY_ITEM: ITEM, schema.SEQ_HISTORY_QUERY: QUERY, schema.SEQ_HISTORY_TIMESTAMP: TS}
    if with_feedback:
        columns[schema.SEQ_HISTORY_FEEDBACK] = FEEDBACK
    lists = {name: b"".join(feature_list_step(int64_feature([e[column]])) for e in history)
             for name, column in columns.items()}
    return sequence_example_bytes(context, lists)


def sample_bytes(user_id: str, sample: Sample) -> bytes:
    """Serialized sample Example (``schema.sample_spec(metadata, sample.kind)``); its history is the user's
    timeline cut at ``sample.history_end``."""
    features = {
        schema.CTX_USER_ID: bytes_feature([user_id.encode("utf-8")]),
        schema.CTX_TIMESTAMP: int64_feature([sample.timestamp]),
        schema.CTX_TARGET_ITEM: int64_feature([sample.target_item]),
        schema.CTX_TARGET_QUERY: int64_feature([sample.target_query]),
        schema.CTX_LABEL: float_feature([sample.label]),
        schema.CTX_HISTORY_END: int64_feature([sample.history_end]),
    }
    if sample.kind == schema.PRETRAIN_DIR:
        features[schema.CTX_NEGATIVE_ITEMS] = int64_feature(sample.negative_items)
        features[schema.CTX_NEGATIVE_QUERIES] = int64_feature(sample.negative_queries)
    return example_bytes(features)


def output_tag(kind: str, split: str) -> str:
    return f"{kind}_{split}"


class BuildUserSamples(beam.DoFn):
    """(user_id, {"events": [...], "users": [attrs], "user_index": [index]}) -> the user's timeline on the
    ``timelines`` output, sample Examples on ``output_tag(kind, split)`` outputs, and ``((counter, ...), n)`` on the
    ``counters`` output (samples and too_short_history per kind and split, timelines, timeline_steps).

    Side inputs: ``sampling`` = {"item_counts", "query_counts"} per vocabulary index, ``user_attribute_names``.
    Users without a users-table row get OOV for every user attribute.
    """

    def __init__(
        self, max_history: int, min_history: int, pretrain_samples_per_user: int, num_negatives: int, seed: int
    ):
        self._max_history = max_history
        self._min_history = min_history
        self._per_user = pretrain_samples_per_user
        self._num_negatives = num_negatives
        self._seed = seed

    def setup(self):
        self._sampler_source = None
        self._sampler = None

    def start_bundle(self):
        self._users = 0
        self._written = 0

    def process(self, element, sampling, user_attribute_names):
        user_id, grouped = element
        events = list(grouped["events"])
        if not events:
            return
        if self._sampler_source is not sampling:  # side inputs are re-delivered per bundle, built once
            self._sampler = NegativeSampler(
                sampling["item_counts"], sampling["query_counts"], self._num_negatives, self._seed
            )
            self._sampler_source = sampling
        user_rows = list(grouped["users"])
        known = user_rows[0] if user_rows else {}
        attributes = {name: known.get(name, schema.OOV_INDEX) for name in user_attribute_names}
        user_index = next(iter(grouped.get("user_index", ())), schema.OOV_INDEX)
        history, samples, too_short = plan_user_samples(
            events,
            max_history=self._max_history,
            min_history=self._min_history,
            pretrain_samples_per_user=self._per_user,
            sampler=self._sampler,
            user_key=user_id,
        )
        yield beam.pvalue.TaggedOutput(TIMELINE_TAG, timeline_bytes(
            user_id, history, attributes, user_index, with_feedback=len(events[0]) > FEEDBACK))
        yield beam.pvalue.TaggedOutput(COUNTER_TAG, (("timelines",), 1))
        yield beam.pvalue.TaggedOutput(COUNTER_TAG, (("timeline_steps",), len(history)))
        written = collections.Counter()
        for sample in samples:
            yield beam.pvalue.TaggedOutput(output_tag(sample.kind, sample.split), sample_bytes(user_id, sample))
            written[(sample.kind, sample.split)] += 1
        for (kind, split), count in written.items():
            yield beam.pvalue.TaggedOutput(COUNTER_TAG, (("samples", kind, split), count))
        for (kind, split), count in too_short.items():
            yield beam.pvalue.TaggedOutput(COUNTER_TAG, (("too_short_history", kind, split), count))
        self._users += 1
        self._written += len(samples)

    def finish_bundle(self):
        if self._users:
            logger.info("samples: %d users -> %d timelines, %d examples in this bundle", self._users, self._users,
                        self._written)


# ----------------------------------------------------------------------------------------------------------
# Item and query tables
def item_example(
    index: int,
    record: dict,
    token_index: Dict[str, int],
    attribute_indexes: Dict[str, Dict[str, int]],
    image_dim: int,
) -> bytes:
    """Serialized item-table ``tf.train.Example`` (``schema.item_table_spec``); a missing embedding is zeros."""
    features = {
        schema.ITEM_INDEX: int64_feature([index]),
        schema.ITEM_ID: bytes_feature([record["item_id"].encode("utf-8")]),
        schema.TITLE_TOKENS: int64_feature(lookup(token_index, t) for t in record["title_tokens"]),
    }
    if image_dim:
        features[schema.IMAGE_EMBEDDING] = float_feature(record["embedding"] or [0.0] * image_dim)
    for name, values in attribute_indexes.items():
        features[schema.item_attribute_feature(name)] = int64_feature([lookup(values, record["attrs"].get(name))])
    return example_bytes(features)


def query_tokens(query: str) -> List[str]:
    return schema.tokenize(query)[: schema.MAX_QUERY_TOKENS]


def query_example(index: int, query: str, token_index: Dict[str, int]) -> bytes:
    """Serialized query-table ``tf.train.Example`` (``schema.query_table_spec``)."""
    return example_bytes(
        {
            schema.QUERY_INDEX: int64_feature([index]),
            schema.QUERY_TEXT: bytes_feature([query.encode("utf-8")]),
            schema.QUERY_TOKENS: int64_feature(lookup(token_index, t) for t in query_tokens(query)),
        }
    )
