"""Request validation and codecs: every request is checked against the SignatureDef and the export's limits
*before* any tensor is built, the same way for every signature and both APIs (gRPC TensorProtos, REST JSON,
serialized tf.Examples of Classify / Regress / ``ctr_examples``).

What is checked (INVALID_ARGUMENT naming the input unless said otherwise):
  * names: missing / unknown inputs; dtype; rank and fixed dimensions of the SignatureDef;
  * declared sizes: no negative dimension; batch (dimension 0) <= ``max_batch_size``; the history length L of
    ``history_*`` (and of the history state) <= the export's ``max_history``; the candidate count N of
    ``candidate_*`` <= its ``max_candidates``; all the elements a request declares together <= ``max_elements``
    (RESOURCE_EXHAUSTED: one value broadcast to a huge shape cannot allocate gigabytes);
  * values sent: a TensorProto carries one value per element, or one value broadcast (TensorProto's rule);
    ``tensor_content`` holds exactly elements x item size bytes;
  * per-step consistency: every ``history_*`` input has the shape of ``history_item_ids`` [B, L] (the history
    state's per-step inputs that of ``history_state_items``), every
    ``candidate_*`` input that of ``candidate_item_ids``, every input the same batch B;
  * tf.Examples: each value parses as a tf.Example; the history lists of one example have one value per step
    (an absent list means "" for every step, as the graph's parser reads it), L <= ``max_history``; the
    one-value features (target, user inputs) hold at most one bytes value; ``target_item_id`` exactly one.

The export's limits come from ``assets.extra/seminar_export.json`` (``seminar-tf export``); a SavedModel
without it gets the generic checks only.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from google.protobuf import message as protobuf_message
from tensorflow.core.example import example_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from serving.errors import exhausted, invalid

HISTORY_ITEM_IDS = "history_item_ids"
HISTORY_QUERIES = "history_queries"
HISTORY_FEEDBACK = "history_feedback"
CANDIDATE_ITEM_IDS = "candidate_item_ids"
CANDIDATE_QUERIES = "candidate_queries"
TARGET_ITEM_ID = "target_item_id"
HISTORY_INPUTS = (HISTORY_ITEM_IDS, HISTORY_QUERIES, HISTORY_FEEDBACK)
STATE_ITEMS = "history_state_items"  # the history state of encode_history / rank_state: one value per step
STATE_INPUTS = (STATE_ITEMS, "history_state_queries", "history_state_feedback")
CANDIDATE_INPUTS = (CANDIDATE_ITEM_IDS, CANDIDATE_QUERIES)
EXAMPLES_INPUT = "inputs"  # tf.saved_model.REGRESS_INPUTS == CLASSIFY_INPUTS
EXAMPLES_METHODS = ("tensorflow/serving/regress", "tensorflow/serving/classify")
EXPORT_INFO = os.path.join("assets.extra", "seminar_export.json")

DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_ELEMENTS = 1 << 21  # 2,097,152 values per request (all inputs together)
MAX_JSON_RANK = 32

_VALUE_FIELDS = ("half_val", "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val",
                 "bool_val", "dcomplex_val", "uint32_val", "uint64_val", "float8_val")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may declare. ``max_history`` / ``max_candidates``: the export's (None: unknown, not
    checked); ``example_lists`` / ``example_scalars``: the tf.Example features of the export's
    ``ctr_examples`` / ``ctr_classify`` (empty: no tf.Example checks beyond parsing)."""

    max_history: Optional[int] = None
    max_candidates: Optional[int] = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_elements: int = DEFAULT_MAX_ELEMENTS
    example_lists: tuple = ()
    example_scalars: tuple = ()


