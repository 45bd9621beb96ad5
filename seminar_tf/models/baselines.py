"""The paper's baselines in SEMINAR's framework (docs/design.md §4).

Every baseline is a ``SeminarModel`` whose retrieval step (the GSU) is replaced; the content encoder, the
gate γ, G_j, the ESU attention, the tower and ``CTRTask`` are shared, so the comparison isolates retrieval:

- ``DIN``: no search; the ESU attends over the ``short_history`` newest steps.
- ``SIMHard``: steps whose item category equals the target's, newest first (SIM hard search).
- ``SIMSoft``: inner product q_t · k_l of the merged target and history embeddings, no projections.
- ``ETA``: SimHash signatures sign(x R) (fixed random hyperplanes R [d, m]); Hamming-distance top-K.
- ``TWIN``: the GSU scores with the ESU's own attention (consistency-preserving GSU).
- ``QIN``: query-first search for personalized search: relevance of each step's query and item to the
  target *query* (QIN's relevance search unit); rows without a query fall back to SIM soft search.

Each keeps the K best steps per target (``top_k_positions``: best first, ties to the older step) and the
ESU attends exactly over them. Baselines train without the GSU auxiliary loss: their GSUs have no
parameters of their own (TWIN's are the ESU's, trained by the CTR loss).

SEMINAR with the EM3 options is ``seminar_tf.models.em3``.
"""

from __future__ import annotations

from typing import Dict, Optional

import tensorflow as tf

from seminar_tf import schema
from seminar_tf.config import ARCHITECTURES, ModelConfig
from seminar_tf.data.reader import ItemTable, QueryTable
from seminar_tf.layers import top_k_positions
from seminar_tf.models import seminar_builders
from seminar_tf.models.seminar_builders import given, seminar_arguments
from seminar_tf.models.content import ContentEncoder
from seminar_tf.models.psu import item_gamma
from seminar_tf.models.seminar import SeminarModel

BASELINES = tuple(a for a in ARCHITECTURES if a != "seminar")  # the config's architectures list them all
MODELS = BASELINES + ("seminar",)
DEFAULT_CATEGORY_ATTRIBUTE = "category_id"
_EXCLUDED = -1e9  # score of steps a GSU does not keep (as SeminarModel.gsu_scores masks padding)


