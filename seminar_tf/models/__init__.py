"""SEMINAR models: the shared content encoder, the PSU pretraining model, the CTR/PSR model and its retrievers.

``builders`` is where configs meet these classes (the architecture → retriever registry: ``retrievers``).
"""

from seminar_tf.models.content import ContentEncoder
from seminar_tf.models.psu import PSUModel
from seminar_tf.models.retrievers import RetrievalContext, Retriever
from seminar_tf.models.seminar import ChannelProjection, SeminarModel

__all__ = ["ChannelProjection", "ContentEncoder", "PSUModel", "RetrievalContext", "Retriever", "SeminarModel"]
