"""serving/: config files, the local PredictionService/ModelService server through the official stubs and
REST, bad requests, a version swap under load, and `seminar-tf query`/`serve`."""

import argparse
import base64
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc, regression_pb2

from seminar_tf import config, export, schema
from seminar_tf.data import reader
from seminar_tf.models import builders
from serving import MODEL_NAME, client, server, validation
from serving import rest as rest_lib
from serving import cli as serving_cli
from proto_fixtures import declared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_HISTORY = 64
MAX_CANDIDATES = 50
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------- fixtures
def _build_model(dataset_dir):
    """A SEMINAR model of the test preset with random weights (serving behaviour needs no training)."""
    metadata = reader.load_metadata(dataset_dir)
    model = builders.build_seminar(config.get_preset("test").model, metadata,
                                   reader.load_item_table(dataset_dir, metadata),
                                   reader.load_query_table(dataset_dir, metadata))
    model(next(iter(reader.synthetic_dataset(metadata, schema.CTR_DIR, 2, 1, max_history=4))))
    return model, metadata


def _export(model, metadata, dataset_dir, base):
    items = reader.load_vocabulary(dataset_dir, schema.ITEM_VOCAB)
    return export.export_seminar(model, base, vocab_dir=os.path.join(dataset_dir, schema.VOCAB_DIR),
                                 metadata=metadata, max_history=MAX_HISTORY, max_candidates=MAX_CANDIDATES,
                                 warmup_item=items[2])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dataset_dir):
    model, metadata = _build_model(dataset_dir)
    base = str(tmp_path_factory.mktemp("serving") / "seminar")
    path = _export(model, metadata, dataset_dir, base)
    running = server.serve(MODEL_NAME, base, port=0, rest_port=0, poll_seconds=1.0,
                           max_message_bytes=MAX_MESSAGE_BYTES, max_concurrency=4)
    try:
        yield {"server": running, "base": base, "path": path, "model": model, "metadata": metadata,
               "data": dataset_dir, "loaded": tf.saved_model.load(path),
               "items": reader.load_vocabulary(dataset_dir, schema.ITEM_VOCAB),
               "queries": reader.load_vocabulary(dataset_dir, schema.QUERY_VOCAB)}
    finally:
        running.stop()


