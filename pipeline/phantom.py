"""A procedural contrast-enhanced cardiac CT: the built-in dataset for the demo and the tests.

Each volume is a thorax (skin, subcutaneous fat, muscle, lungs with vessels, spine, ribs, sternum,
liver dome, mediastinal and epicardial fat) around a heart made of smooth 3D shapes: ellipsoidal
chambers, a myocardial shell and tubular great vessels. Cross-sections therefore change smoothly
along z; every volume draws its own sizes, positions, rotation, contrast level and noise from a
seeded generator. Labels come from the sharp geometry; intensities get partial-volume blur and
scanner noise. Values are in HU, written as int16 NIfTI with MM-WHS label codes.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.atomic import atomic_write
from pipeline.labels import MMWHS_LABELS
from pipeline.preprocess import display_to_ras
from pipeline.preview import grid, overlay, save_png, to_uint8
from pipeline.progress import Progress

FOV_MM = 380.0  # in-plane field of view
Z_EXTENT_MM = 160.0  # cranio-caudal coverage: below the apex to above the pulmonary bifurcation


@dataclass(frozen=True)
class PhantomVolume:
    """One generated volume: (z, rows, cols) HU and MM-WHS labels in radiological view."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]  # (x, y, z) mm


def _ellipse(
    X: np.ndarray, Y: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float = 0.0
) -> np.ndarray:
    """Normalised radius² of an in-plane ellipse (inside where < 1)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = X - cx, Y - cy
    u = (c * dx + s * dy) / a
    v = (-s * dx + c * dy) / b
    return u * u + v * v


def _ellipsoid(
    X: np.ndarray,
    Y: np.ndarray,
    Z: np.ndarray,
    centre: tuple[float, float, float],
    axes: tuple[float, float, float],
    angle: float,
) -> np.ndarray:
    """Boolean (z, rows, cols) inside of an ellipsoid rotated in-plane by ``angle``."""
    cx, cy, cz = centre
    a, b, c = axes
    r2 = _ellipse(X, Y, cx, cy, a, b, angle)[None] + ((Z - cz) / c)[:, None, None] ** 2
    return r2 < 1.0


def _tube(
    X: np.ndarray,
    Y: np.ndarray,
    Z: np.ndarray,
    p0: tuple[float, float, float],
    p1: tuple[float, float, float],
    radius: float,
) -> np.ndarray:
    """Boolean inside of a vertical-ish tube from p0 to p1 (centre moves linearly with z)."""
    z0, z1 = p0[2], p1[2]
    t = np.clip((Z - z0) / (z1 - z0), 0.0, 1.0)
    inside_z = (z0 <= Z) & (z1 >= Z)
    cx = p0[0] + t * (p1[0] - p0[0])
    cy = p0[1] + t * (p1[1] - p0[1])
    d2 = (X[None] - cx[:, None, None]) ** 2 + (Y[None] - cy[:, None, None]) ** 2
    return (d2 < radius * radius) & inside_z[:, None, None]


def _capsule_h(
    X: np.ndarray,
    Y: np.ndarray,
    Z: np.ndarray,
    a: tuple[float, float],
    b: tuple[float, float],
    zc: float,
    radius: float,
) -> np.ndarray:
    """Boolean inside of a horizontal tube between in-plane points a and b at height zc."""
    ax, ay = a
    bx, by = b
    vx, vy = bx - ax, by - ay
    t = np.clip(((X - ax) * vx + (Y - ay) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    d2 = (X - ax - t * vx) ** 2 + (Y - ay - t * vy) ** 2
    r2 = np.clip(radius * radius - (Z - zc) ** 2, 0.0, None)
    return d2[None] < r2[:, None, None]


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise low-passed by ``sigma`` (voxels)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    field /= field.std() + 1e-6
    return field


def _paint_ribs(
    hu: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    Z: np.ndarray,
    cy: float,
    a: float,
    b: float,
    jitters: list[float],
    sp: float,
) -> None:
    """Rib cross-sections along the inner chest wall; ribs run obliquely, so they slide with z."""
    half = int(np.ceil(9 / sp)) + 1
    n = X.shape[0]
    for k, jit in enumerate(jitters):
        for side in (-1, 1):
            theta = np.deg2rad(18 + k * 24 + jit) + np.deg2rad(0.12) * Z
            rxs = side * (a + 4) * np.sin(theta)
            rys = cy - (b + 4) * np.cos(theta) * 0.95
            visible = np.sin(Z / 22 + k * 1.3) > -0.3
            for z in np.flatnonzero(visible):
                col = int(np.argmin(np.abs(X[0] - rxs[z])))
                row = int(np.argmin(np.abs(Y[:, 0] - rys[z])))
                r0, r1 = max(row - half, 0), min(row + half + 1, n)
                c0, c1 = max(col - half, 0), min(col + half + 1, n)
                dx = (X[r0:r1, c0:c1] - rxs[z]) / 7
                dy = (Y[r0:r1, c0:c1] - rys[z]) / 5
                hu[z, r0:r1, c0:c1][dx * dx + dy * dy < 1] = 520


def make_volume(
    seed: int, *, size: int = 256, n_slices: int = 64, noise_hu: float | None = None
) -> PhantomVolume:
    """Generate one phantom volume (deterministic for ``seed``, ``size`` and ``n_slices``)."""
    rng = np.random.default_rng(seed)
    sp = FOV_MM / size
    dz = Z_EXTENT_MM / n_slices
    coords = (np.arange(size, dtype=np.float32) - size / 2 + 0.5) * sp
    # X: patient right (-) → left (+), columns; Y: anterior (-) → posterior (+), rows.
    X, Y = np.meshgrid(coords, coords, indexing="xy")
    Z = (np.arange(n_slices, dtype=np.float32) + 0.5) * dz
    shape = (n_slices, size, size)

    def jitter(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    body_a, body_b = 160.0 * (1 + jitter(0.08)), 112.0 * (1 + jitter(0.08))
    body_cy = 8.0 + jitter(4)
    heart_dx, heart_dy, heart_dz = jitter(8), jitter(6), jitter(8)
    heart_scale = 1 + jitter(0.12)
    heart_rot = np.deg2rad(35 + jitter(10))
    blood = 380 + jitter(70)  # arterial-phase contrast level of this scan
    right_blood = blood - 70 + jitter(30)
    noise = noise_hu if noise_hu is not None else 14 + rng.uniform(0, 10)

    hu = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int16)

    def ell2d(cx: float, cy: float, a: float, b: float, ang: float = 0.0) -> np.ndarray:
        return _ellipse(X, Y, cx, cy, a, b, ang)

    # --- Body wall: skin+fat, muscle, the thoracic cavity. The body tapers slightly with z.
    taper = (1.0 - 0.04 * (Z / Z_EXTENT_MM))[:, None, None]
    body_r = ell2d(0, body_cy, body_a, body_b)[None] / taper**2
    fat_t = 14 + jitter(5)
    muscle_t = 11 + jitter(3)
    inner_a1, inner_b1 = body_a - fat_t, body_b - fat_t
    inner_a2, inner_b2 = inner_a1 - muscle_t, inner_b1 - muscle_t * 0.8
    muscle_r = ell2d(0, body_cy, inner_a1, inner_b1)[None] / taper**2
    cavity_r = ell2d(0, body_cy - 4, inner_a2, inner_b2)[None] / taper**2
    hu[body_r < 1] = -95
    hu[muscle_r < 1] = 45
    cavity = cavity_r < 1
    hu[cavity] = 30

    # --- Lungs: two lobes filling the cavity, vessels from a smooth noise field.
    lung_r = ell2d(-inner_a2 * 0.48, body_cy + 2, inner_a2 * 0.5, inner_b2 * 0.92)[None]
    lung_l = ell2d(inner_a2 * 0.48, body_cy + 2, inner_a2 * 0.5, inner_b2 * 0.92)[None]
    lungs = ((lung_r < 1) | (lung_l < 1)) & cavity
    # Mediastinum: wide around the heart, narrowing to the great vessels above it.
    med_w = 78 * heart_scale * np.where(105 + heart_dz < Z, 0.62, 1.0).astype(np.float32)
    mediastinum = (
        ((X[None] - 10 - heart_dx) / med_w[:, None, None]) ** 2
        + ((Y[None] + 10 - heart_dy) / 84) ** 2
    ) < 1
    spine_zone = ell2d(0, body_b * 0.62 + body_cy, 32, 40)[None] < 1
    # Liver dome under the right lung at the lowest slices.
    liver = (ell2d(-45, 10, 105, 85)[None] + ((Z - 0) / (38 + jitter(8)))[:, None, None] ** 2) < 1
    lungs &= ~mediastinum & ~spine_zone & ~liver
    vessels = _smooth_noise(rng, shape, (1.0, 1.3, 1.3))
    lung_hu = -860 + 20 * vessels
    lung_hu = np.where(vessels > 1.8, -300 + 250 * (vessels - 1.8), lung_hu)
    hu = np.where(lungs, lung_hu, hu)
    hu[mediastinum & cavity & ~lungs] = -60  # mediastinal fat
    hu[liver & cavity] = 58

    # --- Bones: sternum, vertebra with canal and spinous process, ribs along the wall.
    spine_y = body_cy + body_b * 0.66
    sternum = ell2d(0, body_cy - inner_b2 - 4, 16, 6) < 1
    hu[:, sternum] = 450
    vb_r = ell2d(0, spine_y - 8, 19, 16)
    hu[:, vb_r < 1] = 650  # cortex
    hu[:, vb_r < 0.6] = 230  # cancellous bone
    canal = ell2d(0, spine_y + 16, 8, 7)
    lamina = ell2d(0, spine_y + 18, 17, 13)
    hu[:, (lamina < 1) & (canal >= 1)] = 600
    hu[:, canal < 1] = 15
    hu[:, ell2d(0, spine_y + 32, 4, 9) < 1] = 600  # spinous process
    _paint_ribs(hu, X, Y, Z, body_cy, inner_a2, inner_b2, [jitter(3) for _ in range(7)], sp)

    # --- Heart: chambers, myocardium, great vessels (painted in MM-WHS label order).
    hs = heart_scale
    cx, cy, cz = 28 + heart_dx, -12 + heart_dy, 62 + heart_dz

    def at(dx: float, dy: float, dzz: float) -> tuple[float, float, float]:
        c, s = np.cos(heart_rot - np.deg2rad(35)), np.sin(heart_rot - np.deg2rad(35))
        return (cx + (c * dx - s * dy) * hs, cy + (s * dx + c * dy) * hs, cz + dzz * hs)

    lv_c = at(14, 6, -8)
    lv_outer = _ellipsoid(X, Y, Z, lv_c, (48 * hs, 37 * hs, 52 * hs), heart_rot)
    lv_cav = _ellipsoid(X, Y, Z, lv_c, (36 * hs, 25 * hs, 44 * hs), heart_rot)
    rv = _ellipsoid(X, Y, Z, at(-22, -28, -4), (52 * hs, 27 * hs, 46 * hs), heart_rot - 0.5)
    la = _ellipsoid(X, Y, Z, at(-6, 38, 36), (36 * hs, 23 * hs, 25 * hs), 0.2)
    ra = _ellipsoid(X, Y, Z, at(-56, 6, 20), (30 * hs, 33 * hs, 38 * hs), 0.3)
    asc_ao = _tube(X, Y, Z, at(-14, 6, 22), (cx - 22, cy - 6, Z_EXTENT_MM + 1), 14 * hs)
    desc_ao = _tube(X, Y, Z, (24, spine_y - 30, -1), (20, spine_y - 34, Z_EXTENT_MM + 1), 11.5)
    pa = _tube(X, Y, Z, at(-4, -40, 32), (cx + 2, cy - 30, 140), 13 * hs)
    pa |= _capsule_h(X, Y, Z, (cx + 2, cy - 30), (cx + 38, cy + 12), 136 + heart_dz * 0.5, 10)

    heart = lv_outer | rv | la | ra
    epicardial = ndimage.binary_dilation(heart, iterations=2) & ~heart
    hu[epicardial & cavity] = -75
    codes = MMWHS_LABELS
    for mask, code, value in (
        (ra, codes["right_atrium"], right_blood - 15),
        (la, codes["left_atrium"], blood - 10),
        (rv, codes["right_ventricle"], right_blood),
        (lv_outer, codes["myocardium"], 115.0),
        (lv_cav, codes["left_ventricle"], blood),
        (asc_ao | desc_ao, codes["aorta"], blood + 15),
        (pa, codes["pulmonary_artery"], right_blood + 10),
    ):
        mask = mask & cavity
        labels[mask] = code
        hu[mask] = value
    # Papillary muscles and trabeculae: darker spots inside the LV blood pool.
    trab = (vessels < -1.6) & lv_cav & cavity
    hu[trab] = 140

    # --- Partial volume (in-plane PSF), then correlated scanner noise.
    hu = ndimage.gaussian_filter(hu, (0.4, 0.9, 0.9))
    hu += noise * _smooth_noise(rng, shape, (0.0, 0.7, 0.7))
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return PhantomVolume(hu=hu, labels=labels, spacing=(sp, sp, dz))


def volume_to_nifti(vol: PhantomVolume) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """NIfTI image and label objects (RAS+ affine with the volume's spacing)."""
    affine = np.diag([*vol.spacing, 1.0])
    n_x = vol.hu.shape[2]
    affine[:3, 3] = [-(n_x / 2) * vol.spacing[0], -(vol.hu.shape[1] / 2) * vol.spacing[1], 0.0]
    image = nib.Nifti1Image(display_to_ras(vol.hu), affine)
    label = nib.Nifti1Image(display_to_ras(vol.labels.astype(np.int16)), affine)
    for img in (image, label):
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    image.header.set_data_dtype(np.int16)
    label.header.set_data_dtype(np.int16)
    return image, label


def _write_one(out: Path, seed: int, index: int, size: int, n_slices: int) -> np.ndarray:
    """Generate and write volume ``index``; return its preview tile (largest-heart slice)."""
    vol = make_volume(_volume_seed(seed, index), size=size, n_slices=n_slices)
    image, label = volume_to_nifti(vol)
    stem = f"ct_{index + 1:04d}"
    for img, kind in ((image, "image"), (label, "label")):
        atomic_write(out / f"{stem}_{kind}.nii.gz", lambda tmp, img=img: nib.save(img, tmp))
    z = int(np.argmax((vol.labels > 0).sum(axis=(1, 2))))
    classes = np.searchsorted(np.array(sorted(MMWHS_LABELS.values())), vol.labels[z])
    unit = np.clip((vol.hu[z].astype(np.float32) + 160.0) / 400.0, 0, 1)  # soft-tissue window
    return np.concatenate([to_uint8(unit)[..., None].repeat(3, 2), overlay(unit, classes)], axis=1)


def write_phantom(
    out: Path,
    *,
    volumes: int = 8,
    seed: int = 0,
    size: int = 256,
    n_slices: int = 64,
    workers: int = 0,
    progress: Progress = iter,
) -> list[Path]:
    """Write ``volumes`` pairs ``ct_XXXX_image.nii.gz`` / ``ct_XXXX_label.nii.gz`` into ``out``.

    Volume i depends only on (seed, i, size, n_slices). Files are written under temporary names
    and renamed, so an interrupted run leaves only complete files. Also writes ``preview.png``
    (window 40/400 HU, beside the label overlay) for up to four volumes. ``workers=0`` uses one
    process per core for larger sets. Returns the image paths.
    """
    out.mkdir(parents=True, exist_ok=True)
    if workers == 0:
        workers = 1 if volumes < 4 else min(os.cpu_count() or 1, volumes)
    args = [(out, seed, i, size, n_slices) for i in range(volumes)]
    tiles: list[np.ndarray] = []
    if workers == 1:
        for a in progress(args):
            tile = _write_one(*a)
            if len(tiles) < 4:
                tiles.append(tile)
    else:
        # spawn, not fork: the caller may have TensorFlow's threads running.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_write_one, *a) for a in args]
            for i, fut in enumerate(progress(futures)):
                tile = fut.result()
                if i < 4:
                    tiles.append(tile)
    save_png(grid(tiles, columns=1 if len(tiles) == 1 else 2), out / "preview.png")
    return [out / f"ct_{i + 1:04d}_image.nii.gz" for i in range(volumes)]


def _volume_seed(seed: int, index: int) -> int:
    """Independent, reproducible per-volume seeds (volume i is the same whatever N is)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
