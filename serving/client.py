"""Clients of the SEMINAR export on TF Serving (or ``serving.server``): gRPC through the official
``tensorflow_serving.apis`` stubs, and REST through the standard library.

The input/output names below are the export's serving contract (``seminar_tf/export.py`` defines them; a
test keeps the two equal). User-attribute inputs are named ``user_<attribute>``; the clients find them in
the model's metadata.

Example:
    with PredictClient("127.0.0.1:8500") as client:
        ranked = client.rank(history=[("i27", "red shoes"), ("i9", "")],
                             candidates=[("i5", "red shoes"), ("i8", "red shoes")],
                             user_attributes={"gender": "f"})
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import MODEL_NAME

HISTORY_ITEM_IDS = "history_item_ids"
HISTORY_QUERIES = "history_queries"
HISTORY_FEEDBACK = "history_feedback"
TARGET_ITEM_ID = "target_item_id"
TARGET_QUERY = "target_query"
CANDIDATE_ITEM_IDS = "candidate_item_ids"
CANDIDATE_QUERIES = "candidate_queries"
USER_INPUT_PREFIX = "user_"
SCORES = "scores"
RANK_SIGNATURE = "rank"
ENCODE_HISTORY_SIGNATURE = "encode_history"
RANK_STATE_SIGNATURE = "rank_state"
STATE_PREFIX = "history_state_"  # the outputs of encode_history, inputs of rank_state
CTR_SIGNATURE = "ctr"
EXAMPLES_SIGNATURE = "ctr_examples"
CLASSIFY_SIGNATURE = "ctr_classify"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Pair = Tuple[str, str]  # (item_id, query text; "" = browsing / recommendation)
# A history step is a Pair, or (item_id, query, feedback token) for models with a history_feedback input
# (``seminar_tf.schema.feedback_token``, e.g. "impression:r4"); a step without one sends "" (unknown).


def _feedback(history) -> List[str]:
    return [step[2] if len(step) > 2 else "" for step in history]


def to_array(value) -> np.ndarray:
    """A Python/numpy value as a numpy array; text becomes a bytes object array (TensorFlow's DT_STRING)."""
    array = np.asarray(value)
    if array.dtype.kind in "US" or (array.dtype == object and array.size and isinstance(array.flat[0], str)):
        return np.vectorize(lambda v: v.encode("utf-8") if isinstance(v, str) else bytes(v),
                            otypes=[object])(array) if array.size else array.astype(object)
    return array


def make_example(features: Mapping[str, object]) -> example_pb2.Example:
    """A ``tf.train.Example`` from {name: value or list}: text/bytes → bytes_list, int → int64_list,
    float → float_list (the ``ctr_examples`` features are all text: ids and queries)."""
    example = example_pb2.Example()
    for name, value in features.items():
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        feature = example.features.feature[name]
        if all(isinstance(v, (str, bytes)) for v in values):
            feature.bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(int(v) for v in values)
        else:
            feature.float_list.value.extend(float(v) for v in values)
    return example


def history_example(history: Sequence[Pair], target: Pair, user_attributes: Optional[Mapping[str, str]] = None):
    """The ``ctr_examples``/``ctr_classify`` tf.Example of one (history, target) row."""
    features = {HISTORY_ITEM_IDS: [step[0] for step in history], HISTORY_QUERIES: [step[1] for step in history],
                TARGET_ITEM_ID: target[0], TARGET_QUERY: target[1]}
    if any(len(step) > 2 for step in history):
        features[HISTORY_FEEDBACK] = _feedback(history)
    for name, value in (user_attributes or {}).items():
        features[_user_input(name)] = value
    return make_example(features)


def _user_input(name: str) -> str:
    return name if name.startswith(USER_INPUT_PREFIX) else USER_INPUT_PREFIX + name


def rank_inputs(history: Sequence[Pair], candidates: Sequence[Pair], user_inputs: Iterable[str],
                user_attributes: Optional[Mapping[str, str]] = None, feedback: bool = False) -> Dict[str, np.ndarray]:
    """``rank`` signature inputs: history [1, L], candidates [1, N], each user input [1] ("" when unknown);
    with ``feedback`` also ``history_feedback`` [1, L] from the steps' third elements."""
    inputs = history_inputs(history, feedback)
    inputs.update(candidate_inputs(candidates, user_inputs, user_attributes))
    return inputs


def history_inputs(history: Sequence[Pair], feedback: bool = False) -> Dict[str, np.ndarray]:
    """One history's inputs [1, L] (``history_feedback`` too with ``feedback``), for ``rank`` and
    ``encode_history``."""
    inputs = {HISTORY_ITEM_IDS: to_array([[step[0] for step in history]]).reshape(1, len(history)),
              HISTORY_QUERIES: to_array([[step[1] for step in history]]).reshape(1, len(history))}
    if feedback:
        inputs[HISTORY_FEEDBACK] = to_array([_feedback(history)]).reshape(1, len(history))
    return inputs


def candidate_inputs(candidates: Sequence[Pair], user_inputs: Iterable[str],
                     user_attributes: Optional[Mapping[str, str]] = None) -> Dict[str, np.ndarray]:
    """The candidates [1, N] and each user input [1] ("" when unknown), for ``rank`` and ``rank_state``."""
    given = {_user_input(k): v for k, v in (user_attributes or {}).items()}
    unknown = sorted(set(given) - set(user_inputs))
    if unknown:
        raise ValueError(f"user attributes {unknown} are not inputs of the model (it has {sorted(user_inputs)})")
    inputs = {CANDIDATE_ITEM_IDS: to_array([[i for i, _ in candidates]]).reshape(1, len(candidates)),
              CANDIDATE_QUERIES: to_array([[q for _, q in candidates]]).reshape(1, len(candidates))}
    for name in user_inputs:
        inputs[name] = to_array([str(given.get(name, ""))])
    return inputs


class PredictClient:
    """gRPC client (PredictionService + ModelService stubs) for one model.

    Args:
      target: "host:port" of the gRPC endpoint.
      model_name: model name of the server's config.
      timeout: seconds per call.
      ssl_config_file: connect with TLS: an SSLConfig text proto (``serving.tls``) whose ``custom_ca`` is the
        CA of the server's certificate and whose ``server_key`` / ``server_cert``, when set, are this client's
        own key and certificate (for a server with ``client_verify``). None: plaintext.
    """

    def __init__(self, target: str = "127.0.0.1:8500", model_name: str = MODEL_NAME, timeout: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, ssl_config_file: Optional[str] = None):
        self.target = target
        self.model_name = model_name
        self.timeout = float(timeout)
        options = [("grpc.max_receive_message_length", int(max_message_bytes)),
                   ("grpc.max_send_message_length", int(max_message_bytes))]
        if ssl_config_file:
            from serving import tls

            credentials = tls.grpc_channel_credentials(tls.read_ssl_config(ssl_config_file, server=False))
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._signatures = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _spec(self, spec, signature_name: Optional[str], version: Optional[int]) -> None:
        spec.name = self.model_name
        if signature_name:
            spec.signature_name = signature_name
        if version is not None:
            spec.version.value = int(version)

    # ------------------------------------------------------------------------------------------ APIs
    def predict(self, inputs: Mapping[str, object], signature_name: str = "serving_default",
                version: Optional[int] = None, output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        """Predict: {input name: array-like} → {output name: numpy array}."""
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature_name, version)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(to_array(value)))
        request.output_filter.extend(output_filter)
        response = self.prediction.Predict(request, timeout=self.timeout)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def regress(self, examples: Sequence[example_pb2.Example], signature_name: str = EXAMPLES_SIGNATURE,
                version: Optional[int] = None, context: Optional[example_pb2.Example] = None) -> np.ndarray:
        """Regress: one float per example."""
        request = regression_pb2.RegressionRequest()
        self._spec(request.model_spec, signature_name, version)
        _fill_input(request.input, examples, context)
        response = self.prediction.Regress(request, timeout=self.timeout)
        return np.array([r.value for r in response.result.regressions], np.float32)

    def classify(self, examples: Sequence[example_pb2.Example], signature_name: str = CLASSIFY_SIGNATURE,
                 version: Optional[int] = None,
                 context: Optional[example_pb2.Example] = None) -> List[List[Tuple[str, float]]]:
        """Classify: [(label, score), ...] per example."""
        request = classification_pb2.ClassificationRequest()
        self._spec(request.model_spec, signature_name, version)
        _fill_input(request.input, examples, context)
        response = self.prediction.Classify(request, timeout=self.timeout)
        return [[(c.label, c.score) for c in row.classes] for row in response.result.classifications]

    def metadata(self, version: Optional[int] = None) -> Tuple[int, Dict[str, object]]:
        """GetModelMetadata: (version, {signature name: SignatureDef})."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec, None, version)
        request.metadata_field.append("signature_def")
        response = self.prediction.GetModelMetadata(request, timeout=self.timeout)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return response.model_spec.version.value, dict(signature_map.signature_def)

    def status(self, version: Optional[int] = None) -> List[Tuple[int, str, int, str]]:
        """GetModelStatus: [(version, state name, error code, error message)], newest first."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, None, version)
        response = self.models.GetModelStatus(request, timeout=self.timeout)
        state = get_model_status_pb2.ModelVersionStatus.State.Name
        return [(s.version, state(s.state), s.status.error_code, s.status.error_message)
                for s in response.model_version_status]

    # ------------------------------------------------------------------------------------------ ranking
    def user_inputs(self, signature_name: str = RANK_SIGNATURE) -> List[str]:
        """Names of the user-attribute inputs of a signature (from the model's metadata, fetched once)."""
        if self._signatures is None:
            self._signatures = self.metadata()[1]
        if signature_name not in self._signatures:
            raise KeyError(f"the model has no signature {signature_name!r} (it has {sorted(self._signatures)})")
        return sorted(n for n in self._signatures[signature_name].inputs if n.startswith(USER_INPUT_PREFIX))

    def rank(self, history: Sequence[Pair], candidates: Sequence[Pair],
             user_attributes: Optional[Mapping[str, str]] = None, signature_name: str = RANK_SIGNATURE,
             version: Optional[int] = None) -> List[Tuple[int, float]]:
        """Scores N candidate (item_id, query) pairs against one history (oldest first) with ``rank``.

        Returns [(candidate position, score)] best first.
        """
        user_inputs = self.user_inputs(signature_name)  # fetches the signatures once
        feedback = HISTORY_FEEDBACK in self._signatures[signature_name].inputs
        inputs = rank_inputs(history, candidates, user_inputs, user_attributes, feedback)
        scores = self.predict(inputs, signature_name, version, output_filter=[SCORES])[SCORES][0]
        order = np.argsort(-scores, kind="stable")
        return [(int(i), float(scores[i])) for i in order]


    # ------------------------------------------------------------------------------------------ history state
    def encode_history(self, history: Sequence[Pair], version: Optional[int] = None) -> Dict[str, np.ndarray]:
        """The history state of one history (oldest first): ``encode_history``'s outputs, int32 [1, L] per step
        (item, query and feedback indices), the unknown query texts' tokens and the vocabulary fingerprint.
        Keep it (``save_state``) and rank against it with ``rank_state`` while the history is unchanged."""
        self.user_inputs(RANK_SIGNATURE)  # fetches the signatures once
        feedback = HISTORY_FEEDBACK in self._signatures[ENCODE_HISTORY_SIGNATURE].inputs
        return self.predict(history_inputs(history, feedback), ENCODE_HISTORY_SIGNATURE, version)

    def rank_state(self, state: Mapping[str, np.ndarray], candidates: Sequence[Pair],
                   user_attributes: Optional[Mapping[str, str]] = None,
                   version: Optional[int] = None) -> List[Tuple[int, float]]:
        """``rank`` against a history state (``encode_history``): [(candidate position, score)] best first, the
        scores ``rank`` gives for the history the state was encoded from. A state of an export with other
        vocabularies is refused (INVALID_ARGUMENT naming history_state_fingerprint): encode the history again."""
        user_inputs = self.user_inputs(RANK_STATE_SIGNATURE)
        inputs = candidate_inputs(candidates, user_inputs, user_attributes)
        inputs.update({k: v for k, v in state.items() if k.startswith(STATE_PREFIX)})
        scores = self.predict(inputs, RANK_STATE_SIGNATURE, version, output_filter=[SCORES])[SCORES][0]
        order = np.argsort(-scores, kind="stable")
        return [(int(i), float(scores[i])) for i in order]


