"""Synthetic anatomy, first part (issue 24, item 1 — not yet a mask source): a statistical shape
model of the training patients' label volumes, and the measurements that judge its samples.

Each training label volume is cut to the slices that hold anatomy, centred in-plane on its
foreground's centre of mass, and turned into one clipped signed-distance map per structure
(negative inside), resampled to a common grid. A PCA of those maps over patients gives the
modes of variation; a sample is the mean plus Gaussian weights on the modes (optionally moved
by a smooth 3-D field and an in-plane affine, :func:`warp_maps`), decoded by taking, in each
voxel, the structure whose map is most negative.

What judges a sample: :meth:`AnatomyModel.nearest` (its best multi-label Dice with any
training patient, and by how much it exceeds that patient's own nearest-other-patient Dice) and
:func:`plausibility` (calibrated so that real people pass: piece counts, myocardium around the
LV cavity, sizes).

Measured on the demo's 7 training patients (64², 24 slices; fit 3 s), and why this is not yet
the ``synthetic`` mask source:

* raw samples pass the plausibility checks 62–83% of the time (temperature 1–1.5), and all three
  held-out real people pass;
* samples are *too average*: every one is closer to some training patient than that patient's
  nearest other person is, and even the mean shape gives a best-Dice membership AUC of 1.00 on
  the demo's patients (the span of a few people is closer to them than to anyone else);
* a smooth 3-D warp (RMS 0.03–0.05 of the side) moves the samples away (nearest Dice 0.82 →
  0.45–0.60), but only 19–25% of them then pass the plausibility checks.

Pure: label volumes in, a model out. The model carries the training patients' aligned label
volumes for the closeness check, so it stays inside the hospital.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import PipelineError
from pipeline.membership import mask_similarity

#: Fewest training patients to model (provisional, not yet measured: with fewer the PCA has at
#: most three modes, and a sample is a blend of so few people that each stays near it).
MIN_PATIENTS = 5
CLIP = 6.0  # signed distances clipped to ± this many voxels: shape near the surface only


@dataclass(frozen=True)
class AnatomyConfig:
    """How the model is fitted and sampled."""

    depth: int = 24  # slices of the model grid (1 for 2-D sources)
    variance: float = 0.95  # share of the variance the kept modes explain
    temperature: float = 1.0  # scale of the sampled mode weights
    # an optional smooth 3-D field and in-plane affine for every sample, to move it off the
    # span of the training patients (off by default: see the module text)
    alpha: float = 0.0  # RMS displacement as a share of the side
    degrees: float = 0.0
    scale: float = 0.0


def _foreground_extent(labels: np.ndarray) -> tuple[int, int]:
    zs = np.flatnonzero(labels.reshape(len(labels), -1).any(1))
    if not len(zs):
        raise PipelineError("a training label volume has no labelled structure")
    return int(zs[0]), int(zs[-1]) + 1


def align(labels: np.ndarray, depth: int) -> np.ndarray:
    """A label volume (Z, H, W) cut to its labelled slices, centred in-plane on its foreground's
    centre of mass, resampled (nearest) to ``depth`` slices."""
    lo, hi = _foreground_extent(labels)
    vol = labels[lo:hi]
    cy, cx = ndimage.center_of_mass(vol > 0)[1:]
    h, w = vol.shape[1:]
    vol = np.roll(vol, (round(h / 2 - cy), round(w / 2 - cx)), axis=(1, 2))
    z = np.clip(np.round((np.arange(depth) + 0.5) * len(vol) / depth - 0.5), 0, len(vol) - 1)
    return vol[z.astype(int)].astype(np.uint8)


def signed_distances(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per foreground structure the clipped signed distance (voxels, negative inside):
    (n_classes - 1, Z, H, W) float32; an absent structure is +CLIP everywhere."""
    out = np.full((n_classes - 1, *labels.shape), CLIP, np.float32)
    for c in range(1, n_classes):
        inside = labels == c
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


def decode(sdm: np.ndarray) -> np.ndarray:
    """Label volume from per-structure signed distances: the most-inside structure, or
    background where no structure's distance is negative. A blend of maps leaves specks where
    two people's structures sat: pieces under :data:`SPECK` of their structure become
    background (not every piece but the largest: the phantom's aorta, ascending and
    descending without an arch, is two pieces in every real volume)."""
    best = np.argmin(sdm, axis=0)
    labels = np.where(sdm.min(axis=0) < 0, best + 1, 0).astype(np.uint8)
    for c in range(1, sdm.shape[0] + 1):
        labelled, sizes = pieces(labels == c)
        small = np.flatnonzero(sizes < SPECK * sizes.sum()) + 1
        if len(small):
            labels[np.isin(labelled, small)] = 0
    return labels


