"""Pure cores of the privacy filter: SSIM, shift/flip-aligned re-scoring, calibration, flags.

Arrays in, numbers out: no files, no database, no index. The index search lives in
:mod:`pipeline.index`; the command that ties them together in :mod:`pipeline.filtering`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def highpass(images: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Image minus its Gaussian blur: the fine texture (noise grain, small vessels) of a scan."""
    images = np.asarray(images, dtype=np.float64)
    blur = (0,) * (images.ndim - 2) + (sigma, sigma)
    return images - ndimage.gaussian_filter(images, blur)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def aligned_scores(
    candidate: np.ndarray,
    sources: np.ndarray,
    *,
    max_shift: int = 4,
    flips: bool = True,
    smooth: float = 0.0,
    data_range: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Best SSIM and best texture correlation of ``candidate`` against each source (k, H, W).

    The search covers the identity and (with ``flips``) the mirrored candidate, each unshifted
    and at the integer shift (within ±``max_shift`` px) that maximises their cross-correlation,
    so a mirrored or slightly moved copy scores like a plain one. SSIM compares the images after
    a Gaussian of ``smooth`` px (added noise cannot hide the anatomy a copy took); the texture
    score is the Pearson correlation of their high-pass residuals (:func:`highpass`), which a
    copy or a blend keeps from its source and a different patient does not share.
    """
    raw = np.asarray(candidate, dtype=np.float64)
    raw_sources = np.asarray(sources, dtype=np.float64)
    cand, srcs = raw, raw_sources
    if smooth > 0:
        cand = ndimage.gaussian_filter(raw, smooth)
        srcs = ndimage.gaussian_filter(raw_sources, (0, smooth, smooth))
    hp_cand, hp_srcs = highpass(raw), highpass(raw_sources)
    views = [(cand, hp_cand), (cand[:, ::-1], hp_cand[:, ::-1])] if flips else [(cand, hp_cand)]
    firsts, seconds, owners = [], [], []
    texture = np.full(len(srcs), -1.0)
    for j, src in enumerate(srcs):
        for view, hp_view in views:
            shifts = [(0, 0)]
            if max_shift > 0:
                best = best_shift(src, view, max_shift)
                if best != (0, 0):
                    shifts.append(best)
            for dy, dx in shifts:
                a, b = _overlap(src, view, dy, dx)
                firsts.append(a)
                seconds.append(b)
                owners.append(j)
                ha, hb = _overlap(hp_srcs[j], hp_view, dy, dx)
                texture[j] = max(texture[j], _pearson(ha, hb))
    ssim = np.full(len(srcs), -1.0)
    # group pairs by shape so each group is one batched SSIM
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(firsts):
        by_shape.setdefault(a.shape, []).append(i)
    for idx in by_shape.values():
        values = ssim_batch(
            np.stack([firsts[i] for i in idx]),
            np.stack([seconds[i] for i in idx]),
            data_range=data_range,
        )
        for i, value in zip(idx, values, strict=True):
            ssim[owners[i]] = max(ssim[owners[i]], float(value))
    return ssim, texture


def aligned_ssim(candidate: np.ndarray, sources: np.ndarray, **kwargs: Any) -> np.ndarray:
    """The SSIM half of :func:`aligned_scores`."""
    return aligned_scores(candidate, sources, **kwargs)[0]


@dataclass(frozen=True)
class Calibration:
    """The "different person" baseline and the thresholds taken from it.

    Two detectors: SSIM (anatomy) and, when calibrated, texture correlation (the fine grain a
    copy or blend keeps). A candidate is flagged when either is above its threshold; each is set
    at half the tail (``1 - (1 - quantile) / 2``) so together they flag at most ``1 - quantile``
    of different-person slices.
    """

    quantile: float
    threshold: float  # SSIM
    n_baseline: int
    baseline: tuple[float, ...]  # the SSIM scores themselves, for histograms and audits
    texture_threshold: float | None = None
    texture_baseline: tuple[float, ...] = ()

    def flag(self, score: float, texture: float | None = None) -> bool:
        """True when the image is more similar to a source than a different person would be."""
        if score > self.threshold:
            return True
        return (
            self.texture_threshold is not None
            and texture is not None
            and (texture > self.texture_threshold)
        )

    def margin(self, score: float, texture: float | None = None) -> float:
        """Distance below the nearest threshold (negative when flagged)."""
        m = self.threshold - score
        if self.texture_threshold is not None and texture is not None:
            m = min(m, self.texture_threshold - texture)
        return m


def calibrate(
    baseline_scores: np.ndarray,
    texture_scores: np.ndarray | None = None,
    *,
    quantile: float = DEFAULT_QUANTILE,
) -> Calibration:
    """Thresholds from held-out-vs-training scores at ``quantile`` (split between detectors)."""
    scores = np.asarray(baseline_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no baseline scores: calibration needs held-out patients")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile {quantile} must be in [0.5, 1)")
    if texture_scores is None:
        threshold = float(np.quantile(scores, quantile))
        return Calibration(quantile, threshold, int(scores.size), tuple(float(s) for s in scores))
    texture = np.asarray(texture_scores, dtype=np.float64)
    if texture.shape != scores.shape:
        raise ValueError("texture and SSIM baselines differ in length")
    each = 1 - (1 - quantile) / 2
    return Calibration(
        quantile=quantile,
        threshold=float(np.quantile(scores, each)),
        n_baseline=int(scores.size),
        baseline=tuple(float(s) for s in scores),
        texture_threshold=float(np.quantile(texture, each)),
        texture_baseline=tuple(float(t) for t in texture),
    )
