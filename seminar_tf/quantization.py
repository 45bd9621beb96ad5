"""PQ codebooks for the GSU: k-means per channel and sub-space on a run's final content embeddings.

docs/design.md §5. The vectors quantized are the stored channel embeddings x^{PSU(j)} of every item and query of the
vocabulary (the content encoder's outputs, before G_j): every trained map after them folds into the ADC
target side, so the codes stay valid while G_j, the gate and the attention heads are fine-tuned.

- ``fit_codebooks``: faiss k-means (``faiss.Kmeans``) per (channel, sub-space), C centroids; centroid 0 of every
  sub-space is reserved for the zero vector, so padding, unknown ids and the empty query of a browsing step
  (whose embeddings are exactly 0) are coded exactly. With at most C - 1 distinct sub-vectors the centroids
  are those sub-vectors (every vector its own centroid). ``kind="random"``: the frozen random codebooks of the
  authors' public code (Gaussian, at the data's per-dimension mean and scale), as a baseline.
- ``quantize_vocabulary``: codebooks + uint8 codes of every item (item channels) and query (query channel) +
  the relative reconstruction error Σ‖x − x̂‖² / Σ‖x‖² per channel.
- ``seminar_tf.pq_runs.fit_run`` (``seminar-tf fit-codebooks --model-dir RUN``) writes ``RUN/codebooks.npz``
  (+ a JSON summary) from a fine-tuned run's best weights or a pretraining run's PSU content checkpoint; this
  module knows no runs.

Codes when content keeps training: the codes quantize the embeddings of the model they were computed from.
``seminar_tf.experiment.finetune`` with a PQ GSU therefore re-encodes the whole vocabulary with the loaded
codebooks (``refresh_codes``) from the model's current content at the start of training, at the start of every
epoch while the content is trainable, and once more after training (then re-saves the best weights), so a
finished run, its evaluation and its export always hold codes of its own final embeddings. An export of a
model whose content changed since must call ``refresh_codes(model)`` first.

TensorFlow and faiss are imported inside the functions that need them (the CLI builds its parser cheaply).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from seminar_tf import schema
from seminar_tf.config import GSU_MODES

CODEBOOKS_FILE = "codebooks.npz"
SUMMARY_FILE = "codebooks.json"
CODEBOOK_KINDS = ("trained", "random")


@dataclasses.dataclass
class CodebookConfig:
    """How codebooks are fitted."""

    num_subspaces: int = dataclasses.field(default=8, metadata={"help": "S (N_bit): sub-vectors per channel"})
    num_centroids: int = dataclasses.field(
        default=256, metadata={"help": "C centroids per (channel, sub-space); <= 256, <= 16 gives 4-bit codes"})
    iterations: int = dataclasses.field(default=25, metadata={"help": "k-means iterations"})
    seed: int = 0
    max_points_per_centroid: int = dataclasses.field(
        default=256, metadata={"help": "k-means subsamples to C x this many points per sub-space"})
    reserve_zero: bool = dataclasses.field(
        default=True, metadata={"help": "centroid 0 = the zero vector (padding, unknown ids, empty query exact)"})
    kind: str = dataclasses.field(default="trained", metadata={"help": "trained (k-means) | random"})
    batch_size: int = dataclasses.field(default=4096, metadata={"help": "vocabulary rows encoded per step"})


@dataclasses.dataclass
class Codebooks:
    """Codebooks [J, S, C, d/S] of ``channels`` with the vocabulary's uint8 codes."""

    channels: List[str]
    codebooks: np.ndarray
    item_codes: Optional[np.ndarray]  # uint8 [num_items, J_item, S] (item channels in order) or None
    query_codes: Optional[np.ndarray]  # uint8 [num_queries, S] or None (no query channel)
    reconstruction_error: Dict[str, float]  # channel -> Σ‖x − x̂‖² / Σ‖x‖² over the non-reserved vocabulary
    kind: str = "trained"
    source: str = ""

    @property
    def num_subspaces(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def num_centroids(self) -> int:
        return int(self.codebooks.shape[2])

    @property
    def dim(self) -> int:
        return int(self.codebooks.shape[1] * self.codebooks.shape[3])

    @property
    def item_channels(self) -> List[str]:
        return [c for c in self.channels if c != schema.QUERY_CHANNEL]


# ---------------------------------------------------------------------------------------------- embeddings
def vocabulary_embeddings(content, batch_size: int = 4096) -> Dict[str, np.ndarray]:
    """x^{PSU(j)} of every vocabulary row: {channel: float32 [num_items or num_queries, d]} (reserved rows too).

    ``content`` is a ``ContentEncoder`` (the model's, with its current weights).
    """
    import tensorflow as tf

    # Eager on purpose: a few chunks for a small vocabulary, large ops for a large one; no tracing to pay.
    out: Dict[str, List[np.ndarray]] = {c: [] for c in content.channels}
    for start in range(0, content.num_items, batch_size):
        chunk = tf.range(start, min(start + batch_size, content.num_items), dtype=tf.int64)
        for name, value in content.encode_items(chunk).items():
            out[name].append(value.numpy())
    if schema.QUERY_CHANNEL in content.channels:
        for start in range(0, content.num_queries, batch_size):
            chunk = tf.range(start, min(start + batch_size, content.num_queries), dtype=tf.int64)
            out[schema.QUERY_CHANNEL].append(content.encode_queries(chunk).numpy())
    return {name: np.concatenate(parts).astype(np.float32) for name, parts in out.items()}


def _fit_rows(channel: str, size: int) -> np.ndarray:
    """Rows that take part in fitting: the non-reserved vocabulary (reserved rows are zero vectors)."""
    first = len(schema.QUERY_RESERVED) if channel == schema.QUERY_CHANNEL else len(schema.RESERVED)
    return np.arange(min(first, size), size)


# ---------------------------------------------------------------------------------------------- fitting
def kmeans(points: np.ndarray, k: int, config: CodebookConfig) -> np.ndarray:
    """k centroids [k, dim] of ``points`` [n, dim] (faiss k-means). With ≤ k distinct points they are the
    centroids (the rest repeat the first), so every point is its own centroid."""
    points = np.ascontiguousarray(points, np.float32)
    distinct = np.unique(points, axis=0)
    if len(distinct) <= k:
        return np.concatenate([distinct, np.repeat(distinct[:1], k - len(distinct), axis=0)])
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is the "pq" extra
        raise ImportError("codebook training needs faiss: pip install 'seminar-tf[pq]' (faiss-cpu)") from err
    # min_points_per_centroid=1: a small vocabulary is fine (faiss would only warn about it)
    model = faiss.Kmeans(points.shape[1], k, niter=config.iterations, seed=config.seed, verbose=False,
                         max_points_per_centroid=config.max_points_per_centroid, min_points_per_centroid=1)
    model.train(points)
    return np.asarray(model.centroids, np.float32).reshape(k, points.shape[1])


def fit_codebooks(embeddings: Dict[str, np.ndarray], channels: List[str], config: CodebookConfig) -> np.ndarray:
    """Codebooks [J, S, C, d/S]: k-means (or random, ``config.kind``) per channel and sub-space."""
    if config.kind not in CODEBOOK_KINDS:
        raise ValueError(f"kind must be one of {CODEBOOK_KINDS}, got {config.kind!r}")
    size, cents = config.num_subspaces, config.num_centroids
    dim = embeddings[channels[0]].shape[1]
    if dim % size:
        raise ValueError(f"--subspaces {size} must divide the embedding width {dim}")
    if not 2 <= cents <= 256:
        raise ValueError(f"--centroids must be in [2, 256] (8-bit codes), got {cents}")
    rng = np.random.default_rng(config.seed)
    reserved = 1 if config.reserve_zero else 0
    books = np.zeros([len(channels), size, cents, dim // size], np.float32)
    for j, channel in enumerate(channels):
        vectors = embeddings[channel][_fit_rows(channel, len(embeddings[channel]))]
        if not len(vectors):
            continue
        split = vectors.reshape(len(vectors), size, dim // size)
        for s in range(size):
            points = split[:, s]
            if config.kind == "random":
                fitted = rng.normal(points.mean(0), points.std(0) + 1e-12, size=[cents - reserved, points.shape[1]])
            else:
                fitted = kmeans(points, cents - reserved, dataclasses.replace(config, seed=config.seed + j * size + s))
            books[j, s, reserved:] = fitted
    return books


def nearest_centroids(vectors: np.ndarray, codebook: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """uint8 codes [n, S] of vectors [n, d] against one channel's codebook [S, C, d/S] (ties: lowest id)."""
    size, cents, sub = codebook.shape
    norms = np.sum(codebook.astype(np.float64) ** 2, axis=-1)  # [S, C]
    codes = np.zeros([len(vectors), size], np.uint8)
    for start in range(0, len(vectors), chunk):
        split = vectors[start: start + chunk].reshape(-1, size, sub).astype(np.float64)
        distance = norms[None] - 2.0 * np.einsum("nsk,sck->nsc", split, codebook.astype(np.float64))
        codes[start: start + chunk] = np.argmin(distance, axis=-1)
    return codes


def decode(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Centroids of codes [n, S] in one channel's codebook [S, C, d/S] → [n, d]."""
    size = codebook.shape[0]
    return codebook[np.arange(size)[None, :], codes.astype(np.int64)].reshape(len(codes), -1)


def reconstruction_error(vectors: np.ndarray, codes: np.ndarray, codebook: np.ndarray) -> float:
    """Σ‖x − x̂‖² / Σ‖x‖² (0 = lossless)."""
    if not len(vectors):
        return 0.0
    residual = vectors.astype(np.float64) - decode(codes, codebook)
    total = float(np.sum(vectors.astype(np.float64) ** 2))
    return float(np.sum(residual ** 2) / total) if total > 0 else 0.0


def encode_vocabulary(embeddings: Dict[str, np.ndarray], channels: List[str], books: np.ndarray):
    """(item codes [num_items, J_item, S] or None, query codes [num_queries, S] or None, errors {channel})."""
    codes, errors = {}, {}
    for j, channel in enumerate(channels):
        codes[channel] = nearest_centroids(embeddings[channel], books[j])
        rows = _fit_rows(channel, len(embeddings[channel]))
        errors[channel] = reconstruction_error(embeddings[channel][rows], codes[channel][rows], books[j])
    item_channels = [c for c in channels if c != schema.QUERY_CHANNEL]
    items = np.stack([codes[c] for c in item_channels], axis=1) if item_channels else None
    queries = codes.get(schema.QUERY_CHANNEL)
    return items, queries, errors


def quantize_vocabulary(content, config: CodebookConfig, progress: Optional[Callable[[str], None]] = None
                        ) -> Codebooks:
    """Fits codebooks on the content encoder's embeddings of the whole vocabulary and codes every row."""
    log = progress or (lambda message: None)
    started = time.time()
    embeddings = vocabulary_embeddings(content, config.batch_size)
    log(f"fit-codebooks: embedded {content.num_items} items, {content.num_queries} queries, channels "
        f"{content.channels} in {time.time() - started:.1f}s")
    started = time.time()
    books = fit_codebooks(embeddings, list(content.channels), config)
    items, queries, errors = encode_vocabulary(embeddings, list(content.channels), books)
    log(f"fit-codebooks: {config.kind} codebooks S={config.num_subspaces} C={config.num_centroids} in "
        f"{time.time() - started:.1f}s; relative reconstruction error {json.dumps(_rounded(errors))}")
    return Codebooks(list(content.channels), books, items, queries, errors, kind=config.kind)


def _rounded(errors: Dict[str, float]) -> Dict[str, float]:
    return {k: round(v, 5) for k, v in errors.items()}


# ---------------------------------------------------------------------------------------------- files
def resolve_path(path_or_run: str) -> str:
    """An .npz path, or a run directory holding ``codebooks.npz``."""
    import tensorflow as tf

    if tf.io.gfile.isdir(path_or_run):
        return os.path.join(path_or_run, CODEBOOKS_FILE)
    return path_or_run


def save_codebooks(codebooks: Codebooks, path: str) -> str:
    import tensorflow as tf

    buffer = io.BytesIO()
    empty = np.zeros([0], np.uint8)
    np.savez_compressed(
        buffer, codebooks=codebooks.codebooks, channels=np.array(codebooks.channels),
        item_codes=codebooks.item_codes if codebooks.item_codes is not None else empty,
        query_codes=codebooks.query_codes if codebooks.query_codes is not None else empty,
        meta=np.array(json.dumps({"reconstruction_error": codebooks.reconstruction_error,
                                  "kind": codebooks.kind, "source": codebooks.source})))
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def load_codebooks(path_or_run: str) -> Codebooks:
    """Reads ``save_codebooks``' file (or ``RUN/codebooks.npz``)."""
    import tensorflow as tf

    path = resolve_path(path_or_run)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"no PQ codebooks at {path}: run `seminar-tf fit-codebooks --model-dir RUN` first")
    with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        channels = [str(c) for c in data["channels"]]
        meta = json.loads(str(data["meta"]))
        item_codes = data["item_codes"] if data["item_codes"].size else None
        query_codes = data["query_codes"] if data["query_codes"].size else None
        return Codebooks(channels, data["codebooks"].astype(np.float32), item_codes, query_codes,
                         meta.get("reconstruction_error", {}), meta.get("kind", "trained"), meta.get("source", path))


# ---------------------------------------------------------------------------------------------- models
def apply_codebooks(model, codebooks: Codebooks, codes: bool = True) -> None:
    """Loads codebooks (and, with ``codes``, the code tables) into ``model.pq`` (a ``SeminarModel``)."""
    pq = getattr(model, "pq", None)
    if pq is None:
        raise ValueError("this model has no PQ layer (it was built without the history)")
    if list(codebooks.channels) != list(pq.channels):
        raise ValueError(f"codebooks are for channels {codebooks.channels}, the model has {pq.channels}")
    want = (pq.num_subspaces, pq.num_centroids, pq.dim)
    got = (codebooks.num_subspaces, codebooks.num_centroids, codebooks.dim)
    if want != got:
        raise ValueError(f"codebooks have (subspaces, centroids, dim) = {got}, the model's PQ layer {want}; set "
                         "model.pq_subspaces / model.pq_centroids to match")
    pq.set_codebooks(codebooks.codebooks)
    if codes:
        pq.set_codes(codebooks.item_codes, codebooks.query_codes)


def refresh_codes(model, batch_size: int = 4096) -> Dict[str, float]:
    """Re-encodes every item and query with ``model.pq``'s codebooks from the model's current content weights
    (the codes must quantize the embeddings the model scores exactly). Returns the reconstruction errors."""
    pq = model.pq
    embeddings = vocabulary_embeddings(model.content, batch_size)
    items, queries, errors = encode_vocabulary(embeddings, list(pq.channels), pq.codebooks.numpy())
    pq.set_codes(items, queries)
    return errors


def model_codebooks(model, kind: str = "trained", source: str = "", batch_size: int = 4096) -> Codebooks:
    """The codebooks and codes a model holds (codes re-encoded from its current content)."""
    errors = refresh_codes(model, batch_size)
    items, queries = model.pq.get_codes()
    return Codebooks(list(model.pq.channels), model.pq.codebooks.numpy(), items, queries, errors, kind, source)


GSU_CHOICES = GSU_MODES  # ModelConfig's GSU modes (seminar_tf.config: no TensorFlow import for the CLI)


def add_gsu_arguments(p, *, what: str, gsu_default: str, codebooks_default: str) -> None:
    """The ``--gsu``, ``--codebooks`` and ``--pq-rerank`` flags of finetune, evaluate and export."""
    p.add_argument("--gsu", default=None, choices=list(GSU_CHOICES),
                   help=f"GSU scoring mode {what} (default: {gsu_default}); the PQ modes need codebooks")
    p.add_argument("--codebooks", default=None,
                   help="PQ codebooks for --gsu pq_adc|pq_sdc: an .npz or a run directory holding codebooks.npz "
                        f"(seminar-tf fit-codebooks writes it); default: {codebooks_default}")
    p.add_argument("--pq-rerank", type=int, default=None,
                   help=f"PQ GSU keeps PQ_RERANK x K candidates and re-scores them exactly (default: {gsu_default})")
