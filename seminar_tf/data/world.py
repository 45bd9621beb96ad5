"""Synthetic world generator (docs/design.md §7): raw items/events/users files with planted, known structure.

Numpy only (no TensorFlow), deterministic for a seed: the same config writes the same bytes. The world is
built so that the paper's claims can be checked on it:

* **Topics.** ``num_topics`` latent topics. Every item has a sparse topic mixture (one dominant topic with
  weight ~``dominant_topic_weight``, the rest spread over 0-2 secondary topics). Titles are drawn from the
  topics' pseudo-word vocabularies (in proportion to the mixture) plus common English filler words. Authors
  and categories each belong to a topic (``a % num_topics``, ``c % num_topics``) and an item takes one of its
  dominant topic's with probability ``attribute_topic_prob``.
* **Misaligned image channel.** ``image = image_scale * R @ (E^T mixture) + offset + noise``: ``E`` puts the
  topics on orthonormal axes (the "text" frame: a bag of title words mapped to topics lies in it), ``R`` is
  a random orthogonal matrix and ``offset`` a fixed vector. So image embeddings carry the topic, but at
  ~``image_scale`` times the norm and in a rotated frame: a plain dot product of unaligned text and image
  vectors is uninformative, while ``R^T (image - offset) / image_scale`` recovers the text frame. A share
  ``image_missing_fraction`` of the items (default 0) is written without an image embedding, as in a catalog
  whose images are partly missing: their topic is then in the title and attributes only.
* **Users.** Each user has 1-2 *long-term* topics that appear only in the oldest ``long_term_window`` share
  of the click history (and never later), *short-term* topics that drift in phases of
  ~``short_term_phase_events`` events over the whole timeline, and a few *casual* topics as background.
  Short-term and casual topics are never long-term ones, so after the oldest part a long-term topic is
  invisible. Each long-term topic gets at least one session in the oldest part (the truth lists the ones
  shown: a second one is dropped when that part holds a single session). History lengths are lognormal
  (heavy tail), clipped to ``[min_history_events, max_history_events]``.
* **Sessions.** The history is a sequence of sessions (geometric length, mean ``session_mean_events``),
  each on one topic. A share ``search_fraction`` of sessions are searches: one query from the topic's finite
  query set (Zipf popularity, so queries repeat) on every click of the session; items are drawn from the
  topic, preferring items whose title contains a query word. Browsing sessions have the empty query.
* **Impressions.** ``impressions_per_user`` impressions per user, interleaved with the newest
  ``impression_window`` share of the clicks (so they come after most of the history). Each shows one item
  whose topic comes from the user's long-term topics, the current short-term topics, or anywhere, with a
  target query (personalized search, PSR) for a share ``search_fraction`` of them. The label is
  ``Bernoulli(sigmoid(logit))`` with::

      logit = click_bias
            + click_long_term_weight  * sum_{k in long-term topics} mixture[item, k]
            + click_short_term_weight * sum_{k in short-term topics now} mixture[item, k]
            + click_query_weight      * mixture[item, query topic]      (search impressions only)
            + click_popularity_weight * popularity[item]                (popularity ~ N(0, 1))

  so a model that sees the whole lifelong history (long-term topics) beats one that sees only the recent
  part or none.
* **History-only items.** A share ``history_only_item_fraction`` of item ids is never an impression target
  (only clicked in histories): the paper's "insufficient ID learning".

Files written to ``out_dir`` (columns from ``seminar_tf.schema``; ``<fmt>`` is jsonl, csv or parquet):

* ``items.<fmt>``: item_id ("i123"), title, image_embedding (``image_dim`` floats), author_id ("a7"),
  category_id ("c3").
* ``events.<fmt>``: user_id ("u5"), timestamp (int seconds, strictly increasing per user, users interleave;
  rows sorted by time), item_id, query ("" for browsing), event ("click" for history behaviours,
  "impression" for labelled samples), label (0/1 for impressions; **always 1 for clicks**), and with
  ``with_split`` a split column (train/valid/test by each user's timeline: cut at the user's impressions).
* ``users.<fmt>``: user_id, age_bucket, gender (weakly correlated with the first long-term topic).
* ``world_truth.json``: the planted parameters (see ``generate_world``), for tests and evaluations.

CSV writes lists as JSON array strings; Parquet (pyarrow) writes ``image_embedding`` as ``list<float32>``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from seminar_tf import schema
from seminar_tf.config import WorldConfig  # noqa: F401  (defined in the leaf config module)

# Attribute columns of the synthetic world (the pipeline treats every non-content items column as an attribute
# and every users column but user_id as a profile attribute, so these names are the world's own choice).
AUTHOR_ID = "author_id"
CATEGORY_ID = "category_id"
AGE_BUCKET = "age_bucket"
GENDER = "gender"
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
GENDERS = ("f", "m")

CLICK_EVENT = "click"  # one of schema.DEFAULT_HISTORY_EVENTS
IMPRESSION_EVENT = "impression"  # one of schema.DEFAULT_SAMPLE_EVENTS
TRUTH_FILE = "world_truth.json"
TRUTH_VERSION = 1

ITEM_COLUMNS = (schema.ITEM_ID, schema.TITLE, schema.IMAGE_EMBEDDING, AUTHOR_ID, CATEGORY_ID)
EVENT_COLUMNS = (schema.USER_ID, schema.TIMESTAMP, schema.ITEM_ID, schema.QUERY, schema.EVENT, schema.LABEL)
USER_COLUMNS = (schema.USER_ID, AGE_BUCKET, GENDER)

# Impression candidate sources, as written to the truth file.
SOURCES = ("long_term", "short_term", "random")

# Filler words of titles (shared by all topics).
_COMMON_WORDS = (
    "new", "best", "classic", "deluxe", "edition", "set", "pro", "mini", "max", "with", "and", "for",
    "the", "of", "original", "premium", "series", "collection", "guide", "complete", "essential", "modern",
    "vintage", "limited", "special", "daily", "home", "travel", "kit", "pack", "plus", "ultra", "light",
    "smart", "easy", "great", "little", "big", "first", "official",
)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


# ------------------------------------------------------------------------------------------------ sampling
class _GroupSampler:
    """Draws one member of a group per request, members weighted, all requests in one vectorized call.

    Groups are laid side by side on one cumulative axis (group g occupies [g, g + 1)), so a request for group
    g with a uniform u is a single ``searchsorted`` at ``g + u``. Empty groups answer -1.
    """

    def __init__(self, group_of_member: np.ndarray, members: np.ndarray, weights: np.ndarray, num_groups: int):
        order = np.lexsort((members, group_of_member))
        groups = group_of_member[order]
        self.members = members[order]
        weights = weights[order].astype(np.float64)
        self.counts = np.bincount(groups, minlength=num_groups)
        cdf = np.empty(len(groups), np.float64)
        start = 0
        for group, count in enumerate(self.counts):
            if count:
                cum = np.cumsum(weights[start:start + count])
                cdf[start:start + count] = group + cum / cum[-1]
                cdf[start + count - 1] = group + 1.0
            start += count
        self.cdf = cdf

    def sample(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        groups = np.asarray(groups, np.int64)
        if len(self.members) == 0:
            return np.full(len(groups), -1, np.int64)
        pos = np.searchsorted(self.cdf, groups + rng.random(len(groups)), side="right")
        picked = self.members[np.minimum(pos, len(self.members) - 1)]
        return np.where(self.counts[groups] > 0, picked, -1)


def _segment(length: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Lengths >= 1 (geometric, mean ~``mean``) that tile ``length`` exactly."""
    if length <= 0:
        return np.zeros(0, np.int64)
    p = min(1.0, 1.0 / mean)
    parts, total = [], 0
    while total < length:
        chunk = rng.geometric(p, size=int(length * p * 1.3) + 4)
        parts.append(chunk)
        total += int(chunk.sum())
    lengths = np.concatenate(parts)
    cum = np.cumsum(lengths)
    n = int(np.searchsorted(cum, length)) + 1
    lengths = lengths[:n].copy()
    lengths[-1] -= cum[n - 1] - length
    return lengths