def save_state(path: str, state: Mapping[str, np.ndarray], history_key: str) -> None:
    """Writes a history state to ``path`` (.npz, written whole then renamed) with ``history_key``, a digest of the
    history it encodes (``history_digest``): the client-side cache of ``seminar-tf query --history-state``."""
    import os

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in state.items()}, history_key=np.array(history_key))
    os.replace(tmp, path)


def load_state(path: str, history_key: str) -> Optional[Dict[str, np.ndarray]]:
    """The history state cached at ``path`` when it was saved for the same history (``history_key``), else None
    (missing, unreadable or stale: the caller encodes the history again)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["history_key"]) != history_key:
                return None
            return {k: data[k] for k in data.files if k.startswith(STATE_PREFIX)}
    except (OSError, KeyError, ValueError):
        return None


def history_digest(history: Sequence[Sequence[str]]) -> str:
    """A digest of a history's steps (item, query[, feedback]), the key of a cached history state."""
    import hashlib

    return hashlib.sha256(json.dumps([list(step) for step in history]).encode()).hexdigest()


def _fill_input(request_input, examples, context) -> None:
    if context is not None:
        request_input.example_list_with_context.context.CopyFrom(context)
        request_input.example_list_with_context.examples.extend(examples)
    else:
        request_input.example_list.examples.extend(examples)


