"""The paper's conditional GAN: U-Net generator, PatchGAN discriminator, losses, inference.

Model code only (no I/O, no config files): builders are functions of a frozen ``GanConfig``
(``models.config``, importable without Keras).
The training loop, distribution strategy and checkpoints belong to ``pipeline`` (issue 3).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops

from models.config import GanConfig


def _norm(cfg: GanConfig, name: str) -> layers.Layer:
    # synchronized: under MirroredStrategy every replica normalises with the global batch's stats
    return layers.BatchNormalization(
        momentum=cfg.bn_momentum, synchronized=True, name=name, dtype=cfg.precision
    )


def build_generator(cfg: GanConfig) -> keras.Model:
    """U-Net: ``depth`` stride-2 4×4 convs down (BN except the first, LeakyReLU 0.2), as many
    up-steps (with skip connections unless ``cfg.skips`` is off), a stride-1 4×4 conv, sigmoid.

    Deterministic: no dropout, no noise input.
    """
    dt = cfg.precision
    inputs = keras.Input((cfg.size, cfg.size, cfg.condition_channels), name="condition")
    x = inputs
    skips = []
    for i, f in enumerate(cfg.g_filters):
        x = layers.Conv2D(
            f, 4, strides=2, padding="same", use_bias=i == 0, name=f"down{i}", dtype=dt
        )(x)
        if i > 0:
            x = _norm(cfg, f"down{i}_bn")(x)
        x = layers.LeakyReLU(0.2, name=f"down{i}_act", dtype=dt)(x)
        skips.append(x)
    up_filters = [*reversed(cfg.g_filters[:-1]), cfg.g_filters[0]]
    if cfg.up_block == "seed-code":  # its last up-step is the transposed conv to one channel
        up_filters = up_filters[:-1]
    for i, f in enumerate(up_filters):
        if cfg.up_block == "seed-code":
            x = layers.Conv2DTranspose(
                f, 4, strides=2, padding="same", name=f"up{i}_tconv", dtype=dt
            )(x)
            x = layers.Conv2D(
                f, 4, padding="same", activation="relu", name=f"up{i}_conv", dtype=dt
            )(x)
            x = _norm(cfg, f"up{i}_bn")(x)
        else:
            x = layers.Conv2DTranspose(
                f, 4, strides=2, padding="same", use_bias=False, name=f"up{i}_tconv", dtype=dt
            )(x)
            x = layers.Conv2D(f, 4, padding="same", use_bias=False, name=f"up{i}_conv", dtype=dt)(x)
            x = _norm(cfg, f"up{i}_bn")(x)
            x = layers.ReLU(name=f"up{i}_act", dtype=dt)(x)
        skip_index = cfg.depth - 2 - i
        if cfg.skips and skip_index >= 0:
            x = layers.Concatenate(name=f"up{i}_skip", dtype=dt)([x, skips[skip_index]])
    if cfg.up_block == "seed-code":
        x = layers.Conv2DTranspose(1, 4, strides=2, padding="same", name="out_tconv", dtype=dt)(x)
    # one channel, cheap: kept in float32 so the sigmoid and the losses see full precision
    outputs = layers.Conv2D(
        1, 4, padding="same", activation="sigmoid", name="out", dtype="float32"
    )(x)
    return keras.Model(inputs, outputs, name="generator")


def build_discriminator(cfg: GanConfig) -> keras.Model:
    """PatchGAN on concat(image, condition): stride-2 4×4 convs (no BN on the first), then a
    stride-1 4×4 conv to one channel; at 256² with 5 layers each output cell judges 32×32 px.
    """
    image = keras.Input((cfg.size, cfg.size, 1), name="image")
    condition = keras.Input((cfg.size, cfg.size, cfg.condition_channels), name="condition")
    dt = cfg.precision
    x = layers.Concatenate(name="pair", dtype=dt)([image, condition])
    for i, f in enumerate(cfg.d_filters):
        x = layers.Conv2D(f, 4, strides=2, padding="same", use_bias=i == 0, name=f"d{i}", dtype=dt)(
            x
        )
        if i > 0:
            x = _norm(cfg, f"d{i}_bn")(x)
        x = layers.LeakyReLU(0.2, name=f"d{i}_act", dtype=dt)(x)
    outputs = layers.Conv2D(1, 4, padding="same", name="patches", dtype="float32")(x)
    return keras.Model([image, condition], outputs, name="discriminator")


def discriminator_loss(real_out: Any, fake_out: Any) -> Any:
    """Least squares, per example: mean over patches of (1 − D(y, x))² + D(y, G(y))²."""
    return ops.mean(ops.square(1.0 - real_out), axis=(1, 2, 3)) + ops.mean(
        ops.square(fake_out), axis=(1, 2, 3)
    )


def generator_losses(
    fake_out: Any, real: Any, fake: Any, cfg: GanConfig, condition: Any = None
) -> tuple[Any, Any]:
    """Per example (adversarial, L1): (1 − D(y, G(y)))² and |x − G(y)|₁, each a patch/pixel mean;
    with ``cfg.l1_cap`` and the one-hot ``condition``, the L1 is the
    :func:`structure_weights`-weighted mean.

    The caller weights them (``cfg.adv_weight``, ``cfg.l1_weight``) and averages over the global
    batch (``tf.nn.compute_average_loss``) so any replica count gives the same update.
    """
    adv = ops.mean(ops.square(1.0 - fake_out), axis=(1, 2, 3))
    err = ops.abs(real - fake)
    if cfg.l1_cap > 0 and condition is not None and cfg.condition == "onehot":
        w = structure_weights(condition, cfg)
        return adv, ops.mean(w * err, axis=(1, 2, 3)) / ops.mean(w, axis=(1, 2, 3))
    return adv, ops.mean(err, axis=(1, 2, 3))


def structure_weights(condition: Any, cfg: GanConfig) -> Any:
    """(B, S, S, 1) L1 weights from the slice's own one-hot map (the condition's first
    ``num_classes`` channels): 1 outside the structures, 1 + min(cap, share / p) on a structure
    covering the share p of its own example. Per example, so the update is the same for any
    replica count."""
    onehot = ops.cast(condition[..., : cfg.num_classes], "float32")
    share = ops.mean(onehot, axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
    per_class = ops.clip(cfg.l1_share / (share + 1e-6), 0.0, cfg.l1_cap)
    per_class = per_class * ops.cast(ops.arange(cfg.num_classes) > 0, "float32")  # not bg
    return 1.0 + ops.sum(onehot * per_class, axis=-1, keepdims=True)


class LinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``GanConfig.lr_factor`` in graph form: constant, then linearly to 0 over the last
    ``decay`` share of ``steps``. Driven by the optimizer's own (checkpointed) step counter, so a
    resumed run continues the schedule where it stopped."""

    def __init__(self, rate: float, steps: int, decay: float) -> None:
        self.rate, self.steps, self.decay = float(rate), int(steps), float(decay)

    def __call__(self, step: Any) -> Any:
        start = self.steps * (1.0 - self.decay)
        done = (ops.cast(step, "float32") - start) / max(self.steps - start, 1e-9)
        return self.rate * (1.0 - ops.clip(done, 0.0, 1.0))

    def get_config(self) -> dict[str, Any]:
        return {"rate": self.rate, "steps": self.steps, "decay": self.decay}


