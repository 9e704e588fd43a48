"""Pure cores of the privacy filter: SSIM, shift/flip-aligned re-scoring, calibration, flags.

Arrays in, numbers out: no files, no database, no index. The index search lives in
:mod:`pipeline.index`; the command that ties them together in :mod:`pipeline.filtering`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Default quantile of the "different person" similarity distribution used as the threshold.
DEFAULT_QUANTILE = 0.99


def ssim_batch(
    a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0, win_size: int = 7
) -> np.ndarray:
    """Mean SSIM of each pair ``(a[i], b[i])`` of (N, H, W) stacks.

    Equal to ``skimage.metrics.structural_similarity(a[i], b[i], data_range=data_range)`` with
    its defaults (7×7 uniform window, sample covariance, K1=0.01, K2=0.03, mean over the
    region away from the border), computed for the whole stack at once.

    References
    ----------
    Wang, Bovik, Sheikh & Simoncelli (2004), Image quality assessment: from error visibility to
    structural similarity. IEEE TIP 13(4).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (N, H, W) stacks of one shape, got {a.shape}, {b.shape}")
    if min(a.shape[1:]) < win_size:
        raise ValueError(f"images of {a.shape[1:]} are smaller than the {win_size}px window")
    size = (1, win_size, win_size)

    def mean(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=size)

    cov_norm = win_size**2 / (win_size**2 - 1)  # sample covariance, as skimage's default
    ux, uy = mean(a), mean(b)
    vx = cov_norm * (mean(a * a) - ux * ux)
    vy = cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return s[:, pad:-pad, pad:-pad].mean(axis=(1, 2))


def best_shift(a: np.ndarray, b: np.ndarray, max_shift: int) -> tuple[int, int]:
    """Integer (dy, dx) within ±max_shift that best aligns ``b`` to ``a`` (cross-correlation)."""
    fa = np.fft.rfft2(a - a.mean())
    fb = np.fft.rfft2(b - b.mean())
    corr = np.fft.irfft2(fa * np.conj(fb), s=a.shape)
    r = max_shift
    # wrap-around layout: shifts 0..r and -r..-1 on both axes
    rows = np.r_[0 : r + 1, -r:0]
    window = corr[np.ix_(rows, rows)]
    i, j = np.unravel_index(int(np.argmax(window)), window.shape)
    return int(rows[i]), int(rows[j])


def _overlap(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts of ``a`` and of ``b`` shifted by (dy, dx) that overlap."""
    h, w = a.shape

    def span(d: int, n: int) -> tuple[slice, slice]:
        return (slice(d, n), slice(0, n - d)) if d >= 0 else (slice(0, n + d), slice(-d, n))

    ay, by = span(dy, h)
    ax, bx = span(dx, w)
    return a[ay, ax], b[by, bx]


def aligned_ssim(
    candidate: np.ndarray,
    sources: np.ndarray,
    *,
    max_shift: int = 4,
    flips: bool = True,
    smooth: float = 0.0,
    data_range: float = 1.0,
) -> np.ndarray:
    """Best SSIM of ``candidate`` against each of ``sources`` (k, H, W) over a small search.

    The search covers the identity and the horizontally flipped candidate, each unshifted and at
    the integer shift (within ±``max_shift`` px) that maximises their cross-correlation, so a
    flipped or slightly moved copy scores as high as a plain one. ``smooth`` > 0 compares
    Gaussian-smoothed images (sigma in pixels), so that pixel noise added to a copy does not
    hide the anatomy it copied.
    """
    candidate = np.asarray(candidate, dtype=np.float64)
    sources = np.asarray(sources, dtype=np.float64)
    if smooth > 0:
        candidate = ndimage.gaussian_filter(candidate, smooth)
        sources = ndimage.gaussian_filter(sources, (0, smooth, smooth))
    variants = [candidate, candidate[:, ::-1]] if flips else [candidate]
    firsts, seconds, owners = [], [], []
    for j, src in enumerate(sources):
        for v in variants:
            firsts.append(src)
            seconds.append(v)
            owners.append(j)
            if max_shift > 0:
                dy, dx = best_shift(src, v, max_shift)
                if dy or dx:
                    a, b = _overlap(src, v, dy, dx)
                    firsts.append(a)
                    seconds.append(b)
                    owners.append(j)
    scores = np.full(len(sources), -1.0)
    # group pairs by shape so each group is one batched SSIM
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(firsts):
        by_shape.setdefault(a.shape, []).append(i)
    for idx in by_shape.values():
        s = ssim_batch(
            np.stack([firsts[i] for i in idx]),
            np.stack([seconds[i] for i in idx]),
            data_range=data_range,
        )
        for i, value in zip(idx, s, strict=True):
            scores[owners[i]] = max(scores[owners[i]], float(value))
    return scores


@dataclass(frozen=True)
class Calibration:
    """The "different person" baseline and the threshold taken from it."""

    quantile: float
    threshold: float
    n_baseline: int
    baseline: tuple[float, ...]  # the scores themselves, for histograms and audits

    def flag(self, score: float) -> bool:
        """True when ``score`` is more similar than the threshold: too close to a source."""
        return score > self.threshold


def calibrate(baseline_scores: np.ndarray, *, quantile: float = DEFAULT_QUANTILE) -> Calibration:
    """Threshold = the ``quantile`` of held-out-vs-training similarity scores."""
    scores = np.asarray(baseline_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no baseline scores: calibration needs held-out patients")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile {quantile} must be in [0.5, 1)")
    threshold = float(np.quantile(scores, quantile))
    return Calibration(quantile, threshold, int(scores.size), tuple(float(s) for s in scores))
