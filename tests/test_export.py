"""SavedModel export (seminar_tf/export.py): versioned atomic export, raw-string signatures equal to the
in-memory model, in-graph limits, saved_model_cli show/run on the export."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf import config, experiment, export, schema
from seminar_tf.data import reader
from serving import server

pytestmark = pytest.mark.slow  # end to end: trains and exports (make test-quick skips it)

MAX_CANDIDATES = 12
_DATA = []  # the module's dataset directory, for helpers that need its metadata
SIGNATURES = ("serving_default", "ctr", "rank", "ctr_examples", "ctr_classify", "pretrain", "encode_items",
              "encode_history", "rank_state")


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset_dir):
    """A PSU run and a SEMINAR run fine-tuned from it (test preset, one short epoch each)."""
    preset = config.get_preset("test")
    preset.pretrain = dataclasses.replace(preset.pretrain, epochs=1, steps_per_epoch=2, validation_steps=1)
    preset.finetune = dataclasses.replace(preset.finetune, epochs=1, steps_per_epoch=2, validation_steps=1)
    root = tmp_path_factory.mktemp("run")
    psu_dir, ctr_dir = str(root / "psu"), str(root / "ctr")
    _DATA[:] = [dataset_dir]
    experiment.pretrain(dataset_dir, psu_dir, preset)
    experiment.finetune(dataset_dir, ctr_dir, preset, init_from=psu_dir)
    return {"psu": psu_dir, "ctr": ctr_dir, "data": dataset_dir, "preset": preset}


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """export_model into a base that already holds an incomplete version "3" and a stale temporary dir."""
    base = tmp_path_factory.mktemp("export") / "seminar"
    os.makedirs(base / "3")
    os.makedirs(base / f"{export.TMP_PREFIX}stale")
    path = export.export_model(run["ctr"], str(base), max_candidates=MAX_CANDIDATES)
    return {"path": path, "base": str(base), "loaded": tf.saved_model.load(path)}


@pytest.fixture(scope="module")
def model(run):
    return experiment.load_model(run["ctr"])[0]


@pytest.fixture(scope="module")
def vocab(run):
    metadata = reader.load_metadata(run["data"])
    words = {"items": reader.load_vocabulary(run["data"], schema.ITEM_VOCAB),
             "queries": reader.load_vocabulary(run["data"], schema.QUERY_VOCAB),
             "tokens": reader.load_vocabulary(run["data"], schema.TOKEN_VOCAB),
             "metadata": metadata}
    for name in metadata.user_attributes:
        words[name] = reader.load_vocabulary(run["data"], schema.user_attribute_vocab(name))
    return words


@pytest.fixture(scope="module")
def batch(run):
    return next(iter(reader.make_dataset(run["data"], schema.CTR_DIR, "test", 8)))


# ---------------------------------------------------------------------------------------------------- helpers
def _item_text(vocab, index):
    return "" if index == schema.PAD_INDEX else vocab["items"][index]


def _query_text(vocab, index):
    return "" if index in (schema.PAD_INDEX, schema.EMPTY_QUERY_INDEX) else vocab["queries"][index]


def raw_inputs(batch, vocab) -> dict:
    """The ctr signature's raw inputs for a reader batch (index → vocabulary string; PAD → "")."""
    items = batch[schema.SEQ_HISTORY_ITEM].numpy()
    queries = batch[schema.SEQ_HISTORY_QUERY].numpy()
    out = {
        export.HISTORY_ITEM_IDS: np.vectorize(lambda i: _item_text(vocab, i))(items).astype(object),
        export.HISTORY_QUERIES: np.vectorize(lambda i: _query_text(vocab, i))(queries).astype(object),
        export.TARGET_ITEM_ID: np.array([_item_text(vocab, i) for i in batch[schema.CTX_TARGET_ITEM].numpy()], object),
        export.TARGET_QUERY: np.array([_query_text(vocab, i) for i in batch[schema.CTX_TARGET_QUERY].numpy()], object),
    }
    for name in vocab["metadata"].user_attributes:
        key = schema.user_attribute_feature(name)
        out[key] = np.array([vocab[name][i] for i in batch[key].numpy()], object)
    if vocab["metadata"].num_users:  # the raw user id; the export maps it through vocab/users.txt
        out[export.USER_ID] = np.array([u.decode() for u in batch[schema.CTX_USER_ID].numpy()], object)
    return out


def python_tokens(texts, vocab) -> np.ndarray:
    """Reference tokenization in Python (schema.normalize_query + schema.tokenize): [..., T] token ids."""
    index = {t: i for i, t in enumerate(vocab["tokens"])}
    length = vocab["metadata"].max_query_tokens
    texts = np.asarray(texts, object)

    def one(text):
        ids = [index.get(t, schema.OOV_INDEX) for t in schema.tokenize(schema.normalize_query(text))[:length]]
        return ids + [schema.PAD_INDEX] * (length - len(ids))

    return np.array([one(t) for t in texts.reshape(-1)], np.int64).reshape(texts.shape + (length,))