def _zipf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------------ vocabulary
def _make_vocabulary(config: WorldConfig, rng: np.random.Generator) -> dict:
    """Topic word lists (unique pseudo-words), common words and each topic's finite query set."""
    k, w = config.num_topics, config.words_per_topic
    common = list(_COMMON_WORDS[: config.num_common_words])
    taken = set(common)
    pseudo: List[str] = []
    needed = k * w + max(0, config.num_common_words - len(common))
    while len(pseudo) < needed:
        syllables = rng.integers(2, 4)
        word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            pseudo.append(word)
    common += pseudo[k * w:]
    topic_words = [pseudo[t * w:(t + 1) * w] for t in range(k)]
    word_weights = _zipf(w, 0.8)
    queries: List[List[str]] = []
    for t in range(k):
        seen: Dict[str, None] = {}
        attempts = 0
        while len(seen) < config.queries_per_topic and attempts < 100 * config.queries_per_topic:
            attempts += 1
            n = int(rng.integers(1, min(config.query_max_words, w) + 1))
            picks = rng.choice(w, size=n, replace=False, p=word_weights)
            seen.setdefault(" ".join(topic_words[t][i] for i in picks), None)
        queries.append(list(seen))
    return {"topic_words": topic_words, "common_words": common, "queries": queries, "word_weights": word_weights}


