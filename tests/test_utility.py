"""Train on synthetic, test on real: the three arms, their Dice, and what the ratio sees."""

import numpy as np
import pytest

from models.segmenter import foreground_intensity
from pipeline.quality import GateConfig, apply_gates
from pipeline.utility import UtilityConfig, summarise_utility, utility_study


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
        assert result["arms"]["real"]["dice_sd"] < 0.05  # and seeds agree
        assert set(result["arms"]["real"]["per_structure"]) == {"a", "b"}
    assert good["tstr_trtr"] > 0.8 > 0.3 > useless["tstr_trtr"]
    assert good["tstr_trtr_lower"] > 0.7 and useless["tstr_trtr_interval"][1] < 0.5
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


def _counts(dice_table, total=1000.0):
    """(seeds, arms, patients) Dice → counts for one structure that give exactly that Dice."""
    d = np.asarray(dice_table, np.float64)[..., None]
    return np.stack([d * total / 2, np.full_like(d, total)], axis=-1)


def test_summarise_utility_by_hand():
    # 2 seeds, 2 patients, one structure; real 0.6 everywhere, synthetic 0.3 / 0.6 by seed
    table = np.array([[[0.3, 0.3], [0.6, 0.6], [0.6, 0.6]], [[0.6, 0.6], [0.6, 0.6], [0.7, 0.7]]])
    out = summarise_utility(_counts(table), class_names=["bg", "a"], draws=500)
    assert out["arms"]["synthetic"]["dice_per_seed"] == pytest.approx([0.3, 0.6])
    assert out["arms"]["synthetic"]["dice_mean"] == pytest.approx(0.45)
    assert out["tstr_trtr"] == pytest.approx(0.75)
    assert out["tstr_trtr_per_seed"] == pytest.approx([0.5, 1.0])
    assert out["augmentation_gain"] == pytest.approx(0.05)
    lo, hi = out["tstr_trtr_interval"]
    assert lo == pytest.approx(0.5) and hi == pytest.approx(1.0)  # all-one-seed draws
    assert out["tstr_trtr_lower"] == lo
    assert out["arms"]["real"]["per_structure"]["a"]["dice"] == pytest.approx(0.6)


def test_two_arms_give_the_same_ratio_and_no_gain():
    """Without the real+synthetic arm (the demo's budget) the first two arms read as with it;
    the augmentation gain is absent, not made up, and one arm alone is refused."""
    table = np.array([[[0.3, 0.3], [0.6, 0.6], [0.6, 0.6]], [[0.6, 0.6], [0.6, 0.6], [0.7, 0.7]]])
    three = summarise_utility(_counts(table), class_names=["bg", "a"], draws=500)
    two = summarise_utility(_counts(table)[:, :2], class_names=["bg", "a"], draws=500)
    assert sorted(two["arms"]) == ["real", "synthetic"]
    assert two["tstr_trtr"] == pytest.approx(three["tstr_trtr"])
    assert two["tstr_trtr_interval"] == pytest.approx(three["tstr_trtr_interval"])
    assert two["augmentation_gain"] is None and two["augmentation_gain_interval"] is None
    with pytest.raises(ValueError, match="first two"):
        summarise_utility(_counts(table)[:, :1], class_names=["bg", "a"], draws=50)


def test_a_collapsed_seed_cannot_carry_the_gate():
    """Synthetic data that trains a usable segmenter in one seed of three and collapses in the
    others: the mean ratio passes the 0.5 gate (0.56), the interval's lower bound does not."""
    rng = np.random.default_rng(0)
    syn = np.array([0.9, 0.05, 0.05])[:, None] + rng.normal(0, 0.01, (3, 4))
    real = 0.6 + rng.normal(0, 0.01, (3, 4))
    table = np.stack([syn, real, real], axis=1)
    out = summarise_utility(_counts(table), class_names=["bg", "a"], draws=2000)
    assert out["tstr_trtr"] > 0.5 > out["tstr_trtr_lower"]
    common = dict(heart_ssim=0.9, heldout_ssim=0.5, fd_ratio=1.0, feature_space="encoder")
    verdict = apply_gates(
        GateConfig(),
        **common,
        utility_ratio=out["tstr_trtr_lower"],
        real_dice=out["arms"]["real"]["dice_mean"],
    )
    assert verdict.failed == ["min_utility_ratio"]


def test_the_interval_covers_a_known_ratio():
    """Simulated studies whose true TSTR/TRTR is 0.8 (patients vary, seeds add noise, real and
    synthetic share the patient effect): the 95% interval covers 0.8 in most of them."""
    covered = 0
    for sim in range(60):
        rng = np.random.default_rng(sim)
        patient = rng.normal(0, 0.08, 8)
        real = 0.7 + patient + rng.normal(0, 0.03, (6, 8))
        syn = 0.8 * (0.7 + patient) + rng.normal(0, 0.03, (6, 8))
        table = np.stack([syn, real, real], axis=1)
        lo, hi = summarise_utility(_counts(table), class_names=["bg", "a"], draws=400)[
            "tstr_trtr_interval"
        ]
        covered += lo <= 0.8 <= hi
    assert covered >= 0.85 * 60, covered


def test_no_interval_when_the_real_arm_is_at_zero():
    table = np.zeros((3, 3, 4))
    table[:, 0] = 0.4
    out = summarise_utility(_counts(table), class_names=["bg", "a"], draws=200)
    assert out["tstr_trtr_interval"] is None and out["tstr_trtr_lower"] == 0.0
