"""A local, TF Serving-compatible model server: PredictionService + ModelService over gRPC and TF Serving's
REST routes, on any SavedModel export base (``<base>/<version>/saved_model.pb``).

What it shares with ``tensorflow_model_server`` (so clients written against one work with the other):
  * the official ``tensorflow_serving.apis`` protos and gRPC services: Predict, Classify, Regress,
    GetModelMetadata (``signature_def``) and GetModelStatus;
  * the REST routes ``/v1/models/{name}[/versions/{v}]:predict|:classify|:regress``,
    ``/v1/models/{name}[/versions/{v}]/metadata`` and ``GET /v1/models/{name}[/versions/{v}]`` (status),
    with TF Serving's JSON bodies ("instances"/"inputs", "predictions"/"outputs", "examples"/"context",
    "results", {"b64": ...} for bytes, {"error": ...} on failure);
  * versions: the highest complete integer version under the base path is served (policy "latest 1"), the
    base path is polled and a new version is loaded, warmed up (``assets.extra/tf_serving_warmup_requests``)
    and swapped in without a restart; directories whose names are not integers (``.tmp-export-*``) and
    versions without ``saved_model.pb`` are never loaded.

Differences, all deliberate: an unknown signature answers NOT_FOUND (TF Serving: FAILED_PRECONDITION for
Predict, INVALID_ARGUMENT for Classify/Regress); inputs are checked against the SignatureDef (missing,
unknown, dtype, rank and fixed dimensions) before running, so such requests answer INVALID_ARGUMENT with the
input's name; one model per server.

Limits: binds 127.0.0.1 unless told otherwise; ``max_message_bytes`` caps gRPC messages and REST bodies
(RESOURCE_EXHAUSTED / HTTP 413); ``max_concurrency`` requests run at once (gRPC worker threads, a REST
semaphore), ``max_queued`` more wait (gRPC answers RESOURCE_EXHAUSTED beyond them; REST answers 503 after
``queue_timeout_s``). Errors in one request never stop the server.

Example:
    server = serve("seminar", "runs/demo/export/seminar", port=8500, rest_port=8501)
    ...
    server.stop()
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.example import example_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    input_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

LOG = logging.getLogger("serving")

DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_DEF_FIELD = "signature_def"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 8
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499,
}
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request error with its gRPC status code (mapped to an HTTP status on the REST side)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: Optional[int] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status or _HTTP_STATUS.get(code, 500)


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ---------------------------------------------------------------------------------------------------- servables
@dataclasses.dataclass
class Servable:
    """One loaded version: the SavedModel's SignatureDefs (as TF Serving reads them) and its functions."""

    version: int
    path: str
    signature_defs: Dict[str, meta_graph_pb2.SignatureDef]
    functions: Dict[str, object]
    loaded: object  # keeps the restored object (variables, tables) alive


def complete_versions(base_path: str) -> List[int]:
    """Integer-named children of ``base_path`` that hold a saved_model.pb (temporary directories are skipped)."""
    if not tf.io.gfile.isdir(base_path):
        return []
    versions = []
    for name in tf.io.gfile.listdir(base_path):
        name = name.rstrip("/")
        if name.isdigit() and tf.io.gfile.exists(os.path.join(base_path, name, "saved_model.pb")):
            versions.append(int(name))
    return sorted(versions)


