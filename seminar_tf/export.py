"""SavedModel export for TF Serving (docs/design.md §6): a ``tf.Module`` of ``tf.function`` signatures, versioned
and atomic.

``export_model(RUN/ctr, RUN/export/seminar)`` writes ``RUN/export/seminar/<version>/`` (the next integer
version): the SavedModel is written into a hidden temporary directory under the export base and renamed
into place only when complete, so TF Serving's file-system poller (which ignores names that are not
integers) never sees a partial version.

Inputs are raw string ids and raw query text. The vocabularies are assets of the SavedModel, looked up with
``tf.lookup.StaticHashTable`` (unknown id → ``OOV_INDEX``, "" item id → padding, "" query → browsing,
``EMPTY_QUERY_INDEX``); item/query content tables are variables of the model. Query text is normalized and
tokenized in the graph with core ``tf.strings`` ops only (``schema.tf_normalize_query``/``tf_tokenize``),
so the token ids reach the model as ``HISTORY_QUERY_TOKENS``/``TARGET_QUERY_TOKENS`` and a query never
seen in training keeps its words. No custom op: TF Serving, ``saved_model_cli`` and ``tf.saved_model.load``
all run it.

Signatures (B = batch, L = history steps, N = candidates, T = ``max_query_tokens``, d = model width):

  serving_default, ctr (row format, each row its own history; method predict)
    history_item_ids string [B, L]   oldest first; "" = padding (anywhere; padded steps are masked)
    history_queries  string [B, L]   raw query text of each step; "" = a browsing step
    target_item_id   string [B]      target_query string [B] ("" = recommendation, no query)
    user_<attr>      string [B]      one input per user attribute of the dataset ("" / unknown → OOV)
    user_id          string [B]      raw user id, when the model has a user-id embedding ("" / unseen → OOV)
    history_feedback string [B, L]   when the model reads history feedback: each step's
                                     ``schema.feedback_token`` (e.g. "impression:r4", "click"; "" = unknown)
    → probability float [B], logit float [B]
  rank (the serving shape of a ranking call: one history, N candidate (query, item) pairs; predict)
    history_item_ids / history_queries string [1, L], candidate_item_ids / candidate_queries string [1, N],
    user_<attr> string [1]           (B > 1 rows work too: each row its own history and candidates)
    → scores float [1, N] (click probability), logits float [1, N]; the history is encoded once per row
  ctr_examples (method tensorflow/serving/regress: TF Serving's Regress API)
    inputs string [B]: serialized tf.train.Example with bytes features history_item_ids (list),
    history_queries (list, "" = browse; shorter lists are padded with ""), target_item_id, target_query,
    user_<attr>, user_id, history_feedback (list) as above → outputs float [B] (click probability)
  ctr_classify (method tensorflow/serving/classify: TF Serving's Classify API; same tf.Example input)
    inputs string [B] → scores float [B, 2] ([1 - p, p]), classes string [B, 2] (["0", "1"])
  pretrain (PSU; present when the run was fine-tuned from a PSU run or ``psu_dir`` is given)
    history_item_ids / history_queries string [B, L], candidate_item_ids / candidate_queries string [B, N]
    → sequence_embedding [B, d] (PSU representation at <EOS>), candidate_embeddings [B, N, d]
      (Σ_m γ_m x^(m) of each candidate pair), scores [B, N] = <s, c> / τ (the next-pair logits)
    The PSU model reads queries through the query vocabulary (unseen query text → OOV).
  encode_items
    item_ids string [B] → item_index int64 [B], <channel>_embedding float [B, d] for each item channel
    (text, image, attributes: x^(m) of ContentEncoder.encode_items); with fitted PQ codebooks also
    pq_item_codes int32 [B, J_item, S] (the codes the PQ GSU reads; channel order in the export info).

  encode_history (the history state: whatever depends only on the history, computed once per history)
    history_item_ids / history_queries (/ history_feedback) string [B, L]
    → history_state_items, history_state_queries (, history_state_feedback) int32 [B, L]: each step's item, query
      (and feedback) index; an unknown query text gets num_queries + p, p its slot among the row's unknown steps;
      history_state_query_tokens int32 [B, P, T]: those steps' token ids; history_state_fingerprint int64 [B]:
      the vocabularies' key (``state_fingerprint``)
  rank_state (``rank`` from a history state: the same scores, no history strings to send, look up or tokenize)
    the encode_history outputs, candidate_item_ids / candidate_queries string [B, N], user_<attr> (, user_id)
    → scores, logits as ``rank``. A state of an export with other vocabularies, or of the wrong shape or range,
    fails with INVALID_ARGUMENT naming the input. TF Serving keeps no state: the client keeps it (e.g. the
    .npz cache of ``seminar-tf query --history-state``) and sends it with each request.

Limits are enforced in the graph and fail with INVALID_ARGUMENT naming the input: L ≤ ``max_history``,
N ≤ ``max_candidates``, matching shapes of ids and queries, matching batch sizes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf

from seminar_tf import schema
from seminar_tf.cli_args import DEFAULT_MAX_CANDIDATES, add_export_parser

# ---------------------------------------------------------------------------------------------------- contract
# Signature input/output names: the serving contract (serving/client.py repeats them; a test keeps them equal).
HISTORY_ITEM_IDS = "history_item_ids"
HISTORY_QUERIES = "history_queries"
HISTORY_FEEDBACK = "history_feedback"  # per-step feedback tokens (schema.feedback_token); feedback models only
USER_ID = schema.user_attribute_feature("id")  # "user_id": raw user id; models with a user-id embedding only
TARGET_ITEM_ID = "target_item_id"
TARGET_QUERY = "target_query"
CANDIDATE_ITEM_IDS = "candidate_item_ids"
CANDIDATE_QUERIES = "candidate_queries"
ITEM_IDS = "item_ids"
EXAMPLES = "inputs"  # tf.saved_model.REGRESS_INPUTS == CLASSIFY_INPUTS
PROBABILITY = "probability"
LOGIT = "logit"
SCORES = "scores"
LOGITS = "logits"
REGRESS_OUTPUTS = "outputs"  # tf.saved_model.REGRESS_OUTPUTS
CLASSES = "classes"  # tf.saved_model.CLASSIFY_OUTPUT_CLASSES
SEQUENCE_EMBEDDING = "sequence_embedding"
CANDIDATE_EMBEDDINGS = "candidate_embeddings"
ITEM_INDEX = "item_index"
PQ_ITEM_CODES = "pq_item_codes"
# The history state (``encode_history`` → ``rank_state``): the history in the model's index space.
STATE_ITEMS = "history_state_items"
STATE_QUERIES = "history_state_queries"
STATE_QUERY_TOKENS = "history_state_query_tokens"
STATE_FEEDBACK = "history_state_feedback"
STATE_FINGERPRINT = "history_state_fingerprint"
STATE_STEP_INPUTS = (STATE_ITEMS, STATE_QUERIES, STATE_FEEDBACK)  # one value per history step [B, L]

CTR_SIGNATURE = "ctr"
RANK_SIGNATURE = "rank"
EXAMPLES_SIGNATURE = "ctr_examples"
CLASSIFY_SIGNATURE = "ctr_classify"
PRETRAIN_SIGNATURE = "pretrain"
ENCODE_ITEMS_SIGNATURE = "encode_items"
ENCODE_HISTORY_SIGNATURE = "encode_history"
RANK_STATE_SIGNATURE = "rank_state"
DEFAULT_SIGNATURE = "serving_default"
METHOD_NAMES = {EXAMPLES_SIGNATURE: "tensorflow/serving/regress", CLASSIFY_SIGNATURE: "tensorflow/serving/classify"}

TMP_PREFIX = ".tmp-export-"  # not an integer: TF Serving and serving/server.py ignore it
EXPORT_INFO = "seminar_export.json"  # in assets.extra/: limits, inputs and outputs of this export
WARMUP_FILE = "tf_serving_warmup_requests"  # in assets.extra/: TF Serving replays these before serving


def embedding_output(channel: str) -> str:
    return f"{channel}_embedding"


# ---------------------------------------------------------------------------------------------------- module
class _Models:
    """Holds the Keras models outside TensorFlow's object tracking: the SavedModel carries their variables
    (tracked by ``SeminarServingModule``) and the traced signatures, not a Keras model (no layer re-tracing
    on save, and loaders need no Python class)."""

    def __init__(self, model, psu=None):
        self.model = model
        self.psu = psu


def _vocabulary_table(path: str, name: str) -> tf.lookup.StaticHashTable:
    """Whole line → line number (= index); unknown → OOV_INDEX. The file becomes a SavedModel asset."""
    initializer = tf.lookup.TextFileInitializer(
        path, key_dtype=tf.string, key_index=tf.lookup.TextFileIndex.WHOLE_LINE, value_dtype=tf.int64,
        value_index=tf.lookup.TextFileIndex.LINE_NUMBER)
    return tf.lookup.StaticHashTable(initializer, default_value=schema.OOV_INDEX, name=name)


def _canonical_ids(ids):
    """In-graph twin of the pipeline's id canonicalisation: whitespace runs collapse to one space, stripped."""
    return tf.strings.strip(tf.strings.regex_replace(ids, r"[\s\p{Z}]+", " "))