@pytest.fixture(scope="module")
def grpc_client(setup):
    with client.PredictClient(f"127.0.0.1:{setup['server'].grpc_port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def rest(setup):
    return client.RestClient(f"http://127.0.0.1:{setup['server'].rest_port}", timeout=60)


def ctr_inputs(setup, rows=3, length=6):
    """Raw row-format inputs from the dataset's vocabularies (padded with "", some browsing steps)."""
    items, queries = setup["items"][2:], setup["queries"][3:]
    history = [[items[(r * 7 + j) % len(items)] if j < length - r else "" for j in range(length)] for r in range(rows)]
    history_queries = [[queries[(r + j) % len(queries)] if j % 2 else "" for j in range(length)] for r in range(rows)]
    inputs = {"history_item_ids": np.array(history, object), "history_queries": np.array(history_queries, object),
              "target_item_id": np.array([items[r] for r in range(rows)], object),
              "target_query": np.array([queries[r] if r else "" for r in range(rows)], object)}
    for name in user_names(setup):
        inputs[schema.user_attribute_feature(name)] = np.array([""] * rows, object)
    return inputs


def user_names(setup):
    """Names of the user inputs (``user_<name>``): the dataset's attributes, plus ``id`` (the ``user_id`` input)
    when the model has a user-id embedding."""
    return sorted(setup["metadata"].user_attributes) + (["id"] if setup["metadata"].num_users else [])


def direct(setup, signature, inputs):
    fn = setup["loaded"].signatures[signature]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def _bytes(inputs):
    return {k: np.vectorize(lambda s: s.encode(), otypes=[object])(v) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------- files
def test_models_config_and_batching_file_parse_with_tf_serving_protos():
    assert server.read_model_config(os.path.join(REPO, "serving", "models.config")) == [
        (MODEL_NAME, "/models/seminar")]
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
    from google.protobuf import wrappers_pb2  # noqa: F401  (puts wrappers.proto in the default pool)

    # BatchingParameters (tensorflow_serving/servables/tensorflow/session_bundle_config.proto) is not in the
    # pip package: rebuild its descriptor here and parse the file with protobuf's text format.
    pool = descriptor_pool.Default()
    proto = descriptor_pb2.FileDescriptorProto(name="test_batching.proto", package="test_batching",
                                               dependency=["google/protobuf/wrappers.proto"])
    message = proto.message_type.add(name="BatchingParameters")
    label = descriptor_pb2.FieldDescriptorProto
    int64, string = ".google.protobuf.Int64Value", ".google.protobuf.StringValue"
    for number, (name, kind) in enumerate([("max_batch_size", int64), ("batch_timeout_micros", int64),
                                           ("max_enqueued_batches", int64), ("num_batch_threads", int64),
                                           ("thread_pool_name", string)], 1):
        message.field.add(name=name, number=number, type=label.TYPE_MESSAGE, type_name=kind, label=label.LABEL_OPTIONAL)
    message.field.add(name="allowed_batch_sizes", number=6, type=label.TYPE_INT64, label=label.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=label.TYPE_BOOL, label=label.LABEL_OPTIONAL)
    try:
        descriptor = pool.FindMessageTypeByName("test_batching.BatchingParameters")
    except KeyError:
        descriptor = pool.Add(proto).message_types_by_name["BatchingParameters"]
    parameters = message_factory.GetMessageClass(descriptor)()
    with open(os.path.join(REPO, "serving", "batching_parameters.txt")) as f:
        text_format.Parse(f.read(), parameters)
    assert parameters.max_batch_size.value >= 1 and parameters.num_batch_threads.value >= 1
    assert parameters.pad_variable_length_inputs is False


def test_readme_has_the_docker_run_line():
    with open(os.path.join(REPO, "serving", "README.md")) as f:
        text = f.read()
    line = text[text.index("docker run"):].split("```")[0]
    for part in ["tensorflow/serving", "/models/seminar", "--model_config_file=/config/models.config",
                 "--batching_parameters_file=/config/batching_parameters.txt", "127.0.0.1:8500:8500"]:
        assert part in line


def test_client_contract_names_match_the_export():
    for name in ["HISTORY_ITEM_IDS", "HISTORY_QUERIES", "HISTORY_FEEDBACK", "TARGET_ITEM_ID", "TARGET_QUERY",
                 "CANDIDATE_ITEM_IDS", "CANDIDATE_QUERIES", "SCORES"]:
        assert getattr(client, name) == getattr(export, name)
    assert (client.RANK_SIGNATURE, client.CTR_SIGNATURE, client.EXAMPLES_SIGNATURE, client.CLASSIFY_SIGNATURE) == (
        export.RANK_SIGNATURE, export.CTR_SIGNATURE, export.EXAMPLES_SIGNATURE, export.CLASSIFY_SIGNATURE)
    assert client.USER_INPUT_PREFIX == schema.USER_ATTRIBUTE_PREFIX
    assert (client.ENCODE_HISTORY_SIGNATURE, client.RANK_STATE_SIGNATURE) == (export.ENCODE_HISTORY_SIGNATURE,
                                                                              export.RANK_STATE_SIGNATURE)
    state_inputs = (export.STATE_ITEMS, export.STATE_QUERIES, export.STATE_QUERY_TOKENS, export.STATE_FEEDBACK,
                    export.STATE_FINGERPRINT)
    assert all(name.startswith(client.STATE_PREFIX) for name in state_inputs)
    assert validation.STATE_INPUTS == export.STATE_STEP_INPUTS and validation.STATE_ITEMS == export.STATE_ITEMS


def test_export_info_records_the_inputs_of_every_signature(setup):
    """assets.extra/seminar_export.json: every signature's inputs (name, dtype, shape) as its SignatureDef has
    them, and the limits the server enforces."""
    with open(os.path.join(setup["path"], "assets.extra", "seminar_export.json")) as f:
        info = json.load(f)
    signature_defs = server.read_signature_defs(setup["path"])
    assert set(info["signatures"]) == set(signature_defs)
    for name, signature_def in signature_defs.items():
        want = {key: {"dtype": tf.dtypes.as_dtype(value.dtype).name,
                      "shape": [None if d.size < 0 else d.size for d in value.tensor_shape.dim]}
                for key, value in signature_def.inputs.items()}
        assert info["signatures"][name]["inputs"] == want and want, name
    assert info["signatures"]["rank"]["inputs"]["candidate_item_ids"] == {"dtype": "string", "shape": [None, None]}
    assert info["signatures"]["ctr_examples"]["inputs"] == {"inputs": {"dtype": "string", "shape": [None]}}
    limits = setup["server"].manager.servable(MODEL_NAME).limits
    assert (limits.max_history, limits.max_candidates) == (info["max_history"], info["max_candidates"]) == (
        MAX_HISTORY, MAX_CANDIDATES)


# ---------------------------------------------------------------------------------------------------- gRPC
def test_predict_ctr_round_trip_with_the_official_stub(setup, grpc_client):
    inputs = ctr_inputs(setup)
    want = direct(setup, "ctr", inputs)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc_client.channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = "ctr"
    for name, value in _bytes(inputs).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    response = stub.Predict(request, timeout=60)
    assert (response.model_spec.name, response.model_spec.version.value, response.model_spec.signature_name) == (
        MODEL_NAME, 1, "ctr")
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probability"]), want["probability"], rtol=1e-6)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["logit"]), want["logit"], rtol=1e-6)
    # serving_default is the row format too; output_filter keeps only what was asked for
    filtered = grpc_client.predict(inputs, output_filter=["probability"])
    assert set(filtered) == {"probability"}
    np.testing.assert_allclose(filtered["probability"], want["probability"], rtol=1e-6)


def test_string_count_that_does_not_fit_the_shape_answers_invalid_argument(setup, grpc_client):
    """A DT_STRING TensorProto with more strings than its shape holds is refused, naming the input (numpy
    would fail with a reshape error, TensorFlow's parser would silently drop the extra strings)."""
    inputs = ctr_inputs(setup, rows=5, length=MAX_HISTORY)
    protos = {k: tf.make_tensor_proto(v) for k, v in _bytes(inputs).items()}
    np.testing.assert_array_equal(server.tensor_from_proto("history_item_ids", protos["history_item_ids"]),
                                  _bytes(inputs)["history_item_ids"])
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL_NAME, "ctr"
    for name, proto in protos.items():
        request.inputs[name].CopyFrom(proto)
    request.inputs["history_queries"].string_val.append(b"one too many")
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.prediction.Predict(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'history_queries'" in info.value.details() and f"string_val has {5 * MAX_HISTORY + 1}" in \
        info.value.details()
    assert grpc_client.predict(inputs, "ctr")["probability"].shape == (5,)  # still serving


def test_string_tensor_protos_become_string_tensors_with_their_shape():
    """One string per element goes straight into a tf.string tensor of the proto's shape; one string for many
    elements broadcasts (TensorProto's rule), as tf.make_ndarray reads it."""
    values = np.array([[b"a", b"", b"c"], [b"d", b"e\x00f", b"g"]], object)
    full = server.tensor_from_proto("history_item_ids", tf.make_tensor_proto(values))
    assert full.dtype == tf.string and full.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(full), values)
    broadcast = tensor_pb2.TensorProto(dtype=tf.string.as_datatype_enum, string_val=[b"x"])
    broadcast.tensor_shape.dim.add(size=2)
    broadcast.tensor_shape.dim.add(size=3)
    np.testing.assert_array_equal(np.asarray(server.tensor_from_proto("history_queries", broadcast)),
                                  np.full([2, 3], b"x", object))
    empty_proto = tf.make_tensor_proto(np.zeros([1, 0], object), dtype=tf.string)
    empty = server.tensor_from_proto("history_queries", empty_proto)
    assert tuple(np.asarray(empty).shape) == (1, 0)


def test_predict_rank_round_trip(setup, grpc_client):
    inputs = ctr_inputs(setup, rows=1, length=8)
    history = list(zip(inputs["history_item_ids"][0], inputs["history_queries"][0]))
    candidates = [(setup["items"][i], setup["queries"][3 + i % 5] if i % 2 else "") for i in range(2, 12)]
    ranked = grpc_client.rank(history, candidates)
    want = direct(setup, "rank", client.rank_inputs(history, candidates, grpc_client.user_inputs()))["scores"][0]
    assert [i for i, _ in ranked] == list(np.argsort(-want, kind="stable"))
    np.testing.assert_allclose([s for _, s in ranked], np.sort(want)[::-1], rtol=1e-6)
    assert len(set(np.round(want, 6))) > 1  # the candidates do get different scores


def test_regress_and_classify_round_trip(setup, grpc_client):
    inputs = ctr_inputs(setup)
    want = direct(setup, "ctr", inputs)["probability"]
    users = {name: "" for name in user_names(setup)}
    examples = [client.history_example(list(zip(inputs["history_item_ids"][r], inputs["history_queries"][r])),
                                       (inputs["target_item_id"][r], inputs["target_query"][r]), users)
                for r in range(len(want))]
    np.testing.assert_allclose(grpc_client.regress(examples), want, rtol=1e-6)
    classes = grpc_client.classify(examples)
    assert [[label for label, _ in row] for row in classes] == [["0", "1"]] * len(want)
    np.testing.assert_allclose([row[1][1] for row in classes], want, rtol=1e-6)
    np.testing.assert_allclose([row[0][1] for row in classes], 1 - want, rtol=1e-5)
    # The user attributes as a shared context give the same numbers
    context = client.make_example({schema.user_attribute_feature(n): "" for n in users})
    bare = [client.history_example(list(zip(inputs["history_item_ids"][r], inputs["history_queries"][r])),
                                   (inputs["target_item_id"][r], inputs["target_query"][r])) for r in range(len(want))]
    np.testing.assert_allclose(grpc_client.regress(bare, context=context), want, rtol=1e-6)


def test_model_metadata_and_status(setup, grpc_client):
    version, signatures = grpc_client.metadata()
    assert version == 1
    assert {"serving_default", "ctr", "rank", "ctr_examples", "ctr_classify", "encode_items"} <= set(signatures)
    assert signatures["ctr_examples"].method_name == "tensorflow/serving/regress"
    assert signatures["ctr_classify"].method_name == "tensorflow/serving/classify"
    assert list(signatures["ctr_examples"].inputs) == ["inputs"]
    assert set(signatures["rank"].outputs) == {"scores", "logits"}
    assert grpc_client.status() == [(1, "AVAILABLE", 0, "")]
    assert grpc_client.status(version=1) == [(1, "AVAILABLE", 0, "")]


# ---------------------------------------------------------------------------------------------------- REST
def test_rest_round_trip(setup, rest, grpc_client):
    inputs = ctr_inputs(setup)
    want = direct(setup, "ctr", inputs)
    status = rest.status()
    assert status == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    metadata = rest.metadata()
    assert metadata["model_spec"]["version"] == "1"
    assert "rank" in metadata["metadata"]["signature_def"]["signature_def"]
    instances = [{k: np.asarray(v[r]).tolist() for k, v in inputs.items()} for r in range(3)]
    rows = rest.predict(instances=instances, signature_name="ctr")["predictions"]
    np.testing.assert_allclose([r["probability"] for r in rows], want["probability"], rtol=1e-6)
    columns = rest.predict(inputs={k: v.tolist() for k, v in inputs.items()}, signature_name="ctr", version=1)
    np.testing.assert_allclose(columns["outputs"]["logit"], want["logit"], rtol=1e-6)
    examples = [{"history_item_ids": inputs["history_item_ids"][r].tolist(),
                 "history_queries": inputs["history_queries"][r].tolist(),
                 "target_item_id": inputs["target_item_id"][r],
                 "target_query": {"b64": base64.b64encode(inputs["target_query"][r].encode()).decode()}}
                for r in range(3)]
    context = {schema.user_attribute_feature(n): "" for n in user_names(setup)}
    np.testing.assert_allclose(rest.regress(examples, context=context), want["probability"], rtol=1e-6)
    classes = rest.classify(examples, context=context)
    assert [[label for label, _ in row] for row in classes] == [["0", "1"]] * 3
    np.testing.assert_allclose([row[1][1] for row in classes], want["probability"], rtol=1e-6)


def test_rest_errors_and_limits(setup, rest):
    inputs = ctr_inputs(setup)
    cases = [
        (lambda: client.RestClient(rest.base_url, "nope").status(), 404, "nope"),
        (lambda: rest.predict(inputs={k: v.tolist() for k, v in inputs.items()}, signature_name="ctr", version=9),
         404, "Specific"),
        (lambda: rest.predict(inputs={"x": [1]}, signature_name="nope"), 404, "nope"),
        (lambda: rest.predict(inputs={**{k: v.tolist() for k, v in inputs.items()}, "history_item_ids": [[1, 2]]},
                              signature_name="ctr"), 400, "history_item_ids"),
        (lambda: rest.predict(inputs={**{k: v.tolist() for k, v in inputs.items()},
                                      "history_item_ids": [["a", "b"], ["c"]]}, signature_name="ctr"), 400, "ragged"),
        (lambda: rest.regress([{"target_item_id": "x"}], signature_name="ctr"), 400, "Regress"),
    ]
    for request, status, text in cases:
        with pytest.raises(client.RestError) as info:
            request()
        assert info.value.status == status and text in info.value.message, (status, info.value)
    big = json.dumps({"inputs": {"x": "a" * (MAX_MESSAGE_BYTES + 10)}}).encode()
    request = urllib.request.Request(f"{rest.base_url}/v1/models/{MODEL_NAME}:predict", data=big, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 413
    assert rest.status()["model_version_status"][0]["state"] == "AVAILABLE"  # still serving


# ---------------------------------------------------------------------------------------------------- bad requests
def _bad_requests(setup):
    good = _bytes(ctr_inputs(setup))
    long_history = {**good, "history_item_ids": np.array([[b"x"] * (MAX_HISTORY + 1)] * 3, object),
                    "history_queries": np.array([[b""] * (MAX_HISTORY + 1)] * 3, object)}
    rank = client.rank_inputs([("x", "")], [("y", "")] * (MAX_CANDIDATES + 1),
                              [schema.user_attribute_feature(n) for n in user_names(setup)])
    return {
        "unknown model": (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        "unknown version": (dict(version=7), grpc.StatusCode.NOT_FOUND, "7"),
        "unknown signature": (dict(signature="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        "missing input": (dict(inputs={k: v for k, v in good.items() if k != "target_query"}),
                          grpc.StatusCode.INVALID_ARGUMENT, "target_query"),
        "unknown input": (dict(inputs={**good, "extra": np.array([b"x"])}), grpc.StatusCode.INVALID_ARGUMENT, "extra"),
        "wrong dtype": (dict(inputs={**good, "history_item_ids": np.ones([3, 6], np.int64)}),
                        grpc.StatusCode.INVALID_ARGUMENT, "history_item_ids"),
        "wrong shape": (dict(inputs={**good, "target_item_id": good["target_item_id"][:, None]}),
                        grpc.StatusCode.INVALID_ARGUMENT, "target_item_id"),
        "oversize history": (dict(inputs=long_history), grpc.StatusCode.INVALID_ARGUMENT, "max_history"),
        "too many candidates": (dict(inputs=rank, signature="rank"), grpc.StatusCode.INVALID_ARGUMENT,
                                "max_candidates"),
        "unknown output": (dict(output_filter=["nope"]), grpc.StatusCode.INVALID_ARGUMENT, "nope"),
        "oversize message": (dict(inputs={**good, "target_query": np.array([b"q" * MAX_MESSAGE_BYTES] * 3, object)}),
                             grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    }


@pytest.mark.parametrize("case", ["unknown model", "unknown version", "unknown signature", "missing input",
                                  "unknown input", "wrong dtype", "wrong shape", "oversize history",
                                  "too many candidates", "unknown output", "oversize message"])
def test_bad_requests_answer_the_right_code_and_the_server_keeps_serving(setup, grpc_client, case):
    changes, code, text = _bad_requests(setup)[case]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = changes.get("model", MODEL_NAME)
    request.model_spec.signature_name = changes.get("signature", "ctr")
    if "version" in changes:
        request.model_spec.version.value = changes["version"]
    for name, value in changes.get("inputs", _bytes(ctr_inputs(setup))).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(changes.get("output_filter", []))
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.prediction.Predict(request, timeout=60)
    assert info.value.code() == code, info.value.details()
    assert text in (info.value.details() or "")
    assert grpc_client.predict(ctr_inputs(setup), "ctr")["probability"].shape == (3,)  # still serving


def test_bad_classify_and_regress_requests(setup, grpc_client):
    example = client.history_example([("x", "")], ("y", ""))
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.classify([example], signature_name="ctr_examples")  # a regression signature
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "classes" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.regress([], signature_name="ctr_examples")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.regress([client.make_example({"history_item_ids": ["x"]})])  # no target_item_id
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = "rank"
    request.input.example_list.examples.append(example)
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.prediction.Regress(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_client.status() == [(1, "AVAILABLE", 0, "")]


# ---------------------------------------------------------------------------------------------------- sizes
def _rss_bytes(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _predict_request(signature, protos):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL_NAME, signature
    for name, proto in protos.items():
        request.inputs[name].CopyFrom(proto)
    return request


def _good_protos(setup, rows=1, length=6):
    return {k: tf.make_tensor_proto(v) for k, v in _bytes(ctr_inputs(setup, rows=rows, length=length)).items()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_declared_shapes_are_checked_before_any_tensor_is_built(setup, grpc_client):
    """A few hundred bytes declaring 10^7 elements (one broadcast value), a batch beyond max_batch_size, a
    negative dimension, a wrong value count: each is refused with INVALID_ARGUMENT naming the input and the
    limit, without allocating (the server's RSS stays put), and the server keeps answering."""
    good = _good_protos(setup)
    want = grpc_client.predict(ctr_inputs(setup, rows=1), "ctr")["probability"]
    cases = {
        "one value for [1, 10^7]": ({"history_item_ids": declared([1, 10 ** 7], [b"x"]),
                                     "history_queries": declared([1, 10 ** 7], [b""])}, "max_history=64"),
        "batch beyond the limit": ({"target_item_id": declared([10 ** 7], [b"x"])}, "max_batch_size=256"),
        "negative dim with values": ({"history_item_ids": declared([1, -1], [b"a", b"b", b"c"])},
                                     "negative dimension"),
        "negative dims": ({"history_item_ids": declared([-1, -3], [b"a"])}, "negative dimension"),
        "fewer strings than elements": ({"history_item_ids": declared([1, 6], [b"a", b"b"])}, "string_val has 2"),
        "queries not shaped as items": ({"history_queries": declared([1, 5], [b""])},
                                        "history_queries must have the shape of history_item_ids"),
        "batch sizes differ": ({"target_query": declared([2], [b"", b""])}, "batch size 2"),
    }
    before = _rss_bytes()
    for case, (changes, text) in cases.items():
        request = _predict_request("ctr", {**good, **changes})
        assert len(request.SerializeToString()) < 2000
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.prediction.Predict(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.details())
        assert text in info.value.details(), (case, info.value.details())
    assert _rss_bytes() - before < 100 * 2 ** 20  # 10^7 broadcast strings alone would be 320 MB
    np.testing.assert_allclose(grpc_client.predict(ctr_inputs(setup, rows=1), "ctr")["probability"], want, rtol=1e-6)


def test_the_element_budget_answers_resource_exhausted_and_numeric_values_must_fit():
    """``max_elements`` bounds what a request declares in total (RESOURCE_EXHAUSTED); tensor_content must hold
    exactly elements x item size bytes; a numeric value count fits the shape or broadcasts."""
    from tensorflow.core.protobuf import meta_graph_pb2

    signature = meta_graph_pb2.SignatureDef()
    for name in ("history_item_ids", "history_queries"):
        info = signature.inputs[name]
        info.dtype = tf.string.as_datatype_enum
        info.tensor_shape.dim.add(size=-1)
        info.tensor_shape.dim.add(size=-1)
    limits = server.Limits(max_history=1000, max_batch_size=8, max_elements=100)
    protos = {"history_item_ids": declared([2, 30], [b"x"]), "history_queries": declared([2, 30], [b""])}
    with pytest.raises(server.ServingError) as info:
        validation.check_protos("s", signature, protos, limits)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_elements is 100" in info.value.message
    validation.check_protos("s", signature, {k: declared([2, 25], [b"x"]) for k in protos}, limits)  # 100: fits
    numeric = meta_graph_pb2.SignatureDef()
    numeric.inputs["x"].dtype = tf.int64.as_datatype_enum
    numeric.inputs["x"].tensor_shape.dim.add(size=-1)
    short = tf.make_tensor_proto(np.arange(4, dtype=np.int64))
    short.tensor_content = short.tensor_content[:-3]
    for proto, text in ((short, "tensor_content has 29 bytes"), (declared([4], [1, 2], tf.int64), "has 2")):
        with pytest.raises(server.ServingError) as info:
            validation.check_protos("s", numeric, {"x": proto}, limits)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.message
    validation.check_protos("s", numeric, {"x": declared([4], [7], tf.int64)}, limits)  # one value broadcasts


def test_garbage_bytes_to_ctr_examples_are_invalid_argument_naming_the_example(setup, grpc_client, rest):
    request = _predict_request("ctr_examples", {"inputs": tf.make_tensor_proto(
        np.array([client.history_example([("x", "")], ("y", "")).SerializeToString(), b"\xff\xfe\x00garbage\x80"],
                 object))})
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.prediction.Predict(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "value 1 (11 bytes) is not a serialized tf.Example" in info.value.details()
    assert "codec" not in info.value.details()
    with pytest.raises(client.RestError) as rest_info:
        rest.predict(inputs={"inputs": [{"b64": base64.b64encode(b"\xff\xfe\x00garbage\x80").decode()}]},
                     signature_name="ctr_examples")
    assert rest_info.value.status == 400 and "is not a serialized tf.Example" in rest_info.value.message


def test_rest_declared_shapes_are_checked_like_grpc(setup, rest):
    inputs = {k: v.tolist() for k, v in ctr_inputs(setup, rows=1).items()}
    long = {**inputs, "history_item_ids": [["x"] * (MAX_HISTORY + 1)], "history_queries": [[""] * (MAX_HISTORY + 1)]}
    for body, text in ((long, "max_history=64"),
                       ({**inputs, "target_item_id": ["x"] * 300, "target_query": [""] * 300}, "max_batch_size=256"),
                       ({**inputs, "history_queries": [[""] * 5]}, "must have the shape of history_item_ids")):
        with pytest.raises(client.RestError) as info:
            rest.predict(inputs=body, signature_name="ctr")
        assert info.value.status == 400 and text in info.value.message, info.value


# ---------------------------------------------------------------------------------------------------- REST hardening
def _raw_http(port, data: bytes, timeout=30.0):
    """Sends raw bytes to the REST port; returns (status, JSON body) of the answer (None, None when the
    server closed the connection without one)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return _read_answer(sock)


def _read_answer(sock):
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            return None, None
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    assert headers.get("content-type") == "application/json", lines
    return int(lines[0].split()[1]), json.loads(body[:length]) if length else None


@pytest.fixture()
def strict_rest(setup):
    """A second REST front end on the module's model: one model slot, 12 connections, 1.5 s per request."""
    frontend = rest_lib.RestFrontend(setup["server"].manager, "127.0.0.1", 0, MAX_MESSAGE_BYTES, max_concurrency=1,
                                     max_connections=12, request_timeout_s=1.5, queue_timeout_s=30)
    frontend.start()
    try:
        yield frontend
    finally:
        frontend.stop()


def test_rest_slow_and_idle_clients_cannot_starve_good_requests(setup, strict_rest):
    """8 clients that announce 1000 body bytes and send 10 hold no model slot (the body is read first), so a
    good request is answered at once; they are cut off after the request deadline; connections beyond
    max_connections get a JSON 503 without a thread; idle ones are closed."""
    import socket

    port = strict_rest.port
    good = client.RestClient(f"http://127.0.0.1:{port}", timeout=60)
    inputs = {k: v.tolist() for k, v in ctr_inputs(setup, rows=1).items()}
    want = good.predict(inputs=inputs, signature_name="ctr")["outputs"]["probability"]
    slow = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(f"POST /v1/models/{MODEL_NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"inputs\": ".encode())
        slow.append(sock)
    answer = good.predict(inputs=inputs, signature_name="ctr")["outputs"]["probability"]
    for sock in slow:  # still open: the good request was answered before the deadline cut the slow clients off
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
    np.testing.assert_allclose(answer, want, rtol=1e-6)
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(20)]
    time.sleep(0.3)
    refused = []
    for sock in idle:
        sock.settimeout(0.2)
        try:
            refused.append(_read_answer(sock))
        except TimeoutError:
            pass  # accepted: waits for its request
    assert len(refused) >= 20 - (12 - 8) and all(r == (503, {"error": "too many connections (max_connections=12)"})
                                                 for r in refused)
    assert threading.active_count() - threads_before <= 12
    time.sleep(2.0)  # past the 1.5 s request deadline: every slow and idle connection was closed
    for sock in slow + idle:
        sock.settimeout(5)
        assert sock.recv(1) == b""
        sock.close()
    assert good.predict(inputs=inputs, signature_name="ctr")["outputs"]["probability"] == pytest.approx(want)


def test_rest_bodies_waiting_in_memory_have_a_byte_budget(setup, strict_rest):
    """Bodies read (or being read) and not yet answered hold at most max_buffered_bytes together: beyond it a
    request gets a JSON 503 at once; the budget comes back when a slow client is cut off."""
    import socket

    strict_rest.max_buffered_bytes = 3000
    inputs = {k: v.tolist() for k, v in ctr_inputs(setup, rows=1).items()}
    body = json.dumps({"signature_name": "ctr", "inputs": inputs}).encode()
    assert len(body) < 1000
    request = (f"POST /v1/models/{MODEL_NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
               .encode() + body)
    status, answer = _raw_http(strict_rest.port, request)
    assert status == 200
    slow = socket.create_connection(("127.0.0.1", strict_rest.port), timeout=30)
    slow.sendall(f"POST /v1/models/{MODEL_NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2990\r\n\r\n{{"
                 .encode())
    time.sleep(0.3)
    assert _raw_http(strict_rest.port, request) == (503, {"error": "server busy: too many request bodies in memory"})
    assert slow.recv(1) == b""  # cut off at the 1.5 s request deadline
    slow.close()
    status, again = _raw_http(strict_rest.port, request)
    assert status == 200 and again == answer


def test_rest_answers_json_errors_for_every_status(setup, strict_rest):
    port, path = strict_rest.port, f"/v1/models/{MODEL_NAME}:predict"
    body = json.dumps({"signature_name": "ctr", "inputs": {k: v.tolist() for k, v in ctr_inputs(setup).items()}})
    nested = [1]
    for _ in range(32):
        nested = [nested]
    deep_input = json.dumps({"inputs": {"x": nested}}).encode()  # 33 levels

    def post(headers, data=body.encode()):
        return _raw_http(port, f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + data)

    cases = {
        "PUT": (_raw_http(port, f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()), 405, "PUT"),
        "DELETE": (_raw_http(port, f"DELETE /v1/models/{MODEL_NAME} HTTP/1.1\r\nHost: x\r\n\r\n".encode()), 405,
                   "GET and POST"),
        "unknown method": (_raw_http(port, b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"), 501, "Unsupported"),
        "GET a verb": (_raw_http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()), 405, "needs POST"),
        "Content-Length not a number": (post("Content-Length: abc\r\n"), 400, "bad Content-Length"),
        "Content-Length negative": (post("Content-Length: -1\r\n"), 400, "bad Content-Length"),
        "no Content-Length": (post("", b""), 411, "Content-Length header required"),
        "wrong Content-Type": (post(f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"), 415,
                               "text/plain"),
        "deep JSON": (post("Content-Length: 100000\r\n", b"[" * 100000), 400, "nested too deeply"),
        "deep JSON in an input": (post(f"Content-Length: {len(deep_input)}\r\n", deep_input), 400,
                                  "nested deeper than 32"),
        "not JSON": (post("Content-Length: 5\r\n", b"\xff\xfe{[x"), 400, "JSON parse error"),
        "unknown route": (_raw_http(port, b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\n\r\n"), 404, "Malformed request"),
        "request line too long": (_raw_http(port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"), 414, ""),
    }
    for case, ((status, answer), want_status, text) in cases.items():
        assert status == want_status, (case, status, answer)
        assert isinstance(answer, dict) and set(answer) == {"error"} and text in answer["error"], (case, answer)
    # the accepted content types: JSON, none, and curl -d's default form type
    for headers in ("Content-Type: application/json; charset=utf-8\r\n", "",
                    "Content-Type: application/x-www-form-urlencoded\r\n"):
        status, answer = post(f"{headers}Content-Length: {len(body)}\r\n")
        assert status == 200 and len(answer["outputs"]["probability"]) == 3


# ---------------------------------------------------------------------------------------------------- tf.Example
def test_predict_and_the_example_apis_reject_the_same_malformed_rows(setup, grpc_client, rest):
    """One validation for every signature: a history whose queries (or feedback) do not match its items step
    for step, or longer than max_history, is INVALID_ARGUMENT through Predict (ctr), Regress, Classify and
    REST :regress alike, with the same message (the tf.Example parser would pad the short list and score)."""
    signature_inputs = grpc_client.metadata()[1]["ctr"].inputs
    users = {schema.user_attribute_feature(n): "" for n in user_names(setup)}
    items = setup["items"][2:]
    cases = {"3 items, 2 queries": (items[:3], ["", ""]), "3 items, 4 queries": (items[:3], ["", "", "", ""]),
             "too long": ([items[0]] * (MAX_HISTORY + 1), [""] * (MAX_HISTORY + 1))}
    texts = {"3 items, 2 queries": "history_queries must have the shape of history_item_ids",
             "3 items, 4 queries": "history_queries must have the shape of history_item_ids",
             "too long": "exceeds this export's max_history=64"}
    for case, (history_items, history_queries) in cases.items():
        features = {"history_item_ids": list(history_items), "history_queries": list(history_queries),
                    "target_item_id": items[5], "target_query": "", **users}
        if "history_feedback" in signature_inputs:
            features["history_feedback"] = [""] * len(history_items)
        predict = {"history_item_ids": np.array([history_items], object), "history_queries":
                   np.array([history_queries], object), "target_item_id": np.array([items[5]], object),
                   "target_query": np.array([""], object), **{k: np.array([""], object) for k in users}}
        if "history_feedback" in signature_inputs:
            predict["history_feedback"] = np.array([[""] * len(history_items)], object)
        example = client.make_example(features)
        for api, call in (("predict", lambda: grpc_client.predict(predict, "ctr")),
                          ("regress", lambda: grpc_client.regress([example])),
                          ("classify", lambda: grpc_client.classify([example]))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, api, info.value.details())
            assert texts[case] in info.value.details(), (case, api, info.value.details())
        with pytest.raises(client.RestError) as rest_info:
            rest.regress([features])
        assert rest_info.value.status == 400 and texts[case] in rest_info.value.message
    # a well-formed example of the same row still scores, and equals Predict
    good = {"history_item_ids": list(items[:3]), "history_queries": ["", "", ""], "target_item_id": items[5],
            "target_query": "", **users}
    predict = {"history_item_ids": np.array([items[:3]], object), "history_queries": np.array([["", "", ""]], object),
               "target_item_id": np.array([items[5]], object), "target_query": np.array([""], object),
               **{k: np.array([""], object) for k in users}}
    if "history_feedback" in signature_inputs:
        good["history_feedback"] = ["", "", ""]
        predict["history_feedback"] = np.array([["", "", ""]], object)
    np.testing.assert_allclose(grpc_client.regress([client.make_example(good)]),
                               grpc_client.predict(predict, "ctr")["probability"], rtol=1e-6)


def test_example_checks_cover_feedback_and_the_shared_context():
    """check_examples on an export that reads history_feedback: the feedback list needs one token per step
    (absent = unknown for every step), wherever the lists come from (an example or the shared context)."""
    limits = server.Limits(max_history=4, max_batch_size=2, max_elements=50,
                           example_lists=("history_item_ids", "history_queries", "history_feedback"),
                           example_scalars=("target_item_id", "target_query", "user_gender"))
    good = client.make_example({"history_item_ids": ["a", "b"], "history_queries": ["", "q"],
                                "history_feedback": ["click", ""], "target_item_id": "t"})
    validation.check_examples([good], limits)
    validation.check_examples([client.make_example({"history_item_ids": ["a"], "target_item_id": "t"})], limits)
    context = client.make_example({"history_item_ids": ["a", "b", "c"], "user_gender": "f"})
    cases = [
        ([client.make_example({"history_item_ids": ["a", "b"], "history_feedback": ["click"],
                               "target_item_id": "t"})], None,
         "example 0: history_feedback must have the shape of history_item_ids [batch, steps]: 1 values for 2 steps"),
        ([client.make_example({"history_queries": ["", "", ""], "history_feedback": ["", ""], "target_item_id": "t"})],
         context, "example 0: history_feedback must have the shape of history_item_ids"),
        ([client.make_example({"target_item_id": "t", "user_gender": ["f", "m"]})], None,
         "'user_gender' needs at most one value, got 2"),
        ([client.make_example({"history_item_ids": list("abcde"), "history_queries": [""] * 5,
                               "target_item_id": "t"})], None, "max_history=4"),
        ([good] * 3, None, "3 examples exceed this server's max_batch_size=2"),
    ]
    for examples, shared, text in cases:
        with pytest.raises(server.ServingError) as info:
            validation.check_examples(examples, limits, shared)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.message, info.value.message
    validation.check_examples([client.make_example({"history_queries": ["", "", ""], "target_item_id": "t"})],
                              limits, context)  # the context's three steps, the example's three queries
    many = client.make_example({"history_item_ids": ["a"] * 4, "history_queries": [""] * 4, "target_item_id": "t",
                                "other": list(range(60))})
    with pytest.raises(server.ServingError) as info:
        validation.check_examples([many], limits)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_elements is 50" in info.value.message


def test_example_features_of_the_wrong_kind_or_count_are_invalid_argument(setup, grpc_client):
    users = {schema.user_attribute_feature(n): "" for n in user_names(setup)}
    base = {"history_item_ids": ["a", "b"], "history_queries": ["", ""], "target_item_id": "t", **users}
    cases = {"two targets": ({**base, "target_item_id": ["t", "u"]}, "'target_item_id' needs exactly one value, got 2"),
             "no target": ({k: v for k, v in base.items() if k != "target_item_id"}, "got 0"),
             "numbers as items": ({**base, "history_item_ids": [1, 2]}, "must be a bytes_list")}
    for case, (features, text) in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.regress([client.make_example(features)])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details(), case
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.regress([client.make_example(base)] * 257)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_size=256" in info.value.details()


# ---------------------------------------------------------------------------------------------------- TLS
def _certificates(tmp_path):
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by it,
    and a client certificate from another CA: PEM text by name."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def issue(subject, key, issuer, issuer_key, ca=False, server=False):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    def key_pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()

    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client", "rogue_ca", "rogue")}
    return {
        "ca": issue("test CA", keys["ca"], "test CA", keys["ca"], ca=True),
        "server_key": key_pem(keys["server"]),
        "server": issue("127.0.0.1", keys["server"], "test CA", keys["ca"], server=True),
        "client_key": key_pem(keys["client"]),
        "client": issue("client", keys["client"], "test CA", keys["ca"]),
        "rogue_key": key_pem(keys["rogue"]),
        "rogue": issue("rogue", keys["rogue"], "rogue CA", keys["rogue_ca"]),
    }


def _ssl_config_file(path, **fields):
    from google.protobuf import text_format

    from serving import tls

    path.write_text(text_format.MessageToString(tls.SSLConfig(**fields)))
    return str(path)


def test_mutual_tls_for_grpc_rest_and_query(setup, grpc_client, tmp_path, capsys):
    """--ssl-config-file (TF Serving's SSLConfig) with client_verify: a client with a certificate of the CA
    ranks as over plaintext; a plaintext client, a client without a certificate and one whose certificate
    another CA signed all fail, over gRPC and REST; seminar-tf query takes the same option."""
    pem = _certificates(tmp_path)
    server_config = _ssl_config_file(tmp_path / "server.txt", server_key=pem["server_key"],
                                     server_cert=pem["server"], custom_ca=pem["ca"], client_verify=True)
    good = _ssl_config_file(tmp_path / "client.txt", custom_ca=pem["ca"], server_key=pem["client_key"],
                            server_cert=pem["client"])
    no_cert = _ssl_config_file(tmp_path / "no_cert.txt", custom_ca=pem["ca"])
    rogue = _ssl_config_file(tmp_path / "rogue.txt", custom_ca=pem["ca"], server_key=pem["rogue_key"],
                             server_cert=pem["rogue"])
    inputs = ctr_inputs(setup, rows=1, length=8)
    history = list(zip(inputs["history_item_ids"][0], inputs["history_queries"][0]))
    candidates = [(setup["items"][i], "") for i in range(2, 8)]
    want = grpc_client.rank(history, candidates)
    secure = server.serve(MODEL_NAME, setup["base"], port=0, rest_port=0, ssl_config_file=server_config)
    try:
        target, url = f"127.0.0.1:{secure.grpc_port}", f"https://127.0.0.1:{secure.rest_port}"
        with client.PredictClient(target, timeout=30, ssl_config_file=good) as tls_client:
            got = tls_client.rank(history, candidates)
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-6)
        assert client.RestClient(url, ssl_config_file=good).status()["model_version_status"][0]["state"] == \
            "AVAILABLE"
        for ssl_file in (None, no_cert, rogue):
            with client.PredictClient(target, timeout=5, ssl_config_file=ssl_file) as refused:
                with pytest.raises(grpc.RpcError) as info:
                    refused.status()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, ssl_file
        for base_url, ssl_file in ((f"http://127.0.0.1:{secure.rest_port}", None), (url, no_cert), (url, rogue)):
            with pytest.raises((OSError, client.RestError)):  # URLError, SSLError, reset: no answer
                client.RestClient(base_url, timeout=5, ssl_config_file=ssl_file).status()
        (tmp_path / "history.json").write_text(json.dumps(
            {"user": {n: "" for n in user_names(setup)}, "history": [{"item_id": i, "query": q} for i, q in history]}))
        (tmp_path / "candidates.json").write_text(json.dumps([{"item_id": i} for i, _ in candidates]))
        query = ["query", "--target", target, "--user-history", str(tmp_path / "history.json"), "--candidates",
                 str(tmp_path / "candidates.json"), "--json"]
        capsys.readouterr()
        assert _cli(query + ["--ssl-config-file", good]) == 0
        ranked = [json.loads(line)["item_id"] for line in capsys.readouterr().out.splitlines()]
        assert ranked == [candidates[i][0] for i, _ in want]
        assert _cli(query + ["--ssl-config-file", rogue, "--timeout", "5"]) == 1
        assert "query failed: UNAVAILABLE" in capsys.readouterr().err
    finally:
        secure.stop()
    with pytest.raises(server.StartupError, match="a server needs both server_key and server_cert"):
        server.serve(MODEL_NAME, setup["base"], port=0, rest_port=None, ssl_config_file=no_cert)
    (tmp_path / "broken.txt").write_text("server_key: not quoted")
    with pytest.raises(server.StartupError, match="not an SSLConfig text proto"):
        server.serve(MODEL_NAME, setup["base"], port=0, rest_port=None, ssl_config_file=str(tmp_path / "broken.txt"))


# ---------------------------------------------------------------------------------------------------- versions
@pytest.mark.slow
def test_version_swap_under_load(setup, grpc_client, tmp_path):
    """A client hammers Predict while a new version is exported; no request fails and the new one serves."""
    inputs = ctr_inputs(setup)
    base = setup["base"]
    before = grpc_client.predict(inputs, "ctr")["probability"]
    # Not versions: a hidden temporary directory with garbage, and an integer directory without saved_model.pb
    os.makedirs(os.path.join(base, f"{export.TMP_PREFIX}garbage"))
    with open(os.path.join(base, f"{export.TMP_PREFIX}garbage", "saved_model.pb"), "w") as f:
        f.write("not a proto")
    os.makedirs(os.path.join(base, "2"))

    seen, failures, stop = [], [], threading.Event()

    def hammer():
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc_client.channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = MODEL_NAME, "ctr"
        for name, value in _bytes(inputs).items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        deadline = time.time() + 600  # stops when told to; the export may take minutes on a loaded machine
        for _ in range(100_000):
            if stop.is_set() or time.time() > deadline:
                return
            try:
                started = time.monotonic()
                response = stub.Predict(request, timeout=60)
                seen.append((response.model_spec.version.value,
                             float(tf.make_ndarray(response.outputs["probability"])[0]), started,
                             time.monotonic()))
            except grpc.RpcError as err:
                failures.append(f"{err.code()}: {err.details()}")

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        model = setup["model"]
        bias = model.tower.layers[-1].bias
        bias.assign_add(tf.ones_like(bias))  # version 3 answers differently
        try:
            path = _export(model, setup["metadata"], setup["data"], base)
        finally:
            bias.assign_sub(tf.ones_like(bias))
        assert os.path.basename(path) == "3"
        deadline = time.time() + 120
        while time.time() < deadline and not any(v == 3 for v, *_ in seen[-5:]):
            time.sleep(0.1)
        count = len(seen)
        while time.time() < deadline and len(seen) < count + 5:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert failures == []
    versions = [v for v, *_ in seen]
    assert versions[0] == 1 and set(versions) == {1, 3}
    # In-flight requests keep the version they started with; every request started after the first answer
    # of version 3 gets version 3.
    first_new = min(done for v, _, _, done in seen if v == 3)
    assert versions.index(3) > 0 and {v for v, _, started, _ in seen if started > first_new} == {3}
    old = [p for v, p, *_ in seen if v == 1]
    new = [p for v, p, *_ in seen if v == 3]
    assert old[0] == pytest.approx(before[0], rel=1e-6) and new[0] != pytest.approx(before[0], rel=1e-3)
    assert grpc_client.status() == [(3, "AVAILABLE", 0, ""), (1, "END", 0, "")]
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.predict(inputs, "ctr", version=1)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert grpc_client.predict(inputs, "ctr", version=3)["probability"][0] == pytest.approx(new[-1], rel=1e-6)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_versions_canonical_names_retry_after_a_failed_load_and_unload_deleted_versions(setup, tmp_path):
    """Like TF Serving's file-system source: only canonical decimal names are versions (0010 and ² are
    ignored with a log line); a version caught mid-copy fails, is not retried while its files stay the same,
    and loads once the copy completes; a deleted serving version is unloaded (END) and the next one serves;
    with none left, requests answer NOT_FOUND saying why."""
    import shutil

    source, base = setup["path"], tmp_path / "seminar"
    shutil.copytree(source, base / "1")
    for odd in ("0010", "²", "+3", " 4"):
        (base / odd).mkdir()
        shutil.copy(os.path.join(source, "saved_model.pb"), base / odd)
    lines = _Lines()
    logging.getLogger("serving").addHandler(lines)
    try:
        manager = server.ModelManager(MODEL_NAME, str(base), poll_seconds=1.0)
        assert manager.poll() == 1 and manager.poll() is None
        assert manager.status(MODEL_NAME) == [(1, "AVAILABLE", 0, "")]
        for odd in ("0010", "²", "+3", " 4"):
            assert sum(f"ignoring {odd!r}: not a version" in line for line in lines.lines) == 1, odd  # logged once
        (base / "2").mkdir()  # a non-atomic copy caught half way: saved_model.pb without its variables
        shutil.copy(os.path.join(source, "saved_model.pb"), base / "2")
        assert manager.poll() is None and manager.poll() is None
        state, code, message = manager.status(MODEL_NAME, 2)[0][1:]
        assert (state, code) == ("END", 13) and "load failed" in message
        assert sum("version 2 failed to load" in line for line in lines.lines) == 1  # not retried unchanged
        assert manager.current_version == 1
        shutil.copytree(source, base / "2", dirs_exist_ok=True)  # the copy completes
        assert manager.poll() == 2
        assert manager.status(MODEL_NAME) == [(2, "AVAILABLE", 0, ""), (1, "END", 0, "")]
        shutil.rmtree(base / "2")
        assert manager.poll() == 1  # the served version was deleted: the next highest present one serves
        assert manager.status(MODEL_NAME) == [(2, "END", 0, ""), (1, "AVAILABLE", 0, "")]
        shutil.rmtree(base / "1")
        assert manager.poll() is None and manager.current_version is None
        assert manager.status(MODEL_NAME) == [(2, "END", 0, ""), (1, "END", 0, "")]
        with pytest.raises(server.ServingError) as info:
            manager.servable(MODEL_NAME)
        assert info.value.code == grpc.StatusCode.NOT_FOUND and "version 1 was deleted" in info.value.message
    finally:
        logging.getLogger("serving").removeHandler(lines)
    assert server.complete_versions(str(base)) == []
    with pytest.raises(ValueError, match="poll_seconds must be >= 1"):
        server.ModelManager(MODEL_NAME, str(base), poll_seconds=0)


# ---------------------------------------------------------------------------------------------------- CLI
def test_rank_sample_user_serves_ranks_and_stops(setup, grpc_client):
    text = export.rank_sample_user(setup["base"], setup["data"], num_candidates=6)
    lines = text.splitlines()
    assert lines[0].startswith("sample user:") and len(lines) == 2 + 6
    scores = [float(line.split()[1]) for line in lines[2:]]
    assert scores == sorted(scores, reverse=True)
    assert sum("actual target" in line for line in lines) == 1
    history, candidates, user = export.sample_user(setup["data"], MAX_HISTORY, 6)
    want = grpc_client.rank(history, candidates, user)  # the module's server answers the same
    assert [candidates[i][0] for i, _ in want] == [line.split()[2] for line in lines[2:]]


def _cli(argv):
    parser = argparse.ArgumentParser()
    serving_cli.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args, [])


def test_query_cli_ranks_candidates(setup, grpc_client, tmp_path, capsys):
    inputs = ctr_inputs(setup, rows=1, length=6)
    history = [{"item_id": i, "query": q} for i, q in zip(inputs["history_item_ids"][0], inputs["history_queries"][0])
               if i]
    user = {name: "" for name in user_names(setup)}
    (tmp_path / "history.json").write_text(json.dumps({"user": user, "history": history}))
    candidates = [{"item_id": setup["items"][i], "query": setup["queries"][3 + i] if i % 3 else ""}
                  for i in range(2, 9)]
    (tmp_path / "candidates.jsonl").write_text("\n".join(json.dumps(c) for c in candidates) + "\n")
    assert _cli(["query", "--target", f"127.0.0.1:{setup['server'].grpc_port}", "--user-history",
                 str(tmp_path / "history.json"), "--candidates", str(tmp_path / "candidates.jsonl"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["rank"] for line in lines] == list(range(1, len(candidates) + 1))
    scores = [line["score"] for line in lines]
    assert scores == sorted(scores, reverse=True)
    want = grpc_client.rank([(h["item_id"], h["query"]) for h in history],
                            [(c["item_id"], c["query"]) for c in candidates], user)
    assert [candidates[i]["item_id"] for i, _ in want] == [line["item_id"] for line in lines]


def test_query_cli_ranks_from_a_cached_history_state(setup, grpc_client, rest, tmp_path, capsys):
    inputs = ctr_inputs(setup, rows=1, length=6)
    history = [{"item_id": i, "query": q} for i, q in zip(inputs["history_item_ids"][0], inputs["history_queries"][0])
               if i]
    history[0]["query"] = "words nobody searched"  # unknown query text travels in the state as tokens
    user = {name: "" for name in user_names(setup)}
    (tmp_path / "history.json").write_text(json.dumps({"user": user, "history": history}))
    candidates = [{"item_id": setup["items"][i], "query": ""} for i in range(2, 7)]
    (tmp_path / "candidates.json").write_text(json.dumps(candidates))
    state_file = tmp_path / "state.npz"
    argv = ["query", "--target", f"127.0.0.1:{setup['server'].grpc_port}", "--user-history",
            str(tmp_path / "history.json"), "--candidates", str(tmp_path / "candidates.json"), "--json",
            "--history-state", str(state_file)]
    pairs = [(h["item_id"], h["query"]) for h in history]
    want = grpc_client.rank(pairs, [(c["item_id"], c["query"]) for c in candidates], user)

    def ranked():
        captured = capsys.readouterr()
        return [json.loads(line) for line in captured.out.splitlines()], captured.err

    assert _cli(argv) == 0
    lines, err = ranked()
    assert "encoded 6 steps" in err and state_file.exists()
    assert [candidates[i]["item_id"] for i, _ in want] == [line["item_id"] for line in lines]
    np.testing.assert_allclose([line["score"] for line in lines], [score for _, score in want], rtol=1e-6)
    assert _cli(argv) == 0
    again, err = ranked()
    assert "cached" in err and again == lines
    # a state of other vocabularies is refused by the server and encoded again
    with np.load(state_file) as data:
        stale = {k: data[k] for k in data.files}
    stale["history_state_fingerprint"] = stale["history_state_fingerprint"] + 1
    np.savez(state_file, **stale)
    assert _cli(argv) == 0
    refused, err = ranked()
    assert "refused" in err and "history_state_fingerprint" in err and refused == lines
    # the server checks the state's declared shapes before the graph runs
    state = grpc_client.encode_history(pairs)
    bad = {**state, "history_state_queries": state["history_state_queries"][:, :-1]}
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.rank_state(bad, [(c["item_id"], c["query"]) for c in candidates], user)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "history_state_queries must have the shape of history_state_items" in info.value.details()
    # REST takes the state as JSON numbers (columnar "inputs"), the same scores
    columns = {k: v.tolist() for k, v in state.items()}
    columns.update({"candidate_item_ids": [[c["item_id"] for c in candidates]],
                    "candidate_queries": [[c["query"] for c in candidates]]})
    columns.update({f"user_{name}": [""] for name in user})
    scores = rest.predict(inputs=columns, signature_name="rank_state")["outputs"]["scores"][0]
    np.testing.assert_allclose(sorted(scores, reverse=True), [score for _, score in want], rtol=1e-6)


def test_user_history_file_formats(tmp_path):
    events = [{"user_id": "u1", "timestamp": 30, "item_id": "c", "query": "", "event": "click"},
              {"user_id": "u1", "timestamp": 10, "item_id": "a", "query": "red shoes", "event": "click"},
              {"user_id": "u1", "timestamp": 20, "item_id": "x", "query": "", "event": "impression"},
              {"user": {"gender": "f", "user_id": "u1"}}]
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events))
    history, user = serving_cli.read_user_history(str(tmp_path / "events.jsonl"))
    assert history == [("a", "red shoes"), ("c", "")] and user == {"gender": "f", "id": "u1"}  # "id": user_id input
    (tmp_path / "history.json").write_text(json.dumps(
        {"user": {"id": "u2"}, "history": [{"item_id": "a", "feedback": "impression:r4"}, {"item_id": "b"}]}))
    history, user = serving_cli.read_user_history(str(tmp_path / "history.json"))
    assert history == [("a", "", "impression:r4"), ("b", "")] and user == {"id": "u2"}
    assert client.rank_inputs(history, [("c", "")], [], feedback=True)["history_feedback"].tolist() == [
        [b"impression:r4", b""]]  # a step without feedback sends "" (unknown)
    (tmp_path / "candidates.json").write_text(json.dumps([{"item_id": 5}, {"item_id": "b", "query": "q"}]))
    assert serving_cli.read_candidates(str(tmp_path / "candidates.json")) == [("5", ""), ("b", "q")]
    (tmp_path / "bad.json").write_text(json.dumps([{"query": "no item"}]))
    with pytest.raises(SystemExit, match="item_id"):
        serving_cli.read_candidates(str(tmp_path / "bad.json"))


def test_serve_cli_with_models_config_fails_fast_when_the_base_path_is_missing(capsys):
    """models.config names /models/seminar (the container's path): here it does not exist, so serve exits 2
    naming it instead of serving nothing."""
    assert _cli(["serve", "--model-config-file", os.path.join(REPO, "serving", "models.config"), "--port", "0",
                 "--rest-port", "0", "--max-seconds", "0.5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "model base path /models/seminar does not exist" in captured.err


def test_serve_accepts_tensorflow_model_servers_flag_spellings():
    """A user coming from tensorflow_model_server keeps its flag spellings (--flag value and --flag=value); each
    sets the same option as the project's own spelling."""
    parser = argparse.ArgumentParser()
    serving_cli.add_cli(parser.add_subparsers(dest="command"))
    tf_serving = parser.parse_args([
        "serve", "--model_name=m", "--model_base_path=/models/m", "--port=8600", "--rest_api_port", "8601",
        "--file_system_poll_wait_seconds=3", "--tensorflow_intra_op_parallelism=1",
        "--tensorflow_inter_op_parallelism", "2", "--ssl_config_file=ssl.cfg"])
    own = parser.parse_args([
        "serve", "--model-name", "m", "--model-base-path", "/models/m", "--port", "8600", "--rest-port", "8601",
        "--poll-seconds", "3", "--tensorflow-intra-op-parallelism", "1", "--tensorflow-inter-op-parallelism", "2",
        "--ssl-config-file", "ssl.cfg"])
    assert vars(tf_serving) == vars(own)
    assert (own.model_name, own.model_base_path, own.rest_port, own.poll_seconds) == ("m", "/models/m", 8601, 3.0)
    config_file = parser.parse_args(["serve", "--model_config_file=/models/models.config"])
    assert config_file.model_config_file == "/models/models.config"


def test_serve_fails_fast_with_exit_2_and_a_clear_message(setup, tmp_path, capsys, monkeypatch):
    """A missing or empty base path, a port out of range or in use (the message names it), a poll interval
    under 1 s and a concurrency under 1: exit 2 with a message, before any model is loaded."""
    import socket

    from serving import versions

    loads = []

    def no_load(*args, **kwargs):
        loads.append(args)
        raise AssertionError("a model was loaded before the bad option was refused")

    base = setup["base"]
    monkeypatch.setattr(versions.tf.saved_model, "load", no_load)  # every refusal below comes before any load
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "0010").mkdir()  # not a version name
    for argv, text in ((["--model-base-path", str(tmp_path / "nothing")], "does not exist"),
                       (["--model-base-path", str(tmp_path / "empty")], "holds no version")):
        assert _cli(["serve", *argv, "--port", "0", "--rest-port", "0", "--max-seconds", "0.1"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and text in captured.err and str(tmp_path) in captured.err
    for flag, value, text in (("--port", "70000", "70000 is out of range: a TCP port is 0-65535"),
                              ("--rest-port", "-1", "-1 is out of range"),
                              ("--poll-seconds", "0", "must be >= 1, got 0"),
                              ("--poll-seconds", "0.5", "must be >= 1, got 0.5"),
                              ("--max-concurrency", "0", "must be >= 1, got 0")):
        with pytest.raises(SystemExit) as info:
            _cli(["serve", "--model-base-path", base, "--port", "0", "--rest-port", "0", flag, value])
        assert info.value.code == 2
        assert text in capsys.readouterr().err, flag
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv, text in ((["--port", str(port), "--rest-port", "0"],
                            f"gRPC port {port} on 127.0.0.1 cannot be bound"),
                           (["--port", "0", "--rest-port", str(port)], f"REST port {port} on 127.0.0.1 cannot be "
                                                                       "bound: it is in use")):
            assert _cli(["serve", "--model-base-path", base, *argv, "--max-seconds", "0.1"]) == 2
            assert text in capsys.readouterr().err
    with pytest.raises(server.StartupError, match="poll_seconds must be >= 1"):
        server.serve(MODEL_NAME, base, port=0, rest_port=None, poll_seconds=0.2)
    assert loads == []


def test_serve_cli_sets_tensorflow_thread_pools_in_a_fresh_process(setup):
    """--tensorflow-intra/inter-op-parallelism (TF Serving's flags) take effect in the server process."""
    base = setup["base"]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--model-base-path", base, "--port", "0", "--rest-port", "0",
         "--max-seconds", "0.2",
         "--tensorflow-intra-op-parallelism", "1", "--tensorflow-inter-op-parallelism", "3"],
        env=env, capture_output=True, text=True, timeout=300, check=True)
    started = json.loads(out.stdout.splitlines()[0])
    assert started["tensorflow_parallelism"] == {"intra_op": 1, "inter_op": 3}
    assert started["malloc"] == {"tuned": True, "mmap_threshold_bytes": 32 << 20, "trim_threshold_bytes": 256 << 20}


_MALLOC_PROBE = '''
import ctypes, json
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
def probe(size):  # (mmapped blocks this malloc added, free heap bytes kept after its free)
    before = libc.mallinfo2().hblks
    pointer = libc.malloc(size)
    added = libc.mallinfo2().hblks - before
    libc.free(ctypes.c_void_p(pointer))
    return added, libc.mallinfo2().fordblks
out = {"default": probe(16 << 20)}  # before anything raised glibc's adaptive threshold
from serving import server
try:
    server.tune_malloc(-1)
except ValueError as err:
    out["refused"] = str(err)
out["settings"] = server.tune_malloc(32)
out["tuned"] = probe(16 << 20)
print(json.dumps(out))
'''


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning")
def test_tuned_malloc_serves_request_sized_buffers_from_the_heap_and_keeps_them():
    """tune_malloc: a 16 MiB buffer (a request's [N, L] scores are 4 MB) comes from the heap, not a fresh
    mmap, and its memory stays in the heap after free for the next request; a negative value names the flag."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = json.loads(subprocess.run([sys.executable, "-c", _MALLOC_PROBE], env=env, capture_output=True, text=True,
                                    timeout=300, check=True).stdout.splitlines()[-1])
    assert out["default"][0] == 1  # glibc's default: a fresh mmap, returned to the kernel on free
    assert out["settings"] == {"tuned": True, "mmap_threshold_bytes": 32 << 20, "trim_threshold_bytes": 256 << 20}
    added, kept = out["tuned"]
    assert added == 0 and kept >= 16 << 20
    assert "malloc_mmap_threshold_mb must be >= 0" in out["refused"]


def test_thread_settings_after_tensorflow_ran_fail_naming_the_flag():
    tf.constant(1.0) + 1.0  # the runtime exists now
    current = tf.config.threading.get_intra_op_parallelism_threads()
    with pytest.raises(RuntimeError, match="tensorflow_intra_op_parallelism=.*set it when the server process starts"):
        server.set_tensorflow_parallelism(intra_op=current + 5)
    with pytest.raises(ValueError, match="tensorflow_inter_op_parallelism must be >= 0"):
        server.set_tensorflow_parallelism(inter_op=-1)
    assert server.set_tensorflow_parallelism()["intra_op"] == current  # 0 = keep what is in effect


# ---------------------------------------------------------------------------------------------------- bench
@pytest.mark.slow
def test_serving_bench_writes_reports_with_zero_errors(tmp_path):
    from seminar_tf.bench import serving as serving_bench
    from seminar_tf.bench import stamp

    small = serving_bench.ServingBenchConfig(history_length=40, num_candidates=5, clients=2, requests=6, repeats=2,
                                             fewer_clients=(1,),
                                             sequential_requests=2, grid_lengths=(20, 40), grid_candidates=(2, 5),
                                             grid_requests=2, model_preset="test", pq_subspaces=4,
                                             pq_centroids=16, rerank=2)
    text = serving_bench.run(str(tmp_path / "out"), str(tmp_path / "work"), bench=small,
                             model_dir=str(tmp_path / "no-run"))
    with open(tmp_path / "out" / "serving.json") as f:
        report = json.load(f)
    assert [r["path"] for r in report["rows"]] == ["exact", "exact+state", "pq_adc", "pq_adc+state", "pq_adc_rerank",
                                                   "pq_adc_rerank+state"]
    for row in report["rows"]:
        assert (row["L"], row["N"]) == (40, 5)
        assert row["concurrent"]["completed"] == 6 and row["concurrent"]["errors"] == 0
        assert 0 < row["concurrent"]["p50_ms"] <= row["concurrent"]["p99_ms"] and row["concurrent"]["qps"] > 0
        settings = [(x["intra_op_threads"], x["malloc_mmap_threshold_mb"], x["clients"]) for x in row["sweep"]]
        if row["signature"] == "rank":
            assert settings == [(0, 32, 1), (0, 32, 2), (1, 32, 1), (1, 32, 2), (1, 0, 1), (1, 0, 2)]
        else:  # the state path's load test runs at the target's client count only
            assert settings == [(0, 32, 2), (1, 32, 2), (1, 0, 2)]
            state = row["state"]
            # indices as int32 per step (the test model has no feedback): about 8 bytes per step plus a header
            assert 8 <= state["bytes_per_step_ids"] < 12 and 0 < state["encode_history"]["p50_ms"]
            assert state["bytes_per_step_float"] == 4 * state["channels"] * state["dim"]
            assert state["bytes_per_step_pq_codes"] == state["channels"] * 4  # S = 4 sub-spaces, one byte each
        assert all(x["errors_total"] == 0 and len(x["p99_ms_runs"]) == 2 for x in row["sweep"])
        assert all(x["p99_ms"] in x["p99_ms_runs"] for x in row["sweep"])
        if sys.platform.startswith("linux"):  # CPU per request from /proc: the server process did the work
            assert all(x["server_cpu_ms_per_request"] > 0 and x["client_cpu_ms_per_request"] > 0 for x in row["sweep"])
        # the same load without the server: threads of a fresh process, the load row's TF threads and malloc
        alone = row["in_process_concurrent"]
        assert (alone["clients"], alone["requests"], len(alone["p99_ms_runs"])) == (2, 6, 2)
        assert (alone["intra_op_threads"], alone["malloc_mmap_threshold_mb"]) == (
            row["concurrent"]["intra_op_threads"], row["concurrent"]["malloc_mmap_threshold_mb"])
        assert 0 < alone["p50_ms"] <= alone["p99_ms"] and alone["qps"] > 0 and alone["p99_ms"] in alone["p99_ms_runs"]
        assert alone["cpu_ms_per_request"] > 0
    assert text == stamp.render(report) and report["commit"] == stamp.commit()  # the Markdown is the JSON rendered
    # the server's CPU share is the difference to the model alone; none is claimed when it does not show
    row = report["rows"][0]
    row["concurrent"]["server_cpu_ms_per_request"], row["in_process_concurrent"]["cpu_ms_per_request"] = 9.5, 7.25
    assert "cost about 2.25 ms per request" in "\n".join(serving_bench._findings(report))
    row["concurrent"]["server_cpu_ms_per_request"] = 7.0
    assert "no measurable cost of the server's own work" in "\n".join(serving_bench._findings(report))
    assert report["paths"]["pq_adc_rerank"] == "pq_adc S=4 C=16, exact re-rank of 2·K"
    assert len(report["grid"]) == 12 and report["command"] == "seminar-tf bench serving"
    assert {(g["gsu"], g["L"], g["N"]) for g in report["grid"]} == {
        (gsu, length, n) for gsu in ("exact", "pq_adc", "pq_adc_rerank") for length in (20, 40) for n in (2, 5)}
    assert "fastest in-process path" in text and "server intra-op threads 1, malloc 0 (glibc default)" in text
    assert "## History state" in text and "| exact+state | 40 | 5 |" in text
    report["rows"][1]["L"], report["rows"][1]["N"] = 10_000, 100  # the targets are read at L=10^4, N=100 only
    report["rows"][1]["concurrent"]["p99_ms"], report["rows"][1]["in_process"]["p50_ms"] = 19.5, 6.5
    findings = "\n".join(serving_bench._findings(report))
    assert "best path exact+state, 19.5 ms: met" in findings and "best path exact+state, 6.5 ms: missed" in findings
    assert report["in_process_malloc"]["tuned"] is (platform.libc_ver()[0] == "glibc")
    assert text == (tmp_path / "out" / "serving.md").read_text()
