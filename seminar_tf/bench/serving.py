"""Serving load test: the ``rank`` signature with a long history (L = 10^4) and N = 100 candidates, on
loopback.

A bounded run: the export is served by ``seminar-tf serve``'s server in a child process (so the load
generator does not share a Python interpreter with it); ``clients`` threads send a fixed number of ``rank``
requests through the official gRPC stub. Reported: p50/p99 latency, QPS and the error count under
concurrency, once per server setting (``server_settings``: intra-op threads as TF Serving's
``--tensorflow_intra_op_parallelism``, 0 = TensorFlow's default, and the server's malloc tuning
``--malloc-mmap-threshold-mb``, 0 = glibc's defaults); the same request sequentially in-process (the loaded
SavedModel's signature called directly, in this process with the default malloc tuning) and over gRPC, whose
difference is the serving overhead; and in-process latency over a small grid of (L, N), which says how the GSU
path scales.

The model is the trained demo run when one exists (``model_dir``, default ``runs/demo/ctr``, with best
weights), otherwise a demo-size SEMINAR model with random weights over synthetic vocabularies (latency does
not depend on the weights). GSU paths: ``exact``; ``pq_adc`` (codebooks fitted with faiss k-means on the
model's own vocabulary embeddings, the content encoder runs only on the K kept pairs); ``pq_adc`` with an
exact re-rank of ``rerank``·K candidates. ``pq_sdc`` is left out of the load test: its L·M²·S table lookups per
candidate make it the slowest path (``seminar-tf bench pq`` measures it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from seminar_tf import schema
from seminar_tf.bench import child_env, stamp
from seminar_tf.bench.serving_report import _findings, _setting, markdown  # noqa: F401  (re-exported)

COMMAND = "seminar-tf bench serving"
DEFAULT_RUN = os.path.join("runs", "demo", "ctr")
GSU_PATHS = ("exact", "pq_adc", "pq_adc_rerank")  # pq_adc_rerank: pq_adc + exact re-rank of rerank·K candidates
SKIPPED_PATHS = {"pq_sdc": "left out: L·M²·S centroid-table lookups per candidate (1.3e8 per request at L=10^4, "
                           "N=100) make it the slowest path; `seminar-tf bench pq` measures it"}
MODEL_NAME = "seminar"


@dataclasses.dataclass
class ServingBenchConfig:
    history_length: int = 10_000  # L of every request
    num_candidates: int = 100  # N of every request
    clients: int = 4  # concurrent gRPC clients of the load test (the target's setting)
    fewer_clients: Sequence[int] = (1, 2)  # the load test is repeated with these client counts too
    requests: int = 400  # total requests of each concurrent run
    # the load test runs once per server setting (intra-op threads, 0 = TF default; malloc mmap threshold MB, 0 =
    # glibc's defaults)
    server_settings: Sequence[Tuple[int, float]] = ((0, 32.0), (1, 32.0), (1, 0.0))
    repeats: int = 3  # each load test (setting, clients) runs this often; the run with the median p99 is reported
    sequential_requests: int = 100  # requests of each sequential measurement (in-process, gRPC)
    search_fraction: float = 0.4  # share of history steps that carry a query
    grid_lengths: Sequence[int] = (1_000, 10_000)
    grid_candidates: Sequence[int] = (10, 100)
    grid_requests: int = 20
    seed: int = 0
    model_preset: str = "demo"  # sizes of the random-weight model when no trained run is used
    paths: Sequence[str] = GSU_PATHS  # GSU paths measured
    pq_subspaces: int = 8  # S of the PQ codebooks fitted for the PQ paths
    pq_centroids: int = 256  # C of the PQ codebooks
    rerank: int = 4  # pq_adc_rerank keeps rerank·K PQ candidates and re-scores them exactly
    # signatures measured on each path: rank (raw history) and rank_state (the history state of encode_history;
    # its load test runs at ``clients`` only)
    signatures: Sequence[str] = ("rank", "rank_state")


def _log(progress, message):
    if progress:
        progress(message)


# ---------------------------------------------------------------------------------------------------- model
def _has_weights(model_dir: str) -> bool:
    from seminar_tf import train

    try:
        return os.path.exists(train.resolve_run_dirs(model_dir).best_weights + ".index")
    except Exception:  # noqa: BLE001  (no run there)
        return False


def _synthetic_model(work_dir: str, max_history: int, preset_name: str = "demo"):
    """A SEMINAR model of a preset's sizes with random weights and synthetic vocabularies under work_dir."""
    from seminar_tf import config as config_lib
    from seminar_tf import experiment
    from seminar_tf.data import reader
    from seminar_tf.models import builders

    preset = config_lib.get_preset(preset_name)
    world = preset.world
    tokens = list(schema.RESERVED) + [f"w{i}" for i in range(world.num_topics * world.words_per_topic
                                                            + world.num_common_words)]
    rng = np.random.default_rng(0)
    queries = list(schema.QUERY_RESERVED) + sorted({" ".join(rng.choice(tokens[2:], size=rng.integers(1, 4),
                                                                      replace=False))
                                                     for _ in range(world.num_topics * world.queries_per_topic)})
    metadata = schema.DatasetMetadata(
        num_items=world.num_items + len(schema.RESERVED), num_queries=len(queries), num_tokens=len(tokens),
        item_attributes={"author_id": world.num_authors + 2, "category_id": world.num_categories + 2},
        user_attributes={"age_bucket": 8, "gender": 4}, image_dim=world.image_dim, has_image_pixels=False,
        channels=list(schema.CHANNELS), max_history=max_history, num_negatives=preset.build.num_negatives)
    vocab_dir = os.path.join(work_dir, "synthetic_vocab")
    os.makedirs(vocab_dir, exist_ok=True)
    files = {schema.ITEM_VOCAB: list(schema.RESERVED) + [f"i{i}" for i in range(world.num_items)],
             schema.QUERY_VOCAB: queries, schema.TOKEN_VOCAB: tokens,
             schema.user_attribute_vocab("age_bucket"): list(schema.RESERVED) + [f"a{i}" for i in range(6)],
             schema.user_attribute_vocab("gender"): list(schema.RESERVED) + ["f", "m"]}
    for name, lines in files.items():
        with open(os.path.join(vocab_dir, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    item_table, query_table = reader.synthetic_tables(metadata)
    model = builders.build_seminar(preset.model, metadata, item_table, query_table)
    model(experiment.variables_batch(metadata, schema.CTR_DIR))
    return model, metadata, vocab_dir, (f"{preset_name}-size SEMINAR (d={preset.model.dim}, K={preset.model.top_k}, "
                                        f"{world.num_items} items) with random weights: no trained run was given "
                                        "or found (latency does not depend on the weights)")


def _trained_model(model_dir: str):
    from seminar_tf import experiment
    from seminar_tf.data import reader

    model, preset, data_dir = experiment.load_model(model_dir)
    metadata = reader.load_metadata(data_dir)
    return model, metadata, os.path.join(data_dir, schema.VOCAB_DIR), f"trained run {model_dir} ({preset.name})"


def _set_path(model, gsu: str, bench: "ServingBenchConfig", progress=None) -> str:
    """Puts ``model`` on GSU path ``gsu`` (fitting PQ codebooks on its vocabulary embeddings the first time a
    PQ path needs them); returns a description of the path."""
    from seminar_tf import quantization

    if gsu not in GSU_PATHS:
        raise ValueError(f"unknown GSU path {gsu!r}; choose from {GSU_PATHS}")
    if gsu == "exact":
        model.set_gsu_mode("exact", pq_rerank=1)
        return "exact"
    pq = model.pq
    if (pq.num_subspaces, pq.num_centroids) != (bench.pq_subspaces, bench.pq_centroids):
        model.resize_pq(bench.pq_subspaces, bench.pq_centroids)
    if not model.pq.is_fitted:
        start = time.time()
        codebooks = quantization.quantize_vocabulary(
            model.content, quantization.CodebookConfig(bench.pq_subspaces, bench.pq_centroids))
        quantization.apply_codebooks(model, codebooks)
        _log(progress, f"bench serving: fitted S={bench.pq_subspaces} C={bench.pq_centroids} codebooks in "
                       f"{time.time() - start:.1f}s (reconstruction error {codebooks.reconstruction_error})")
    rerank = bench.rerank if gsu == "pq_adc_rerank" else 1
    model.set_gsu_mode("pq_adc", pq_rerank=rerank)
    return (f"pq_adc S={bench.pq_subspaces} C={bench.pq_centroids}"
            + (f", exact re-rank of {rerank}·K" if rerank > 1 else ""))


def _export_for(model, metadata, vocab_dir: str, export_base: str, max_history: int, max_candidates: int) -> str:
    """Exports ``model`` on its current GSU path."""
    from seminar_tf import export

    return export.export_seminar(model, export_base, vocab_dir=vocab_dir, metadata=metadata,
                                 max_history=max_history, max_candidates=max_candidates, model_name=MODEL_NAME)


# ---------------------------------------------------------------------------------------------------- requests
def _vocabulary(vocab_dir: str, name: str) -> List[str]:
    with open(os.path.join(vocab_dir, name)) as f:
        return f.read().splitlines()


def make_request(vocab_dir: str, user_inputs: Sequence[str], length: int, candidates: int, search_fraction: float,
                 seed: int) -> Dict[str, np.ndarray]:
    """``rank`` inputs: a history of ``length`` (item, query) steps and ``candidates`` pairs for one query."""
    rng = np.random.default_rng(seed)
    items = _vocabulary(vocab_dir, schema.ITEM_VOCAB)[len(schema.RESERVED):]
    queries = _vocabulary(vocab_dir, schema.QUERY_VOCAB)[len(schema.QUERY_RESERVED):] or ["query"]
    history_items = rng.choice(items, size=length)
    searched = rng.random(length) < search_fraction
    history_queries = np.where(searched, rng.choice(queries, size=length), "")
    query = rng.choice(queries)
    encode = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])
    inputs = {
        "history_item_ids": encode(history_items[None, :]).reshape(1, length),
        "history_queries": encode(history_queries[None, :]).reshape(1, length),
        "candidate_item_ids": encode(rng.choice(items, size=(1, candidates))),
        "candidate_queries": encode(np.full((1, candidates), query)),
    }
    for name in user_inputs:
        inputs[name] = np.array([b""], object)
    return inputs