def _schedule(cfg: GanConfig, rate: float) -> Any:
    return LinearDecay(rate, cfg.steps, cfg.lr_decay) if cfg.lr_decay > 0 else rate


class ConditionalGAN:
    """Generator, discriminator and their optimizers, with the per-replica train step.

    ``train_step`` is written for ``strategy.run``: every loss is summed per example and divided
    by the *global* batch (``tf.nn.compute_average_loss``), so the all-reduced (summed)
    gradients equal one device's on the whole batch, whatever the replica count. Build it
    inside ``strategy.scope()``.
    """

    def __init__(self, cfg: GanConfig, *, optimizer: str = "adam") -> None:
        self.cfg = cfg
        self.generator = build_generator(cfg)
        self.discriminator = build_discriminator(cfg)
        g_lr, d_lr = _schedule(cfg, cfg.g_lr), _schedule(cfg, cfg.d_lr)
        if optimizer == "adam":
            self.g_opt = keras.optimizers.Adam(g_lr, beta_1=cfg.beta1)
            self.d_opt = keras.optimizers.Adam(d_lr, beta_1=cfg.beta1)
        elif optimizer == "sgd":  # for equivalence tests: Adam would hide a scaled gradient
            self.g_opt = keras.optimizers.SGD(g_lr)
            self.d_opt = keras.optimizers.SGD(d_lr)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        if cfg.precision == "mixed_float16":  # float16 gradients underflow without it
            self.g_opt = keras.optimizers.LossScaleOptimizer(self.g_opt)
            self.d_opt = keras.optimizers.LossScaleOptimizer(self.d_opt)
        # Create the slot variables now, in the caller's strategy scope: created lazily inside
        # a distributed step they fail under MirroredStrategy.
        self.g_opt.build(self.generator.trainable_variables)
        self.d_opt.build(self.discriminator.trainable_variables)

    def train_step(self, condition: Any, image: Any) -> dict[str, Any]:
        """One simultaneous update of D and G on this replica's share of the global batch.

        Returns this replica's contributions (sum them across replicas for global means).
        """
        import tensorflow as tf

        batch = self.cfg.batch

        def average(per_example: Any) -> Any:
            return tf.nn.compute_average_loss(per_example, global_batch_size=batch)

        with tf.GradientTape(persistent=True) as tape:
            fake = self.generator(condition, training=True)
            real_out = self.discriminator([image, condition], training=True)
            fake_out = self.discriminator([fake, condition], training=True)
            d_loss = average(discriminator_loss(real_out, fake_out))
            adv, l1 = generator_losses(fake_out, image, fake, self.cfg, condition)
            g_adv, g_l1 = average(adv), average(l1)
            g_loss = self.cfg.adv_weight * g_adv + self.cfg.l1_weight * g_l1
            # identity unless a LossScaleOptimizer wraps them; apply_gradients unscales
            d_scaled, g_scaled = self.d_opt.scale_loss(d_loss), self.g_opt.scale_loss(g_loss)
        d_vars = self.discriminator.trainable_variables
        g_vars = self.generator.trainable_variables
        d_grads = tape.gradient(d_scaled, d_vars)
        g_grads = tape.gradient(g_scaled, g_vars)
        del tape
        self.d_opt.apply_gradients(zip(d_grads, d_vars, strict=True))
        self.g_opt.apply_gradients(zip(g_grads, g_vars, strict=True))
        acc_real = ops.mean(ops.cast(real_out > 0.5, "float32"), axis=(1, 2, 3))
        acc_fake = ops.mean(ops.cast(fake_out < 0.5, "float32"), axis=(1, 2, 3))
        return {
            "d_loss": d_loss,
            "g_adv": g_adv,
            "g_l1": g_l1,
            "d_acc_real": average(acc_real),
            "d_acc_fake": average(acc_fake),
        }