def state_fingerprint(vocab_dir: str, query_length: int) -> int:
    """The history state's key, int64: a hash of the vocabularies that give its indices meaning (items, queries,
    tokens, feedback) and of T. A state is valid for every export with the same key, whatever its weights."""
    import hashlib

    digest = hashlib.sha256(f"query_length={int(query_length)}".encode())
    for name in (schema.ITEM_VOCAB, schema.QUERY_VOCAB, schema.TOKEN_VOCAB, schema.FEEDBACK_VOCAB):
        path = os.path.join(vocab_dir, name)
        digest.update(name.encode())
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path, "rb") as f:
                digest.update(f.read())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def _at_least_one_step(steps):
    """[B, L] → [B, max(L, 1)], padding ("" / 0 = PAD) appended: the GSU's top-K needs L >= 1, so an empty history
    becomes one padding step (masked)."""
    return tf.pad(steps, [[0, 0], [0, tf.maximum(1 - tf.shape(steps)[1], 0)]])


def _step_features(items, queries, query_tokens=None, feedback=None) -> Dict[str, tf.Tensor]:
    """The model's history features from per-step indices [B, L] (and query tokens [B, L, T], feedback [B, L])."""
    batch, length = tf.shape(items)[0], tf.shape(items)[1]
    features = {
        schema.SEQ_HISTORY_ITEM: items,
        schema.SEQ_HISTORY_QUERY: queries,
        # Every step counts; padding is masked by its PAD item index wherever it sits.
        schema.CTX_HISTORY_LENGTH: tf.fill([batch], tf.cast(length, tf.int64)),
    }
    if query_tokens is not None:
        features[schema.HISTORY_QUERY_TOKENS] = query_tokens
    if feedback is not None:
        features[schema.SEQ_HISTORY_FEEDBACK] = feedback
    return features


def _signature(fn, specs: Dict[str, tf.TensorSpec]):
    """A tf.function of one dict argument with an explicit input signature; the signature's input keys are
    the TensorSpec names."""
    return tf.function(fn, input_signature=[specs])