def reference_features(batch, raw, vocab) -> dict:
    features = dict(batch)
    features[schema.HISTORY_QUERY_TOKENS] = tf.constant(python_tokens(raw[export.HISTORY_QUERIES], vocab))
    features[schema.TARGET_QUERY_TOKENS] = tf.constant(python_tokens(raw[export.TARGET_QUERY], vocab))
    return features


def call(loaded, signature, inputs):
    fn = loaded.signatures[signature]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v, tf.string) for k, v in inputs.items()}).items()}


# ---------------------------------------------------------------------------------------------------- export
def test_export_is_the_next_version_renamed_into_place(exported, run):
    base = exported["base"]
    assert os.path.basename(exported["path"]) == "4"  # after the (incomplete) "3": a number is never reused
    assert server.complete_versions(base) == [4]  # "3" has no saved_model.pb
    leftovers = sorted(n for n in os.listdir(base) if n.startswith(export.TMP_PREFIX))
    assert leftovers == [f"{export.TMP_PREFIX}stale"]  # ours was renamed, not left behind
    assets = sorted(os.listdir(os.path.join(exported["path"], "assets")))
    users = reader.load_metadata(run["data"]).user_attributes
    assert assets == sorted([schema.ITEM_VOCAB, schema.QUERY_VOCAB, schema.TOKEN_VOCAB, schema.USER_VOCAB]
                            + [schema.user_attribute_vocab(n) for n in users])  # user ids: the model has them
    with open(os.path.join(exported["path"], "assets.extra", export.EXPORT_INFO)) as f:
        info = json.load(f)
    assert info["max_history"] == run["preset"].build.max_history and info["max_candidates"] == MAX_CANDIDATES
    assert set(info["signatures"]) == set(SIGNATURES)
    assert info["signatures"]["ctr_examples"]["method_name"] == "tensorflow/serving/regress"
    assert info["source"]["psu_dir"] == run["psu"]  # taken from the run's init_from
    assert set(exported["loaded"].signatures) == set(SIGNATURES)


