"""Scanner noise for painted volumes (issue 25).

The generator is deterministic: it paints the conditional mean of a slice, without the
quantum noise every real CT slice carries. A loose slice hardly shows it, but a volume does:
two neighbouring real slices differ by their anatomy *and* by two independent draws of noise,
while two painted slices differ by their anatomy alone, so a painted volume's adjacent-slice
differences run far smaller than a real scan's (on the 24-patient phantom, KS 0.16 against the
held-out volumes with their own anatomy painted).

The model is two numbers fitted on the training split only (the held-out volumes stay the
judge): the noise's in-plane correlation, from how the residual of a real training slice
against its own painting correlates with its right-hand neighbour pixel inside uniform regions,
and its amplitude, the one at which the training volumes' painted adjacent-slice differences
(inside the body) match the real ones best (KS). Each candidate draws its own field from
(batch seed, index): independent from slice to slice, as a scanner's noise is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage, stats

from pipeline.metrics import adjacent_differences

#: Amplitudes tried, as a share of the storage range (HU window): 0 … 0.03 (≈ 90 HU in the
#: default 3072-HU window), finer than the KS can tell apart at a few thousand differences.
AMPLITUDES = np.linspace(0.0, 0.03, 61)
#: Largest in-plane correlation (Gaussian sigma, pixels) the residual can claim: beyond it a
#: field is texture, not scanner noise.
MAX_CORRELATION = 3.0


@dataclass(frozen=True)
class NoiseModel:
    """Per-slice noise: zero-mean Gaussian, ``sd`` in [0, 1] storage units, low-passed in-plane
    by a Gaussian of ``correlation`` pixels (0: white); with how well it fitted the training
    volumes (adjacent-slice KS without and with it) and on how many."""

    sd: float
    correlation: float
    ks_without: float
    ks_with: float
    volumes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseModel:
        """The model from :meth:`to_dict`'s fields."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def noise_field(shape: tuple[int, int], correlation: float, rng: np.random.Generator) -> np.ndarray:
    """One slice of zero-mean, unit-variance Gaussian noise, low-passed by ``correlation``
    pixels (0: white); periodic at the edges so every pixel has the same variance."""
    white = rng.standard_normal(shape)
    if correlation <= 0:
        return white.astype(np.float32)
    field = ndimage.gaussian_filter(white, correlation, mode="wrap")
    # the variance of low-passed white noise, exact for a periodic filter: Σ kernel²
    impulse = np.zeros(shape)
    impulse[0, 0] = 1.0
    gain = float(np.sqrt(np.sum(ndimage.gaussian_filter(impulse, correlation, mode="wrap") ** 2)))
    return (field / gain).astype(np.float32)


def add_noise(image: np.ndarray, model: NoiseModel, rng: np.random.Generator) -> np.ndarray:
    """``image`` (S, S) in [0, 1] with one draw of the model's noise, clipped to [0, 1] (the
    storage window clips a real scan's noise the same way)."""
    noisy = image + model.sd * noise_field(image.shape, model.correlation, rng)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def residual_correlation(
    real: np.ndarray, painted: np.ndarray, labels: np.ndarray, bodies: np.ndarray
) -> float:
    """The in-plane correlation (Gaussian sigma, pixels) of what painting leaves out: the
    residual real − painted inside each labelled region and the body's background, each
    eroded by 2 pixels (edges are misfit, not noise) and centred on its median, then the
    correlation ρ of horizontally neighbouring residuals mapped to the sigma whose low-passed
    white noise has it (ρ = exp(−1 / 4σ²)); 0 when ρ is at most 0.05 (white)."""
    res = np.asarray(real, np.float64) - np.asarray(painted, np.float64)
    centred = np.zeros_like(res)
    inner = np.zeros(res.shape, bool)
    for i in range(len(res)):
        regions = np.where(np.asarray(bodies[i], bool), np.asarray(labels[i], int) + 1, 0)
        for c in np.unique(regions[regions > 0]):
            sel = ndimage.binary_erosion(regions == c, iterations=2)
            if sel.sum() > 8:
                inner[i] |= sel
                centred[i][sel] = res[i][sel] - np.median(res[i][sel])
    both = inner[:, :, 1:] & inner[:, :, :-1]
    if both.sum() < 100:
        return 0.0
    a, b = centred[:, :, 1:][both], centred[:, :, :-1][both]
    rho = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    if not np.isfinite(rho) or rho <= 0.05:
        return 0.0
    return float(min(np.sqrt(-1.0 / (4.0 * np.log(min(rho, 0.999)))), MAX_CORRELATION))


def fit_noise(
    real: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    painted: list[np.ndarray],
    *,
    seed: int = 0,
) -> NoiseModel:
    """The noise model of training volumes ``real`` — (image in [0, 1], labels, body outline),
    each (Z, S, S), slices contiguous in z — given each one painted from its own labels:
    correlation from :func:`residual_correlation`, amplitude the one of :data:`AMPLITUDES`
    whose painted-plus-noise adjacent-slice differences inside the body are closest (KS) to
    the real ones. Needs at least one volume of two or more slices."""
    if not real or len(real) != len(painted) or all(len(v[0]) < 2 for v in real):
        raise ValueError("fitting noise needs training volumes of two or more slices")
    correlation = residual_correlation(
        np.concatenate([v[0] for v in real]),
        np.concatenate(painted),
        np.concatenate([v[1] for v in real]),
        np.concatenate([v[2] for v in real]),
    )

    def differences(vols: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(
            [
                adjacent_differences(v, lab, body, class_names=[])["body"]
                for v, (_, lab, body) in zip(vols, real, strict=True)
            ]
        )

    target = differences([v[0] for v in real])
    # one noise draw per slice, scaled per amplitude: the KS curve is then smooth in it
    rng = np.random.default_rng(seed)
    unit = [np.stack([noise_field(p.shape[1:], correlation, rng) for _ in p]) for p in painted]

    def ks(sd: float) -> float:
        vols = [np.clip(p + sd * u, 0.0, 1.0) for p, u in zip(painted, unit, strict=True)]
        return float(stats.ks_2samp(differences(vols), target).statistic)

    scores = [ks(float(a)) for a in AMPLITUDES]
    best = int(np.argmin(scores))
    return NoiseModel(
        sd=float(AMPLITUDES[best]),
        correlation=correlation,
        ks_without=scores[0],
        ks_with=scores[best],
        volumes=len(real),
    )
