"""Running a loaded version: Predict / Classify / Regress on numpy or checked TensorProto inputs, the
metadata and status responses, and TensorFlow errors as gRPC status codes."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.example import example_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, input_pb2

from serving import validation
from serving.errors import CODE_BY_NUMBER, ServingError, invalid

DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_DEF_FIELD = "signature_def"


@dataclasses.dataclass
class Servable:
    """One loaded version: the SavedModel's SignatureDefs (as TF Serving reads them), its functions and the
    limits its requests are checked against."""

    version: int
    path: str
    signature_defs: Dict[str, meta_graph_pb2.SignatureDef]
    functions: Dict[str, object]
    loaded: object  # keeps the restored object (variables, tables) alive
    limits: validation.Limits = dataclasses.field(default_factory=validation.Limits)


def signature(servable: Servable, signature_name: str) -> meta_graph_pb2.SignatureDef:
    signature_def = servable.signature_defs.get(signature_name)
    if signature_def is None:
        raise ServingError(grpc.StatusCode.NOT_FOUND,
                           f"Serving signature key \"{signature_name}\" not found; this model has "
                           f"{sorted(servable.signature_defs)}")
    return signature_def


def check_inputs(signature_name: str, signature_def: meta_graph_pb2.SignatureDef,
                 inputs: Mapping[str, np.ndarray], dtypes: Mapping[str, int],
                 limits: Optional[validation.Limits] = None) -> None:
    """INVALID_ARGUMENT naming the input when ``inputs`` do not fit the SignatureDef (and ``limits``).

    ``dtypes``: the DataType enum each input arrived with (TensorProto.dtype for gRPC).
    """
    validation.check_declared(signature_name, signature_def, {k: list(v.shape) for k, v in inputs.items()},
                              dtypes, limits or validation.Limits(max_batch_size=2 ** 62, max_elements=2 ** 62))


def dtype_enum(value: np.ndarray) -> int:
    """The TensorFlow DataType enum of a numpy array (bytes/str/object arrays are DT_STRING)."""
    if isinstance(value, tf.Tensor):
        return value.dtype.as_datatype_enum
    value = np.asarray(value)
    dtype = tf.string if value.dtype.kind in "OSU" else tf.dtypes.as_dtype(value.dtype)
    return dtype.as_datatype_enum


def tf_error(err: tf.errors.OpError) -> ServingError:
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
    return ServingError(CODE_BY_NUMBER.get(err.error_code, grpc.StatusCode.INTERNAL), message)


def predict_protos(servable: Servable, signature_name: str, protos: Mapping,
                   output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Predict on a request's TensorProtos: every size check before any tensor is built, then the tf.Example
    checks when the signature takes serialized examples (``ctr_examples`` through Predict)."""
    signature_def = signature(servable, signature_name)
    validation.check_protos(signature_name, signature_def, protos, servable.limits)
    inputs = {k: validation.tensor_from_proto(k, v) for k, v in protos.items()}
    if validation.is_examples_signature(signature_def):
        validation.parse_examples(validation.string_values(inputs[validation.EXAMPLES_INPUT]), servable.limits)
    return run_predict(servable, signature_name, inputs, {k: v.dtype for k, v in protos.items()}, output_filter)


def run_predict(servable: Servable, signature_name: str, inputs: Mapping[str, np.ndarray],
                dtypes: Optional[Mapping[str, int]] = None,
                output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Runs one signature on numpy inputs (checked against its SignatureDef); returns numpy outputs."""
    signature_def = signature(servable, signature_name)
    if dtypes is None:
        dtypes = {k: dtype_enum(v) for k, v in inputs.items()}
    check_inputs(signature_name, signature_def, inputs, dtypes, servable.limits)
    unknown = sorted(set(output_filter) - set(signature_def.outputs))
    if unknown:
        raise invalid(f"output_filter {unknown} not in the outputs of {signature_name!r}: "
                       f"{sorted(signature_def.outputs)}")
    function = servable.functions[signature_name]
    feeds = {k: tf.constant(v, dtype=tf.dtypes.as_dtype(signature_def.inputs[k].dtype)) for k, v in inputs.items()}
    try:
        outputs = function(**feeds)
    except tf.errors.OpError as err:
        raise tf_error(err) from err
    except (TypeError, ValueError) as err:
        raise invalid(f"signature {signature_name!r}: {err}") from err
    wanted = list(output_filter) or list(outputs)
    return {name: outputs[name].numpy() for name in wanted}


def serialized_examples(request_input: input_pb2.Input,
                        limits: Optional[validation.Limits] = None) -> np.ndarray:
    """tensorflow.serving.Input → serialized tf.Examples [B] (context features merged into each example), after
    the same checks as Predict (``validation.check_examples``: batch, sizes, one value per history step)."""
    kind = request_input.WhichOneof("kind")
    context = None
    if kind == "example_list":
        examples = request_input.example_list.examples
    elif kind == "example_list_with_context":
        context = request_input.example_list_with_context.context
        examples = request_input.example_list_with_context.examples
    else:
        raise invalid("Input is empty: set input.example_list or input.example_list_with_context")
    if not examples:
        raise invalid("Input is empty: no examples")
    validation.check_examples(examples, limits or validation.Limits(), context)
    if context is None:
        return np.array([e.SerializeToString() for e in examples], dtype=object)
    merged = []
    for example in examples:
        one = example_pb2.Example()
        one.CopyFrom(context)
        one.MergeFrom(example)
        merged.append(one.SerializeToString())
    return np.array(merged, dtype=object)


def _examples_signature(servable: Servable, signature_name: str, outputs: Sequence[str], api: str):
    signature_def = signature(servable, signature_name)
    if list(signature_def.inputs) != [tf.saved_model.CLASSIFY_INPUTS]:
        raise invalid(f"{api} needs a signature with the one input {tf.saved_model.CLASSIFY_INPUTS!r} "
                       f"(serialized tf.Example); {signature_name!r} takes {sorted(signature_def.inputs)}")
    if not set(outputs) & set(signature_def.outputs):
        raise invalid(f"{api} needs a signature with output(s) {list(outputs)}; {signature_name!r} has "
                       f"{sorted(signature_def.outputs)}")
    return signature_def


def run_regress(servable: Servable, signature_name: str, request_input: input_pb2.Input) -> np.ndarray:
    """Regress API: one float per example from the signature's ``outputs`` ([B] or [B, 1])."""
    _examples_signature(servable, signature_name, [tf.saved_model.REGRESS_OUTPUTS], "Regress")
    examples = serialized_examples(request_input, servable.limits)
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
    examples = serialized_examples(request_input, servable.limits)
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


def metadata_response(manager, name: str, version: Optional[int], metadata_fields: Sequence[str],
                      label: str = ""):
    """GetModelMetadataResponse with the ``signature_def`` field (the only one TF Serving defines)."""
    if not metadata_fields:
        raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
    unsupported = [f for f in metadata_fields if f != SIGNATURE_DEF_FIELD]
    if unsupported:
        raise invalid(f"Metadata field(s) {unsupported} not supported; use {SIGNATURE_DEF_FIELD!r}")
    servable = manager.servable(name, version, label)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature_def in servable.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature_def)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def status_response(manager, name: str, version: Optional[int]):
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state, code, message in manager.status(name, version):
        status = response.model_version_status.add()
        status.version = number
        status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        status.status.error_code = code
        status.status.error_message = message
    return response


def version_of(model_spec) -> Optional[int]:
    return model_spec.version.value if model_spec.HasField("version") else None