def export_limits(path: str, signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Limits:
    """The limits of the version at ``path``: its seminar_export.json (when there is one) and the server's."""
    info_path = os.path.join(path, EXPORT_INFO)
    info = {}
    if tf.io.gfile.exists(info_path):
        with tf.io.gfile.GFile(info_path) as f:
            info = json.load(f)
    lists, scalars = (), ()
    ctr = signature_defs.get("ctr")
    if info and ctr is not None:  # the tf.Example features are the ctr signature's inputs
        lists = tuple(n for n in HISTORY_INPUTS if n in ctr.inputs)
        scalars = tuple(sorted(n for n in ctr.inputs if n not in HISTORY_INPUTS))
    return Limits(max_history=info.get("max_history"), max_candidates=info.get("max_candidates"),
                  max_batch_size=int(max_batch_size), max_elements=int(max_elements),
                  example_lists=lists, example_scalars=scalars)


def is_examples_signature(signature_def: meta_graph_pb2.SignatureDef) -> bool:
    """A Classify / Regress signature: its one input is a batch of serialized tf.Examples."""
    return signature_def.method_name in EXAMPLES_METHODS and list(signature_def.inputs) == [EXAMPLES_INPUT]


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


# ---------------------------------------------------------------------------------------------------- shapes
def check_declared(signature_name: str, signature_def: meta_graph_pb2.SignatureDef,
                   shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, int], limits: Limits) -> int:
    """Checks names, dtypes and declared shapes (see the module docstring) before anything is allocated;
    returns the number of elements the request declares."""
    expected = signature_def.inputs
    missing = sorted(set(expected) - set(shapes))
    unknown = sorted(set(shapes) - set(expected))
    if missing or unknown:
        raise invalid(f"signature {signature_name!r}: " + "; ".join(
            part for part in (f"missing input(s) {missing}" if missing else "",
                              f"unknown input(s) {unknown}" if unknown else "") if part)
            + f"; it takes {sorted(expected)}")
    total = 0
    for name in sorted(expected):
        info, shape = expected[name], list(shapes[name])
        if dtypes[name] != info.dtype:
            raise invalid(f"input {name!r}: expects {_dtype_name(info.dtype)}, got {_dtype_name(dtypes[name])}")
        if any(d < 0 for d in shape):
            raise invalid(f"input {name!r}: negative dimension in shape {shape}")
        if not info.tensor_shape.unknown_rank:
            dims = [d.size for d in info.tensor_shape.dim]
            if len(dims) != len(shape) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                raise invalid(f"input {name!r}: expects shape {_shape_text(dims)}, got {shape}")
            if dims and dims[0] < 0 and shape[0] > limits.max_batch_size:
                raise invalid(f"input {name!r}: batch size {shape[0]} exceeds this server's max_batch_size="
                              f"{limits.max_batch_size}")
        if len(shape) >= 2 and name in HISTORY_INPUTS + STATE_INPUTS and limits.max_history is not None \
                and shape[1] > limits.max_history:
            raise invalid(f"{name}: history length L={shape[1]} exceeds this export's max_history="
                          f"{limits.max_history}; send the newest steps only")
        if len(shape) >= 2 and name in CANDIDATE_INPUTS and limits.max_candidates is not None \
                and shape[1] > limits.max_candidates:
            raise invalid(f"{name}: number of candidates N={shape[1]} exceeds this export's max_candidates="
                          f"{limits.max_candidates}")
        total += math.prod(shape)
        if total > limits.max_elements:
            raise exhausted(f"request declares more than {limits.max_elements} values (input {name!r}: shape "
                            f"{shape}); this server's max_elements is {limits.max_elements}", 413)
    _check_consistent(signature_def, shapes)
    return total


def _dtype_name(enum: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"DataType {enum}"


def _check_consistent(signature_def, shapes: Mapping[str, Sequence[int]]) -> None:
    """The per-step checks the graph makes, before running it: one batch size, history_* inputs shaped as
    history_item_ids, candidate_* inputs as candidate_item_ids."""
    for group in (HISTORY_INPUTS, STATE_INPUTS, CANDIDATE_INPUTS):
        present = [n for n in group if n in shapes]
        for name in present[1:]:
            if list(shapes[name]) != list(shapes[present[0]]):
                raise invalid(f"{name} must have the shape of {present[0]} [batch, steps]: got "
                              f"{list(shapes[name])} and {list(shapes[present[0]])}")
    batched = [n for n in sorted(shapes) if _batched(signature_def, n) and len(shapes[n])]
    reference = next((n for n in (HISTORY_ITEM_IDS, STATE_ITEMS, CANDIDATE_ITEM_IDS) if n in batched), batched[0]
                     if batched
                     else None)
    for name in batched:
        if shapes[name][0] != shapes[reference][0]:
            raise invalid(f"{name}: batch size {shapes[name][0]} must equal that of {reference} "
                          f"({shapes[reference][0]})")


def _batched(signature_def, name: str) -> bool:
    shape = signature_def.inputs[name].tensor_shape
    return not shape.unknown_rank and len(shape.dim) > 0 and shape.dim[0].size < 0


# ---------------------------------------------------------------------------------------------------- gRPC
def proto_shape(name: str, proto) -> List[int]:
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"input {name!r}: TensorProto without a shape (unknown_rank)")
    return [d.size for d in proto.tensor_shape.dim]