# ------------------------------------------------------------------------------------------------ items
def _make_items(config: WorldConfig, vocab: dict, rng: np.random.Generator) -> dict:
    n, k = config.num_items, config.num_topics
    dominant = rng.integers(k, size=n)
    dominant[:k] = rng.permutation(k)  # every topic has at least one item
    mixture = np.zeros((n, k))
    m = config.dominant_topic_weight
    concentration = 10.0
    secondary_counts = rng.choice(3, size=n, p=[0.3, 0.4, 0.3])
    dominant_weights = rng.beta(concentration * m, concentration * (1 - m), size=n) if m < 1 else np.ones(n)
    dominant_weights = np.maximum(dominant_weights, 0.55)  # the dominant topic stays the largest
    for i in range(n):
        d = dominant[i]
        n2 = secondary_counts[i]
        if n2 == 0 or m >= 1.0:
            mixture[i, d] = 1.0
            continue
        others = rng.choice(np.delete(np.arange(k), d), size=n2, replace=False)
        mixture[i, d] = dominant_weights[i]
        mixture[i, others] = (1.0 - dominant_weights[i]) * rng.dirichlet(np.ones(n2))
    popularity = rng.standard_normal(n)

    # Titles: each word is a topic word (topic ~ mixture) w.p. title_topic_word_prob, else filler;
    # the first topic word is always from the dominant topic.
    word_cdf = np.cumsum(vocab["word_weights"])
    word_cdf[-1] = 1.0
    topic_words, common = vocab["topic_words"], vocab["common_words"]
    titles: List[str] = []
    for i in range(n):
        length = int(rng.integers(config.title_min_words, config.title_max_words + 1))
        is_topic = rng.random(length) < config.title_topic_word_prob
        is_topic[rng.integers(length)] = True
        word_topics = rng.choice(k, size=length, p=mixture[i])
        word_topics[np.argmax(is_topic)] = dominant[i]
        word_ranks = np.searchsorted(word_cdf, rng.random(length), side="right")
        fillers = rng.integers(len(common), size=length) if common else np.zeros(length, np.int64)
        words = [topic_words[word_topics[j]][word_ranks[j]] if is_topic[j] or not common else common[fillers[j]]
                 for j in range(length)]
        titles.append(" ".join(dict.fromkeys(words)).capitalize())  # a repeated word is dropped

    def topical(count: int) -> np.ndarray:
        """An attribute value per item: one of the dominant topic's values (value % k == topic) or any."""
        per_topic = -(-count // k)  # values of topic t are t, t + k, t + 2k, ... < count
        pick = dominant + k * rng.integers(per_topic, size=n)
        pick = np.where(pick < count, pick, dominant % count)
        follows = rng.random(n) < config.attribute_topic_prob
        return np.where(follows & (dominant < count), pick, rng.integers(count, size=n))

    authors = topical(config.num_authors)
    categories = topical(config.num_categories)
    num_history_only = int(round(config.history_only_item_fraction * n))
    history_only = np.zeros(n, bool)
    history_only[rng.choice(n, size=num_history_only, replace=False)] = True
    return dict(dominant=dominant, mixture=mixture, popularity=popularity, titles=titles, authors=authors,
                categories=categories, history_only=history_only)


def _make_image_embeddings(config: WorldConfig, mixture: np.ndarray, rng: np.random.Generator) -> dict:
    """image = scale * R @ (E^T mixture) + offset + noise; E is the text frame (topic -> axis)."""
    k, d = config.num_topics, config.image_dim
    if d >= k:
        topic_embedding = np.eye(k, d)
    else:  # fewer dimensions than topics: random unit directions
        topic_embedding = rng.standard_normal((k, d))
        topic_embedding /= np.linalg.norm(topic_embedding, axis=1, keepdims=True)
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    rotation = q * np.sign(np.diag(r))
    offset = rng.standard_normal(d)
    offset *= config.image_offset_norm / max(np.linalg.norm(offset), 1e-12)
    clean = config.image_scale * (mixture @ topic_embedding) @ rotation.T + offset
    embeddings = np.round(clean + config.image_noise * rng.standard_normal(clean.shape), 5)
    missing = np.zeros(len(embeddings), bool)  # items written without an image (image_missing_fraction)
    missing[rng.permutation(len(embeddings))[:round(config.image_missing_fraction * len(embeddings))]] = True
    return dict(embeddings=embeddings, topic_embedding=topic_embedding, rotation=rotation, offset=offset,
                missing=missing)


# ------------------------------------------------------------------------------------------------ users
def _make_users(config: WorldConfig, rng: np.random.Generator) -> dict:
    u, k = config.num_users, config.num_topics
    long_term, casual = [], []
    for _ in range(u):
        topics = rng.permutation(k)
        n_long = int(rng.integers(1, 3))
        long_term.append(topics[:n_long])
        casual.append(np.sort(topics[n_long:n_long + config.casual_topics]))
    mu = math.log(config.mean_history) - config.history_length_sigma ** 2 / 2
    lengths = np.clip(np.round(rng.lognormal(mu, config.history_length_sigma, size=u)),
                      config.min_history_events, config.max_history_events).astype(np.int64)
    age_of_topic = rng.integers(len(AGE_BUCKETS), size=k)
    gender_of_topic = rng.integers(len(GENDERS), size=k)
    first_long_term = np.array([lt[0] for lt in long_term])
    follows = rng.random(u) < config.profile_correlation
    age = np.where(follows, age_of_topic[first_long_term], rng.integers(len(AGE_BUCKETS), size=u))
    follows = rng.random(u) < config.profile_correlation
    gender = np.where(follows, gender_of_topic[first_long_term], rng.integers(len(GENDERS), size=u))
    starts = config.start_timestamp + rng.integers(config.start_spread_s + 1, size=u)
    return dict(long_term=long_term, casual=casual, lengths=lengths, age=age, gender=gender, starts=starts,
                age_of_topic=age_of_topic, gender_of_topic=gender_of_topic)


def _user_timeline(config: WorldConfig, user: int, users: dict, items: dict, samplers: dict,
                   query_weights: np.ndarray, rng: np.random.Generator) -> dict:
    """One user's clicks and impressions, in time order, with the truth behind them."""
    k, nq = config.num_topics, config.queries_per_topic
    length = int(users["lengths"][user])
    long_term, casual = users["long_term"][user], users["casual"][user]
    short_term_pool = np.setdiff1d(np.arange(k), long_term)

    # Sessions tile the oldest part and the recent part separately, so no session crosses the boundary.
    num_old = max(1, int(round(config.long_term_window * length)))
    old_sessions = _segment(num_old, config.session_mean_events, rng)
    session_lengths = np.concatenate([old_sessions, _segment(length - num_old, config.session_mean_events, rng)])
    num_sessions = len(session_lengths)
    session_starts = np.concatenate([[0], np.cumsum(session_lengths)[:-1]])

    # Short-term interest phases over sessions; each phase has 1-2 topics and may keep one from the last.
    phase_lengths = _segment(num_sessions, max(1.0, config.short_term_phase_events / config.session_mean_events), rng)
    phase_a = np.empty(len(phase_lengths), np.int64)
    phase_b = np.empty(len(phase_lengths), np.int64)
    for phase in range(len(phase_lengths)):
        picks = rng.choice(short_term_pool, size=2, replace=False)
        if phase and rng.random() < 0.3:
            picks[0] = phase_a[phase - 1]
            if picks[1] == picks[0]:
                picks[1] = phase_b[phase - 1]
        phase_a[phase] = picks[0]
        phase_b[phase] = picks[1] if rng.random() < 0.5 else picks[0]
    session_phase = np.repeat(np.arange(len(phase_lengths)), phase_lengths)

    # Session topics: long-term (oldest part only) / casual / current short-term phase.
    short_pick = np.where(rng.random(num_sessions) < 0.5, phase_a[session_phase], phase_b[session_phase])
    topic = np.where(rng.random(num_sessions) < config.casual_share,
                     casual[rng.integers(len(casual), size=num_sessions)], short_pick)
    is_old = np.arange(num_sessions) < len(old_sessions)
    long_pick = long_term[rng.integers(len(long_term), size=num_sessions)]
    topic = np.where(is_old & (rng.random(num_sessions) < config.long_term_share), long_pick, topic)
    forced = rng.permutation(len(old_sessions))[: len(long_term)]  # every long-term topic shows up once
    topic[forced] = long_term[: len(forced)]
    visible_long_term = np.sort(long_term[: len(forced)])

    is_search = rng.random(num_sessions) < config.search_fraction
    session_query = np.where(is_search, topic * nq + rng.choice(nq, size=num_sessions, p=query_weights), -1)

    click_topic = np.repeat(topic, session_lengths)
    click_query = np.repeat(session_query, session_lengths)
    click_session = np.repeat(np.arange(num_sessions), session_lengths)
    click_items = samplers["history"].sample(click_topic, rng)
    by_query = (click_query >= 0) & (rng.random(length) < config.query_match_prob)
    if by_query.any():
        matched = samplers["query"].sample(click_query[by_query], rng)
        click_items[by_query] = np.where(matched >= 0, matched, click_items[by_query])

    # Impressions: interleaved with the newest impression_window share of the clicks.
    n_imp = config.impressions_per_user
    window = max(1, int(math.ceil(config.impression_window * length - 1e-9)))
    clicks_before = np.sort(rng.integers(length - window, length + 1, size=n_imp))
    imp_phase = session_phase[click_session[np.maximum(clicks_before - 1, 0)]]
    imp_short_a, imp_short_b = phase_a[imp_phase], phase_b[imp_phase]
    source_draw = rng.random(n_imp)
    source = np.where(source_draw < config.impression_long_term_share, 0,
                      np.where(source_draw < config.impression_long_term_share + config.impression_short_term_share,
                               1, 2))
    candidate_topic = np.select(
        [source == 0, source == 1],
        [visible_long_term[rng.integers(len(visible_long_term), size=n_imp)],
         np.where(rng.random(n_imp) < 0.5, imp_short_a, imp_short_b)],
        rng.integers(k, size=n_imp))
    imp_search = rng.random(n_imp) < config.search_fraction
    imp_query = np.where(imp_search, candidate_topic * nq + rng.choice(nq, size=n_imp, p=query_weights), -1)
    irrelevant = imp_search & (rng.random(n_imp) >= config.search_relevance)
    item_topic = np.where(irrelevant, rng.integers(k, size=n_imp), candidate_topic)
    imp_items = samplers["impression"].sample(item_topic, rng)
    missing = imp_items < 0
    if missing.any():  # a topic whose items are all history-only: any eligible item
        imp_items[missing] = samplers["impression_any"].sample(np.zeros(int(missing.sum()), np.int64), rng)

    mixture = items["mixture"][imp_items]
    rows = np.arange(n_imp)
    long_match = mixture[:, visible_long_term].sum(axis=1)
    short_match = mixture[rows, imp_short_a] + np.where(imp_short_b != imp_short_a, mixture[rows, imp_short_b], 0.0)
    query_match = np.where(imp_search, mixture[rows, np.where(imp_search, candidate_topic, 0)], 0.0)
    logit = (config.click_bias + config.click_long_term_weight * long_match
             + config.click_short_term_weight * short_match + config.click_query_weight * query_match
             + config.click_popularity_weight * items["popularity"][imp_items])
    probability = _sigmoid(logit)
    labels = (rng.random(n_imp) < probability).astype(np.int64)

    # Merge clicks and impressions on one timeline; every gap >= 1 s, so timestamps strictly increase.
    total = length + n_imp
    is_imp = np.zeros(total, bool)
    is_imp[clicks_before + np.arange(n_imp)] = True
    session_first = np.zeros(length, bool)
    session_first[session_starts] = True
    click_gaps = np.where(session_first, rng.exponential(config.mean_session_gap_s, size=length),
                          rng.exponential(config.mean_click_gap_s, size=length))
    gaps = np.empty(total)
    gaps[~is_imp] = click_gaps
    gaps[is_imp] = rng.exponential(config.mean_impression_gap_s, size=n_imp)
    timestamps = int(users["starts"][user]) + np.cumsum(1 + np.floor(gaps).astype(np.int64))
    click_ts, imp_ts = timestamps[~is_imp], timestamps[is_imp]

    phase_start_ts = click_ts[session_starts[np.concatenate([[0], np.cumsum(phase_lengths)[:-1]])]]
    return dict(
        click_ts=click_ts, click_items=click_items, click_query=click_query,
        imp_ts=imp_ts, imp_items=imp_items, imp_query=imp_query, imp_labels=labels, imp_probability=probability,
        imp_source=source, imp_query_topic=np.where(imp_search, candidate_topic, -1),
        imp_short_term=[sorted({int(a), int(b)}) for a, b in zip(imp_short_a, imp_short_b)],
        long_term_visible=visible_long_term, num_old=num_old, long_term_until=int(click_ts[num_old - 1]),
        phases=[[int(ts), sorted({int(a), int(b)})] for ts, a, b in zip(phase_start_ts, phase_a, phase_b)],
    )


def _split_codes(timestamps: np.ndarray, imp_ts: np.ndarray, config: WorldConfig) -> np.ndarray:
    """0/1/2 = train/valid/test: each user's timeline cut at the start of their valid and test impressions."""
    n = len(imp_ts)
    n_test = max(1, int(round(config.test_fraction * n))) if n >= 3 and config.test_fraction > 0 else 0
    n_valid = max(1, int(round(config.valid_fraction * n))) if n >= 3 and config.valid_fraction > 0 else 0
    codes = np.zeros(len(timestamps), np.int64)
    if n_valid:
        codes[timestamps >= imp_ts[n - n_test - n_valid]] = 1
    if n_test:
        codes[timestamps >= imp_ts[n - n_test]] = 2
    return codes


# ------------------------------------------------------------------------------------------------ writing
def _write_table(out_dir: str, table: str, fmt: str, columns: Dict[str, list], list_columns: Sequence[str] = (),
                 int_columns: Sequence[str] = ()) -> str:
    """Writes ``<table>.<fmt>``; lists become JSON strings in CSV and list<float32> in Parquet."""
    path = os.path.join(out_dir, f"{table}.{fmt}")
    names = list(columns)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        def arrow_type(name):
            if name in list_columns:
                return pa.list_(pa.float32())
            return pa.int64() if name in int_columns else pa.string()

        arrays = [pa.array(columns[name], type=arrow_type(name)) for name in names]
        pq.write_table(pa.Table.from_arrays(arrays, names=names), path, compression="snappy")
        return path
    with open(path, "w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
            for row in zip(*(columns[name] for name in names)):
                f.write(dumps(dict(zip(names, row))))
                f.write("\n")
        else:
            values = [["" if v is None else json.dumps(v, separators=(",", ":")) for v in columns[name]]
                      if name in list_columns
                      else columns[name] for name in names]
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(names)
            writer.writerows(zip(*values))
    return path


def _make_samplers(config: WorldConfig, vocab: dict, items: dict) -> tuple:
    """Item samplers per topic / query, and the query text of every global query id (topic * nq + local).

    History clicks draw from all items of a topic, search clicks from the items of the query's topic whose
    title has a query word, impressions from the items of a topic that are not history-only.
    """
    k, nq = config.num_topics, config.queries_per_topic
    all_items = np.arange(config.num_items)
    history_weights = np.exp(config.history_popularity * items["popularity"])
    eligible = all_items[~items["history_only"]]
    impression_weights = np.exp(config.impression_popularity * items["popularity"])
    word_items: Dict[str, List[int]] = {}
    for i, title in enumerate(items["titles"]):
        for token in set(schema.tokenize(title)):
            word_items.setdefault(token, []).append(i)
    query_groups, query_members = [], []
    for t, queries in enumerate(vocab["queries"]):
        for q, query in enumerate(queries):
            matches = {i for word in query.split() for i in word_items.get(word, ()) if items["dominant"][i] == t}
            query_groups += [t * nq + q] * len(matches)
            query_members += sorted(matches)
    query_members = np.array(query_members, np.int64)
    samplers = {
        "history": _GroupSampler(items["dominant"], all_items, history_weights, k),
        "query": _GroupSampler(np.array(query_groups, np.int64), query_members, history_weights[query_members], k * nq),
        "impression": _GroupSampler(items["dominant"][eligible], eligible, impression_weights[eligible], k),
        "impression_any": _GroupSampler(np.zeros(len(eligible), np.int64), eligible, impression_weights[eligible], 1),
    }
    # Topics with fewer distinct queries than queries_per_topic (tiny vocabularies) repeat their last ones.
    query_text = []
    for queries in vocab["queries"]:
        query_text += [queries[min(q, len(queries) - 1)] for q in range(nq)]
    return samplers, query_text


def _truth_document(config: WorldConfig, vocab: dict, items: dict, image: dict, users: dict, user_truth: dict,
                    cols: Dict[str, np.ndarray], short_terms: list, item_names: List[str],
                    user_names: List[str]) -> dict:
    """The planted parameters (contents listed in ``generate_world``), JSON-ready; impressions in file order."""
    imp = np.flatnonzero(cols["kind"] == 1)
    mixture = items["mixture"]
    return {
        "version": TRUTH_VERSION,
        "config": dataclasses.asdict(config),
        "topics": {"words": vocab["topic_words"], "common_words": vocab["common_words"],
                   "queries": vocab["queries"]},
        "items": {
            "item_id": item_names,
            "topic": items["dominant"].tolist(),
            "mixture_topics": [np.flatnonzero(row).tolist() for row in mixture],
            "mixture_weights": [np.round(row[row > 0], 6).tolist() for row in mixture],
            "popularity": np.round(items["popularity"], 6).tolist(),
            "history_only_item_ids": [item_names[i] for i in np.flatnonzero(items["history_only"]).tolist()],
        },
        "attributes": {"author_topic": "author a belongs to topic a % num_topics",
                       "category_topic": "category c belongs to topic c % num_topics",
                       "follow_probability": config.attribute_topic_prob},
        "image": {
            "formula": "image = scale * rotation @ (topic_embedding^T mixture) + offset + N(0, noise_std^2 I)",
            "scale": config.image_scale, "noise_std": config.image_noise,
            "rotation": np.round(image["rotation"], 10).tolist(),
            "offset": np.round(image["offset"], 10).tolist(),
            "topic_embedding": image["topic_embedding"].tolist(),
            "missing_item_ids": [item_names[i] for i in np.flatnonzero(image["missing"]).tolist()],
        },
        "users": {
            "user_id": user_names,
            "history_length": users["lengths"].tolist(),
            "casual_topics": [c.tolist() for c in users["casual"]],
            **user_truth,
            "profile": {"age_bucket_of_topic": [AGE_BUCKETS[a] for a in users["age_of_topic"].tolist()],
                        "gender_of_topic": [GENDERS[g] for g in users["gender_of_topic"].tolist()],
                        "follow_probability": config.profile_correlation,
                        "rule": "age/gender follow the first long-term topic w.p. follow_probability"},
        },
        "click_model": {
            "formula": "label ~ Bernoulli(sigmoid(bias + long_term_weight * sum_{k in long_term_topics} "
                       "mixture[item, k] + short_term_weight * sum_{k in short_term_topics} mixture[item, k] "
                       "+ query_weight * [search] mixture[item, query_topic] + popularity_weight * popularity[item]))",
            "bias": config.click_bias, "long_term_weight": config.click_long_term_weight,
            "short_term_weight": config.click_short_term_weight, "query_weight": config.click_query_weight,
            "popularity_weight": config.click_popularity_weight,
        },
        "impressions": {
            "user_id": [user_names[u] for u in cols["user"][imp].tolist()],
            "timestamp": cols["ts"][imp].tolist(),
            "item_id": [item_names[i] for i in cols["item"][imp].tolist()],
            "label": cols["label"][imp].tolist(),
            "source": [SOURCES[s] for s in cols["source"][imp].tolist()],
            "query_topic": cols["query_topic"][imp].tolist(),
            "short_term_topics": [short_terms[i] for i in imp.tolist()],
            "probability": np.round(cols["probability"][imp], 6).tolist(),
        },
    }


def load_truth(out_dir: str) -> dict:
    """The planted parameters written by ``generate_world`` (``world_truth.json``)."""
    with open(os.path.join(out_dir, TRUTH_FILE), encoding="utf-8") as f:
        return json.load(f)


def generate_world(config: WorldConfig, out_dir: str, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Writes ``items``/``events``/``users`` in ``config.format`` plus ``world_truth.json`` to ``out_dir``.

    Returns a summary: counts of users/items/events/clicks/impressions, the impressions' positive rate,
    history-length statistics, the paths written and the generation time in seconds.

    ``world_truth.json`` holds: the config; topics (word lists, common words, query sets with their topic
    = index); items (dominant topic, sparse mixture, popularity, history-only ids); the image map (scale,
    rotation R, offset, text-frame topic embedding E, noise); attribute-topic maps; users (long-term topics
    visible in the history, casual topics, short-term phases as [start timestamp, topics], history length,
    number of oldest clicks holding the long-term topics and the last such timestamp, profile map); the
    click model (formula and coefficients); and every impression (user, timestamp, item, source, query
    topic, short-term topics then, click probability) in events-file order.
    """
    started = time.perf_counter()
    say = progress or (lambda message: None)
    config.validate()
    os.makedirs(out_dir, exist_ok=True)
    rng_vocab, rng_items, rng_image, rng_users, rng_events = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(5))
    k, nq = config.num_topics, config.queries_per_topic

    vocab = _make_vocabulary(config, rng_vocab)
    items = _make_items(config, vocab, rng_items)
    image = _make_image_embeddings(config, items["mixture"], rng_image)
    users = _make_users(config, rng_users)
    say(f"world: {config.num_items} items on {k} topics, {config.num_users} users "
        f"(histories mean {users['lengths'].mean():.0f}, max {users['lengths'].max()})")

    samplers, query_text = _make_samplers(config, vocab, items)
    query_weights = _zipf(nq, 1.0)

    parts: Dict[str, list] = {name: [] for name in ("user", "ts", "item", "query", "kind", "label", "split",
                                                      "source", "query_topic", "probability", "short")}
    user_truth: Dict[str, list] = {name: [] for name in ("long_term_topics", "short_term_phases",
                                                          "num_long_term_events", "long_term_until")}
    report_every = max(1, config.num_users // 10)
    for user in range(config.num_users):
        tl = _user_timeline(config, user, users, items, samplers, query_weights, rng_events)
        n_clicks, n_imp = len(tl["click_ts"]), len(tl["imp_ts"])
        parts["user"].append(np.full(n_clicks + n_imp, user, np.int64))
        parts["ts"] += [tl["click_ts"], tl["imp_ts"]]
        parts["item"] += [tl["click_items"], tl["imp_items"]]
        parts["query"] += [tl["click_query"], tl["imp_query"]]
        parts["kind"] += [np.zeros(n_clicks, np.int64), np.ones(n_imp, np.int64)]
        parts["label"] += [np.ones(n_clicks, np.int64), tl["imp_labels"]]
        if config.with_split:
            parts["split"] += [_split_codes(tl["click_ts"], tl["imp_ts"], config),
                               _split_codes(tl["imp_ts"], tl["imp_ts"], config)]
        parts["source"] += [np.full(n_clicks, -1, np.int64), tl["imp_source"]]
        parts["query_topic"] += [np.full(n_clicks, -1, np.int64), tl["imp_query_topic"]]
        parts["probability"] += [np.zeros(n_clicks), tl["imp_probability"]]
        parts["short"] += [None] * n_clicks + tl["imp_short_term"]
        user_truth["long_term_topics"].append([int(t) for t in tl["long_term_visible"]])
        user_truth["short_term_phases"].append(tl["phases"])
        user_truth["num_long_term_events"].append(tl["num_old"])
        user_truth["long_term_until"].append(tl["long_term_until"])
        if (user + 1) % report_every == 0:
            say(f"world: users {user + 1}/{config.num_users}")

    short_terms = parts.pop("short")
    cols = {name: np.concatenate(values) if values else np.zeros(0, np.int64) for name, values in parts.items()}
    within_user = np.arange(len(cols["ts"]))  # concatenation order is time order within a user
    order = np.lexsort((within_user, cols["user"], cols["ts"]))  # rows sorted by time, users interleave
    cols = {name: values[order] if len(values) else values for name, values in cols.items()}
    short_terms = [short_terms[i] for i in order.tolist()]

    item_names = [f"i{i}" for i in range(config.num_items)]
    user_names = [f"u{u}" for u in range(config.num_users)]
    paths = {}
    fmt = config.format
    paths["items"] = _write_table(out_dir, "items", fmt, {
        schema.ITEM_ID: item_names,
        schema.TITLE: items["titles"],
        schema.IMAGE_EMBEDDING: [None if missing else row for row, missing in
                                 zip(image["embeddings"].tolist(), image["missing"].tolist())],
        AUTHOR_ID: [f"a{a}" for a in items["authors"].tolist()],
        CATEGORY_ID: [f"c{c}" for c in items["categories"].tolist()],
    }, list_columns=(schema.IMAGE_EMBEDDING,))
    say(f"world: wrote {paths['items']}")
    events = {
        schema.USER_ID: [user_names[u] for u in cols["user"].tolist()],
        schema.TIMESTAMP: cols["ts"].tolist(),
        schema.ITEM_ID: [item_names[i] for i in cols["item"].tolist()],
        schema.QUERY: [query_text[q] if q >= 0 else "" for q in cols["query"].tolist()],
        schema.EVENT: [IMPRESSION_EVENT if kind else CLICK_EVENT for kind in cols["kind"].tolist()],
        schema.LABEL: cols["label"].tolist(),
    }
    if config.with_split:
        events[schema.SPLIT] = [schema.SPLITS[s] for s in cols["split"].tolist()]
    paths["events"] = _write_table(out_dir, "events", fmt, events,
                                   int_columns=(schema.TIMESTAMP, schema.LABEL))
    say(f"world: wrote {paths['events']}")
    paths["users"] = _write_table(out_dir, "users", fmt, {
        schema.USER_ID: user_names,
        AGE_BUCKET: [AGE_BUCKETS[a] for a in users["age"].tolist()],
        GENDER: [GENDERS[g] for g in users["gender"].tolist()],
    })

    imp = np.flatnonzero(cols["kind"] == 1)
    truth = _truth_document(config, vocab, items, image, users, user_truth, cols, short_terms, item_names,
                            user_names)
    paths["truth"] = os.path.join(out_dir, TRUTH_FILE)
    with open(paths["truth"], "w", encoding="utf-8") as f:
        json.dump(truth, f, sort_keys=True, separators=(",", ":"))

    clicks = cols["kind"] == 0
    searched = cols["query"] >= 0
    clicked_items = np.unique(cols["item"][clicks])
    summary = {
        "format": fmt,
        "num_users": config.num_users,
        "num_items": config.num_items,
        "num_topics": k,
        "num_queries": len({q for qs in vocab["queries"] for q in qs}),
        "num_events": int(len(cols["ts"])),
        "num_clicks": int(clicks.sum()),
        "num_search_clicks": int((clicks & searched).sum()),
        "num_impressions": int(len(imp)),
        "num_search_impressions": int((~clicks & searched).sum()),
        "positive_rate": float(cols["label"][imp].mean()) if len(imp) else 0.0,
        "history_length_mean": float(users["lengths"].mean()),
        "history_length_max": int(users["lengths"].max()),
        "num_history_only_items": int(items["history_only"].sum()),
        "num_history_only_items_clicked": int(items["history_only"][clicked_items].sum()),
        "paths": paths,
        "seconds": round(time.perf_counter() - started, 3),
    }
    say(f"world: {summary['num_events']} events ({summary['num_impressions']} impressions, positive rate "
        f"{summary['positive_rate']:.3f}) in {summary['seconds']}s")
    return summary
