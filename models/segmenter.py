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
    width: int = 8  # channels of the first level, doubled per level
    depth: int = 3  # stride-2 levels
    steps: int = 300
    batch: int = 16
    # Adam, constant. Seeds differ in how long they sit on the "all background" plateau; a
    # higher rate leaves it sooner (measured, real arm of the demo, 3 seeds: 2e-3 × 200 steps
    # 0.61 ± 0.13 Dice, 4e-3 × 300 steps 0.83 ± 0.01; 6e-3 collapsed a seed)
    learning_rate: float = 4e-3

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def foreground_intensity(images: np.ndarray, masks: np.ndarray) -> tuple[float, ...]:
    """nnU-Net's CT normalisation, fitted on one training set: the 0.5th and 99.5th percentiles
    of the labelled pixels (clip range) and their mean and standard deviation after clipping.

    A heart spans a few percent of a full CT window ([0, 1] here), so unnormalised the
    segmenter spends its short budget finding that contrast (measured on the demo: mean Dice
    of a 150-step real arm 0.52 → 0.77 with it).
    """
    fg = np.asarray(images, np.float64)[np.asarray(masks) > 0]
    if fg.size == 0:  # no labels at all: normalise the whole images instead
        fg = np.asarray(images, np.float64).ravel()
    low, high = np.percentile(fg, [0.5, 99.5])
    clipped = np.clip(fg, low, high)
    return float(low), float(high), float(clipped.mean()), float(max(clipped.std(), 1e-6))


def normalise(images: np.ndarray, intensity: tuple[float, ...]) -> np.ndarray:
    """(N, S, S) images in [0, 1] → (N, S, S, 1) float32, clipped to ``intensity``'s (low, high)
    and standardised with its (mean, sd): what the segmenter sees."""
    low, high, mean, sd = intensity
    x = (np.clip(np.asarray(images, np.float32), low, high) - mean) / sd
    return x[..., None].astype(np.float32)


def build_segmenter(cfg: SegmenterConfig) -> keras.Model:
    """(size, size, 1) normalised image → (size, size, classes) softmax: two 3×3 convs (ReLU)
    per level, max-pool down, transposed conv up with skip connections."""
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
    # statistics, and inference collapses to "all background" (measured on the demo); group
    # norm, which has none, collapsed 2 of 3 seeds to Dice 0 in the same budget
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


class Segmenter:
    """One segmenter, retrained from scratch per (arm, seed) on one traced train step.

    Building and tracing a Keras model costs seconds; a utility study trains arms × seeds of
    the same shape, so the model and its compiled step are made once and every training starts
    from the seed's initial weights with a fresh optimizer state (measured: 3 of every 7 s of a
    150-step run were the rebuild).
    """

    def __init__(self, cfg: SegmenterConfig) -> None:
        self.cfg = cfg
        self.model = build_segmenter(cfg)
        self.model.compile(
            optimizer=keras.optimizers.Adam(cfg.learning_rate),
            loss=dice_ce_loss(cfg.classes),
            steps_per_execution=min(cfg.steps, 25),
        )
        # the optimizer's state before any step (its slots, step count, learning rate), to
        # start every training from
        self.model.optimizer.build(self.model.trainable_variables)
        self._fresh_optimizer = [
            keras.ops.convert_to_numpy(v) for v in self.model.optimizer.variables
        ]
        self._initial: dict[int, list[np.ndarray]] = {}
        self.intensity: tuple[float, ...] = (0.0, 1.0, 0.0, 1.0)

    def _initial_weights(self, seed: int) -> list[np.ndarray]:
        if seed not in self._initial:
            keras.utils.set_random_seed(seed)
            self._initial[seed] = build_segmenter(self.cfg).get_weights()
        return self._initial[seed]

    def train(self, images: np.ndarray, masks: np.ndarray, *, seed: int) -> Segmenter:
        """Train on (N, S, S) images in [0, 1] and class-index masks for ``cfg.steps`` steps from
        ``seed``'s initial weights (the same for every arm): each epoch a seeded permutation, so
        every image is seen equally often and the budget does not depend on N. The intensity
        normalisation is fitted on these images."""
        self.model.set_weights(self._initial_weights(seed))
        for v, fresh in zip(self.model.optimizer.variables, self._fresh_optimizer, strict=True):
            v.assign(fresh)
        keras.utils.set_random_seed(seed)
        self.intensity = foreground_intensity(images, masks)
        rng = np.random.default_rng(seed)
        need = self.cfg.steps * self.cfg.batch
        order = np.concatenate(
            [rng.permutation(len(images)) for _ in range(-(-need // len(images)))]
        )
        pick = order[:need]
        x = normalise(np.asarray(images)[pick], self.intensity)
        y = np.asarray(masks, np.int32)[pick]
        self.model.fit(x, y, batch_size=self.cfg.batch, epochs=1, shuffle=False, verbose=0)
        return self

    def segment(self, images: np.ndarray, *, batch: int = 64) -> np.ndarray:
        """(N, S, S) class-index predictions of the last training."""
        out = [
            np.argmax(np.asarray(self.model(normalise(images[i : i + batch], self.intensity))), -1)
            for i in range(0, len(images), batch)
        ]
        return np.concatenate(out).astype(np.uint8) if out else np.zeros((0, *images.shape[1:]))
