"""TF Serving's REST API (``/v1/models/...``) on the standard library's HTTP server, hardened against slow and
hostile clients:

  * at most ``max_connections`` connections at once (more are answered 503 and closed, without a thread);
  * every request (request line, headers, body) must arrive within ``request_timeout_s`` of the connection
    becoming ready for it, else the connection is closed: a client trickling bytes, or an idle keep-alive
    connection, holds its thread no longer than that;
  * the body is read before a model slot is taken (``max_concurrency`` requests run the model at once; more
    wait up to ``queue_timeout_s``, then 503); the bodies read and waiting hold at most ``max_buffered_bytes``
    together (503 beyond), and JSON is parsed only inside a slot;
  * Content-Length is required (411), must be a number (400) and at most ``max_body_bytes`` (413); a POST
    body must be JSON: Content-Type application/json (or curl's default application/x-www-form-urlencoded,
    or none), else 415;
  * every answer, errors included, is JSON: TF Serving's ``{"error": "..."}`` body with the HTTP status of the
    gRPC code (400 INVALID_ARGUMENT, 404 NOT_FOUND, 405 other methods, 413/429 RESOURCE_EXHAUSTED, 503 busy);
  * with an ``ssl_context`` the handshake runs in the connection's own thread, under the same deadline.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping, Optional, Tuple

import grpc
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import input_pb2

from serving import runtime, validation
from serving.errors import ServingError, exhausted, invalid
from serving.runtime import DEFAULT_SIGNATURE, SIGNATURE_DEF_FIELD, Servable
from serving.versions import ModelManager

LOG = logging.getLogger("serving")

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_MAX_BUFFERED_BYTES = 64 * 2 ** 20
JSON_CONTENT_TYPES = ("application/json", "text/json", "application/x-www-form-urlencoded")
_ROUTE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?"
                    r"(?:(?P<verb>:predict|:classify|:regress)|(?P<metadata>/metadata))?/?$")
_REASONS = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type",
            429: "Too Many Requests", 500: "Internal Server Error", 501: "Not Implemented",
            503: "Service Unavailable"}


class _Abort(Exception):
    """The client went away or ran out of time while sending: close the connection without an answer."""


def rest_input(body: Mapping) -> input_pb2.Input:
    """A :classify / :regress body ({"examples": [...], "context": {...}}) as tensorflow.serving.Input."""
    examples = body.get("examples")
    if not isinstance(examples, list):
        raise invalid("request body needs \"examples\": a list of {feature: value|list} objects")
    request_input = input_pb2.Input()
    if "context" in body:
        target = request_input.example_list_with_context
        target.context.CopyFrom(validation.example_from_json(body["context"], "context"))
    else:
        target = request_input.example_list
    for i, example in enumerate(examples):
        target.examples.add().CopyFrom(validation.example_from_json(example, f"examples[{i}]"))
    return request_input


def _address_family(host: str):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class RestFrontend:
    """TF Serving's REST API for one ``ModelManager`` (see the module docstring for the limits)."""

    def __init__(self, manager: ModelManager, host: str, port: int, max_body_bytes: int, max_concurrency: int,
                 queue_timeout_s: float = 30.0, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, ssl_context=None):
        self.manager = manager
        self.max_body_bytes = int(max_body_bytes)
        self.queue_timeout_s = float(queue_timeout_s)
        self.request_timeout_s = float(request_timeout_s)
        self.max_connections = int(max_connections)
        self._slots = threading.BoundedSemaphore(max_concurrency)
        # request bodies read and waiting for (or in) a model slot, all connections together
        self.max_buffered_bytes = max(2 * self.max_body_bytes, DEFAULT_MAX_BUFFERED_BYTES)
        self._buffered = 0
        self._buffered_lock = threading.Lock()
        self._connections = threading.BoundedSemaphore(self.max_connections)
        self._open = 0
        self._deadlines = {}  # socket -> time by which the request it is reading must be complete
        self._deadline_lock = threading.Lock()
        self._stopping = threading.Event()
        frontend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = self.request_timeout_s  # each recv; the reaper bounds the whole request

            def log_message(self, fmt, *args):  # route access logs to logging, not stderr
                LOG.debug("rest %s " + fmt, self.client_address[0], *args)

            def handle_one_request(self):
                frontend._watch(self.connection)
                try:
                    super().handle_one_request()
                except OSError:  # timed out, reset, or cut off by the reaper: this connection is done
                    self.close_connection = True
                finally:
                    frontend._unwatch(self.connection)

            def send_error(self, code, message=None, explain=None):  # the base class's own errors, as JSON
                self.close_connection = True
                frontend._send(self, code, {"error": message or _REASONS.get(code, "error")})

            def do_GET(self):
                frontend.handle(self, "GET")

            def do_POST(self):
                frontend.handle(self, "POST")

            def do_HEAD(self):
                frontend._reject_method(self, "HEAD")

            def do_PUT(self):
                frontend._reject_method(self, "PUT")

            def do_DELETE(self):
                frontend._reject_method(self, "DELETE")

            def do_PATCH(self):
                frontend._reject_method(self, "PATCH")

            def do_OPTIONS(self):
                frontend._reject_method(self, "OPTIONS")

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128
            address_family = _address_family(host)

            def handle_error(self, request, client_address):  # not socketserver's traceback on stderr
                LOG.debug("rest: connection from %s failed", client_address, exc_info=True)

            def process_request(self, request, client_address):
                if not frontend._connections.acquire(blocking=False):
                    if ssl_context is None:  # a TLS client could not read a plaintext answer
                        frontend._refuse(request)
                    self.shutdown_request(request)
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request, client_address):
                try:
                    if ssl_context is not None:
                        request = frontend._handshake(ssl_context, request)
                        if request is None:
                            return
                    super().process_request_thread(request, client_address)
                finally:
                    frontend._connections.release()

        self.httpd = Server((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True)
        self._reaper = threading.Thread(target=self._reap, name="rest-deadlines", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._reaper.start()

    def stop(self) -> None:
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------------------------------ connections
    def _watch(self, connection) -> None:
        with self._deadline_lock:
            self._deadlines[connection] = time.monotonic() + self.request_timeout_s

    def _unwatch(self, connection) -> None:
        with self._deadline_lock:
            self._deadlines.pop(connection, None)

    def _reap(self) -> None:
        """Closes the connections whose request did not arrive in time (their reads return at once)."""
        tick = min(0.25, self.request_timeout_s / 4)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            with self._deadline_lock:
                late = [c for c, deadline in self._deadlines.items() if deadline < now]
                for connection in late:
                    del self._deadlines[connection]
            for connection in late:
                LOG.info("rest: closing a connection that did not send its request within %.0fs",
                         self.request_timeout_s)
                try:
                    socket.socket.shutdown(connection, socket.SHUT_RDWR)
                except OSError:
                    pass

    def _handshake(self, context, request):
        self._watch(request)
        try:
            request.settimeout(self.request_timeout_s)
            return context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as err:
            LOG.info("rest: TLS handshake failed: %s", err)
            try:
                request.close()
            except OSError:
                pass
            return None
        finally:
            self._unwatch(request)

    def _refuse(self, request) -> None:
        """A connection beyond max_connections: one 503 (plaintext only; a TLS client just sees the close)."""
        body = json.dumps({"error": f"too many connections (max_connections={self.max_connections})"}).encode()
        try:
            request.setblocking(False)
            request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass

    # ------------------------------------------------------------------------------------------ routing
    def _reject_method(self, handler, method: str) -> None:
        handler.close_connection = True
        self._send(handler, 405, {"error": f"Method {method} not allowed: the REST API takes GET and POST"},
                   headers={"Allow": "GET, POST"}, with_body=method != "HEAD")

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        try:
            status, body = self._dispatch(handler, method)
        except _Abort:
            handler.close_connection = True
            return
        except ServingError as err:
            status, body = err.http_status, {"error": err.message}
        except Exception as err:  # noqa: BLE001
            LOG.exception("internal error")
            status, body = 500, {"error": f"{type(err).__name__}: {err}"}
        self._send(handler, status, body)

    def _dispatch(self, handler, method) -> Tuple[int, object]:
        match = _ROUTE.match(handler.path.split("?")[0])
        if not match:
            handler.close_connection = True
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {method} {handler.path[:200]}")
        name, verb = match["name"], match["verb"]
        version = int(match["version"]) if match["version"] else None
        if method == "GET":
            self._unwatch(handler.connection)
            if verb:
                handler.close_connection = True
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"{verb[1:]} needs POST", 405)
            if match["metadata"]:
                response = runtime.metadata_response(self.manager, name, version, [SIGNATURE_DEF_FIELD])
                return 200, json_format.MessageToDict(response, preserving_proto_field_name=True)
            return 200, json_format.MessageToDict(runtime.status_response(self.manager, name, version),
                                                  preserving_proto_field_name=True,
                                                  always_print_fields_with_no_presence=True)
        if not verb:
            handler.close_connection = True
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Malformed request: POST {handler.path[:200]}")
        raw = self._read_body(handler)  # before a model slot: a slow sender holds only its own thread
        try:
            self._unwatch(handler.connection)
            if not self._slots.acquire(timeout=self.queue_timeout_s):
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "server busy: too many concurrent requests", 503)
            try:
                body = self._parse_json(raw)  # in the slot: parsed JSON takes up to ~15x the body's bytes
                raw = None
                servable = self.manager.servable(name, version)
                signature_name = body.get("signature_name") or DEFAULT_SIGNATURE
                if not isinstance(signature_name, str):
                    raise invalid("'signature_name' must be a string")
                if verb == ":predict":
                    return 200, self._predict(servable, signature_name, body)
                request_input = rest_input(body)
                if verb == ":regress":
                    return 200, {"results": [float(v) for v in runtime.run_regress(servable, signature_name,
                                                                                   request_input)]}
                results = runtime.run_classify(servable, signature_name, request_input)
                return 200, {"results": [[[label, score] for label, score in row] for row in results]}
            finally:
                self._slots.release()
        finally:
            self._release(handler)

    def _predict(self, servable: Servable, signature_name: str, body: Mapping):
        signature_def = runtime.signature(servable, signature_name)
        names = sorted(signature_def.inputs)
        dtypes = {n: tf.dtypes.as_dtype(signature_def.inputs[n].dtype) for n in names}
        if ("instances" in body) == ("inputs" in body):
            raise invalid("request body needs exactly one of \"instances\" (row format) or \"inputs\" (columnar)")
        row_format = "instances" in body
        if row_format:
            instances = body["instances"]
            if not isinstance(instances, list) or not instances:
                raise invalid("\"instances\" must be a non-empty list")
            if all(isinstance(i, dict) and "b64" not in i for i in instances):
                keys = set(instances[0])
                if any(set(i) != keys for i in instances):
                    raise invalid("every instance must hold the same named inputs")
                raw = {k: [i[k] for i in instances] for k in keys}
            elif len(names) == 1:
                raw = {names[0]: instances}
            else:
                raise invalid(f"signature {signature_name!r} has inputs {names}: send instances as objects")
        else:
            columns = body["inputs"]
            raw = columns if isinstance(columns, dict) and "b64" not in columns else (
                {names[0]: columns} if len(names) == 1 else None)
            if raw is None:
                raise invalid(f"signature {signature_name!r} has inputs {names}: \"inputs\" must be an object")
        shapes = {k: validation.json_shape(v, k) for k, v in raw.items()}
        validation.check_declared(signature_name, signature_def, shapes,
                                  {k: dtypes[k].as_datatype_enum for k in raw if k in dtypes}, servable.limits)
        inputs = {k: validation.json_to_array(v, dtypes[k], k, shapes[k]) for k, v in raw.items()}
        if validation.is_examples_signature(signature_def):
            validation.parse_examples(validation.string_values(inputs[validation.EXAMPLES_INPUT]), servable.limits)
        outputs = runtime.run_predict(servable, signature_name, inputs,
                                      {k: dtypes[k].as_datatype_enum for k in inputs})
        if not row_format:
            converted = {k: validation.array_to_json(k, v) for k, v in outputs.items()}
            return {"outputs": next(iter(converted.values())) if len(converted) == 1 else converted}
        batch = {v.shape[0] if v.ndim else None for v in outputs.values()}
        if len(batch) != 1 or None in batch:
            raise invalid("outputs do not share a batch dimension; use the columnar \"inputs\" format")
        if len(outputs) == 1:
            name, value = next(iter(outputs.items()))
            return {"predictions": validation.array_to_json(name, value)}
        rows = {k: validation.array_to_json(k, v) for k, v in outputs.items()}
        return {"predictions": [{k: rows[k][i] for k in rows} for i in range(batch.pop())]}

    # ------------------------------------------------------------------------------------------ I/O
    def _read_body(self, handler) -> bytes:
        """The request's body bytes, after the header checks; its length is reserved from the bytes all
        buffered bodies may hold together (``max_buffered_bytes``; 503 beyond) until ``_release``."""
        if handler.headers.get("Transfer-Encoding"):
            handler.close_connection = True
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "Transfer-Encoding is not supported: send the body with a Content-Length", 411)
        length = handler.headers.get("Content-Length")
        if length is None:
            handler.close_connection = True
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Content-Length header required", 411)
        if not length.strip().isdigit() or not length.strip().isascii():
            handler.close_connection = True
            raise invalid(f"bad Content-Length {length[:40]!r}: expects a non-negative integer")
        length = int(length)
        content_type = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type and content_type not in JSON_CONTENT_TYPES and not content_type.endswith("+json"):
            handler.close_connection = True
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Content-Type {content_type!r} is not supported: send application/json", 415)
        if length > self.max_body_bytes:
            self._drain(handler, length)
            raise exhausted(f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}", 413)
        with self._buffered_lock:
            if self._buffered + length > self.max_buffered_bytes:
                handler.close_connection = True
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "server busy: too many request bodies in memory", 503)
            self._buffered += length
            handler.reserved_bytes = length
        try:
            raw = handler.rfile.read(length)
        except OSError:  # timed out or cut off by the reaper
            self._release(handler)
            raise _Abort() from None
        if len(raw) != length:
            self._release(handler)
            raise _Abort()
        return raw

    def _release(self, handler) -> None:
        with self._buffered_lock:
            self._buffered -= getattr(handler, "reserved_bytes", 0)
            handler.reserved_bytes = 0

    @staticmethod
    def _parse_json(raw: bytes):
        try:
            body = json.loads(raw or b"{}")
        except RecursionError:
            raise invalid("JSON parse error: nested too deeply") from None
        except ValueError as err:
            raise invalid(f"JSON parse error: {str(err)[:200]}") from None
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        return body

    def _drain(self, handler, length: int) -> None:
        """Reads and drops an oversize body (in chunks, under the request deadline) so the client can read
        the 413; a body beyond 4x the limit is not read, the connection is closed instead."""
        handler.close_connection = True
        if length > 4 * self.max_body_bytes:
            return
        while length > 0:
            try:
                chunk = handler.rfile.read(min(length, 1 << 16))
            except OSError:
                return
            if not chunk:
                break
            length -= len(chunk)

    @staticmethod
    def _send(handler, status: int, body, headers: Optional[Mapping[str, str]] = None,
              with_body: bool = True) -> None:
        data = json.dumps(body, indent=1).encode("utf-8")
        try:
            handler.send_response(status, _REASONS.get(status))
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            if handler.close_connection:
                handler.send_header("Connection", "close")
            handler.end_headers()
            if with_body:
                handler.wfile.write(data)
        except OSError:
            LOG.debug("rest client went away")
