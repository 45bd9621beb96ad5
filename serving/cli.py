"""``seminar-tf serve`` and ``seminar-tf query``: ``add_cli(subparsers)`` registers both (seminar_tf.cli wires it).

File formats of ``query`` (UTF-8 JSON; every id is a string):

``--user-history FILE``: either one JSON object
    {"user": {"age_bucket": "25-34", "gender": "f"},          # optional: user attributes by name; "id" (or
                                                               # "user_id") = the raw user id
     "history": [{"item_id": "i27", "query": "red shoes"},     # oldest first; "query" missing or "" = browse
                 {"item_id": "i9", "feedback": "click"}]}       # optional "feedback" token of the step
  or JSON lines of events in the raw ``events`` format ({"item_id", "query", "timestamp", "event"}; lines
  with an "event" other than "click" are skipped, lines are sorted by "timestamp" when every line has one),
  plus optionally one line {"user": {...}}.
``--candidates FILE``: a JSON list, or JSON lines, of {"item_id": "i5", "query": "red shoes"} ("query"
  missing or "" = recommendation, no query).

Output: the candidates ranked by the ``rank`` signature's click probability, best first, one per line
("rank<TAB>score<TAB>item_id<TAB>query"), or JSON lines with ``--json``.

``--history-state FILE`` (.npz) ranks from a history state instead: the history is sent once to
``encode_history``, its state cached in FILE on the client (keyed by a digest of the history), and each query
sends the state and the candidates to ``rank_state`` (same scores as ``rank``). A changed history, or a state
the server refuses (an export with other vocabularies), is encoded again.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import List, Tuple

import serving  # noqa: F401  (environment defaults before TensorFlow)
from serving import MODEL_NAME

CLICK_EVENT = "click"


def _read_json_records(path: str):
    """A whole-file JSON value, or the list of records of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text:
        return []
    try:
        return json.loads(text)
    except ValueError:
        pass
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise SystemExit(f"{path}:{number}: not JSON: {err}") from None
    return records


def read_user_history(path: str) -> Tuple[List[Tuple[str, str]], dict]:
    """(history [(item_id, query)] oldest first, user attributes) from a --user-history file."""
    records = _read_json_records(path)
    if isinstance(records, dict) and "item_id" in records:  # a one-line events file
        records = [records]
    if isinstance(records, dict):
        user, events = records.get("user") or {}, records.get("history") or []
    else:
        user = next((r["user"] for r in records if isinstance(r, dict) and "user" in r), {})
        events = [r for r in records if isinstance(r, dict) and "item_id" in r]
        events = [e for e in events if str(e.get("event") or CLICK_EVENT).lower() == CLICK_EVENT]
        if events and all("timestamp" in e for e in events):
            events = sorted(events, key=lambda e: _timestamp(e["timestamp"]))
    history = []
    for i, event in enumerate(events):
        if not isinstance(event, dict) or "item_id" not in event:
            raise SystemExit(f"{path}: history entry {i} needs an \"item_id\": {event!r}")
        step = (str(event["item_id"]), str(event.get("query") or ""))
        history.append(step + ((str(event["feedback"]),) if "feedback" in event else ()))
    if not isinstance(user, dict):
        raise SystemExit(f"{path}: \"user\" must be an object of attribute name -> value")
    return history, {("id" if k == "user_id" else str(k)): str(v) for k, v in user.items()}


def _timestamp(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)  # ISO-8601 strings sort chronologically


def read_candidates(path: str) -> List[Tuple[str, str]]:
    records = _read_json_records(path)
    if isinstance(records, dict):
        records = [records]
    candidates = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "item_id" not in record:
            raise SystemExit(f"{path}: candidate {i} needs an \"item_id\": {record!r}")
        candidates.append((str(record["item_id"]), str(record.get("query") or "")))
    if not candidates:
        raise SystemExit(f"{path}: no candidates")
    return candidates