class SeminarServingModule(tf.Module):
    """The exported object: vocabulary tables, the models' variables and one ``tf.function`` per signature.

    Args:
      model: a built ``SeminarModel`` (called once, weights loaded).
      vocab_dir: the dataset's ``vocab/`` directory (items, queries, tokens, user_attr_* files).
      user_attributes: names of the user attributes (``metadata.user_attributes``), one input each.
      max_history, max_candidates: limits enforced in the graph (INVALID_ARGUMENT beyond them).
      query_length: T, token slots per query (``metadata.max_query_tokens``).
      psu: optional built ``PSUModel`` for the ``pretrain`` signature.
    """

    def __init__(self, model, vocab_dir: str, user_attributes, *, max_history: int, max_candidates: int,
                 query_length: int, psu=None):
        super().__init__(name="seminar_serving")
        self._models = _Models(model, psu)
        self.max_history = int(max_history)
        self.max_candidates = int(max_candidates)
        self.query_length = int(query_length)
        self.user_attribute_names = sorted(user_attributes)
        self.item_channels = list(model.content.item_channels)
        pq = getattr(model, "pq", None)
        fitted = pq is not None and pq.is_fitted and pq.item_codes is not None
        self.pq_item_channels = [pq.channels[j] for j in pq.item_channel_ids] if fitted else []
        self.model_variables = list(model.variables)
        self.psu_variables = list(psu.variables) if psu is not None else []
        vocab = vocab_dir.rstrip("/")
        self.item_table = _vocabulary_table(f"{vocab}/{schema.ITEM_VOCAB}", "item_vocabulary")
        self.query_table = _vocabulary_table(f"{vocab}/{schema.QUERY_VOCAB}", "query_vocabulary")
        self.token_table = _vocabulary_table(f"{vocab}/{schema.TOKEN_VOCAB}", "token_vocabulary")
        self.user_tables = {
            name: _vocabulary_table(f"{vocab}/{schema.user_attribute_vocab(name)}", f"user_{name}_vocabulary")
            for name in self.user_attribute_names}
        self.num_items, self.num_queries = model.content.num_items, model.content.num_queries
        self.num_tokens = model.content.num_tokens
        self.fingerprint = state_fingerprint(vocab, query_length)
        self.uses_user_id = getattr(model, "user_id_embedding", None) is not None
        self.uses_feedback = getattr(model, "feedback_embedding", None) is not None
        self.user_id_table = (_vocabulary_table(f"{vocab}/{schema.USER_VOCAB}", "user_id_vocabulary")
                              if self.uses_user_id else None)
        self.feedback_table = (_vocabulary_table(f"{vocab}/{schema.FEEDBACK_VOCAB}", "feedback_vocabulary")
                               if self.uses_feedback else None)

        ids = lambda name, rank: tf.TensorSpec([None] * rank, tf.string, name=name)  # noqa: E731
        users = {schema.user_attribute_feature(n): ids(schema.user_attribute_feature(n), 1)
                 for n in self.user_attribute_names}
        if self.uses_user_id:
            users[USER_ID] = ids(USER_ID, 1)
        history = {HISTORY_ITEM_IDS: ids(HISTORY_ITEM_IDS, 2), HISTORY_QUERIES: ids(HISTORY_QUERIES, 2)}
        if self.uses_feedback:
            history[HISTORY_FEEDBACK] = ids(HISTORY_FEEDBACK, 2)
        candidates = {CANDIDATE_ITEM_IDS: ids(CANDIDATE_ITEM_IDS, 2), CANDIDATE_QUERIES: ids(CANDIDATE_QUERIES, 2)}
        examples = {EXAMPLES: ids(EXAMPLES, 1)}
        self.ctr = _signature(self._ctr, {**history, TARGET_ITEM_ID: ids(TARGET_ITEM_ID, 1),
                                          TARGET_QUERY: ids(TARGET_QUERY, 1), **users})
        self.rank = _signature(self._rank, {**history, **candidates, **users})
        self.ctr_examples = _signature(self._ctr_examples, examples)
        self.ctr_classify = _signature(self._ctr_classify, examples)
        self.encode_items = _signature(self._encode_items, {ITEM_IDS: ids(ITEM_IDS, 1)})
        self.encode_history = _signature(self._encode_history, history)
        state = {STATE_ITEMS: tf.TensorSpec([None, None], tf.int32, name=STATE_ITEMS),
                 STATE_QUERIES: tf.TensorSpec([None, None], tf.int32, name=STATE_QUERIES),
                 STATE_QUERY_TOKENS: tf.TensorSpec([None, None, None], tf.int32, name=STATE_QUERY_TOKENS),
                 STATE_FINGERPRINT: tf.TensorSpec([None], tf.int64, name=STATE_FINGERPRINT)}
        if self.uses_feedback:
            state[STATE_FEEDBACK] = tf.TensorSpec([None, None], tf.int32, name=STATE_FEEDBACK)
        self.rank_state = _signature(self._rank_state, {**state, **candidates, **users})
        steps = {HISTORY_ITEM_IDS: history[HISTORY_ITEM_IDS], HISTORY_QUERIES: history[HISTORY_QUERIES]}
        self.pretrain = _signature(self._pretrain, {**steps, **candidates}) if psu is not None else None

    def signatures(self) -> Dict[str, Callable]:
        """{signature key: concrete function} for ``tf.saved_model.save``."""
        ctr = self.ctr.get_concrete_function()
        out = {DEFAULT_SIGNATURE: ctr, CTR_SIGNATURE: ctr, RANK_SIGNATURE: self.rank.get_concrete_function(),
               EXAMPLES_SIGNATURE: self.ctr_examples.get_concrete_function(),
               CLASSIFY_SIGNATURE: self.ctr_classify.get_concrete_function(),
               ENCODE_ITEMS_SIGNATURE: self.encode_items.get_concrete_function(),
               ENCODE_HISTORY_SIGNATURE: self.encode_history.get_concrete_function(),
               RANK_STATE_SIGNATURE: self.rank_state.get_concrete_function()}
        if self.pretrain is not None:
            out[PRETRAIN_SIGNATURE] = self.pretrain.get_concrete_function()
        return out

    # ------------------------------------------------------------------------------------------ lookups
    def _item_index(self, ids):
        """Raw item ids [...] → item indices [...]: "" → PAD_INDEX, unknown → OOV_INDEX.

        Vocabulary lines are canonical ids, so an id found as sent needs no canonicalisation; only the misses
        (ids sent with stray whitespace, padding "", unknown ids) go through the regex and a second lookup.
        """
        direct = self.item_table.lookup(ids)
        missed = tf.where(tf.equal(direct, schema.OOV_INDEX))  # [P, rank]
        canonical = _canonical_ids(tf.gather_nd(ids, missed))
        retried = tf.where(tf.equal(canonical, ""), tf.constant(schema.PAD_INDEX, tf.int64),
                           self.item_table.lookup(canonical))
        return tf.tensor_scatter_nd_update(direct, missed, retried)

    def _queries(self, texts, with_tokens: bool = True):
        """Raw query text [...] → (query indices [...], token ids [..., T] or None).

        Each distinct text is normalized and looked up once (a 10^4-step history holds a few hundred distinct
        queries): "" → EMPTY_QUERY_INDEX; an unknown text → OOV_INDEX and its own tokens (first T, PAD after;
        unknown tokens → OOV_INDEX). Known texts get PAD tokens: the model encodes them by index.
        """
        unique, position = tf.unique(tf.reshape(texts, [-1]))
        normalized = schema.tf_normalize_query(unique)
        index_unique = tf.where(tf.equal(normalized, ""), tf.constant(schema.EMPTY_QUERY_INDEX, tf.int64),
                                self.query_table.lookup(normalized))
        flat_index = tf.gather(index_unique, position)
        index = tf.reshape(flat_index, tf.shape(texts))
        if not with_tokens:
            return index, None
        # The model reads tokens only where the query index is OOV (a known query is encoded by its index),
        # so only the unknown texts are tokenized and only their rows filled; every other row stays PAD.
        unknown_texts = tf.where(tf.equal(index_unique, schema.OOV_INDEX))  # [P_u, 1]
        tokens = self.token_table.lookup(schema.tf_tokenize(tf.gather_nd(normalized, unknown_texts)))  # [P_u, None]
        dense = tokens.to_tensor(default_value=schema.PAD_INDEX, shape=[None, self.query_length])
        slot = tf.scatter_nd(unknown_texts, tf.range(tf.shape(unknown_texts, out_type=tf.int64)[0]),
                             tf.shape(index_unique, out_type=tf.int64))
        unknown = tf.where(tf.equal(flat_index, schema.OOV_INDEX))  # [P, 1] positions of unknown texts
        size = tf.stack([tf.size(position, out_type=tf.int64), tf.constant(self.query_length, tf.int64)])
        flat = tf.cond(  # no unknown text (the common case): no scatter
            tf.size(unknown) > 0,
            lambda: tf.scatter_nd(unknown, tf.gather(dense, tf.gather(slot, tf.gather_nd(position, unknown))), size),
            lambda: tf.zeros(size, dense.dtype))
        shape = tf.concat([tf.shape(texts), [self.query_length]], 0)
        return index, tf.reshape(flat, shape)

    def _user_features(self, inputs, batch):
        """Raw user inputs [B] → their vocabulary indices: each user_<attr>, and user_id when the model has a
        user-id embedding ("" and unknown values → OOV)."""
        lookups = [(schema.user_attribute_feature(n), self.user_tables[n], schema.user_attribute_feature(n))
                   for n in self.user_attribute_names]
        if self.uses_user_id:
            lookups.append((USER_ID, self.user_id_table, schema.CTX_USER_INDEX))
        features = {}
        for key, table, feature in lookups:
            value = inputs[key]
            check = tf.debugging.assert_equal(
                tf.shape(value)[0], batch,
                message=f"{key}: batch size must equal the history's ({HISTORY_ITEM_IDS} or {STATE_ITEMS})")
            with tf.control_dependencies([check]):
                features[feature] = table.lookup(_canonical_ids(value))
        return features

    def _history_features(self, inputs, with_tokens: bool = True) -> Dict[str, tf.Tensor]:
        """Raw history [B, L] → the model's history features (indices, query tokens, history_length)."""
        items, queries = inputs[HISTORY_ITEM_IDS], inputs[HISTORY_QUERIES]
        feedback = inputs.get(HISTORY_FEEDBACK) if self.uses_feedback else None
        checks = [
            tf.debugging.assert_equal(tf.shape(items), tf.shape(queries), message=(
                f"{HISTORY_QUERIES} must have the shape of {HISTORY_ITEM_IDS} [batch, L] (\"\" = browsing step)")),
            tf.debugging.assert_less_equal(tf.shape(items)[1], self.max_history, message=(
                f"{HISTORY_ITEM_IDS}: history length L exceeds this export's max_history={self.max_history}; "
                "send the newest steps only")),
        ]
        with tf.control_dependencies(checks):
            items, queries = _at_least_one_step(items), _at_least_one_step(queries)
        if feedback is not None:
            check = tf.debugging.assert_equal(tf.shape(feedback)[:2], tf.shape(inputs[HISTORY_ITEM_IDS])[:2], message=(
                f"{HISTORY_FEEDBACK} must have the shape of {HISTORY_ITEM_IDS} [batch, L] (one feedback token per "
                "step, e.g. 'impression:r4'; \"\" = unknown)"))
            with tf.control_dependencies([check]):
                feedback = self.feedback_table.lookup(_at_least_one_step(feedback))
        query_index, query_tokens = self._queries(queries, with_tokens)
        return _step_features(self._item_index(items), query_index, query_tokens, feedback)

    def _candidates(self, items, queries, batch, item_name: str, query_name: str):
        """Raw candidate pairs [B, N] → (item indices, query indices, query token ids [B, N, T]), checked."""
        checks = [
            tf.debugging.assert_equal(tf.shape(items), tf.shape(queries),
                                      message=f"{query_name} must have the shape of {item_name} [batch, N]"),
            tf.debugging.assert_equal(tf.shape(items)[0], batch, message=(
                f"{item_name}: batch size must equal the history's ({HISTORY_ITEM_IDS} or {STATE_ITEMS})")),
            tf.debugging.assert_positive(tf.shape(items)[1], message=f"{item_name}: needs at least one candidate"),
            tf.debugging.assert_less_equal(tf.shape(items)[1], self.max_candidates, message=(
                f"{item_name}: number of candidates N exceeds this export's max_candidates={self.max_candidates}")),
        ]
        with tf.control_dependencies(checks):
            return (self._item_index(items),) + self._queries(queries)

    # ------------------------------------------------------------------------------------------ scoring
    def _score(self, inputs, items, queries, item_name: str, query_name: str, features=None):
        """score_pairs of [B, N] raw candidate pairs against each row's history: the raw history of ``inputs``, or
        the model's history ``features`` (``_state_features``)."""
        model = self._models.model
        if features is None:
            features = self._history_features(inputs)
        batch = tf.shape(features[schema.SEQ_HISTORY_ITEM])[0]
        features.update(self._user_features(inputs, batch))
        item_index, query_index, query_tokens = self._candidates(items, queries, batch, item_name, query_name)
        features[schema.TARGET_QUERY_TOKENS] = query_tokens
        return model.score_pairs(features, query_index, item_index, training=False)

    def _ctr(self, inputs):
        """Row format = ``rank`` with N = 1 per row (one traced model graph serves every CTR signature)."""
        candidates = {CANDIDATE_ITEM_IDS: inputs[TARGET_ITEM_ID][:, None],
                      CANDIDATE_QUERIES: inputs[TARGET_QUERY][:, None]}
        outputs = self.rank({**{k: v for k, v in inputs.items() if k not in (TARGET_ITEM_ID, TARGET_QUERY)},
                             **candidates})
        return {PROBABILITY: outputs[SCORES][:, 0], LOGIT: outputs[LOGITS][:, 0]}

    def _rank(self, inputs):
        outputs = self._score(inputs, inputs[CANDIDATE_ITEM_IDS], inputs[CANDIDATE_QUERIES],
                              CANDIDATE_ITEM_IDS, CANDIDATE_QUERIES)
        return {SCORES: outputs["probability"], LOGITS: outputs["logit"]}

    # ------------------------------------------------------------------------------------------ history state
    def _encode_history(self, inputs):
        """Raw history [B, L] → the history state: each step's item, query and feedback index (int32 [B, L]); an
        unknown query text gets index num_queries + p, p its slot among the row's unknown steps, whose token ids
        are ``history_state_query_tokens`` [B, P, T] (P = the most unknown steps of a row); the fingerprint [B]."""
        features = self._history_features(inputs)
        queries = features[schema.SEQ_HISTORY_QUERY]
        unknown = tf.equal(queries, schema.OOV_INDEX)  # [B, L]
        slot = tf.math.cumsum(tf.cast(unknown, tf.int64), axis=1, exclusive=True)
        where = tf.where(unknown)  # [P_all, 2]
        rows = tf.shape(queries, out_type=tf.int64)[0]
        width = tf.reduce_max(tf.concat([tf.reduce_sum(tf.cast(unknown, tf.int64), 1), [0]], 0))
        tokens = tf.scatter_nd(tf.stack([where[:, 0], tf.gather_nd(slot, where)], 1),
                               tf.gather_nd(features[schema.HISTORY_QUERY_TOKENS], where),
                               tf.stack([rows, width, tf.constant(self.query_length, tf.int64)]))
        outputs = {STATE_ITEMS: tf.cast(features[schema.SEQ_HISTORY_ITEM], tf.int32),
                   STATE_QUERIES: tf.cast(tf.where(unknown, self.num_queries + slot, queries), tf.int32),
                   STATE_QUERY_TOKENS: tf.cast(tokens, tf.int32),
                   STATE_FINGERPRINT: tf.fill([rows], tf.constant(self.fingerprint, tf.int64))}
        if self.uses_feedback:
            outputs[STATE_FEEDBACK] = tf.cast(features[schema.SEQ_HISTORY_FEEDBACK], tf.int32)
        return outputs

    def _state_features(self, inputs) -> Dict[str, tf.Tensor]:
        """A history state → the model's history features, exactly those ``_history_features`` gives for the raw
        history it was encoded from. Checked in the graph (INVALID_ARGUMENT naming the input)."""
        items, queries, tokens = inputs[STATE_ITEMS], inputs[STATE_QUERIES], inputs[STATE_QUERY_TOKENS]
        slots = tf.shape(tokens)[1]

        def in_range(name, value, size, what):
            return [tf.debugging.assert_non_negative(value, message=f"{name}: negative index; {what}"),
                    tf.debugging.assert_less(value, tf.cast(size, value.dtype), message=(
                        f"{name}: index out of range [0, {size}); {what}"))]

        again = "encode the history again with this export's encode_history signature"
        checks = [
            tf.debugging.assert_equal(inputs[STATE_FINGERPRINT], tf.constant(self.fingerprint, tf.int64), message=(
                f"{STATE_FINGERPRINT}: this history state was encoded by an export with other vocabularies (this "
                f"export's fingerprint is {self.fingerprint}); {again}")),
            tf.debugging.assert_equal(tf.shape(inputs[STATE_FINGERPRINT])[0], tf.shape(items)[0],
                                      message=f"{STATE_FINGERPRINT}: one value per row of {STATE_ITEMS}"),
            tf.debugging.assert_equal(tf.shape(queries), tf.shape(items),
                                      message=f"{STATE_QUERIES} must have the shape of {STATE_ITEMS} [batch, L]"),
            tf.debugging.assert_less_equal(tf.shape(items)[1], self.max_history, message=(
                f"{STATE_ITEMS}: history length L exceeds this export's max_history={self.max_history}")),
            tf.debugging.assert_equal(tf.shape(tokens)[0], tf.shape(items)[0],
                                      message=f"{STATE_QUERY_TOKENS}: batch size must equal that of {STATE_ITEMS}"),
            tf.debugging.assert_equal(tf.shape(tokens)[2], self.query_length, message=(
                f"{STATE_QUERY_TOKENS} must be [batch, P, {self.query_length}] (T = this export's "
                "max_query_tokens)")),
        ]
        checks += in_range(STATE_ITEMS, items, self.num_items, again)
        checks += in_range(STATE_QUERY_TOKENS, tokens, self.num_tokens, again)
        checks.append(tf.debugging.assert_non_negative(queries, message=f"{STATE_QUERIES}: negative index; {again}"))
        checks.append(tf.debugging.assert_less(queries, self.num_queries + slots, message=(
            f"{STATE_QUERIES}: index out of range [0, {self.num_queries} + P) (P = the unknown-query slots of "
            f"{STATE_QUERY_TOKENS}); {again}")))
        feedback = None
        if self.uses_feedback:
            feedback = inputs[STATE_FEEDBACK]
            checks.append(tf.debugging.assert_equal(tf.shape(feedback), tf.shape(items), message=(
                f"{STATE_FEEDBACK} must have the shape of {STATE_ITEMS} [batch, L]")))
            checks += in_range(STATE_FEEDBACK, feedback, self._models.model.feedback_embedding.input_dim, again)
        with tf.control_dependencies(checks):
            items = tf.cast(_at_least_one_step(items), tf.int64)
            queries = tf.cast(_at_least_one_step(queries), tf.int64)
        unknown = queries >= self.num_queries
        where = tf.where(unknown)  # [P_all, 2]

        def scattered():
            slot = tf.gather_nd(queries, where) - self.num_queries
            picked = tf.gather_nd(tf.cast(tokens, tf.int64), tf.stack([where[:, 0], slot], 1))
            return tf.scatter_nd(where, picked, tf.concat([tf.shape(queries, out_type=tf.int64),
                                                           [self.query_length]], 0))

        query_tokens = tf.cond(tf.size(where) > 0, scattered, lambda: tf.zeros(
            tf.concat([tf.shape(queries), [self.query_length]], 0), tf.int64))
        if feedback is not None:
            feedback = tf.cast(_at_least_one_step(feedback), tf.int64)
        return _step_features(items, tf.where(unknown, tf.constant(schema.OOV_INDEX, tf.int64), queries),
                              query_tokens, feedback)

    def _rank_state(self, inputs):
        """``rank`` from a history state (``encode_history``): the same scores, without the history's strings."""
        outputs = self._score(inputs, inputs[CANDIDATE_ITEM_IDS], inputs[CANDIDATE_QUERIES], CANDIDATE_ITEM_IDS,
                              CANDIDATE_QUERIES, features=self._state_features(inputs))
        return {SCORES: outputs["probability"], LOGITS: outputs["logit"]}

    def _parse_examples(self, serialized):
        """Serialized tf.train.Example [B] → the row-format raw inputs (history lists padded with "")."""
        spec = {
            HISTORY_ITEM_IDS: tf.io.RaggedFeature(tf.string),
            HISTORY_QUERIES: tf.io.RaggedFeature(tf.string),
            TARGET_ITEM_ID: tf.io.FixedLenFeature([], tf.string),
            TARGET_QUERY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        }
        for name in self.user_attribute_names:
            spec[schema.user_attribute_feature(name)] = tf.io.FixedLenFeature([], tf.string, default_value="")
        if self.uses_user_id:
            spec[USER_ID] = tf.io.FixedLenFeature([], tf.string, default_value="")
        lists = [HISTORY_ITEM_IDS, HISTORY_QUERIES] + ([HISTORY_FEEDBACK] if self.uses_feedback else [])
        for name in lists[2:]:
            spec[name] = tf.io.RaggedFeature(tf.string)
        parsed = tf.io.parse_example(serialized, spec)
        lengths = tf.concat([tf.cast(parsed[name].row_lengths(), tf.int64) for name in lists]
                            + [tf.zeros([1], tf.int64)], 0)
        shape = tf.stack([tf.shape(serialized, tf.int64)[0], tf.reduce_max(lengths)])
        for name in lists:
            parsed[name] = parsed[name].to_tensor("", shape=shape)
        return parsed

    def _ctr_examples(self, inputs):
        return {REGRESS_OUTPUTS: self.ctr(self._parse_examples(inputs[EXAMPLES]))[PROBABILITY]}

    def _ctr_classify(self, inputs):
        probability = self.ctr(self._parse_examples(inputs[EXAMPLES]))[PROBABILITY]
        classes = tf.broadcast_to(tf.constant([["0", "1"]]), [tf.shape(probability)[0], 2])
        return {SCORES: tf.stack([1.0 - probability, probability], axis=-1), CLASSES: classes}

    def _pretrain(self, inputs):
        """PSU next-pair scoring: the <EOS> representation s of each history against N candidate pairs."""
        psu = self._models.psu
        features = self._history_features(inputs, with_tokens=False)
        batch = tf.shape(features[schema.SEQ_HISTORY_ITEM])[0]
        item_index, query_index, _ = self._candidates(inputs[CANDIDATE_ITEM_IDS], inputs[CANDIDATE_QUERIES], batch,
                                                      CANDIDATE_ITEM_IDS, CANDIDATE_QUERIES)
        # The PSU reads the target and the negatives; the candidates are both (its gate is static, so
        # every candidate is merged with the same γ whichever is the "target").
        features.update({schema.CTX_TARGET_ITEM: item_index[:, 0], schema.CTX_TARGET_QUERY: query_index[:, 0],
                         schema.CTX_NEGATIVE_ITEMS: item_index, schema.CTX_NEGATIVE_QUERIES: query_index})
        outputs = psu(features, training=False)
        sequence, candidates = outputs["sequence_embedding"], outputs["negative_embeddings"]
        scores = tf.einsum("bd,bnd->bn", sequence, candidates) / psu.next_pair_task.temperature
        return {SEQUENCE_EMBEDDING: sequence, CANDIDATE_EMBEDDINGS: candidates, SCORES: scores}

    def _encode_items(self, inputs):
        model = self._models.model
        index = self._item_index(inputs[ITEM_IDS])
        channels = model.content.encode_items(index, training=False)
        outputs = {ITEM_INDEX: index}
        outputs.update({embedding_output(name): value for name, value in channels.items()})
        outputs.update(self._pq_outputs(index, channels))
        return outputs

    def _pq_outputs(self, item_index, channels) -> Dict[str, tf.Tensor]:
        """PQ codes of the items from the model's code tables (the ones its pq GSU reads), when it has fitted
        codebooks: ``pq_item_codes`` int32 [B, J_item, S] (item channels in ``pq_item_channels`` order of the
        export info, S sub-spaces; each code in [0, C))."""
        del channels
        if not self.pq_item_channels:
            return {}
        return {PQ_ITEM_CODES: self._models.model.pq.item_codes_of(item_index)}


