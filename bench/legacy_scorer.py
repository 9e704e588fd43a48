"""The privacy scorer as it was before issue 14 (commit 9f585dc), kept verbatim for one purpose:
``bench/privacy.py`` times today's scorer against it in the same run and checks that both flag
the same images. Not used by the pipeline."""

from __future__ import annotations

import faiss
import numpy as np
from scipy import ndimage

from pipeline.embed import Embedder
from pipeline.index import search_both_ways
from pipeline.preprocess import centre
from pipeline.privacy import highpass, ssim_batch
from pipeline.slices import SliceStore


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


def full_correlation(image: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Pearson correlation of the centred image with each centred source, at full resolution."""
    a = centre(image).ravel().astype(np.float64)
    a = (a - a.mean()) / (a.std() + 1e-12)
    out = np.empty(len(sources))
    for j, src in enumerate(sources):
        b = centre(src).ravel().astype(np.float64)
        out[j] = float(np.dot(a, (b - b.mean()) / (b.std() + 1e-12))) / a.size
    return out


def score_against(
    index: faiss.Index,
    embedder: Embedder,
    store: SliceStore,
    images: np.ndarray,
    *,
    k: int,
    max_shift: int,
    smooth: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each image: best aligned SSIM over its top-k neighbours, in both orientations.

    The image's own neighbours are compared with the image, its mirror image's neighbours with
    the mirror image (each over the small shift search). Returns (SSIM scores, nearest slice
    ids, best embedding similarity, best texture correlation).
    """
    sims, ids = search_both_ways(index, embedder, images, k * 4)
    half = ids.shape[1] // 2
    scores = np.zeros(len(images))
    texture = np.zeros(len(images))
    nearest = np.full(len(images), -1, dtype=np.int64)
    for i, image in enumerate(images):
        for view, found in ((image, ids[i, :half]), (image[:, ::-1], ids[i, half:])):
            cand = list(dict.fromkeys(int(x) for x in found if x >= 0))
            if not cand:
                continue
            sources = store.images(cand)
            if len(cand) > k:  # full-resolution correlation picks the k to re-score
                order = np.argsort(-full_correlation(view, sources), kind="stable")[:k]
                cand, sources = [cand[o] for o in order], sources[order]
            ssim, tex = aligned_scores(
                view, sources, max_shift=max_shift, flips=False, smooth=smooth
            )
            j = int(np.argmax(ssim))
            if nearest[i] < 0 or ssim[j] > scores[i]:
                scores[i], nearest[i] = ssim[j], cand[j]
            texture[i] = max(texture[i], float(tex.max()))
    return scores, nearest, sims.max(axis=1), texture


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0