def check_protos(signature_name: str, signature_def: meta_graph_pb2.SignatureDef, protos: Mapping,
                 limits: Limits) -> None:
    """check_declared on TensorProtos, then the number of values each one carries (one per element, or one
    broadcast value; tensor_content exactly elements x item size bytes)."""
    shapes = {name: proto_shape(name, proto) for name, proto in protos.items()}
    check_declared(signature_name, signature_def, shapes, {n: p.dtype for n, p in protos.items()}, limits)
    for name, proto in protos.items():
        elements = math.prod(shapes[name])
        is_string = proto.dtype == tf.string.as_datatype_enum
        if proto.tensor_content:
            itemsize = 0 if is_string else tf.dtypes.as_dtype(proto.dtype).size
            if is_string or len(proto.tensor_content) != elements * itemsize:
                raise invalid(f"malformed TensorProto in input {name!r}: tensor_content has "
                              f"{len(proto.tensor_content)} bytes, shape {shapes[name]} needs {elements * itemsize}")
            continue
        count = max(len(getattr(proto, field)) for field in _VALUE_FIELDS)
        allowed = {elements, 1} if elements else {0}
        if not is_string:
            allowed.add(0)  # a numeric TensorProto without values is zeros (TensorProto's rule)
        if count not in allowed:
            noun, field = ("strings", "string_val") if is_string else ("values", "its value field")
            raise invalid(f"malformed TensorProto in input {name!r}: shape {shapes[name]} holds {elements} {noun}, "
                          f"{field} has {count}; send one value per element (or one to broadcast)")


def tensor_from_proto(name: str, proto):
    """A request's TensorProto (already checked by ``check_protos``) as a value to feed: a tf.string tensor
    straight from ``string_val`` (numpy's object array in between cost about 0.3 ms more per 10^4-string
    history input), else numpy."""
    if proto.dtype == tf.string.as_datatype_enum:
        shape = [d.size for d in proto.tensor_shape.dim]
        elements = math.prod(shape)
        values = proto.string_val
        if len(values) not in (1, elements):
            raise invalid(f"malformed TensorProto in input {name!r}: shape {shape} holds {elements} strings, "
                          f"string_val has {len(values)}; send one string per element")
        if len(values) == elements:
            return tf.constant(values[:], tf.string, shape=shape)
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as err:
        raise invalid(f"malformed TensorProto in input {name!r}: {err}") from err


def string_values(value) -> List[bytes]:
    """The bytes of a tf.string tensor or an object array, flattened."""
    array = value.numpy() if isinstance(value, tf.Tensor) else np.asarray(value, dtype=object)
    return list(array.reshape(-1))


# ---------------------------------------------------------------------------------------------------- tf.Example
def parse_examples(values: Sequence[bytes], limits: Limits, name: str = EXAMPLES_INPUT) -> List[example_pb2.Example]:
    """Serialized tf.Examples → Examples; INVALID_ARGUMENT naming the one that is not a tf.Example."""
    examples = []
    for i, value in enumerate(values):
        try:
            examples.append(example_pb2.Example.FromString(bytes(value)))
        except (protobuf_message.DecodeError, TypeError, ValueError):
            raise invalid(f"input {name!r}: value {i} ({len(value)} bytes) is not a serialized tf.Example") from None
    check_examples(examples, limits)
    return examples


