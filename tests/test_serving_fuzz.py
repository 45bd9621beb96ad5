"""Fuzz test of the local server (``seminar-tf serve`` in a subprocess on 127.0.0.1): 1,200 malformed gRPC and
REST requests drawn from the hostile cases of serving/README.md ("Limits"), sent from 2 threads with a fixed
seed. Every one gets an error that is not INTERNAL (REST: a 4xx/501/503 JSON body, or a closed connection for a
body that never arrives); a known-good request keeps its score throughout; the server's RSS stays within
``RSS_BOUND_BYTES`` of what it had after warm-up."""

import base64
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_service_pb2_grpc, regression_pb2

from seminar_tf import schema
from seminar_tf.data import reader
from serving import MODEL_NAME, client
from test_serving import MAX_HISTORY, _build_model, _export
from proto_fixtures import declared

pytestmark = pytest.mark.slow  # end to end: trains and exports (make test-quick skips it)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUESTS = 1200
THREADS = 2
RSS_BOUND_BYTES = 200 * 2 ** 20  # above the server's RSS after warm-up, whatever the fuzz sends
MAX_MESSAGE_MB = 4


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, dataset_dir):
    model, metadata = _build_model(dataset_dir)
    base = str(tmp_path_factory.mktemp("fuzz") / "seminar")
    _export(model, metadata, dataset_dir, base)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with socket.socket() as probe:  # the CLI's --rest-port 0 disables REST: take a free port
        probe.bind(("127.0.0.1", 0))
        rest_port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--model-base-path", base, "--host", "127.0.0.1",
         "--port", "0", "--rest-port", str(rest_port), "--max-concurrency", "2", "--max-connections", "16",
         "--rest-request-timeout-seconds", "0.5", "--max-message-mb", str(MAX_MESSAGE_MB), "--max-seconds", "600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        started = json.loads(process.stdout.readline())
        users = sorted(metadata.user_attributes) + (["id"] if metadata.num_users else [])
        yield {"process": process, "grpc": started["grpc"], "rest": int(started["rest"].rsplit(":", 1)[1]),
               "items": reader.load_vocabulary(dataset_dir, schema.ITEM_VOCAB)[2:],
               "users": [schema.user_attribute_feature(n) for n in users]}
    finally:
        process.terminate()
        process.wait(timeout=60)