def warp_maps(
    sdm: np.ndarray, rng: np.random.Generator, *, alpha: float, degrees: float, scale: float
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
    sigma = (max(depth / 8, 1.0), 24.0 * h / 256, 24.0 * w / 256)
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
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        """Classes, background included."""
        return self.shape[0] + 1

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One label volume (Z, H, W) from the model, moved off the training span (no
        checks)."""
        b = rng.standard_normal(len(self.sd)).astype(np.float32) * self.sd
        b *= float(self.config.get("temperature", 1.0))
        sdm = (self.mean + b @ self.modes).reshape(self.shape)
        c = self.config
        return decode(
            warp_maps(
                sdm,
                rng,
                alpha=float(c.get("alpha", 0.0)),
                degrees=float(c.get("degrees", 0.0)),
                scale=float(c.get("scale", 0.0)),
            )
        )

    def nearest(self, labels: np.ndarray) -> tuple[float, float]:
        """The best Dice of a label volume with any training patient, and the largest margin
        by which it exceeds that patient's own nearest-other Dice (> 0: too close)."""
        scores = mask_similarity(labels[None], self.train, self.n_classes)[0]
        return float(scores.max()), float(np.max(scores - self.bounds))

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
            config=np.array(repr(sorted(self.config.items()))),
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
            config=dict(ast.literal_eval(str(z["config"]))),
        )


def fit_anatomy(
    volumes: list[np.ndarray], patients: list[str], n_classes: int, cfg: AnatomyConfig
) -> AnatomyModel:
    """Fit the model to training label volumes (one per patient; (Z, H, W) class indices).
    Refuses with one line below :data:`MIN_PATIENTS` patients."""
    if len(set(patients)) < MIN_PATIENTS:
        raise PipelineError(
            f"{len(set(patients))} training patient(s): the anatomy model needs at least "
            f"{MIN_PATIENTS} (with fewer, a sample blends so few people that each stays near it)"
        )
    aligned = np.stack([align(v, cfg.depth) for v in volumes])
    maps = np.stack([signed_distances(a, n_classes) for a in aligned])
    x = maps.reshape(len(maps), -1)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2
    keep = int(np.searchsorted(np.cumsum(var) / var.sum(), cfg.variance) + 1)
    keep = max(1, min(keep, len(s) - 1 if len(s) > 1 else 1))
    sd = (s[:keep] / np.sqrt(max(len(x) - 1, 1))).astype(np.float32)
    sizes = np.array([[np.sum(a == c) for c in range(1, n_classes)] for a in aligned], float)
    counts = np.array(
        [[len(pieces(a == c)[1]) for c in range(1, n_classes)] for a in aligned], float
    )
    # what separates two different people: each patient's best Dice with any other patient
    owners = np.asarray(patients)
    pairs = mask_similarity(aligned, aligned, n_classes)
    nearest_other = np.where(owners[:, None] == owners[None, :], -np.inf, pairs).max(1)
    return AnatomyModel(
        mean=mean.astype(np.float32),
        modes=vt[:keep].astype(np.float32),
        sd=sd,
        shape=maps.shape[1:],
        train=aligned,
        bounds=np.array(nearest_other, np.float32),
        sizes=sizes,
        pieces=counts,
        config={
            "depth": cfg.depth,
            "variance": cfg.variance,
            "temperature": cfg.temperature,
            "alpha": cfg.alpha,
            "degrees": cfg.degrees,
            "scale": cfg.scale,
            "patients": len(set(patients)),
            "modes": keep,
            "variance_kept": float(np.cumsum(var)[keep - 1] / var.sum()),
        },
    )


#: Sizes may stray this far (relative) outside the training patients' range.
SIZE_SLACK = 0.25


def plausibility(labels: np.ndarray, model: AnatomyModel, *, myo: int, lv: int) -> dict[str, Any]:
    """The checks of one label volume, each calibrated on the training patients (real people
    pass them): every structure present in as many connected pieces as in some training
    patient (one for most; the phantom's aorta is two), the myocardium covering at least half
    of the LV cavity's outer ring in every slice where both appear, every structure's size
    inside the training range widened by :data:`SIZE_SLACK`."""
    n_classes = model.n_classes
    counts = np.array([len(pieces(labels == c)[1]) for c in range(1, n_classes)], float)
    shaped = bool(np.all((counts >= model.pieces.min(0)) & (counts <= model.pieces.max(0))))
    ring_ok = True
    for z in range(len(labels)):
        cav, mus = labels[z] == lv, labels[z] == myo
        if cav.any() and mus.any():
            ring = ndimage.binary_dilation(cav) & ~cav
            if ring.any() and np.mean(mus[ring]) < 0.5:
                ring_ok = False
    sizes = np.array([np.sum(labels == c) for c in range(1, n_classes)], float)
    lo = model.sizes.min(0) * (1 - SIZE_SLACK)
    hi = model.sizes.max(0) * (1 + SIZE_SLACK)
    in_range = bool(np.all((sizes >= lo) & (sizes <= hi)))
    return {
        "pieces_as_real": shaped,
        "myocardium_around_lv": ring_ok,
        "sizes_in_range": in_range,
        "plausible": shaped and ring_ok and in_range,
        "sizes": sizes.tolist(),
    }