class RetrievalBaseline(SeminarModel):
    """A ``SeminarModel`` with a pluggable GSU: subclasses implement ``retrieve``.

    ``retrieve`` returns scores [B, N, L] and a keep mask [B, N, L] per target (SIM hard search keeps a
    different subset of steps for each target); the K best kept steps go to the shared ESU.
    ``call`` adds ``top_k_valid`` [B, K] (False at slots past the kept steps) to SEMINAR's outputs.
    """

    def __init__(self, content: ContentEncoder, **kwargs):
        kwargs.setdefault("aux_weight", 0.0)
        if kwargs.get("gsu", "exact") != "exact":
            raise ValueError(f"{type(self).__name__} has its own GSU; gsu must be 'exact', got {kwargs['gsu']!r}")
        super().__init__(content, **kwargs)
        if self.aux_task is None:
            self.aux_head = None  # unused: keeps "no gradient" warnings and dead weights out of training
        self.pq = None  # SEMINAR's PQ codebooks score with SEMINAR's GSU, which baselines replace

    def retrieve(self, features, queries, items, q_t, gamma, history, mask):
        """Returns (scores float [B, N, L], keep bool [B, N, L]); ``mask`` [B, L] is applied afterwards.

        queries, items: target indices [B, N]; q_t [B, N, d] and γ [B, N, C] from ``encode_targets``;
        history [B, L, C, d] from ``encode_history``.
        """
        raise NotImplementedError

    @staticmethod
    def _positions(history, n):
        """Recency scores [B, N, L]: the step's position (newest = largest; histories are oldest first)."""
        length = tf.shape(history)[1]
        positions = tf.cast(tf.range(length), history.dtype)
        return tf.broadcast_to(positions[None, None, :], [tf.shape(history)[0], n, length])

    @staticmethod
    def _for_every_target(mask, n):
        return tf.repeat(mask[:, None, :], n, axis=1)

    def score_pairs(self, features, queries, items, training=None) -> Dict[str, tf.Tensor]:
        """As ``SeminarModel.score_pairs`` with this model's GSU: outputs [B, N, ...]."""
        if not self.use_history:
            return super().score_pairs(features, queries, items, training)
        q_t, gamma = self.encode_targets(queries, items, training, features.get(schema.TARGET_QUERY_TOKENS))
        batch, n = tf.shape(q_t)[0], tf.shape(q_t)[1]
        dim = self.content.dim
        history, mask = self.encode_history(features, training)
        length = tf.shape(history)[1]
        scores, keep = self.retrieve(features, queries, items, q_t, gamma, history, mask)
        keep = tf.logical_and(keep, mask[:, None, :])
        scores = tf.where(keep, scores, tf.constant(_EXCLUDED, scores.dtype))
        indices, valid = top_k_positions(tf.reshape(scores, [-1, length]), tf.reshape(keep, [-1, length]),
                                         self.top_k)
        k = tf.shape(indices)[1]
        picked = tf.gather(history, tf.reshape(indices, [batch, -1]), batch_dims=1)  # [B, N*K, C, d]
        picked = tf.reshape(picked, [batch, n, k, len(self.channels), dim])
        selected = tf.einsum("bnkcd,bnc->bnkd", picked, gamma)
        target_id = self.target_id_embedding(items, training)
        lifelong, attended = self.esu_readout(features, target_id, q_t, selected, indices, valid, training)
        recent = (self.recent_readout(features, target_id, q_t, gamma, mask,
                                      lambda positions: tf.gather(history, positions, batch_dims=1), training)
                  if self.recent is not None else None)
        outputs = {"gsu_scores": scores, "top_k": tf.reshape(indices, [batch, n, k]),
                   "top_k_valid": tf.reshape(valid, [batch, n, k])}
        if training and self.aux_task is not None:
            readout, _ = self.gsu.gated_call(q_t, history, gamma, mask, training=training)
            outputs["aux_logit"] = tf.squeeze(self.aux_head(tf.concat([readout, q_t], -1)), -1)
        logit = self.tower_logit(features, q_t, lifelong, selected, valid, training, target_id=target_id,
                                 extra=[recent, attended], items=items)
        outputs.update(logit=logit, probability=tf.sigmoid(logit))
        return outputs


class DIN(RetrievalBaseline):
    """DIN (Zhou et al. 2018): target attention over the ``short_history`` newest steps only, no GSU.

    Example: ``DIN(content, short_history=50, num_heads=2)``.
    """

    def __init__(self, content: ContentEncoder, short_history: int = 50, **kwargs):
        kwargs["recent_history"] = 0  # DIN's attention already is the recent-behaviour branch
        super().__init__(content, top_k=int(short_history), **kwargs)
        self.short_history = int(short_history)

    def retrieve(self, features, queries, items, q_t, gamma, history, mask):
        n = tf.shape(q_t)[1]
        return self._positions(history, n), self._for_every_target(mask, n)


