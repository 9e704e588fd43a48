"""Metric cores against references: Fréchet closed forms, PRDC published values, SSIM, PSNR."""

import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.metrics import (
    adjacent_differences,
    feature_stats,
    frechet_distance,
    frechet_of_features,
    kid,
    ks_statistic,
    matched_agreement,
    matched_distribution,
    paired_fidelity,
    patient_halves,
    plane_distribution,
    plane_slices,
    prdc,
    psnr_batch,
)


def test_frechet_identity_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    eye = np.eye(16)
    assert frechet_distance(mu1, eye, mu2, eye) == pytest.approx(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, eye, mu1, eye) == pytest.approx(0.0, abs=1e-9)


def test_frechet_scaled_covariances_closed_form():
    """Σ₁ = a²I, Σ₂ = b²I in d dimensions: ‖Δμ‖² + d (a − b)²."""
    d, a, b = 8, 2.0, 0.5
    mu1, mu2 = np.zeros(d), np.full(d, 0.25)
    got = frechet_distance(mu1, a * a * np.eye(d), mu2, b * b * np.eye(d))
    assert got == pytest.approx(d * 0.25**2 + d * (a - b) ** 2)


def test_frechet_of_features_and_singular_covariance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 4))
    y = rng.normal(size=(4000, 4)) + np.array([1.0, 0, 0, 0])
    assert frechet_of_features(x, y) == pytest.approx(1.0, abs=0.05)
    # fewer samples than dimensions: a rank-deficient covariance still gives a finite number
    small = rng.normal(size=(5, 32))
    assert np.isfinite(frechet_of_features(small, small + 0.1))
    with pytest.raises(ValueError, match="two feature rows"):
        feature_stats(np.zeros((1, 3)))


@pytest.mark.slow
def test_prdc_matches_published_values_on_gaussians():
    """The `prdc` package README: real and fake both N(0, I), 10,000 × 1,000-d, k=5 gives
    precision 0.4772, recall 0.4705, density 1.0555, coverage 0.9735 for one unseeded draw.
    Draws differ: over five draws here precision ran 0.456–0.497, recall 0.470–0.486, density
    0.91–1.15, coverage 0.956–0.980, so the tolerances are that spread, not float noise (the
    exact check is the brute-force comparison below)."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(10_000, 1000)).astype(np.float32)
    fake = rng.normal(size=(10_000, 1000)).astype(np.float32)
    m = prdc(real, fake, k=5)
    assert m.precision == pytest.approx(0.477, abs=0.03)
    assert m.recall == pytest.approx(0.471, abs=0.02)
    assert m.density == pytest.approx(1.056, abs=0.16)
    assert m.coverage == pytest.approx(0.974, abs=0.02)
    # Naeem et al., Lemma 2: for identical distributions E[coverage] = 1 − Π (N−i)/(2N−i), i ≤ k
    expected = 1 - np.prod([(10_000 - i) / (20_000 - i) for i in range(1, 6)])
    assert expected == pytest.approx(0.969, abs=1e-3)
    assert m.coverage == pytest.approx(expected, abs=0.015)


def test_prdc_equals_brute_force_definition():
    """Naeem et al.'s definitions written out with scipy's cdist and full sorts."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(4)
    real, fake, k = rng.normal(size=(400, 20)), rng.normal(size=(300, 20)) * 1.2 + 0.3, 5
    r_rad = np.sort(cdist(real, real), axis=1)[:, k]
    f_rad = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(real, fake)
    expect = (
        np.mean([any(d[i, j] < r_rad[i] for i in range(len(real))) for j in range(len(fake))]),
        np.mean([any(d[i, j] < f_rad[j] for j in range(len(fake))) for i in range(len(real))]),
        np.sum(d < r_rad[:, None]) / (k * len(fake)),
        np.mean(d.min(axis=1) < r_rad),
    )
    m = prdc(real, fake, k=k)
    np.testing.assert_allclose((m.precision, m.recall, m.density, m.coverage), expect, rtol=1e-12)


def test_prdc_separated_sets_and_small_input():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 8))
    m = prdc(real, rng.normal(size=(300, 8)) + 50.0, k=5)
    assert (m.precision, m.recall, m.density, m.coverage) == (0.0, 0.0, 0.0, 0.0)
    same = prdc(real, real.copy(), k=5)
    assert same.precision == 1.0 and same.coverage == 1.0
    with pytest.raises(ValueError, match="needs more than 5"):
        prdc(real[:4], real[:4], k=5)


