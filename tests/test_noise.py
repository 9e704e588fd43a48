"""The scanner-noise model (issue 25): known answers for each of its parts."""

import numpy as np
import pytest
from scipy import ndimage

from pipeline.noise import (
    NoiseModel,
    add_noise,
    fit_noise,
    noise_field,
    residual_correlation,
)


def _volumes(n: int, sd: float, correlation: float, seed: int = 0):
    """``n`` smooth 'painted' volumes (a heart-like disc growing through z inside a body) and
    'real' ones, the same plus known noise."""
    rng = np.random.default_rng(seed)
    real, painted = [], []
    yy, xx = np.mgrid[:48, :48]
    for i in range(n):
        depth = 12 + i
        body = np.zeros((depth, 48, 48), bool)
        body[:, 4:44, 4:44] = True
        labels = np.zeros((depth, 48, 48), np.uint8)
        image = np.where(body, 0.35, 0.0).astype(np.float32)
        for z in range(depth):
            r = 6 + 6 * z / depth
            disc = (yy - 24) ** 2 + (xx - 24) ** 2 < r**2
            labels[z][disc] = 1
            image[z][disc] = 0.45 + 0.002 * z
        noisy = np.stack([noise_field((48, 48), correlation, rng) for _ in range(depth)])
        real.append((np.clip(image + sd * noisy, 0, 1), labels, body))
        painted.append(image)
    return real, painted


@pytest.mark.parametrize("correlation", [0.0, 0.8, 1.5])
def test_noise_field_has_unit_variance_and_its_correlation(correlation):
    rng = np.random.default_rng(1)
    f = np.stack([noise_field((64, 64), correlation, rng) for _ in range(40)])
    assert abs(f.std() - 1.0) < 0.03 and abs(f.mean()) < 0.02
    rho = np.corrcoef(f[:, :, 1:].ravel(), f[:, :, :-1].ravel())[0, 1]
    expected = np.exp(-1 / (4 * correlation**2)) if correlation else 0.0
    assert abs(rho - expected) < 0.03


@pytest.mark.parametrize("correlation", [0.0, 0.8, 1.5])
def test_residual_correlation_recovers_a_known_correlation(correlation):
    real, painted = _volumes(3, 0.02, correlation)
    got = residual_correlation(
        np.concatenate([r[0] for r in real]),
        np.concatenate(painted),
        np.concatenate([r[1] for r in real]),
        np.concatenate([r[2] for r in real]),
    )
    assert abs(got - correlation) < 0.12


def test_fit_noise_recovers_a_known_amplitude_and_closes_the_gap():
    real, painted = _volumes(4, 0.012, 0.8)
    model = fit_noise(real, painted)
    assert abs(model.sd - 0.012) <= 0.001
    assert abs(model.correlation - 0.8) < 0.12
    assert model.ks_without > 0.5 and model.ks_with < 0.05 and model.volumes == 4
    quiet = fit_noise([(p, r[1], r[2]) for p, r in zip(painted, real, strict=True)], painted)
    assert quiet.sd == 0.0 and quiet.ks_with == 0.0  # nothing to add to a noiseless scan
    assert NoiseModel.from_dict(model.to_dict()) == model


def test_fit_noise_needs_neighbouring_slices():
    real, painted = _volumes(1, 0.01, 0.0)
    flat = [(r[0][:1], r[1][:1], r[2][:1]) for r in real]
    with pytest.raises(ValueError, match="two or more slices"):
        fit_noise(flat, [p[:1] for p in painted])
    with pytest.raises(ValueError, match="two or more slices"):
        fit_noise([], [])


def test_add_noise_is_seeded_clipped_and_of_the_model_amplitude():
    model = NoiseModel(sd=0.02, correlation=0.0, ks_without=0.3, ks_with=0.01, volumes=2)
    image = np.full((64, 64), 0.5, np.float32)
    a = add_noise(image, model, np.random.default_rng([0, 3, 26]))
    b = add_noise(image, model, np.random.default_rng([0, 3, 26]))
    c = add_noise(image, model, np.random.default_rng([0, 4, 26]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs((a - image).std() - 0.02) < 0.002 and a.dtype == np.float32
    edge = add_noise(np.zeros((64, 64), np.float32), model, np.random.default_rng(0))
    assert edge.min() == 0.0 and edge.max() <= 1.0  # clipped as the window clips a scan
    blurred = ndimage.gaussian_filter(a, 2)
    assert blurred.std() < (a - image).std()  # white: averaging removes most of it