def read_signature_defs(path: str) -> Dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs of the ``serve`` MetaGraph (method names included), without the init op."""
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}
    raise ValueError(f"{path}: no MetaGraph tagged 'serve'")


def load_servable(path: str, version: int, warmup: bool = True) -> Servable:
    """Loads one version and replays its warmup requests (a failing warmup fails the load, as in TF Serving)."""
    signature_defs = read_signature_defs(path)
    loaded = tf.saved_model.load(path, tags=["serve"])
    functions = {name: loaded.signatures[name] for name in signature_defs}
    servable = Servable(version, path, signature_defs, functions, loaded)
    warmup_path = os.path.join(path, WARMUP_FILE)
    if warmup and tf.io.gfile.exists(warmup_path):
        replayed = 0
        for record in tf.data.TFRecordDataset(warmup_path).as_numpy_iterator():
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") == "predict_log":
                request = log.predict_log.request
                run_predict(servable, request.model_spec.signature_name or DEFAULT_SIGNATURE,
                            {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
                replayed += 1
        LOG.info("version %d: replayed %d warmup requests", version, replayed)
    return servable


class ModelManager:
    """Serves the highest complete version under ``base_path`` and swaps in newer ones as they appear.

    ``poll`` is called every ``poll_seconds`` by a daemon thread (``start``), like TF Serving's file-system
    poller. In-flight requests keep the servable they started with; a version whose load failed is not
    retried (export it again as a new version).
    """

    def __init__(self, model_name: str, base_path: str, poll_seconds: float = 1.0, warmup: bool = True):
        self.model_name = model_name
        self.base_path = base_path
        self.poll_seconds = float(poll_seconds)
        self.warmup = warmup
        self._lock = threading.Lock()
        self._current: Optional[Servable] = None
        self._states: Dict[int, Tuple[str, int, str]] = {}  # version -> (state, tf error code, message)
        self._failed: set = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def poll(self) -> Optional[int]:
        """Loads the newest complete version if it is not the one served; returns it when swapped in."""
        versions = [v for v in complete_versions(self.base_path) if v not in self._failed]
        current = self._current
        if not versions or (current is not None and versions[-1] == current.version):
            return None
        version = versions[-1]
        path = os.path.join(self.base_path, str(version))
        with self._lock:
            self._states[version] = ("LOADING", 0, "")
        started = time.time()
        try:
            servable = load_servable(path, version, warmup=self.warmup)
        except Exception as err:  # noqa: BLE001  (any load failure leaves the current version serving)
            LOG.error("model %s version %d failed to load: %s", self.model_name, version, err)
            with self._lock:
                self._failed.add(version)
                self._states[version] = ("END", 13, f"load failed: {err}")  # 13 = INTERNAL
            return None
        with self._lock:
            previous, self._current = self._current, servable
            self._states[version] = ("AVAILABLE", 0, "")
            if previous is not None:
                self._states[previous.version] = ("END", 0, "")
        LOG.info("model %s: serving version %d (loaded in %.1fs)", self.model_name, version, time.time() - started)
        return version

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001  (the poller must survive a flaky file system)
                    LOG.exception("model %s: polling %s failed", self.model_name, self.base_path)

        self._thread = threading.Thread(target=loop, name=f"poll-{self.model_name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.poll_seconds))

    @property
    def current_version(self) -> Optional[int]:
        current = self._current
        return current.version if current is not None else None

    def servable(self, name: str, version: Optional[int] = None, label: str = "") -> Servable:
        if name != self.model_name:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
        if label:
            raise _invalid(f"version label {label!r}: this server has no version labels; use a version number")
        current = self._current
        if current is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Latest({name}); no complete version under "
                               f"{self.base_path} yet")
        if version is not None and version != current.version:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Specific({name}, {version}); serving version "
                               f"{current.version}")
        return current

    def status(self, name: str, version: Optional[int] = None) -> List[Tuple[int, str, int, str]]:
        if name != self.model_name:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        with self._lock:
            states = dict(self._states)
        if version is not None:
            if version not in states:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        return [(v, *states[v]) for v in sorted(states, reverse=True)]


# ---------------------------------------------------------------------------------------------------- running
def _signature(servable: Servable, signature_name: str) -> meta_graph_pb2.SignatureDef:
    signature_def = servable.signature_defs.get(signature_name)
    if signature_def is None:
        raise ServingError(grpc.StatusCode.NOT_FOUND,
                           f"Serving signature key \"{signature_name}\" not found; this model has "
                           f"{sorted(servable.signature_defs)}")
    return signature_def


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def check_inputs(signature_name: str, signature_def: meta_graph_pb2.SignatureDef,
                 inputs: Mapping[str, np.ndarray], dtypes: Mapping[str, int]) -> None:
    """INVALID_ARGUMENT naming the input when ``inputs`` do not fit the SignatureDef.

    ``dtypes``: the DataType enum each input arrived with (TensorProto.dtype for gRPC).
    """
    expected = signature_def.inputs
    missing = sorted(set(expected) - set(inputs))
    unknown = sorted(set(inputs) - set(expected))
    if missing or unknown:
        raise _invalid(f"signature {signature_name!r}: " + "; ".join(
            part for part in (f"missing input(s) {missing}" if missing else "",
                              f"unknown input(s) {unknown}" if unknown else "") if part)
            + f"; it takes {sorted(expected)}")
    for name, info in expected.items():
        value = inputs[name]
        if dtypes[name] != info.dtype:
            raise _invalid(f"input {name!r}: expects {tf.dtypes.as_dtype(info.dtype).name}, got "
                           f"{tf.dtypes.as_dtype(dtypes[name]).name}")
        if info.tensor_shape.unknown_rank:
            continue
        dims = [d.size for d in info.tensor_shape.dim]
        if len(dims) != value.ndim or any(d >= 0 and d != s for d, s in zip(dims, value.shape)):
            raise _invalid(f"input {name!r}: expects shape {_shape_text(dims)}, got {list(value.shape)}")


def dtype_enum(value: np.ndarray) -> int:
    """The TensorFlow DataType enum of a numpy array (bytes/str/object arrays are DT_STRING)."""
    value = np.asarray(value)
    dtype = tf.string if value.dtype.kind in "OSU" else tf.dtypes.as_dtype(value.dtype)
    return dtype.as_datatype_enum


def _tf_error(err: tf.errors.OpError) -> ServingError:
    """TensorFlow error codes are gRPC status codes; the message keeps the error's own lines (an assertion's
    text names the input), not the eager wrapper's "Graph execution error" or the graph node context."""
    kept = []
    for line in (err.message or str(err)).replace("\\'", "'").splitlines():
        text = line.strip()
        if not text or text.startswith(("Graph execution error", "Detected at node", "<stack traces", "File ",
                                         "[[{{node")) or line.startswith((" ", "\t")):
            continue
        kept.append(text)
    message = " ".join(kept) or (err.message or str(err)).strip()
    return ServingError(_CODE_BY_NUMBER.get(err.error_code, grpc.StatusCode.INTERNAL), message)


