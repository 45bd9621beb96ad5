"""Version management like TF Serving's file-system source with the "latest 1" policy.

  * A version is a child of the base path whose name is a canonical decimal number (``0`` or ``[1-9][0-9]*``,
    ASCII digits only) and that holds ``saved_model.pb``. Anything else is ignored, with one log line per name:
    ``0010`` (TF Serving would read it as 10 and look for ``10/``), ``²``, ``.tmp-export-*``.
  * The highest version serves. A new one is loaded (and warmed up with ``assets.extra/tf_serving_warmup_requests``)
    beside the serving one and swapped in; in-flight requests keep the version they started with.
  * A version whose load failed is END with the error; it is loaded again when its files change (a copy that was
    still running, fixed files), not before.
  * A serving version whose directory is deleted is unloaded (END); the next highest present version, when
    there is one, is loaded in its place, else requests answer NOT_FOUND until a version appears.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Dict, List, Optional, Tuple

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from serving import validation
from serving.errors import ServingError, invalid
from serving.runtime import DEFAULT_SIGNATURE, Servable, run_predict

LOG = logging.getLogger("serving")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MIN_POLL_SECONDS = 1.0
_CANONICAL = re.compile(r"0|[1-9][0-9]*")


def version_directories(base_path: str, ignored: Optional[set] = None) -> Dict[int, str]:
    """{version: directory name} of the complete versions under ``base_path`` (see the module docstring).

    ``ignored``: names already logged as not a version (each one is logged once per set)."""
    if not tf.io.gfile.isdir(base_path):
        return {}
    versions = {}
    for name in tf.io.gfile.listdir(base_path):
        name = name.rstrip("/")
        if not (name.isascii() and _CANONICAL.fullmatch(name)):
            if ignored is not None and name not in ignored:
                ignored.add(name)
                if not name.startswith("."):
                    LOG.warning("%s: ignoring %r: not a version (versions are canonical decimal numbers: 0, 1, 2, "
                                "... without leading zeros)", base_path, name)
            continue
        if tf.io.gfile.exists(os.path.join(base_path, name, "saved_model.pb")):
            versions[int(name)] = name
    return versions


def complete_versions(base_path: str) -> List[int]:
    """Canonically named children of ``base_path`` that hold a saved_model.pb, ascending."""
    return sorted(version_directories(base_path))


def files_fingerprint(path: str) -> Tuple:
    """(relative path, size, mtime) of every file under ``path``: changes when the version's files do."""
    entries = []
    for root, _, files in tf.io.gfile.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                stat = tf.io.gfile.stat(full)
            except tf.errors.OpError:
                continue
            entries.append((os.path.relpath(full, path), stat.length, stat.mtime_nsec))
    return tuple(sorted(entries))


def read_signature_defs(path: str):
    """The SignatureDefs of the ``serve`` MetaGraph (method names included), without the init op."""
    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}
    raise ValueError(f"{path}: no MetaGraph tagged 'serve'")


def load_servable(path: str, version: int, warmup: bool = True,
                  max_batch_size: int = validation.DEFAULT_MAX_BATCH_SIZE,
                  max_elements: int = validation.DEFAULT_MAX_ELEMENTS) -> Servable:
    """Loads one version and replays its warmup requests (a failing warmup fails the load, as in TF Serving)."""
    signature_defs = read_signature_defs(path)
    loaded = tf.saved_model.load(path, tags=["serve"])
    functions = {name: loaded.signatures[name] for name in signature_defs}
    limits = validation.export_limits(path, signature_defs, max_batch_size, max_elements)
    servable = Servable(version, path, signature_defs, functions, loaded, limits)
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
    """Serves the highest complete version under ``base_path`` and follows the directory as it changes.

    ``poll`` is called every ``poll_seconds`` (at least ``MIN_POLL_SECONDS``) by a daemon thread (``start``),
    like TF Serving's file-system poller.
    """

    def __init__(self, model_name: str, base_path: str, poll_seconds: float = 1.0, warmup: bool = True,
                 max_batch_size: int = validation.DEFAULT_MAX_BATCH_SIZE,
                 max_elements: int = validation.DEFAULT_MAX_ELEMENTS):
        if not poll_seconds >= MIN_POLL_SECONDS:
            raise ValueError(f"poll_seconds must be >= {MIN_POLL_SECONDS:g} (TF Serving's "
                             f"--file_system_poll_wait_seconds), got {poll_seconds}")
        self.model_name = model_name
        self.base_path = base_path
        self.poll_seconds = float(poll_seconds)
        self.warmup = warmup
        self.max_batch_size = int(max_batch_size)
        self.max_elements = int(max_elements)
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._current: Optional[Servable] = None
        self._states: Dict[int, Tuple[str, int, str]] = {}  # version -> (state, tf error code, message)
        self._failed: Dict[int, Tuple] = {}  # version -> files fingerprint when its load failed
        self._ignored: set = set()
        self._unloaded_because = ""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def poll(self) -> Optional[int]:
        """One look at the base path: unloads a deleted serving version, loads the newest loadable version if
        it is not the one served; returns the version swapped in, if any."""
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> Optional[int]:
        directories = version_directories(self.base_path, self._ignored)
        current = self._current
        if current is not None and current.version not in directories:
            with self._lock:
                self._current = None
                self._states[current.version] = ("END", 0, "")
                self._unloaded_because = f"version {current.version} was deleted from {self.base_path}"
            LOG.warning("model %s: version %d was deleted; unloaded it", self.model_name, current.version)
            current = None
        candidates = []
        for version in sorted(directories, reverse=True):
            if version in self._failed:
                fingerprint = files_fingerprint(os.path.join(self.base_path, directories[version]))
                if fingerprint == self._failed[version]:
                    continue  # unchanged since it failed: not retried
                LOG.info("model %s: version %d changed since it failed to load; retrying", self.model_name, version)
                del self._failed[version]
            candidates.append(version)
        if not candidates or (current is not None and candidates[0] <= current.version):
            return None
        version = candidates[0]
        path = os.path.join(self.base_path, directories[version])
        with self._lock:
            self._states[version] = ("LOADING", 0, "")
        started = time.time()
        fingerprint = files_fingerprint(path)  # taken before loading: a change during the load means a retry
        try:
            servable = load_servable(path, version, warmup=self.warmup, max_batch_size=self.max_batch_size,
                                     max_elements=self.max_elements)
        except Exception as err:  # noqa: BLE001  (any load failure leaves the current version serving)
            LOG.error("model %s version %d failed to load: %s", self.model_name, version, err)
            with self._lock:
                self._failed[version] = fingerprint
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
            raise invalid(f"version label {label!r}: this server has no version labels; use a version number")
        current = self._current
        if current is None:
            why = self._unloaded_because or f"no complete version under {self.base_path} yet"
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name}); {why}")
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
