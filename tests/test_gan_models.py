"""Architecture of the paper's cGAN: shapes, depth, parameter counts derived by hand, losses."""

import numpy as np
import pytest

from models.config import preset
from models.gan import (
    build_discriminator,
    build_generator,
    discriminator_loss,
    generator_losses,
)


def conv(k, cin, cout, bias):
    return k * k * cin * cout + (cout if bias else 0)


def bn(c):
    return 4 * c  # gamma, beta (trainable) + moving mean, variance


def expected_discriminator_params(cfg):
    """Derivation: concat(image 1 ch, condition C ch) → stride-2 4×4 convs (bias only on the
    first, BN after the others) → 4×4 stride-1 conv to one channel with bias."""
    cin, total = 1 + cfg.condition_channels, 0
    for i, f in enumerate(cfg.d_filters):
        total += conv(4, cin, f, bias=i == 0) + (bn(f) if i > 0 else 0)
        cin = f
    return total + conv(4, cin, 1, bias=True)


def expected_generator_params(cfg):
    """Derivation: downs as in the discriminator; each paper up-step is a bias-free 4×4
    transposed conv and 4×4 conv plus BN, its output concatenated with the matching down
    activation; a 4×4 conv with bias to one sigmoid channel."""
    cin, total = cfg.condition_channels, 0
    for i, f in enumerate(cfg.g_filters):
        total += conv(4, cin, f, bias=i == 0) + (bn(f) if i > 0 else 0)
        cin = f
    ups = [*reversed(cfg.g_filters[:-1]), cfg.g_filters[0]]
    for i, f in enumerate(ups):
        total += conv(4, cin, f, bias=False) + conv(4, f, f, bias=False) + bn(f)
        skip = cfg.depth - 2 - i
        cin = f + (cfg.g_filters[skip] if cfg.skips and skip >= 0 else 0)
    return total + conv(4, cin, 1, bias=True)


def test_paper_shapes_and_counts():
    cfg = preset("paper")
    g, d = build_generator(cfg), build_discriminator(cfg)
    # 8 one-hot classes and the body outline (issue 24: without it the generator paints a
    # training person's body)
    assert g.output_shape == (None, 256, 256, 1) and g.input_shape == (None, 256, 256, 9)
    assert d.output_shape == (None, 8, 8, 1)  # each cell judges a 32×32 patch
    names = [layer.name for layer in g.layers]
    assert sum(n.startswith("down") and n[4:].isdigit() for n in names) == 7
    assert sum(n.endswith("_tconv") for n in names) == 7
    assert sum(n.endswith("_skip") for n in names) == 6
    assert g.count_params() == expected_generator_params(cfg)
    assert d.count_params() == expected_discriminator_params(cfg)


def test_seed_code_preset():
    cfg = preset("seed-code")
    assert (cfg.batch, cfg.d_lr, cfg.adv_weight, cfg.l1_weight) == (8, 1.5e-4, 1.0, 100.0)
    g, d = build_generator(cfg), build_discriminator(cfg)
    assert g.input_shape == (None, 256, 256, 1)  # integer label map
    assert d.output_shape == (None, 16, 16, 1)
    assert not any(layer.name.endswith("_skip") for layer in g.layers)
    assert g.output_shape == (None, 256, 256, 1)
    assert d.count_params() == expected_discriminator_params(cfg)


