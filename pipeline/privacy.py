"""Pure cores of the privacy filter: SSIM, shift/flip-aligned re-scoring, calibration, flags.

Arrays in, numbers out: no files, no database, no index. The index search lives in
:mod:`pipeline.index`; the command that ties them together in :mod:`pipeline.filtering`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numexpr
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
    cov = win_size**2 / (win_size**2 - 1)  # sample covariance, as skimage's default
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pad = (win_size - 1) // 2
    # one fused pass (numexpr: the same IEEE operations in the same order as the numpy
    # expression, without its ten temporaries): the SSIM map is most of the scorer's time
    s = numexpr.evaluate(
        "((2 * ux * uy + c1) * (2 * (cov * (xy - ux * uy)) + c2))"
        " / ((ux * ux + uy * uy + c1) * ((cov * (xx - ux * ux)) + (cov * (yy - uy * uy)) + c2))",
        local_dict={
            "ux": ux,
            "uy": uy,
            "xx": xx,
            "yy": yy,
            "xy": xy,
            "cov": cov,
            "c1": c1,
            "c2": c2,
        },
    )
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


#: The SSIM window (skimage's default).
WIN = 7


@dataclass(frozen=True)
class PreparedImage:
    """What :func:`aligned_scores_prepared` needs of one image, computed once: the image after
    the ``smooth`` Gaussian, its high-pass residual, its local means of x and x² (SSIM window),
    and the FFT of the mean-free smoothed image (the shift search). 2-D float64 arrays."""

    smoothed: np.ndarray
    highpass: np.ndarray
    mu: np.ndarray
    sq: np.ndarray
    fft: np.ndarray

    @property
    def nbytes(self) -> int:
        """Memory held."""
        return sum(x.nbytes for x in (self.smoothed, self.highpass, self.mu, self.sq, self.fft))

    def mirrored(self) -> PreparedImage:
        """The same quantities for the left-right mirror image (the filters are symmetric, so
        only the FFT is computed again)."""
        smoothed = np.ascontiguousarray(self.smoothed[:, ::-1])
        return PreparedImage(
            smoothed,
            np.ascontiguousarray(self.highpass[:, ::-1]),
            np.ascontiguousarray(self.mu[:, ::-1]),
            np.ascontiguousarray(self.sq[:, ::-1]),
            np.fft.rfft2(smoothed - smoothed.mean()),
        )


def prepare_images(images: np.ndarray, *, smooth: float = 0.0) -> list[PreparedImage]:
    """Prepare a (k, H, W) stack for :func:`aligned_scores_prepared` (filtered together)."""
    raw = np.asarray(images, dtype=np.float64)
    if raw.ndim != 3:
        raise ValueError(f"expected a (k, H, W) stack, got {raw.shape}")
    if min(raw.shape[1:]) < WIN:
        raise ValueError(f"images of {raw.shape[1:]} are smaller than the {WIN}px window")
    smoothed = ndimage.gaussian_filter(raw, (0, smooth, smooth)) if smooth > 0 else raw
    mu, sq = _local_stats(smoothed, WIN)
    fft = np.fft.rfft2(smoothed - smoothed.mean(axis=(1, 2), keepdims=True))
    hp = highpass(raw)
    return [
        PreparedImage(
            *(np.ascontiguousarray(x[i]) for x in (smoothed, hp, mu, sq)),
            np.ascontiguousarray(fft[i]),
        )
        for i in range(len(raw))
    ]


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
    """
    view = prepare_images(np.asarray(candidate)[None], smooth=smooth)[0]
    prepared = prepare_images(sources, smooth=smooth) if len(sources) else []
    ssim, texture = aligned_scores_prepared(
        view, prepared, max_shift=max_shift, data_range=data_range
    )
    if flips:
        ssim_m, texture_m = aligned_scores_prepared(
            view.mirrored(), prepared, max_shift=max_shift, data_range=data_range
        )
        ssim, texture = np.maximum(ssim, ssim_m), np.maximum(texture, texture_m)
    return ssim, texture


