"""The one schema module: raw-format columns, dataset layout, vocabularies, example features and tf.io specs.

Imported by the Beam pipeline (which must stay light on Dataflow workers), the tf.data reader, the models
and the serving signatures, so names, dtypes and shapes cannot drift between them. Nothing here imports
TensorFlow at module level; the functions that return tf.io specs import it when called.

Index conventions, shared by every vocabulary (a vocabulary file lists one entry per line and the line
number is the index):
  0 = padding (``PAD_INDEX``), 1 = out-of-vocabulary (``OOV_INDEX``); the query vocabulary also reserves
  2 = the empty query of a browsing event (``EMPTY_QUERY_INDEX``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

# --------------------------------------------------------------------------------------------------------
# Reserved vocabulary entries
PAD_INDEX = 0
OOV_INDEX = 1
EMPTY_QUERY_INDEX = 2
PAD_TOKEN = "<PAD>"
OOV_TOKEN = "<OOV>"
EMPTY_QUERY_TOKEN = "<EMPTY>"
RESERVED = (PAD_TOKEN, OOV_TOKEN)
QUERY_RESERVED = (PAD_TOKEN, OOV_TOKEN, EMPTY_QUERY_TOKEN)

# --------------------------------------------------------------------------------------------------------
# Raw input format (docs/design.md §2). Tables are files named <table>.<ext> or <table>-*.<ext> in one directory.
RAW_TABLES = ("items", "events", "users")
RAW_FORMATS = ("jsonl", "csv", "parquet")

ITEM_ID = "item_id"
TITLE = "title"
IMAGE_EMBEDDING = "image_embedding"
IMAGE = "image"
ITEM_CONTENT_COLUMNS = (ITEM_ID, TITLE, IMAGE_EMBEDDING, IMAGE)  # every other items column is an attribute

USER_ID = "user_id"
TIMESTAMP = "timestamp"
QUERY = "query"
EVENT = "event"
LABEL = "label"
SPLIT = "split"
RATING = "rating"  # optional explicit feedback (e.g. MovieLens stars); enters the history feedback token
EVENT_REQUIRED_COLUMNS = (USER_ID, TIMESTAMP, ITEM_ID)
EVENT_COLUMNS = (USER_ID, TIMESTAMP, ITEM_ID, QUERY, EVENT, LABEL, SPLIT, RATING)

SPLITS = ("train", "valid", "test")
DEFAULT_HISTORY_EVENTS = ("click",)
DEFAULT_SAMPLE_EVENTS = ("impression",)

# --------------------------------------------------------------------------------------------------------
# Channels (docs/design.md §4): the query channel plus the item's modalities.
QUERY_CHANNEL = "query"
TEXT_CHANNEL = "text"
IMAGE_CHANNEL = "image"
ATTRIBUTES_CHANNEL = "attributes"
CHANNELS = (QUERY_CHANNEL, TEXT_CHANNEL, IMAGE_CHANNEL, ATTRIBUTES_CHANNEL)

# --------------------------------------------------------------------------------------------------------
# Dataset directory layout (docs/design.md §1)
VOCAB_DIR = "vocab"
ITEM_VOCAB = "items.txt"
QUERY_VOCAB = "queries.txt"
TOKEN_VOCAB = "tokens.txt"
USER_VOCAB = "users.txt"  # user ids with >= user_min_count train-split events; others map to OOV
FEEDBACK_VOCAB = "feedback.txt"  # history feedback tokens (``feedback_token``)
ITEM_TABLE_DIR = "item_table"
QUERY_TABLE_DIR = "query_table"
PRETRAIN_DIR = "pretrain"
CTR_DIR = "ctr"
EXAMPLE_KINDS = (PRETRAIN_DIR, CTR_DIR)
TIMELINE_DIR = "timelines"  # one record per user: the whole history, which the samples of both kinds cut
TIMELINES_LAYOUT = "timelines"  # DatasetMetadata.history_layout of datasets that store histories in TIMELINE_DIR
DEAD_LETTER_DIR = "dead_letter"
STATS_FILE = "stats.json"
METADATA_FILE = "metadata.json"
TFRECORD_SUFFIX = ".tfrecord.gz"  # GZIP-compressed TFRecord shards


def item_attribute_vocab(name: str) -> str:
    return f"item_attr_{name}.txt"


def user_attribute_vocab(name: str) -> str:
    return f"user_attr_{name}.txt"


def shard_pattern(dataset_dir: str, kind: str, split: str) -> str:
    """Glob of the TFRecord shards of one example kind (``pretrain``/``ctr``) and split."""
    return f"{dataset_dir.rstrip('/')}/{kind}/{split}-*{TFRECORD_SUFFIX}"


def timeline_pattern(dataset_dir: str) -> str:
    """Glob of the TFRecord shards of the per-user timelines."""
    return f"{dataset_dir.rstrip('/')}/{TIMELINE_DIR}/*{TFRECORD_SUFFIX}"


# --------------------------------------------------------------------------------------------------------
# Text: one tokenizer, in Python (Beam) and in the graph (serving). Lower-case, split on anything that is
# not a letter or digit. Tokens of titles and queries share one vocabulary.
MAX_TITLE_TOKENS = 16
MAX_QUERY_TOKENS = 8
_SPLIT_RE = re.compile(r"[\W_]+", re.UNICODE)
TF_SPLIT_REGEX = r"[^\p{L}\p{N}]+"
# Exactly the characters Python's str.split() treats as whitespace (str.isspace), in RE2 syntax.
TF_WHITESPACE_REGEX = r"[\t\n\x0b\f\r\x1c-\x1f\x{85}\p{Z}]+"


def tokenize(text: Optional[str]) -> List[str]:
    """Python tokenizer used by the pipeline; ``tf_tokenize`` is its in-graph twin."""
    if not text:
        return []
    return [t for t in _SPLIT_RE.split(text.lower()) if t]


def normalize_query(text) -> str:
    """Query text as it enters the query vocabulary: strip, collapse whitespace, lower-case; "" = browse."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return " ".join(str(text).split()).lower()