class SIMHard(RetrievalBaseline):
    """SIM hard search (Pi et al. 2020): the K newest steps whose item category equals the target item's.

    ``category_column``: column of ``content.attributes`` (the item table's attribute ids) holding the
    category; column 0 is the item id. Targets of a reserved category (PAD/OOV) keep no step.

    Example: ``SIMHard(content, category_column=2, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, category_column: int, **kwargs):
        columns = len(content.attribute_vocab_sizes)
        if not 0 < int(category_column) < columns:
            raise ValueError(f"category_column must be in [1, {columns}) (column 0 is the item id), "
                             f"got {category_column}")
        super().__init__(content, **kwargs)
        self.category_column = int(category_column)

    def retrieve(self, features, queries, items, q_t, gamma, history, mask):
        n = tf.shape(q_t)[1]
        return self._positions(history, n), self.category_match(features, items, self.category_column)


class SIMSoft(RetrievalBaseline):
    """SIM soft search: score_l = q_t · k_l = Σ_j γ_j q_t · x_l^(j) (inner product, no projections).

    Example: ``SIMSoft(content, top_k=50)``.
    """

    def retrieve(self, features, queries, items, q_t, gamma, history, mask):
        per_channel = tf.einsum("bljd,bnd->bnlj", history, q_t)
        return tf.einsum("bnlj,bnj->bnl", per_channel, gamma), self._for_every_target(mask, tf.shape(q_t)[1])


class ETA(RetrievalBaseline):
    """ETA (Chen et al. 2021): SimHash signatures s(x) = [x R > 0] ∈ {0,1}^m with fixed random hyperplanes
    R [d, m]; score_l = -Hamming(s(q_t), s(k_l)), k_l = Σ_j γ_j x_l^(j); ties go to the older step.

    R is a non-trainable variable (saved with the model), drawn from N(0, 1) with ``hash_seed``.

    Example: ``ETA(content, num_bits=32, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, num_bits: int = 32, hash_seed: int = 0, **kwargs):
        super().__init__(content, **kwargs)
        self.num_bits = int(num_bits)
        self.hyperplanes = self.add_weight(
            name="simhash_hyperplanes", shape=[content.dim, self.num_bits], trainable=False,
            initializer=tf.keras.initializers.RandomNormal(stddev=1.0, seed=hash_seed))

    def signatures(self, vectors):
        """SimHash bits bool [..., m] of vectors [..., d]."""
        return tf.einsum("...d,dm->...m", vectors, self.hyperplanes) > 0

    def retrieve(self, features, queries, items, q_t, gamma, history, mask):
        target_bits = self.signatures(q_t)  # [B, N, m]
        # x R is linear, so the merged keys' projections are Σ_j γ_j (x_l^(j) R): no [B, N, L, d] tensor.
        projected = tf.einsum("bljd,dm->bljm", history, self.hyperplanes)
        history_bits = tf.einsum("bljm,bnj->bnlm", projected, gamma) > 0
        distance = tf.reduce_sum(tf.cast(tf.not_equal(target_bits[:, :, None, :], history_bits), q_t.dtype), -1)
        return -distance, self._for_every_target(mask, tf.shape(q_t)[1])