# ---------------------------------------------------------------------------------------------------- REST
class RestError(Exception):
    """An HTTP error answered by the REST API: ``status`` (HTTP code) and TF Serving's ``error`` message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _json_ready(value):
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class RestClient:
    """TF Serving REST API client (``/v1/models/...``) on urllib; ``ssl_config_file`` as ``PredictClient``'s
    (use an https:// ``base_url``)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8501", model_name: str = MODEL_NAME,
                 timeout: float = 30.0, ssl_config_file: Optional[str] = None):
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.timeout = float(timeout)
        self._ssl_context = None
        if ssl_config_file:
            from serving import tls

            self._ssl_context = tls.client_ssl_context(tls.read_ssl_config(ssl_config_file, server=False))

    def _url(self, version: Optional[int], suffix: str = "") -> str:
        path = f"{self.base_url}/v1/models/{self.model_name}"
        if version is not None:
            path += f"/versions/{int(version)}"
        return path + suffix

    def _call(self, url: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(_json_ready(body)).encode("utf-8")
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl_context) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            text = err.read().decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except ValueError:
                message = text
            raise RestError(err.code, message) from None

    def predict(self, inputs: Optional[Mapping] = None, instances: Optional[list] = None,
                signature_name: Optional[str] = None, version: Optional[int] = None) -> dict:
        """POST :predict with columnar ``inputs`` ({name: nested list}) or row-format ``instances``."""
        if (inputs is None) == (instances is None):
            raise ValueError("give exactly one of inputs (columnar) or instances (row format)")
        body = {"inputs": inputs} if inputs is not None else {"instances": instances}
        if signature_name:
            body["signature_name"] = signature_name
        return self._call(self._url(version, ":predict"), body)

    def regress(self, examples: List[Mapping], context: Optional[Mapping] = None,
                signature_name: Optional[str] = EXAMPLES_SIGNATURE, version: Optional[int] = None) -> list:
        """POST :regress; returns the "results" list (one float per example)."""
        return self._examples(":regress", examples, context, signature_name, version)

    def classify(self, examples: List[Mapping], context: Optional[Mapping] = None,
                 signature_name: Optional[str] = CLASSIFY_SIGNATURE, version: Optional[int] = None) -> list:
        """POST :classify; returns the "results" list ([[label, score], ...] per example)."""
        return self._examples(":classify", examples, context, signature_name, version)

    def _examples(self, verb, examples, context, signature_name, version):
        body = {"examples": list(examples)}
        if context is not None:
            body["context"] = context
        if signature_name:
            body["signature_name"] = signature_name
        return self._call(self._url(version, verb), body)["results"]

    def metadata(self, version: Optional[int] = None) -> dict:
        return self._call(self._url(version, "/metadata"))

    def status(self, version: Optional[int] = None) -> dict:
        return self._call(self._url(version))
