"""Train on synthetic, test on real: the three arms, their Dice, and what the ratio sees."""

import numpy as np
import pytest

from models.segmenter import foreground_intensity
from pipeline.quality import GateConfig, apply_gates
from pipeline.utility import UtilityConfig, utility_study


def _scenes(n, seed, *, noise=0.05, informative=True):
    """Images whose two structures are brighter discs at random places (or, uninformative,
    noise unrelated to the mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros((32, 32), np.uint8)
        for label in (1, 2):
            cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(3, 6)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = label
        image = (
            0.1 + np.select([mask == 1, mask == 2], [0.5, 0.9], 0.0)
            if informative
            else (rng.random((32, 32)))
        )
        images.append(np.clip(image + rng.normal(0, noise, (32, 32)), 0, 1))
        masks.append(mask)
    return np.array(images, np.float32), np.array(masks)


@pytest.mark.slow
def test_utility_ratio_sees_useless_synthetic_data():
    real = _scenes(32, 0)
    test = _scenes(16, 1)
    cfg = UtilityConfig(steps=150, seeds=3, width=8, depth=2, batch=8)
    names = ["background", "a", "b"]
    good = utility_study(_scenes(32, 2), real, test, class_names=names, cfg=cfg)
    useless = utility_study(
        _scenes(32, 3, informative=False), real, test, class_names=names, cfg=cfg
    )
    for result in (good, useless):
        assert set(result["arms"]) == {"synthetic", "real", "real+synthetic"}
        assert result["seeds"] == 3 and result["n_train"] == 32 and result["n_test"] == 16
        assert result["arms"]["real"]["dice_mean"] > 0.5  # the yardstick itself learns
        assert set(result["arms"]["real"]["per_structure"]) == {"a", "b"}
    assert good["tstr_trtr"] > 0.8 > 0.3 > useless["tstr_trtr"]
    assert good["augmentation_gain"] == pytest.approx(
        good["arms"]["real+synthetic"]["dice_mean"] - good["arms"]["real"]["dice_mean"]
    )
    with pytest.raises(ValueError, match="no synthetic"):
        utility_study((real[0][:0], real[1][:0]), real, test, class_names=names, cfg=cfg)


def test_foreground_intensity_is_nnunet_ct_normalisation():
    """Percentiles 0.5 / 99.5 of the labelled pixels, then their mean and sd after clipping;
    the whole image when nothing is labelled."""
    rng = np.random.default_rng(0)
    images = rng.random((3, 16, 16))
    masks = (rng.random((3, 16, 16)) > 0.7).astype(np.uint8)
    fg = images[masks > 0]
    low, high = np.percentile(fg, [0.5, 99.5])
    clipped = np.clip(fg, low, high)
    assert foreground_intensity(images, masks) == pytest.approx(
        (low, high, clipped.mean(), clipped.std())
    )
    whole = np.clip(images.ravel(), *np.percentile(images, [0.5, 99.5]))
    assert foreground_intensity(images, np.zeros_like(masks))[2:] == pytest.approx(
        (whole.mean(), whole.std())
    )


def test_utility_gates_need_a_yardstick_that_learned():
    """The ratio gate judges synthetic vs real; the real-arm gate refuses a ratio of two
    near-zero Dice scores (measured on HOCM: 0.042 / 0.078 = 0.53 would have passed)."""
    common = dict(heart_ssim=0.9, heldout_ssim=0.8, fd_ratio=0.5, feature_space="pixel")
    cfg = GateConfig()
    good = apply_gates(cfg, **common, utility_ratio=0.84, real_dice=0.59)
    assert good.passed and {"min_utility_ratio", "min_real_dice"} <= {
        g["gate"] for g in good.results
    }
    assert apply_gates(cfg, **common, utility_ratio=0.2, real_dice=0.59).failed == [
        "min_utility_ratio"
    ]
    assert apply_gates(cfg, **common, utility_ratio=0.53, real_dice=0.078).failed == [
        "min_real_dice"
    ]
    assert all(
        g["gate"] not in ("min_utility_ratio", "min_real_dice")
        for g in apply_gates(cfg, **common).results
    )