# ---------------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    """Registers ``serve`` and ``query`` (handler(args, extra) -> int, takes_extra=False)."""
    p = subparsers.add_parser(
        "serve", help="local TF Serving-compatible server (gRPC PredictionService/ModelService + REST)",
        description="Serves the newest complete version under --model-base-path over TF Serving's gRPC API "
        "(Predict, Classify, Regress, GetModelMetadata, GetModelStatus) and REST routes (/v1/models/NAME"
        "[:predict|:classify|:regress|/metadata]). New versions are picked up by polling, without a restart; "
        "temporary export directories are never loaded. Stops on Ctrl-C / SIGTERM. The flags it shares with "
        "tensorflow_model_server also take that server's spellings (--model_name, --model_base_path, "
        "--model_config_file, --port, --rest_api_port, --ssl_config_file, --file_system_poll_wait_seconds, "
        "--tensorflow_intra_op_parallelism, --tensorflow_inter_op_parallelism), in --flag value or --flag=value form.")
    p.add_argument("--model-name", "--model_name", default=MODEL_NAME,
                   help=f"model name clients ask for (default: {MODEL_NAME})")
    p.add_argument("--model-base-path", "--model_base_path", default=None,
                   help="export base holding integer version directories (seminar-tf export --export-base)")
    p.add_argument("--model-config-file", "--model_config_file", default=None,
                   help="TF Serving models.config with one model (instead of --model-name/--model-base-path)")
    p.add_argument("--port", type=_port, default=8500, help="gRPC port, 0-65535 (default: 8500; 0 = a free one)")
    p.add_argument("--rest-port", "--rest_api_port", type=_port, default=8501,
                   help="REST port, 0-65535; 0 disables REST (default: 8501)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--poll-seconds", "--file_system_poll_wait_seconds", type=_at_least(1.0, float), default=2.0,
                   help="how often the base path is polled for new versions, >= 1 (default: 2)")
    p.add_argument("--max-message-mb", type=_at_least(0.001, float), default=16,
                   help="largest gRPC message and REST body in MiB; RESOURCE_EXHAUSTED / HTTP 413 beyond "
                   "(default: 16)")
    p.add_argument("--max-concurrency", type=_at_least(1), default=8,
                   help="requests run at once; more wait in a bounded queue (default: 8)")
    p.add_argument("--max-batch-size", type=_at_least(1), default=256,
                   help="largest batch (dimension 0, or number of tf.Examples) one request may declare "
                   "(default: 256)")
    p.add_argument("--max-request-elements", type=_at_least(1), default=1 << 21,
                   help="most values all inputs of one request may declare together; RESOURCE_EXHAUSTED beyond "
                   "(default: 2097152)")
    p.add_argument("--max-connections", type=_at_least(1), default=64,
                   help="REST connections at once; more are answered 503 and closed (default: 64)")
    p.add_argument("--rest-request-timeout-seconds", type=_at_least(0.001, float), default=30.0,
                   help="a REST connection whose next request (line, headers and body) has not arrived within "
                   "this many seconds is closed; bounds idle and slow clients (default: 30)")
    p.add_argument("--ssl-config-file", "--ssl_config_file", default=None,
                   help="TF Serving's SSLConfig text proto (server_key, server_cert, custom_ca, client_verify): "
                   "TLS for gRPC and REST, mutual TLS with client_verify (see serving/README.md)")
    p.add_argument("--tensorflow-intra-op-parallelism", "--tensorflow_intra_op_parallelism", type=int, default=0,
                   metavar="N",
                   help="threads one TensorFlow op may use, as tensorflow_model_server's "
                   "--tensorflow_intra_op_parallelism (default: 0 = one per core; 1 gives more throughput when "
                   "several requests run at once on few cores, see benchmarks/serving.md)")
    p.add_argument("--tensorflow-inter-op-parallelism", "--tensorflow_inter_op_parallelism", type=int, default=0,
                   metavar="N",
                   help="TensorFlow ops run at once, as --tensorflow_inter_op_parallelism (default: 0 = one per core)")
    p.add_argument("--malloc-mmap-threshold-mb", type=float, default=32, metavar="MB",
                   help="glibc malloc serves buffers up to this size from its heap and keeps freed memory for reuse "
                   "instead of mmap/munmap per request buffer (default: 32; 0 = glibc's "
                   "defaults; about 30%% faster rank requests at L = 10^4, see benchmarks/serving.md)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop after this many seconds (default: run until interrupted)")
    p.set_defaults(handler=_run_serve, takes_extra=False)

    q = subparsers.add_parser(
        "query", help="rank candidates for one user through the gRPC rank signature (official stub)",
        description=__doc__.split("File formats of ``query``")[1].strip().replace("%", "%%"),
        formatter_class=_raw_formatter())
    q.add_argument("--target", default="127.0.0.1:8500", help="gRPC host:port of the server (default: 127.0.0.1:8500)")
    q.add_argument("--model-name", default=MODEL_NAME, help=f"model name (default: {MODEL_NAME})")
    q.add_argument("--user-history", required=True, help="JSON / JSON-lines file of the user's history (see above)")
    q.add_argument("--candidates", required=True, help="JSON / JSON-lines file of candidate (item, query) pairs")
    q.add_argument("--signature", default="rank", help="ranking signature (default: rank)")
    q.add_argument("--max-history", type=int, default=0,
                   help="send only the newest N history steps (default: 0 = all; the export rejects more "
                   "than its max_history)")
    q.add_argument("--history-state", default=None, metavar="FILE",
                   help="rank from the history state cached in FILE (.npz; encode_history fills it when it is "
                   "missing or stale) with the rank_state signature")
    q.add_argument("--top", type=int, default=0, help="print only the best N (default: 0 = all)")
    q.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds per RPC (default: 30)")
    q.add_argument("--ssl-config-file", default=None,
                   help="connect with TLS: an SSLConfig text proto whose custom_ca is the CA of the server's "
                   "certificate (system CAs when empty) and whose server_key/server_cert, when set, are this "
                   "client's key and certificate (for a server with client_verify)")
    q.set_defaults(handler=_run_query, takes_extra=False)