def tf_normalize_query(texts):
    """In-graph twin of ``normalize_query`` (core tf.strings ops): string tensor [...] → [...]."""
    import tensorflow as tf

    collapsed = tf.strings.strip(tf.strings.regex_replace(texts, TF_WHITESPACE_REGEX, " "))
    return tf.strings.lower(collapsed, encoding="utf-8")


def tf_tokenize(texts):
    """In-graph tokenizer (core ``tf.strings`` ops only, so TF Serving needs no custom op).

    texts: string tensor of any shape [...]; returns a RaggedTensor [..., None] of tokens.
    """
    import tensorflow as tf

    lowered = tf.strings.lower(texts, encoding="utf-8")
    spaced = tf.strings.regex_replace(lowered, TF_SPLIT_REGEX, " ")
    return tf.strings.split(tf.strings.strip(spaced))


# --------------------------------------------------------------------------------------------------------
# History feedback: what the user did with a history step's item, as one token of a small vocabulary.
def rating_bucket(rating: float) -> int:
    """Explicit ratings are bucketed by rounding half up (4.5 stars -> 5, 3.49 -> 3)."""
    import math

    return int(math.floor(float(rating) + 0.5))


def feedback_token(event: str, label=None, rating=None) -> str:
    """The feedback token of one history step: ``event`` alone (a plain click), ``event:<label>`` when the raw
    event carries a 0/1 label, ``event:r<bucket>`` when it carries a rating (the rating wins over the label).

    The pipeline writes one per history step (point-in-time correct: a step is in a history only after it
    happened, so its own feedback is known); serving clients send the same tokens in ``history_feedback``.

    >>> feedback_token("impression", 1.0, 4.5), feedback_token("impression", 0.0), feedback_token("click")
    ('impression:r5', 'impression:0', 'click')
    """
    if rating is not None:
        return f"{event}:r{rating_bucket(rating)}"
    if label is not None:
        return f"{event}:{int(label)}"
    return event


# --------------------------------------------------------------------------------------------------------
# Raw value parsing shared by the pipeline and the adapters.
def parse_timestamp(value) -> int:
    """Seconds since the epoch from an int/float, a digit string, or an ISO-8601 string (UTC if naive).

    Raises ValueError naming the problem; the pipeline turns that into a ``bad_timestamp`` dead letter.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"timestamp must be int seconds or ISO-8601, got {value!r}")
    if isinstance(value, _dt.datetime):  # e.g. Parquet timestamp columns
        return int((value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).timestamp())
    if isinstance(value, (int, float)):
        if value != value:  # NaN
            raise ValueError("timestamp is NaN")
        return int(value)
    text = str(value).strip()
    if not text:
        raise ValueError("timestamp is empty")
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return int(float(text))
    try:
        parsed = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise ValueError(f"timestamp {text!r} is neither int seconds nor ISO-8601") from err
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return int(parsed.timestamp())


def parse_float_list(value) -> List[float]:
    """A float list from a list, a JSON array string, or a space/comma separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [v for v in re.split(r"[\s,]+", text) if v]
    return [float(v) for v in value]