def test_failed_export_leaves_no_version_and_no_temporary_directory(tmp_path, monkeypatch, vocab):
    class Module:
        def __init__(self, *args, **kwargs):
            self.user_attribute_names, self.item_channels, self.max_history, self.max_candidates = [], [], 4, 4
            self.query_length = 8

        def signatures(self):
            return {}

    def broken_save(obj, path, signatures=None):
        os.makedirs(path)
        with open(os.path.join(path, "saved_model.pb"), "w") as f:
            f.write("partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "SeminarServingModule", Module)
    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    base = tmp_path / "base"
    with pytest.raises(OSError, match="disk full"):
        export.export_seminar(None, str(base), vocab_dir="unused", metadata=vocab["metadata"], max_history=4)
    assert os.listdir(base) == []


def test_a_run_copied_away_from_its_dataset_reloads_fits_codebooks_exports_and_evaluates(
        run, exported, batch, vocab, tmp_path):
    """Runs keep their dataset's contract (metadata, stats, vocabularies) and their tables are weights: copied away,
    with the dataset they recorded gone, they reload, fit codebooks and export; evaluate then needs --data."""
    import shutil

    from seminar_tf import pq_runs, quantization

    for stage in ("psu", "ctr"):
        assert sorted(os.listdir(os.path.join(run[stage], experiment.RUN_DATASET_DIR))) == sorted(
            [schema.METADATA_FILE, schema.STATS_FILE, schema.VOCAB_DIR])
        shutil.copytree(run[stage], tmp_path / stage)
        with open(tmp_path / stage / "config.json") as f:
            raw = json.load(f)
        raw["data"] = str(tmp_path / "gone")  # the dataset the run was trained on is not there any more
        if stage == "ctr":
            raw["init_from"] = str(tmp_path / "psu")
        with open(tmp_path / stage / "config.json", "w") as f:
            json.dump(raw, f)
    ctr, psu = str(tmp_path / "ctr"), str(tmp_path / "psu")

    moved = experiment.load_model(ctr)[0]
    original = experiment.load_model(run["ctr"], run["data"])[0]
    np.testing.assert_allclose(moved(batch)["probability"].numpy(), original(batch)["probability"].numpy(),
                               rtol=1e-6, atol=1e-7)

    summary = pq_runs.fit_run(psu, quantization.CodebookConfig(num_subspaces=2, num_centroids=4, iterations=2))
    assert os.path.exists(summary["codebooks"]) and summary["num_items"] == vocab["metadata"].num_items

    path = export.export_model(ctr, str(tmp_path / "export"), max_candidates=MAX_CANDIDATES)
    loaded = tf.saved_model.load(path)
    assert set(SIGNATURES) <= set(loaded.signatures)  # the PSU copy beside it gives the pretrain signature
    raw = raw_inputs(batch, vocab)
    np.testing.assert_allclose(call(loaded, "ctr", raw)["probability"],
                               call(exported["loaded"], "ctr", raw)["probability"], rtol=1e-6, atol=1e-7)

    shutil.rmtree(psu)  # the PSU run it started from gone too: the export goes on without the pretrain signature
    notes = []
    path = export.export_model(ctr, str(tmp_path / "export"), max_candidates=MAX_CANDIDATES, progress=notes.append)
    assert "pretrain" not in tf.saved_model.load(path).signatures
    assert any("without the pretrain signature" in n for n in notes)

    with pytest.raises(FileNotFoundError, match="--data"):
        experiment.evaluate(ctr)
    shutil.copytree(run["data"], tmp_path / "moved")  # the dataset, now somewhere else: evaluate reads it there
    metrics = experiment.evaluate(ctr, str(tmp_path / "moved"), out_dir=str(tmp_path / "eval"), num_negatives=5)
    original = experiment.evaluate(run["ctr"], run["data"], out_dir=str(tmp_path / "eval0"), num_negatives=5)
    assert metrics["model"]["auc"] == pytest.approx(original["model"]["auc"], abs=1e-6)
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((tmp_path / "ctr" / experiment.RUN_DATASET_DIR / schema.METADATA_FILE).read_text())
    meta["num_items"] += 1
    (other / schema.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_items"):
        experiment.load_model(ctr, str(other))


# ---------------------------------------------------------------------------------------------------- values
def test_ctr_after_reload_equals_the_in_memory_model(exported, model, batch, vocab):
    raw = raw_inputs(batch, vocab)
    got = call(exported["loaded"], "ctr", raw)
    want = model(reference_features(batch, raw, vocab), training=False)
    np.testing.assert_allclose(got["probability"], want["probability"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["logit"], want["logit"].numpy(), rtol=1e-5, atol=1e-5)
    assert np.all((got["probability"] > 0) & (got["probability"] < 1))
    default = call(exported["loaded"], "serving_default", raw)
    np.testing.assert_array_equal(default["probability"], got["probability"])
    # Known queries: the in-graph tokens give what the query-table lookup gives (rows without OOV queries).
    plain = model(batch, training=False)["probability"].numpy()
    known = ~np.any(batch[schema.SEQ_HISTORY_QUERY].numpy() == schema.OOV_INDEX, axis=1) & (
        batch[schema.CTX_TARGET_QUERY].numpy() != schema.OOV_INDEX)
    assert known.sum() >= 1
    np.testing.assert_allclose(got["probability"][known], plain[known], rtol=1e-5, atol=1e-6)


def test_rank_scores_n_candidates_against_one_history(exported, model, batch, vocab):
    raw = raw_inputs(batch, vocab)
    n = len(raw[export.TARGET_ITEM_ID])
    inputs = {export.HISTORY_ITEM_IDS: raw[export.HISTORY_ITEM_IDS][:1],
              export.HISTORY_QUERIES: raw[export.HISTORY_QUERIES][:1],
              export.CANDIDATE_ITEM_IDS: raw[export.TARGET_ITEM_ID][None, :],
              export.CANDIDATE_QUERIES: raw[export.TARGET_QUERY][None, :]}
    inputs.update({k: v[:1] for k, v in raw.items() if k.startswith(schema.USER_ATTRIBUTE_PREFIX)})
    got = call(exported["loaded"], "rank", inputs)
    assert got["scores"].shape == (1, n) and got["logits"].shape == (1, n)
    features = {k: v[:1] for k, v in reference_features(batch, raw, vocab).items()}
    features[schema.TARGET_QUERY_TOKENS] = tf.constant(python_tokens(raw[export.TARGET_QUERY], vocab)[None])
    want = model.score_pairs(features, batch[schema.CTX_TARGET_QUERY][None, :], batch[schema.CTX_TARGET_ITEM][None, :],
                             training=False)["probability"].numpy()
    np.testing.assert_allclose(got["scores"], want, rtol=1e-5, atol=1e-6)
    # Candidate 0 is row 0's own target: the same number as the row-format signature.
    ctr = call(exported["loaded"], "ctr", {k: v[:1] for k, v in raw.items()})
    np.testing.assert_allclose(got["scores"][0, 0], ctr["probability"][0], rtol=1e-5)


def _rank_and_state_inputs(raw, rows):
    """rank inputs for the first ``rows`` histories of a batch against every target of the batch as candidates,
    with unknown query text at a few steps (row 0: two distinct texts, one twice; row 1: one)."""
    n = len(raw[export.TARGET_ITEM_ID])
    history = {export.HISTORY_ITEM_IDS: raw[export.HISTORY_ITEM_IDS][:rows].copy(),
               export.HISTORY_QUERIES: raw[export.HISTORY_QUERIES][:rows].copy()}
    history[export.HISTORY_QUERIES][0, :3] = ["never seen words", "another unseen text", "never seen words"]
    if rows > 1:
        history[export.HISTORY_QUERIES][1, 1] = "unheard of phrase"
    candidates = {export.CANDIDATE_ITEM_IDS: np.repeat(raw[export.TARGET_ITEM_ID][None, :], rows, axis=0),
                  export.CANDIDATE_QUERIES: np.repeat(raw[export.TARGET_QUERY][None, :], rows, axis=0)}
    targets = (export.TARGET_ITEM_ID, export.TARGET_QUERY)
    users = {k: v[:rows] for k, v in raw.items() if v.ndim == 1 and k not in targets}
    assert candidates[export.CANDIDATE_ITEM_IDS].shape == (rows, n)
    return history, candidates, users


def _encode_history(loaded, history):
    fn = loaded.signatures[export.ENCODE_HISTORY_SIGNATURE]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v, tf.string) for k, v in history.items()}).items()}


