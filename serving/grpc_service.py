"""The gRPC services: tensorflow.serving.PredictionService and ModelService on the official stubs."""

from __future__ import annotations

import logging

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import runtime
from serving.errors import ServingError
from serving.runtime import Servable
from serving.versions import ModelManager

LOG = logging.getLogger("serving")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService: Predict, Classify, Regress, GetModelMetadata."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def _servable(self, model_spec) -> Servable:
        return self.manager.servable(model_spec.name, runtime.version_of(model_spec), model_spec.version_label)

    @staticmethod
    def _spec(response_spec, request_spec, servable: Servable, signature_name: str) -> None:
        response_spec.name = request_spec.name
        response_spec.version.value = servable.version
        response_spec.signature_name = signature_name

    def Predict(self, request, context):
        return _answer(context, self._predict, request)

    def _predict(self, request):
        servable = self._servable(request.model_spec)
        signature_name = request.model_spec.signature_name or runtime.DEFAULT_SIGNATURE
        outputs = runtime.predict_protos(servable, signature_name, request.inputs, list(request.output_filter))
        response = predict_pb2.PredictResponse()
        self._spec(response.model_spec, request.model_spec, servable, signature_name)
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
        return response

    def Classify(self, request, context):
        return _answer(context, self._classify, request)

    def _classify(self, request):
        servable = self._servable(request.model_spec)
        signature_name = request.model_spec.signature_name or runtime.DEFAULT_SIGNATURE
        response = classification_pb2.ClassificationResponse()
        for row in runtime.run_classify(servable, signature_name, request.input):
            classifications = response.result.classifications.add()
            for label, score in row:
                classifications.classes.add(label=label, score=score)
        self._spec(response.model_spec, request.model_spec, servable, signature_name)
        return response

    def Regress(self, request, context):
        return _answer(context, self._regress, request)

    def _regress(self, request):
        servable = self._servable(request.model_spec)
        signature_name = request.model_spec.signature_name or runtime.DEFAULT_SIGNATURE
        response = regression_pb2.RegressionResponse()
        for value in runtime.run_regress(servable, signature_name, request.input):
            response.result.regressions.add(value=float(value))
        self._spec(response.model_spec, request.model_spec, servable, signature_name)
        return response

    def GetModelMetadata(self, request, context):
        spec = request.model_spec
        return _answer(context, runtime.metadata_response, self.manager, spec.name, runtime.version_of(spec),
                       list(request.metadata_field), spec.version_label)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: GetModelStatus (HandleReloadConfigRequest is UNIMPLEMENTED)."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        return _answer(context, runtime.status_response, self.manager, request.model_spec.name,
                       runtime.version_of(request.model_spec))


def _answer(context, fn, *args):
    try:
        return fn(*args)
    except ServingError as err:
        context.abort(err.code, err.message)
    except Exception as err:  # noqa: BLE001  (a bug in one request must not take the server down)
        LOG.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