def tensor_from_proto(name: str, proto):
    """A request's TensorProto as a value to feed (numpy, or a string tensor); INVALID_ARGUMENT naming the input
    when it is malformed (a DT_STRING ``string_val`` count that fits neither the shape nor one broadcast value
    included).

    Strings go straight from ``string_val`` into a tf.string tensor: numpy's object array in between cost about
    0.3 ms more per 10^4-string history input.
    """
    if proto.dtype == tf.string.as_datatype_enum:
        shape = [d.size for d in proto.tensor_shape.dim]
        elements = math.prod(shape)
        values = proto.string_val
        if elements >= 0 and len(values) not in (1, elements):
            raise _invalid(f"malformed TensorProto in input {name!r}: shape {shape} holds {elements} strings, "
                           f"string_val has {len(values)}; send one string per element")
        if elements >= 0 and len(values) == elements:
            return tf.constant(values[:], tf.string, shape=shape)
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as err:
        raise _invalid(f"malformed TensorProto in input {name!r}: {err}") from err


def run_predict(servable: Servable, signature_name: str, inputs: Mapping[str, np.ndarray],
                dtypes: Optional[Mapping[str, int]] = None,
                output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Runs one signature on numpy inputs (checked against its SignatureDef); returns numpy outputs."""
    signature_def = _signature(servable, signature_name)
    if dtypes is None:
        dtypes = {k: dtype_enum(v) for k, v in inputs.items()}
    check_inputs(signature_name, signature_def, inputs, dtypes)
    unknown = sorted(set(output_filter) - set(signature_def.outputs))
    if unknown:
        raise _invalid(f"output_filter {unknown} not in the outputs of {signature_name!r}: "
                       f"{sorted(signature_def.outputs)}")
    function = servable.functions[signature_name]
    feeds = {k: tf.constant(v, dtype=tf.dtypes.as_dtype(signature_def.inputs[k].dtype)) for k, v in inputs.items()}
    try:
        outputs = function(**feeds)
    except tf.errors.OpError as err:
        raise _tf_error(err) from err
    except (TypeError, ValueError) as err:
        raise _invalid(f"signature {signature_name!r}: {err}") from err
    wanted = list(output_filter) or list(outputs)
    return {name: outputs[name].numpy() for name in wanted}


def serialized_examples(request_input: input_pb2.Input) -> np.ndarray:
    """tensorflow.serving.Input → serialized tf.Examples [B] (context features merged into each example)."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = list(request_input.example_list.examples)
    elif kind == "example_list_with_context":
        context = request_input.example_list_with_context.context
        examples = []
        for example in request_input.example_list_with_context.examples:
            merged = example_pb2.Example()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            examples.append(merged)
    else:
        raise _invalid("Input is empty: set input.example_list or input.example_list_with_context")
    if not examples:
        raise _invalid("Input is empty: no examples")
    return np.array([e.SerializeToString() for e in examples], dtype=object)


def _examples_signature(servable: Servable, signature_name: str, outputs: Sequence[str], api: str):
    signature_def = _signature(servable, signature_name)
    if list(signature_def.inputs) != [tf.saved_model.CLASSIFY_INPUTS]:
        raise _invalid(f"{api} needs a signature with the one input {tf.saved_model.CLASSIFY_INPUTS!r} "
                       f"(serialized tf.Example); {signature_name!r} takes {sorted(signature_def.inputs)}")
    if not set(outputs) & set(signature_def.outputs):
        raise _invalid(f"{api} needs a signature with output(s) {list(outputs)}; {signature_name!r} has "
                       f"{sorted(signature_def.outputs)}")
    return signature_def


def run_regress(servable: Servable, signature_name: str, request_input: input_pb2.Input) -> np.ndarray:
    """Regress API: one float per example from the signature's ``outputs`` ([B] or [B, 1])."""
    _examples_signature(servable, signature_name, [tf.saved_model.REGRESS_OUTPUTS], "Regress")
    examples = serialized_examples(request_input)
    values = run_predict(servable, signature_name, {tf.saved_model.REGRESS_INPUTS: examples},
                         output_filter=[tf.saved_model.REGRESS_OUTPUTS])[tf.saved_model.REGRESS_OUTPUTS]
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.shape != (len(examples),):
        raise ServingError(grpc.StatusCode.INTERNAL, f"regression output has shape {values.shape}, expected "
                                                     f"[{len(examples)}] or [{len(examples)}, 1]")
    return values


def run_classify(servable: Servable, signature_name: str,
                 request_input: input_pb2.Input) -> List[List[Tuple[str, float]]]:
    """Classify API: (label, score) per class per example from ``classes`` [B, C] and/or ``scores`` [B, C]."""
    signature_def = _examples_signature(
        servable, signature_name, [tf.saved_model.CLASSIFY_OUTPUT_CLASSES, tf.saved_model.CLASSIFY_OUTPUT_SCORES],
        "Classify")
    examples = serialized_examples(request_input)
    wanted = [n for n in (tf.saved_model.CLASSIFY_OUTPUT_CLASSES, tf.saved_model.CLASSIFY_OUTPUT_SCORES)
              if n in signature_def.outputs]
    outputs = run_predict(servable, signature_name, {tf.saved_model.CLASSIFY_INPUTS: examples},
                          output_filter=wanted)
    classes = outputs.get(tf.saved_model.CLASSIFY_OUTPUT_CLASSES)
    scores = outputs.get(tf.saved_model.CLASSIFY_OUTPUT_SCORES)
    reference = scores if scores is not None else classes
    if reference.ndim != 2 or reference.shape[0] != len(examples):
        raise ServingError(grpc.StatusCode.INTERNAL, f"classification output has shape {reference.shape}, "
                                                     f"expected [{len(examples)}, num_classes]")
    results = []
    for i in range(len(examples)):
        row = []
        for c in range(reference.shape[1]):
            label = classes[i, c].decode("utf-8") if classes is not None else ""
            row.append((label, float(scores[i, c]) if scores is not None else 0.0))
        results.append(row)
    return results


def metadata_response(manager: ModelManager, name: str, version: Optional[int], metadata_fields: Sequence[str],
                      label: str = ""):
    """GetModelMetadataResponse with the ``signature_def`` field (the only one TF Serving defines)."""
    if not metadata_fields:
        raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
    unsupported = [f for f in metadata_fields if f != SIGNATURE_DEF_FIELD]
    if unsupported:
        raise _invalid(f"Metadata field(s) {unsupported} not supported; use {SIGNATURE_DEF_FIELD!r}")
    servable = manager.servable(name, version, label)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature_def in servable.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature_def)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def status_response(manager: ModelManager, name: str, version: Optional[int]):
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state, code, message in manager.status(name, version):
        status = response.model_version_status.add()
        status.version = number
        status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        status.status.error_code = code
        status.status.error_message = message
    return response


