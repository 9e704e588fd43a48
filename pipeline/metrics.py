"""Pure quality metrics: paired fidelity, Fréchet distance, KID, precision/recall/density/coverage,
and their size-matched real-vs-real baselines.

Arrays in, numbers out: no files, no database, no models. Features come from a ``feature_fn``
chosen by the caller (the project encoder by default), and every distribution number is named
by that feature space wherever it is reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import linalg

from pipeline.preprocess import MIN_FOREGROUND, foreground_fraction
from pipeline.privacy import ssim_batch


def psnr_batch(real: np.ndarray, fake: np.ndarray, *, data_range: float = 1.0) -> np.ndarray:
    """PSNR (dB) of each pair of (N, H, W) stacks; identical pairs give +inf."""
    mse = np.mean((np.asarray(real, np.float64) - np.asarray(fake, np.float64)) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def paired_fidelity(
    real: np.ndarray,
    fake: np.ndarray,
    masks: np.ndarray,
    *,
    class_names: list[str],
    scale: float,
) -> dict[str, object]:
    """SSIM, PSNR and MAE per pair (images in [0, 1], ``data_range=1``) and the mean absolute
    error inside each structure in source units (``scale`` = units per [0, 1]: the HU window's
    width for HU sources, 255 for display-unit sources).
    """
    real = np.asarray(real, np.float32)
    fake = np.asarray(fake, np.float32)
    ssim = ssim_batch(real, fake, data_range=1.0)
    psnr = psnr_batch(real, fake)
    mae = np.mean(np.abs(real - fake), axis=(1, 2))
    per_structure: dict[str, float | None] = {}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        inside = masks == c
        n = int(inside.sum())
        per_structure[name] = (
            float(np.abs(real[inside] - fake[inside]).mean() * scale) if n else None
        )
    return {
        "ssim": ssim,
        "psnr": psnr,
        "mae": mae,
        "structure_mae_units": per_structure,
    }


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of a feature matrix."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least two feature rows, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½).

    References
    ----------
    Dowson & Landau (1982); Heusel et al. (2017), GANs trained by a two time-scale update rule
    converge to a local Nash equilibrium (FID). Same computation as pytorch-fid's.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two distributions have different dimensions")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if caught or not np.isfinite(covmean).all():
        # the covariance product can be near-singular (fewer samples than features): add eps
        # to the diagonal as pytorch-fid does, but relative to the features' mean variance so
        # that features of any scale are regularised alike
        scale = (np.trace(sigma1) + np.trace(sigma2)) / (2 * len(sigma1)) or 1.0
        offset = np.eye(len(sigma1)) * eps * scale
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # numerical noise from sqrtm
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_of_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature matrices."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


@dataclass(frozen=True)
class PRDC:
    """Precision, recall, density and coverage of fake features against real ones."""

    precision: float
    recall: float
    density: float
    coverage: float


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between rows (float64, clipped at 0 before the root)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _kth_neighbour(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest other row."""
    d = _pairwise(x, x)
    return np.partition(d, k, axis=1)[:, k]  # column 0 is the row itself (distance 0)