def _rank_state(loaded, state, candidates, users):
    fn = loaded.signatures[export.RANK_STATE_SIGNATURE]
    inputs = {k: tf.constant(v) for k, v in state.items()}
    inputs.update({k: tf.constant(v, tf.string) for k, v in {**candidates, **users}.items()})
    return {k: v.numpy() for k, v in fn(**inputs).items()}


def test_rank_state_gives_the_scores_of_rank(exported, batch, vocab):
    raw = raw_inputs(batch, vocab)
    history, candidates, users = _rank_and_state_inputs(raw, rows=3)
    loaded = exported["loaded"]
    want = call(loaded, "rank", {**history, **candidates, **users})
    state = _encode_history(loaded, history)
    length = history[export.HISTORY_ITEM_IDS].shape[1]
    assert state[export.STATE_ITEMS].shape == (3, length) and state[export.STATE_ITEMS].dtype == np.int32
    assert state[export.STATE_QUERIES].shape == (3, length)
    # one token slot per unknown step of a row: row 0 has 3, row 1 one, row 2 none
    assert state[export.STATE_QUERY_TOKENS].shape == (3, 3, vocab["metadata"].max_query_tokens)
    num_queries = len(vocab["queries"])
    assert state[export.STATE_QUERIES][0, :3].tolist() == [num_queries, num_queries + 1, num_queries + 2]
    np.testing.assert_array_equal(state[export.STATE_QUERY_TOKENS][0, 0], python_tokens(["never seen words"],
                                                                                          vocab)[0])
    assert np.all(state[export.STATE_QUERIES][2] < num_queries) and not state[export.STATE_QUERY_TOKENS][2].any()
    assert len(set(state[export.STATE_FINGERPRINT].tolist())) == 1
    got = _rank_state(loaded, state, candidates, users)
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-6, atol=1e-6)
    # a state row stands alone: row 1's state ranks as row 1 of the batch did
    alone = _rank_state(loaded, {k: v[1:2] for k, v in state.items()}, {k: v[1:2] for k, v in candidates.items()},
                        {k: v[1:2] for k, v in users.items()})
    np.testing.assert_allclose(alone["scores"], want["scores"][1:2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change, names", [
    (lambda s: {export.STATE_FINGERPRINT: s[export.STATE_FINGERPRINT] + 1}, ["history_state_fingerprint",
                                                                            "other vocabularies", "encode_history"]),
    (lambda s: {export.STATE_QUERIES: s[export.STATE_QUERIES][:, :-1]}, ["history_state_queries", "shape"]),
    (lambda s: {export.STATE_ITEMS: s[export.STATE_ITEMS] + 10 ** 6}, ["history_state_items", "out of range"]),
    (lambda s: {export.STATE_QUERIES: s[export.STATE_QUERIES] * 0 + 10 ** 6}, ["history_state_queries",
                                                                               "out of range"]),
    (lambda s: {export.STATE_QUERY_TOKENS: s[export.STATE_QUERY_TOKENS][:, :, :2]}, ["history_state_query_tokens",
                                                                                     "max_query_tokens"]),
    (lambda s: {export.STATE_ITEMS: np.zeros([1, 65], np.int32), export.STATE_QUERIES: np.zeros([1, 65], np.int32)},
     ["history_state_items", "max_history=64"]),
])
def test_a_wrong_state_fails_with_invalid_argument_naming_the_input(exported, batch, vocab, change, names):
    raw = raw_inputs(batch, vocab)
    history, candidates, users = _rank_and_state_inputs(raw, rows=1)
    state = _encode_history(exported["loaded"], history)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _rank_state(exported["loaded"], {**state, **change(state)}, candidates, users)
    for name in names:
        assert name in info.value.message