@pytest.mark.parametrize(("size", "depth"), [(32, 5), (64, 6), (128, 7)])
def test_tiny_depth_follows_size(size, depth):
    cfg = preset("tiny", size=size)
    assert cfg.depth == depth and cfg.g_filters[0] == 16
    g = build_generator(cfg)
    bottleneck = g.get_layer(f"down{depth - 1}").output.shape
    assert bottleneck[1] == bottleneck[2] == max(1, size // 2**depth) >= 1
    assert g.output_shape == (None, size, size, 1)
    assert g.count_params() == expected_generator_params(cfg)


def test_generation_is_deterministic():
    cfg = preset("tiny", size=32)
    g = build_generator(cfg)
    x = np.random.default_rng(0).random((2, 32, 32, cfg.condition_channels)).astype("float32")
    a = np.asarray(g(x, training=False))
    b = np.asarray(g(x, training=False))
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_lsgan_losses():
    ones, zeros = np.ones((2, 4, 4, 1), "float32"), np.zeros((2, 4, 4, 1), "float32")
    np.testing.assert_allclose(discriminator_loss(ones, zeros), [0.0, 0.0])
    np.testing.assert_allclose(discriminator_loss(zeros, ones), [2.0, 2.0])
    img = np.full((2, 8, 8, 1), 0.5, "float32")
    adv, l1 = generator_losses(zeros, img, img + 0.25, preset("paper"))
    np.testing.assert_allclose(adv, [1.0, 1.0])
    np.testing.assert_allclose(l1, [0.25, 0.25])


def test_structure_weighted_l1():
    """``tiny``'s L1 weighs a structure by the inverse of its share of its own example (capped):
    an error on a thin vessel costs more than the same error on air; without structures, or
    with ``l1_cap`` 0 (``paper``), it is the plain mean; each example stands alone."""
    cfg = preset("tiny", size=16)
    assert cfg.l1_cap == 20.0 and preset("paper").l1_cap == 0.0
    onehot = np.zeros((2, 16, 16, cfg.condition_channels), "float32")
    onehot[..., 0] = 1.0
    onehot[1, 4:6, 4:12, 0], onehot[1, 4:6, 4:12, 7] = 0.0, 1.0  # 16 px of class 7 (1/16)
    real = np.zeros((2, 16, 16, 1), "float32")
    fake = real.copy()
    fake[:, 4:6, 4:12] = 0.5  # the same error in both examples, on the vessel's pixels
    zeros = np.zeros((2, 2, 2, 1), "float32")
    _, plain = generator_losses(zeros, real, fake, preset("paper"), onehot)
    _, weighted = generator_losses(zeros, real, fake, cfg, onehot)
    np.testing.assert_allclose(plain, [0.5 * 16 / 256] * 2, rtol=1e-6)
    assert float(weighted[0]) == pytest.approx(float(plain[0]), rel=1e-6)  # no structure
    w = 1.0 + min(20.0, 0.05 / (16 / 256))  # the vessel's weight: 1 + 0.8
    assert float(weighted[1]) == pytest.approx(0.5 * 16 * w / (240 + 16 * w), rel=1e-4)
    _, alone = generator_losses(zeros[1:], real[1:], fake[1:], cfg, onehot[1:])
    assert float(alone[0]) == pytest.approx(float(weighted[1]), rel=1e-6)
    with pytest.raises(ValueError, match="l1_cap"):
        preset("tiny", l1_cap=-1.0)


def test_learning_rate_decay_schedule():
    """Constant, then linearly to 0 over the last ``lr_decay`` share of the steps; the
    optimizers follow it through their own step counter; the paper presets keep it constant."""
    from models.gan import ConditionalGAN

    cfg = preset("tiny", size=32, steps=10, lr_decay=0.5, g_lr=1e-3, d_lr=2e-3)
    expected = [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]
    np.testing.assert_allclose([cfg.lr_factor(s) for s in range(10)], expected, atol=1e-12)
    assert cfg.learning_rates(7) == pytest.approx((0.6e-3, 1.2e-3))
    gan = ConditionalGAN(cfg)
    for step, factor in enumerate(expected):
        gan.g_opt.iterations.assign(step)
        gan.d_opt.iterations.assign(step)
        assert float(gan.g_opt.learning_rate) == pytest.approx(1e-3 * factor, rel=1e-6)
        assert float(gan.d_opt.learning_rate) == pytest.approx(2e-3 * factor, rel=1e-6)
    assert preset("paper").lr_decay == preset("seed-code").lr_decay == 0.0
    assert preset("tiny").lr_decay == 0.5
    assert [preset("paper", steps=10).lr_factor(s) for s in (0, 9)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="lr_decay"):
        preset("tiny", lr_decay=1.5)


def test_bad_presets():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="power of two"):
        preset("tiny", size=48)