def _version_of(model_spec) -> Optional[int]:
    return model_spec.version.value if model_spec.HasField("version") else None


# ---------------------------------------------------------------------------------------------------- gRPC
class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService: Predict, Classify, Regress, GetModelMetadata."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def _servable(self, model_spec) -> Servable:
        return self.manager.servable(model_spec.name, _version_of(model_spec), model_spec.version_label)

    @staticmethod
    def _spec(response_spec, request_spec, servable: Servable, signature_name: str) -> None:
        response_spec.name = request_spec.name
        response_spec.version.value = servable.version
        response_spec.signature_name = signature_name

    def Predict(self, request, context):
        return _answer(context, self._predict, request)

    def _predict(self, request):
        servable = self._servable(request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        inputs = {k: tensor_from_proto(k, v) for k, v in request.inputs.items()}
        outputs = run_predict(servable, signature_name, inputs, {k: v.dtype for k, v in request.inputs.items()},
                              list(request.output_filter))
        response = predict_pb2.PredictResponse()
        self._spec(response.model_spec, request.model_spec, servable, signature_name)
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
        return response

    def Classify(self, request, context):
        return _answer(context, self._classify, request)

    def _classify(self, request):
        servable = self._servable(request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        response = classification_pb2.ClassificationResponse()
        for row in run_classify(servable, signature_name, request.input):
            classifications = response.result.classifications.add()
            for label, score in row:
                classifications.classes.add(label=label, score=score)
        self._spec(response.model_spec, request.model_spec, servable, signature_name)
        return response

    def Regress(self, request, context):
        return _answer(context, self._regress, request)

    def _regress(self, request):
        servable = self._servable(request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        response = regression_pb2.RegressionResponse()
        for value in run_regress(servable, signature_name, request.input):
            response.result.regressions.add(value=float(value))
        self._spec(response.model_spec, request.model_spec, servable, signature_name)
        return response

    def GetModelMetadata(self, request, context):
        spec = request.model_spec
        return _answer(context, metadata_response, self.manager, spec.name, _version_of(spec),
                       list(request.metadata_field), spec.version_label)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: GetModelStatus (HandleReloadConfigRequest is UNIMPLEMENTED)."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        return _answer(context, status_response, self.manager, request.model_spec.name,
                       _version_of(request.model_spec))


def _answer(context, fn, *args):
    try:
        return fn(*args)
    except ServingError as err:
        context.abort(err.code, err.message)
    except Exception as err:  # noqa: BLE001  (a bug in one request must not take the server down)
        LOG.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------------------------- REST
_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?"
                    r"(?:(?P<verb>:predict|:classify|:regress)|(?P<metadata>/metadata))?/?$")


def _json_shape(value) -> List[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _json_scalar(value, dtype: tf.DType, name: str):
    if dtype == tf.string:
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError as err:
                raise _invalid(f"input {name!r}: bad base64: {err}") from err
    elif dtype == tf.bool:
        if isinstance(value, bool):
            return value
    elif dtype.is_integer:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif dtype.is_floating:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    raise _invalid(f"input {name!r}: JSON value {json.dumps(value)[:80]} is not of expected type {dtype.name}")


def json_to_array(value, dtype: tf.DType, name: str) -> np.ndarray:
    """A JSON (nested list) value → numpy array of ``dtype``; ragged lists are INVALID_ARGUMENT."""
    shape = _json_shape(value)
    flat: list = []

    def walk(v, level):
        if level == len(shape):
            if isinstance(v, list):
                raise _invalid(f"input {name!r}: list nested deeper than the first element's ({len(shape)})")
            flat.append(_json_scalar(v, dtype, name))
            return
        if not isinstance(v, list) or len(v) != shape[level]:
            raise _invalid(f"input {name!r}: ragged list at level {level}, expected size {shape[level]} "
                           "(tensors must be rectangular)")
        for item in v:
            walk(item, level + 1)

    walk(value, 0)
    np_dtype = object if dtype == tf.string else dtype.as_numpy_dtype
    return np.array(flat, dtype=np_dtype).reshape(shape)


def _array_to_json(name: str, value: np.ndarray):
    if value.dtype == object:
        def convert(v):
            if name.endswith("_bytes"):
                return {"b64": base64.b64encode(v).decode("ascii")}
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(v).decode("ascii")}
        return np.vectorize(convert, otypes=[object])(value).tolist() if value.size else value.tolist()
    return value.tolist()


def _example_from_json(features: Mapping, where: str) -> example_pb2.Example:
    example = example_pb2.Example()
    if not isinstance(features, dict):
        raise _invalid(f"{where} must be a JSON object of feature name -> value or list")
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[key]
        if all(isinstance(v, str) or isinstance(v, dict) for v in values):
            feature.bytes_list.value.extend(_json_scalar(v, tf.string, key) for v in values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        else:
            raise _invalid(f"{where}: feature {key!r} mixes types or holds unsupported values")
    return example


def _rest_input(body: Mapping) -> input_pb2.Input:
    examples = body.get("examples")
    if not isinstance(examples, list):
        raise _invalid("request body needs \"examples\": a list of {feature: value|list} objects")
    request_input = input_pb2.Input()
    if "context" in body:
        target = request_input.example_list_with_context
        target.context.CopyFrom(_example_from_json(body["context"], "context"))
    else:
        target = request_input.example_list
    for i, example in enumerate(examples):
        target.examples.add().CopyFrom(_example_from_json(example, f"examples[{i}]"))
    return request_input


class RestFrontend:
    """TF Serving's REST API on the standard library's threaded HTTP server."""

    def __init__(self, manager: ModelManager, host: str, port: int, max_body_bytes: int, max_concurrency: int,
                 queue_timeout_s: float = 30.0):
        self.manager = manager
        self.max_body_bytes = int(max_body_bytes)
        self.queue_timeout_s = float(queue_timeout_s)
        self._slots = threading.BoundedSemaphore(max_concurrency)
        frontend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # route access logs to logging, not stderr
                LOG.debug("rest %s " + fmt, self.client_address[0], *args)

            def do_GET(self):
                frontend.handle(self, "GET")

            def do_POST(self):
                frontend.handle(self, "POST")

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = _address_family(host)

        self.httpd = Server((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------------------------------ routing
    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        if not self._slots.acquire(timeout=self.queue_timeout_s):
            self._send(handler, 503, {"error": "server busy: too many concurrent requests"})
            return
        try:
            status, body = self._dispatch(handler, method)
        except ServingError as err:
            status, body = err.http_status, {"error": err.message}
        except Exception as err:  # noqa: BLE001
            LOG.exception("internal error")
            status, body = 500, {"error": f"{type(err).__name__}: {err}"}
        finally:
            self._slots.release()
        self._send(handler, status, body)

    def _dispatch(self, handler, method) -> Tuple[int, object]:
        match = _ROUTE.match(handler.path.split("?")[0])
        if not match:
            self._drain(handler)
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {method} {handler.path}")
        name, verb = match["name"], match["verb"]
        version = int(match["version"]) if match["version"] else None
        if method == "GET":
            if verb:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{verb[1:]} needs POST")
            if match["metadata"]:
                response = metadata_response(self.manager, name, version, [SIGNATURE_DEF_FIELD])
                return 200, json_format.MessageToDict(response, preserving_proto_field_name=True)
            return 200, json_format.MessageToDict(status_response(self.manager, name, version),
                                                  preserving_proto_field_name=True,
                                                  always_print_fields_with_no_presence=True)
        body = self._read_json(handler)
        if not verb:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Malformed request: POST {handler.path}")
        servable = self.manager.servable(name, version)
        signature_name = body.get("signature_name") or DEFAULT_SIGNATURE
        if not isinstance(signature_name, str):
            raise _invalid("'signature_name' must be a string")
        if verb == ":predict":
            return 200, self._predict(servable, signature_name, body)
        request_input = _rest_input(body)
        if verb == ":regress":
            return 200, {"results": [float(v) for v in run_regress(servable, signature_name, request_input)]}
        results = run_classify(servable, signature_name, request_input)
        return 200, {"results": [[[label, score] for label, score in row] for row in results]}

    def _predict(self, servable: Servable, signature_name: str, body: Mapping):
        signature_def = _signature(servable, signature_name)
        names = sorted(signature_def.inputs)
        dtypes = {n: tf.dtypes.as_dtype(signature_def.inputs[n].dtype) for n in names}
        if ("instances" in body) == ("inputs" in body):
            raise _invalid("request body needs exactly one of \"instances\" (row format) or \"inputs\" (columnar)")
        row_format = "instances" in body
        if row_format:
            instances = body["instances"]
            if not isinstance(instances, list) or not instances:
                raise _invalid("\"instances\" must be a non-empty list")
            if all(isinstance(i, dict) and "b64" not in i for i in instances):
                keys = set(instances[0])
                if any(set(i) != keys for i in instances):
                    raise _invalid("every instance must hold the same named inputs")
                raw = {k: [i[k] for i in instances] for k in keys}
            elif len(names) == 1:
                raw = {names[0]: instances}
            else:
                raise _invalid(f"signature {signature_name!r} has inputs {names}: send instances as objects")
        else:
            columns = body["inputs"]
            raw = columns if isinstance(columns, dict) and "b64" not in columns else (
                {names[0]: columns} if len(names) == 1 else None)
            if raw is None:
                raise _invalid(f"signature {signature_name!r} has inputs {names}: \"inputs\" must be an object")
        inputs = {}
        for key, value in raw.items():
            if key not in dtypes:
                raise _invalid(f"signature {signature_name!r}: unknown input {key!r}; it takes {names}")
            inputs[key] = json_to_array(value, dtypes[key], key)
        outputs = run_predict(servable, signature_name, inputs, {k: dtypes[k].as_datatype_enum for k in inputs})
        if not row_format:
            converted = {k: _array_to_json(k, v) for k, v in outputs.items()}
            return {"outputs": next(iter(converted.values())) if len(converted) == 1 else converted}
        batch = {v.shape[0] if v.ndim else None for v in outputs.values()}
        if len(batch) != 1 or None in batch:
            raise _invalid("outputs do not share a batch dimension; use the columnar \"inputs\" format")
        if len(outputs) == 1:
            name, value = next(iter(outputs.items()))
            return {"predictions": _array_to_json(name, value)}
        rows = {k: _array_to_json(k, v) for k, v in outputs.items()}
        return {"predictions": [{k: rows[k][i] for k in rows} for i in range(batch.pop())]}

    # ------------------------------------------------------------------------------------------ I/O
    def _read_json(self, handler):
        length = handler.headers.get("Content-Length")
        if length is None:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Content-Length header required")
        length = int(length)
        if length > self.max_body_bytes:
            self._drain(handler, length)
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}", 413)
        raw = handler.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError as err:
            raise _invalid(f"JSON parse error: {err}") from err
        if not isinstance(body, dict):
            raise _invalid("request body must be a JSON object")
        return body

    def _drain(self, handler, length=None):
        """Reads and drops a request body (in chunks) so the client can read the answer; a body beyond
        4x the limit is not read, the connection is closed instead."""
        length = int(handler.headers.get("Content-Length") or 0) if length is None else length
        if length > 4 * self.max_body_bytes:
            handler.close_connection = True
            return
        while length > 0:
            chunk = handler.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    @staticmethod
    def _send(handler, status: int, body) -> None:
        data = json.dumps(body, indent=1).encode("utf-8")
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            if handler.close_connection:
                handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            LOG.debug("rest client went away")


def _address_family(host: str):
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


# ---------------------------------------------------------------------------------------------------- server
class ModelServer:
    """A running server: gRPC on ``grpc_port``, REST on ``rest_port`` (None when disabled). ``stop()`` ends it."""

    def __init__(self, manager: ModelManager, grpc_server, grpc_port: int, rest: Optional[RestFrontend],
                 malloc: Optional[Dict[str, object]] = None):
        self.manager = manager
        self._grpc = grpc_server
        self.grpc_port = grpc_port
        self._rest = rest
        self.rest_port = rest.port if rest is not None else None
        self.malloc: Dict[str, object] = dict(malloc or {})  # what ``tune_malloc`` set
        self._stopped = threading.Event()

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.manager.stop()
        if self._rest is not None:
            self._rest.stop()
        self._grpc.stop(grace).wait(grace + 5)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until ``stop()``; returns True when stopped."""
        return self._stopped.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def set_tensorflow_parallelism(intra_op: int = 0, inter_op: int = 0) -> Dict[str, int]:
    """TF Serving's ``--tensorflow_intra_op_parallelism`` / ``--tensorflow_inter_op_parallelism``: threads one
    op may use / ops run at once (0 = TensorFlow's default, one per core). Must run before TensorFlow runs its
    first op in this process; returns the settings in effect.

    With several concurrent requests on few cores, 1 intra-op thread per op usually gives more throughput:
    the requests themselves keep the cores busy, without the per-op thread hand-offs.
    """
    threading_config = tf.config.threading
    for value, getter, setter, flag in (
            (intra_op, threading_config.get_intra_op_parallelism_threads,
             threading_config.set_intra_op_parallelism_threads, "tensorflow_intra_op_parallelism"),
            (inter_op, threading_config.get_inter_op_parallelism_threads,
             threading_config.set_inter_op_parallelism_threads, "tensorflow_inter_op_parallelism")):
        if int(value) < 0:
            raise ValueError(f"{flag} must be >= 0 (0 = TensorFlow's default), got {value}")
        if int(value) and getter() != int(value):
            try:
                setter(int(value))
            except RuntimeError as err:
                raise RuntimeError(f"{flag}={value}: TensorFlow has already run in this process and keeps its "
                                   f"thread pools ({err}); set it when the server process starts") from err
    return {"intra_op": threading_config.get_intra_op_parallelism_threads(),
            "inter_op": threading_config.get_inter_op_parallelism_threads()}


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
DEFAULT_MALLOC_MMAP_THRESHOLD_MB = 32  # above a request's largest buffers (4 MB at L = 10^4, N = 100)
MALLOC_TRIM_FACTOR = 8  # freed heap memory kept for reuse: this many times the mmap threshold


def tune_malloc(mmap_threshold_mb: float = DEFAULT_MALLOC_MMAP_THRESHOLD_MB) -> Dict[str, object]:
    """Has glibc's malloc serve buffers up to ``mmap_threshold_mb`` MiB from its heap and keep freed heap
    memory (up to ``MALLOC_TRIM_FACTOR`` times that) for reuse, instead of mmap/munmap per buffer.

    A ``rank`` request at L = 10^4, N = 100 allocates several [N, L] float buffers (4 MB each). Above glibc's
    default threshold (128 KiB, adapting upwards only slowly) each one is a fresh mmap whose pages fault in on
    first touch and go back to the kernel on free: every request pays page faults and zeroing for all of
    them (one request in-process on 2 cores: 23.6 ms p50 untuned, 16.5 ms tuned; benchmarks/serving.md has
    the load test with and without it). The same as starting the process with
    ``MALLOC_MMAP_THRESHOLD_=<bytes> MALLOC_TRIM_THRESHOLD_=<bytes>``. 0 leaves glibc's defaults. Returns the
    settings in effect, or why none were made (not glibc).
    """
    import ctypes
    import platform

    if mmap_threshold_mb < 0:
        raise ValueError(f"malloc_mmap_threshold_mb must be >= 0 (0 = glibc's default), got {mmap_threshold_mb}")
    if not mmap_threshold_mb:
        return {"tuned": False, "why": "malloc_mmap_threshold_mb = 0: glibc's defaults"}
    if platform.libc_ver()[0] != "glibc":
        return {"tuned": False, "why": f"not glibc ({platform.libc_ver()[0] or 'unknown C library'})"}
    mmap_threshold = int(mmap_threshold_mb * 2 ** 20)
    trim_threshold = min(MALLOC_TRIM_FACTOR * mmap_threshold, 2 ** 31 - 1)  # mallopt takes a C int
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) != 1:
        raise ValueError(f"malloc_mmap_threshold_mb={mmap_threshold_mb}: glibc refused it; try a smaller value "
                         f"(default {DEFAULT_MALLOC_MMAP_THRESHOLD_MB})")
    if libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) != 1:
        raise ValueError(f"malloc trim threshold {trim_threshold} bytes: glibc refused it")
    return {"tuned": True, "mmap_threshold_bytes": mmap_threshold, "trim_threshold_bytes": trim_threshold}


def serve(model_name: str, model_base_path: str, port: int = 8500, rest_port: Optional[int] = 8501,
          host: str = "127.0.0.1", poll_seconds: float = 1.0,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
          max_queued: int = 64, warmup: bool = True, intra_op_parallelism: int = 0,
          inter_op_parallelism: int = 0,
          malloc_mmap_threshold_mb: float = DEFAULT_MALLOC_MMAP_THRESHOLD_MB) -> ModelServer:
    """Starts serving ``model_name`` from ``model_base_path`` and returns at once (see ``ModelServer``).

    The newest complete version is loaded before returning (when there is one); newer versions are picked up
    every ``poll_seconds``. Port 0 picks a free port (read ``server.grpc_port`` / ``server.rest_port``);
    ``rest_port=None`` disables REST. ``intra_op_parallelism`` / ``inter_op_parallelism``: see
    ``set_tensorflow_parallelism`` (0 = TensorFlow's default). ``malloc_mmap_threshold_mb``: see
    ``tune_malloc`` (0 = glibc's defaults); ``ModelServer.malloc`` says what was set.
    """
    set_tensorflow_parallelism(intra_op_parallelism, inter_op_parallelism)
    malloc = tune_malloc(malloc_mmap_threshold_mb)
    manager = ModelManager(model_name, model_base_path, poll_seconds=poll_seconds, warmup=warmup)
    manager.poll()
    options = [("grpc.max_receive_message_length", int(max_message_bytes)),
               ("grpc.max_send_message_length", int(max_message_bytes)),
               ("grpc.so_reuseport", 0)]
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="grpc"),
                              options=options, maximum_concurrent_rpcs=max_concurrency + max_queued)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(manager), grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), grpc_server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = grpc_server.add_insecure_port(address)
    if not bound:
        raise OSError(f"gRPC could not bind {address}")
    rest = None
    try:
        if rest_port is not None:
            rest = RestFrontend(manager, host, rest_port, max_message_bytes, max_concurrency)
    except OSError:
        grpc_server.stop(0)
        raise
    grpc_server.start()
    if rest is not None:
        rest.start()
    manager.start()
    LOG.info("serving model %s from %s: gRPC %s:%d, REST %s (version %s)", model_name, model_base_path, host, bound,
             f"{host}:{rest.port}" if rest else "off", manager.current_version)
    return ModelServer(manager, grpc_server, bound, rest, malloc)


def read_model_config(path: str) -> List[Tuple[str, str]]:
    """(name, base_path) of each model in a TF Serving ``models.config`` (ModelServerConfig text proto)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    with tf.io.gfile.GFile(path) as f:
        text_format.Parse(f.read(), config)
    return [(c.name, c.base_path) for c in config.model_config_list.config]
