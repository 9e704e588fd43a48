"""Privacy cores against references: SSIM equals skimage's; alignment finds planted copies."""

import numpy as np
import pytest
from skimage import data
from skimage.metrics import structural_similarity

from pipeline.privacy import (
    aligned_ssim,
    best_shift,
    calibrate,
    conformal_pvalues,
    order_statistic,
    ssim_batch,
)


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


def brute_force_pvalue(baseline, score):
    """(1 + how many baseline scores are at least the score) / (n + 1), counted one by one."""
    return (1 + sum(1 for b in baseline if b >= score)) / (len(baseline) + 1)


def test_conformal_pvalues_equal_a_brute_force_count():
    rng = np.random.default_rng(0)
    baseline = np.round(rng.random(57), 2)  # rounded: ties must count as "at least"
    scores = np.concatenate([np.round(rng.random(40), 2), baseline[:5], [-1.0, 2.0]])
    got = conformal_pvalues(baseline, scores)
    want = [brute_force_pvalue(baseline, s) for s in scores]
    np.testing.assert_allclose(got, want)
    assert got[-2] == 1.0 and got[-1] == pytest.approx(1 / 58)


@pytest.mark.parametrize("n", [8, 98, 99, 100, 101, 250, 1999])
def test_order_statistic_rule_against_a_brute_force_search(n):
    """The threshold is the k-th largest score with k = floor(alpha (n + 1)): the lowest
    baseline value whose exceedance bound k/(n+1) stays within alpha (brute force over every
    candidate value), or None when even the maximum's bound 1/(n+1) exceeds alpha."""
    rng = np.random.default_rng(n)
    baseline = rng.random(n)
    alpha = 0.01
    threshold, k = order_statistic(baseline, alpha)
    ok = [t for t in baseline if (1 + sum(1 for b in baseline if b > t)) / (n + 1) <= alpha + 1e-12]
    if not ok:
        assert threshold is None and k == 0
    else:
        assert threshold == min(ok) and k == int(np.floor(alpha * (n + 1)))
        assert (1 + np.sum(baseline > threshold)) / (n + 1) <= alpha


def test_order_statistic_bound_holds_on_fresh_draws():
    """Exchangeable data: a new score lands above the threshold at most k/(n+1) of the time
    (Monte Carlo over 4000 baselines of 199, alpha 0.05: k/(n+1) = 0.05 exactly)."""
    rng = np.random.default_rng(1)
    exceed = []
    for _ in range(4000):
        draws = rng.standard_normal(200)
        threshold, k = order_statistic(draws[:199], 0.05)
        exceed.append(draws[199] > threshold)
    assert k == 10 and np.mean(exceed) == pytest.approx(0.05, abs=0.012)


def test_calibration_flags_above_the_order_statistic():
    cal = calibrate(np.linspace(0, 1, 301), quantile=0.99)
    assert cal.threshold == pytest.approx(np.sort(np.linspace(0, 1, 301))[301 - 3])  # k = 3
    assert cal.n_baseline == 301 and cal.certified and cal.bound == pytest.approx(3 / 302)
    assert cal.flag(0.999) and not cal.flag(0.98)
    with pytest.raises(ValueError, match="different patients"):
        calibrate(np.array([]))


def test_a_too_small_baseline_says_so_in_one_line():
    cal = calibrate(np.linspace(0.1, 0.4, 8), np.linspace(0.0, 0.1, 8), quantile=0.99)
    assert not cal.certified and cal.threshold == pytest.approx(0.4)  # the maximum
    assert cal.bound == pytest.approx(2 / 9)  # 1/(n+1) per detector: the best statable
    assert "\n" not in cal.note and "too few for q0.99" in cal.note and "199" in cal.note
    assert "0.222" in cal.note and "too few for q0.99" in cal.provenance()