# --------------------------------------------------------------------------------------------------------
# Example features (docs/design.md §3). A user's history is stored once, as a timeline (tf.train.SequenceExample
# in TIMELINE_DIR: context user_id, user_index, user_<attr>; feature lists history_*: every history step of the
# user, oldest first, not truncated). A sample (tf.train.Example in pretrain/ or ctr/) names its user, its target
# and the cut-off ``history_end`` into that timeline; the reader joins the two into batches with a history_length
# and history_* features of max_history steps.
# Context
CTX_USER_ID = "user_id"  # bytes, raw user id (GAUC groups by it)
CTX_USER_INDEX = "user_index"  # int64 user-vocabulary index (OOV for users below user_min_count); timeline
CTX_TIMESTAMP = "timestamp"  # int64, the sample's time; every history step is strictly earlier
CTX_TARGET_ITEM = "target_item"  # int64 item index
CTX_TARGET_QUERY = "target_query"  # int64 query index (EMPTY_QUERY_INDEX for recommendation)
CTX_LABEL = "label"  # float, 1/0 (pretrain examples: always 1, the true next pair)
CTX_HISTORY_END = "history_end"  # int64, the user's timeline steps strictly before the sample's time (sample)
CTX_HISTORY_LENGTH = "history_length"  # int64, number of real history steps (<= max_history; reader output)
CTX_NEGATIVE_ITEMS = "negative_items"  # int64[num_negatives], pretrain only: sampled negative pairs
CTX_NEGATIVE_QUERIES = "negative_queries"  # int64[num_negatives]
USER_ATTRIBUTE_PREFIX = "user_"  # int64 user_<attr> for each users-table column; timeline

# Feature lists, oldest first (a timeline: all steps; a batch: the newest max_history before the cut-off)
SEQ_HISTORY_ITEM = "history_item"
SEQ_HISTORY_QUERY = "history_query"
SEQ_HISTORY_TIMESTAMP = "history_timestamp"
SEQ_HISTORY_FEEDBACK = "history_feedback"  # feedback-vocabulary index per step (``feedback_token``)
SEQUENCE_FEATURES = (SEQ_HISTORY_ITEM, SEQ_HISTORY_QUERY, SEQ_HISTORY_TIMESTAMP)
# Optional model inputs (serving): token ids of raw query text, tokenized in the graph with tf_tokenize.
# When present they replace the query-table lookup, so queries outside the vocabulary keep their words.
HISTORY_QUERY_TOKENS = "history_query_tokens"  # int [B, L, MAX_QUERY_TOKENS]
TARGET_QUERY_TOKENS = "target_query_tokens"  # int [B, MAX_QUERY_TOKENS] (row format) or [B, N, ...] (ranking)

# Event types the adapters and the synthetic world write
CLICK_EVENT = DEFAULT_HISTORY_EVENTS[0]
IMPRESSION_EVENT = DEFAULT_SAMPLE_EVENTS[0]

# Item table (tf.train.Example per item, row = item index)
ITEM_INDEX = "item_index"
TITLE_TOKENS = "title_tokens"  # int64, up to MAX_TITLE_TOKENS token indices
IMAGE_PIXELS = "image_pixels"  # optional raw uint8 bytes, IMAGE_SIZE x IMAGE_SIZE x 3
IMAGE_SIZE = 32
ITEM_ATTRIBUTE_PREFIX = "attr_"  # int64 attr_<name>
# Query table (tf.train.Example per query, row = query index)
QUERY_INDEX = "query_index"
QUERY_TEXT = "query"
QUERY_TOKENS = "query_tokens"


@dataclasses.dataclass
class DatasetMetadata:
    """What a built dataset holds; written by the pipeline as metadata.json, read by everything after it."""

    num_items: int  # vocabulary size including reserved rows
    num_queries: int
    num_tokens: int
    item_attributes: Dict[str, int]  # attribute name -> vocabulary size
    user_attributes: Dict[str, int]
    image_dim: int  # 0 when the dataset has no image embeddings
    has_image_pixels: bool
    channels: List[str]  # subset of CHANNELS present in the data
    max_history: int
    num_negatives: int
    max_title_tokens: int = MAX_TITLE_TOKENS
    max_query_tokens: int = MAX_QUERY_TOKENS
    num_users: int = 0  # user vocabulary size incl. reserved rows; 0 = a dataset built before user ids
    num_feedback: int = 0  # feedback vocabulary size incl. reserved rows; 0 = no history_feedback feature
    history_layout: str = ""  # TIMELINES_LAYOUT; "" = an older build's per-sample histories, which no reader reads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetMetadata":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def user_attribute_feature(name: str) -> str:
    return f"{USER_ATTRIBUTE_PREFIX}{name}"