def test_ssim_psnr_mae_against_skimage():
    """skimage's camera() plus seeded noise (as skimage's own SSIM tests do), data_range=1."""
    cam = data.camera().astype(np.float64) / 255.0
    rng = np.random.default_rng(3)
    noisy = np.clip(cam + rng.normal(0, 0.05, cam.shape), 0, 1)
    masks = np.zeros((1, *cam.shape), np.uint8)
    masks[0, 100:200, 100:300] = 1
    out = paired_fidelity(
        cam[None], noisy[None], masks, class_names=["background", "box"], scale=3072.0
    )
    assert out["ssim"][0] == pytest.approx(structural_similarity(cam, noisy, data_range=1.0))
    assert out["psnr"][0] == pytest.approx(
        peak_signal_noise_ratio(cam, noisy, data_range=1.0), rel=1e-5
    )
    assert out["mae"][0] == pytest.approx(np.abs(cam - noisy).mean(), rel=1e-5)
    box = np.abs(cam - noisy)[100:200, 100:300].mean() * 3072.0
    assert out["structure_mae_units"]["box"] == pytest.approx(box, rel=1e-4)
    assert np.isinf(psnr_batch(cam[None], cam[None])[0])


def test_wasserstein_equals_scipy():
    """Against scipy.stats.wasserstein_distance on seeded samples of unequal sizes, with ties."""
    from scipy.stats import wasserstein_distance

    from pipeline.metrics import wasserstein_1

    rng = np.random.default_rng(0)
    for _ in range(30):
        a = rng.normal(100, 40, rng.integers(1, 400))
        b = np.round(rng.gamma(2.0, 60.0, rng.integers(1, 400)))
        assert wasserstein_1(a, b) == pytest.approx(wasserstein_distance(a, b), abs=1e-9)
    assert wasserstein_1(np.zeros(5), np.full(3, 7.0)) == pytest.approx(7.0)  # closed form


def test_dice_against_a_hand_computation():
    from pipeline.metrics import dice

    truth = np.array([[0, 1, 1, 0], [0, 1, 2, 2], [0, 0, 2, 2]])
    pred = np.array([[0, 1, 0, 0], [1, 1, 2, 0], [0, 0, 2, 2]])
    # class 1: |P| = 3, |T| = 3, overlap 2 → 4/6; class 2: |P| = 3, |T| = 4, overlap 3 → 6/7;
    # class 3 absent from both: undefined (NaN), never a perfect 1
    got = dice(pred[None], truth[None], classes=4)
    np.testing.assert_allclose(got[:2], [4 / 6, 6 / 7])
    assert np.isnan(got[2])


def test_heart_region_leaves_the_body_out():
    """Two slices equal inside the heart and different elsewhere: whole-slice SSIM sees the
    difference, the heart-region SSIM (mask box + margin) does not."""
    from pipeline.metrics import contrast_over, heart_box, heart_ssim, structure_intensities
    from pipeline.privacy import ssim_batch

    rng = np.random.default_rng(1)
    real = rng.random((1, 64, 64))
    fake = rng.random((1, 64, 64))
    mask = np.zeros((1, 64, 64), np.uint8)
    mask[0, 20:30, 24:40] = 1
    mask[0, 30:36, 24:40] = 2
    box = heart_box(mask[0], margin=4)
    assert box == (slice(16, 40), slice(20, 44))
    fake[0][box] = real[0][box]
    assert heart_ssim(real, fake, mask, margin=4)[0] == pytest.approx(1.0)
    assert ssim_batch(real, fake)[0] < 0.5
    assert np.isnan(heart_ssim(real, fake, np.zeros_like(mask))[0])
    values = structure_intensities(
        np.full((1, 64, 64), 0.5), mask, class_names=["bg", "myo", "lv"], scale=1000, offset=-500
    )
    assert set(values) == {"myo", "lv"} and np.all(values["lv"] == 0.0)
    assert contrast_over({"myo": np.array([100.0]), "lv": np.array([300.0, 350])}, "myo") == {
        "lv": pytest.approx(225.0)
    }