def aligned_scores_prepared(
    view: PreparedImage,
    sources: list[PreparedImage],
    *,
    max_shift: int = 4,
    data_range: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`aligned_scores` (one orientation) of a prepared image against prepared sources
    (:func:`prepare_images`, same ``smooth``): each image is filtered once whatever the number
    of images it is compared with.

    Each image's local means of x and x² are filtered once on the whole image and cropped (a
    pixel at least half a window inside an overlap sees only overlap pixels, and the SSIM mean
    leaves out that border), so only the cross term is filtered per shift: the same numbers as
    SSIM on each overlap, with a fraction of the filtering.
    """
    ssim = np.full(len(sources), -1.0)
    texture = np.full(len(sources), -1.0)
    conj_view = np.conj(view.fft) if max_shift > 0 else None
    for j, src in enumerate(sources):
        shifts = [(0, 0)]
        if conj_view is not None:
            corr = np.fft.irfft2(src.fft * conj_view, s=view.smoothed.shape)
            best = _peak_shift(corr, max_shift)
            if best != (0, 0):
                shifts.append(best)
        for dy, dx in shifts:
            a_part, b_part = _spans(view.smoothed.shape, dy, dx)
            a, b = src.smoothed[a_part], view.smoothed[b_part]
            cross = ndimage.uniform_filter(a * b, size=WIN)
            value = _ssim_from_stats(
                src.mu[a_part][None],
                view.mu[b_part][None],
                src.sq[a_part][None],
                view.sq[b_part][None],
                cross[None],
                data_range=data_range,
                win_size=WIN,
            )[0]
            ssim[j] = max(ssim[j], float(value))
            texture[j] = max(texture[j], _pearson(src.highpass[a_part], view.highpass[b_part]))
    return ssim, texture


def aligned_ssim(candidate: np.ndarray, sources: np.ndarray, **kwargs: Any) -> np.ndarray:
    """The SSIM half of :func:`aligned_scores`."""
    return aligned_scores(candidate, sources, **kwargs)[0]


#: Share of the planted copies a detector sees that its threshold must stay below.
COPY_RECALL = 0.99


def conformal_pvalues(baseline: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values of ``scores`` against a "different person" baseline of n scores:
    ``p = (1 + #{baseline ≥ score}) / (n + 1)``.

    For a score exchangeable with the baseline (another patient's slice), ``P(p ≤ a) ≤ a`` for
    every ``a``, whatever the distribution: a small p says "more similar than different people
    are", with an error rate one can state.

    References
    ----------
    Vovk, Gammerman & Shafer (2005), Algorithmic Learning in a Random World, ch. 2.
    Angelopoulos & Bates (2021), A Gentle Introduction to Conformal Prediction, arXiv:2107.07511.
    """
    b = np.sort(np.asarray(baseline, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_least = len(b) - np.searchsorted(b, s, side="left")
    return (1.0 + at_least) / (len(b) + 1.0)


def order_statistic(baseline: np.ndarray, alpha: float) -> tuple[float | None, int]:
    """The threshold with an exact finite-sample bound: the k-th largest of n baseline scores
    with ``k = ⌊α (n + 1)⌋`` (the ⌈(n + 1)(1 − α)⌉-th smallest). A new exchangeable score lands
    strictly above it with probability at most ``k / (n + 1) ≤ α``. Returns (threshold, k), or
    (None, 0) when ``n < 1/α − 1``: then no baseline score can carry the bound."""
    b = np.sort(np.asarray(baseline, dtype=np.float64))
    k = int(np.floor(alpha * (len(b) + 1) + 1e-9))
    if k < 1 or len(b) == 0:
        return None, 0
    return float(b[len(b) - k]), k


def patient_risk_bound(flagged: np.ndarray, patients: np.ndarray) -> float:
    """Bound on a new patient's expected share of flagged slices, from the leave-one-patient-out
    flags of P patients: ``(1 + Σ_p r_p) / (P + 1)``, r_p the share of patient p's slices
    flagged. Patients are the exchangeable unit (a patient's slices are not independent draws)
    and a share is at most 1, so this holds in finite samples for thresholds at least as strict
    as the flags it is given (conformal risk control). Zero flags still leave ``1/(P + 1)``.

    References
    ----------
    Angelopoulos, Bates, Fisch, Lei & Schuster (2024), Conformal Risk Control. ICLR.
    """
    flagged = np.asarray(flagged, dtype=bool)
    patients = np.asarray(patients)
    if flagged.shape != patients.shape or flagged.size == 0:
        raise ValueError("one patient per flag, and at least one")
    rates = [float(flagged[patients == p].mean()) for p in np.unique(patients)]
    return (1.0 + sum(rates)) / (len(rates) + 1.0)


@dataclass(frozen=True)
class Detector:
    """One detector's threshold and what is known about it."""

    name: str  # ssim | texture
    threshold: float
    floor: float  # the order statistic (the baseline maximum when n is too small)
    bound: float  # P(a different person's slice scores above the threshold) ≤ bound
    certified: bool  # the bound meets the requested share
    copy_edge: float | None  # low edge of the planted copies above the floor (COPY_RECALL)
    baseline_rate: float  # share of the baseline above the threshold (in-sample)
    copy_rate: float | None  # share of all planted copies above the threshold

    @property
    def margin(self) -> float | None:
        """Gap between the different-person tail (floor) and the planted-copy tail."""
        return None if self.copy_edge is None else self.copy_edge - self.floor


def place_threshold(
    name: str, baseline: np.ndarray, copies: np.ndarray | None, *, alpha: float
) -> Detector:
    """A detector's threshold between the two tails.

    The floor is :func:`order_statistic` at ``alpha`` (exact bound ``k/(n+1)``); when the
    baseline is too small for ``alpha``, the baseline maximum (bound ``1/(n+1)``, the best any
    threshold can state from n scores). With planted copies, the threshold moves halfway from the
    floor to the low edge of the copies above the floor (their ``1 − COPY_RECALL`` quantile):
    raising it never weakens the bound, and keeps the copies the detector catches caught.
    """
    b = np.asarray(baseline, dtype=np.float64)
    n = len(b)
    floor, k = order_statistic(b, alpha)
    certified = floor is not None
    if floor is None:
        floor, k = float(b.max()), 1
    threshold, edge, copy_rate = floor, None, None
    if copies is not None and len(copies):
        c = np.asarray(copies, dtype=np.float64)
        seen = c[c > floor]
        if len(seen):
            edge = float(np.quantile(seen, 1.0 - COPY_RECALL))
            threshold = (floor + edge) / 2.0
        copy_rate = float(np.mean(c > threshold))
    return Detector(
        name=name,
        threshold=float(threshold),
        floor=float(floor),
        bound=k / (n + 1.0),
        certified=certified,
        copy_edge=edge,
        baseline_rate=float(np.mean(b > threshold)),
        copy_rate=copy_rate,
    )


@dataclass(frozen=True)
class Calibration:
    """The "different person" baseline, the planted-copy tail and the thresholds between them.

    Two detectors: SSIM (anatomy) and, when calibrated, texture correlation (the fine grain a
    copy or blend keeps). A slice is flagged when either is above its threshold. Each detector
    gets half the requested tail ``1 - quantile``, so the stated ``bound`` (the sum of the
    detectors' exact bounds) caps the share of different people's slices flagged.
    """

    quantile: float
    threshold: float  # SSIM
    n_baseline: int
    baseline: tuple[float, ...]  # the SSIM scores themselves, for p-values and histograms
    texture_threshold: float | None = None
    texture_baseline: tuple[float, ...] = ()
    bound: float | None = None  # a new patient's expected share of slices flagged ≤ bound
    certified: bool = True  # the bound meets 1 - quantile
    note: str | None = None  # one line when the baseline is too small for the quantile
    detectors: tuple[Detector, ...] = ()
    recall: float | None = None  # share of planted copies flagged
    planted_recall: dict[str, float] = field(default_factory=dict)
    indistinct: tuple[str, ...] = ()  # planted kinds below COPY_RECALL at these thresholds
    planted: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # kind → scores
    method: str = "leave-one-patient-out"
    slice_bound: float | None = None  # the order-statistic bound, were slices exchangeable
    n_patients: int = 0  # patients behind the baseline (0: slices taken as exchangeable)
    set_by: str | None = None  # a hand-set rule: who set it (the OS account) ...
    set_at: str | None = None  # ... and when (UTC, ISO 8601)

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

    def p_value(self, score: float, texture: float | None = None) -> float | None:
        """Conformal p-value of one image against the baseline (Bonferroni over the detectors:
        ``min(1, D · min p_d)``); None without a stored baseline."""
        found = self.p_values(np.array([score]), None if texture is None else np.array([texture]))
        return None if found is None else float(found[0])

    def p_values(self, scores: np.ndarray, textures: np.ndarray | None = None) -> np.ndarray | None:
        """:meth:`p_value` of many images at once (each baseline sorted once)."""
        if not self.baseline:
            return None
        p = conformal_pvalues(np.array(self.baseline), np.asarray(scores, np.float64))
        if self.texture_baseline and textures is not None:
            tex = conformal_pvalues(np.array(self.texture_baseline), np.asarray(textures))
            return np.minimum(1.0, 2.0 * np.minimum(p, tex))
        return p

    @property
    def explicit(self) -> bool:
        """A threshold the user set (``--threshold``), not one measured on a baseline."""
        return self.n_baseline == 0

    @classmethod
    def given(
        cls, threshold: float, *, set_by: str | None = None, set_at: str | None = None
    ) -> Calibration:
        """An explicit SSIM threshold, with no baseline behind it, and who set it when."""
        return cls(
            quantile=float("nan"),
            threshold=float(threshold),
            n_baseline=0,
            baseline=(),
            certified=False,
            method="explicit",
            set_by=set_by,
            set_at=set_at,
        )

    @classmethod
    def from_manifest(cls, stored: dict[str, Any]) -> Calibration:
        """Back from :meth:`to_manifest` (an index manifest's ``calibration``) or
        :meth:`summary` (a batch's stored privacy block, without the score lists)."""
        quantile = stored.get("quantile")
        texture = stored.get("texture_threshold")
        return cls(
            quantile=float("nan") if quantile is None else float(quantile),
            threshold=float(stored["threshold"]),
            n_baseline=int(stored.get("n_baseline") or 0),
            baseline=tuple(stored.get("baseline") or ()),
            texture_threshold=None if texture is None else float(texture),
            texture_baseline=tuple(stored.get("texture_baseline") or ()),
            bound=stored.get("bound"),
            certified=bool(stored.get("certified", True)),
            note=stored.get("note"),
            detectors=tuple(Detector(**d) for d in stored.get("detectors") or ()),
            recall=stored.get("recall"),
            planted_recall=dict(stored.get("planted_recall") or {}),
            indistinct=tuple(stored.get("indistinct") or ()),
            planted=dict(stored.get("planted") or {}),
            method=stored.get("method") or ("explicit" if not stored.get("n_baseline") else ""),
            slice_bound=stored.get("slice_bound"),
            n_patients=int(stored.get("n_patients") or 0),
            set_by=stored.get("set_by"),
            set_at=stored.get("set_at"),
        )

    def summary(self) -> dict[str, Any]:
        """The thresholds and what they promise, JSON-ready (stored with every verdict)."""
        return {
            "threshold": self.threshold,
            "texture_threshold": self.texture_threshold,
            "quantile": None if self.explicit else self.quantile,
            "n_baseline": self.n_baseline,
            "bound": self.bound,
            "certified": self.certified,
            "recall": self.recall,
            "method": self.method,
            "note": self.note,
            "n_patients": self.n_patients,
            "slice_bound": self.slice_bound,
            "set_by": self.set_by,
            "set_at": self.set_at,
        }

    def to_manifest(self) -> dict[str, Any]:
        """The index manifest's ``calibration`` entry: the summary, each detector, the planted
        recall per kind, and the score lists (p-values and histograms need them)."""
        return {
            **self.summary(),
            "explicit": self.explicit,
            "detectors": [{**asdict(d)} for d in self.detectors],
            "planted_recall": self.planted_recall,
            "indistinct": list(self.indistinct),
            "baseline": sorted(self.baseline),
            "texture_baseline": sorted(self.texture_baseline),
            "planted": self.planted,
        }

    def describe(self) -> str:
        """The flag rule in words, e.g. ``SSIM > 0.5529 or texture > 0.0689``; a hand-set rule
        says so, with who and when, and that a threshold of 1 flags nothing."""
        rule = f"SSIM > {self.threshold:.4f}"
        if self.texture_threshold is not None:
            rule += f" or texture > {self.texture_threshold:.4f}"
        if self.explicit:  # said wherever the rule is shown: CLI, app, reports, datasheet
            who = f" by {self.set_by}" if self.set_by else ""
            when = f" at {self.set_at}" if self.set_at else ""
            rule += f", hand-set{who}{when}, not calibrated"
            if self.threshold >= 1.0:
                rule += ": it flags nothing"
        return rule

    def provenance(self) -> str:
        """Where the thresholds came from and what they promise, in one phrase."""
        if self.explicit:
            return "explicit"
        what = f"{self.n_baseline} {self.method or 'baseline'} scores"
        if self.n_patients:
            what += f" of {self.n_patients} patients"
        if self.bound is None:  # a calibration stored before bounds were stated
            return f"q{self.quantile:g} of {what}"
        size = "" if self.certified else f", too few for q{self.quantile:g}"
        who = "a new patient's" if self.n_patients else "different-person"
        recall = "" if self.recall is None else f", planted-copy recall {self.recall:.1%}"
        return f"{what}{size}: {who} flag rate ≤ {self.bound:.3g}{recall}"


def calibrate(
    baseline_scores: np.ndarray,
    texture_scores: np.ndarray | None = None,
    *,
    quantile: float = DEFAULT_QUANTILE,
    planted: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
    patients: np.ndarray | list[str] | None = None,
    method: str = "leave-one-patient-out",
) -> Calibration:
    """Thresholds from "different person" scores (SSIM, and texture when given) and, when
    given, planted-copy scores per kind (``kind → (ssim, texture)``): each detector's threshold
    by :func:`place_threshold` at half of ``1 - quantile``; the bound, the planted recall per
    kind and the kinds that cannot be told apart from a different person at this size.

    ``patients`` (whose slice each baseline score is) makes the patient the exchangeable unit,
    as it is: a patient's slices are alike, so n slices are not n independent draws. The
    stated bound is then twice :func:`patient_risk_bound` of the final thresholds (a new
    patient is compared with one more patient than each leave-one-out patient was), a new
    patient's expected flag rate; without it, the slice-level order-statistic bound.
    """
    scores = np.asarray(baseline_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no baseline scores: calibration needs scores of different patients")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile {quantile} must be in [0.5, 1)")
    texture = None if texture_scores is None else np.asarray(texture_scores, dtype=np.float64)
    if texture is not None and texture.shape != scores.shape:
        raise ValueError("texture and SSIM baselines differ in length")
    planted = planted or {}
    alpha = (1.0 - quantile) / (1 if texture is None else 2)
    copies_s = np.concatenate([np.asarray(v[0]) for v in planted.values()]) if planted else None
    detectors = [place_threshold("ssim", scores, copies_s, alpha=alpha)]
    if texture is not None:
        copies_t = (
            np.concatenate([np.asarray(v[1]) for v in planted.values() if v[1] is not None])
            if planted
            else None
        )
        detectors.append(place_threshold("texture", texture, copies_t, alpha=alpha))
    thr = detectors[0].threshold
    tex_thr = detectors[1].threshold if texture is not None else None

    def caught(s: np.ndarray, t: np.ndarray | None) -> np.ndarray:
        hit = np.asarray(s) > thr
        return hit | (np.asarray(t) > tex_thr) if tex_thr is not None and t is not None else hit

    per_kind = {k: float(np.mean(caught(*v))) for k, v in planted.items()}
    recall = (
        float(np.mean(np.concatenate([caught(*v) for v in planted.values()]))) if planted else None
    )
    slice_bound = min(1.0, sum(d.bound for d in detectors))
    if patients is None:  # slices taken as exchangeable: the order-statistic bound
        bound, certified, unit, n_units = slice_bound, all(d.certified for d in detectors), "", 0
    else:
        flagged = caught(scores, texture)
        # corrected for the reference set: each calibration patient met P - 1 others, a new
        # patient meets P; its best over P exceeds the threshold only if its best over one of
        # two (P - 1)-subsets covering them does, so twice the leave-one-out bound holds
        bound = min(1.0, 2.0 * patient_risk_bound(flagged, np.asarray(patients)))
        n_units = len(set(np.asarray(patients).tolist()))
        certified, unit = bound <= 1.0 - quantile, "patients"
    note = None
    if not certified:
        if unit:
            needed = int(np.ceil(2.0 / (1.0 - quantile))) - 1
            what = f"{n_units} patients are too few to bound a new patient's flag rate at "
            what += f"{1.0 - quantile:.3g}"
        else:
            needed = int(np.ceil(1.0 / alpha)) - 1
            what = f"{scores.size} different-person scores are too few for q{quantile:g}"
        note = (
            f"{what} (needs {needed}); the bound at this size is "
            f"{bound:.3g}, and the thresholds sit halfway from the different-person tail to the "
            "planted-copy tail"
        )
    return Calibration(
        quantile=quantile,
        threshold=thr,
        n_baseline=int(scores.size),
        baseline=tuple(float(x) for x in scores),
        texture_threshold=tex_thr,
        texture_baseline=() if texture is None else tuple(float(x) for x in texture),
        bound=bound,
        certified=certified,
        note=note,
        slice_bound=slice_bound,
        n_patients=n_units,
        detectors=tuple(detectors),
        recall=recall,
        planted_recall=per_kind,
        indistinct=tuple(k for k, r in per_kind.items() if r < COPY_RECALL),
        planted={
            k: {
                "ssim": [float(x) for x in v[0]],
                "texture": [] if v[1] is None else [float(x) for x in v[1]],
            }
            for k, v in planted.items()
        },
        method=method,
    )


def centre_masks(masks: np.ndarray) -> np.ndarray:
    """Label maps (N, H, W) each moved by whole pixels (no wrap-around) so that its
    foreground's centre of mass sits at the image centre; empty maps stay as they are. A
    shifted copy of a patient's label map is still that patient's anatomy: centred, the shift
    is gone (measured on the phantom: a deformed copy's Dice with its source 0.45 uncentred,
    0.74 centred)."""
    from scipy import ndimage

    from pipeline.augment import shift

    out = np.zeros_like(masks)
    for i, m in enumerate(masks):
        if not m.any():
            out[i] = m
            continue
        cy, cx = ndimage.center_of_mass(m > 0)
        h, w = m.shape
        out[i] = shift(m, round(h / 2 - cy), round(w / 2 - cx)) if m.min() == 0 else m
    return out


def mask_best(
    candidates: np.ndarray, sources: np.ndarray, n_classes: int, *, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate label map's best multi-label Dice with any source label map (both
    already centred: :func:`centre_masks`), and which source; in chunks, so memory stays
    (chunk × sources)."""
    from pipeline.membership import mask_similarity

    best = np.zeros(len(candidates), np.float64)
    arg = np.zeros(len(candidates), np.int64)
    for lo in range(0, len(candidates), chunk):
        sim = mask_similarity(candidates[lo : lo + chunk], sources, n_classes)
        best[lo : lo + chunk] = sim.max(1) if sim.size else 0.0
        arg[lo : lo + chunk] = sim.argmax(1) if sim.size else 0
    return best, arg
