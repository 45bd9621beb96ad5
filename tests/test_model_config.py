"""Every model round-trips get_config / from_config (the same architecture; weights from a checkpoint)."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from seminar_tf.config import ARCHITECTURES
from seminar_tf.models import builders

import model_fixtures
from model_fixtures import CONFIG, METADATA, tables

TABLES = tables()
VARIANTS = [(a, {}) for a in ARCHITECTURES] + [
    ("seminar", {"gsu_category_prior": True, "category_affinity": True, "recent_history": 4}),
    ("seminar", {"fusion_queries": 2}), ("seminar", {"content_id_weight": 0.1}), ("seminar", {"use_history": False}),
]


@pytest.mark.parametrize("architecture,changes", VARIANTS,
                         ids=[f"{a}{'-' + '-'.join(c) if c else ''}" for a, c in VARIANTS])
def test_model_round_trips_get_config(architecture, changes):
    config = dataclasses.replace(CONFIG, architecture=architecture, **changes)
    tf.keras.utils.set_random_seed(0)
    model = builders.build_model(config, METADATA, *TABLES)
    batch = model_fixtures.batch()
    want = model(batch)["probability"].numpy()

    saved = json.loads(json.dumps(model.get_config()))  # JSON-ready, as a saved spec
    clone = type(model).from_config(saved)
    clone(batch)
    assert type(clone) is type(model) and json.loads(json.dumps(clone.get_config())) == saved
    assert [v.shape for v in clone.weights] == [v.shape for v in model.weights]
    clone.set_weights(model.get_weights())  # tables included: they are weights
    np.testing.assert_allclose(clone(batch)["probability"].numpy(), want, rtol=1e-6, atol=1e-7)
    assert tf.keras.utils.get_registered_object(f"seminar_tf>{type(model).__name__}") is type(model)
