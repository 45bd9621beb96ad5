"""A local, TF Serving-compatible model server: PredictionService + ModelService over gRPC and TF Serving's
REST routes, on any SavedModel export base (``<base>/<version>/saved_model.pb``).

What it shares with ``tensorflow_model_server`` (so clients written against one work with the other):
  * the official ``tensorflow_serving.apis`` protos and gRPC services: Predict, Classify, Regress,
    GetModelMetadata (``signature_def``) and GetModelStatus;
  * the REST routes ``/v1/models/{name}[/versions/{v}]:predict|:classify|:regress``,
    ``/v1/models/{name}[/versions/{v}]/metadata`` and ``GET /v1/models/{name}[/versions/{v}]`` (status),
    with TF Serving's JSON bodies ("instances"/"inputs", "predictions"/"outputs", "examples"/"context",
    "results", {"b64": ...} for bytes, {"error": ...} on failure);
  * versions (``serving.versions``): the highest canonically numbered complete version is served, the base
    path is polled, new versions are warmed up and swapped in, failed ones retried when their files change,
    deleted ones unloaded;
  * ``--ssl_config_file`` (``serving.tls``): TLS and mutual TLS for gRPC and REST.

The seams, as in TF Serving: ``versions`` (the version manager), ``validation`` (request checks and codecs),
``runtime`` (running a signature), ``grpc_service`` (the servicers), ``rest`` (the HTTP handler), ``tls``,
``tuning`` (thread pools, malloc). This module starts them together (``serve``) and keeps the names callers
import from ``serving.server``.

Differences, all deliberate: an unknown signature answers NOT_FOUND (TF Serving: FAILED_PRECONDITION for
Predict, INVALID_ARGUMENT for Classify/Regress); every request is checked against the SignatureDef and the
export's limits before a tensor is built (``serving.validation``); one model per server.

Limits: binds 127.0.0.1 unless told otherwise; ``max_message_bytes`` caps gRPC messages and REST bodies
(RESOURCE_EXHAUSTED / HTTP 413); ``max_batch_size`` and ``max_elements`` cap what one request may declare;
``max_concurrency`` requests run at once (gRPC worker threads, a REST semaphore), ``max_queued`` more wait
(gRPC answers RESOURCE_EXHAUSTED beyond them; REST answers 503 after ``queue_timeout_s``); REST keeps at most
``max_connections`` connections and closes one whose request has not arrived within ``request_timeout_s``.
Errors in one request never stop the server.

Example:
    server = serve("seminar", "runs/demo/export/seminar", port=8500, rest_port=8501)
    ...
    server.stop()
"""

from __future__ import annotations

import errno
import logging
import threading
from concurrent import futures
from typing import Dict, List, Optional, Tuple

import grpc
import tensorflow as tf
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving import tls
from serving.errors import ServingError, StartupError, invalid
from serving.grpc_service import ModelServicer, PredictionServicer
from serving.rest import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT_S, RestFrontend
from serving.runtime import (  # noqa: F401
    DEFAULT_SIGNATURE,
    SIGNATURE_DEF_FIELD,
    Servable,
    check_inputs,
    dtype_enum,
    metadata_response,
    predict_protos,
    run_classify,
    run_predict,
    run_regress,
    serialized_examples,
    status_response,
)
from serving.tuning import (  # noqa: F401
    DEFAULT_MALLOC_MMAP_THRESHOLD_MB,
    MALLOC_TRIM_FACTOR,
    set_tensorflow_parallelism,
    tune_malloc,
)
from serving.validation import (  # noqa: F401
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_ELEMENTS,
    Limits,
    json_to_array,
    tensor_from_proto,
)
from serving.versions import (  # noqa: F401
    MIN_POLL_SECONDS,
    WARMUP_FILE,
    ModelManager,
    complete_versions,
    load_servable,
    read_signature_defs,
    version_directories,
)

__all__ = [  # the names callers import from serving.server (they live in the modules above)
    "DEFAULT_MALLOC_MMAP_THRESHOLD_MB", "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_CONCURRENCY", "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_SIGNATURE", "Limits", "MALLOC_TRIM_FACTOR", "MIN_POLL_SECONDS",
    "ModelManager", "ModelServer", "Servable", "ServingError", "SIGNATURE_DEF_FIELD", "StartupError", "WARMUP_FILE",
    "check_inputs", "complete_versions", "dtype_enum", "invalid", "json_to_array", "load_servable",
    "metadata_response", "predict_protos", "read_model_config", "read_signature_defs", "run_classify", "run_predict",
    "run_regress", "serialized_examples", "serve", "set_tensorflow_parallelism", "status_response",
    "tensor_from_proto", "tune_malloc", "version_directories",
]
LOG = logging.getLogger("serving")

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 8


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



