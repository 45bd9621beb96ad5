"""Channel gate of SEMINAR: x = Σ_m γ_m x^(m), γ = softmax(gating network) ∈ R^{M+1}, Σ_m γ_m = 1.

The gate is computed from the target pair's channels and applied to the target and to every history
position with the same γ, so the attention score stays linear in each history channel:
score_l = Σ_j γ_j u_j · x_l^(j), which the product-quantization path (docs/design.md §5) relies on.
"""

from __future__ import annotations

import tensorflow as tf

_PACKAGE = "seminar_tf"
GATE_MODES = ("dynamic", "static")


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class ChannelGate(tf.keras.layers.Layer):
    """Channel weights γ = softmax(gating network) over the M+1 channels (paper: x = Σ_m γ_m x^(m)).

    Modes:
    - ``"dynamic"``: γ = softmax(Dense(C)(relu(Dense(hidden_units)(flatten(target_channels))))), so each
      target pair weighs its channels; ``hidden_units=0`` makes the network a single linear layer.
    - ``"static"``: γ = softmax(w), one learned logit per channel, independent of the input (the input
      only gives the batch size).

    Absent channels (``channel_mask`` False) get γ = 0 and the rest still sum to 1; their embeddings are
    zeroed before the gating network, so their contents never matter. If every channel of a row is absent
    the row's γ is all zeros.

    Inputs: target_channels [B, C, d]; channel_mask optional bool [C] or [B, C]. Output: γ [B, C].

    Example:

    ```python
    gate = ChannelGate(num_channels=4)
    target = tf.random.normal([8, 4, 32])                 # [B, C, d]
    gamma = gate(target, channel_mask=[True, True, False, True])  # [8, 4], gamma[:, 2] == 0
    merged_target = merge_channels(target, gamma)          # [8, 32]
    merged_history = merge_channels(history, gamma)        # history [8, L, 4, 32] → [8, L, 32]
    ```
    """

    def __init__(self, num_channels: int, hidden_units: int = 64, mode: str = "dynamic", **kwargs):
        super().__init__(**kwargs)
        if mode not in GATE_MODES:
            raise ValueError(f"ChannelGate mode must be one of {GATE_MODES}, got {mode!r}")
        self.num_channels = int(num_channels)
        self.hidden_units = int(hidden_units)
        self.mode = mode
        if mode == "dynamic":
            self.hidden = (
                tf.keras.layers.Dense(self.hidden_units, activation="relu", name="hidden")
                if self.hidden_units > 0
                else None
            )
            self.logits_layer = tf.keras.layers.Dense(self.num_channels, name="logits")

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        if input_shape.rank != 3 or input_shape[1] != self.num_channels or input_shape[2] is None:
            raise ValueError(
                f"ChannelGate expects target_channels [B, {self.num_channels}, d] with d known, got {input_shape}"
            )
        self.channel_dim = int(input_shape[2])
        if self.mode == "static":
            self.static_logits = self.add_weight(
                "static_logits", shape=[self.num_channels], initializer="zeros", trainable=True
            )
        super().build(input_shape)

    def call(self, target_channels, channel_mask=None):
        target_channels = tf.cast(target_channels, self.compute_dtype)
        batch_size = tf.shape(target_channels)[0]
        if channel_mask is not None:
            channel_mask = tf.cast(channel_mask, tf.bool)
            channel_mask = tf.broadcast_to(channel_mask, [batch_size, self.num_channels])
        if self.mode == "static":
            logits = tf.cast(self.static_logits, self.compute_dtype)
            logits = tf.broadcast_to(logits, [batch_size, self.num_channels])
        else:
            features = target_channels
            if channel_mask is not None:
                features = features * tf.cast(channel_mask, features.dtype)[..., None]
            features = tf.reshape(features, [batch_size, self.num_channels * self.channel_dim])
            if self.hidden is not None:
                features = self.hidden(features)
            logits = self.logits_layer(features)
        if channel_mask is None:
            return tf.nn.softmax(logits, axis=-1)
        logits = tf.where(channel_mask, logits, logits.dtype.min / 2)
        gamma = tf.nn.softmax(logits, axis=-1)
        # A row with every channel absent has a uniform softmax; zeroing it gives γ = 0 there.
        return tf.where(channel_mask, gamma, tf.zeros_like(gamma))

    def get_config(self):
        config = super().get_config()
        config.update(num_channels=self.num_channels, hidden_units=self.hidden_units, mode=self.mode)
        return config


def merge_channels(channel_embeddings, gamma):
    """Σ_m γ_m x^(m): merges the channel axis with the target's gate.

    channel_embeddings: [B, ..., C, d] (the target [B, C, d], or history [B, L, C, d], or more axes);
    gamma: [B, C] (or [C]), broadcast over the axes between B and C. Returns [B, ..., d].

    Example:

    ```python
    keys = merge_channels(history_channels, gamma)  # [B, L, C, d], [B, C] → [B, L, d]
    ```
    """
    channel_embeddings = tf.convert_to_tensor(channel_embeddings)
    gamma = tf.cast(gamma, channel_embeddings.dtype)
    rank = channel_embeddings.shape.rank
    if rank is None or rank < 2:
        raise ValueError(
            f"merge_channels expects channel_embeddings [B, ..., C, d], got {channel_embeddings.shape}"
        )
    if gamma.shape.rank == 2:
        middle_axes = rank - 3
        if middle_axes < 0:
            raise ValueError(
                "merge_channels: gamma [B, C] needs channel_embeddings [B, ..., C, d], "
                f"got {channel_embeddings.shape}"
            )
        for _ in range(middle_axes):
            gamma = tf.expand_dims(gamma, axis=1)  # [B, 1, ..., 1, C]
    elif gamma.shape.rank != 1:
        raise ValueError(f"merge_channels expects gamma [B, C] or [C], got {gamma.shape}")
    return tf.reduce_sum(channel_embeddings * gamma[..., None], axis=-2)
