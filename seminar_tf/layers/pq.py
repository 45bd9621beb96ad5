"""Multi-modal product quantization of the GSU (paper "Multi-modal product quantization"; docs/design.md §5).

Each stored channel embedding x^(j) ∈ R^d (the content encoder's output, before any fine-tuned map) is split
into S = N_bit sub-vectors of width d/S, and each sub-vector is replaced by the id of its nearest centroid
among C (k-means, ``seminar_tf.quantization``): q(x^(j)) = [c_1^(j), …, c_S^(j)].

- SDC, the paper's formula (target quantized too, a precomputed centroid-product table, O(L·M²·S) lookups):
    q_t^T k_l = Σ_i Σ_j γ_i γ_j x_t^(i) W_ij x_l^(j) ≈ Σ_i Σ_j γ_i γ_j Σ_b P[i, j, b, c_b^(i)(t), c_b^(j)(l)],
    P[i, j, b, c, c'] = c^(i)_{b,c} W_ij[b, b] c^(j)_{b,c'}
  with W_ij the GSU's bilinear map between channels (identity in the paper; its diagonal b-blocks here, so the
  cross-sub-space terms of trained maps are dropped: SDC is exact only when W_ij is block-diagonal).
- ADC, this project's default (exact on the target side, O(L·(M+1)·S) lookups): every trained linear map is
  folded into the target vector v_j, score_l = Σ_j v_j·x_l^(j);
    T[j, b, c] = v_{j,b}·c^(j)_{b,c}  (once per target),   score_l = Σ_j Σ_b T[j, b, code_l[j, b]].

Code tables: the query channel's codes are per query (looked up by the history's query index), the item
channels' codes per item (by the history's item index), so a served history needs only ids. Codes are 8-bit
(C ≤ 256) or 4-bit (C ≤ 16) values, stored packed into int32 words (4 codes per word at 8 bits, 8 at 4 bits):
TF/XLA gather 4-byte words from a large table 2–3× faster than single bytes, and ADC then reads one byte of a
word per lookup, from a per-target table of 256 entries per byte (at 4 bits an entry sums two sub-codes, so one
lookup serves two sub-spaces). ``set_codes``/``get_codes`` take and give plain uint8 arrays.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from seminar_tf import schema

_PACKAGE = "seminar_tf"
BYTE_VALUES = 256
ADC_METHODS = ("auto", "lookup", "decode")


def code_bits(num_centroids: int) -> int:
    """Bits per code: 4 when C ≤ 16 (two codes per byte), else 8 (C ≤ 256)."""
    return 4 if num_centroids <= 16 else 8


def _unpack_bytes(words):
    """int32 words [..., W] → bytes int32 [..., 4W] (little-endian: byte k of word w is byte 4w + k)."""
    if sys.byteorder == "little":  # a bitcast is the same bytes in memory order, with no shifts (≈5× faster)
        stacked = tf.cast(tf.bitcast(words, tf.uint8), tf.int32)  # [..., W, 4]
    else:
        stacked = tf.stack([tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, 8 * k), 255) for k in range(4)],
                           axis=-1)
    return tf.reshape(stacked, tf.concat([tf.shape(words)[:-1], [-1]], axis=0))


def _byte_tables(tables, low_index, high_index):
    """Per-target ADC tables [..., J, S, C] → per-byte tables [..., G·256] (entry v of byte g = the score of
    the sub-code(s) that byte value v encodes; padding bytes score 0)."""
    shape = tf.shape(tables)
    flat = tf.reshape(tables, tf.concat([shape[:-3], [-1]], axis=0))
    if low_index is None:  # 8-bit codes, C = 256, no padding byte: the byte tables are the tables
        return flat
    extended = tf.concat([flat, tf.zeros_like(flat[..., :1])], axis=-1)  # last entry: 0 for padding
    out = tf.gather(extended, low_index, axis=-1)  # [..., G, 256]
    if high_index is not None:
        out += tf.gather(extended, high_index, axis=-1)
    return tf.reshape(out, tf.concat([shape[:-3], [-1]], axis=0))


def _adc_lookup(targets, codebooks, words, low_index, high_index):
    """ADC by table lookups: targets v [B, N, J, d], codebooks [J, S, C, d/S], words int32 [B, L, W] → [B, N, L].

    One table per target (T = v·c, then per-byte tables), then for every position and byte one lookup,
    summed: XLA fuses the byte extraction, gather and sum into one loop.
    """
    batch, candidates = tf.shape(targets)[0], tf.shape(targets)[1]
    split = tf.reshape(targets, tf.concat([tf.shape(targets)[:-1], tf.shape(codebooks)[1:2], [-1]], axis=0))
    tables = _byte_tables(tf.einsum("bnjsk,jsck->bnjsc", split, codebooks), low_index, high_index)  # [B,N,G*256]
    num_words = words.shape[-1]
    length = tf.shape(words)[1]
    word_offsets = tf.range(num_words, dtype=tf.int32) * 4 * BYTE_VALUES
    total = 0.0
    for k in range(4):
        byte = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, 8 * k), 255) + word_offsets + k * BYTE_VALUES
        picked = tf.gather(tables, tf.reshape(byte, [batch, -1]), axis=2, batch_dims=1)  # [B, N, L*W]
        total += tf.reduce_sum(tf.reshape(picked, [batch, candidates, length, num_words]), axis=-1)
    return total


_adc_lookup_xla = tf.function(_adc_lookup, jit_compile=True)


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class PQLookup(tf.keras.layers.Layer):
    """Product-quantization codebooks and code tables of the GSU, with encode/decode, SDC and ADC scoring.

    The codebooks [J, S, C, d/S] and the code tables are non-trainable variables set by ``set_codebooks`` and
    ``set_codes`` (so they are saved with the model and a served history needs only ids).

    Args:
      channels: channels quantized, a subset of ``schema.CHANNELS`` (kept in that order); the query channel's
        codes are per query, the others' per item.
      dim: d, the width of each channel embedding.
      num_subspaces: S (the paper's N_bit), sub-vectors per channel; must divide ``dim``.
      num_centroids: C ≤ 256 centroids per (channel, sub-space); C ≤ 16 gives 4-bit codes.
      num_items / num_queries: rows of the item and query code tables (vocabulary sizes).
      jit_compile: run the ADC lookups as one XLA cluster (2–4× faster on CPU; needs an XLA-enabled runtime).
      lookup_max_candidates: ``adc_scores(method="auto")`` uses lookups for at most this many targets per
        history and decode + matmul above (a GEMM beats N·L·S scalar lookups for many targets).

    Call: ``layer(targets [B, N, J, d], query_indices [B, L], item_indices [B, L])`` → ADC scores [B, N, L].

    Example:

    ```python
    pq = PQLookup(["query", "text"], dim=16, num_subspaces=4, num_centroids=32, num_items=100, num_queries=20)
    pq.set_codebooks(codebooks)                  # [2, 4, 32, 4] from seminar_tf.quantization
    pq.set_codes(item_codes, query_codes)        # uint8 [100, 1, 4], [20, 4]
    scores = pq(targets, history_queries, history_items)   # [B, N, L] = Σ_j targets_j · decoded x_l^(j)
    ```
    """

    def __init__(
        self,
        channels: Sequence[str],
        dim: int,
        num_subspaces: int = 8,
        num_centroids: int = 256,
        num_items: int = 1,
        num_queries: int = 1,
        jit_compile: bool = False,
        lookup_max_candidates: int = 4,
        **kwargs,
    ):
        super().__init__(**kwargs)
        unknown = [c for c in channels if c not in schema.CHANNELS]
        if unknown or not channels:
            raise ValueError(f"channels must be a non-empty subset of {schema.CHANNELS}, got {list(channels)}")
        if dim % num_subspaces:
            raise ValueError(f"num_subspaces {num_subspaces} must divide dim {dim}")
        if not 2 <= num_centroids <= 256:
            raise ValueError(f"num_centroids must be in [2, 256] (8-bit codes), got {num_centroids}")
        self.channels = [c for c in schema.CHANNELS if c in channels]
        self.dim = int(dim)
        self.num_subspaces = int(num_subspaces)
        self.num_centroids = int(num_centroids)
        self.num_items = int(num_items)
        self.num_queries = int(num_queries)
        self.jit_compile = bool(jit_compile)
        self.lookup_max_candidates = int(lookup_max_candidates)
        self.sub_dim = self.dim // self.num_subspaces
        self.bits = code_bits(self.num_centroids)
        self.query_channel_ids = [j for j, c in enumerate(self.channels) if c == schema.QUERY_CHANNEL]
        self.item_channel_ids = [j for j, c in enumerate(self.channels) if c != schema.QUERY_CHANNEL]
        self._build_layout()
        num_channels = len(self.channels)
        self.codebooks = self.add_weight(
            name="codebooks", shape=[num_channels, self.num_subspaces, self.num_centroids, self.sub_dim],
            dtype=tf.float32, initializer="zeros", trainable=False)
        self.query_codes = (
            self.add_weight(name="query_codes", shape=[self.num_queries, self.query_words], dtype=tf.int32,
                            initializer="zeros", trainable=False) if self.query_words else None)
        self.item_codes = (
            self.add_weight(name="item_codes", shape=[self.num_items, self.item_words], dtype=tf.int32,
                            initializer="zeros", trainable=False) if self.item_words else None)
        self.fitted = self.add_weight(name="fitted", shape=[], dtype=tf.int32, initializer="zeros", trainable=False)

    # ------------------------------------------------------------------------------------------ layout
    def _build_layout(self) -> None:
        """Static maps between (channel, sub-space) slots, bytes of the packed words, and byte tables."""
        per_byte = 8 // self.bits
        per_word = 4 * per_byte
        size = self.num_subspaces

        def table_slots(channel_ids):
            slots = [j * size + s for j in channel_ids for s in range(size)]
            return slots + [-1] * ((-len(slots)) % per_word)  # padding slots score 0

        query_slots, item_slots = table_slots(self.query_channel_ids), table_slots(self.item_channel_ids)
        self.query_words = len(query_slots) // per_word
        self.item_words = len(item_slots) // per_word
        self._query_slots = np.array(query_slots, np.int64)
        self._item_slots = np.array(item_slots, np.int64)
        slots = np.array(query_slots + item_slots, np.int64)  # the slots of one position, byte-major
        self.num_bytes = len(slots) // per_byte
        flat_size = len(self.channels) * size
        self._slot_position = np.array([int(np.nonzero(slots == f)[0][0]) for f in range(flat_size)], np.int32)
        zero = flat_size * self.num_centroids  # index of the appended 0 entry
        values = np.arange(BYTE_VALUES)
        index = np.full([per_byte, self.num_bytes, BYTE_VALUES], zero, np.int32)
        mask = (1 << self.bits) - 1
        for g in range(self.num_bytes):
            for p in range(per_byte):
                slot = slots[g * per_byte + p]
                code = (values >> (self.bits * p)) & mask
                valid = (slot >= 0) & (code < self.num_centroids)
                index[p, g] = np.where(valid, slot * self.num_centroids + code, zero)
        self._low_index = index[0]
        self._high_index = index[1] if per_byte == 2 else None
        self._identity_bytes = per_byte == 1 and np.array_equal(
            index[0], np.arange(self.num_bytes * BYTE_VALUES).reshape(self.num_bytes, BYTE_VALUES))

    @property
    def codes_per_position(self) -> int:
        """Sub-codes per history position (J·S) and bytes per position of the packed tables."""
        return len(self.channels) * self.num_subspaces

    @property
    def bytes_per_position(self) -> int:
        return 4 * (self.query_words + self.item_words)

    # ------------------------------------------------------------------------------------------ state
    def set_codebooks(self, codebooks) -> None:
        """Assigns the centroids [J, S, C, d/S] (from ``seminar_tf.quantization``) and marks the layer fitted."""
        codebooks = np.asarray(codebooks, np.float32)
        want = tuple(self.codebooks.shape)
        if codebooks.shape != want:
            raise ValueError(f"codebooks must have shape {want} (channels {self.channels}, S, C, d/S), "
                             f"got {codebooks.shape}")
        if not np.all(np.isfinite(codebooks)):
            raise ValueError("codebooks hold NaN/inf values")
        self.codebooks.assign(codebooks)
        self.fitted.assign(1)

    def _pack(self, codes: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """uint8 codes [N, J_t, S] of one table → int32 words [N, W_t] in that table's slot layout."""
        flat = codes.reshape(codes.shape[0], -1).astype(np.uint32)
        padded = np.zeros([flat.shape[0], len(slots)], np.uint32)
        padded[:, : flat.shape[1]] = flat
        per_byte = 8 // self.bits
        nibbles = padded.reshape(flat.shape[0], -1, per_byte)
        byte = sum(nibbles[..., p] << (self.bits * p) for p in range(per_byte))  # [N, bytes]
        quads = byte.reshape(flat.shape[0], -1, 4)
        words = sum(quads[..., k] << (8 * k) for k in range(4)).astype(np.uint32)
        return words.view(np.int32)

    def _unpack_numpy(self, words: np.ndarray, slots: np.ndarray, num_channels: int) -> np.ndarray:
        words = words.view(np.uint32)
        per_byte = 8 // self.bits
        byte = np.stack([(words >> (8 * k)) & 255 for k in range(4)], axis=-1).reshape(words.shape[0], -1)
        nibble = np.stack([(byte >> (self.bits * p)) & ((1 << self.bits) - 1) for p in range(per_byte)], axis=-1)
        flat = nibble.reshape(words.shape[0], -1)[:, : num_channels * self.num_subspaces]
        return flat.reshape(words.shape[0], num_channels, self.num_subspaces).astype(np.uint8)

    def set_codes(self, item_codes=None, query_codes=None) -> None:
        """Assigns the code tables: uint8 item codes [num_items, J_item, S] (item channels in order) and query
        codes [num_queries, S] (only with a query channel)."""
        if self.item_codes is not None:
            item_codes = self._check_codes(item_codes, [self.num_items, len(self.item_channel_ids),
                                                        self.num_subspaces], "item_codes")
            self.item_codes.assign(self._pack(item_codes, self._item_slots))
        if self.query_codes is not None:
            query_codes = self._check_codes(query_codes, [self.num_queries, self.num_subspaces], "query_codes")
            self.query_codes.assign(self._pack(query_codes, self._query_slots))

    def _check_codes(self, codes, shape, name):
        if codes is None:
            raise ValueError(f"{name} is required for channels {self.channels}")
        codes = np.asarray(codes)
        if list(codes.shape) != list(shape):
            raise ValueError(f"{name} must have shape {shape}, got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_centroids):
            raise ValueError(f"{name} must lie in [0, {self.num_centroids}), got [{codes.min()}, {codes.max()}]")
        return codes.astype(np.uint8)

    def get_codes(self):
        """(item codes uint8 [num_items, J_item, S] or None, query codes uint8 [num_queries, S] or None)."""
        items = (self._unpack_numpy(self.item_codes.numpy(), self._item_slots, len(self.item_channel_ids))
                 if self.item_codes is not None else None)
        queries = (self._unpack_numpy(self.query_codes.numpy(), self._query_slots, 1)[:, 0]
                   if self.query_codes is not None else None)
        return items, queries

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.numpy())

    def assert_fitted(self):
        """A graph check (INVALID_ARGUMENT) that codebooks were set; returns the control dependency."""
        return tf.debugging.assert_greater(
            self.fitted, 0, message="PQ codebooks are not set: run `seminar-tf fit-codebooks` and load them "
            "(finetune --codebooks) before using a pq_adc / pq_sdc GSU")

    # ------------------------------------------------------------------------------------------ codes
    def _channel_ids(self, channels: Optional[Sequence[str]]):
        if channels is None:
            return list(range(len(self.channels)))
        return [self.channels.index(c) for c in channels]

    def encode(self, embeddings, channels: Optional[Sequence[str]] = None):
        """Nearest-centroid codes: embeddings [..., J', d] → int32 [..., J', S] (J' = ``channels``, default all)."""
        ids = self._channel_ids(channels)
        codebooks = tf.gather(self.codebooks, ids)  # [J', S, C, ds]
        x = tf.cast(embeddings, tf.float32)
        split = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [self.num_subspaces, self.sub_dim]], axis=0))
        # ||x - c||² = ||x||² - 2 x·c + ||c||²; ||x||² does not change the argmin.
        distance = tf.reduce_sum(tf.square(codebooks), -1) - 2.0 * tf.einsum("...jsk,jsck->...jsc", split, codebooks)
        return tf.argmin(distance, axis=-1, output_type=tf.int32)

    def decode(self, codes, channels: Optional[Sequence[str]] = None):
        """Centroids of the codes: int [..., J', S] → [..., J', d]."""
        ids = self._channel_ids(channels)
        codebooks = tf.gather(self.codebooks, ids)
        flat = tf.reshape(codebooks, [-1, self.sub_dim])
        offsets = (np.arange(len(ids))[:, None] * self.num_subspaces + np.arange(self.num_subspaces)[None, :])
        index = tf.cast(codes, tf.int32) + tf.constant(offsets * self.num_centroids, tf.int32)
        decoded = tf.gather(flat, index)  # [..., J', S, ds]
        return tf.reshape(decoded, tf.concat([tf.shape(index)[:-1], [self.dim]], axis=0))

    def pack_query_codes(self, codes):
        """In-graph packing of query-channel codes int [..., S] → int32 words [..., W_query]."""
        per_byte = 8 // self.bits
        pad = len(self._query_slots) - self.num_subspaces
        codes = tf.cast(codes, tf.int32)
        codes = tf.pad(codes, tf.concat([tf.zeros([tf.rank(codes) - 1, 2], tf.int32), [[0, pad]]], axis=0))
        shape = tf.shape(codes)[:-1]
        nibbles = tf.reshape(codes, tf.concat([shape, [self.query_words, 4, per_byte]], axis=0))
        byte = nibbles[..., 0]
        if per_byte == 2:
            byte = tf.bitwise.bitwise_or(byte, tf.bitwise.left_shift(nibbles[..., 1], 4))
        word = byte[..., 0]
        for k in range(1, 4):
            word = tf.bitwise.bitwise_or(word, tf.bitwise.left_shift(byte[..., k], 8 * k))
        return word

    def lookup_words(self, query_indices, item_indices, query_codes=None):
        """Packed codes of history positions: int32 [..., W] (query words, then item words).

        ``query_codes`` int [..., S] (the query channel encoded on the fly, e.g. from raw query tokens)
        replaces the query-table lookup.
        """
        parts = []
        if self.query_codes is not None:
            if query_codes is not None:
                parts.append(self.pack_query_codes(query_codes))
            else:
                parts.append(tf.gather(self.query_codes, tf.cast(query_indices, tf.int32)))
        if self.item_codes is not None:
            parts.append(tf.gather(self.item_codes, tf.cast(item_indices, tf.int32)))
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)

    def _codes_of_words(self, words):
        """Packed words [..., W] → one code per slot, int32 [..., slots]."""
        byte = _unpack_bytes(words)
        if self.bits == 4:
            nibbles = tf.stack([tf.bitwise.bitwise_and(byte, 15), tf.bitwise.right_shift(byte, 4)], axis=-1)
            byte = tf.reshape(nibbles, tf.concat([tf.shape(byte)[:-1], [-1]], axis=0))
        return byte

    def unpack(self, words):
        """Packed words int32 [..., W] → codes int32 [..., J, S] (every channel, in order)."""
        flat = tf.gather(self._codes_of_words(words), self._slot_position, axis=-1)
        return tf.reshape(flat, tf.concat([tf.shape(words)[:-1], [len(self.channels), self.num_subspaces]], axis=0))

    def item_codes_of(self, item_indices):
        """Codes of items from the item table: int [...] → int32 [..., J_item, S] (item channels in order)."""
        size = len(self.item_channel_ids) * self.num_subspaces
        flat = self._codes_of_words(tf.gather(self.item_codes, tf.cast(item_indices, tf.int32)))[..., :size]
        return tf.reshape(flat, tf.concat([tf.shape(item_indices), [len(self.item_channel_ids), self.num_subspaces]],
                                          axis=0))

    def query_codes_of(self, query_indices):
        """Codes of queries from the query table: int [...] → int32 [..., S]."""
        words = tf.gather(self.query_codes, tf.cast(query_indices, tf.int32))
        return self._codes_of_words(words)[..., : self.num_subspaces]

    # ------------------------------------------------------------------------------------------ scores
    def adc_table(self, targets):
        """T[..., j, b, c] = v_{j,b}·c^(j)_{b,c}: targets [..., J, d] → [..., J, S, C]."""
        x = tf.cast(targets, tf.float32)
        split = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [self.num_subspaces, self.sub_dim]], axis=0))
        return tf.einsum("...jsk,jsck->...jsc", split, self.codebooks)

    def adc_scores(self, targets, words, method: str = "auto"):
        """ADC scores Σ_j Σ_b T[j, b, code_l[j, b]]: targets v [B, N, J, d], words [B, L, W] → [B, N, L].

        ``method``: "lookup" (per-target tables, one lookup per code byte), "decode" (centroids of the codes,
        then Σ_j v_j·x̂_l^(j) as one matmul; the same number), or "auto" (lookup for N ≤
        ``lookup_max_candidates``).
        """
        if method not in ADC_METHODS:
            raise ValueError(f"method must be one of {ADC_METHODS}, got {method!r}")
        targets = tf.cast(targets, tf.float32)
        candidates = targets.shape[1]
        if method == "auto":
            method = "lookup" if candidates is not None and candidates <= self.lookup_max_candidates else "decode"
        if method == "decode":
            decoded = self.decode(self.unpack(words))  # [B, L, J, d]
            shape = tf.shape(decoded)
            flat = tf.reshape(decoded, [shape[0], shape[1], -1])  # one [N, J·d] x [J·d, L] matmul per row
            return tf.matmul(tf.reshape(targets, [shape[0], -1, shape[2] * shape[3]]), flat, transpose_b=True)
        lookup = _adc_lookup_xla if self.jit_compile else _adc_lookup
        low = None if self._identity_bytes else tf.constant(self._low_index)
        high = None if self._high_index is None else tf.constant(self._high_index)
        return lookup(targets, tf.convert_to_tensor(self.codebooks), words, low, high)

    def sdc_table(self, bilinear=None):
        """The paper's centroid-product table P [J, J, S, C, C] = c^(i)_{b,c} W_ij[b, b] c^(j)_{b,c'}.

        bilinear: W [J, J, d, d] between target channel i and history channel j (None = identity, the paper's
        plain inner product); only its diagonal (b, b) blocks enter.
        """
        codebooks = tf.convert_to_tensor(self.codebooks)
        if bilinear is None:
            return tf.einsum("isck,jsek->ijsce", codebooks, codebooks)
        size, sub = self.num_subspaces, self.sub_dim
        num = len(self.channels)
        blocks = tf.reshape(tf.cast(bilinear, tf.float32), [num, num, size, sub, size, sub])
        blocks = tf.linalg.diag_part(tf.transpose(blocks, [0, 1, 3, 5, 2, 4]))  # [J, J, ds, ds, S]
        blocks = tf.transpose(blocks, [0, 1, 4, 2, 3])  # [J, J, S, ds, ds]
        return tf.einsum("iscA,ijsAB,jseB->ijsce", codebooks, blocks, codebooks)

    def sdc_scores(self, target_codes, gamma, words, bilinear=None):
        """SDC (the paper's formula, O(L·M²·S) lookups): Σ_i Σ_j γ_i γ_j Σ_b P[i, j, b, t_b^(i), c_b^(j)(l)].

        target_codes int [B, N, J, S] (the target pair quantized too), gamma [B, N, J], words [B, L, W],
        bilinear W [J, J, d, d] or None → [B, N, L].
        """
        num, size, cents = len(self.channels), self.num_subspaces, self.num_centroids
        table = tf.reshape(self.sdc_table(bilinear), [-1])
        history = self.unpack(words)  # [B, L, J, S]
        pair_offset = ((np.arange(num)[:, None, None] * num + np.arange(num)[None, :, None]) * size
                       + np.arange(size)[None, None, :]) * cents * cents  # [J(i), J(j), S]
        target = (tf.constant(pair_offset, tf.int32)[None, None]
                  + tf.cast(target_codes, tf.int32)[:, :, :, None, :] * cents)  # [B, N, J, J, S]
        index = target[:, :, None] + history[:, None, :, None, :, :]  # [B, N, L, J, J, S]
        products = tf.gather(table, index)
        gamma = tf.cast(gamma, tf.float32)
        weights = gamma[:, :, :, None] * gamma[:, :, None, :]  # [B, N, J, J]
        return tf.einsum("bnlijs,bnij->bnl", products, weights)

    def call(self, targets, query_indices, item_indices):
        return self.adc_scores(targets, self.lookup_words(query_indices, item_indices))

    def get_config(self):
        config = super().get_config()
        config.update(channels=list(self.channels), dim=self.dim, num_subspaces=self.num_subspaces,
                      num_centroids=self.num_centroids, num_items=self.num_items, num_queries=self.num_queries,
                      jit_compile=self.jit_compile, lookup_max_candidates=self.lookup_max_candidates)
        return config