def _check_settings(model_base_path: str, port: int, rest_port: Optional[int], poll_seconds: float,
                    max_message_bytes: int, max_concurrency: int, max_queued: int, max_batch_size: int,
                    max_elements: int, max_connections: int, request_timeout_s: float) -> None:
    """StartupError for settings the server cannot run with, before anything is bound or loaded."""
    for flag, value in (("port", port), ("rest_port", rest_port)):
        if value is not None and not (isinstance(value, int) and 0 <= value <= 65535):
            raise StartupError(f"{flag} {value} is out of range: a TCP port is 0-65535 (0 picks a free one)")
    if not poll_seconds >= MIN_POLL_SECONDS:
        raise StartupError(f"poll_seconds must be >= {MIN_POLL_SECONDS:g} (how often the base path is polled for "
                           f"new versions), got {poll_seconds}")
    for flag, value, least in (("max_concurrency", max_concurrency, 1), ("max_queued", max_queued, 0),
                               ("max_message_bytes", max_message_bytes, 1024),
                               ("max_batch_size", max_batch_size, 1), ("max_elements", max_elements, 1),
                               ("max_connections", max_connections, 1)):
        if not (isinstance(value, int) and value >= least):
            raise StartupError(f"{flag} must be an integer >= {least}, got {value!r}")
    if not request_timeout_s > 0:
        raise StartupError(f"request_timeout_s must be > 0, got {request_timeout_s}")
    if not tf.io.gfile.exists(model_base_path):
        raise StartupError(f"model base path {model_base_path} does not exist (export a model there first: "
                           "seminar-tf export --export-base ...)")
    if not tf.io.gfile.isdir(model_base_path):
        raise StartupError(f"model base path {model_base_path} is not a directory")
    if not complete_versions(model_base_path):
        raise StartupError(f"model base path {model_base_path} holds no version: no directory named 1, 2, ... "
                           "with a saved_model.pb (seminar-tf export writes one)")


def serve(model_name: str, model_base_path: str, port: int = 8500, rest_port: Optional[int] = 8501,
          host: str = "127.0.0.1", poll_seconds: float = 1.0,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
          max_queued: int = 64, warmup: bool = True, intra_op_parallelism: int = 0,
          inter_op_parallelism: int = 0,
          malloc_mmap_threshold_mb: float = DEFAULT_MALLOC_MMAP_THRESHOLD_MB,
          max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_elements: int = DEFAULT_MAX_ELEMENTS,
          max_connections: int = DEFAULT_MAX_CONNECTIONS, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
          ssl_config_file: Optional[str] = None) -> ModelServer:
    """Starts serving ``model_name`` from ``model_base_path`` and returns at once (see ``ModelServer``).

    Fails fast with ``StartupError`` (the CLI exits 2) on a missing base path or one without a version, a port
    out of range or in use (the message names it), a poll interval under 1 s, a limit under 1, an unusable
    ``ssl_config_file``. The newest complete version is loaded before returning; newer versions are picked up
    every ``poll_seconds``. Port 0 picks a free port (read ``server.grpc_port`` / ``server.rest_port``);
    ``rest_port=None`` disables REST. ``intra_op_parallelism`` / ``inter_op_parallelism``: see
    ``set_tensorflow_parallelism`` (0 = TensorFlow's default). ``malloc_mmap_threshold_mb``: see
    ``tune_malloc`` (0 = glibc's defaults); ``ModelServer.malloc`` says what was set. ``ssl_config_file``:
    TF Serving's SSLConfig text proto (``serving.tls``), for gRPC and REST.
    """
    _check_settings(model_base_path, port, rest_port, poll_seconds, max_message_bytes, max_concurrency, max_queued,
                    max_batch_size, max_elements, max_connections, request_timeout_s)
    ssl_config = tls.read_ssl_config(ssl_config_file) if ssl_config_file else None
    ssl_context = tls.server_ssl_context(ssl_config) if ssl_config is not None else None
    set_tensorflow_parallelism(intra_op_parallelism, inter_op_parallelism)
    malloc = tune_malloc(malloc_mmap_threshold_mb)
    manager = ModelManager(model_name, model_base_path, poll_seconds=poll_seconds, warmup=warmup,
                           max_batch_size=max_batch_size, max_elements=max_elements)
    options = [("grpc.max_receive_message_length", int(max_message_bytes)),
               ("grpc.max_send_message_length", int(max_message_bytes)),
               ("grpc.so_reuseport", 0)]
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="grpc"),
                              options=options, maximum_concurrent_rpcs=max_concurrency + max_queued)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(manager), grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), grpc_server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if ssl_config is not None:
            bound = grpc_server.add_secure_port(address, tls.grpc_server_credentials(ssl_config))
        else:
            bound = grpc_server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise StartupError(f"gRPC port {port} on {host} cannot be bound: it is in use (or the address is not "
                           "this machine's); pick another --port")
    rest = None
    try:
        if rest_port is not None:
            try:
                rest = RestFrontend(manager, host, rest_port, max_message_bytes, max_concurrency,
                                    max_connections=max_connections, request_timeout_s=request_timeout_s,
                                    ssl_context=ssl_context)
            except OSError as err:
                why = "it is in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err))
                raise StartupError(f"REST port {rest_port} on {host} cannot be bound: {why}; pick another "
                                   "--rest-port") from None
        manager.poll()
        if manager.current_version is None:
            states = manager.status(model_name)
            raise StartupError(f"model {model_name}: no version under {model_base_path} could be loaded"
                               + (f" ({states[0][3]})" if states else ""))
    except BaseException:
        grpc_server.stop(0)
        if rest is not None:
            rest.stop()
        raise
    grpc_server.start()
    if rest is not None:
        rest.start()
    manager.start()
    LOG.info("serving model %s from %s: gRPC %s:%d, REST %s (version %s, %s)", model_name, model_base_path, host,
             bound, f"{host}:{rest.port}" if rest else "off", manager.current_version,
             "TLS" if ssl_config is not None else "plaintext")
    return ModelServer(manager, grpc_server, bound, rest, malloc)


def read_model_config(path: str) -> List[Tuple[str, str]]:
    """(name, base_path) of each model in a TF Serving ``models.config`` (ModelServerConfig text proto)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    with tf.io.gfile.GFile(path) as f:
        text_format.Parse(f.read(), config)
    return [(c.name, c.base_path) for c in config.model_config_list.config]