# ---------------------------------------------------------------------------------------------------- versions
def _next_version(export_base: str) -> int:
    taken = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(export_base) if n.rstrip("/").isdigit()]
    return max(taken, default=0) + 1


def _set_method_names(saved_model_dir: str, method_names: Dict[str, str]) -> None:
    """Sets SignatureDef.method_name (tf.saved_model.save writes tensorflow/serving/predict for all).

    TF2 has no public argument for it; this edits saved_model.pb the way TensorFlow's own
    MethodNameUpdater does (that one is tf.compat.v1 only). fingerprint.pb is left as written, as there.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(saved_model_dir, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(path, "rb") as f:
        proto.ParseFromString(f.read())
    for meta_graph in proto.meta_graphs:
        for key, method in method_names.items():
            if key in meta_graph.signature_def:
                meta_graph.signature_def[key].method_name = method
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(proto.SerializeToString())


def _warmup_inputs(module: SeminarServingModule, item: str, query: str) -> Dict[str, Dict[str, np.ndarray]]:
    users = {schema.user_attribute_feature(n): np.array([b""], object) for n in module.user_attribute_names}
    if module.uses_user_id:
        users[USER_ID] = np.array([b""], object)
    history = {HISTORY_ITEM_IDS: np.array([[item.encode(), b""]], object),
               HISTORY_QUERIES: np.array([[query.encode(), b""]], object)}
    if module.uses_feedback:
        history[HISTORY_FEEDBACK] = np.array([[b"", b""]], object)
    candidates = {CANDIDATE_ITEM_IDS: np.array([[item.encode(), b"unknown-item"]], object),
                  CANDIDATE_QUERIES: np.array([[query.encode(), b""]], object)}
    # a valid history state of two browsing steps (an OOV item, then padding)
    state = {STATE_ITEMS: np.array([[schema.OOV_INDEX, schema.PAD_INDEX]], np.int32),
             STATE_QUERIES: np.array([[schema.EMPTY_QUERY_INDEX] * 2], np.int32),
             STATE_QUERY_TOKENS: np.zeros([1, 0, module.query_length], np.int32),
             STATE_FINGERPRINT: np.array([module.fingerprint], np.int64)}
    if module.uses_feedback:
        state[STATE_FEEDBACK] = np.zeros([1, 2], np.int32)
    return {
        CTR_SIGNATURE: {**history, TARGET_ITEM_ID: np.array([item.encode()], object),
                        TARGET_QUERY: np.array([query.encode()], object), **users},
        RANK_SIGNATURE: {**history, **candidates, **users},
        ENCODE_HISTORY_SIGNATURE: history,
        RANK_STATE_SIGNATURE: {**state, **candidates, **users},
    }


def _write_warmup(path: str, requests: Dict[str, Dict[str, np.ndarray]], model_name: str) -> None:
    """assets.extra/tf_serving_warmup_requests: PredictionLog records TF Serving replays on load."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=tf.string if value.dtype == object
                                                                   else None))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def _signature_summary(concrete_functions: Dict[str, Callable]) -> Dict[str, dict]:
    summary = {}
    for key, fn in concrete_functions.items():
        # Signature functions take one dict argument (``_signature``): its keys are the SignatureDef's inputs.
        args, kwargs = fn.structured_input_signature
        inputs = kwargs or (args[0] if len(args) == 1 and isinstance(args[0], dict) else {})
        outputs = fn.structured_outputs
        summary[key] = {
            "method_name": METHOD_NAMES.get(key, "tensorflow/serving/predict"),
            "inputs": {n: {"dtype": s.dtype.name, "shape": s.shape.as_list()} for n, s in sorted(inputs.items())},
            "outputs": {n: {"dtype": t.dtype.name, "shape": t.shape.as_list()} for n, t in sorted(outputs.items())},
        }
    return summary