def _percentiles(latencies_s: Sequence[float]) -> Dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def _time_calls(fn, count: int) -> List[float]:
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - start)
    return latencies


# ---------------------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(export_base: str, max_message_mb: int, max_concurrency: int, timeout_s: float = 300.0,
                  intra_op_threads: int = 0, malloc_mmap_threshold_mb: float = 32.0):
    port = _free_port()
    env = child_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--model-name", MODEL_NAME, "--model-base-path", export_base,
         "--port", str(port), "--rest-port", "0", "--max-message-mb", str(max_message_mb),
         "--max-concurrency", str(max_concurrency), "--tensorflow-intra-op-parallelism", str(intra_op_threads),
         "--malloc-mmap-threshold-mb", str(malloc_mmap_threshold_mb)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    from serving.client import PredictClient

    client = PredictClient(f"127.0.0.1:{port}", MODEL_NAME, timeout=60, max_message_bytes=max_message_mb << 20)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the serving process exited with code {process.returncode}")
        try:
            if client.status() and client.status()[0][1] == "AVAILABLE":
                return process, client
        except Exception:  # noqa: BLE001  (not up yet)
            time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"the server did not serve a version within {timeout_s}s")


def _stop_server(process, client) -> None:
    client.close()
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _rank_request(inputs, signature: str = "rank"):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL_NAME, signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def _process_cpu_s(pid: int) -> Optional[float]:
    """CPU seconds process ``pid`` has run so far, summed over its live threads (/proc/PID/task/*/schedstat,
    nanoseconds; the clock-tick utime + stime of /proc/PID/stat where schedstat is missing); None where there
    is no /proc (not Linux) or the process is gone."""
    try:
        total, read = 0, 0
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total, read = total + int(f.read().split()[0]), read + 1
            except FileNotFoundError:  # a thread that just exited (or no schedstat in this kernel)
                continue
        if read:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def _cpu_ms_per_request(before: Optional[float], after: Optional[float], completed: int) -> Optional[float]:
    if before is None or after is None or not completed:
        return None
    return round((after - before) * 1000.0 / completed, 2)