def test_two_tail_rule_on_distributions_with_a_known_answer():
    """Different people score U(0, 0.4) and copies U(0.9, 1.0): the threshold lands halfway
    between the baseline's order statistic (≈ 0.4) and the copies' 1% edge (≈ 0.901), every
    copy is caught, and no kind is reported as indistinguishable."""
    rng = np.random.default_rng(2)
    baseline = rng.uniform(0, 0.4, 4000)
    texture = rng.uniform(0, 0.2, 4000)
    planted = {
        "copy": (rng.uniform(0.9, 1.0, 200), rng.uniform(0.9, 1.0, 200)),
        "blend": (rng.uniform(0.9, 1.0, 200), rng.uniform(0.5, 0.6, 200)),
    }
    cal = calibrate(baseline, texture, quantile=0.99, planted=planted)
    floor, _ = order_statistic(baseline, 0.005)
    edge = np.quantile(np.concatenate([v[0] for v in planted.values()]), 0.01)
    assert cal.threshold == pytest.approx((floor + edge) / 2)
    assert 0.64 < cal.threshold < 0.66 and cal.recall == 1.0 and cal.indistinct == ()
    assert cal.certified and cal.bound <= 0.01
    ssim, tex = cal.detectors
    assert ssim.margin == pytest.approx(edge - floor) and ssim.baseline_rate == 0.0
    assert 0.34 < tex.threshold < 0.36  # halfway from ≈ 0.2 to the blends' ≈ 0.5
    # a kind that scores like a different person cannot be told apart: said, not hidden
    planted["elastic"] = (rng.uniform(0.0, 0.3, 200), rng.uniform(0.0, 0.1, 200))
    overlapping = calibrate(baseline, texture, quantile=0.99, planted=planted)
    assert overlapping.indistinct == ("elastic",)
    assert overlapping.planted_recall["elastic"] < 0.05 and overlapping.recall < 0.99


def test_p_value_combines_the_detectors_by_bonferroni():
    cal = calibrate(np.linspace(0, 0.5, 99), np.linspace(0, 0.2, 99), quantile=0.95)
    assert cal.p_value(0.6, 0.0) == pytest.approx(2 / 100)  # above every SSIM: 1/100, x2
    assert cal.p_value(0.0, 0.0) == 1.0
    explicit = calibrate(np.linspace(0, 0.5, 99))
    assert explicit.p_value(0.6) == pytest.approx(1 / 100)


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
    ssim = np.linspace(0, 1, 401)
    texture = np.linspace(0, 0.5, 401)
    cal = calibrate(ssim, texture, quantile=0.99)
    assert cal.threshold == pytest.approx(order_statistic(ssim, 0.005)[0])
    assert cal.texture_threshold == pytest.approx(order_statistic(texture, 0.005)[0])
    assert cal.flag(0.2, 0.4999) and cal.flag(0.9999, 0.0) and not cal.flag(0.2, 0.1)
    assert cal.margin(0.2, 0.1) == pytest.approx(
        min(cal.threshold - 0.2, cal.texture_threshold - 0.1)
    )
    # together the two detectors flag at most 1% of the baseline
    flagged = [cal.flag(s, t) for s, t in zip(ssim, texture[::-1], strict=True)]
    assert np.mean(flagged) <= 0.01 and cal.bound <= 0.01


def test_patient_level_bound_is_conformal_risk_control_over_patients():
    """(1 + sum of per-patient flag rates) / (P + 1), counted by hand; with patients given the
    stated bound is this one (slices of one patient are not independent draws)."""
    from pipeline.privacy import patient_risk_bound

    flagged = np.array([1, 0, 0, 0, 0, 0, 1, 1, 0, 0], bool)
    patients = np.array(["a", "a", "a", "a", "b", "b", "c", "c", "c", "c"])
    rates = [1 / 4, 0 / 2, 2 / 4]
    assert patient_risk_bound(flagged, patients) == pytest.approx((1 + sum(rates)) / 4)
    scores = np.linspace(0, 0.5, 300)
    who = np.repeat(["p1", "p2", "p3"], 100)
    cal = calibrate(scores, quantile=0.99, patients=who)
    # the floor is the 3rd largest (k = floor(0.01 * 301)): p3 has 2 of 100 slices above it
    # x2: a new patient meets 3 reference patients, each leave-one-out patient met 2
    assert cal.n_patients == 3 and cal.bound == pytest.approx(2 * (1 + 2 / 100) / 4)
    assert not cal.certified and "3 patients are too few" in cal.note and "(needs 199)" in cal.note
    assert cal.slice_bound == pytest.approx(3 / 301)  # what the slices alone would claim
