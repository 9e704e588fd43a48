"""A small 2-D U-Net segmenter: the yardstick of the release's usefulness (train on synthetic,
test on real). Pure model code; built from a frozen config, never from downloaded weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np
from keras import layers


@dataclass(frozen=True)
class SegmenterConfig:
    """Shape and training budget of the segmenter (the same for every arm it is trained in)."""

    size: int = 64
    classes: int = 8  # background + structures
    width: int = 16  # channels of the first level, doubled per level
    depth: int = 3  # stride-2 levels
    steps: int = 300
    batch: int = 16
    learning_rate: float = 2e-3

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def build_segmenter(cfg: SegmenterConfig) -> keras.Model:
    """(size, size, 1) image in [0, 1] → (size, size, classes) softmax: two 3×3 convs (ReLU) per
    level, max-pool down, transposed conv up with skip connections."""
    inputs = keras.Input((cfg.size, cfg.size, 1), name="image")
    x, skips = inputs, []
    for level in range(cfg.depth):
        x = _block(x, cfg.width * 2**level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(name=f"pool{level}")(x)
    x = _block(x, cfg.width * 2**cfg.depth, "bottom")
    for level in reversed(range(cfg.depth)):
        x = layers.Conv2DTranspose(
            cfg.width * 2**level, 2, strides=2, padding="same", name=f"up{level}"
        )(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _block(x, cfg.width * 2**level, f"up{level}_block")
    outputs = layers.Conv2D(cfg.classes, 1, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="segmenter")


def _block(x: Any, filters: int, name: str) -> Any:
    # no batch norm: after a few hundred steps its moving averages are still far from the batch
    # statistics, and inference collapses to "all background" (measured on the demo)
    for i in range(2):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv{i}")(x)
    return x


def dice_ce_loss(classes: int) -> Any:
    """Cross-entropy plus (1 − mean soft Dice over the structures): small structures weigh as
    much as large ones, so a short budget does not settle for "all background"."""
    from keras import ops

    ce = keras.losses.SparseCategoricalCrossentropy()

    def loss(y_true: Any, y_pred: Any) -> Any:
        onehot = ops.one_hot(
            ops.cast(ops.reshape(y_true, ops.shape(y_pred)[:-1]), "int32"), classes
        )
        inter = ops.sum(onehot * y_pred, axis=(0, 1, 2))
        total = ops.sum(onehot + y_pred, axis=(0, 1, 2))
        soft_dice = (2.0 * inter + 1.0) / (total + 1.0)
        return ce(y_true, y_pred) + 1.0 - ops.mean(soft_dice[1:])

    return loss


def train_segmenter(
    images: np.ndarray, masks: np.ndarray, cfg: SegmenterConfig, *, seed: int
) -> keras.Model:
    """Train on (N, S, S) images in [0, 1] and class-index masks for ``cfg.steps`` steps of
    seeded random batches (one code path for every arm; the budget does not depend on N)."""
    keras.utils.set_random_seed(seed)
    model = build_segmenter(cfg)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=dice_ce_loss(cfg.classes)
    )
    rng = np.random.default_rng(seed)
    x = np.asarray(images, np.float32)[..., None]
    y = np.asarray(masks, np.int32)
    for _ in range(cfg.steps):
        pick = rng.integers(0, len(x), size=min(cfg.batch, len(x)))
        model.train_on_batch(x[pick], y[pick])
    return model


def segment(model: keras.Model, images: np.ndarray, *, batch: int = 32) -> np.ndarray:
    """(N, S, S) class-index predictions."""
    out = [
        np.argmax(np.asarray(model(np.asarray(images[i : i + batch], np.float32)[..., None])), -1)
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out).astype(np.uint8) if out else np.zeros((0, *images.shape[1:]))