def check_examples(examples: Sequence[example_pb2.Example], limits: Limits, context=None) -> None:
    """The Predict checks on tf.Examples (with the ``context`` features every example gets): batch size, the
    history lists of each example one value per step and at most ``max_history``, the one-value features."""
    if len(examples) > limits.max_batch_size:
        raise invalid(f"{len(examples)} examples exceed this server's max_batch_size={limits.max_batch_size}")
    shared = _feature_sizes(context) if context is not None else {}
    total = sum(shared.values()) * max(len(examples), 1)
    for i, example in enumerate(examples):
        sizes = {**shared, **_feature_sizes(example)}
        total += sum(sizes.values())
        if total > limits.max_elements:
            raise exhausted(f"the examples hold more than {limits.max_elements} values; this server's "
                            f"max_elements is {limits.max_elements}", 413)
        if not limits.example_lists and not limits.example_scalars:
            continue
        merged = {}
        for source in (context, example):
            if source is not None:
                merged.update(source.features.feature)
        for feature_name in (*limits.example_lists, *limits.example_scalars):
            feature = merged.get(feature_name)
            if feature is not None and feature.WhichOneof("kind") not in (None, "bytes_list"):
                raise invalid(f"example {i}: feature {feature_name!r} must be a bytes_list (text), got "
                              f"{feature.WhichOneof('kind')}")
        lengths = {n: len(merged[n].bytes_list.value) for n in limits.example_lists if n in merged}
        steps = lengths.get(HISTORY_ITEM_IDS, 0)
        for feature_name, length in lengths.items():
            if feature_name != HISTORY_ITEM_IDS and length != steps:
                raise invalid(f"example {i}: {feature_name} must have the shape of {HISTORY_ITEM_IDS} [batch, steps]: "
                              f"{length} values for {steps} steps")
        if limits.max_history is not None and steps > limits.max_history:
            raise invalid(f"example {i}: {HISTORY_ITEM_IDS}: history length L={steps} exceeds this export's "
                          f"max_history={limits.max_history}; send the newest steps only")
        for feature_name in limits.example_scalars:
            count = len(merged[feature_name].bytes_list.value) if feature_name in merged else 0
            if count > 1 or (feature_name == TARGET_ITEM_ID and count != 1):
                raise invalid(f"example {i}: feature {feature_name!r} needs "
                              f"{'exactly' if feature_name == TARGET_ITEM_ID else 'at most'} one value, got {count}")


def _feature_sizes(example) -> Dict[str, int]:
    sizes = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        sizes[name] = len(getattr(feature, kind).value) if kind else 0
    return sizes


# ---------------------------------------------------------------------------------------------------- JSON
def json_shape(value, name: str) -> List[int]:
    """The shape of a nested JSON list; INVALID_ARGUMENT when it is ragged or nested too deeply. Walks the
    already parsed value without building anything."""
    shape = []
    first = value
    while isinstance(first, list):
        shape.append(len(first))
        if len(shape) > MAX_JSON_RANK:
            raise invalid(f"input {name!r}: lists nested deeper than {MAX_JSON_RANK} levels")
        if not first:
            break
        first = first[0]
    stack = [(value, 0)]
    while stack:  # iterative: no recursion limit whatever the nesting
        v, level = stack.pop()
        if level == len(shape):
            if isinstance(v, list):
                raise invalid(f"input {name!r}: list nested deeper than the first element's ({len(shape)})")
            continue
        if not isinstance(v, list) or len(v) != shape[level]:
            raise invalid(f"input {name!r}: ragged list at level {level}, expected size {shape[level]} "
                          "(tensors must be rectangular)")
        if level + 1 < len(shape) or any(isinstance(item, list) for item in v):
            stack.extend((item, level + 1) for item in v)
    return shape


def json_scalar(value, dtype: tf.DType, name: str):
    if dtype == tf.string:
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass")
        if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError as err:
                raise invalid(f"input {name!r}: bad base64: {err}") from err
    elif dtype == tf.bool:
        if isinstance(value, bool):
            return value
    elif dtype.is_integer:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif dtype.is_floating:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    raise invalid(f"input {name!r}: JSON value {json.dumps(value)[:80]} is not of expected type {dtype.name}")


def json_to_array(value, dtype: tf.DType, name: str, shape: Optional[List[int]] = None) -> np.ndarray:
    """A JSON (nested list) value → numpy array of ``dtype``. Call ``check_declared`` on ``json_shape`` (which
    also rejects ragged lists) first: this allocates."""
    shape = json_shape(value, name) if shape is None else shape
    flat = [value]
    for _ in shape:
        flat = [item for row in flat for item in row]
    converted = [json_scalar(v, dtype, name) for v in flat]
    np_dtype = object if dtype == tf.string else dtype.as_numpy_dtype
    try:
        return np.array(converted, dtype=np_dtype).reshape(shape)
    except (OverflowError, ValueError) as err:
        raise invalid(f"input {name!r}: {err}") from err


def array_to_json(name: str, value: np.ndarray):
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


def example_from_json(features: Mapping, where: str) -> example_pb2.Example:
    example = example_pb2.Example()
    if not isinstance(features, dict):
        raise invalid(f"{where} must be a JSON object of feature name -> value or list")
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[key]
        if all(isinstance(v, str) or isinstance(v, dict) for v in values):
            feature.bytes_list.value.extend(json_scalar(v, tf.string, key) for v in values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            try:
                feature.int64_list.value.extend(values)
            except ValueError as err:  # beyond int64
                raise invalid(f"{where}: feature {key!r}: {err}") from err
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        else:
            raise invalid(f"{where}: feature {key!r} mixes types or holds unsupported values")
    return example