# ----------------------------------------------------------------------------- inference


def encode_condition(
    masks: Any, num_classes: int, kind: str, bodies: Any = None, neighbours: Any = None
) -> Any:
    """Masks → generator input: one-hot channels, or the label map scaled to [0, 1]; with
    ``neighbours`` (N, 2k, S, S) the neighbouring slices' maps encoded alike, in slice order
    (z−k … z−1, z+1 … z+k), after the slice's own; with ``bodies`` (N, S, S) the body outline
    as one more channel, last."""
    import tensorflow as tf

    def encode(maps: Any) -> Any:
        if kind == "onehot":
            return tf.one_hot(tf.cast(maps, tf.int32), num_classes, dtype=tf.float32)
        return tf.cast(maps, tf.float32)[..., None] / float(max(num_classes - 1, 1))

    parts = [encode(masks)]
    if neighbours is not None:
        stack = tf.convert_to_tensor(neighbours)
        parts += [encode(stack[:, j]) for j in range(stack.shape[1])]
    if bodies is not None:
        parts.append(tf.cast(bodies, tf.float32)[..., None])
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)


def condition_of(masks: Any, bodies: Any, cfg: GanConfig, neighbours: Any = None) -> Any:
    """The generator input of ``cfg``: a body-conditioned model needs ``bodies``, a 2.5-D one
    (``cfg.neighbours`` = k > 0) the (N, 2k, S, S) ``neighbours``; a model without either
    ignores them."""
    if cfg.body and bodies is None:
        raise ValueError("this generator is conditioned on the body outline: pass bodies")
    if cfg.neighbours:
        if neighbours is None:
            raise ValueError("this generator is conditioned on neighbouring slices: pass them")
        if tuple(neighbours.shape[:2]) != (masks.shape[0], 2 * cfg.neighbours):
            raise ValueError(
                f"neighbours of shape {tuple(neighbours.shape)}: expected "
                f"({masks.shape[0]}, {2 * cfg.neighbours}, S, S)"
            )
    return encode_condition(
        masks,
        cfg.num_classes,
        cfg.condition,
        bodies if cfg.body else None,
        neighbours if cfg.neighbours else None,
    )


def generate_images(
    generator: Any,
    masks: np.ndarray,
    cfg: GanConfig,
    *,
    bodies: np.ndarray | None = None,
    neighbours: np.ndarray | None = None,
    batch: int = 16,
) -> np.ndarray:
    """(N, S, S) float32 images in [0, 1] for (N, S, S) class-index masks (and, for a
    body-conditioned ``cfg``, their (N, S, S) body outlines; for a 2.5-D one, the
    (N, 2k, S, S) maps of their neighbouring slices), deterministically.

    Inference mode (batch-norm moving statistics). Every call runs the model on batches of
    exactly ``batch`` masks, padding the last one with empty masks: oneDNN picks its convolution
    kernel (and so the float rounding) by the batch shape, and on some CPUs (AVX2) a batch of 3
    and a batch of 16 round differently. With one fixed shape an image's bytes depend only on its
    mask, not on how many others ran beside it or where it sat in the batch (measured on AVX-512
    and on oneDNN limited to AVX2).
    """
    out = []
    for i in range(0, len(masks), batch):
        chunk = np.asarray(masks[i : i + batch])
        body = None if bodies is None else np.asarray(bodies[i : i + batch], dtype=bool)
        near = None if neighbours is None else np.asarray(neighbours[i : i + batch])
        n = len(chunk)
        if n < batch:
            chunk, body, near = (
                None
                if a is None
                else np.concatenate([a, np.zeros((batch - n, *a.shape[1:]), a.dtype)])
                for a in (chunk, body, near)
            )
        cond = condition_of(chunk, body, cfg, near)
        out.append(np.asarray(generator(cond, training=False), dtype=np.float32)[:n, ..., 0])
    size = masks.shape[1] if masks.ndim == 3 else 0
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)