class Fuzzer:
    """Draws one malformed request at a time from the cases the server must refuse."""

    def __init__(self, served, seed):
        self.rng = random.Random(seed)
        self.items, self.users = served["items"], served["users"]
        self.rest_port = served["rest"]

    # -------------------------------------------------------------------------------------------- valid parts
    def ctr_protos(self, rows=1, length=4):
        items = [[self.rng.choice(self.items) for _ in range(length)] for _ in range(rows)]
        protos = {"history_item_ids": tf.make_tensor_proto(np.array(items, object).astype(bytes)),
                  "history_queries": tf.make_tensor_proto(np.full([rows, length], b"", object)),
                  "target_item_id": tf.make_tensor_proto(np.array([self.rng.choice(self.items)] * rows, object)),
                  "target_query": tf.make_tensor_proto(np.full([rows], b"", object))}
        for name in self.users:
            protos[name] = tf.make_tensor_proto(np.full([rows], b"", object))
        return protos

    def example_features(self, length=3):
        features = {"history_item_ids": [self.rng.choice(self.items) for _ in range(length)],
                    "history_queries": [""] * length, "target_item_id": self.rng.choice(self.items)}
        features.update({name: "" for name in self.users})
        return features

    # -------------------------------------------------------------------------------------------- gRPC
    def grpc_case(self):
        """(method, request) of a malformed gRPC request."""
        rng = self.rng
        kind = rng.randrange(12)
        protos = self.ctr_protos()
        name = rng.choice(sorted(protos))
        signature = "ctr"
        if kind == 0:  # one value broadcast to a huge declared shape
            protos[name] = declared([1, rng.choice([10 ** 6, 10 ** 8, 2 ** 40])], [b"x"])
        elif kind == 1:  # negative dimensions
            protos[name] = declared(rng.choice([[1, -1], [-1, -3], [-5]]), [b"a", b"b", b"c"][: rng.randint(1, 3)])
        elif kind == 2:  # value count that fits neither the shape nor a broadcast
            protos[name] = declared([1, 6], [b"a"] * rng.choice([0, 2, 5, 7, 40]))
        elif kind == 3:  # wrong dtype
            protos[name] = declared([1, 4], [1, 2, 3, 4], tf.int64)
        elif kind == 4:  # a batch beyond max_batch_size
            protos["target_item_id"] = declared([rng.choice([257, 10 ** 5, 10 ** 9])], [b"x"])
        elif kind == 5 and rng.random() < 0.1:  # beyond the message limit: refused by gRPC itself
            protos["target_query"] = declared([1], [b"q" * (MAX_MESSAGE_MB * 2 ** 20 + 10)])
        elif kind == 5:  # history longer than max_history, one value per element (a real allocation)
            length = MAX_HISTORY + rng.randint(1, 200)
            protos["history_item_ids"] = declared([1, length], [b"i"] * length)
            protos["history_queries"] = declared([1, length], [b""] * length)
        elif kind == 6:  # garbage bytes as serialized examples
            signature = "ctr_examples"
            garbage = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) for _ in range(rng.randint(1, 4))]
            protos = {"inputs": declared([len(garbage)], garbage)}
        elif kind == 7:  # rank with too many candidates
            signature = "rank"
            protos = {k: v for k, v in protos.items() if not k.startswith("target_")}
            protos["candidate_item_ids"] = declared([1, 10 ** 7], [b"c"])
            protos["candidate_queries"] = declared([1, 10 ** 7], [b""])
        elif kind in (8, 9):  # tf.Examples whose history lists disagree, too long, or too many of them
            features = self.example_features()
            choice = rng.randrange(4)
            if choice == 0:
                features["history_queries"] = [""] * rng.choice([0 + 1, 2, 4, 9])
            elif choice == 1:
                features["history_item_ids"] = ["x"] * (MAX_HISTORY + rng.randint(1, 50))
            elif choice == 2:
                features["target_item_id"] = ["a", "b"]
            else:
                features["history_item_ids"] = [1, 2, 3]
            examples = [client.make_example(features)] * (rng.choice([1, 3]) if choice != 3 else 1)
            if rng.random() < 0.2:
                examples = [client.make_example(self.example_features())] * 257
            request = (regression_pb2.RegressionRequest() if kind == 8 else
                       classification_pb2.ClassificationRequest())
            request.model_spec.name = MODEL_NAME
            request.model_spec.signature_name = "ctr_examples" if kind == 8 else "ctr_classify"
            request.input.example_list.examples.extend(examples)
            return ("Regress" if kind == 8 else "Classify"), request
        elif kind == 10:  # tensor_content of the wrong length
            proto = tf.make_tensor_proto(np.arange(4, dtype=np.int64))
            proto.tensor_content = proto.tensor_content[: rng.randint(0, 31)]
            protos[name] = proto
        else:  # unknown signature, model, version or input
            choice = rng.randrange(3)
            if choice == 0:
                signature = "no_such_signature"
            elif choice == 1:
                protos["extra_input"] = declared([1], [b"x"])
            else:
                del protos[name]
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL_NAME
        request.model_spec.signature_name = signature
        for key, proto in protos.items():
            request.inputs[key].CopyFrom(proto)
        return "Predict", request

    # -------------------------------------------------------------------------------------------- REST
    def rest_case(self):
        """Raw bytes of a malformed REST request, and whether the server may close without answering."""
        rng = self.rng
        path = f"/v1/models/{MODEL_NAME}:predict"
        kind = rng.randrange(10)
        if kind == 5 and rng.random() > 0.25:  # each of these holds the thread for the request timeout
            kind = 3
        good = {"signature_name": "ctr", "inputs": {
            "history_item_ids": [[rng.choice(self.items) for _ in range(4)]], "history_queries": [[""] * 4],
            "target_item_id": [rng.choice(self.items)], "target_query": [""], **{n: [""] for n in self.users}}}

        def post(body: bytes, headers="Content-Type: application/json\r\n", length=None):
            length = len(body) if length is None else length
            return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {length}\r\n\r\n".encode() + body)

        if kind == 0:
            depth = rng.choice([50, 1000, 100000])
            return post(b"[" * depth + b"]" * depth), False
        if kind == 1:
            return post(json.dumps(good).encode(), length=rng.choice(["-1", "abc", "1e3", "0x10", ""])), False
        if kind == 2:
            return post(json.dumps(good).encode(), headers=rng.choice(
                ["Content-Type: text/plain\r\n", "Content-Type: application/octet-stream\r\n",
                 "Content-Type: multipart/form-data\r\n"])), False
        if kind == 3:
            return post(bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))), False
        if kind == 4:  # longer than max_history, ragged, wrong types
            body = json.loads(json.dumps(good))
            choice = rng.randrange(3)
            if choice == 0:
                body["inputs"]["history_item_ids"] = [["x"] * (MAX_HISTORY + 1)]
            elif choice == 1:
                body["inputs"]["history_item_ids"] = [["x", "y"], ["z"]]
            else:
                body["inputs"]["target_item_id"] = [1.5]
            return post(json.dumps(body).encode()), False
        if kind == 5:  # a body announced and not sent (the server closes it after its request timeout)
            return post(b'{"inputs": ', length=1000), True
        if kind == 6:
            method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
            return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode(), False
        if kind == 7:
            return post(b"{}", length=str(MAX_MESSAGE_MB * 2 ** 20 * 8)), True  # oversize: refused, not read
        if kind == 8:  # garbage tf.Examples through :regress / :predict
            garbage = base64.b64encode(bytes(rng.randrange(256) for _ in range(20))).decode()
            return post(json.dumps({"signature_name": "ctr_examples", "inputs": [{"b64": garbage}]}).encode()), False
        body = {"signature_name": "ctr_examples",
                "examples": [{**self.example_features(), "history_queries": ["", "q"] * rng.randint(2, 4)}]}
        path = f"/v1/models/{MODEL_NAME}:regress"
        return post(json.dumps(body).encode()), False

    def send_rest(self, data: bytes):
        with socket.create_connection(("127.0.0.1", self.rest_port), timeout=30) as sock:
            try:
                sock.sendall(data)
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return None, None
                    received += chunk
            except ConnectionResetError:
                return None, None
        head, body = received.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        return status, head


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's RSS from /proc")
def test_fuzz_malformed_requests_get_clean_errors_bounded_memory_and_the_same_score(served):
    pid = served["process"].pid
    channel = grpc.insecure_channel(served["grpc"], options=[("grpc.max_send_message_length", 64 * 2 ** 20)])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    good = Fuzzer(served, seed=12345)
    known = predict_pb2.PredictRequest()
    known.model_spec.name, known.model_spec.signature_name = MODEL_NAME, "ctr"
    for key, proto in good.ctr_protos(rows=2, length=6).items():
        known.inputs[key].CopyFrom(proto)

    def score():
        return tf.make_ndarray(stub.Predict(known, timeout=60).outputs["probability"])

    want = score()
    for _ in range(20):
        np.testing.assert_allclose(score(), want, rtol=1e-6)
    baseline = _rss(pid)
    peak, sampling = [baseline], threading.Event()

    def sample():
        while not sampling.wait(0.05):
            peak.append(_rss(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    failures, counts, lock = [], {"grpc": 0, "rest": 0, "closed": 0}, threading.Lock()
    deadline = time.monotonic() + 240

    def worker(index):
        fuzzer = Fuzzer(served, seed=index)
        for number in range(REQUESTS // THREADS):
            if time.monotonic() > deadline:
                failures.append("time budget exceeded")
                return
            if number % 2 == 0:
                method, request = fuzzer.grpc_case()
                try:
                    getattr(stub, method)(request, timeout=60)
                    failures.append(f"{method} accepted: {str(request)[:200]}")
                except grpc.RpcError as err:
                    if err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                        failures.append(f"{method}: {err.code().name}: {err.details()}")
                with lock:
                    counts["grpc"] += 1
            else:
                data, may_close = fuzzer.rest_case()
                status, head = fuzzer.send_rest(data)
                with lock:
                    counts["rest"] += 1
                    counts["closed"] += status is None
                if status is None and not may_close:
                    failures.append(f"REST closed without an answer: {data[:120]!r}")
                elif status is not None and not (400 <= status < 500 or status in (501, 503)):
                    failures.append(f"REST {status}: {data[:120]!r}")
                elif status is not None and b"application/json" not in head:
                    failures.append(f"REST {status} without a JSON body: {data[:120]!r}")
            if number % 100 == 0:
                np.testing.assert_allclose(score(), want, rtol=1e-6)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sampling.set()
    sampler.join()
    assert failures == [], failures[:10]
    assert counts["grpc"] + counts["rest"] == REQUESTS and counts["grpc"] >= 500 and counts["rest"] >= 500
    np.testing.assert_allclose(score(), want, rtol=1e-6)
    growth = max(peak) - baseline
    print(f"fuzz: {counts}, RSS after warm-up {baseline / 2 ** 20:.0f} MiB, peak {max(peak) / 2 ** 20:.0f} MiB "
          f"(+{growth / 2 ** 20:.0f} MiB)")
    assert growth < RSS_BOUND_BYTES
    assert served["process"].poll() is None  # still running
