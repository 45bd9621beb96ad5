"""SEMINAR's CTR / personalized-search-ranking model: restored PSU content, G_j, GSU top-K, ESU, tower.

Paper ("Fine-tuning the projection weight"):
  x^{GSU(j)} = x^{PSU(j)} G_j                       (per-channel projection of the restored embeddings)
  α_h^{GSU} = (q_t W_h^{GSUQ})(K^{GSU} W_h^{GSUK})^T / √d    over all L pairs → TopK
  α_h^{ESU} = (q_t W_h^{ESUQ})(K^{ESU} W_h^{ESUK})^T / √d    exactly over the K kept pairs
  x_lifelong_seq = Concat(head^{ESU_1..H}) W^{ESU};  ŷ = f(x_lifelong_seq, x_u, x_i, x_context)
with q_t = Σ_j γ_j x_t^{GSU(j)} and k_l = Σ_j γ_j x_l^{GSU(j)}, γ from the gate on the target pair.

GSU modes (docs/design.md §5): "exact" scores every history pair from its content embeddings; "pq_adc" and "pq_sdc"
score it from the product-quantization codes of the stored embeddings x^{PSU(j)} (``PQLookup``), looked up by
the history's item and query ids, so the content encoder runs only on the K pairs the GSU keeps (ESU exact).
ADC folds every trained map into the target, score_l = Σ_j (γ_j G_j u)·x̂_l^{PSU(j)}, exact on the target
side; SDC is the paper's formula with the target quantized too and a centroid-product table.

Retrieval is a component (``seminar_tf.models.retrievers``, docs/design.md §4): the mode selects the model's
``retriever`` (``set_gsu_mode`` switches it) and the baselines plug in their own; ``score_pairs`` is one path for
all of them (retriever scores → top-K → ESU → tower).

The GSU also learns from an auxiliary loss (as SIM's soft search / TWIN): the GSU's own multi-head attention
output over the whole history, head^GSU = Attention(q_t, K^GSU, V^GSU), feeds a small head trained on the
same label (training only).

The history enters a step as its distinct entries (``history_entries``: each distinct query and item of the
batch encoded once), never as [B, L, C, d]: the retrieval scores are per entry and gathered to the steps, the
K kept steps are gathered from the entries, and the auxiliary read-out sums its softmax weights per entry
(``retrievers.entry_attention``); per-step feedback enters through per-row counts of each feedback token.
"""

from __future__ import annotations

import functools
import inspect
from typing import Dict, Optional, Sequence

import tensorflow as tf
import tensorflow_recommenders as tfrs

from seminar_tf import schema
from seminar_tf.config import AUX_SCOPES, GSU_MODES
from seminar_tf.layers import ChannelGate, MultiHeadTargetAttention, top_k_positions
from seminar_tf.layers.pq import PQLookup
from seminar_tf.models.content import ContentEncoder
from seminar_tf.models.inputs import check_features
from seminar_tf.models.psu import history_mask, per_replica_loss
from seminar_tf.models.retrievers import (EXCLUDED, HistoryEntries, RetrievalContext, Retriever, gsu_retriever,
                                          indexed_scores, mask_scores, pq_scores, projected_scores, stored_scores,
                                          target_vectors)
from seminar_tf.tasks import CTRTask, GSUAuxiliaryTask, UserRankingTask

