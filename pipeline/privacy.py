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
    ux, xx = _local_stats(a, win_size)
    uy, yy = _local_stats(b, win_size)
    xy = ndimage.uniform_filter(a * b, size=(1, win_size, win_size))
    return _ssim_from_stats(ux, uy, xx, yy, xy, data_range=data_range, win_size=win_size)


def _local_stats(images: np.ndarray, win_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Local means of x and x² over a ``win_size`` window, per image of an (N, H, W) stack."""
    size = (1, win_size, win_size)
    return ndimage.uniform_filter(images, size=size), ndimage.uniform_filter(images * images, size)


def _ssim_from_stats(
    ux: np.ndarray,
    uy: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    xy: np.ndarray,
    *,
    data_range: float,
    win_size: int,
) -> np.ndarray:
    """Mean SSIM per image from local means of x, y, x², y² and xy, (N, H, W) each; the
    border of half a window is left out, as skimage does."""
    cov_norm = win_size**2 / (win_size**2 - 1)  # sample covariance, as skimage's default
    vx = cov_norm * (xx - ux * ux)
    vy = cov_norm * (yy - uy * uy)
    vxy = cov_norm * (xy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return s[:, pad:-pad, pad:-pad].mean(axis=(1, 2))


def best_shift(a: np.ndarray, b: np.ndarray, max_shift: int) -> tuple[int, int]:
    """Integer (dy, dx) within ±max_shift that best aligns ``b`` to ``a`` (cross-correlation)."""
    fa = np.fft.rfft2(a - a.mean())
    fb = np.fft.rfft2(b - b.mean())
    return _peak_shift(np.fft.irfft2(fa * np.conj(fb), s=a.shape), max_shift)


def _peak_shift(corr: np.ndarray, max_shift: int) -> tuple[int, int]:
    """The (dy, dx) within ±max_shift where a circular cross-correlation peaks."""
    r = max_shift
    rows = np.r_[0 : r + 1, -r:0]  # wrap-around layout: shifts 0..r and -r..-1 on both axes
    window = corr[np.ix_(rows, rows)]
    i, j = np.unravel_index(int(np.argmax(window)), window.shape)
    return int(rows[i]), int(rows[j])


def _spans(
    shape: tuple[int, ...], dy: int, dx: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """((rows, cols) of ``a``, (rows, cols) of ``b``) that overlap when ``b`` is shifted by
    (dy, dx) onto ``a``."""
    h, w = shape[-2:]

    def span(d: int, n: int) -> tuple[slice, slice]:
        return (slice(d, n), slice(0, n - d)) if d >= 0 else (slice(0, n + d), slice(-d, n))

    ay, by = span(dy, h)
    ax, bx = span(dx, w)
    return (ay, ax), (by, bx)


def _overlap(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts of ``a`` and of ``b`` shifted by (dy, dx) that overlap."""
    (ay, ax), (by, bx) = _spans(a.shape, dy, dx)
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
    so a mirrored or slightly moved copy scores like a plain one. SSIM (:func:`ssim_batch` on the
    overlapping parts) compares the images after a Gaussian of ``smooth`` px (added noise cannot
    hide the anatomy a copy took); the texture score is the Pearson correlation of their
    high-pass residuals (:func:`highpass`), which a copy or a blend keeps from its source and a
    different patient does not share.

    Computed for all sources at once: each image's local means of x and x² are filtered once on
    the whole image and cropped (a pixel at least half a window inside an overlap sees only
    overlap pixels, and the SSIM mean leaves out that border), so only the cross term is filtered
    per shift — the same numbers as SSIM on each overlap, several times faster.
    """
    win = 7
    raw = np.asarray(candidate, dtype=np.float64)
    raw_sources = np.asarray(sources, dtype=np.float64)
    cand, srcs = raw, raw_sources
    if smooth > 0:
        cand = ndimage.gaussian_filter(raw, smooth)
        srcs = ndimage.gaussian_filter(raw_sources, (0, smooth, smooth))
    hp_cand, hp_srcs = highpass(raw), highpass(raw_sources)
    views = [(cand, hp_cand), (cand[:, ::-1], hp_cand[:, ::-1])] if flips else [(cand, hp_cand)]
    k = len(srcs)
    if min(cand.shape) < win:
        raise ValueError(f"images of {cand.shape} are smaller than the {win}px window")
    ssim = np.full(k, -1.0)
    texture = np.full(k, -1.0)
    if k == 0:
        return ssim, texture
    mu_s, sq_s = _local_stats(srcs, win)
    f_srcs = np.fft.rfft2(srcs - srcs.mean(axis=(1, 2), keepdims=True))
    for view, hp_view in views:
        view = np.ascontiguousarray(view)
        mu_v, sq_v = (x[0] for x in _local_stats(view[None], win))
        shifts = {j: [(0, 0)] for j in range(k)}
        if max_shift > 0:
            fv = np.conj(np.fft.rfft2(view - view.mean()))
            corr = np.fft.irfft2(f_srcs * fv, s=view.shape, axes=(1, 2))
            for j in range(k):
                best = _peak_shift(corr[j], max_shift)
                if best != (0, 0):
                    shifts[j].append(best)
        by_shift: dict[tuple[int, int], list[int]] = {}
        for j, found in shifts.items():
            for d in found:
                by_shift.setdefault(d, []).append(j)
        for (dy, dx), js in by_shift.items():
            (ay, ax), (by, bx) = _spans(view.shape, dy, dx)
            a = srcs[js][:, ay, ax]
            b = view[by, bx]
            cross = ndimage.uniform_filter(a * b[None], size=(1, win, win))
            n = len(js)
            values = _ssim_from_stats(
                mu_s[js][:, ay, ax],
                np.broadcast_to(mu_v[by, bx], (n, *b.shape)),
                sq_s[js][:, ay, ax],
                np.broadcast_to(sq_v[by, bx], (n, *b.shape)),
                cross,
                data_range=data_range,
                win_size=win,
            )
            for j, value in zip(js, values, strict=True):
                ssim[j] = max(ssim[j], float(value))
                ha, hb = _overlap(hp_srcs[j], hp_view, dy, dx)
                texture[j] = max(texture[j], _pearson(ha, hb))
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

    @property
    def explicit(self) -> bool:
        """A threshold the user set (``--threshold``), not one measured on a baseline."""
        return self.n_baseline == 0

    @classmethod
    def given(cls, threshold: float) -> Calibration:
        """An explicit SSIM threshold, with no baseline behind it."""
        return cls(quantile=float("nan"), threshold=float(threshold), n_baseline=0, baseline=())

    @classmethod
    def from_manifest(cls, stored: dict[str, Any]) -> Calibration:
        """Back from :meth:`summary` / :meth:`to_manifest` (an index manifest's
        ``calibration``, a batch's stored privacy block); baselines are not stored there."""
        quantile = stored.get("quantile")
        texture = stored.get("texture_threshold")
        return cls(
            quantile=float("nan") if quantile is None else float(quantile),
            threshold=float(stored["threshold"]),
            n_baseline=int(stored.get("n_baseline") or 0),
            baseline=(),
            texture_threshold=None if texture is None else float(texture),
        )

    def summary(self) -> dict[str, Any]:
        """The thresholds and where they came from, JSON-ready (stored with every verdict)."""
        return {
            "threshold": self.threshold,
            "texture_threshold": self.texture_threshold,
            "quantile": None if self.explicit else self.quantile,
            "n_baseline": self.n_baseline,
        }

    def to_manifest(self) -> dict[str, Any]:
        """The index manifest's ``calibration`` entry."""
        return {**self.summary(), "explicit": self.explicit}

    def describe(self) -> str:
        """The flag rule in words, e.g. ``SSIM > 0.5529 or texture > 0.0689``."""
        rule = f"SSIM > {self.threshold:.4f}"
        if self.texture_threshold is not None:
            rule += f" or texture > {self.texture_threshold:.4f}"
        return rule

    def provenance(self) -> str:
        """Where the thresholds came from, e.g. ``q0.99 of 8 held-out-vs-training scores``."""
        if self.explicit:
            return "explicit"
        return f"q{self.quantile:g} of {self.n_baseline} held-out-vs-training scores"


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