def _port(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is out of range: a TCP port is 0-65535")
    return value


def _at_least(least, kind=int):
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= least:
            raise argparse.ArgumentTypeError(f"must be >= {least:g}, got {text}")
        return value

    return parse


def _raw_formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _run_serve(args, extra) -> int:
    from serving import server as server_lib

    logging.getLogger("serving").setLevel(logging.INFO)
    name, base_path = args.model_name, args.model_base_path
    if args.model_config_file:
        models = server_lib.read_model_config(args.model_config_file)
        if len(models) != 1:
            raise SystemExit(f"{args.model_config_file}: this server serves one model, the file has {len(models)}")
        name, base_path = models[0]
    if not base_path:
        print("seminar-tf serve: error: give --model-base-path (or --model-config-file)", file=sys.stderr)
        return 2
    try:
        server = server_lib.serve(
            name, base_path, port=args.port, rest_port=args.rest_port or None, host=args.host,
            poll_seconds=args.poll_seconds, max_message_bytes=int(args.max_message_mb * 2 ** 20),
            max_concurrency=args.max_concurrency, intra_op_parallelism=args.tensorflow_intra_op_parallelism,
            inter_op_parallelism=args.tensorflow_inter_op_parallelism,
            malloc_mmap_threshold_mb=args.malloc_mmap_threshold_mb, max_batch_size=args.max_batch_size,
            max_elements=args.max_request_elements, max_connections=args.max_connections,
            request_timeout_s=args.rest_request_timeout_seconds, ssl_config_file=args.ssl_config_file)
    except server_lib.StartupError as err:
        print(f"seminar-tf serve: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"model_name": name, "model_base_path": base_path, "grpc": f"{args.host}:{server.grpc_port}",
                      "rest": f"{args.host}:{server.rest_port}" if server.rest_port else None,
                      "version": server.manager.current_version,
                      "tensorflow_parallelism": server_lib.set_tensorflow_parallelism(),
                      "malloc": server.malloc, "tls": bool(args.ssl_config_file)}), flush=True)

    def stop(signum, frame):
        server.stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.time() + args.max_seconds if args.max_seconds else None
        while not server.wait(0.5):
            if deadline is not None and time.time() >= deadline:
                server.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _check_input_file(flag: str, path: str) -> None:
    """A missing or unreadable query file fails with one line naming the flag and the path (exit 1)."""
    import os

    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "no such file"
        raise SystemExit(f"{flag} {path}: {problem}; give a JSON / JSON-lines file (formats: seminar-tf query --help)")
    if not os.access(path, os.R_OK):
        raise SystemExit(f"{flag} {path}: not readable; check its permissions")


def _run_query(args, extra) -> int:
    import grpc

    from serving.client import PredictClient

    for flag, path in (("--user-history", args.user_history), ("--candidates", args.candidates)):
        _check_input_file(flag, path)
    history, user = read_user_history(args.user_history)
    if args.max_history > 0:
        history = history[-args.max_history:]
    candidates = read_candidates(args.candidates)
    try:
        client = PredictClient(args.target, model_name=args.model_name, timeout=args.timeout,
                               ssl_config_file=args.ssl_config_file)
    except ValueError as err:  # an unusable SSL config file
        print(f"seminar-tf query: error: {err}", file=sys.stderr)
        return 2
    with client:
        try:
            if "id" in user and "user_id" not in client.user_inputs(args.signature):
                del user["id"]  # a model without a user-id embedding takes no user_id input
            if args.history_state:
                ranked = _rank_from_state(client, args.history_state, history, candidates, user)
            else:
                ranked = client.rank(history, candidates, user, signature_name=args.signature)
        except grpc.RpcError as err:
            print(f"query failed: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    if args.top > 0:
        ranked = ranked[: args.top]
    for position, (index, score) in enumerate(ranked, 1):
        item, query = candidates[index]
        if args.json:
            print(json.dumps({"rank": position, "score": score, "item_id": item, "query": query}))
        else:
            print(f"{position}\t{score:.6f}\t{item}\t{query}")
    return 0


def _rank_from_state(client, path: str, history, candidates, user):
    """``rank_state`` with the state cached at ``path``; encoded (and cached) when missing, stale, or refused."""
    import grpc

    from serving.client import history_digest, load_state, save_state

    key = history_digest(history)
    state = load_state(path, key)
    if state is not None:
        try:
            ranked = client.rank_state(state, candidates, user)
            print(f"history state: {path} (cached, {len(history)} steps)", file=sys.stderr)
            return ranked
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT or "history_state" not in (err.details() or ""):
                raise
            print(f"history state: {path} refused ({err.details().splitlines()[0]}); encoding again",
                  file=sys.stderr)
    state = client.encode_history(history)
    save_state(path, state, key)
    print(f"history state: encoded {len(history)} steps into {path}", file=sys.stderr)
    return client.rank_state(state, candidates, user)


def main(argv=None) -> int:
    """``python -m serving.cli serve|query ...``: the same commands without the seminar_tf CLI."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m serving.cli", description="SEMINAR serving commands")
    add_cli(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.handler(args, []) or 0)


if __name__ == "__main__":
    sys.exit(main())