def test_contrast_ratio_interval_is_a_percentile_bootstrap_over_images():
    """Against scipy's percentile bootstrap of the same statistic (whole images resampled,
    real and synthetic independently); a batch of identical images has a zero-width interval."""
    from scipy import stats

    from pipeline.metrics import contrast_ratio_interval

    rng = np.random.default_rng(3)
    names = ["bg", "myocardium", "vessel"]

    def stack(n, vessel_mean):
        masks = np.zeros((n, 16, 16), np.uint8)
        masks[:, 2:10, 2:10] = 1
        masks[: n // 2, 4:6, 4:9] = 2  # half the images hold the vessel
        images = np.where(masks == 1, 0.3, 0.0) + rng.normal(0, 0.01, masks.shape)
        vessel = rng.normal(vessel_mean, 0.08, (n, 1, 1))  # each image its own brightness
        return np.where(masks == 2, vessel, images), masks

    real, rm = stack(60, 0.7)
    fake, fm = stack(40, 0.6)
    kw = {"class_names": names, "reference": "myocardium", "scale": 1.0, "offset": 0.0}
    got = contrast_ratio_interval(real, rm, fake, fm, draws=4000, **kw)

    def contrast(images, masks):
        return images[masks == 2].mean() - images[masks == 1].mean()

    def ratio(i_real, i_fake):
        return contrast(fake[i_fake], fm[i_fake]) / contrast(real[i_real], rm[i_real])

    ref = stats.bootstrap(
        (np.arange(60), np.arange(40)),
        ratio,
        vectorized=False,
        n_resamples=4000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    assert set(got) == {"vessel"}
    assert got["vessel"] == pytest.approx((ref.low, ref.high), abs=0.02)
    assert got["vessel"][0] < ratio(np.arange(60), np.arange(40)) < got["vessel"][1]
    same = contrast_ratio_interval(
        real[:1].repeat(5, 0), rm[:1].repeat(5, 0), real[:1].repeat(5, 0), rm[:1].repeat(5, 0), **kw
    )
    assert same["vessel"] == pytest.approx((1.0, 1.0))
    # a real contrast whose own interval reaches 0 (a small real set: "pulmonary_artery 39 vs
    # 101 (39%, −520%–498%)"): no interval, and the reason, instead of a meaningless one
    faint, fm2 = stack(10, 0.3)  # the vessel as bright as the myocardium, ±0.08 per image
    none = contrast_ratio_interval(faint, fm2, fake, fm, draws=2000, **kw)
    assert none == {"vessel": None}
    from pipeline.render import ratio_interval_text

    assert ratio_interval_text(None) == "no interval: the real contrast's own interval reaches 0"
    assert ratio_interval_text((0.82, 0.98)) == "82%–98%"


def test_kid_is_unbiased_and_matches_the_cubic_kernels_closed_form():
    """KID (Bińkowski et al. 2018): the unbiased MMD² under k(x, y) = (x·y / d + 1)³. In one
    dimension k = x³y³ + 3x²y² + 3xy + 1, so MMD² = (Δm₃)² + 3 (Δm₂)² + 3 (Δm₁)² in the raw
    moments: N(0, 1) against N(½, 1) gives (⅛ + 3/2)² + 3 (¼)² + 3 (½)² = 3.578125."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 1)), rng.normal(0.5, 1.0, size=(4000, 1))
    assert kid(a, b) == pytest.approx(3.578125, rel=0.1)
    # unbiased: equal distributions average to 0 even at 20 rows (a biased estimate would not)
    small = [kid(rng.normal(size=(20, 4)), rng.normal(size=(20, 4))) for _ in range(400)]
    assert abs(np.mean(small)) < 3 * np.std(small) / np.sqrt(len(small))
    assert min(small) < 0 < max(small)
    with pytest.raises(ValueError, match="two rows"):
        kid(a[:1], b)


def test_distribution_figures_are_read_against_a_size_matched_real_baseline():
    """The finding (issue 25): the Fréchet ratio compared 64 candidates against all held-out
    slices with two halves of those slices against each other; Fréchet distance grows as the
    samples shrink, so a batch drawn from the real distribution itself scored far from 1. Now
    both sides have the same size and the same reference: such a batch reads about 1."""
    rng = np.random.default_rng(3)
    d, per_patient = 16, 24
    patients = [f"p{i}" for i in range(16) for _ in range(per_patient)]
    real = rng.normal(size=(len(patients), d))
    same = rng.normal(size=(64, d))  # a batch from the real distribution itself
    a, b = np.arange(len(real)) < len(real) // 2, np.arange(len(real)) >= len(real) // 2
    old = frechet_of_features(same, real) / frechet_of_features(real[a], real[b])
    assert old > 1.5  # the old figure: a perfect batch ~2× as far from real as real is (1.97)
    out = matched_distribution(same, real, patients, repeats=20, seed=0)
    assert out["n_matched"] == 64 and out["repeats"] == 20
    assert 0.8 < out["frechet_ratio"] < 1.25, out["frechet_ratio"]
    lo, hi = out["frechet_ratio_ci95"]
    assert lo < 1.0 < hi
    assert out["kid_ci95"][0] < out["kid_baseline"] < out["kid_ci95"][1]
    for name in ("precision", "recall", "density", "coverage"):
        assert abs(out["prdc_k5"][name] - out["prdc_k5_baseline"][name]) < 0.15, name
    shifted = matched_distribution(same + 1.0, real, patients, repeats=20, seed=0)
    assert shifted["frechet_ratio"] > 3 and shifted["frechet_ratio_ci95"][0] > 2
    assert shifted["kid_ci95"][0] > shifted["kid_baseline_ci95"][1]
    # one held-out patient: the halves are random slices of that patient, and it says so
    alone = matched_distribution(same, real[:per_patient], patients[:per_patient], repeats=5)
    assert alone["baseline_split"] == "random slices" and alone["n_matched"] == per_patient // 2


def test_patient_halves_draw_a_new_split_each_repeat_when_patients_differ_in_size():
    """The finding (issue 25): the halves were balanced greedily in order of slice count, so when
    no two patients had the same count (sagittal slices per volume, real patients' slices) every
    seed gave the same split: the demo's sagittal baseline read one split of 4 + 4 volumes twenty
    times, its interval a single point (0.00545–0.00545), and the off-plane ratio rested on it."""
    counts = [21, 24, 26, 27, 29, 30, 33, 35]  # distinct, as sagittal slices per volume are
    patients = [f"p{i}" for i, c in enumerate(counts) for _ in range(c)]
    splits = set()
    for r in range(20):
        ref, cmp_ = patient_halves(patients, [0, r])
        assert len(ref) + len(cmp_) == len(patients) and not set(ref) & set(cmp_)
        assert abs(len(ref) - len(cmp_)) <= max(counts)  # still balanced by slice count
        first = {patients[i] for i in ref}
        assert first and first.isdisjoint({patients[i] for i in cmp_})  # whole patients
        splits.add(frozenset(first))
    assert len(splits) >= 8, len(splits)
    # deterministic for a seed
    assert np.array_equal(patient_halves(patients, [0, 3])[0], patient_halves(patients, [0, 3])[0])


def test_slices_of_synthetic_volumes_are_matched_to_real_patients_volume_for_volume():
    """The finding (issue 25): the baseline matched slice counts only, so 100 slices of 12
    synthetic volumes were weighed against 100 slices of 4 real patients; slices of one volume
    are not independent draws, and volumes drawn from the real process itself read 0.76–0.80,
    flattering every synthetic volume batch. With ``cases`` each repeat takes as many
    synthetic volumes as the comparison half has patients, and the same process reads ~1."""
    d, old, new = 8, [], []
    for t in range(24):
        rng = np.random.default_rng(t)

        def volumes(n: int, rng: np.random.Generator = rng, per: int = 25) -> np.ndarray:
            person = rng.normal(size=(n, 1, d))  # what one volume's slices share
            return (person + 0.5 * rng.normal(size=(n, per, d))).reshape(n * per, d)

        real, syn = volumes(8), volumes(12)
        patients = [f"p{i}" for i in range(8) for _ in range(25)]
        cases = [i for i in range(12) for _ in range(25)]
        old.append(matched_distribution(syn, real, patients, repeats=8, seed=t)["frechet_ratio"])
        out = matched_distribution(syn, real, patients, repeats=8, seed=t, cases=cases)
        new.append(out["frechet_ratio"])
    assert np.mean(old) < 0.9, np.mean(old)
    assert 0.9 < np.mean(new) < 1.15 and 0.85 < np.median(new) < 1.15, (np.mean(new), new)
    # fewer synthetic volumes than patients in the comparison half: as few patients there too
    few = matched_distribution(syn[:50], real, patients, repeats=4, cases=cases[:50])
    assert few["n_matched"] == 50
    with pytest.raises(ValueError, match="cases names 3 candidates"):
        matched_distribution(syn, real, patients, cases=[0, 1, 2])


# ------------------------------------------------------------------------ through the plane


def _phantom_volume(rng, *, z=24, s=32, flicker=False):
    """A smooth blob heart (label 1) in a body (an ellipse), its size varying slowly along z.
    Its brightness is one per person; with ``flicker`` one per *slice*, drawn alike: every
    slice as a real one could be, but not its neighbours' (a painter blind to them)."""
    yy, xx = np.mgrid[:s, :s] / s
    radius = rng.uniform(0.15, 0.25)
    level = rng.uniform(0.4, 0.85)
    vol = np.zeros((z, s, s), np.float32)
    lab = np.zeros((z, s, s), np.uint8)
    body = ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.4) ** 2 < 1
    for k in range(z):
        if flicker:
            level = rng.uniform(0.4, 0.85)
        r = radius * np.sin(np.pi * (k + 1) / (z + 1)) ** 0.5
        heart = (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < r**2
        slice_ = np.where(body, 0.3, 0.0) + np.where(heart, level - 0.3, 0.0)
        vol[k] = slice_ + 0.01 * np.sin(6.0 * np.pi * (yy + k / z))
        lab[k] = heart
    vol += rng.normal(0, 0.005, size=vol.shape).astype(np.float32)
    return np.clip(vol, 0, 1), lab, np.broadcast_to(body, vol.shape)


def test_ks_statistic_matches_scipy_and_a_hand_computation():
    from scipy.stats import ks_2samp

    assert ks_statistic([0, 1, 2], [0.5, 1.5, 2.5]) == pytest.approx(1 / 3)
    assert ks_statistic([0, 1], [5, 6]) == 1.0
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(0.3, 1.2, size=211)
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic)


def test_adjacent_differences_inside_the_body_and_each_structure():
    vol = np.zeros((4, 8, 8), np.float32)
    vol[::2] = 0.2
    vol[1::2] = 0.8
    lab = np.zeros((4, 8, 8), np.uint8)
    lab[:2, 2:4, 2:4] = 1  # a structure in two neighbouring slices only
    lab[3, 5:7, 5:7] = 2  # one slice only: no pair, left out
    body = np.zeros((4, 8, 8), bool)
    body[:, 1:7, 1:7] = True
    body[2, 1, 1] = False  # not inside in both slices: left out of both pairs it is in
    d = adjacent_differences(vol, lab, body, class_names=["bg", "heart", "vessel"])
    assert set(d) == {"body", "heart"}
    assert len(d["body"]) == 3 * 36 - 2
    assert np.allclose(d["body"], 0.6) and np.allclose(d["heart"], 0.6)
    assert len(d["heart"]) == 4


def test_adjacent_agreement_tells_a_flickering_painter_from_real_volumes():
    """Volumes from the real process read like the real ones (KS within the same-size
    real-vs-real baseline's reach); volumes painted with a per-slice offset do not."""
    names = ["bg", "heart"]
    rng = np.random.default_rng(3)
    real = [_phantom_volume(rng) for _ in range(12)]
    patients = [f"p{i}" for i in range(12)]
    same = [_phantom_volume(rng) for _ in range(6)]
    flick = [_phantom_volume(rng, flicker=True) for _ in range(6)]
    diffs = [adjacent_differences(*v, class_names=names) for v in real]
    good = matched_agreement(
        [adjacent_differences(*v, class_names=names) for v in same], diffs, patients, scale=3072.0
    )
    bad = matched_agreement(
        [adjacent_differences(*v, class_names=names) for v in flick], diffs, patients, scale=3072.0
    )
    assert good["n_matched"] == bad["n_matched"] == 6
    assert list(good["regions"]) == ["body", "heart"]
    g, b = good["regions"]["body"], bad["regions"]["body"]
    assert g["ks"] < 0.05 and g["ks"] < 2 * g["ks_base"] + 0.01
    assert good["regions"]["heart"]["ks"] < 0.05
    # the flicker sits in the heart: the body's pooled figure sees a diluted share of it
    assert b["ks"] > 0.1 and b["ks"] > 10 * b["ks_base"]
    bh = bad["regions"]["heart"]
    assert bh["ks"] > 0.5 and bh["w1"] > 10 * good["regions"]["heart"]["w1"]
    assert bh["median_synthetic"] > 3 * bh["median_real"]
    assert b["ks_ci95"][0] <= b["ks"] <= b["ks_ci95"][1]


def test_plane_slices_put_the_head_up_and_keep_slices_through_the_heart():
    z, s = 6, 8
    vol = np.broadcast_to(np.linspace(0, 1, z)[:, None, None], (z, s, s)).astype(np.float32)
    lab = np.zeros((z, s, s), np.uint8)
    lab[:, 2:5, 3] = 1  # a column of heart: three coronal rows, one sagittal column
    ax, ax_lab = plane_slices(vol, lab, "axial", size=s)
    cor, cor_lab = plane_slices(vol, lab, "coronal", size=16)
    sag, _ = plane_slices(vol, lab, "sagittal", size=16)
    assert ax.shape == (6, 8, 8) and np.array_equal(ax_lab, lab)
    assert cor.shape == (3, 16, 16) and sag.shape == (1, 16, 16)
    # head (last slice, value 1) at the top, feet at the bottom, stretched to the side
    assert cor[0, 0, 0] == pytest.approx(1.0) and cor[0, -1, 0] == pytest.approx(0.0)
    assert np.all(np.diff(cor[0, :, 0]) <= 1e-6)
    assert set(np.unique(cor_lab)) == {0, 1}
    with pytest.raises(ValueError, match="unknown plane"):
        plane_slices(vol, lab, "oblique", size=s)


def test_plane_distribution_sees_flicker_through_the_plane_more_than_in_it():
    """Slices that each look right but disagree with their neighbours: within reach of the
    baseline in the axial plane, far off in the coronal and sagittal ones (stripes); volumes
    from the real process are within reach in every plane."""
    rng = np.random.default_rng(5)
    real = [_phantom_volume(rng)[:2] for _ in range(16)]
    patients = [f"p{i}" for i in range(16)]
    flick = [_phantom_volume(rng, flicker=True)[:2] for _ in range(12)]
    same = [_phantom_volume(rng)[:2] for _ in range(12)]

    def thumbs(images: np.ndarray) -> np.ndarray:
        # a feature space that sees texture: 4×4 block means of the image and of its
        # vertical and horizontal gradients' magnitude
        n, s = len(images), images.shape[1]
        parts = [images, np.abs(np.diff(images, axis=1, append=images[:, -1:]))]
        parts.append(np.abs(np.diff(images, axis=2, append=images[:, :, -1:])))
        blocks = [p.reshape(n, 4, s // 4, 4, s // 4).mean((2, 4)).reshape(n, 16) for p in parts]
        return np.concatenate(blocks, axis=1)

    bad = plane_distribution(flick, real, patients, thumbs, size=32, repeats=8)
    good = plane_distribution(same, real, patients, thumbs, size=32, repeats=8)
    assert set(bad["planes"]) == {"axial", "coronal", "sagittal"}
    assert bad["planes"]["coronal"]["slices_real"] > 0
    ratio = {p: bad["planes"][p]["frechet_ratio"] for p in ("axial", "coronal", "sagittal")}
    # measured (16 real, 12 of each; each repeat 8 synthetic volumes against 8 patients):
    # ratios bad 0.56 / 1.35 / 1.37, good 0.61 / 0.49 / 0.50; the same splits for both, so
    # their distances compare directly: bad/good 0.92 in the axial plane, 2.8 off it. (Over
    # seeds 4–11 of this set-up bad reads 2.4–7.6 off-plane/axial and good 0.4–4.4: at 8
    # patients a half, one plane ratio is good to a factor of 2 or so.)
    dist = {p: bad["planes"][p]["frechet_distance"] / good["planes"][p]["frechet_distance"]
            for p in ratio}  # fmt: skip
    assert dist["axial"] < 1.3 and dist["coronal"] > 2.0 and dist["sagittal"] > 2.0
    assert ratio["axial"] < 1.5 and ratio["coronal"] > 1.2 and ratio["sagittal"] > 1.2
    assert max(good["planes"][p]["frechet_ratio"] for p in ratio) < 1.0
    off = bad["off_plane_over_axial"]
    axial = bad["planes"]["axial"]
    for plane in ("coronal", "sagittal"):
        assert off["raw"][plane] == pytest.approx(
            bad["planes"][plane]["frechet_distance"] / axial["frechet_distance"]
        )
        assert off["vs_baseline"][plane] == pytest.approx(ratio[plane] / ratio["axial"])
        assert off["vs_baseline"][plane] > 2.0
        assert good["off_plane_over_axial"]["vs_baseline"][plane] < 1.0
