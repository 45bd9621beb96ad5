"""The paper's baselines in SEMINAR's framework (docs/design.md §4).

Every baseline is a ``SeminarModel`` whose retrieval step (the GSU) is its own ``Retriever``
(``seminar_tf.models.retrievers``); the content encoder, the gate γ, G_j, the ESU attention, the tower and
``CTRTask`` are shared, so the comparison isolates retrieval:

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

import dataclasses
from typing import Optional

import tensorflow as tf

from seminar_tf import schema
from seminar_tf.config import ARCHITECTURES, ModelConfig
from seminar_tf.data.reader import ItemTable, QueryTable
from seminar_tf.models import seminar_builders
from seminar_tf.models.content import ContentEncoder
from seminar_tf.models.retrievers import (DINRetriever, ETARetriever, QINRetriever, Retriever, SIMHardRetriever,
                                          SIMSoftRetriever, TWINRetriever, build_retriever)
from seminar_tf.models.seminar import SeminarModel
from seminar_tf.models.seminar_builders import given, seminar_arguments

BASELINES = tuple(a for a in ARCHITECTURES if a != "seminar")  # the config's architectures list them all
MODELS = BASELINES + ("seminar",)
DEFAULT_CATEGORY_ATTRIBUTE = "category_id"


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class RetrievalBaseline(SeminarModel):
    """A ``SeminarModel`` whose retrieval step is a baseline's ``Retriever`` (``seminar_tf.models.retrievers``).

    The retriever returns scores [B, N, L] and a keep mask [B, N, L] per target (SIM hard search keeps a
    different subset of steps for each target); ``SeminarModel.score_pairs`` sends the K best kept steps to the
    shared ESU (``top_k_valid`` [B, N, K] is False at slots past the kept steps).
    """

    def __init__(self, content: ContentEncoder, retriever: Retriever, **kwargs):
        kwargs.setdefault("aux_weight", 0.0)
        if kwargs.get("gsu", "exact") != "exact":
            raise ValueError(f"{type(self).__name__} has its own GSU; gsu must be 'exact', got {kwargs['gsu']!r}")
        super().__init__(content, retriever=retriever, **kwargs)
        if self.aux_task is None:
            self.aux_head = None  # unused: keeps "no gradient" warnings and dead weights out of training
        self.pq = None  # SEMINAR's PQ codebooks score with SEMINAR's GSU, which baselines replace


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class DIN(RetrievalBaseline):
    """DIN (Zhou et al. 2018): target attention over the ``short_history`` newest steps only, no GSU
    (``DINRetriever``).

    Example: ``DIN(content, short_history=50, num_heads=2)``.
    """

    def __init__(self, content: ContentEncoder, short_history: int = 50, retriever: Optional[Retriever] = None,
                 **kwargs):
        kwargs["recent_history"] = 0  # DIN's attention already is the recent-behaviour branch
        super().__init__(content, retriever or DINRetriever(name="retriever"), top_k=int(short_history), **kwargs)
        self.short_history = int(short_history)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class SIMHard(RetrievalBaseline):
    """SIM hard search (Pi et al. 2020): the K newest steps whose item category equals the target item's
    (``SIMHardRetriever``).

    ``category_column``: column of ``content.attributes`` (the item table's attribute ids) holding the
    category; column 0 is the item id. Targets of a reserved category (PAD/OOV) keep no step.

    Example: ``SIMHard(content, category_column=2, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, category_column: int, retriever: Optional[Retriever] = None,
                 **kwargs):
        columns = len(content.attribute_vocab_sizes)
        if not 0 < int(category_column) < columns:
            raise ValueError(f"category_column must be in [1, {columns}) (column 0 is the item id), "
                             f"got {category_column}")
        super().__init__(content, retriever or SIMHardRetriever(category_column, name="retriever"), **kwargs)

    @property
    def category_column(self) -> int:
        return self.retriever.category_column


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class SIMSoft(RetrievalBaseline):
    """SIM soft search: score_l = q_t · k_l = Σ_j γ_j q_t · x_l^(j) (inner product, no projections;
    ``SIMSoftRetriever``).

    Example: ``SIMSoft(content, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, retriever: Optional[Retriever] = None, **kwargs):
        super().__init__(content, retriever or SIMSoftRetriever(name="retriever"), **kwargs)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class ETA(RetrievalBaseline):
    """ETA (Chen et al. 2021): SimHash signatures s(x) = [x R > 0] ∈ {0,1}^m with fixed random hyperplanes
    R [d, m]; score_l = -Hamming(s(q_t), s(k_l)), k_l = Σ_j γ_j x_l^(j); ties go to the older step
    (``ETARetriever``).

    R is a non-trainable variable of the retriever (saved with the model), drawn from N(0, 1) with ``hash_seed``.

    Example: ``ETA(content, num_bits=32, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, num_bits: int = 32, hash_seed: int = 0,
                 retriever: Optional[Retriever] = None, **kwargs):
        super().__init__(content, retriever or ETARetriever(num_bits, content.dim, hash_seed, name="retriever"),
                         **kwargs)

    @property
    def num_bits(self) -> int:
        return self.retriever.num_bits

    @property
    def hyperplanes(self) -> tf.Variable:
        return self.retriever.hyperplanes

    def signatures(self, vectors):
        """SimHash bits bool [..., m] of vectors [..., d]."""
        return self.retriever.signatures(vectors)


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class TWIN(RetrievalBaseline):
    """TWIN (Chang et al. 2023): the GSU scores all L steps with the ESU's own attention parameters,
    score_l = (1/H) Σ_h α_h^{ESU}(q_t, k_l), so GSU and ESU rank steps consistently (``TWINRetriever``).

    Example: ``TWIN(content, num_heads=2, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, retriever: Optional[Retriever] = None, **kwargs):
        super().__init__(content, retriever or TWINRetriever(name="retriever"), **kwargs)
        self.gsu = self.esu  # one attention: the auxiliary read-out (with aux_weight) uses the ESU too


@tf.keras.utils.register_keras_serializable(package="seminar_tf")
class QIN(RetrievalBaseline):
    """QIN-style query-first search for personalized search ranking (Guo et al. 2023, relevance search unit;
    ``QINRetriever``).

    The probe is the target's query channel e_q = x_t^{GSU(query)}; score_l = e_q · x_l^{query} +
    e_q · Σ_{m∈items} γ̃_m x_l^{(m)} (γ̃: γ renormalised over the item channels), so steps are ranked by how
    their query and their item relate to the target query, whatever the target item. A target without a
    query (browsing, e_q = 0) is ranked by SIM soft search, q_t · k_l. Needs the query channel.

    Example: ``QIN(content, top_k=50)``.
    """

    def __init__(self, content: ContentEncoder, retriever: Optional[Retriever] = None, **kwargs):
        if schema.QUERY_CHANNEL not in content.channels:
            raise ValueError(f"QIN needs the {schema.QUERY_CHANNEL!r} channel; the model has {content.channels}")
        super().__init__(content, retriever or QINRetriever(name="retriever"), **kwargs)
        self.query_channel = self.channels.index(schema.QUERY_CHANNEL)

    def target_query(self, queries, query_tokens=None, training=None):
        """e_q = x_t^{PSU(query)} G_query [B, N, d] of target queries [B, N] (or their tokens)."""
        return QINRetriever.target_query(self, queries, query_tokens, training)


MODEL_CLASSES = {"din": DIN, "sim_hard": SIMHard, "sim_soft": SIMSoft, "eta": ETA, "twin": TWIN, "qin": QIN}


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
    ``short_history`` (DIN; 0 = ``top_k``), ``category_attribute`` (SIM hard), ``simhash_bits`` (ETA); the
    retriever comes from ``retrievers.build_retriever`` (the architecture → retriever registry). The baselines
    share the content encoder (so ``--init-from`` restores PSU weights into ``model.content`` for them too),
    heads, K, tower and freezing switches.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    if name == "seminar":
        return seminar_builders.build_seminar(model_config, metadata, item_table, query_table)
    content = seminar_builders.build_content_encoder(model_config, metadata, item_table, query_table)
    arguments = seminar_arguments(model_config, metadata)
    config = dataclasses.replace(
        model_config, short_history=given(short_history, model_config.short_history),
        category_attribute=given(category_attribute, model_config.category_attribute),
        simhash_bits=given(simhash_bits, model_config.simhash_bits))
    column = category_column(metadata, config.category_attribute) if name == "sim_hard" else 0
    retriever = build_retriever(name, config, category_column=column)  # the registry: architecture → retriever
    if name == "din":
        arguments.pop("top_k")
        return DIN(content, short_history=config.short_history or model_config.top_k, retriever=retriever,
                   **arguments)
    if name == "sim_hard":
        return SIMHard(content, category_column=column, retriever=retriever, **arguments)
    return MODEL_CLASSES[name](content, retriever=retriever, **arguments)


__all__ = ["BASELINES", "DIN", "ETA", "MODELS", "MODEL_CLASSES", "QIN", "RetrievalBaseline", "SIMHard", "SIMSoft",
           "TWIN", "build_baseline", "category_column"]