@pytest.mark.numerics
def test_mirrored_update_equals_single_device_update():
    """2 logical CPU devices (a fresh process: logical devices must be set before TF starts);
    SGD, because Adam's first step would hide a wrongly scaled gradient."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "e2e" / "mirrored_step.py"
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "max weight difference" in proc.stdout


def test_tiny_model_learns_a_toy_mapping():
    """A few dozen steps must drive L1 down for real on a learnable mask → image mapping."""
    import keras
    import tensorflow as tf

    from models.gan import ConditionalGAN

    keras.utils.set_random_seed(0)
    cfg = preset("tiny", size=32, batch=8, g_lr=2e-3, d_lr=2e-4, neighbours=0)
    gan = ConditionalGAN(cfg)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    masks = []
    for _ in range(64):
        cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(4, 9)
        m = np.zeros((32, 32), np.int64)
        m[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, 8)
        masks.append(m)
    masks = np.stack(masks)
    body = np.ones((*masks.shape, 1), "float32")  # the body channel: all body here
    cond = np.concatenate([np.eye(8, dtype="float32")[masks], body], axis=-1)
    target = (masks / 7.0).astype("float32")[..., None] * 0.8 + 0.1  # intensity per class
    step = tf.function(gan.train_step)
    l1 = []
    for _ in range(40):
        idx = rng.choice(64, 8, replace=False)
        l1.append(float(step(cond[idx], target[idx])["g_l1"]))
    assert np.mean(l1[-5:]) < 0.5 * np.mean(l1[:5]), l1


@pytest.mark.numerics
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_step(precision):
    """Both mixed policies build and train: float32 variables, outputs and losses; float16
    gets loss scaling (the GPU path, run here on the CPU at 32²)."""
    import keras
    import tensorflow as tf

    from models.gan import ConditionalGAN
    from pipeline.cpu import read_cpu

    cpu = read_cpu()
    if precision not in cpu.runnable_policies():
        # TensorFlow routes this dtype to oneDNN by the real CPU's flags, and oneDNN under
        # ONEDNN_MAX_CPU_ISA has no kernel for it (float16 on AVX512-FP16 Intel under AVX2,
        # bfloat16 on any AVX-512 CPU under AVX2): the CLI never picks it there either
        pytest.skip(
            f"{precision}: TensorFlow sends it to oneDNN, which has no kernel for it "
            f"under ONEDNN_MAX_CPU_ISA={cpu.max_isa}"
        )

    keras.utils.set_random_seed(0)
    cfg = preset("tiny", size=32, batch=4, precision=precision, neighbours=0)
    gan = ConditionalGAN(cfg)
    assert all(v.dtype == "float32" for v in gan.generator.weights)
    assert gan.generator.get_layer("down1").compute_dtype == precision.split("_")[1]
    assert gan.generator.output.dtype == "float32"
    scaled = isinstance(gan.g_opt, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")
    rng = np.random.default_rng(0)
    cond = np.eye(9, dtype="float32")[rng.integers(0, 9, (4, 32, 32))]  # 8 classes and body
    img = rng.random((4, 32, 32, 1)).astype("float32")
    before = [w.copy() for w in gan.generator.get_weights()]
    out = tf.function(gan.train_step)(cond, img)
    assert all(np.isfinite(float(v)) for v in out.values())
    after = gan.generator.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_body_channel_is_asked_for_and_old_runs_have_none():
    """Body-conditioned presets need each mask's body outline; the authors' ``seed-code``
    model and a run saved before the channel existed (no ``body`` in its config) have none."""
    from models.config import GanConfig
    from models.gan import generate_images

    cfg = preset("tiny", size=32, neighbours=0)
    assert cfg.body and cfg.condition_channels == cfg.num_classes + 1
    assert not preset("seed-code").body and preset("seed-code").condition_channels == 1
    old = {k: v for k, v in cfg.to_dict().items() if k != "body"}
    assert not GanConfig.from_dict(old).body and GanConfig.from_dict(cfg.to_dict()).body
    g = build_generator(cfg)
    masks = np.zeros((2, 32, 32), np.uint8)
    with pytest.raises(ValueError, match="body outline"):
        generate_images(g, masks, cfg)
    body = np.zeros((2, 32, 32), bool)
    body[1, 8:24, 8:24] = True
    out = generate_images(g, masks, cfg, bodies=body)
    assert out.shape == (2, 32, 32) and not np.array_equal(out[0], out[1])


def test_neighbour_channels_are_asked_for_and_matter():
    """``tiny`` is 2.5-D (the maps of the slices above and below as more channels); the paper's
    model and a run saved before the field existed are 2-D."""
    from models.config import GanConfig
    from models.gan import generate_images

    cfg = preset("tiny", size=32)
    assert cfg.neighbours == 1 and cfg.condition_channels == 3 * cfg.num_classes + 1
    assert preset("paper").neighbours == 0
    old = {k: v for k, v in cfg.to_dict().items() if k != "neighbours"}
    assert GanConfig.from_dict(old).neighbours == 0
    with pytest.raises(ValueError, match="neighbours"):
        preset("tiny", neighbours=9)
    g = build_generator(cfg)
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[:, 10:20, 10:20] = 3
    body = np.ones((2, 32, 32), bool)
    with pytest.raises(ValueError, match="neighbouring slices"):
        generate_images(g, masks, cfg, bodies=body)
    with pytest.raises(ValueError, match="expected"):
        generate_images(g, masks, cfg, bodies=body, neighbours=np.zeros((2, 4, 32, 32), np.uint8))
    same = np.stack([masks, masks], axis=1)
    other = same.copy()
    other[1] = 0  # the second slice's neighbours are empty
    a = generate_images(g, masks, cfg, bodies=body, neighbours=same)
    b = generate_images(g, masks, cfg, bodies=body, neighbours=other)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], b[1])
