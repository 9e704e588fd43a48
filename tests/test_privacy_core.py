"""Privacy cores against references: SSIM equals skimage's; alignment finds planted copies."""

import numpy as np
import pytest
from skimage import data
from skimage.metrics import structural_similarity

from pipeline.privacy import aligned_ssim, best_shift, calibrate, ssim_batch


def camera():
    return data.camera()[::4, ::4].astype(np.float64) / 255.0  # 128², skimage's test image


def test_ssim_matches_skimage_on_camera_with_seeded_noise():
    rng = np.random.default_rng(0)
    ref = camera()
    others = [ref, np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1), ref[::-1], ref * 0.9]
    ours = ssim_batch(np.stack([ref] * 4), np.stack(others))
    theirs = [structural_similarity(ref, o, data_range=1.0) for o in others]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)
    assert ours[0] == pytest.approx(1.0)


def test_best_shift_recovers_planted_shift():
    ref = camera()
    moved = np.roll(ref, (3, -2), axis=(0, 1))
    assert best_shift(ref, moved, 4) == (-3, 2)


def test_aligned_ssim_sees_through_flip_and_shift():
    ref = camera()
    other = data.moon()[::4, ::4].astype(np.float64) / 255.0
    copy = np.roll(ref[:, ::-1], 3, axis=1)
    plain = structural_similarity(ref, copy, data_range=1.0)
    scores = aligned_ssim(copy, np.stack([ref, other]), max_shift=4)
    assert scores[0] > 0.9 > plain  # the flip+shift copy is caught only with the search
    assert scores[1] < 0.5


def test_calibration_quantile():
    cal = calibrate(np.linspace(0, 1, 101), quantile=0.99)
    assert cal.threshold == pytest.approx(0.99) and cal.n_baseline == 101
    assert cal.flag(0.995) and not cal.flag(0.98)
    with pytest.raises(ValueError, match="held-out"):
        calibrate(np.array([]))


def test_ivf_index_is_tuned_to_the_recall_target():
    from pipeline.index import make_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(100, 3100, dtype=np.int64)
    index, info = make_index(vectors, ids, k=5, flat_max=1000)
    assert info["type"] == "ivf" and info["recall_at_k"] >= 0.99
    assert 1 <= info["nprobe"] <= info["nlist"]
    _, found = index.search(vectors[:50], 1)
    assert (found[:, 0] == ids[:50]).mean() >= 0.98
    flat, flat_info = make_index(vectors, ids, k=5)
    assert flat_info["type"] == "flat" and flat.ntotal == 3000


def test_texture_score_sees_a_blend_and_not_a_stranger():
    from pipeline.privacy import aligned_scores

    rng = np.random.default_rng(1)
    a = np.clip(camera() + rng.normal(0, 0.01, (128, 128)), 0, 1)  # a scan's own grain
    b = np.clip(data.moon()[::4, ::4] / 255.0 + rng.normal(0, 0.01, (128, 128)), 0, 1)
    blend = 0.7 * a + 0.3 * b
    ssim, texture = aligned_scores(blend, np.stack([a, b]), smooth=1.0)
    assert texture[0] > 0.8 > texture[1]
    assert ssim[0] > ssim[1]


def test_two_detector_calibration_splits_the_tail():
    ssim = np.linspace(0, 1, 201)
    texture = np.linspace(0, 0.5, 201)
    cal = calibrate(ssim, texture, quantile=0.99)
    assert cal.threshold == pytest.approx(np.quantile(ssim, 0.995))
    assert cal.texture_threshold == pytest.approx(np.quantile(texture, 0.995))
    assert cal.flag(0.2, 0.499) and cal.flag(0.999, 0.0) and not cal.flag(0.2, 0.1)
    assert cal.margin(0.2, 0.1) == pytest.approx(
        min(cal.threshold - 0.2, cal.texture_threshold - 0.1)
    )
    # together the two detectors flag at most 1% of the baseline
    flagged = [cal.flag(s, t) for s, t in zip(ssim, texture[::-1], strict=True)]
    assert np.mean(flagged) <= 0.02
