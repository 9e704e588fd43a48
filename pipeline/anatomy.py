"""Synthetic anatomy (issue 24, item 1): a statistical shape model of the training patients'
label volumes, the sampler behind ``generate --masks synthetic`` (the default), and the
measurements that judge its samples.

Each training label volume is cut to the slices that hold anatomy, centred in-plane on its
foreground's centre of mass, and turned into one clipped signed-distance map per structure
(negative inside; the myocardium's map is of myocardium ∪ LV cavity, a *shell*, decoded as
that minus the cavity), resampled to a common grid. A PCA of those maps over patients gives
the modes of variation. A sample is the mean plus Gaussian weights on the modes (or, opt-in
``moments``, the mean with each structure moved by its own in-plane affine:
:func:`move_structures`), moved by a smooth 3-D field
(:func:`warp_maps`), each structure's level set nudged into the real size range
(:func:`fit_sizes`), decoded by taking, in each voxel, the structure whose map is most
negative. :func:`sample_anatomy` keeps the first draw that passes :func:`plausibility`
(calibrated so that real people pass: piece counts, myocardium around the LV cavity, sizes)
and is no training patient's own (:meth:`AnatomyModel.nearest`: no closer to any training
patient than that patient's nearest other real person — leave-one-patient-out).

Measured on the 24-patient phantom (12 training patients, 64², 24 slices; fit 3 s, 48 draws
per setting), and why each part is there:

* the plain PCA sample (no shell, no warp) passed the checks 50% of the time (the blended
  myocardium had gaps where people's walls differ), and 75% of draws were closer to some
  training patient than that patient's nearest other person (the mean of a few people is
  closer to each than they are to each other); the shell lifts plausibility to 92%;
* the smooth field (RMS 0.02 of the side) moves draws off the span of the training patients
  (nearest Dice 0.87 → 0.71, too-close 75% → 4%), but thins small structures (aorta under the
  real range in 6 of 48); :func:`fit_sizes` puts them back: 100% of 48 draws plausible;
* 128 slices of 32 draws give a mask-channel membership AUC of 0.44–0.45 (joint
  p 0.50) on 12 + 12 patients;
* the body map: the images follow it (candidates painted on synthetic structures in real
  held-out people's bodies land nearer a training person 51 of 128 times; in the training
  people's mean body 122 of 128), and bodies drawn with the training bodies' own spread crowd
  round their mean (86 of 128 nearer a training body; image-share membership AUC 0.78,
  p 0.008). Spread along the body's own modes to 2.5× (``body_temperature``) and no longer
  pinned to the smallest and largest training body sizes: 69–79 of 128, image-share AUC
  0.59–0.69 (p 0.05–0.24) over two seeds; 2× gave 0.65–0.66, 3× no better than 2.5×. (Later
  seeds read 83–90 of 128 at 2.5×; see the outline model below.)

* through the slices (issue 25): a field that turned over every depth/8 slices made a
  sample's body outline change 0.48 of its area per slice against a real body's 0.15 (the
  painted volume's sagittal plane was jagged); smooth over half the depth, with the drawn maps
  low-passed through the slices (sigma one model slice), it changes 0.17 and the labels 6.1
  against 6.3 (real) — measured at 64², depth 32, 8 draws.
* the body's outline in-plane: a drawn body map (a blend of people's distance maps, spread
  and warped) decoded with bumps where their outlines disagree; on the demo's phantom 65% of
  drawn body slices were less convex than the least convex real one, and the painter smeared
  spine and ribs in them. Low-passed in-plane (``body_sigma``): 3%.
* the body, from its own model (``body_harmonics``, the default since 2026-11-30): painted
  volumes were far from real mostly because of their bodies — real structures in synthetic bodies
  read a Fréchet ratio of 2.1–2.6 in the axial plane on the 24-patient run, synthetic
  structures in real bodies 0.70–0.74 — and the body map lay in the span of 12 people's maps,
  so the images painted in it pointed at them (memorisation 83–90 of 128). With it, a body
  is a few numbers (per slice centre and radius harmonics, a line through the slices), a sample's
  is drawn from a Gaussian over them whose covariance is shrunk to full rank
  (:func:`shrunk_covariance`): over five generation seeds the image-share AUC 0.72 → 0.60
  (mean), memorisation 66–75 of 128 (every seed passes; before, 2 of 5 failed), Fréchet
  ratio 1.82–2.17 → 0.97–1.23. One seed of five (mask best 0.85) and the 6-patient
  membership test (0.92, p 0.008) read the structures' best-Dice channel high; that test
  over six generation seeds showed it is the structures' model with either body (joint
  p 0.021–0.22 with the body map, 0.025–0.38 with the outline body), not the outline. On
  the demo (8 + 8) over seeds 0–3 the largest membership AUC read 0.45–0.64 (joint p ≥ 0.54).
* the structures' moments (``moments``, opt-in; measured 2026-11-30 and not made the
  default). A weighted sum of the n training people's maps lies in their span, and a new
  person's part outside it is distance no such sample makes up: on the 24-patient run the
  training people were nearer the samples than the held-out were (mask-share AUC 0.60–0.72
  over five seeds, mask best up to 0.85, joint p 0.004). A structure moved by an affine is
  not in that span (before the warp 22% of a sample's difference from the mean lies in it,
  against 64% for the modes' samples), and its moments come from a Gaussian that, like the
  outline body's, is full rank. Two forms, five seeds of that run (128 painted candidates)
  and six of the demo each:

  - in 3-D (centre and covariance over z, y, x): 24-patient mask share 0.48 / 0.60 / 0.57 /
    0.70 / 0.71, mask best 0.38–0.48, image share 0.42–0.59, joint p 0.145–0.87,
    memorisation 58–69 of 128, every gate on all five (the modes: four); volume batches 57%
    and 47% nearest a training person (the modes: 70% and 74%, refused). But on the demo the
    largest AUC read 0.65–0.78 (joint p ≥ 0.11; seed 2 failed the memorisation gate, 45 of
    64) and its volumes went through the plane unlike anyone: off-plane/axial Fréchet ratio
    1.55 / 1.52 and TSTR/TRTR 0.78, against issue 25's 1.5 and 0.8 — the model's slice axis
    is each person's labelled extent resampled, not a length, and a drawn through-plane
    covariance tilts and stretches structures along it;
  - in-plane (the code here: centre and covariance of each structure over its slices, the
    same affine in every slice): the demo's largest AUC 0.56–0.69, joint p 0.31–0.78,
    memorisation 33–38 of 64 (the modes: 0.45–0.80, p ≥ 0.073, 27–40), its volumes 1.20 /
    1.12 and TSTR/TRTR 0.84; but on the 24-patient run mask share 0.65–0.73, mask best
    0.36–0.72, joint p 0.095–0.35, memorisation 70–83 of 128, four of five seeds passing
    every gate — no better than the modes on the channel it was built for.

  Measured after and dropped: the 3-D form without the through-plane tilt (each structure's
  in-plane affine plus its own extent and position along the slices, no shear between
  them): 24-patient mask share 0.55–0.76, every gate on five of five, but the demo's
  volumes TSTR/TRTR 0.78 — most of the 3-D form's gain was the tilt that makes volumes
  unlike real ones. Raw draws plausible on the 8-person test phantom: in-plane 100% of 60;
  3-D 93% (a structure moved on its own can leave its wall; 100% of 48 at 12 + 12); the LV
  cavity moved with its wall (3-D, one affine for both) read mask best up to 0.82 (p 0.003).
* tried and dropped, 2026-11-30: the mean moved by one smooth field shared by a whole
  batch (drawn once from the batch seed, or once per fit from a hash of the data), noise
  that would hide the 2σ²/n by which any sampler centred on the training mean sits nearer
  its people. At RMS 0.03 of the side the mask share read anywhere in 0.26–0.72 on the
  24-patient run (six fields, ten batches): it moves the lean about, it does not remove it;
  at 0.04, 0.53–0.72 while the samples' mean best Dice with real people fell from 0.58 to
  0.19–0.53. On the demo its one field read mask and image share 0.81 with TSTR/TRTR 0.77.
  On the 6 + 6 phantom a shared rotation and scale (±8°, ±8%) and fewer modes (30% of the
  variance) left the lean where it was.
* whose lean it is (2026-11-30, masks alone, 128 per seed, seeds 0–4, 24-patient run): the
  same model fitted on the 12 training patients read mask share 0.64–0.73 (mean 0.68);
  fitted on 12 phantom people from outside the workspace, two sets, 0.44–0.56 and
  0.34–0.53 (means 0.48, 0.44); fitted on the 12 held-out patients 0.25–0.53 (mean 0.39, the
  mirror image). So the lean is the model's (a model of n people sits nearer them), not
  the split's; and a model of people from outside the training set removes it
  (``generate --anatomy-from``: painted, audited batches of both sets passed every gate on
  ten of ten, largest AUC ≤ 0.65 on nine, one 0.69 at joint p 0.17, as chance allows).
* tried and dropped: placing each sample by its own centre of mass at a heart centre drawn
  like a new person's (its hearts spread 0.96 / 0.42 px about the centre against real
  0.30 / 0.56, a blend's centre of mass not being the grid's). It made the placement real
  (0.45 / 0.58) and took away a jitter that had hidden how near the structures' samples lie
  to their training people: on the demo the largest AUC read 0.58–0.95 (one seed of four at
  joint p 0.002). Also without effect on the 6 + 6 mask channel: the structures' temperature
  1.5, their mean moved by one or two of its standard errors, an in-plane affine (±6°, ±6%);
  a warp of RMS 0.04 lowered it but put samples at slice Dice 0.41 from every person (a real
  new person's slices: 0.72; these samples': 0.55).

Pure: label volumes in, a model out. The model carries the training patients' aligned label
volumes for the closeness check, so it stays inside the hospital (in the run's folder).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.augment import shift
from pipeline.errors import PipelineError
from pipeline.membership import mask_similarity

#: Version of what a fitted model holds and how it is drawn from: part of the key of the
#: model kept in a run's folder, so a model written by other code is fitted again, not read
#: (2: the structures' moments).
MODEL_FORMAT = 2
#: Fewest training patients to model. Measured on the 24-patient phantom (64², defaults, 40
#: draws each): fitted on 2 patients 80% of draws are closer to one of them than the other
#: is, on 3 17%, on 4 5%, on 5–12 3–15%; and on 4 each patient weighs a quarter of the mean
#: at most.
MIN_PATIENTS = 4
CLIP = 6.0  # signed distances clipped to ± this many voxels: shape near the surface only


@dataclass(frozen=True)
class AnatomyConfig:
    """How the model is fitted and sampled."""

    depth: int = 24  # slices of the model grid (1 for 2-D sources)
    variance: float = 0.95  # share of the variance the kept modes explain
    # scale of the sampled mode weights (0 with ``moments``: the modes' weights put each
    # sample in the span of the n training people, nearer them than a new person)
    temperature: float = 1.0
    # opt-in (measured, not the default; module text): each structure of a sample placed and
    # shaped by its own in-plane moments (centre of mass and covariance, through the matrix
    # log) drawn from a Gaussian over the training people's with a shrunk, full-rank
    # covariance (:func:`shrunk_covariance`), applied to the mean map as the affine that gives
    # it those moments (:func:`move_structures`): the outline body's recipe, for the
    # structures. Use with ``temperature=0``
    moments: bool = False
    # the body's spread as a multiple of the training bodies' (the outline model's Gaussian;
    # for a map body, along the body's own modes). A body is what the painted image follows
    # most (lungs, ribs, spine sit where the body puts them); the map body, lying in the span
    # of the training people's, crowded round them at 1.0 and was drawn at 2.5, 4× as varied
    # as real bodies; the outline model's full-rank Gaussian needs no such spread (module text)
    body_temperature: float = 1.0
    # the body drawn from an outline model, not from the joint maps: per slice its centre and
    # its radius about it as this many Fourier harmonics, a straight line through the slices
    # per person (:func:`outline_line`), and a Gaussian over people's lines with a shrunk,
    # full-rank covariance (:func:`shrunk_covariance`). 0: the body map of the joint model,
    # spread by ``body_temperature`` along the body's own modes (before 2026-11-30, at 2.5)
    body_harmonics: int = 4
    # a smooth 3-D field (and an optional in-plane affine) for every sample, to move it off
    # the span of the training patients: without it most samples are closer to some training
    # patient than that patient's nearest other person is (see the module text)
    alpha: float = 0.02  # RMS displacement as a share of the side
    # the field's smoothness through the slices (Gaussian sigma as a share of the depth): a
    # real body barely moves from one slice to the next, and a field that turned over every
    # few slices made the outline and the structures' walls wobble through the volume (issue
    # 25: the body's outline changed 3× as much per slice as a real one's at depth/8)
    z_smooth: float = 0.5
    # the drawn maps low-passed through the slices (Gaussian sigma, model slices) before they
    # are decoded: a blend of people resampled to one depth keeps their slice-to-slice steps
    z_blur: float = 1.0
    # a map body (``body_harmonics`` 0) low-passed in-plane (Gaussian sigma as a share of the
    # side) before it is decoded: a blend of people's distance maps, spread along the body's
    # modes and warped, has bumps where their outlines disagree; on the demo's phantom 65% of
    # drawn body slices were less convex than any real body, and the painter smeared spine
    # and ribs in them. 0 by default: the outline model's bodies are smooth. 0.045 is the
    # least of 0.03 / 0.045 that leaves ≤ 5% of them so (demo 3%; the 6-person test phantom
    # 5%, at 0.03 15%); a training body comes back nearly unchanged (Dice ≥ 0.987 at 64²; at
    # 128² on real CT, hocm-2d, median 0.986 and 0.90 for the least convex)
    body_sigma: float = 0.0
    degrees: float = 0.0
    scale: float = 0.0
    # (outer, inner) class indices: the outer structure wraps the inner one (myocardium around
    # the LV cavity). Its map is then of the union, decoded as union minus inner, so a blend of
    # people keeps a wall around the cavity instead of leaving gaps where their walls differ
    shell: tuple[int, int] | None = None


def _foreground_extent(labels: np.ndarray) -> tuple[int, int]:
    zs = np.flatnonzero(labels.reshape(len(labels), -1).any(1))
    if not len(zs):
        raise PipelineError("a training label volume has no labelled structure")
    return int(zs[0]), int(zs[-1]) + 1


def align(labels: np.ndarray, depth: int, body: np.ndarray | None = None) -> np.ndarray:
    """A label volume (Z, H, W) cut to its labelled slices, centred in-plane on its foreground's
    centre of mass, resampled (nearest) to ``depth`` slices. With ``body`` (the same volume's
    body outline) that outline is returned instead, moved the same way."""
    lo, hi = _foreground_extent(labels)
    cy, cx = ndimage.center_of_mass(labels[lo:hi] > 0)[1:]
    vol = (labels if body is None else body)[lo:hi]
    h, w = vol.shape[1:]
    vol = np.roll(vol, (round(h / 2 - cy), round(w / 2 - cx)), axis=(1, 2))
    z = np.clip(np.round((np.arange(depth) + 0.5) * len(vol) / depth - 0.5), 0, len(vol) - 1)
    return vol[z.astype(int)].astype(np.uint8)


def body_distances(body: np.ndarray) -> np.ndarray:
    """The clipped signed distance of a body outline volume (Z, H, W), slice by slice (a
    body's outline is drawn per slice): (Z, H, W) float32, negative inside."""
    out = np.full(body.shape, CLIP, np.float32)
    for z, plane in enumerate(np.asarray(body, bool)):
        if plane.any():
            d = ndimage.distance_transform_edt(~plane) - ndimage.distance_transform_edt(plane)
            out[z] = np.clip(d, -CLIP, CLIP)
    return out


def decode_body(body_map: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A body outline volume from its signed distance (Z, H, W): inside where negative, each
    slice's largest piece with its holes filled, and every labelled voxel of ``labels`` (the
    heart inside its body)."""
    out = np.zeros(body_map.shape, bool)
    for z, plane in enumerate(body_map < 0):
        labelled, n = ndimage.label(plane)
        if n:
            plane = labelled == 1 + int(np.argmax(np.bincount(labelled.ravel())[1:]))
        out[z] = ndimage.binary_fill_holes(plane) | (labels[z] > 0)
    return out


def signed_distances(
    labels: np.ndarray, n_classes: int, shell: tuple[int, int] | None = None
) -> np.ndarray:
    """Per foreground structure the clipped signed distance (voxels, negative inside):
    (n_classes - 1, Z, H, W) float32; an absent structure is +CLIP everywhere. With ``shell``
    (outer, inner) the outer structure's map is that of outer ∪ inner."""
    out = np.full((n_classes - 1, *labels.shape), CLIP, np.float32)
    for c in range(1, n_classes):
        inside = labels == c
        if shell is not None and c == shell[0]:
            inside |= labels == shell[1]
        if not inside.any():
            continue
        d_out = ndimage.distance_transform_edt(~inside)
        d_in = ndimage.distance_transform_edt(inside)
        out[c - 1] = np.clip(d_out - d_in, -CLIP, CLIP)
    return out


#: A piece of a structure smaller than this share of the structure is a speck, not anatomy.
SPECK = 0.05


def pieces(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected pieces of a boolean mask (26-connected in 3-D): labels and piece sizes."""
    labelled, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    return labelled, np.bincount(labelled.ravel(), minlength=n + 1)[1:]


def decode(sdm: np.ndarray, shell: tuple[int, int] | None = None) -> np.ndarray:
    """Label volume from per-structure signed distances: the most-inside structure, or
    background where no structure's distance is negative (with ``shell`` (outer, inner) the
    outer map, of the union, is first cut to union minus inner: max(d_outer, −d_inner)). A
    blend of maps leaves specks where two people's structures sat: pieces under
    :data:`SPECK` of their structure become background (not every piece but the largest: the
    phantom's aorta, ascending and descending without an arch, is two pieces in every real
    volume)."""
    if shell is not None:
        sdm = sdm.copy()
        sdm[shell[0] - 1] = np.maximum(sdm[shell[0] - 1], -sdm[shell[1] - 1])
    best = np.argmin(sdm, axis=0)
    labels = np.where(sdm.min(axis=0) < 0, best + 1, 0).astype(np.uint8)
    for c in range(1, sdm.shape[0] + 1):
        labelled, sizes = pieces(labels == c)
        small = np.flatnonzero(sizes < SPECK * sizes.sum()) + 1
        if len(small):
            labels[np.isin(labelled, small)] = 0
    return labels


def fit_sizes(
    sdm: np.ndarray,
    sizes: np.ndarray,
    shell: tuple[int, int] | None = None,
    *,
    free_last: bool = False,
) -> np.ndarray:
    """Per-structure maps whose level set is moved, where needed, so that each structure's
    size lies inside the range of the training patients' ``sizes`` (n, C). Why: a blend of
    offset tubes (the aorta of two people) is thinner than either, and a warp can shrink a
    small structure, so a sample would fall outside the real range for want of a constant."""
    out = sdm.copy()
    real = sizes.copy()
    if shell is not None:  # the outer map is of the union
        real[:, shell[0] - 1] += real[:, shell[1] - 1]
    lo, hi = real.min(0), real.max(0)
    if free_last:
        # the body: kept inside the range the plausibility checks allow, not pinned to the
        # smallest and largest training bodies (a spread-out draw would pile up at two
        # people's exact sizes)
        lo[-1], hi[-1] = lo[-1] * (1 - SIZE_SLACK), hi[-1] * (1 + SIZE_SLACK)
    for c in range(len(out)):
        flat = np.sort(out[c].ravel())
        n = int(np.sum(flat < 0))
        if n == 0:
            continue  # absent in this sample: not made up
        target = int(np.clip(n, lo[c], hi[c]))
        if target != n:
            out[c] -= (flat[target - 1] + flat[target]) / 2
    return out


#: Rays per outline: the radius is sampled at this many angles before its Fourier transform.
OUTLINE_ANGLES = 64


def outline_coefficients(plane: np.ndarray, harmonics: int) -> np.ndarray:
    """A body slice's outline as ``3 + 2·harmonics`` numbers: its centre (row, col), then its
    radius about that centre (the farthest body pixel along each of :data:`OUTLINE_ANGLES`
    rays) as Fourier coefficients — the mean radius, the cosine and the sine parts of
    harmonics 1…``harmonics``. Low harmonics only: a smooth outline, as a body's is."""
    cy, cx = ndimage.center_of_mass(plane)
    h, w = plane.shape
    r = np.arange(0.0, float(np.hypot(h, w)), 0.25)
    theta = np.linspace(0.0, 2 * np.pi, OUTLINE_ANGLES, endpoint=False)
    ys = cy + r[None] * np.sin(theta)[:, None]
    xs = cx + r[None] * np.cos(theta)[:, None]
    inside = ndimage.map_coordinates(plane.astype(np.float32), [ys, xs], order=1) > 0.5
    last = np.where(inside.any(1), inside.shape[1] - 1 - np.argmax(inside[:, ::-1], 1), 0)
    f = np.fft.rfft(r[last]) / OUTLINE_ANGLES
    k = slice(1, harmonics + 1)
    return np.concatenate([[cy, cx, f[0].real], f[k].real, f[k].imag])


def outline_line(body: np.ndarray, harmonics: int) -> np.ndarray:
    """A body volume (Z, H, W) as one vector: a straight line through the slices (value at
    the middle, change over the depth) fitted to each of its slices' outline coefficients
    (:func:`outline_coefficients`). A line, not each slice: a body barely changes through the
    heart's extent, and slice-by-slice numbers would let a sample wobble through the volume."""
    z = np.flatnonzero(body.reshape(len(body), -1).any(1))
    coefficients = np.stack([outline_coefficients(body[i], harmonics) for i in z])
    t = (z + 0.5) / len(body) - 0.5
    design = np.stack([np.ones_like(t), t], 1)
    fitted, *_ = np.linalg.lstsq(design, coefficients, rcond=None)
    return fitted.ravel()


def draw_outline(line: np.ndarray, depth: int, shape: tuple[int, int]) -> np.ndarray:
    """The body volume (depth, H, W) of an :func:`outline_line` vector: per slice the
    star-shaped region its outline coefficients describe."""
    p = len(line) // 2
    middle, change = line[:p], line[p:]
    harmonics = (p - 3) // 2
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    out = np.zeros((depth, *shape), bool)
    for z in range(depth):
        c = middle + change * ((z + 0.5) / depth - 0.5)
        angle = np.arctan2(yy - c[0], xx - c[1])
        radius = np.full(shape, c[2])
        for k in range(harmonics):
            re, im = c[3 + k], c[3 + harmonics + k]
            radius += 2 * (re * np.cos((k + 1) * angle) - im * np.sin((k + 1) * angle))
        out[z] = np.hypot(yy - c[0], xx - c[1]) <= radius
    return out


def shrunk_covariance(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, covariance and shrinkage of the rows of ``x`` (n people, p numbers): the sample
    covariance of the standardised numbers shrunk towards the identity by the Ledoit–Wolf
    intensity, then scaled back. Full rank even when n < p: a Gaussian of n people's own span
    puts every draw in it, nearer them than a new person is (the old body crowded round its
    training people: issue 24's image channel)."""
    n, p = x.shape
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    z = (x - mu) / sd
    s = z.T @ z / n
    m = np.trace(s) / p
    d2 = float(np.sum((s - m * np.eye(p)) ** 2)) / p
    b2 = sum(float(np.sum((np.outer(r, r) - s) ** 2)) for r in z) / n**2 / p
    shrink = min(b2, d2) / d2 if d2 > 0 else 1.0
    cov = (shrink * m * np.eye(p) + (1 - shrink) * s) * np.outer(sd, sd)
    return mu, cov, float(shrink)


_UPPER = np.triu_indices(2)
#: Numbers per structure in :func:`structure_moments`: in-plane centre (2), log-covariance (3).
MOMENTS = 5


def _symmetric(values: np.ndarray) -> np.ndarray:
    """The symmetric 2×2 matrix of its three upper-triangle ``values``."""
    m = np.zeros((2, 2))
    m[_UPPER] = values
    return m + m.T - np.diag(np.diag(m))


def _matrix_power(m: np.ndarray, fn: Any) -> np.ndarray:
    """``fn`` of a symmetric matrix through its eigenvalues (log, exp, powers)."""
    w, v = np.linalg.eigh(m)
    return (v * fn(w)) @ v.T


def structure_moments(maps: np.ndarray) -> np.ndarray:
    """Per structure map (C, Z, H, W; inside where negative) its in-plane centre of mass (row,
    column, voxels) and the upper triangle of the matrix log of its in-plane covariance, over
    all its slices: (C, :data:`MOMENTS`), NaN for a structure under four voxels. The log makes
    a Gaussian over people's shapes give a covariance (a size and orientation) at every draw.
    In-plane only: the model's slice axis is each person's own labelled extent, not a length,
    and a drawn through-plane covariance tilted and stretched structures through the slices
    unlike anyone (the demo's volumes: off-plane/axial Fréchet ratio 1.55 and 1.52,
    TSTR/TRTR 0.78; in-plane: 1.20 and 1.12, 0.84)."""
    out = np.full((len(maps), MOMENTS), np.nan)
    for c, m in enumerate(maps):
        pts = np.argwhere(m < 0)[:, 1:].astype(np.float64)
        if len(pts) < 4:
            continue
        cov = np.cov(pts.T) + 1e-3 * np.eye(2)
        out[c, :2] = pts.mean(0)
        out[c, 2:] = _matrix_power(cov, lambda w: np.log(np.maximum(w, 1e-6)))[_UPPER]
    return out


def move_structures(
    sdm: np.ndarray, which: np.ndarray, template: np.ndarray, drawn: np.ndarray
) -> np.ndarray:
    """Maps (C, Z, H, W) with structure ``which[i]`` moved, in every slice alike, by the
    in-plane affine that takes its ``template[i]`` moments to ``drawn[i]`` (rows of
    :func:`structure_moments`): centre onto centre, covariance onto covariance
    (A = S½ T^-½)."""
    out = sdm.copy()
    for c, t, d in zip(which, template, drawn, strict=True):
        root = _matrix_power(_symmetric(d[2:]), lambda v: np.exp(v / 2))
        inv_root = _matrix_power(_symmetric(t[2:]), lambda v: np.exp(-v / 2))
        back = np.linalg.inv(root @ inv_root)  # where each output pixel reads from
        offset = t[:2] - back @ d[:2]
        for z, plane in enumerate(sdm[c]):  # slice by slice: bilinear, not trilinear
            out[c, z] = ndimage.affine_transform(
                plane, back, offset, order=1, mode="constant", cval=CLIP
            )
    return out


def warp_maps(
    sdm: np.ndarray,
    rng: np.random.Generator,
    *,
    alpha: float,
    degrees: float,
    scale: float,
    z_smooth: float = 1 / 8,
) -> np.ndarray:
    """Per-structure maps (C, Z, H, W) resampled through one in-plane affine (rotation within
    ±``degrees``, scale within ±``scale``, about the centre) and a smooth in-plane displacement
    field, smooth through the slices too, of RMS ``alpha``·side: every slice moves as its
    neighbours do, so the volume stays a volume."""
    if not (alpha or degrees or scale):
        return sdm
    _, depth, h, w = sdm.shape
    theta = np.deg2rad(rng.uniform(-degrees, degrees))
    s = 1.0 + rng.uniform(-scale, scale)
    field = rng.standard_normal((2, depth, h, w))
    sigma = (max(depth * z_smooth, 1.0), 24.0 * h / 256, 24.0 * w / 256)
    field = np.stack([ndimage.gaussian_filter(f, sigma) for f in field])
    rms = float(np.sqrt(np.mean(field**2))) or 1.0
    field *= alpha * h / rms
    z, y, x = np.meshgrid(np.arange(depth), np.arange(h), np.arange(w), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dy, dx = y - cy, x - cx
    cos, sin = np.cos(theta) / s, np.sin(theta) / s  # where each output voxel reads from
    ys = cy + cos * dy - sin * dx + field[0]
    xs = cx + sin * dy + cos * dx + field[1]
    coords = np.stack([z.astype(float), ys, xs])
    return np.stack(
        [ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=CLIP) for m in sdm]
    ).astype(np.float32)


@dataclass
class AnatomyModel:
    """A fitted shape model, ready to sample."""

    mean: np.ndarray  # (D,) float32
    modes: np.ndarray  # (K, D) float32, orthonormal rows
    sd: np.ndarray  # (K,) float32
    shape: tuple[int, ...]  # (n_classes - 1, Z, H, W)
    train: np.ndarray  # (n, Z, H, W) uint8: the aligned training label volumes
    # per training volume its best Dice with any *other* patient: a sample at least that close
    # to it is closer than two different people are, and is turned away
    bounds: np.ndarray
    sizes: np.ndarray  # (n, n_classes - 1) voxels per structure in the training volumes
    pieces: np.ndarray  # (n, n_classes - 1) connected pieces per structure, likewise
    # mean in-plane centre of mass (row, col) of the training foregrounds: where a sample,
    # drawn centred, is put back so that the heart sits where hearts sit in the images
    centre: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))
    config: dict[str, Any] = field(default_factory=dict)
    # (n, Z, H, W) uint8: the aligned training body outlines, when the model has a body map
    # (its last map, after the structures'), else empty
    bodies: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.uint8))
    # per training body the Dice above which a body is a near-copy of it: the closest that
    # any two different training people's bodies are
    body_bounds: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    # the body maps' own modes (orthonormal rows over one map) and their sd, for the body's
    # extra spread; empty without a body map
    body_modes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    body_sd: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    # the outline model of the body (``body_harmonics``): mean and covariance of the training
    # people's :func:`outline_line` vectors; empty without it
    outline_mean: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float64))
    outline_cov: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float64))
    # the structures' moments (``moments``): which structures, the training people's mean and
    # shrunk covariance of their :func:`structure_moments` rows, and the mean map's own
    moment_structures: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    moment_mean: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float64))
    moment_cov: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float64))
    moment_template: np.ndarray = field(default_factory=lambda: np.zeros((0, MOMENTS), np.float64))

    @property
    def has_body(self) -> bool:
        """Whether a sample carries a body outline (the last of its maps)."""
        return bool(self.config.get("body"))

    @property
    def n_classes(self) -> int:
        """Classes, background included."""
        return self.shape[0] + 1 - int(self.has_body)

    def labels_of(self, maps: np.ndarray) -> np.ndarray:
        """A sample's label volume from its maps (the structures' maps; no body)."""
        return decode(maps[: self.n_classes - 1], self.shell)

    def body_of(self, maps: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """A sample's body outline from its maps and its labels (None: the model has none)."""
        return decode_body(maps[-1], labels) if self.has_body else None

    @property
    def shell(self) -> tuple[int, int] | None:
        """(outer, inner) class indices modelled as a wall around a cavity, if any."""
        sh = self.config.get("shell")
        return (int(sh[0]), int(sh[1])) if sh else None

    def draw_maps(self, rng: np.random.Generator) -> np.ndarray:
        """One sample's per-structure maps (C, Z, H, W): mean plus Gaussian mode weights,
        moved by the configured warp, sizes kept inside the real range (no checks). The body
        map, when there is one: drawn from the outline model (``body_temperature`` times its
        spread; not warped: its own draw is its variation), or in models without one the
        joint model's, spread further along the body's own modes."""
        c = self.config
        b = rng.standard_normal(len(self.sd)).astype(np.float32) * self.sd
        b *= float(c.get("temperature", 1.0))
        sdm = (self.mean + b @ self.modes).reshape(self.shape)
        if len(self.moment_structures):
            drawn = rng.multivariate_normal(self.moment_mean, self.moment_cov)
            sdm = move_structures(
                sdm, self.moment_structures, self.moment_template, drawn.reshape(-1, MOMENTS)
            )
        spread = float(c.get("body_temperature", 1.0))
        outline = self.has_body and len(self.outline_mean) > 0
        if self.has_body and not outline and len(self.body_sd) and spread > 1.0:
            e = rng.standard_normal(len(self.body_sd)).astype(np.float32) * self.body_sd
            e *= np.sqrt(max(spread**2 - float(c.get("temperature", 1.0)) ** 2, 0.0))
            sdm[-1] += (e @ self.body_modes).reshape(sdm.shape[1:])
        sdm = warp_maps(
            sdm,
            rng,
            alpha=float(c.get("alpha", 0.0)),
            degrees=float(c.get("degrees", 0.0)),
            scale=float(c.get("scale", 0.0)),
            z_smooth=float(c.get("z_smooth", 1 / 8)),
        )
        blur = float(c.get("z_blur", 0.0))
        if blur > 0 and sdm.shape[1] > 1:
            sdm = ndimage.gaussian_filter1d(sdm, blur, axis=1, mode="nearest")
        smooth = float(c.get("body_sigma", 0.0))
        if self.has_body and smooth > 0 and not outline:
            _, _, h, w = sdm.shape
            sdm[-1] = ndimage.gaussian_filter(sdm[-1], (0, smooth * h, smooth * w), mode="nearest")
        if outline:
            line = rng.multivariate_normal(self.outline_mean, self.outline_cov * spread**2)
            sdm[-1] = body_distances(draw_outline(line, sdm.shape[1], sdm.shape[2:]))
        return fit_sizes(sdm, self.sizes, self.shell, free_last=self.has_body)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One label volume (Z, H, W) on the model's grid, centred (no checks)."""
        return self.labels_of(self.draw_maps(rng))

    def place(
        self, maps: np.ndarray, size: int, *, depth: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A sample's label volume and body outline (None without a body map) decoded at
        ``size``² (maps resampled linearly, so edges stay smooth when the model's grid is
        coarser), moved from the centre to :attr:`centre`. ``depth``: that many slices instead
        of the maps' own (the model grid's depth stands for each person's own labelled extent;
        a volume at a real slice spacing needs as many slices as a real extent has)."""
        grid = self.shape[-1]
        zf = 1.0 if depth is None else depth / maps.shape[1]
        if size != grid or zf != 1.0:
            zoom = (1, zf, size / grid, size / grid)
            maps = ndimage.zoom(maps, zoom, order=1, mode="nearest")
        labels = self.labels_of(maps)
        body = self.body_of(maps, labels)
        dy, dx = (int(v) for v in np.round((self.centre - grid / 2) * size / grid))

        def moved(vol: np.ndarray) -> np.ndarray:
            # without wrap-around: what would leave the image is cut, not folded back
            return np.stack([shift(z, dy, dx) for z in vol]) if vol.size else vol

        return moved(labels), None if body is None else moved(body.astype(np.uint8)) > 0

    def nearest(self, labels: np.ndarray, body: np.ndarray | None = None) -> tuple[float, float]:
        """The best Dice of a label volume with any training patient, and the largest margin
        by which it exceeds that patient's own nearest-other Dice (> 0: too close). With
        ``body`` (its aligned outline) the body counts too: a body closer to a training
        person's than any two different people's bodies are is too close as well."""
        scores = mask_similarity(labels[None], self.train, self.n_classes)[0]
        margin = float(np.max(scores - self.bounds))
        if body is not None and self.has_body:
            outline = mask_similarity(body[None].astype(np.uint8), self.bodies, 2)[0]
            margin = max(margin, float(np.max(outline - self.body_bounds)))
        return float(scores.max()), margin

    def to_bytes(self) -> bytes:
        """The model as ``.npz`` bytes (its hash is the model's identity)."""
        buf = io.BytesIO()
        np.savez(
            buf,
            mean=self.mean,
            modes=self.modes,
            sd=self.sd,
            shape=np.array(self.shape),
            train=self.train,
            bounds=self.bounds,
            sizes=self.sizes,
            pieces=self.pieces,
            centre=self.centre,
            config=np.array(repr(sorted(self.config.items()))),
            bodies=self.bodies,
            body_bounds=self.body_bounds,
            body_modes=self.body_modes,
            body_sd=self.body_sd,
            outline_mean=self.outline_mean,
            outline_cov=self.outline_cov,
            moment_structures=self.moment_structures,
            moment_mean=self.moment_mean,
            moment_cov=self.moment_cov,
            moment_template=self.moment_template,
        )
        return buf.getvalue()

    def sha256(self) -> str:
        """SHA-256 of :meth:`to_bytes`."""
        return hashlib.sha256(self.to_bytes()).hexdigest()


def load_model(path: Path) -> AnatomyModel:
    """Read a model written by ``AnatomyModel.to_bytes``."""
    import ast

    with np.load(path) as z:
        return AnatomyModel(
            mean=z["mean"],
            modes=z["modes"],
            sd=z["sd"],
            shape=tuple(int(v) for v in z["shape"]),
            train=z["train"],
            bounds=z["bounds"],
            sizes=z["sizes"],
            pieces=z["pieces"],
            centre=z["centre"],
            config=dict(ast.literal_eval(str(z["config"]))),
            bodies=z["bodies"] if "bodies" in z.files else np.zeros((0,), np.uint8),
            body_bounds=z["body_bounds"] if "body_bounds" in z.files else np.zeros((0,)),
            body_modes=z["body_modes"] if "body_modes" in z.files else np.zeros((0, 0)),
            body_sd=z["body_sd"] if "body_sd" in z.files else np.zeros((0,)),
            outline_mean=z["outline_mean"] if "outline_mean" in z.files else np.zeros((0,)),
            outline_cov=z["outline_cov"] if "outline_cov" in z.files else np.zeros((0, 0)),
            **{
                k: z[k]
                for k in ("moment_structures", "moment_mean", "moment_cov", "moment_template")
                if k in z.files
            },
        )


def _pca(x: np.ndarray, variance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean, modes (orthonormal rows), their sd and the variance share kept, of rows ``x``:
    the fewest modes that explain ``variance`` of it, at least one, fewer than the rows."""
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2
    share = np.cumsum(var) / max(float(var.sum()), 1e-12)
    keep = int(np.searchsorted(share, variance) + 1)
    keep = max(1, min(keep, len(s) - 1 if len(s) > 1 else 1))
    sd = (s[:keep] / np.sqrt(max(len(x) - 1, 1))).astype(np.float32)
    return mean, vt[:keep].astype(np.float32), sd, float(share[keep - 1])


def fit_anatomy(
    volumes: list[np.ndarray],
    patients: list[str],
    n_classes: int,
    cfg: AnatomyConfig,
    bodies: list[np.ndarray] | None = None,
) -> AnatomyModel:
    """Fit the model to training label volumes (one per patient; (Z, H, W) class indices) and,
    when given, their body outlines (bool, same shapes): then every sample carries a body of
    its own, modelled with the structures (one more map, last), so the body a candidate is
    painted in is no training person's either. Refuses with one line below
    :data:`MIN_PATIENTS` patients."""
    if len(set(patients)) < MIN_PATIENTS:
        raise PipelineError(
            f"{len(set(patients))} training patient(s): the anatomy model needs at least "
            f"{MIN_PATIENTS} (with fewer, a sample blends so few people that each stays near it)"
        )
    aligned = np.stack([align(v, cfg.depth) for v in volumes])
    centre = np.mean([ndimage.center_of_mass(v > 0)[1:] for v in volumes], axis=0)
    maps = np.stack([signed_distances(a, n_classes, cfg.shell) for a in aligned])
    body_aligned = np.zeros((0,), np.uint8)
    body_modes, body_sd = np.zeros((0, 0), np.float32), np.zeros((0,), np.float32)
    if bodies is not None:
        body_aligned = np.stack(
            [align(v, cfg.depth, b) for v, b in zip(volumes, bodies, strict=True)]
        )
        maps = np.concatenate(
            [maps, np.stack([body_distances(b) for b in body_aligned])[:, None]], 1
        )
    mean, modes, sd, kept = _pca(maps.reshape(len(maps), -1), cfg.variance)
    sizes = np.array([[np.sum(a == c) for c in range(1, n_classes)] for a in aligned], float)
    if bodies is not None:  # the body's size is kept in range like a structure's
        sizes = np.concatenate([sizes, body_aligned.reshape(len(aligned), -1).sum(1)[:, None]], 1)
    counts = np.array(
        [[len(pieces(a == c)[1]) for c in range(1, n_classes)] for a in aligned], float
    )
    # what separates two different people: each patient's best Dice with any other patient
    owners = np.asarray(patients)
    pairs = mask_similarity(aligned, aligned, n_classes)
    nearest_other = np.where(owners[:, None] == owners[None, :], -np.inf, pairs).max(1)
    # a patient unusually close to another (a twin, a re-scan under a second name) must not
    # loosen the rule for both: no bound above the median person's
    nearest_other = np.minimum(nearest_other, np.median(nearest_other))
    body_bounds = np.zeros((0,), np.float32)
    if bodies is not None:
        # a body is turned away when closer to a training person's than any two different
        # people's bodies are (a near-copy). Not the per-person rule of the structures: bodies
        # differ less than hearts, and on the demo's phantom (8 people at 32²) no blend of
        # them passed that rule in 50 draws
        pairs = mask_similarity(body_aligned, body_aligned, 2)
        closest = np.where(owners[:, None] == owners[None, :], -np.inf, pairs).max()
        body_bounds = np.full(len(body_aligned), closest, np.float32)
        _, body_modes, body_sd, _ = _pca(maps[:, -1].reshape(len(maps), -1), cfg.variance)
    moment_structures = np.zeros((0,), np.int64)
    moment_mean, moment_cov = np.zeros((0,)), np.zeros((0, 0))
    template = np.zeros((0, MOMENTS))
    if cfg.moments:
        people = np.stack([structure_moments(m[: n_classes - 1]) for m in maps])
        template = structure_moments(mean.reshape(maps.shape[1:])[: n_classes - 1])
        # a structure someone lacks (a 2-D slice above it) has no moments to model: it
        # keeps the mean's shape and place
        whole = np.isfinite(people).all((0, 2)) & np.isfinite(template).all(1)
        moment_structures = np.flatnonzero(whole)
        template = template[whole]
        if len(moment_structures):
            rows = people[:, whole].reshape(len(people), -1)
            moment_mean, moment_cov, _ = shrunk_covariance(rows)
    outline_mean, outline_cov = np.zeros((0,)), np.zeros((0, 0))
    shrink = None
    if bodies is not None and cfg.body_harmonics > 0:
        lines = np.stack([outline_line(b, cfg.body_harmonics) for b in body_aligned])
        outline_mean, outline_cov, shrink = shrunk_covariance(lines)
    return AnatomyModel(
        mean=mean.astype(np.float32),
        modes=modes,
        sd=sd,
        shape=maps.shape[1:],
        train=aligned,
        bounds=np.array(nearest_other, np.float32),
        sizes=sizes,
        pieces=counts,
        centre=np.asarray(centre, np.float32),
        config={
            "depth": cfg.depth,
            "variance": cfg.variance,
            "temperature": cfg.temperature,
            "moments": cfg.moments,
            "body_temperature": cfg.body_temperature,
            "alpha": cfg.alpha,
            "z_smooth": cfg.z_smooth,
            "z_blur": cfg.z_blur,
            "body_sigma": cfg.body_sigma,
            "body_harmonics": cfg.body_harmonics if bodies is not None else 0,
            "outline_shrinkage": None if shrink is None else round(shrink, 4),
            "degrees": cfg.degrees,
            "scale": cfg.scale,
            "shell": list(cfg.shell) if cfg.shell else None,
            "patients": len(set(patients)),
            "modes": len(sd),
            "variance_kept": kept,
            "body": bodies is not None,
        },
        bodies=body_aligned,
        body_bounds=body_bounds,
        body_modes=body_modes,
        body_sd=body_sd,
        outline_mean=outline_mean,
        outline_cov=outline_cov,
        moment_structures=moment_structures,
        moment_mean=moment_mean,
        moment_cov=moment_cov,
        moment_template=template,
    )


#: Sizes may stray this far (relative) outside the training patients' range.
SIZE_SLACK = 0.25


def plausibility(
    labels: np.ndarray, model: AnatomyModel, *, myo: int | None, lv: int | None
) -> dict[str, Any]:
    """The checks of one label volume, each calibrated on the training patients (real people
    pass them): every structure present in as many connected pieces as in some training
    patient (one for most; the phantom's aorta is two), the myocardium covering at least half
    of the LV cavity's outer ring in every slice where both appear, every structure's size
    inside the training range widened by :data:`SIZE_SLACK`."""
    n_classes = model.n_classes
    counts = np.array([len(pieces(labels == c)[1]) for c in range(1, n_classes)], float)
    shaped = bool(np.all((counts >= model.pieces.min(0)) & (counts <= model.pieces.max(0))))
    ring_ok = True
    for z in range(len(labels) if myo and lv else 0):
        cav, mus = labels[z] == lv, labels[z] == myo
        if cav.any() and mus.any():
            ring = ndimage.binary_dilation(cav) & ~cav
            if ring.any() and np.mean(mus[ring]) < 0.5:
                ring_ok = False
    sizes = np.array([np.sum(labels == c) for c in range(1, n_classes)], float)
    real = model.sizes[:, : n_classes - 1]  # the structures' (not the body's)
    lo = real.min(0) * (1 - SIZE_SLACK)
    hi = real.max(0) * (1 + SIZE_SLACK)
    in_range = bool(np.all((sizes >= lo) & (sizes <= hi)))
    return {
        "pieces_as_real": shaped,
        "myocardium_around_lv": ring_ok,
        "sizes_in_range": in_range,
        "plausible": shaped and ring_ok and in_range,
        "sizes": sizes.tolist(),
    }


#: Draws per sample before giving up (measured on the 24-patient phantom at the defaults:
#: 100% of 48 draws plausible, 4% too close to a training patient).
TRIES = 50


@dataclass(frozen=True)
class Sample:
    """A kept sample: its maps (to decode at any size), labels on the grid, and its record."""

    maps: np.ndarray
    labels: np.ndarray
    record: dict[str, Any]


def sample_anatomy(
    model: AnatomyModel, seed: Sequence[int], *, myo: int | None, lv: int | None
) -> Sample:
    """The first draw from ``default_rng(seed)`` that passes the plausibility checks and is
    no training patient's own (no closer to any training patient than that patient's nearest
    other real person: :meth:`AnatomyModel.nearest` margin ≤ 0). One line after
    :data:`TRIES` draws."""
    rng = np.random.default_rng(list(seed))
    for attempt in range(1, TRIES + 1):
        maps = model.draw_maps(rng)
        labels = model.labels_of(maps)
        verdict = plausibility(labels, model, myo=myo, lv=lv)
        if not verdict["plausible"]:
            continue
        body = model.body_of(maps, labels)
        aligned_body = None if body is None else align(labels, len(labels), body)
        best, margin = model.nearest(align(labels, len(labels)), aligned_body)
        if margin > 0:
            continue
        record = {"draws": attempt, "nearest_dice": round(best, 4), "margin": round(margin, 4)}
        return Sample(maps, labels, record)
    raise PipelineError(
        f"the anatomy model made no plausible sample that is no patient's own in {TRIES} draws "
        f"(seed {list(seed)}): too few or too alike training patients"
    )


def planes_picture(rows: list[tuple[str, list[np.ndarray]]], tile: int = 96) -> np.ndarray:
    """RGB picture of label volumes in three planes: per row a name and volumes (Z, H, W);
    each volume as its middle axial, coronal and sagittal plane (structures in the preview
    palette, :data:`BODY_VALUE` in grey; the slice axis stretched to the tile). Pure: volumes
    in, pixels out."""
    from PIL import Image, ImageDraw

    from pipeline.preview import BODY_GREY, BODY_VALUE, PALETTE, grid

    def square(plane: np.ndarray) -> np.ndarray:
        colours = np.where(
            (plane == BODY_VALUE)[..., None], np.uint8(BODY_GREY), PALETTE[plane % len(PALETTE)]
        )
        img = Image.fromarray(colours.astype(np.uint8))
        return np.asarray(img.resize((tile, tile), Image.NEAREST))

    columns = max(len(v) for _, v in rows) * 3
    tiles = []
    for name, vols in rows:
        row = []
        for v in vols:
            z, h, w = v.shape
            # coronal and sagittal read top = head: the slice axis runs feet → head
            row += [square(v[z // 2]), square(v[::-1, h // 2, :]), square(v[::-1, :, w // 2])]
        row += [np.zeros((tile, tile, 3), np.uint8)] * (columns - len(row))
        banner = Image.fromarray(row[0])
        ImageDraw.Draw(banner).text((2, 2), name, fill=(255, 255, 255))
        row[0] = np.asarray(banner)
        tiles += row
    return grid(tiles, columns=columns)
