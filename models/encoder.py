"""The project's slice encoder: a small CNN trained self-supervised (SimCLR-style contrastive).

It embeds slices for the privacy index and is the feature extractor of the quality gates. Pure
model code: builders and a train step; data, files and loops live in ``pipeline.encoder``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import tensorflow as tf
from keras import layers, ops


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the encoder."""

    size: int = 64  # input side (slices are resized to it)
    width: int = 24  # channels of the first block, doubled per block
    depth: int = 4  # stride-2 blocks: 64 → 4×4 feature map
    dim: int = 128  # embedding length
    temperature: float = 0.1
    learning_rate: float = 1e-3

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


def build_encoder(cfg: EncoderConfig) -> keras.Model:
    """(size, size, 1) in [0, 1] → unit-length (dim,) embedding.

    Stride-2 conv blocks keep a coarse spatial map that is flattened (not pooled away), so the
    embedding still knows where structures are; invariance to small moves comes from training.
    """
    inputs = keras.Input((cfg.size, cfg.size, 1), name="slice")
    x = inputs
    for i in range(cfg.depth):
        ch = cfg.width * 2**i
        x = layers.Conv2D(ch, 3, strides=2, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"conv{i}b")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(cfg.dim, name="embed")(x)
    outputs = layers.UnitNormalization(name="unit")(x)
    return keras.Model(inputs, outputs, name="slice_encoder")


def build_projection(cfg: EncoderConfig) -> keras.Model:
    """The projection head used only while training (SimCLR's g(·))."""
    inputs = keras.Input((cfg.dim,))
    x = layers.Dense(cfg.dim, activation="relu")(inputs)
    x = layers.Dense(cfg.dim)(x)
    return keras.Model(inputs, layers.UnitNormalization()(x), name="projection")


def nt_xent(z1: tf.Tensor, z2: tf.Tensor, temperature: float) -> tf.Tensor:
    """Normalised-temperature cross entropy over the 2N views (Chen et al. 2020)."""
    z = ops.concatenate([z1, z2], axis=0)
    n = ops.shape(z1)[0]
    logits = ops.matmul(z, ops.transpose(z)) / temperature
    logits = logits - 1e9 * ops.eye(2 * n)  # a view is not its own positive
    targets = ops.concatenate([ops.arange(n, 2 * n), ops.arange(0, n)], axis=0)
    loss = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    return ops.mean(loss)


class ContrastiveTrainer:
    """Holds encoder, projection head and optimizer; ``step`` is one compiled update."""

    def __init__(self, cfg: EncoderConfig, seed: int = 0) -> None:
        keras.utils.set_random_seed(seed)
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.projection = build_projection(cfg)
        self.optimizer = keras.optimizers.Adam(cfg.learning_rate)
        self._variables = self.encoder.trainable_variables + self.projection.trainable_variables

    @tf.function(reduce_retracing=True)
    def step(self, view1: tf.Tensor, view2: tf.Tensor) -> tf.Tensor:
        """One update on two augmented views of the same batch; returns the loss."""
        with tf.GradientTape() as tape:
            z1 = self.projection(self.encoder(view1, training=True), training=True)
            z2 = self.projection(self.encoder(view2, training=True), training=True)
            loss = nt_xent(z1, z2, self.cfg.temperature)
        grads = tape.gradient(loss, self._variables)
        self.optimizer.apply_gradients(zip(grads, self._variables, strict=True))
        return loss