class TWIN(RetrievalBaseline):
    """TWIN (Chang et al. 2023): the GSU scores all L steps with the ESU's own attention parameters,
    score_l = (1/H) Σ_h α_h^{ESU}(q_t, k_l), so GSU and ESU rank steps consistently.

    Example: ``TWIN(content, num_heads=2, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, **kwargs):
        super().__init__(content, **kwargs)
        self.gsu = self.esu  # one attention: SeminarModel.gsu_scores (and the auxiliary read-out) use the ESU

    def retrieve(self, features, queries, items, q_t, gamma, history, mask):
        return self.gsu_scores(q_t, gamma, history, mask), self._for_every_target(mask, tf.shape(q_t)[1])


class QIN(RetrievalBaseline):
    """QIN-style query-first search for personalized search ranking (Guo et al. 2023, relevance search unit).

    The probe is the target's query channel e_q = x_t^{GSU(query)}; score_l = e_q · x_l^{query} +
    e_q · Σ_{m∈items} γ̃_m x_l^{(m)} (γ̃: γ renormalised over the item channels), so steps are ranked by how
    their query and their item relate to the target query, whatever the target item. A target without a
    query (browsing, e_q = 0) is ranked by SIM soft search, q_t · k_l. Needs the query channel.

    Example: ``QIN(content, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, **kwargs):
        if schema.QUERY_CHANNEL not in content.channels:
            raise ValueError(f"QIN needs the {schema.QUERY_CHANNEL!r} channel; the model has {content.channels}")
        super().__init__(content, **kwargs)
        self.query_channel = self.channels.index(schema.QUERY_CHANNEL)

    def target_query(self, queries, query_tokens=None, training=None):
        """e_q = x_t^{PSU(query)} G_query [B, N, d] of target queries [B, N] (or their tokens)."""
        encoded = (self.content.encode_query_tokens(query_tokens, training=training) if query_tokens is not None
                   else self.content.encode_queries(queries, training=training))
        return tf.einsum("bnd,de->bne", encoded, self.projection.kernel[self.query_channel])

    def retrieve(self, features, queries, items, q_t, gamma, history, mask):
        probe = self.target_query(queries, features.get(schema.TARGET_QUERY_TOKENS))
        query_weight = tf.one_hot(self.query_channel, len(self.channels), dtype=gamma.dtype)
        weights = item_gamma(gamma, self.channels) + query_weight  # [B, N, C]
        by_query = tf.einsum("bnlj,bnj->bnl", tf.einsum("bljd,bnd->bnlj", history, probe), weights)
        by_target = tf.einsum("bnlj,bnj->bnl", tf.einsum("bljd,bnd->bnlj", history, q_t), gamma)
        has_query = tf.reduce_any(tf.not_equal(probe, 0), axis=-1)  # [B, N]
        scores = tf.where(has_query[:, :, None], by_query, by_target)
        return scores, self._for_every_target(mask, tf.shape(q_t)[1])


# ----------------------------------------------------------------------------------------------------------
# Builders (configs meet the classes here, as in ``builders``)
def category_column(metadata: schema.DatasetMetadata, attribute: str = DEFAULT_CATEGORY_ATTRIBUTE) -> int:
    """Column of the item attribute ``attribute`` in the item table / ``ContentEncoder.attributes``."""
    return seminar_builders.attribute_column(metadata, attribute)


def build_baseline(
    name: str,
    model_config: ModelConfig,
    metadata: schema.DatasetMetadata,
    item_table: Optional[ItemTable] = None,
    query_table: Optional[QueryTable] = None,
    *,
    short_history: Optional[int] = None,
    category_attribute: Optional[str] = None,
    simhash_bits: Optional[int] = None,
) -> SeminarModel:
    """``name`` in ``MODELS`` → an uncompiled model; "seminar" is ``seminar_builders.build_seminar``.

    Baseline options: an explicit argument, else the ``ModelConfig`` field of the same name:
    ``short_history`` (DIN; 0 = ``top_k``), ``category_attribute`` (SIM hard), ``simhash_bits`` (ETA). The baselines share the content encoder (so ``--init-from``
    restores PSU weights into ``model.content`` for them too), heads, K, tower and freezing switches.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    if name == "seminar":
        return seminar_builders.build_seminar(model_config, metadata, item_table, query_table)
    content = seminar_builders.build_content_encoder(model_config, metadata, item_table, query_table)
    arguments = seminar_arguments(model_config, metadata)
    if name == "din":
        arguments.pop("top_k")
        return DIN(content, short_history=given(short_history, model_config.short_history) or model_config.top_k,
                   **arguments)
    if name == "sim_hard":
        attribute = given(category_attribute, model_config.category_attribute)
        return SIMHard(content, category_column=category_column(metadata, attribute), **arguments)
    if name == "eta":
        return ETA(content, num_bits=given(simhash_bits, model_config.simhash_bits),
                   hash_seed=model_config.seed, **arguments)
    classes = {"sim_soft": SIMSoft, "twin": TWIN, "qin": QIN}
    return classes[name](content, **arguments)


__all__ = ["BASELINES", "DIN", "ETA", "MODELS", "QIN", "RetrievalBaseline", "SIMHard", "SIMSoft", "TWIN",
           "build_baseline", "category_column"]