def _split_over_threads(worker, clients: int, requests: int) -> float:
    """Runs ``worker(count)`` on ``clients`` threads that share ``requests`` calls; returns the wall seconds."""
    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    threads = [threading.Thread(target=worker, args=(n,)) for n in shares]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def _concurrent_load(target: str, inputs, clients: int, requests: int, max_message_bytes: int,
                     time_limit_s: float, server_pid: Optional[int] = None,
                     signature: str = "rank") -> Dict[str, object]:
    """``requests`` rank calls split over ``clients`` threads (one channel each); bounded in count and time.

    With ``server_pid``, also the CPU the server process spent per completed request during the run (all its
    threads: gRPC, request parsing, TensorFlow), and the load generator's own CPU per request (it shares the
    cores)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = _rank_request(inputs, signature)
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.time() + time_limit_s

    def worker(count):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        with grpc.insecure_channel(target, options=options) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(count):
                if time.time() > deadline:
                    return
                start = time.perf_counter()
                try:
                    stub.Predict(request, timeout=60)
                    elapsed = time.perf_counter() - start
                    with lock:
                        latencies.append(elapsed)
                except grpc.RpcError as err:
                    with lock:
                        errors.append(err.code().name)

    server_before, client_before = _process_cpu_s(server_pid) if server_pid else None, time.process_time()
    wall = _split_over_threads(worker, clients, requests)
    server_after, client_after = _process_cpu_s(server_pid) if server_pid else None, time.process_time()
    done = len(latencies)
    # errors: failed calls plus calls never sent because the time limit ran out
    return {"clients": clients, "requests": requests, "completed": done, "errors": requests - done,
            "error_codes": sorted(set(errors)), "wall_s": round(wall, 2),
            "qps": round(done / wall, 2), **_percentiles(latencies or [float("nan")]),
            "server_cpu_ms_per_request": _cpu_ms_per_request(server_before, server_after, done),
            "client_cpu_ms_per_request": _cpu_ms_per_request(client_before, client_after, done)}


def _median_run(runs: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """The run with the median p99 (runs with errors rank last), plus every run's p99 (``p99_ms_runs``, sorted)."""
    ranked = sorted(runs, key=lambda r: (r.get("errors", 0), r["p99_ms"]))
    return {**ranked[len(ranked) // 2], "p99_ms_runs": [r["p99_ms"] for r in ranked]}


# ---------------------------------------------------------------------------------------------------- run
def _in_process_load(export_base: str, feeds: str, clients: int, requests: int, intra_op_threads: int,
                     malloc_mmap_threshold_mb: float, timeout_s: float = 900.0,
                     signature: str = "rank") -> Dict[str, object]:
    """The load test without the server: ``clients`` threads of a fresh process call the servable's ``rank``
    function directly on prebuilt tensors (TF threads and malloc as the server sets them), ``requests`` calls in
    all. What the TF runtime alone gives under the same concurrency; the gap to the gRPC load test is the
    Python server's work (parsing, tensor conversion, gRPC). ``feeds``: the request's inputs as an .npz file."""
    env = child_env()
    out = subprocess.run(
        [sys.executable, "-m", "seminar_tf.bench.serving", "in-process-load", export_base, feeds, str(clients),
         str(requests), str(intra_op_threads), str(malloc_mmap_threshold_mb), signature],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=timeout_s, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_process_load_child(export_base: str, feeds_path: str, clients: int, requests: int, intra_op_threads: int,
                           malloc_mmap_threshold_mb: float, signature: str = "rank") -> Dict[str, object]:
    import tensorflow as tf

    from serving import server as server_lib

    server_lib.tune_malloc(malloc_mmap_threshold_mb)
    server_lib.set_tensorflow_parallelism(intra_op_threads)
    manager = server_lib.ModelManager(MODEL_NAME, export_base)
    manager.poll()
    rank = manager.servable(MODEL_NAME).functions[signature]
    with np.load(feeds_path, allow_pickle=True) as data:
        feeds = {k: tf.constant(data[k]) for k in data.files}
    for _ in range(3):
        rank(**feeds)
    latencies, lock = [], threading.Lock()

    def worker(count):
        mine = _time_calls(lambda: rank(**feeds)["scores"].numpy(), count)
        with lock:
            latencies.extend(mine)

    cpu_before = time.process_time()
    wall = _split_over_threads(worker, clients, requests)
    cpu_after = time.process_time()
    return {"clients": clients, "requests": requests, "intra_op_threads": intra_op_threads,
            "malloc_mmap_threshold_mb": malloc_mmap_threshold_mb, "wall_s": round(wall, 2),
            "qps": round(len(latencies) / wall, 2), **_percentiles(latencies),
            "cpu_ms_per_request": _cpu_ms_per_request(cpu_before, cpu_after, len(latencies))}


def _state_sizes(model, state: Dict[str, np.ndarray], length: int, subspaces: int) -> Dict[str, object]:
    """Bytes per history step of the history state as sent (its TensorProtos), and what a state of PQ codes
    (uint8, S = ``subspaces`` per channel) or of float channels (4·C·d) would take per step (from the shapes)."""
    import tensorflow as tf

    sent = sum(tf.make_tensor_proto(v).ByteSize() for v in state.values())
    channels, dim = len(model.channels), model.content.dim
    return {"state_bytes": sent, "bytes_per_step_ids": round(sent / length, 2),
            "bytes_per_step_pq_codes": channels * subspaces, "bytes_per_step_float": 4 * channels * dim,
            "channels": channels, "dim": dim, "pq_subspaces": subspaces}


def _sequential_in_process(loaded, requests: Dict[str, Dict[str, np.ndarray]], count: int) -> Dict[str, List[float]]:
    """Seconds of ``count`` sequential calls of each signature of the loaded SavedModel ({signature: inputs}), the
    signatures taken in turn so that each sees the same machine load, with no server alive (an idle server's
    TensorFlow threads spin between requests and would take the cores)."""
    import tensorflow as tf

    calls = {}
    for signature, inputs in requests.items():
        fn, feeds = loaded.signatures[signature], {k: tf.constant(v) for k, v in inputs.items()}
        calls[signature] = (lambda fn=fn, feeds=feeds: fn(**feeds)["scores"].numpy())
        for _ in range(3):
            calls[signature]()
    times = {signature: [] for signature in calls}
    for _ in range(count):
        for signature, call in calls.items():
            times[signature] += _time_calls(call, 1)
    return times


def _measure_signature(bench: ServingBenchConfig, gsu: str, signature: str, inputs: Dict[str, np.ndarray],
                       in_process: List[float], export_base: str, work_dir: str, progress,
                       state_info: Optional[dict]) -> Dict[str, object]:
    """One row: ``signature`` on the exported ``gsu`` path: its sequential in-process times (``in_process``) vs
    gRPC, the load test per server setting (``rank``: every client count; ``rank_state``: ``bench.clients``), and
    the load without the server."""
    import tensorflow as tf

    label = gsu if signature == "rank" else f"{gsu}+state"
    size_mb = sum(tf.make_tensor_proto(v).ByteSize() for v in inputs.values()) / 2 ** 20
    max_message_mb = max(64, int(4 * size_mb) + 1)
    client_counts = sorted({*bench.fewer_clients, bench.clients}) if signature == "rank" else [bench.clients]
    sweep = []
    for setting, (threads, malloc_mb) in enumerate(bench.server_settings):
        process, client = _start_server(export_base, max_message_mb, max_concurrency=bench.clients,
                                        intra_op_threads=threads, malloc_mmap_threshold_mb=malloc_mb)
        try:
            for _ in range(3):
                client.predict(inputs, signature)
            if setting == 0:
                # The gRPC request proto is built once; building it (client-side encoding) is timed on its own.
                request = _rank_request(inputs, signature)
                sequential = _time_calls(lambda: client.prediction.Predict(request, timeout=60),
                                         bench.sequential_requests)
                encode = _time_calls(lambda: _rank_request(inputs, signature), bench.sequential_requests)
                _log(progress, f"bench serving [{label}]: gRPC sequential {_percentiles(sequential)}")
            for clients in client_counts:
                runs = [_concurrent_load(client.target, inputs, clients, bench.requests, max_message_mb << 20,
                                         time_limit_s=600, server_pid=process.pid, signature=signature)
                        for _ in range(max(1, bench.repeats))]
                sweep.append({"intra_op_threads": threads, "malloc_mmap_threshold_mb": malloc_mb,
                              **_median_run(runs), "errors_total": sum(r["errors"] for r in runs)})
                _log(progress, f"bench serving [{label}]: {_setting(sweep[-1])}, {clients} clients {sweep[-1]}")
        finally:
            _stop_server(process, client)
    # The load row of the target: the server setting with the lowest p99 at ``clients``.
    load = min((r for r in sweep if r["clients"] == bench.clients), key=lambda r: r["p99_ms"])
    # The same concurrency without the server, with that row's TF threads and malloc (repeated like it).
    feeds_path = os.path.join(work_dir, "in_process_load_inputs.npz")
    np.savez(feeds_path, **inputs)
    in_process_load = _median_run([_in_process_load(export_base, feeds_path, bench.clients, bench.requests,
                                                    load["intra_op_threads"], load["malloc_mmap_threshold_mb"],
                                                    signature=signature)
                                   for _ in range(max(1, bench.repeats))])
    _log(progress, f"bench serving [{label}]: in-process, {bench.clients} threads {in_process_load}")
    in_process_p, sequential_p = _percentiles(in_process), _percentiles(sequential)
    row = {"gsu": gsu, "signature": signature, "path": label, "L": bench.history_length, "N": bench.num_candidates,
           "request_mb": round(size_mb, 2), "in_process": in_process_p, "grpc_sequential": sequential_p,
           "grpc_overhead_p50_ms": round(sequential_p["p50_ms"] - in_process_p["p50_ms"], 2),
           "client_encode": _percentiles(encode), "concurrent": load, "in_process_concurrent": in_process_load,
           "sweep": sweep}
    if state_info:
        row["state"] = state_info
    return row


def run(out_dir: str, work_dir: str, progress: Optional[Callable[[str], None]] = None, *,
        model_dir: Optional[str] = DEFAULT_RUN, bench: Optional[ServingBenchConfig] = None) -> str:
    """Runs the serving benchmark; writes ``out_dir/serving.md`` and ``serving.json``; returns the Markdown.

    ``model_dir``: a fine-tuned run to export (used when it has best weights; otherwise a random-weight model
    of ``bench.model_preset``'s sizes is exported).
    """
    import tensorflow as tf

    from serving import server as server_lib

    bench = bench or ServingBenchConfig()
    malloc = server_lib.tune_malloc()  # the in-process calls get what the server gets by default
    load_average = [round(v, 2) for v in os.getloadavg()]
    model_dir = model_dir if model_dir and _has_weights(model_dir) else None
    max_history = max([bench.history_length, *bench.grid_lengths])
    max_candidates = max([bench.num_candidates, *bench.grid_candidates])
    if model_dir:
        model, metadata, vocab_dir, source = _trained_model(model_dir)
    else:
        model, metadata, vocab_dir, source = _synthetic_model(work_dir, max_history, bench.model_preset)
    _log(progress, f"bench serving: model = {source}")
    user_inputs = [schema.user_attribute_feature(n) for n in sorted(metadata.user_attributes)]
    rows = []
    grid = []
    descriptions = {}
    for gsu in bench.paths:
        descriptions[gsu] = _set_path(model, gsu, bench, progress)
        export_base = os.path.join(work_dir, f"export_{gsu}", MODEL_NAME)
        if os.path.isdir(export_base):
            shutil.rmtree(export_base)
        path = _export_for(model, metadata, vocab_dir, export_base, max_history, max_candidates)
        _log(progress, f"bench serving [{gsu}]: exported {path}")
        raw = make_request(vocab_dir, user_inputs, bench.history_length, bench.num_candidates,
                           bench.search_fraction, bench.seed)
        loaded = tf.saved_model.load(path)
        rank = loaded.signatures["rank"]
        for length in bench.grid_lengths:
            for n in bench.grid_candidates:
                grid_feeds = {k: tf.constant(v) for k, v in make_request(
                    vocab_dir, user_inputs, length, n, bench.search_fraction, bench.seed + 1).items()}
                rank(**grid_feeds)
                grid.append({"gsu": gsu, "L": length, "N": n,
                             **_percentiles(_time_calls(lambda: rank(**grid_feeds)["scores"].numpy(),
                                                        bench.grid_requests))})
        history = {k: tf.constant(v) for k, v in raw.items() if k.startswith("history_")}
        encode = loaded.signatures["encode_history"]
        state = {k: v.numpy() for k, v in encode(**history).items()}
        state_info = {"encode_history": _percentiles(_time_calls(lambda: encode(**history)["history_state_items"]
                                                                 .numpy(), bench.sequential_requests)),
                      **_state_sizes(model, state, bench.history_length, bench.pq_subspaces)}
        _log(progress, f"bench serving [{gsu}]: history state {state_info}")
        requests = {"rank": raw, "rank_state": {**state, **{k: v for k, v in raw.items()
                                                            if not k.startswith("history_")}}}
        in_process = _sequential_in_process(loaded, {k: requests[k] for k in bench.signatures},
                                            bench.sequential_requests)
        _log(progress, f"bench serving [{gsu}]: in-process, one request at a time "
                       + ", ".join(f"{k} {_percentiles(v)}" for k, v in in_process.items()))
        for signature in bench.signatures:
            rows.append(_measure_signature(
                bench, gsu, signature, requests[signature], in_process[signature], export_base, work_dir, progress,
                state_info if signature == "rank_state" else None))
        loaded = rank = encode = None  # the loaded SavedModel goes before the next path's export
    report = {
        "benchmark": "serving", **stamp.stamp(COMMAND), "model": source, "load_average_at_start": load_average,
        "config": dataclasses.asdict(bench), "in_process_malloc": malloc, "rows": rows, "grid": grid,
        "paths": descriptions, "skipped": dict(SKIPPED_PATHS), "top_k": model.top_k,
    }
    return stamp.write(report, out_dir, "serving.json")


if __name__ == "__main__":  # the child of ``_in_process_load``
    if len(sys.argv) == 9 and sys.argv[1] == "in-process-load":
        import seminar_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

        base, path, clients_arg, requests_arg, threads_arg, malloc_arg, signature_arg = sys.argv[2:]
        print(json.dumps(_in_process_load_child(base, path, int(clients_arg), int(requests_arg), int(threads_arg),
                                                float(malloc_arg), signature_arg)))
    else:
        sys.exit("usage: python -m seminar_tf.bench.serving in-process-load EXPORT_BASE INPUTS.npz CLIENTS "
                 "REQUESTS INTRA_OP_THREADS MALLOC_MB SIGNATURE")