PQ_MODES = ("pq_adc", "pq_sdc")


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class ChannelProjection(tf.keras.layers.Layer):
    """x^{GSU(j)} = x^{PSU(j)} G_j, one d×d matrix per channel, initialised to the identity.

    Input [..., C, d] → output [..., C, d].
    """

    def __init__(self, num_channels: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_channels = int(num_channels)
        self.dim = int(dim)
        self.kernel = self.add_weight(
            name="G", shape=[self.num_channels, self.dim, self.dim],
            initializer=lambda shape, dtype=None: tf.eye(shape[1], batch_shape=[shape[0]], dtype=dtype or tf.float32))

    def call(self, channels):
        # One matmul batched over the C channels ([C, M, d] x [C, d, d]); a plain einsum "...cd,cde->...ce" is
        # about 3× slower on CPU at the serving shapes.
        shape = tf.shape(channels)
        flat = tf.transpose(tf.reshape(channels, [-1, self.num_channels, self.dim]), [1, 0, 2])  # [C, M, d]
        projected = tf.matmul(flat, tf.cast(self.kernel, flat.dtype))
        out = tf.reshape(tf.transpose(projected, [1, 0, 2]), shape)
        out.set_shape(channels.shape)
        return out

    def get_config(self):
        config = super().get_config()
        config.update(num_channels=self.num_channels, dim=self.dim)
        return config


_BUILDING = set()  # ids of models inside their outermost __init__ (a subclass's __init__ calls its parents')
_LAYER_KEY = "__layer__"


def _records_arguments(init):
    """Wraps a model class's ``__init__`` so that the outermost call (the class the user built) records its
    arguments for ``get_config``."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        outer = id(self) not in _BUILDING
        _BUILDING.add(id(self))
        try:
            init(self, *args, **kwargs)
        finally:
            if outer:
                _BUILDING.discard(id(self))
        if outer:
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
            for name, parameter in inspect.signature(init).parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(arguments.pop(name, {}))
            object.__setattr__(self, "_init_arguments", arguments)  # plain attribute: not tracked by Keras

    return wrapper


def _to_config(value):
    """A constructor argument as JSON-ready config: layers (content encoder, retriever, fusion) serialized."""
    if isinstance(value, tf.keras.layers.Layer):
        return {_LAYER_KEY: tf.keras.layers.serialize(value)}
    if isinstance(value, dict):
        return {k: _to_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_config(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _from_config(value):
    if isinstance(value, dict):
        if set(value) == {_LAYER_KEY}:
            return tf.keras.layers.deserialize(value[_LAYER_KEY])
        return {k: _from_config(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_from_config(v) for v in value)
    return value


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class SeminarModel(tfrs.Model):
    """SEMINAR CTR/PSR model. ``call`` returns a dict: logit, probability, top_k, gsu_scores (unless the retriever
    ranks without scoring every step, ``Retriever.top_k``) and aux_logit when training.

    Args:
      content: ``ContentEncoder`` (restore PSU weights into it before fine-tuning).
      num_heads: heads of the GSU and ESU attentions.
      top_k: K, pairs kept by the GSU for the ESU.
      gsu: GSU scoring mode: "exact", "pq_adc" or "pq_sdc" (load codebooks into ``model.pq`` first, see
        ``seminar_tf.quantization``; ``set_gsu_mode`` switches a built model).
      pq_subspaces / pq_centroids: S sub-vectors per channel and C centroids of the PQ codebooks.
      pq_jit_compile: run the ADC lookups as one XLA cluster.
      pq_rerank: r ≥ 1; a PQ GSU keeps r·K candidates and re-scores them exactly from their content (the ESU
        encodes them anyway), then keeps the K best (faiss IndexRefine style); 1 = plain PQ top-K.
      user_attribute_sizes: {name: vocabulary size} of user profile features for the tower.
      tower_units: hidden layers of the CTR tower.
      aux_weight: weight of the GSU auxiliary loss (0 disables it).
      aux_scope: the steps the auxiliary read-out head^GSU attends over: "history" (all L steps, the paper's) or
        "top_k" (the K steps the GSU kept for the ESU: the same set when a history has at most K real steps; at
        L = 10^4 it keeps no per-step activation of the whole history for backpropagation).
      ranking_weight: weight of the within-user pairwise ranking loss beside L_ctr (``UserRankingTask``; pairs of
        one ``user_id`` in the batch; 0 disables it).
      use_history: False gives the "no history" baseline (tower on target and user features only).
      freeze_content / freeze_projections: keep the restored PSU content weights / G_j fixed.
      retriever: the retrieval step (``seminar_tf.models.retrievers``); None = SEMINAR's GSU of mode ``gsu``
        (``set_gsu_mode`` switches it). A baseline passes its own (``gsu`` must then be "exact").

    Example:

    ```python
    model = SeminarModel(content, num_heads=2, top_k=50)
    model.compile(tf.keras.optimizers.Adam(1e-3))
    model.fit(reader.make_dataset(data_dir, "ctr", "train", 128), epochs=2)
    ```
    """

    def __init__(
        self,
        content: ContentEncoder,
        num_heads: int = 2,
        top_k: int = 50,
        gsu: str = "exact",
        user_attribute_sizes: Optional[Dict[str, int]] = None,
        user_embedding_dim: int = 8,
        tower_units: Sequence[int] = (64, 32),
        aux_weight: float = 0.1,
        aux_scope: str = "history",
        use_history: bool = True,
        freeze_content: bool = False,
        freeze_projections: bool = False,
        dropout: float = 0.0,
        pq_subspaces: int = 8,
        pq_centroids: int = 256,
        pq_jit_compile: bool = False,
        pq_rerank: int = 1,
        num_users: int = 0,
        user_id_dim: int = 16,
        use_item_id: bool = False,
        num_feedback: int = 0,
        embedding_l2: float = 0.0,
        recent_history: int = 0,
        gsu_identity_init: bool = False,
        id_dropout: float = 0.0,
        affinity_column: int = 0,
        category_affinity: bool = False,
        gsu_category_prior: bool = False,
        item_statistics_folds: int = 0,
        item_statistics_columns: int = 2,
        ranking_weight: float = 0.0,
        retriever: Optional[Retriever] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if gsu not in GSU_MODES:
            raise ValueError(f"gsu must be one of {GSU_MODES}, got {gsu!r}")
        self.content = content
        self.content.trainable = not freeze_content
        self.channels = list(content.channels)
        dim = content.dim
        self.top_k = int(top_k)
        self.gsu_mode = gsu
        self.pq_rerank = int(pq_rerank)
        if self.pq_rerank < 1:
            raise ValueError(f"pq_rerank must be >= 1, got {pq_rerank}")
        self.use_history = bool(use_history)
        self.aux_weight = float(aux_weight)
        if aux_scope not in AUX_SCOPES:
            raise ValueError(f"aux_scope {aux_scope!r}: choose one of {list(AUX_SCOPES)}")
        self.aux_scope = aux_scope
        self.projection = ChannelProjection(len(self.channels), dim, name="gsu_projection")
        self.projection.trainable = not freeze_projections
        self.gate = ChannelGate(len(self.channels), mode="dynamic", name="gate")
        self.gsu = MultiHeadTargetAttention(num_heads, key_dim=dim, output_dim=dim, identity_init=gsu_identity_init,
                                            name="gsu")
        self.esu = MultiHeadTargetAttention(num_heads, key_dim=dim, output_dim=dim, dropout=dropout, name="esu")
        # Short-term interest beside the lifelong retrieval (as production SIM / ETA / TWIN run it): target
        # attention over the newest ``recent_history`` real steps, read by the tower next to the ESU output.
        self.recent_history = int(recent_history) if self.use_history else 0
        self.recent = (MultiHeadTargetAttention(num_heads, key_dim=dim, output_dim=dim, dropout=dropout,
                                                name="recent") if self.recent_history else None)
        self.user_attribute_names = sorted(user_attribute_sizes or {})
        self.user_embeddings = {
            name: tf.keras.layers.Embedding(size, user_embedding_dim, name=f"user_{name}_embedding")
            for name, size in sorted((user_attribute_sizes or {}).items())
        }
        # Id and feedback features (beside the content channels): a user-id embedding for the tower, an item-id
        # embedding added to the ESU's target query and to each kept history step, and a per-step feedback
        # embedding (what the user did with that item) added to the kept steps; its masked mean over the whole
        # history also feeds the tower. Index 0 (padding) embeds to zero.
        regularizer = tf.keras.regularizers.l2(embedding_l2) if embedding_l2 else None
        self.embedding_l2 = float(embedding_l2)
        self.id_dropout = float(id_dropout)

        def id_table(size, width, name):
            return tf.keras.layers.Embedding(size, width, embeddings_regularizer=regularizer,
                                             embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.01),
                                             name=name)

        # user_id_dim 0 = d: the tower then also reads user-id ⊙ item-id (a factorization-machine cross)
        self.user_id_embedding = (id_table(num_users, int(user_id_dim) or dim, "user_id_embedding")
                                  if num_users else None)
        self.item_id_embedding = id_table(content.num_items, dim, "item_id_embedding") if use_item_id else None
        self.feedback_embedding = (id_table(num_feedback, dim, "feedback_embedding")
                                   if num_feedback and self.use_history else None)
        # Category affinity (tower): over the whole history, the share and log-count of steps whose item shares the
        # target's category (attribute column ``affinity_column`` of the item table), and with feedback the mean
        # feedback embedding of those steps: "how does this user rate this kind of item", whichever K the GSU kept.
        # ``gsu_category_prior``: the GSU ranks the steps of the target's category first (SIM hard's filter), its
        # learned score ordering the steps within each group.
        self.affinity_column = int(affinity_column)
        if self.affinity_column and not 0 < self.affinity_column < content.attributes.shape[1]:
            raise ValueError(f"affinity_column must be in [1, {content.attributes.shape[1]}) (column 0 is the item "
                             f"id), got {affinity_column}")
        if (category_affinity or gsu_category_prior) and not self.affinity_column:
            raise ValueError("category_affinity / gsu_category_prior need affinity_column (the category column)")
        self.category_affinity = bool(category_affinity)
        self.gsu_category_prior = bool(gsu_category_prior)
        # Item statistics (tower): each target item's smoothed train-split click log-odds and log shown-count, a
        # frozen table set by ``set_item_statistics``. Rows 0..F-1 leave one user fold out (a training row reads
        # the fold of its own user, so its own label never enters its feature); row F (all folds) serves.
        self.item_statistics_folds = int(item_statistics_folds)
        self.item_statistics = (self.add_weight(
            name="item_statistics", shape=[self.item_statistics_folds + 1, content.num_items,
                                           int(item_statistics_columns)],
            initializer="zeros", trainable=False) if self.item_statistics_folds else None)
        hidden = []
        for units in tower_units:
            hidden.append(tf.keras.layers.Dense(units, activation="relu"))
            if dropout:
                hidden.append(tf.keras.layers.Dropout(dropout))
        self.tower = tf.keras.Sequential(hidden + [tf.keras.layers.Dense(1)], name="tower")
        self.aux_head = tf.keras.Sequential(
            [tf.keras.layers.Dense(dim, activation="relu"), tf.keras.layers.Dense(1)], name="gsu_aux_head")
        self.aux_head.build([None, None, 2 * dim])  # used only in training; built now so checkpoints always hold it
        self.task = CTRTask(name="ctr")
        self.aux_task = GSUAuxiliaryTask(weight=aux_weight, name="gsu_aux") if aux_weight else None
        self.ranking_task = UserRankingTask(weight=ranking_weight, name="user_rank") if ranking_weight else None
        # Codebooks and code tables of every item and query: non-trainable, saved with the model (also for
        # "exact", so that a trained model can switch its GSU to PQ once codebooks are fitted on it).
        self.pq = (PQLookup(self.channels, dim, pq_subspaces, pq_centroids, num_items=content.num_items,
                            num_queries=content.num_queries, jit_compile=pq_jit_compile, name="pq")
                   if self.use_history else None)
        if gsu in PQ_MODES and self.pq is None:
            raise ValueError(f"gsu={gsu!r} needs the history (use_history=True)")
        # The retrieval step (docs/design.md §4, §5): SEMINAR's GSU of the mode, or a baseline's own retriever.
        if retriever is not None and gsu != "exact":
            raise ValueError(f"a model with its own retriever needs gsu='exact', got {gsu!r}")
        self.retriever = retriever if retriever is not None else self._gsu_retriever(gsu)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _records_arguments(cls.__dict__["__init__"])

    def get_config(self) -> dict:
        """The arguments this model was constructed with, JSON-ready; the content encoder (and a retriever or
        Fusion-Q-Former passed in) as their Keras configs. ``type(model).from_config(config)`` builds the same
        architecture; the weights (item / query tables included) come from a checkpoint. LoRA adapters are placed
        after construction (``experiment``) and are not part of it."""
        return _to_config(dict(self._init_arguments))

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        return cls(**_from_config(dict(config)))

    def resize_pq(self, num_subspaces: int, num_centroids: int) -> None:
        """Replaces the PQ layer by an unfitted one of another S and C (e.g. to serve a run with codebooks of
        another size than it was built with); load codebooks into it next (``quantization.apply_codebooks``)."""
        if self.pq is None:
            raise ValueError("this model has no PQ layer (it was built without the history)")
        old = self.pq
        self.pq = PQLookup(old.channels, old.dim, num_subspaces, num_centroids, num_items=old.num_items,
                           num_queries=old.num_queries, jit_compile=old.jit_compile, name="pq")
        self.train_function = self.test_function = self.predict_function = None

    def set_gsu_mode(self, gsu: str, pq_rerank: Optional[int] = None) -> None:
        """Switches the GSU scoring mode of a (trained) model; the PQ modes need fitted codebooks in ``pq``."""
        if gsu not in GSU_MODES:
            raise ValueError(f"gsu must be one of {GSU_MODES}, got {gsu!r}")
        if gsu in PQ_MODES and (self.pq is None or not self.pq.is_fitted):
            raise ValueError(f"gsu={gsu!r} needs fitted codebooks: load them with "
                             "seminar_tf.quantization.apply_codebooks (seminar-tf fit-codebooks writes them)")
        self.gsu_mode = gsu
        if pq_rerank is not None:
            self.pq_rerank = int(pq_rerank)
        if self.retriever.gsu_mode is not None:  # SEMINAR's GSU (a baseline keeps its own retriever)
            self.retriever = self._gsu_retriever(gsu)
        # Keras caches traced train/test/predict functions; the next call must trace the new mode.
        self.train_function = self.test_function = self.predict_function = None

    def _gsu_retriever(self, gsu: str) -> Retriever:
        """SEMINAR's GSU retriever of mode ``gsu``; exact inference scores the stored channels when they are not
        the content encoder's (``_channels_are_content``)."""
        return gsu_retriever(gsu, self.pq_rerank, stored_channels=not self._channels_are_content())

    # -------------------------------------------------------------------------------------------- parts
    def _user_vectors(self, features):
        return [self.user_embeddings[n](features[schema.user_attribute_feature(n)]) for n in self.user_attribute_names]

    def pair_channels(self, queries, items, training=None, query_tokens=None):
        """The stored channels x^{PSU} [..., C, d] of (query, item) pairs, before G_j."""
        return self.content(queries, items, training=training, query_tokens=query_tokens)

    def build_serving_cache(self) -> int:
        """The content encoder's serving cache (``ContentEncoder.build_cache``) and, for a model whose channels are
        the content encoder's, every vocabulary row's channels after G_j: inference then gathers the kept steps'
        x^{GSU(j)} (``projected_channels``) instead of projecting them. Returns the bytes of both;
        ``clear_serving_cache`` drops them (they go stale as soon as the weights change)."""
        size = self.content.build_cache()
        if not (self.use_history and self._channels_are_content()):
            return size
        kernel = self.projection.kernel
        first = int(schema.QUERY_CHANNEL in self.channels)
        if getattr(self.content, "item_cache", None) is not None:
            items = tf.einsum("ujd,jde->uje", self.content.item_cache, kernel[first:])
            self._projected_items = tf.Variable(items, trainable=False, name="projected_item_cache")
            size += items.shape.num_elements() * 4
        if getattr(self.content, "query_cache", None) is not None:
            queries = tf.matmul(self.content.query_cache, kernel[0])
            self._projected_queries = tf.Variable(queries, trainable=False, name="projected_query_cache")
            size += queries.shape.num_elements() * 4
        return size

    def has_serving_cache(self) -> bool:
        """True once ``build_serving_cache`` has projected the catalog (until ``clear_serving_cache``)."""
        return any(getattr(self, name, None) is not None for name in ("_projected_items", "_projected_queries"))

    def clear_serving_cache(self) -> None:
        """Drops the caches of ``build_serving_cache``."""
        self.content.clear_cache()
        for name in ("_projected_items", "_projected_queries"):
            if getattr(self, name, None) is not None:
                delattr(self, name)

    def projected_channels(self, queries, items, training=None, query_tokens=None):
        """x^{GSU(j)} = x^{PSU(j)} G_j [..., C, d] of (query, item) pairs: gathered from ``build_serving_cache``'s
        projected rows at inference (an unknown query, OOV index with ``query_tokens``, encoded and projected),
        else the projection of ``pair_channels``."""
        cached_items = getattr(self, "_projected_items", None)
        cached_queries = getattr(self, "_projected_queries", None)
        has_query = schema.QUERY_CHANNEL in self.channels
        item_parts = len(self.channels) > int(has_query)
        if training or (item_parts and cached_items is None) or (has_query and cached_queries is None):
            return self.projection(self.pair_channels(queries, items, training, query_tokens))
        parts = []
        if has_query:
            queries = self.content._check_range(queries, self.content.num_queries, "query index")
            known = tf.gather(cached_queries, queries)  # [..., d]
            if query_tokens is not None:
                unknown = tf.where(tf.equal(tf.cast(queries, tf.int64), schema.OOV_INDEX))  # [P, rank]
                encoded = self.content.encode_query_tokens(tf.gather_nd(query_tokens, unknown), training=False)
                known = tf.tensor_scatter_nd_update(known, unknown, tf.cast(
                    tf.matmul(encoded, self.projection.kernel[0]), known.dtype))
            parts.append(known[..., None, :])
        if item_parts:
            items = self.content._check_range(items, self.content.num_items, "item index")
            parts.append(tf.gather(cached_items, items))  # [..., J, d]
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-2)

    def history_entries(self, features, training=None) -> HistoryEntries:
        """The history's distinct entries before G_j (``retrievers.HistoryEntries``): the query channel of each
        distinct query [U_q, d] and the item channels of each distinct item [U_i, J, d] (``distinct_items``), and
        each step's rows. With ``history_query_tokens``, each unknown query (OOV index) gets a row of its own,
        encoded from its tokens."""
        items = tf.cast(features[schema.SEQ_HISTORY_ITEM], tf.int32)
        shape = tf.shape(items)
        item_rows = item_index = query_rows = query_index = None
        if len(self.channels) > (schema.QUERY_CHANNEL in self.channels):
            unique, inverse = tf.unique(tf.reshape(items, [-1]), out_idx=tf.int32)
            item_rows, item_index = self.distinct_items(unique, training), tf.reshape(inverse, shape)
        if schema.QUERY_CHANNEL in self.channels:
            queries = tf.reshape(tf.cast(features[schema.SEQ_HISTORY_QUERY], tf.int32), [-1])
            unique, inverse = tf.unique(queries, out_idx=tf.int32)
            query_rows = self.content.encode_queries(unique, training=training)  # [U, d]
            tokens = features.get(schema.HISTORY_QUERY_TOKENS)
            if tokens is not None:  # unknown text: one extra row per OOV position, encoded from its tokens
                unknown = tf.where(tf.equal(queries, schema.OOV_INDEX))  # [P, 1]
                inverse = tf.tensor_scatter_nd_update(
                    inverse, unknown, tf.size(unique) + tf.range(tf.shape(unknown)[0], dtype=tf.int32))
                unknown_tokens = tf.gather_nd(tf.reshape(tokens, [-1, tf.shape(tokens)[-1]]), unknown)
                query_rows = tf.concat([query_rows, tf.cast(self.content.encode_query_tokens(
                    unknown_tokens, training=training), query_rows.dtype)], axis=0)
            query_index = tf.reshape(inverse, shape)
        return HistoryEntries(query_rows, query_index, item_rows, item_index)

    def distinct_items(self, items, training=None):
        """The item channels x^{PSU(j)} [U, J, d] (the model's channels after the query channel) of items [U]:
        the content encoder's (its serving cache, when built), or those of ``pair_channels`` (e.g. EM3's fused
        channels) with the empty query."""
        if not self._channels_are_content():
            channels = self.pair_channels(tf.zeros_like(items), items, training)  # [U, C, d]
            return channels[:, 1:] if schema.QUERY_CHANNEL in self.channels else channels
        stacked = self.content.encode_items_stacked(items, training=training)
        return tf.reshape(stacked, [tf.shape(items)[0], len(self.content.item_channels), self.content.dim])

    def encode_history(self, features, training=None):
        """History channels after G_j, x^{GSU(j)} = x^{PSU(j)} G_j: ([B, L, C, d], mask bool [B, L]); [B, L, C, d]
        per call: ``score_pairs`` reads ``history_entries`` instead."""
        mask = history_mask(features)
        history = self.projection(self.content(
            features[schema.SEQ_HISTORY_QUERY], features[schema.SEQ_HISTORY_ITEM], training=training,
            query_tokens=features.get(schema.HISTORY_QUERY_TOKENS)))
        return history, mask

    def encode_targets(self, queries, items, training=None, query_tokens=None):
        """Target pairs [B, N] → (q_t = Σ_j γ_j x_t^{GSU(j)} [B, N, d], γ [B, N, C]).

        ``query_tokens`` [B, N, query_length] (raw query text, tokenized) replaces the query-table lookup.
        """
        _, q_t, gamma = self._targets(queries, items, training, query_tokens)
        return q_t, gamma

    def _targets(self, queries, items, training=None, query_tokens=None):
        """(x_t^{PSU} [B, N, C, d], q_t [B, N, d], γ [B, N, C])."""
        stored = self.content(queries, items, training=training, query_tokens=query_tokens)  # [B, N, C, d]
        target = self.projection(stored)
        flat = tf.reshape(target, [-1, len(self.channels), self.content.dim])
        gamma = tf.reshape(self.gate(flat), tf.shape(target)[:-1])
        return stored, tf.einsum("bncd,bnc->bnd", target, gamma), gamma

    # -------------------------------------------------------------------------------------- PQ GSU
    def pq_targets(self, q_t, gamma):
        """ADC target vectors v_j = γ_j G_j u, u = folded_query(q_t): [B, N, C, d], so that the exact GSU score
        is score_l = Σ_j v_j·x_l^{PSU(j)} (every trained map folded into the target side, docs/design.md §5)."""
        return target_vectors(self.projection.kernel, self.gsu.folded_query(q_t), gamma)

    def gsu_bilinear(self):
        """W_ij = G_i A G_j^T [C, C, d, d] with u = q_t A, so score_l = Σ_i Σ_j γ_i γ_j x_t^{PSU(i)} W_ij x_l^{PSU(j)}
        (the bilinear map the SDC centroid-product table is built from)."""
        dim = self.content.dim
        folded = self.gsu.folded_query(tf.eye(dim))  # A [d, d]: row a = folded_query(e_a)
        kernel = self.projection.kernel
        return tf.einsum("iad,de,jfe->ijaf", kernel, folded, kernel)

    def history_codes(self, features, training=None):
        """Packed PQ codes of every history position, int32 [B, L, W]: query codes by query index, item codes by
        item index. With ``history_query_tokens`` (raw query text), queries outside the vocabulary (OOV index)
        are encoded from their tokens and quantized on the fly; every other query has exactly its table's codes
        (same tokenizer, same tokens), so the query encoder runs only on the unknown ones."""
        indices = {}
        for name, size in ((schema.SEQ_HISTORY_QUERY, self.content.num_queries),
                           (schema.SEQ_HISTORY_ITEM, self.content.num_items)):
            value = tf.cast(features[name], tf.int32)
            message = f"{name}: index out of range [0, {size}); map unknown ids to OOV ({schema.OOV_INDEX})"
            with tf.control_dependencies([tf.debugging.assert_non_negative(value, message=message),
                                          tf.debugging.assert_less(value, size, message=message)]):
                indices[name] = tf.identity(value)
        queries, items = indices[schema.SEQ_HISTORY_QUERY], indices[schema.SEQ_HISTORY_ITEM]
        words = self.pq.lookup_words(queries, items)
        tokens = features.get(schema.HISTORY_QUERY_TOKENS)
        if tokens is None or schema.QUERY_CHANNEL not in self.channels:
            return words
        unknown = tf.where(tf.equal(queries, schema.OOV_INDEX))  # [P, 2] positions of out-of-vocabulary queries
        encoded = self.content.encode_query_tokens(tf.gather_nd(tokens, unknown), training=training)  # [P, d]
        codes = self.pq.encode(encoded[:, None, :], channels=[schema.QUERY_CHANNEL])[:, 0, :]  # [P, S]
        query_words = tf.tensor_scatter_nd_update(words[..., : self.pq.query_words], unknown,
                                                  self.pq.pack_query_codes(codes))
        return tf.concat([query_words, words[..., self.pq.query_words:]], axis=-1)

    def gsu_scores(self, q_t, gamma, history, mask, features=None, target=None):
        """GSU relevance (1/H) Σ_h α_h^{GSU} of every history pair for every target: [B, N, L].

        "exact": over ``history`` [B, L, C, d], the channels after G_j (``retrievers.ProjectedGSU``); with
        ``history`` None, ``target`` holds the stored history channels x^{PSU} [B, L, C, d] and G_j is folded into
        the target side (``StoredChannelGSU``). "pq_adc" / "pq_sdc": the same score from the history's PQ codes
        (looked up from ``features``' history ids; ``history`` is not needed); SDC also needs the target's stored
        channels ``target`` [B, N, C, d]. Masked positions get -1e9. ``score_pairs`` asks ``self.retriever``.
        """
        if self.gsu_mode == "exact" and history is not None:
            scores = projected_scores(self.gsu, q_t, gamma, history)
        elif self.gsu_mode == "exact":
            scores = stored_scores(self, q_t, gamma, target)
        else:
            scores = pq_scores(self, self.gsu_mode[3:], q_t, gamma, features, target)
        return mask_scores(scores, mask)

    _mask_scores = staticmethod(mask_scores)

    def _channels_are_content(self) -> bool:
        """True when ``pair_channels`` is the content encoder itself (subclasses with other channels, e.g. fused
        ones, return False and score the stored channels instead of ``indexed_gsu_scores``)."""
        return True

    def indexed_gsu_scores(self, q_t, gamma, features):
        """Exact GSU scores [B, N, L] (unmasked) from the history's item / query indices, at inference
        (``retrievers.IndexedGSU``)."""
        return indexed_scores(self, q_t, gamma, features)

    def score_pairs(self, features, queries, items, training=None) -> Dict[str, tf.Tensor]:
        """Scores N target pairs per row against that row's history, processed once: outputs [B, N, ...].

        The retriever (``self.retriever``) scores all L pairs → top-K per target → ESU exactly over those K →
        tower. Row format (``call``) is N = 1; ranking N candidates for one history is the same call with N > 1.
        ``top_k_valid`` [B, N, K] is False at slots past the kept steps.
        """
        target, q_t, gamma = self._targets(queries, items, training, features.get(schema.TARGET_QUERY_TOKENS))
        target_id = self.target_id_embedding(items, training)
        batch, n = tf.shape(q_t)[0], tf.shape(q_t)[1]
        dim = self.content.dim
        outputs = {}
        lifelong = selected = valid = recent = attended = None
        if self.use_history:
            retriever = self.retriever
            inputs = retriever.history_inputs(self, features, training)  # e.g. {"entries": HistoryEntries}
            mask = history_mask(features)
            context = RetrievalContext(features=features, queries=queries, items=items, q_t=q_t, gamma=gamma,
                                       mask=mask, model=self, training=training, target=target, **inputs)
            ranked = retriever.top_k(context, self.top_k * retriever.rerank)
            if ranked is None:
                scores, keep = retriever(context)  # [B, N, L]
                length = tf.shape(mask)[1]
                if keep is not None:  # the retriever's own subset of the real steps; every other step scores -1e9
                    keep = tf.logical_and(keep, mask[:, None, :])
                    scores = tf.where(keep, scores, tf.constant(EXCLUDED, scores.dtype))
                    keep = tf.reshape(keep, [-1, length])
                # Masked positions score -1e9, below any real score: without a keep mask, rank without a second
                # mask, then check the kept positions against the history mask ([B, N·K] lookups, not [B, N, L]).
                indices, valid = top_k_positions(tf.reshape(scores, [-1, length]), keep,
                                                 self.top_k * retriever.rerank)
                outputs["gsu_scores"] = scores
            else:  # the retriever ranked without scoring every step (no gsu_scores output)
                indices, valid = ranked
            k = tf.shape(indices)[1]
            flat_indices = tf.reshape(indices, [batch, -1])  # [B, N*K] (N*rK with re-ranking)
            valid = tf.logical_and(valid, tf.reshape(tf.gather(mask, flat_indices, batch_dims=1), [-1, k]))
            indices = tf.where(valid, indices, tf.zeros_like(indices))
            flat_indices = tf.reshape(indices, [batch, -1])

            def pick(positions):
                """History channels after G_j at positions [B, P] → [B, P, C, d]."""
                return retriever.pick(context, positions)

            picked = pick(flat_indices)  # [B, N*K, C, d]
            if retriever.rerank > 1:  # the retriever re-scores the r·K candidates and keeps the K best
                candidates = tf.reshape(picked, [batch * n, k, len(self.channels), dim])
                local, valid = retriever.refine(context, candidates, valid, self.top_k)
                indices = tf.gather(indices, local, batch_dims=1)
                picked = tf.gather(candidates, local, batch_dims=1)
                k = tf.shape(indices)[1]
            picked = tf.reshape(picked, [batch, n, k, len(self.channels), dim])
            selected = tf.reduce_sum(picked * gamma[:, :, None, :, None], axis=3)  # Σ_c γ_c x^{GSU(c)}: [B, N, K, d]
            lifelong, attended = self.esu_readout(features, target_id, q_t, selected, indices, valid, training)
            if self.recent is not None:
                recent = self.recent_readout(features, target_id, q_t, gamma, mask, pick, training)
            outputs.update(top_k=tf.reshape(indices, [batch, n, k]),
                           top_k_valid=tf.reshape(valid, [batch, n, k]))
            if training and self.aux_task is not None:
                # head^GSU = Attention(q_t, K^GSU, V^GSU), trained by the auxiliary loss: over all L pairs as the
                # retriever sees them (e.g. decoded from PQ codes), or over the K kept ones
                if self.aux_scope == "top_k":
                    readout = self.kept_readout(q_t, gamma, picked, valid)
                else:
                    readout = retriever.aux_readout(context)
                outputs["aux_logit"] = tf.squeeze(self.aux_head(tf.concat([readout, q_t], -1)), -1)
        logit = self.tower_logit(features, q_t, lifelong, selected, valid, training, target_id=target_id,
                                 extra=[recent, attended], items=items)
        outputs.update(logit=logit, probability=tf.sigmoid(logit))
        return outputs

    def kept_readout(self, q_t, gamma, picked, valid):
        """head^GSU over the kept steps only: q_t [B, N, d], γ [B, N, C], their channels after G_j
        [B, N, K, C, d] and ``valid`` [B·N, K] → [B, N, d] (``aux_scope="top_k"``)."""
        batch, n = tf.shape(q_t)[0], tf.shape(q_t)[1]
        k, channels, dim = tf.shape(picked)[2], len(self.channels), self.content.dim
        readout = self.gsu.gated_call(tf.reshape(q_t, [-1, 1, dim]), tf.reshape(picked, [-1, k, channels, dim]),
                                      tf.reshape(gamma, [-1, 1, channels]), tf.reshape(valid, [-1, k]))[0]
        return tf.reshape(readout, [batch, n, -1])

    def target_id_embedding(self, items, training=None):
        """The targets' item-id embeddings [B, N, d] (None without them), looked up once per call: the ESU query,
        the recent branch's query and the tower all read the same vectors."""
        return None if self.item_id_embedding is None else self.embed_ids(self.item_id_embedding, items, training)

    def recent_readout(self, features, target_id, q_t, gamma, mask, pick, training=None):
        """Target attention over the newest ``recent_history`` real steps: [B, N, d].

        ``mask`` [B, L] marks the real steps; ``pick(positions [B, R])`` gives their channels after G_j
        [B, R, C, d], merged with each target's γ; keys carry the steps' id and feedback embeddings, as the ESU's;
        the query is q_t (+ ``target_id`` [B, N, d]).
        """
        batch, n, dim = tf.shape(q_t)[0], tf.shape(q_t)[1], self.content.dim
        order = tf.broadcast_to(tf.cast(tf.range(tf.shape(mask)[1]), tf.float32)[None, :], tf.shape(mask))
        positions, valid = top_k_positions(order, mask, self.recent_history)  # newest first: [B, R]
        keys = tf.einsum("brcd,bnc->bnrd", pick(positions), gamma)  # Σ_c γ_c x^{GSU(c)}: [B, N, R, d]
        side = self.step_embeddings(features, positions, training)
        if side is not None:
            keys = keys + side[:, None]
        query = q_t if target_id is None else q_t + target_id
        r = tf.shape(positions)[1]
        out = self.recent(tf.reshape(query, [-1, dim]), tf.reshape(keys, [-1, r, dim]),
                          mask=tf.repeat(valid, n, axis=0), training=training)
        return tf.reshape(out, [batch, n, self.recent.output_dim])

    def embed_ids(self, table, indices, training=None):
        """``table(indices)``; in training each real id is replaced by OOV with probability ``id_dropout``, so the
        OOV row (what unseen users and items get at serving) is trained and ids cannot carry the model alone."""
        if training and self.id_dropout:
            indices = tf.cast(indices, tf.int64)
            dropped = tf.random.uniform(tf.shape(indices)) < self.id_dropout
            indices = tf.where(dropped & (indices >= len(schema.RESERVED)), tf.constant(schema.OOV_INDEX, tf.int64),
                               indices)
        return table(indices)

    def step_embeddings(self, features, positions, training=None):
        """Id + feedback embeddings of history steps: positions [B, P] into each row's history → [B, P, d], or
        None when the model has neither."""
        parts = []
        if self.item_id_embedding is not None:
            steps = tf.gather(features[schema.SEQ_HISTORY_ITEM], positions, batch_dims=1)
            parts.append(self.embed_ids(self.item_id_embedding, steps, training))
        if self.feedback_embedding is not None:
            feedback = self._history_feedback(features)
            parts.append(self.feedback_embedding(tf.gather(feedback, positions, batch_dims=1)))
        return tf.add_n(parts) if parts else None

    def _history_feedback(self, features):
        if schema.SEQ_HISTORY_FEEDBACK not in features:
            raise ValueError(f"missing feature {schema.SEQ_HISTORY_FEEDBACK!r}: this model was built with history "
                             "feedback (the dataset's metadata.num_feedback); feed the per-step feedback indices")
        return features[schema.SEQ_HISTORY_FEEDBACK]

    def esu_readout(self, features, target_id, q_t, selected, indices, valid, training=None):
        """ESU target attention over the K kept steps: (x_lifelong_seq [B, N, d], attended feedback [B, N, d] or
        None).

        Query q_t (+ the targets' item-id embeddings ``target_id`` [B, N, d]), keys/values the kept pairs
        Σ_c γ_c x^{GSU(c)} [B, N, K, d] (+ each step's item-id and feedback embeddings); ``indices`` [B·N, K] are
        the kept history positions and ``valid`` [B·N, K] which of them are real. With history feedback, the ESU's
        own attention weights (softmax of α_h, averaged over heads) also pool the kept steps' feedback embeddings:
        "how did the user rate what resembles the target", a number the tower would otherwise have to disentangle
        from the mixed values.
        """
        batch, n, k, dim = tf.shape(selected)[0], tf.shape(selected)[1], tf.shape(selected)[2], self.content.dim
        query = q_t if target_id is None else q_t + target_id
        positions = tf.reshape(indices, [batch, -1])
        side = self.step_embeddings(features, positions, training)
        if side is not None:
            selected = selected + tf.reshape(side, tf.shape(selected))
        lifelong, logits = self.esu(tf.reshape(query, [-1, dim]), tf.reshape(selected, [-1, k, dim]), mask=valid,
                                    training=training, return_scores=True)  # logits α [B·N, H, K]
        lifelong = tf.reshape(lifelong, [batch, n, self.esu.output_dim])
        if self.feedback_embedding is None:
            return lifelong, None
        weights = tf.reduce_mean(tf.nn.softmax(logits, axis=-1), axis=1) * tf.cast(valid, logits.dtype)  # [B·N, K]
        feedback = self.feedback_embedding(tf.gather(self._history_feedback(features), positions, batch_dims=1))
        attended = tf.einsum("xk,xkd->xd", weights, tf.reshape(feedback, [-1, k, dim]))
        return lifelong, tf.reshape(attended, [batch, n, dim])

    def feedback_counts(self, features, weights=None):
        """Per-row counts of each feedback token over the real history steps: [B, F] (``weights`` [B, N, L]:
        weighted per target, [B, N, F]); the feedback vocabulary F is small, so Σ_l w_l e(f_l) = counts · E."""
        feedback = tf.cast(self._history_feedback(features), tf.int32)
        real = tf.cast(history_mask(features), tf.float32)  # [B, L]
        size = self.feedback_embedding.input_dim
        if weights is None:
            slots = tf.range(tf.shape(feedback)[0])[:, None] * size + feedback
            counts = tf.math.unsorted_segment_sum(real, slots, tf.shape(feedback)[0] * size)
            return tf.reshape(counts, [-1, size])
        return tf.einsum("bnl,blf->bnf", weights * real[:, None, :], tf.one_hot(feedback, size, dtype=real.dtype))

    def feedback_table(self):
        """The feedback embedding of every token [F, d]."""
        return self.feedback_embedding(tf.range(self.feedback_embedding.input_dim))

    def history_feedback_mean(self, features):
        """Masked mean of the feedback embeddings over every real history step: [B, d] (zeros without steps),
        from the per-row feedback counts: Σ_f c_f e(f) / Σ_f c_f."""
        counts = self.feedback_counts(features)  # [B, F]
        total = tf.matmul(counts, self.feedback_table())
        return tf.math.divide_no_nan(total, tf.reduce_sum(counts, axis=1, keepdims=True))

    def set_item_statistics(self, table) -> None:
        """Loads the item-statistics table [F+1, num_items, columns] (``item_statistics_table``)."""
        if self.item_statistics is None:
            raise ValueError("this model was built without item statistics (model.item_statistics_folds = 0)")
        self.item_statistics.assign(tf.cast(table, self.item_statistics.dtype))

    def item_statistics_features(self, features, items, training=None):
        """[B, N, columns]: the targets' statistics (click log-odds, log1p count, or one of them) from the fold
        table (training) or the full row."""
        folds = self.item_statistics_folds
        items = tf.cast(items, tf.int64)
        if training and schema.CTX_USER_INDEX in features:
            row = tf.cast(features[schema.CTX_USER_INDEX], tf.int64) % folds  # [B]
        else:
            row = tf.fill(tf.shape(items)[:1], tf.constant(folds, tf.int64))
        index = tf.stack([tf.broadcast_to(row[:, None], tf.shape(items)), items], axis=-1)  # [B, N, 2]
        return tf.gather_nd(self.item_statistics, index)

    def category_match(self, features, items, column=None):
        """[B, N, L] bool: history step l's item has target n's category (attribute column ``column``, default
        ``affinity_column``); false for targets of a reserved (PAD/OOV) category. SIM hard's filter too."""
        history = self.history_categories(features, column)  # [B, L]
        return tf.equal(history[:, None, :], self.target_categories(items, column)[:, :, None])

    def history_categories(self, features, column=None):
        """Each history step's category [B, L] (attribute column ``column``, default ``affinity_column``)."""
        return tf.gather(self._categories(column), tf.cast(features[schema.SEQ_HISTORY_ITEM], tf.int32))

    def num_categories(self, column=None) -> int:
        """Size of the category vocabulary (attribute column ``column``, default ``affinity_column``)."""
        return int(self.content.attribute_vocab_sizes[self.affinity_column if column is None else column])

    def _categories(self, column=None):
        """Each item's category [num_items] (attribute column ``column``, default ``affinity_column``)."""
        return self.content.attributes[:, self.affinity_column if column is None else column]

    def target_categories(self, items, column=None):
        """The targets' categories [B, N]; -1 (no history step's category) for a reserved (PAD/OOV) category."""
        target = tf.gather(self._categories(column), tf.cast(items, tf.int32))
        return tf.where(target >= len(schema.RESERVED), target, tf.constant(-1, target.dtype))

    @staticmethod
    def category_prior(scores, mask, same):
        """GSU scores [B, N, L] with every real step outside the target's category (``same`` [B, N, L] false)
        moved below the lowest real score of its row, the same-category scores unchanged: top-K then keeps the
        target's category first and orders each group by the learned score (``mask`` [B, L]: real steps)."""

        def every_step_real():  # a serving request without padding: no masked reductions
            high = tf.reduce_max(scores, -1, keepdims=True)
            low = tf.reduce_min(scores, -1, keepdims=True)
            return tf.where(same, scores, scores - (high - low + 1.0))

        def with_padding():
            real = tf.broadcast_to(mask[:, None, :], tf.shape(scores))
            high = tf.reduce_max(tf.where(real, scores, tf.fill(tf.shape(scores), scores.dtype.min)), -1,
                                 keepdims=True)
            low = tf.reduce_min(tf.where(real, scores, tf.fill(tf.shape(scores), scores.dtype.max)), -1, keepdims=True)
            span = tf.where(high >= low, high - low + 1.0, tf.zeros_like(high))
            return tf.where(real & ~same, scores - span, scores)

        return tf.cond(tf.reduce_all(mask), every_step_real, with_padding)

    _HISTOGRAM_CATEGORIES = 4096  # category vocabularies up to this size are counted per (row, category)

    def affinity_features(self, features, items):
        """Category affinity of each target over the whole history: ([B, N, 2] share and log1p count of the real
        steps whose category equals the target's, their mean feedback embedding [B, N, d] or None). Counted once per
        (row, category[, feedback token]) and read at each target's category (per (row, target, step) for category
        vocabularies over ``_HISTOGRAM_CATEGORIES``)."""
        real = tf.cast(history_mask(features), tf.float32)  # [B, L]
        size = self.content.attribute_vocab_sizes[self.affinity_column]
        tokens = self.feedback_embedding.input_dim if self.feedback_embedding is not None else 1
        if size > self._HISTOGRAM_CATEGORIES:
            same = tf.cast(self.category_match(features, items), tf.float32) * real[:, None, :]  # [B, N, L]
            count = tf.reduce_sum(same, -1)
            counts = None if self.feedback_embedding is None else self.feedback_counts(features, same)  # [B, N, F]
        else:
            history = self.history_categories(features)  # [B, L]
            feedback = (tf.zeros_like(history) if self.feedback_embedding is None
                        else tf.cast(self._history_feedback(features), history.dtype))
            batch = tf.shape(history)[0]
            slots = (tf.range(batch, dtype=history.dtype)[:, None] * size + history) * tokens + feedback
            table = tf.reshape(tf.math.unsorted_segment_sum(real, slots, batch * size * tokens), [batch, size, tokens])
            target = self.target_categories(items)  # [B, N]
            counts = tf.gather(table, tf.maximum(target, 0), batch_dims=1)  # [B, N, F]
            counts = counts * tf.cast(target >= 0, counts.dtype)[..., None]
            count = tf.reduce_sum(counts, -1)
        share = tf.math.divide_no_nan(count, tf.reduce_sum(real, -1)[:, None])
        stats = tf.stack([share, tf.math.log1p(count) / 5.0], axis=-1)
        if self.feedback_embedding is None:
            return stats, None
        mean = tf.math.divide_no_nan(tf.einsum("bnf,fd->bnd", counts, self.feedback_table()), count[..., None])
        return stats, mean

    def tower_logit(self, features, q_t, lifelong=None, selected=None, valid=None, training=None, target_id=None,
                    extra=(), items=None):
        """ŷ = f(x_lifelong_seq, x_u2i, x_i, x_u): the CTR tower's logit [B, N].

        q_t [B, N, d] is the target (x_i); lifelong [B, N, d] the ESU output; selected [B, N, K, d] the K pairs
        the GSU kept and valid [B·N, K] which of them are real. The user-item interaction features x_u2i are
        the mean and max cosine between q_t and the kept pairs: "how much of the history matches the target",
        in a form that does not depend on memorising ids (without them the tower overfits item ids on small
        data: test AUC 0.53 vs 0.58 on the planted world in our runs).
        """
        n = tf.shape(q_t)[1]
        users = self._user_vectors(features)
        user_id = None
        if self.user_id_embedding is not None:
            user_id = self.embed_ids(self.user_id_embedding, features.get(schema.CTX_USER_INDEX, self._oov_users(q_t)),
                                     training)  # [B, d_u]
            users.append(user_id)
        if self.feedback_embedding is not None:
            users.append(self.history_feedback_mean(features))
        parts = [q_t] + [tf.repeat(v[:, None, :], n, axis=1) for v in users]
        if target_id is not None:  # [B, N, d]
            parts.append(target_id)
            if user_id is not None and user_id.shape[-1] == target_id.shape[-1]:
                parts.append(user_id[:, None, :] * target_id)
        parts += [part for part in extra if part is not None]  # [B, N, ·]: recent branch, attended feedback
        if self.item_statistics is not None and items is not None:
            parts.append(self.item_statistics_features(features, items, training))
        if self.category_affinity and self.use_history and items is not None:
            parts += [part for part in self.affinity_features(features, items) if part is not None]
        if lifelong is not None:
            valid = tf.cast(tf.reshape(valid, tf.shape(selected)[:3]), selected.dtype)
            cosine = tf.einsum("bnkd,bnd->bnk", tf.math.l2_normalize(selected, -1), tf.math.l2_normalize(q_t, -1))
            mean = tf.math.divide_no_nan(tf.reduce_sum(cosine * valid, -1), tf.reduce_sum(valid, -1))
            best = tf.reduce_max(cosine * valid - 2.0 * (1.0 - valid), -1) * tf.reduce_max(valid, -1)
            parts = [lifelong, lifelong * q_t, tf.stack([mean, best], axis=-1)] + parts
        return tf.squeeze(self.tower(tf.concat(parts, axis=-1), training=training), -1)

    @staticmethod
    def _oov_users(q_t):
        """OOV user indices [B] for inputs without ``user_index`` (scored as an unseen user)."""
        return tf.fill(tf.shape(q_t)[:1], tf.constant(schema.OOV_INDEX, tf.int64))

    def call(self, features, training=None) -> Dict[str, tf.Tensor]:
        """Row format: each row's own target against its own history; outputs without the N axis."""
        check_features(features)
        tokens = features.get(schema.TARGET_QUERY_TOKENS)
        if tokens is not None and tokens.shape.rank == 2:  # row format [B, T] -> [B, 1, T]
            features = {**features, schema.TARGET_QUERY_TOKENS: tokens[:, None, :]}
        outputs = self.score_pairs(features, features[schema.CTX_TARGET_QUERY][:, None],
                                   features[schema.CTX_TARGET_ITEM][:, None], training)
        return {name: value[:, 0] for name, value in outputs.items()}

    def score_candidates(self, features, candidate_queries, candidate_items, training=None) -> tf.Tensor:
        """Logits [B, N] of N candidate pairs per row, each scored exactly as ``call`` scores a target."""
        check_features(features)
        return self.score_pairs(features, candidate_queries, candidate_items, training)["logit"]

    def compute_loss(self, features, training=False) -> tf.Tensor:
        outputs = self(features, training=training)
        labels = features[schema.CTX_LABEL]
        loss = self.task(labels, outputs["logit"])
        if self.aux_task is not None and "aux_logit" in outputs:
            loss += self.aux_task(labels, outputs["aux_logit"])
        if self.ranking_task is not None:
            loss += self.ranking_task(labels, outputs["logit"], features[schema.CTX_USER_ID])
        return per_replica_loss(loss)


SeminarModel.__init__ = _records_arguments(SeminarModel.__init__)