def export_seminar(model, export_base: str, *, vocab_dir: str, metadata: schema.DatasetMetadata,
                   max_history: int, max_candidates: int = DEFAULT_MAX_CANDIDATES, psu=None,
                   model_name: str = "seminar", warmup_item: Optional[str] = None,
                   source: Optional[dict] = None, content_cache: bool = True) -> str:
    """Exports a built ``SeminarModel`` (and optionally its ``PSUModel``) as ``<export_base>/<version>/``.

    The version is the next integer after the existing ones. Written to ``<export_base>/.tmp-export-*``
    and renamed into place when complete. Returns the version directory.

    ``content_cache``: precompute every vocabulary item's and query's channels, before and after G_j, into the
    SavedModel (``SeminarModel.build_serving_cache``; 8·d bytes per item channel and query), so a request
    gathers its history's embeddings instead of running the content encoders over all L pairs. Same outputs.
    """
    start = time.time()
    tf.io.gfile.makedirs(export_base)
    content = getattr(model, "content", None)
    cache_bytes = model.build_serving_cache() if content_cache and content is not None else 0
    tmp = os.path.join(export_base, f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        module = SeminarServingModule(
            model, vocab_dir, metadata.user_attributes, max_history=max_history, max_candidates=max_candidates,
            query_length=metadata.max_query_tokens, psu=psu)
        signatures = module.signatures()
        tf.saved_model.save(module, tmp, signatures=signatures)
        _set_method_names(tmp, METHOD_NAMES)
        extra = os.path.join(tmp, "assets.extra")
        tf.io.gfile.makedirs(extra)
        info = {
            "model_name": model_name, "max_history": module.max_history, "max_candidates": module.max_candidates,
            "max_query_tokens": module.query_length, "user_attributes": module.user_attribute_names,
            "content_cache_bytes": cache_bytes, "history_state_fingerprint": module.fingerprint,
            "item_channels": module.item_channels, "signatures": _signature_summary(signatures),
            "gsu": getattr(model, "gsu_mode", "exact"), "pq_rerank": getattr(model, "pq_rerank", 1),
            "pq_item_channels": module.pq_item_channels,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source or {},
        }
        with tf.io.gfile.GFile(os.path.join(extra, EXPORT_INFO), "w") as f:
            f.write(json.dumps(info, indent=2, sort_keys=True))
        _write_warmup(os.path.join(extra, WARMUP_FILE), _warmup_inputs(module, warmup_item or "", ""), model_name)
        for _ in range(100):  # another exporter may take the same number between listing and renaming
            final = os.path.join(export_base, str(_next_version(export_base)))
            try:
                tf.io.gfile.rename(tmp, final, overwrite=False)
                break
            except (tf.errors.AlreadyExistsError, tf.errors.FailedPreconditionError, OSError):
                continue
        else:
            raise RuntimeError(f"could not rename {tmp} to a new version under {export_base}")
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        raise
    finally:
        if content is not None:
            model.clear_serving_cache()  # the in-memory model goes on without it (it would go stale when training)
    tf.get_logger().info("exported %s in %.1fs", final, time.time() - start)
    return final


# ---------------------------------------------------------------------------------------------------- runs
def load_psu(psu_dir: str, data_dir: Optional[str] = None, metadata: Optional[schema.DatasetMetadata] = None):
    """Rebuilds a PSU run's model from its config.json and best weights (tables included; no dataset is read:
    the shapes come from ``metadata``, else the run's copy of its dataset's metadata, else ``data_dir``'s)."""
    from seminar_tf import experiment, train
    from seminar_tf.data import reader
    from seminar_tf.models import builders

    metadata = metadata or reader.load_metadata(experiment.contract_dir(psu_dir, data_dir))
    preset = experiment.preset_of_run(psu_dir)
    psu = builders.build_psu(preset.model, metadata)
    psu(experiment.variables_batch(metadata, schema.PRETRAIN_DIR))
    train.load_weights(psu, psu_dir)
    return psu


def export_model(model_dir: str, export_base: str, *, data_dir: Optional[str] = None,
                 max_history: Optional[int] = None, max_candidates: int = DEFAULT_MAX_CANDIDATES,
                 psu_dir: Optional[str] = None, model_name: str = "seminar",
                 progress: Optional[Callable[[str], None]] = None, gsu: Optional[str] = None,
                 codebooks: Optional[str] = None, pq_rerank: Optional[int] = None,
                 content_cache: bool = True) -> str:
    """Exports a fine-tuned run (``seminar-tf finetune --model-dir RUN/ctr``) as the next version under
    ``export_base``; returns the version directory.

    ``max_history`` defaults to the run's training history length; ``psu_dir`` to the PSU run the
    fine-tuning started from (config.json ``init_from``), which adds the ``pretrain`` signature.
    ``gsu`` / ``codebooks`` / ``pq_rerank`` override the run's GSU (``experiment.load_model``): e.g. serve an
    exact-trained run with the pq_adc GSU and the codebooks of ``seminar-tf fit-codebooks``.
    """
    from seminar_tf import experiment
    from seminar_tf.data import reader

    model, preset, _ = experiment.load_model(model_dir, data_dir, gsu=gsu, codebooks=codebooks,
                                             pq_rerank=pq_rerank)
    data_dir = experiment.contract_dir(model_dir, data_dir)  # the vocabularies: the run's own copy by default
    metadata = reader.load_metadata(data_dir)
    if not psu_dir:
        psu_dir = experiment.read_run_config(model_dir).get("init_from")
        if psu_dir and not experiment.is_run(psu_dir):
            if progress:
                progress(f"export: the PSU run {psu_dir} this run started from is not there; exporting without the "
                         "pretrain signature (pass --psu-dir to add it)")
            psu_dir = None
    psu = load_psu(psu_dir, metadata=metadata) if psu_dir else None
    first_item = next((i for i in reader.load_vocabulary(data_dir, schema.ITEM_VOCAB)[len(schema.RESERVED):]), "")
    if progress:
        progress(f"export: {model_dir} -> {export_base} (pretrain signature: {'yes' if psu else 'no'})")
    path = export_seminar(
        model, export_base, vocab_dir=f"{data_dir.rstrip('/')}/{schema.VOCAB_DIR}", metadata=metadata,
        max_history=max_history or preset.build.max_history, max_candidates=max_candidates, psu=psu,
        model_name=model_name, warmup_item=first_item, content_cache=content_cache,
        source={"model_dir": model_dir, "psu_dir": psu_dir, "data_dir": data_dir, "preset": preset.name,
                "gsu": preset.model.gsu, "pq_rerank": preset.model.pq_rerank, "codebooks": codebooks})
    if progress:
        progress(f"export: wrote {path}")
    return path


# ---------------------------------------------------------------------------------------------------- demo
def sample_user(data_dir: str, max_history: int, num_candidates: int = 10, seed: int = 0):
    """A sample ranking request from a dataset's ctr/test split, as raw strings: (history [(item_id, query)]
    oldest first, candidates [(item_id, query)]: the sample's target and random other items under its query,
    user attributes {name: value})."""
    from seminar_tf.data import reader

    metadata = reader.load_metadata(data_dir)
    items = reader.load_vocabulary(data_dir, schema.ITEM_VOCAB)
    queries = reader.load_vocabulary(data_dir, schema.QUERY_VOCAB)
    example = next(iter(reader.make_dataset(data_dir, schema.CTR_DIR, "test", 1, metadata=metadata,
                                            max_history=max_history)))

    def query_text(index):
        return "" if index in (schema.PAD_INDEX, schema.EMPTY_QUERY_INDEX) else queries[index]

    length = int(example[schema.CTX_HISTORY_LENGTH][0])
    history = [(items[i], query_text(q)) for i, q in zip(example[schema.SEQ_HISTORY_ITEM][0].numpy()[:length],
                                                          example[schema.SEQ_HISTORY_QUERY][0].numpy()[:length])]
    if metadata.num_feedback:  # (item, query, feedback token) steps
        tokens = reader.load_vocabulary(data_dir, schema.FEEDBACK_VOCAB)
        feedback = example[schema.SEQ_HISTORY_FEEDBACK][0].numpy()[:length]
        history = [step + (tokens[f],) for step, f in zip(history, feedback)]
    target_item = int(example[schema.CTX_TARGET_ITEM][0])
    target_query = query_text(int(example[schema.CTX_TARGET_QUERY][0]))
    rng = np.random.default_rng(seed)
    others = [i for i in rng.permutation(np.arange(len(schema.RESERVED), len(items))) if i != target_item]
    candidates = [(items[i], target_query) for i in [target_item] + others[: num_candidates - 1]]
    user = {}
    for name in sorted(metadata.user_attributes):
        vocab = reader.load_vocabulary(data_dir, schema.user_attribute_vocab(name))
        user[name] = vocab[int(example[schema.user_attribute_feature(name)][0])]
    user["id"] = example[schema.CTX_USER_ID][0].numpy().decode("utf-8")  # the user_id input, where the model has it
    return history, candidates, user


def rank_sample_user(export_base: str, data_dir: str, *, model_name: str = "seminar", num_candidates: int = 10,
                     progress: Optional[Callable[[str], None]] = None) -> str:
    """The end of ``make demo``: starts the local server on ``export_base`` (free ports on 127.0.0.1), ranks
    a sample user's candidates through the official gRPC stub (``rank`` signature), stops the server and
    returns the ranking as text."""
    from serving import server as server_lib
    from serving.client import PredictClient

    with tf.io.gfile.GFile(os.path.join(export_base, str(_latest_version(export_base)), "assets.extra",
                                        EXPORT_INFO)) as f:
        max_history = json.load(f)["max_history"]
    history, candidates, user = sample_user(data_dir, max_history, num_candidates)
    server = server_lib.serve(model_name, export_base, port=0, rest_port=None)
    try:
        if progress:
            progress(f"serve: {model_name} version {server.manager.current_version} on 127.0.0.1:{server.grpc_port}")
        with PredictClient(f"127.0.0.1:{server.grpc_port}", model_name) as client:
            inputs = client.user_inputs()
            user = {k: v for k, v in user.items() if schema.user_attribute_feature(k) in inputs}
            ranked = client.rank(history, candidates, user)
    finally:
        server.stop()
    last = "; ".join(f"{step[0]} [{step[1]}]" if step[1] else step[0] for step in history[-3:])
    lines = [f"sample user: {len(history)} history steps (newest: {last}); attributes {user}",
             "rank  score     item_id  query"]
    for position, (index, score) in enumerate(ranked, 1):
        item, query = candidates[index]
        marker = "  <- the user's actual target" if index == 0 else ""
        lines.append(f"{position:>4}  {score:.4f}  {item:>7}  {query}{marker}")
    return "\n".join(lines)


def _latest_version(export_base: str) -> int:
    versions = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(export_base) if n.rstrip("/").isdigit()
                and tf.io.gfile.exists(os.path.join(export_base, n.rstrip("/"), "saved_model.pb"))]
    if not versions:
        raise FileNotFoundError(f"no complete version under {export_base}")
    return max(versions)


# ---------------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    """Registers ``seminar-tf export`` (handler(args, extra) -> int, as every seminar_tf.cli command); the flags are
    ``seminar_tf.cli_args``' (seminar_tf.cli registers them without importing this module)."""
    add_export_parser(subparsers).set_defaults(handler=_run_export, takes_extra=False)


def _run_export(args, extra) -> int:
    import sys

    def progress(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    path = export_model(args.model_dir, args.export_base, data_dir=args.data, max_history=args.max_history,
                        max_candidates=args.max_candidates, psu_dir=args.psu_dir, model_name=args.model_name,
                        progress=progress, gsu=args.gsu, codebooks=args.codebooks, pq_rerank=args.pq_rerank,
                        content_cache=not args.no_content_cache)
    print(path)
    return 0