def prdc(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> PRDC:
    """Naeem et al. (2020) precision / recall / density / coverage with k nearest neighbours.

    References
    ----------
    Naeem, Oh, Uh, Choi & Yoo (2020), Reliable fidelity and diversity metrics for generative
    models. ICML. (Reference implementation: the ``prdc`` package.)
    """
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} real and fake samples")
    r_radius = _kth_neighbour(real, k)
    f_radius = _kth_neighbour(fake, k)
    d = _pairwise(real, fake)  # (real, fake)
    inside = d < r_radius[:, None]
    precision = float(inside.any(axis=0).mean())
    recall = float((d < f_radius[None, :]).any(axis=1).mean())
    density = float(inside.sum(axis=0).mean() / k)
    coverage = float((d.min(axis=1) < r_radius).mean())
    return PRDC(precision, recall, density, coverage)


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Kernel inception distance of two feature matrices: the unbiased estimate of the squared
    maximum mean discrepancy under the cubic kernel k(x, y) = (x·y / d + 1)³. Unbiased, so
    two samples of one distribution average 0 at any size (single estimates can be negative),
    unlike Fréchet distance, which grows as the samples shrink.

    References
    ----------
    Bińkowski, Sutherland, Arbel & Gretton (2018), Demystifying MMD GANs. ICLR.
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) < 2 or len(y) < 2:
        raise ValueError(f"KID needs at least two rows on each side, got {x.shape} and {y.shape}")
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def patient_halves(patients: list[str], seed: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the real slices: by patient when there are two or more (different people
    against different people, as candidates against real), balanced by slice count; by seeded
    random slices otherwise. Each seed draws its own split: patients are taken in a seeded
    random order, each to the half with fewer slices so far (the halves differ by at most one
    patient's count). Taking them largest first balanced better but, when no two patients had
    the same count, gave every seed the same split, and a baseline "over repeats" of one."""
    rng = np.random.default_rng(seed)
    names = sorted(set(patients))
    idx = np.arange(len(patients))
    if len(names) < 2:
        order = rng.permutation(idx)
        return np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    counts = {n: patients.count(n) for n in names}
    groups: tuple[list[str], list[str]] = ([], [])
    sizes = [0, 0]
    for n in rng.permutation(names).tolist():
        g = int(sizes[1] < sizes[0])
        groups[g].append(n)
        sizes[g] += counts[n]
    first = np.array([p in groups[0] for p in patients])
    return idx[first], idx[~first]


def _spread(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def matched_distribution(
    candidates: np.ndarray,
    real: np.ndarray,
    patients: list[str],
    *,
    repeats: int = 20,
    seed: int = 0,
    k: int = 5,
    cases: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Fréchet distance, KID and PRDC of candidate features against real ones, each beside a
    real-vs-real baseline of the same size. Per repeat the real slices split into a reference
    half and a comparison half by patient (:func:`patient_halves`, seeded anew), then n
    candidates and n comparison slices (n the smaller count, drawn without replacement) are
    each compared with the reference: the two figures differ only in what is compared, not in
    sample size. ``cases`` (the synthetic volume of each candidate, when candidates are slices
    of volumes): the sizes match in volumes too — per repeat as many synthetic volumes as the
    comparison half has patients (or all, when fewer), drawn anew — since slices of one volume
    are not independent draws, and 12 synthetic volumes against 4 real patients read closer
    to the reference than real patients do even when drawn from the same process. Reported:
    means over repeats, and 2.5–97.5% intervals over repeats (which patients form the
    reference, which volumes and slices are drawn). The Fréchet ratio is of the means; KID has
    no ratio (its baseline is near 0 by design), read it against its baseline."""
    cand, feats = np.asarray(candidates, np.float64), np.asarray(real, np.float64)
    if cases is not None and len(cases) != len(cand):
        raise ValueError(f"cases names {len(cases)} candidates, there are {len(cand)}")
    owner = None if cases is None else np.asarray(cases)
    fd, fd_base, ratio, kd, kd_base = [], [], [], [], []
    pr: list[PRDC] = []
    pr_base: list[PRDC] = []
    n = 0
    matched: list[int] = []  # synthetic volumes per repeat
    for r in range(repeats):
        ref, cmp_ = patient_halves(patients, [seed, r])
        rng = np.random.default_rng([seed, r, 1])
        pool = np.arange(len(cand))
        if owner is not None:
            people = sorted({patients[i] for i in cmp_})
            names = np.unique(owner)
            m = min(len(people), len(names))
            pick = rng.choice(names, m, replace=False)
            pool = pool[np.isin(owner, pick)]
            matched.append(m)
            if m < len(people):  # fewer volumes than patients: as few patients, too
                keep = set(rng.choice(people, m, replace=False).tolist())
                cmp_ = np.array([i for i in cmp_ if patients[i] in keep])
        n = min(len(pool), len(cmp_))
        c = cand[np.sort(rng.choice(pool, n, replace=False))]
        q = feats[np.sort(rng.choice(cmp_, n, replace=False))]
        base = feats[ref]
        base_stats = feature_stats(base)  # the reference's Gaussian, once for both sides
        fd.append(frechet_distance(*feature_stats(c), *base_stats))
        fd_base.append(frechet_distance(*feature_stats(q), *base_stats))
        ratio.append(_safe_ratio(fd[-1], fd_base[-1]))
        kd.append(kid(c, base))
        kd_base.append(kid(q, base))
        if n > k and len(base) > k:
            pr.append(prdc(base, c, k=k))
            pr_base.append(prdc(base, q, k=k))

    def mean_prdc(ms: list[PRDC]) -> dict[str, float] | None:
        if not ms:
            return None
        return {f: float(np.mean([getattr(m, f) for m in ms])) for f in PRDC.__annotations__}

    base_fd = float(np.mean(fd_base))
    return {
        "n_matched": n,
        "repeats": repeats,
        "baseline_split": "by patient" if len(set(patients)) > 1 else "random slices",
        # with cases: the fewest and most synthetic volumes (and real patients) of a repeat
        "volumes_matched": [min(matched), max(matched)] if matched else None,
        "frechet_distance": float(np.mean(fd)),
        "frechet_ci95": _spread(fd),
        "frechet_baseline": base_fd,
        "frechet_baseline_ci95": _spread(fd_base),
        "frechet_ratio": float(np.mean(fd)) / base_fd if base_fd > 0 else float("inf"),
        "frechet_ratio_ci95": _spread(ratio),
        "kid": float(np.mean(kd)),
        "kid_ci95": _spread(kd),
        "kid_baseline": float(np.mean(kd_base)),
        "kid_baseline_ci95": _spread(kd_base),
        "prdc_k5": mean_prdc(pr),
        "prdc_k5_baseline": mean_prdc(pr_base),
    }


# ------------------------------------------------------------------------ the heart itself


def heart_box(mask: np.ndarray, *, margin: int = 4) -> tuple[slice, slice] | None:
    """The bounding box of every labelled pixel of a (H, W) mask, grown by ``margin`` px (and
    clipped to the image); None for an empty mask."""
    rows, cols = np.nonzero(np.asarray(mask) > 0)
    if not len(rows):
        return None
    h, w = mask.shape
    return (
        slice(max(0, rows.min() - margin), min(h, rows.max() + margin + 1)),
        slice(max(0, cols.min() - margin), min(w, cols.max() + margin + 1)),
    )


def heart_ssim(
    real: np.ndarray, fake: np.ndarray, masks: np.ndarray, *, margin: int = 4, win_size: int = 7
) -> np.ndarray:
    """SSIM of each pair inside its heart region (:func:`heart_box` of its mask, at least one
    SSIM window wide); NaN where the mask is empty. Air, body wall and lungs, which dominate a
    whole slice, are left out: this is how well the heart itself is painted."""
    out = np.full(len(real), np.nan)
    for i, (r, f, m) in enumerate(zip(real, fake, masks, strict=True)):
        box = heart_box(m, margin=margin)
        if box is None:
            continue
        box = tuple(_widen(s, win_size, n) for s, n in zip(box, m.shape, strict=True))
        out[i] = float(ssim_batch(r[box][None], f[box][None], win_size=win_size)[0])
    return out


def _widen(s: slice, size: int, n: int) -> slice:
    """``s`` grown symmetrically to at least ``size`` (within 0..n)."""
    missing = size - (s.stop - s.start)
    if missing <= 0:
        return s
    start = max(0, s.start - (missing + 1) // 2)
    return slice(start, min(n, max(s.stop, start + size)))


def _sorted(values: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(values, np.float64).ravel())


def wasserstein_1(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's distance between two 1-D samples (same units as the values): the area
    between their empirical CDFs. Equal to ``scipy.stats.wasserstein_distance(a, b)``."""
    a, b = _sorted(a), _sorted(b)
    if not len(a) or not len(b):
        return float("nan")
    grid = np.concatenate([a, b])
    grid.sort(kind="mergesort")
    steps = np.diff(grid)
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * steps))


def structure_intensities(
    images: np.ndarray, masks: np.ndarray, *, class_names: list[str], scale: float, offset: float
) -> dict[str, np.ndarray]:
    """Each structure's pixel values in source units (``offset + unit * scale``: HU, or 0–255
    display units), pooled over the stack. Structures absent from every mask are left out."""
    units = offset + np.asarray(images, np.float64) * scale
    masks = np.asarray(masks)
    return {
        name: units[masks == c]
        for c, name in enumerate(class_names)
        if c > 0 and np.any(masks == c)
    }


def contrast_over(values: dict[str, np.ndarray], reference: str) -> dict[str, float]:
    """Each structure's mean minus the ``reference`` structure's mean (e.g. blood pool over
    myocardium, in HU): what makes a chamber or vessel visible against the heart muscle."""
    if reference not in values:
        return {}
    base = float(np.mean(values[reference]))
    return {k: float(np.mean(v)) - base for k, v in values.items() if k != reference}


def _structure_sums(
    images: np.ndarray, masks: np.ndarray, classes: int, scale: float, offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per image and class: the sum of source-unit values and the pixel count, (N, classes)."""
    n = len(images)
    units = offset + np.asarray(images, np.float64).reshape(n, -1) * scale
    index = (np.arange(n)[:, None] * classes + np.asarray(masks).reshape(n, -1)).ravel()
    sums = np.bincount(index, weights=units.ravel(), minlength=n * classes)
    counts = np.bincount(index, minlength=n * classes)
    return sums.reshape(n, classes), counts.reshape(n, classes).astype(np.float64)


def contrast_ratio_interval(
    real: np.ndarray,
    masks: np.ndarray,
    cand: np.ndarray,
    cand_masks: np.ndarray,
    *,
    class_names: list[str],
    reference: str,
    scale: float,
    offset: float,
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float] | None]:
    """Percentile-bootstrap interval of each structure's synthetic / real contrast over
    ``reference`` (the ratio :func:`contrast_over` gives), resampling whole candidates and whole
    real slices independently, with replacement.

    A batch of 64 candidates holds a small vessel in about twenty of them, so which masks were
    drawn moves its ratio by ±0.1 (measured on the demo): the interval says how far a figure can
    be read. Structures without a finite interval are left out; a structure whose *real*
    contrast has an interval reaching 0 maps to None: a ratio over a denominator that may be 0
    has no interval worth printing (a small real set read −520%–498%).
    """
    classes, ref = len(class_names), class_names.index(reference)
    rng = np.random.default_rng(seed)
    contrast = []
    for images, labels in ((real, masks), (cand, cand_masks)):
        sums, counts = _structure_sums(images, labels, classes, scale, offset)
        weights = rng.multinomial(len(images), np.full(len(images), 1 / len(images)), size=draws)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (weights @ sums) / (weights @ counts)
        contrast.append(means - means[:, ref : ref + 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = contrast[1] / contrast[0]
    tail = 100 * (1 - level) / 2
    out = {}
    for c, name in enumerate(class_names):
        finite = ratio[:, c][np.isfinite(ratio[:, c])]
        if c > 0 and c != ref and len(finite) == draws:
            real_lo, real_hi = np.percentile(contrast[0][:, c], [tail, 100 - tail])
            if real_lo <= 0 <= real_hi:
                out[name] = None
                continue
            lo, hi = np.percentile(finite, [tail, 100 - tail])
            out[name] = (float(lo), float(hi))
    return out


def dice_counts(pred: np.ndarray, truth: np.ndarray, *, classes: int) -> np.ndarray:
    """Per class 1..classes-1, (|P∩T|, |P| + |T|) over a stack: Dice's numerator halves and
    denominator, which add up over slices and patients (pooled Dice, and its bootstrap)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    out = np.zeros((classes - 1, 2))
    for c in range(1, classes):
        p, t = pred == c, truth == c
        out[c - 1] = int(np.logical_and(p, t).sum()), int(p.sum()) + int(t.sum())
    return out


def dice(pred: np.ndarray, truth: np.ndarray, *, classes: int) -> np.ndarray:
    """Dice per class 1..classes-1 over a stack, ``2|P∩T| / (|P| + |T|)``; NaN for a class that is
    absent from both (undefined, not perfect).

    References
    ----------
    Dice (1945), Measures of the amount of ecologic association between species. Ecology 26(3).
    """
    counts = dice_counts(pred, truth, classes=classes)
    out = np.full(classes - 1, np.nan)
    has = counts[:, 1] > 0
    out[has] = 2.0 * counts[has, 0] / counts[has, 1]
    return out


# ------------------------------------------------------------------------ through the plane

#: The three orthogonal planes of a volume (Z, H, W) stored feet → head, in display order.
PLANES = ("axial", "coronal", "sagittal")


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic: the largest gap between the two empirical CDFs
    (0 same, 1 disjoint). Equal to ``scipy.stats.ks_2samp(a, b).statistic``."""
    a, b = _sorted(a), _sorted(b)
    if not len(a) or not len(b):
        return float("nan")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def adjacent_differences(
    volume: np.ndarray, labels: np.ndarray, body: np.ndarray, *, class_names: list[str]
) -> dict[str, np.ndarray]:
    """How much a volume (Z, S, S) changes from one slice to the next: |v[z+1] − v[z]| at the
    pixels inside the body in both slices (key ``body``) and, per structure, at the pixels that
    carry that structure in both (structures never present in two neighbouring slices are left
    out). A volume painted slice by slice without regard to its neighbours flickers, and its
    differences run larger than a real scan's."""
    v = np.asarray(volume, np.float32)
    lab = np.asarray(labels)
    diff = np.abs(v[1:] - v[:-1])
    both = np.asarray(body, bool)
    out = {"body": diff[both[1:] & both[:-1]]}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        inside = (lab[1:] == c) & (lab[:-1] == c)
        if inside.any():
            out[name] = diff[inside]
    return out


def matched_agreement(
    synthetic: list[dict[str, np.ndarray]],
    real: list[dict[str, np.ndarray]],
    patients: list[str],
    *,
    scale: float = 1.0,
    repeats: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Adjacent-slice agreement of synthetic volumes against real ones, beside a size-matched
    real-vs-real baseline (:func:`matched_distribution`'s scheme, one volume per row): per
    repeat the real volumes split by patient into a reference half and a comparison half, then
    n synthetic and n comparison volumes (n the smaller count) have their pooled differences
    (:func:`adjacent_differences`) compared with the reference's — KS statistic and W1 (times
    ``scale``: source units, e.g. HU). Per region (``body`` and each structure present on both
    sides): means over repeats and 2.5–97.5% ranges, and the median difference of each side."""
    # body first, then structures in class order, where both sides have them
    regions = [
        k for k in dict.fromkeys(k for r in real for k in r) if any(k in s for s in synthetic)
    ]
    acc: dict[str, dict[str, list[float]]] = {
        r: {k: [] for k in ("ks", "ks_base", "w1", "w1_base")} for r in regions
    }
    n = 0
    for rep in range(repeats):
        ref, cmp_ = patient_halves(patients, [seed, rep])
        rng = np.random.default_rng([seed, rep, 2])
        n = min(len(synthetic), len(cmp_))
        syn = [synthetic[i] for i in np.sort(rng.choice(len(synthetic), n, replace=False))]
        cmp_vols = [real[i] for i in np.sort(rng.choice(cmp_, n, replace=False))]
        ref_vols = [real[i] for i in ref]
        for r in regions:
            pooled = [
                np.concatenate([v.get(r, np.zeros(0, np.float32)) for v in vs])
                for vs in (syn, cmp_vols, ref_vols)
            ]
            s, q, base = pooled
            if not len(base) or not len(s) or not len(q):
                continue
            acc[r]["ks"].append(ks_statistic(s, base))
            acc[r]["ks_base"].append(ks_statistic(q, base))
            acc[r]["w1"].append(wasserstein_1(s, base) * scale)
            acc[r]["w1_base"].append(wasserstein_1(q, base) * scale)
    out: dict[str, Any] = {
        "n_matched": n,
        "repeats": repeats,
        "baseline_split": "by patient" if len(set(patients)) > 1 else "random volumes",
        "regions": {},
    }
    for r in regions:
        a = acc[r]
        if not a["ks"]:
            continue
        syn_all = np.concatenate([v[r] for v in synthetic if r in v])
        real_all = np.concatenate([v[r] for v in real if r in v])
        out["regions"][r] = {
            **{k: float(np.mean(vals)) for k, vals in a.items()},
            **{f"{k}_ci95": _spread(vals) for k, vals in a.items()},
            "median_synthetic": float(np.median(syn_all)) * scale,
            "median_real": float(np.median(real_all)) * scale,
        }
    return out


def plane_slices(
    volume: np.ndarray,
    labels: np.ndarray,
    plane: str,
    *,
    size: int,
    min_foreground: float = MIN_FOREGROUND,
) -> tuple[np.ndarray, np.ndarray]:
    """A volume's (Z, H, W) slices in one of :data:`PLANES`, each resampled to ``size``²
    (image linearly, labels by nearest neighbour; coronal and sagittal with the head up), kept
    where their labels cover at least ``min_foreground`` of the slice — the rule ingest keeps
    axial slices by, so every plane is cut through the heart alike. The slice axis is stretched
    to the side: a volume's planes are compared with real planes stretched the same way."""
    from scipy import ndimage

    vol = np.asarray(volume, np.float32)
    lab = np.asarray(labels)
    if plane == "axial":
        stack, lstack = vol, lab
    elif plane == "coronal":
        stack, lstack = vol.transpose(1, 0, 2)[:, ::-1], lab.transpose(1, 0, 2)[:, ::-1]
    elif plane == "sagittal":
        stack, lstack = vol.transpose(2, 0, 1)[:, ::-1], lab.transpose(2, 0, 1)[:, ::-1]
    else:
        raise ValueError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    keep = np.array([foreground_fraction(m) >= max(min_foreground, 1e-12) for m in lstack], bool)
    stack, lstack = stack[keep], lstack[keep]
    if not len(stack):
        return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.uint8)
    zoom = (1.0, size / stack.shape[1], size / stack.shape[2])
    images = ndimage.zoom(stack, zoom, order=1, mode="nearest", grid_mode=True)
    masks = ndimage.zoom(lstack, zoom, order=0, mode="nearest", grid_mode=True)
    return np.clip(images, 0.0, 1.0).astype(np.float32), masks.astype(np.uint8)


def plane_distribution(
    synthetic: list[tuple[np.ndarray, np.ndarray]],
    real: list[tuple[np.ndarray, np.ndarray]],
    patients: list[str],
    feature_fn: Any,
    *,
    size: int,
    repeats: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Distribution distances of synthetic volumes' slices against real volumes' in each of
    :data:`PLANES` (:func:`plane_slices`, then ``feature_fn`` and
    :func:`matched_distribution`, each plane beside its own size-matched real-vs-real
    baseline; ``patients`` names each real volume's patient). Off-plane/axial ratios two ways:
    ``raw`` divides the coronal (sagittal) Fréchet distance by the axial one, as MAISI reports
    it; ``vs_baseline`` divides the planes' Fréchet *ratios* (each distance over its own
    real-vs-real baseline), which also removes how far apart real people are in each plane."""
    planes: dict[str, Any] = {}
    for plane in PLANES:
        feats = []
        for vols in (synthetic, real):
            rows, owners = [], []
            for i, (vol, lab) in enumerate(vols):
                imgs, _ = plane_slices(vol, lab, plane, size=size)
                rows.append(imgs)
                owners += [i] * len(imgs)
            feats.append((np.concatenate(rows) if rows else np.zeros((0, size, size)), owners))
        (syn_imgs, syn_owner), (real_imgs, owner) = feats
        slice_patients = [patients[i] for i in owner]
        planes[plane] = {
            "slices_synthetic": len(syn_imgs),
            "slices_real": len(real_imgs),
            **matched_distribution(
                feature_fn(syn_imgs),
                feature_fn(real_imgs),
                slice_patients,
                repeats=repeats,
                seed=seed,
                cases=syn_owner,
            ),
        }
    axial = planes["axial"]
    ratios: dict[str, Any] = {"raw": {}, "vs_baseline": {}}
    for plane in PLANES[1:]:
        p = planes[plane]
        ratios["raw"][plane] = _safe_ratio(p["frechet_distance"], axial["frechet_distance"])
        ratios["vs_baseline"][plane] = _safe_ratio(p["frechet_ratio"], axial["frechet_ratio"])
    return {"planes": planes, "off_plane_over_axial": ratios}


def _safe_ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("inf")