def item_attribute_feature(name: str) -> str:
    return f"{ITEM_ATTRIBUTE_PREFIX}{name}"


def sample_spec(metadata: DatasetMetadata, kind: str) -> dict:
    """Feature spec of one ``kind`` sample ``tf.train.Example`` (its history is a cut of the user's timeline)."""
    import tensorflow as tf

    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"kind must be one of {EXAMPLE_KINDS}, got {kind!r}")
    spec = {
        CTX_USER_ID: tf.io.FixedLenFeature([], tf.string),
        CTX_TIMESTAMP: tf.io.FixedLenFeature([], tf.int64),
        CTX_TARGET_ITEM: tf.io.FixedLenFeature([], tf.int64),
        CTX_TARGET_QUERY: tf.io.FixedLenFeature([], tf.int64),
        CTX_LABEL: tf.io.FixedLenFeature([], tf.float32),
        CTX_HISTORY_END: tf.io.FixedLenFeature([], tf.int64),
    }
    if kind == PRETRAIN_DIR:
        spec[CTX_NEGATIVE_ITEMS] = tf.io.FixedLenFeature([metadata.num_negatives], tf.int64)
        spec[CTX_NEGATIVE_QUERIES] = tf.io.FixedLenFeature([metadata.num_negatives], tf.int64)
    return spec


def history_features(metadata: DatasetMetadata) -> Tuple[str, ...]:
    """The history feature lists a dataset has (``history_feedback`` only with a feedback vocabulary)."""
    return SEQUENCE_FEATURES + ((SEQ_HISTORY_FEEDBACK,) if metadata.num_feedback else ())


def timeline_spec(metadata: DatasetMetadata) -> Tuple[dict, dict]:
    """(context_features, sequence_features) for ``tf.io.parse_single_sequence_example`` of one user's timeline."""
    import tensorflow as tf

    context = {CTX_USER_ID: tf.io.FixedLenFeature([], tf.string)}
    for name in sorted(metadata.user_attributes):
        context[user_attribute_feature(name)] = tf.io.FixedLenFeature([], tf.int64, default_value=OOV_INDEX)
    if metadata.num_users:
        context[CTX_USER_INDEX] = tf.io.FixedLenFeature([], tf.int64, default_value=OOV_INDEX)
    sequence = {name: tf.io.FixedLenSequenceFeature([], tf.int64) for name in history_features(metadata)}
    return context, sequence


def item_table_spec(metadata: DatasetMetadata) -> dict:
    """Feature spec of one item-table ``tf.train.Example``."""
    import tensorflow as tf

    spec = {
        ITEM_INDEX: tf.io.FixedLenFeature([], tf.int64),
        ITEM_ID: tf.io.FixedLenFeature([], tf.string),
        TITLE_TOKENS: tf.io.VarLenFeature(tf.int64),
    }
    if metadata.image_dim:
        spec[IMAGE_EMBEDDING] = tf.io.FixedLenFeature([metadata.image_dim], tf.float32)
    if metadata.has_image_pixels:
        spec[IMAGE_PIXELS] = tf.io.FixedLenFeature([], tf.string)
    for name in sorted(metadata.item_attributes):
        spec[item_attribute_feature(name)] = tf.io.FixedLenFeature([], tf.int64, default_value=OOV_INDEX)
    return spec


def query_table_spec() -> dict:
    """Feature spec of one query-table ``tf.train.Example``."""
    import tensorflow as tf

    return {
        QUERY_INDEX: tf.io.FixedLenFeature([], tf.int64),
        QUERY_TEXT: tf.io.FixedLenFeature([], tf.string),
        QUERY_TOKENS: tf.io.VarLenFeature(tf.int64),
    }


def channels_present(metadata_like: dict) -> List[str]:
    """Channels a dataset has, from flags ``has_queries``, ``has_titles``, ``image_dim``, ``has_image_pixels``."""
    channels = []
    if metadata_like.get("has_queries"):
        channels.append(QUERY_CHANNEL)
    if metadata_like.get("has_titles"):
        channels.append(TEXT_CHANNEL)
    if metadata_like.get("image_dim") or metadata_like.get("has_image_pixels"):
        channels.append(IMAGE_CHANNEL)
    channels.append(ATTRIBUTES_CHANNEL)  # the item id itself is an attribute, so this channel always exists
    return channels


def pad_or_truncate(values: Sequence[int], length: int, pad: int = PAD_INDEX) -> List[int]:
    values = list(values)[:length]
    return values + [pad] * (length - len(values))
