"""The schema module: Python/in-graph twins, raw value parsing, specs, and the tf-keras guard."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from seminar_tf import schema

TEXTS = ["Red Shoes", "  red   shoes  ", "Äpfel, Birnen & 42 Kiwis!", "snake_case-and.dots", "", "東京 タワー",
         "tab\tnew\nline", "a\u00a0b", "MiXeD CaSe ÉCOLE", "v\x0bx\x1cy\x85z\u2028w\u3000q"]


def test_python_and_graph_tokenizers_agree():
    graph = schema.tf_tokenize(tf.constant(TEXTS)).to_list()
    for text, tokens in zip(TEXTS, graph):
        assert [t.decode("utf-8") for t in tokens] == schema.tokenize(text), text


def test_python_and_graph_query_normalization_agree():
    graph = schema.tf_normalize_query(tf.constant(TEXTS)).numpy()
    for text, value in zip(TEXTS, graph):
        assert value.decode("utf-8") == schema.normalize_query(text), text
    assert schema.normalize_query(None) == ""


@pytest.mark.parametrize("value, expected", [
    (1700000000, 1700000000), ("1700000000", 1700000000), (1700000000.9, 1700000000),
    ("2023-11-14T22:13:20Z", 1700000000), ("2023-11-14T22:13:20", 1700000000),
    ("2023-11-15T00:13:20+02:00", 1700000000),
    (__import__("datetime").datetime(2023, 11, 14, 22, 13, 20), 1700000000),
])
def test_parse_timestamp_accepts_seconds_and_iso8601(value, expected):
    assert schema.parse_timestamp(value) == expected


@pytest.mark.parametrize("value", [None, "", "yesterday", True, float("nan"), "2023-13-40"])
def test_parse_timestamp_rejects_bad_values_with_a_reason(value):
    with pytest.raises(ValueError, match="timestamp"):
        schema.parse_timestamp(value)


def test_parse_float_list_formats():
    assert schema.parse_float_list("[1, 2.5]") == [1.0, 2.5]
    assert schema.parse_float_list("1 2.5,3") == [1.0, 2.5, 3.0]
    assert schema.parse_float_list([1, 2]) == [1.0, 2.0]
    assert schema.parse_float_list(None) == [] and schema.parse_float_list(" ") == []


def test_specs_follow_the_metadata():
    metadata = schema.DatasetMetadata(num_items=10, num_queries=5, num_tokens=7, item_attributes={"author_id": 3},
                                      user_attributes={"gender": 3}, image_dim=4, has_image_pixels=False,
                                      channels=list(schema.CHANNELS), max_history=8, num_negatives=2)
    pretrain = schema.sample_spec(metadata, schema.PRETRAIN_DIR)
    assert pretrain[schema.CTX_NEGATIVE_ITEMS].shape == [2] and schema.CTX_HISTORY_END in pretrain
    assert schema.CTX_NEGATIVE_ITEMS not in schema.sample_spec(metadata, schema.CTR_DIR)
    assert not any(name.startswith("user_") and name != schema.CTX_USER_ID for name in pretrain)  # in the timeline
    context, sequence = schema.timeline_spec(metadata)
    assert "user_gender" in context and schema.CTX_USER_INDEX not in context
    assert set(sequence) == set(schema.SEQUENCE_FEATURES)
    with_ids = dataclasses.replace(metadata, num_users=5, num_feedback=4)
    context, sequence = schema.timeline_spec(with_ids)
    assert schema.CTX_USER_INDEX in context and schema.SEQ_HISTORY_FEEDBACK in sequence
    assert schema.item_table_spec(metadata)[schema.IMAGE_EMBEDDING].shape == [4]
    assert schema.DatasetMetadata.from_json(metadata.to_json()) == metadata
    with pytest.raises(ValueError, match="kind"):
        schema.sample_spec(metadata, "other")


def test_metadata_names_the_history_layout():
    """A metadata.json of the older per-sample layout has no history_layout: it reads as "" (the reader refuses it)."""
    metadata = schema.DatasetMetadata(num_items=3, num_queries=3, num_tokens=2, item_attributes={}, user_attributes={},
                                      image_dim=0, has_image_pixels=False, channels=["attributes"], max_history=4,
                                      num_negatives=1, history_layout=schema.TIMELINES_LAYOUT)
    raw = json.loads(metadata.to_json())
    assert raw["history_layout"] == "timelines"
    del raw["history_layout"]
    assert schema.DatasetMetadata.from_json(json.dumps(raw)).history_layout == ""
    assert schema.timeline_pattern("gs://b/data/") == "gs://b/data/timelines/*.tfrecord.gz"


def _python(code: str, **env):
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    environment.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=180, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.slow
def test_importing_the_package_selects_tf_keras_and_refuses_keras3():
    selected = _python("import seminar_tf, tensorflow as tf; print(tf.keras.__name__)")
    assert selected.returncode == 0, selected.stderr
    assert selected.stdout.strip().startswith("tf_keras"), selected.stdout
    refused = _python("import tensorflow, seminar_tf")
    assert refused.returncode != 0
    assert "KerasVersionError" in refused.stderr and "TF_USE_LEGACY_KERAS=1" in refused.stderr
    allowed = _python("import tensorflow as tf, seminar_tf; print(tf.keras.__name__)", TF_USE_LEGACY_KERAS="1")
    assert allowed.returncode == 0 and allowed.stdout.strip().startswith("tf_keras")