def test_warmup_requests_cover_every_ranking_signature_and_run(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(exported["path"], "assets.extra", export.WARMUP_FILE)
    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        requests.append(log.predict_log.request)
    assert [r.model_spec.signature_name for r in requests] == ["ctr", "rank", "encode_history", "rank_state"]
    for request in requests:  # each one runs on the export (TF Serving fails a load whose warmup fails)
        fn = exported["loaded"].signatures[request.model_spec.signature_name]
        outputs = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
        assert all(np.all(np.isfinite(v.numpy())) for v in outputs.values() if v.dtype.is_floating)


def test_examples_signatures_equal_ctr_and_padding_is_masked(exported, batch, vocab):
    raw = raw_inputs(batch, vocab)
    lengths = batch[schema.CTX_HISTORY_LENGTH].numpy()
    examples = []
    for row in range(len(lengths)):
        features = {export.HISTORY_ITEM_IDS: [v.encode() for v in raw[export.HISTORY_ITEM_IDS][row][:lengths[row]]],
                    export.HISTORY_QUERIES: [v.encode() for v in raw[export.HISTORY_QUERIES][row][:lengths[row]]]}
        for key in raw:
            if raw[key].ndim == 1:
                features[key] = [raw[key][row].encode()]
        examples.append(tf.train.Example(features=tf.train.Features(feature={
            k: tf.train.Feature(bytes_list=tf.train.BytesList(value=v)) for k, v in features.items()}))
            .SerializeToString())
    want = call(exported["loaded"], "ctr", raw)["probability"]  # histories right-padded with "" to max_history
    regress = call(exported["loaded"], "ctr_examples", {export.EXAMPLES: np.array(examples, object)})
    np.testing.assert_allclose(regress["outputs"], want, rtol=1e-5, atol=1e-6)
    classify = call(exported["loaded"], "ctr_classify", {export.EXAMPLES: np.array(examples, object)})
    np.testing.assert_allclose(classify["scores"][:, 1], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(classify["scores"].sum(axis=1), 1.0, rtol=1e-6)
    assert classify["classes"].tolist() == [[b"0", b"1"]] * len(examples)


def test_raw_text_is_normalized_and_unseen_queries_keep_their_words(exported, batch, vocab):
    raw = {k: v[:1] for k, v in raw_inputs(batch, vocab).items()}
    query = next(q for q in vocab["queries"][len(schema.QUERY_RESERVED):]
                 if len(q.split()) >= 2 and " ".join(reversed(q.split())) not in vocab["queries"])

    def score(target_query):
        return call(exported["loaded"], "ctr", {**raw, export.TARGET_QUERY: np.array([target_query], object)})[
            "probability"][0]

    base = score(query)
    assert score("  " + query.upper().replace(" ", " \t ") + " ") == pytest.approx(base, rel=1e-6)
    assert score(" ".join(reversed(query.split()))) == pytest.approx(base, rel=1e-6)  # same words, unseen text
    assert score("") != pytest.approx(base, rel=1e-4)


def test_unknown_ids_map_to_oov(exported, model, vocab):
    ids = np.array([vocab["items"][2], "no-such-item", "", vocab["items"][3]], object)
    got = call(exported["loaded"], "encode_items", {export.ITEM_IDS: ids})
    np.testing.assert_array_equal(got[export.ITEM_INDEX], [2, schema.OOV_INDEX, schema.PAD_INDEX, 3])
    want = model.content.encode_items(tf.constant([2, 1, 0, 3]))
    assert {export.embedding_output(c) for c in want} | {export.ITEM_INDEX} == set(got)
    for channel, value in want.items():
        np.testing.assert_allclose(got[export.embedding_output(channel)], value.numpy(), rtol=1e-5, atol=1e-6)
        assert np.all(got[export.embedding_output(channel)][1:3] == 0.0)  # OOV/padding rows carry no content


def test_pretrain_signature_equals_the_psu_model(exported, run, batch, vocab):
    psu = export.load_psu(run["psu"], run["data"])
    raw = raw_inputs(batch, vocab)
    inputs = {export.HISTORY_ITEM_IDS: raw[export.HISTORY_ITEM_IDS],
              export.HISTORY_QUERIES: raw[export.HISTORY_QUERIES],
              export.CANDIDATE_ITEM_IDS: np.stack([raw[export.TARGET_ITEM_ID]] * 3, axis=1),
              export.CANDIDATE_QUERIES: np.stack([raw[export.TARGET_QUERY]] * 3, axis=1)}
    got = call(exported["loaded"], "pretrain", inputs)
    items = tf.stack([batch[schema.CTX_TARGET_ITEM]] * 3, axis=1)
    queries = tf.stack([batch[schema.CTX_TARGET_QUERY]] * 3, axis=1)
    outputs = psu({**batch, schema.CTX_NEGATIVE_ITEMS: items, schema.CTX_NEGATIVE_QUERIES: queries}, training=False)
    np.testing.assert_allclose(got["sequence_embedding"], outputs["sequence_embedding"].numpy(), rtol=1e-5, atol=1e-5)
    scores = tf.einsum("bd,bnd->bn", outputs["sequence_embedding"], outputs["negative_embeddings"]).numpy()
    np.testing.assert_allclose(got["scores"], scores / run["preset"].model.next_pair_temperature, rtol=1e-4, atol=1e-4)
    assert got["candidate_embeddings"].shape == (len(items), 3, run["preset"].model.dim)


# ---------------------------------------------------------------------------------------------------- limits
def _rank_inputs(length, n, users=("",)):
    history = np.array([[f"i{j}" for j in range(length)]], object).reshape(1, length)
    inputs = {export.HISTORY_ITEM_IDS: history, export.HISTORY_QUERIES: np.full(history.shape, "", object),
              export.CANDIDATE_ITEM_IDS: np.array([["i1"] * n], object).reshape(1, n),
              export.CANDIDATE_QUERIES: np.array([[""] * n], object).reshape(1, n)}
    metadata = reader.load_metadata(_DATA[0])
    inputs.update({schema.user_attribute_feature(name): np.array(list(users), object)
                   for name in metadata.user_attributes})
    if metadata.num_users:
        inputs[export.USER_ID] = np.array(list(users), object)
    return inputs


@pytest.mark.parametrize("change, names", [
    (dict(length=65), ["history_item_ids", "max_history=64"]),
    (dict(n=MAX_CANDIDATES + 1), ["candidate_item_ids", f"max_candidates={MAX_CANDIDATES}"]),
    (dict(n=0), ["candidate_item_ids", "at least one candidate"]),
    (dict(users=("", "")), ["user_", "batch size"]),
])
def test_limits_fail_with_invalid_argument_naming_the_input(exported, change, names):
    inputs = _rank_inputs(**{"length": 5, "n": 3, **change})
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        call(exported["loaded"], "rank", inputs)
    for name in names:
        assert name in info.value.message


def test_mismatched_history_shapes_and_empty_history(exported):
    inputs = _rank_inputs(5, 3)
    inputs[export.HISTORY_QUERIES] = inputs[export.HISTORY_QUERIES][:, :4]
    with pytest.raises(tf.errors.InvalidArgumentError, match="history_queries"):
        call(exported["loaded"], "rank", inputs)
    at_limit = call(exported["loaded"], "rank", _rank_inputs(64, MAX_CANDIDATES))["scores"]
    assert at_limit.shape == (1, MAX_CANDIDATES) and np.all(np.isfinite(at_limit))
    empty = call(exported["loaded"], "rank", _rank_inputs(0, 3))["scores"]
    padding_only = _rank_inputs(1, 3)
    padding_only[export.HISTORY_ITEM_IDS] = np.array([[""]], object)
    np.testing.assert_allclose(empty, call(exported["loaded"], "rank", padding_only)["scores"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- CLI tools
def _saved_model_cli():
    return os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def test_saved_model_cli_show_lists_every_signature(exported, vocab):
    out = subprocess.run([_saved_model_cli(), "show", "--dir", exported["path"], "--all"], capture_output=True,
                         text=True, timeout=240, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    blocks = {}
    for block in text.split("signature_def['")[1:]:
        blocks[block.split("'")[0]] = block
    assert set(SIGNATURES) <= set(blocks)
    expected = {
        "ctr": (["history_item_ids", "history_queries", "target_item_id", "target_query"]
                + [schema.user_attribute_feature(n) for n in vocab["metadata"].user_attributes],
                ["logit", "probability"], "tensorflow/serving/predict"),
        "rank": (["candidate_item_ids", "candidate_queries", "history_item_ids", "history_queries"],
                 ["logits", "scores"], "tensorflow/serving/predict"),
        "ctr_examples": (["inputs"], ["outputs"], "tensorflow/serving/regress"),
        "ctr_classify": (["inputs"], ["classes", "scores"], "tensorflow/serving/classify"),
        "pretrain": (["candidate_item_ids", "history_item_ids"], ["candidate_embeddings", "scores",
                                                                  "sequence_embedding"], "tensorflow/serving/predict"),
        "encode_items": (["item_ids"], ["item_index", "text_embedding", "image_embedding", "attributes_embedding"],
                         "tensorflow/serving/predict"),
    }
    for name, (inputs, outputs, method) in expected.items():
        block = blocks[name]
        for key in inputs:
            assert f"inputs['{key}'] tensor_info:\n        dtype: DT_STRING" in block, (name, key)
        for key in outputs:
            assert f"outputs['{key}']" in block, (name, key)
        assert f"Method name is: {method}" in block
    assert "shape: (-1, -1)\n        name: rank_history_item_ids" in blocks["rank"]


def test_saved_model_cli_run_ctr(exported, batch, vocab, tmp_path):
    raw = {k: v[:2] for k, v in raw_inputs(batch, vocab).items()}
    npz = tmp_path / "ctr.npz"
    np.savez(npz, **{k: np.array([[s.encode() for s in row] for row in v]) if v.ndim == 2
                     else np.array([s.encode() for s in v]) for k, v in raw.items()})
    spec = ";".join(f"{k}={npz}[{k}]" for k in raw)
    out = subprocess.run([_saved_model_cli(), "run", "--dir", exported["path"], "--tag_set", "serve",
                          "--signature_def", "ctr", "--inputs", spec], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout.split("Result for output key probability:")[1].split("Result for")[0]
    printed = np.array([float(v) for v in text.replace("[", " ").replace("]", " ").split()])
    want = call(exported["loaded"], "ctr", raw)["probability"]
    np.testing.assert_allclose(printed, want, rtol=1e-5, atol=1e-6)


def test_export_cli_registers_its_flags():
    import argparse

    parser = argparse.ArgumentParser()
    export.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--model-dir", "RUN/ctr", "--export-base", "RUN/export/seminar",
                              "--max-history", "10000", "--max-candidates", "100"])
    assert (args.model_dir, args.export_base, args.max_history, args.max_candidates) == (
        "RUN/ctr", "RUN/export/seminar", 10000, 100)
    assert args.handler is export._run_export and args.takes_extra is False
    assert (args.gsu, args.codebooks, args.pq_rerank) == (None, None, None)
    args = parser.parse_args(["export", "--model-dir", "R", "--export-base", "E", "--gsu", "pq_adc",
                              "--codebooks", "R/codebooks.npz", "--pq-rerank", "4"])
    assert (args.gsu, args.codebooks, args.pq_rerank) == ("pq_adc", "R/codebooks.npz", 4)


def test_pq_adc_export_serves_the_pq_model_and_its_item_codes(run, batch, vocab, tmp_path):
    """export --gsu pq_adc --codebooks: the served ctr equals the in-memory pq_adc model (coarse codes: not the
    exact GSU's numbers), and encode_items returns the codes of its code table."""
    from seminar_tf import pq_runs, quantization

    codebooks = str(tmp_path / "codebooks.npz")
    pq_runs.fit_run(run["ctr"], quantization.CodebookConfig(num_subspaces=4, num_centroids=16, iterations=5),
                         out=codebooks)
    path = export.export_model(run["ctr"], str(tmp_path / "export"), max_candidates=MAX_CANDIDATES, gsu="pq_adc",
                               codebooks=codebooks, pq_rerank=1)
    model = experiment.load_model(run["ctr"], gsu="pq_adc", codebooks=codebooks, pq_rerank=1)[0]
    assert (model.gsu_mode, model.pq_rerank) == ("pq_adc", 1)
    loaded = tf.saved_model.load(path)
    raw = raw_inputs(batch, vocab)
    got = call(loaded, "ctr", raw)
    want = model(reference_features(batch, raw, vocab), training=False)
    np.testing.assert_allclose(got["logit"], want["logit"].numpy(), rtol=1e-5, atol=1e-5)
    exact = experiment.load_model(run["ctr"])[0](reference_features(batch, raw, vocab), training=False)
    assert not np.allclose(got["logit"], exact["logit"].numpy(), rtol=1e-5, atol=1e-5)  # the GSU did change

    ids = np.array(vocab["items"][len(schema.RESERVED):][:5] + ["never-seen"], object)
    encoded = call(loaded, "encode_items", {export.ITEM_IDS: ids})
    item_codes, _ = model.pq.get_codes()
    np.testing.assert_array_equal(encoded[export.PQ_ITEM_CODES], item_codes[encoded[export.ITEM_INDEX]])
    assert encoded[export.PQ_ITEM_CODES].shape == (6, len(model.pq.item_channel_ids), 4)
    with open(os.path.join(path, "assets.extra", export.EXPORT_INFO)) as f:
        info = json.load(f)
    assert (info["gsu"], info["pq_rerank"]) == ("pq_adc", 1) and info["content_cache_bytes"] > 0
    assert info["pq_item_channels"] == [c for c in model.pq.channels if c != schema.QUERY_CHANNEL]
    # The exact export has no codes output (no fitted codebooks in an exact-trained run's weights).
    assert export.PQ_ITEM_CODES not in call(tf.saved_model.load(
        export.export_model(run["ctr"], str(tmp_path / "exact"), max_candidates=MAX_CANDIDATES)),
        "encode_items", {export.ITEM_IDS: ids})


# ---------------------------------------------------------------------------------------------------- ids, feedback
def test_user_id_and_history_feedback_inputs_equal_the_model(tmp_path):
    """A MovieLens-shaped dataset (every rating a sample and a later history step, with its rating): the export
    takes user_id and history_feedback as raw strings and gives the in-memory model's numbers; an unseen user
    and an unknown feedback token score through OOV; the tf.Example signatures read the same features."""
    from beam_pipelines import build_dataset

    raw = tmp_path / "raw"
    os.makedirs(raw)
    rng = np.random.default_rng(3)
    with open(raw / "items.jsonl", "w") as f:
        f.writelines(json.dumps({"item_id": f"m{i}", "title": f"film {i % 7}", "genre": f"g{i % 4}"}) + "\n"
                     for i in range(30))
    with open(raw / "events.jsonl", "w") as f:
        for user in range(12):
            for step in range(10):
                rating = int(rng.integers(1, 6))
                f.write(json.dumps({"user_id": f"u{user}", "timestamp": step, "item_id": f"m{rng.integers(30)}",
                                    "event": "impression", "label": int(rating >= 4), "rating": rating,
                                    "split": "train" if step < 8 else "test" if step == 9 else "valid"}) + "\n")
    data = str(tmp_path / "data")
    build_dataset.build_dataset(str(raw), data, build_dataset.BuildConfig(
        max_history=8, min_history=0, history_events=("impression",), sample_events=("impression",), num_shards=1))
    preset = config.get_preset("test")
    preset.build = dataclasses.replace(preset.build, max_history=8)
    # with the movielens preset's genre affinity, GSU category prior and item statistics (a frozen table, no input)
    preset.model = dataclasses.replace(preset.model, recent_history=3, category_attribute="genre",
                                       category_affinity=True, gsu_category_prior=True, item_statistics_folds=2)
    preset.finetune = dataclasses.replace(preset.finetune, epochs=1, steps_per_epoch=2, validation_steps=1)
    experiment.finetune(data, str(tmp_path / "ctr"), preset)
    model = experiment.load_model(str(tmp_path / "ctr"))[0]
    assert model.user_id_embedding is not None and model.feedback_embedding is not None
    assert model.category_affinity and model.gsu_category_prior and np.any(model.item_statistics.numpy() != 0)
    path = export.export_model(str(tmp_path / "ctr"), str(tmp_path / "export"), max_candidates=4)
    loaded = tf.saved_model.load(path)
    batch = next(iter(reader.make_dataset(data, schema.CTR_DIR, "test", 12)))
    items = reader.load_vocabulary(data, schema.ITEM_VOCAB)
    feedback = reader.load_vocabulary(data, schema.FEEDBACK_VOCAB)
    inputs = {
        export.HISTORY_ITEM_IDS: np.vectorize(lambda i: items[i] if i else "", otypes=[object])(
            batch[schema.SEQ_HISTORY_ITEM].numpy()),
        export.HISTORY_QUERIES: np.full(batch[schema.SEQ_HISTORY_ITEM].shape, "", object),
        export.HISTORY_FEEDBACK: np.vectorize(lambda i: feedback[i] if i else "", otypes=[object])(
            batch[schema.SEQ_HISTORY_FEEDBACK].numpy()),
        export.TARGET_ITEM_ID: np.array([items[i] for i in batch[schema.CTX_TARGET_ITEM].numpy()], object),
        export.TARGET_QUERY: np.full([len(batch[schema.CTX_LABEL])], "", object),
        export.USER_ID: np.array([u.decode() for u in batch[schema.CTX_USER_ID].numpy()], object),
    }
    got = call(loaded, "ctr", inputs)["probability"]
    np.testing.assert_allclose(got, model(batch)["probability"].numpy(), rtol=1e-5, atol=1e-6)
    unseen = call(loaded, "ctr", {**inputs, export.USER_ID: np.full_like(inputs[export.USER_ID], "nobody")})
    oov = {**batch, schema.CTX_USER_INDEX: tf.fill(tf.shape(batch[schema.CTX_USER_INDEX]), tf.constant(1, tf.int64))}
    np.testing.assert_allclose(unseen["probability"], model(oov)["probability"].numpy(), rtol=1e-5, atol=1e-6)
    strange = np.where(inputs[export.HISTORY_FEEDBACK] != "", "impression:r9", "")
    assert np.all(np.isfinite(call(loaded, "ctr", {**inputs, export.HISTORY_FEEDBACK: strange})["probability"]))
    examples = []
    for row in range(len(got)):
        length = int(batch[schema.CTX_HISTORY_LENGTH][row])
        features = {k: [v.encode() for v in inputs[k][row][:length]] for k in
                    (export.HISTORY_ITEM_IDS, export.HISTORY_QUERIES, export.HISTORY_FEEDBACK)}
        features.update({k: [inputs[k][row].encode()] for k in (export.TARGET_ITEM_ID, export.USER_ID)})
        examples.append(tf.train.Example(features=tf.train.Features(feature={
            k: tf.train.Feature(bytes_list=tf.train.BytesList(value=v)) for k, v in features.items()}))
            .SerializeToString())
    regress = call(loaded, "ctr_examples", {export.EXAMPLES: np.array(examples, object)})["outputs"]
    np.testing.assert_allclose(regress, got, rtol=1e-5, atol=1e-6)
    # the history state carries the feedback: rank_state scores as rank does
    history = {k: inputs[k] for k in (export.HISTORY_ITEM_IDS, export.HISTORY_QUERIES, export.HISTORY_FEEDBACK)}
    state = _encode_history(loaded, history)
    assert state[export.STATE_FEEDBACK].shape == history[export.HISTORY_FEEDBACK].shape
    candidates = {export.CANDIDATE_ITEM_IDS: inputs[export.TARGET_ITEM_ID][:, None],
                  export.CANDIDATE_QUERIES: inputs[export.TARGET_QUERY][:, None]}
    np.testing.assert_allclose(_rank_state(loaded, state, candidates, {export.USER_ID: inputs[export.USER_ID]})[
        "scores"][:, 0], got, rtol=1e-5, atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match=export.STATE_FEEDBACK):
        _rank_state(loaded, {**state, export.STATE_FEEDBACK: state[export.STATE_FEEDBACK] + 1000}, candidates,
                    {export.USER_ID: inputs[export.USER_ID]})
    with pytest.raises(Exception, match=export.HISTORY_FEEDBACK):
        call(loaded, "ctr", {**inputs, export.HISTORY_FEEDBACK: inputs[export.HISTORY_FEEDBACK][:, :2]})
