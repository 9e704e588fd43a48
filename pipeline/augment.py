"""Label-free image transforms that a near-copy of a scan survives.

They plant copies for the privacy benchmark and tests, and make the two views of a slice for the
encoder's contrastive training. Every function takes an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage


def hflip(image: np.ndarray) -> np.ndarray:
    """Mirror left-right."""
    return np.ascontiguousarray(image[:, ::-1])


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move by whole pixels, filling the uncovered border with the image's minimum (air)."""
    out = np.full_like(image, image.min())
    h, w = image.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = image[ys, xs]
    return out


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, clipped to [0, 1]."""
    noisy = image + rng.normal(0.0, sigma, image.shape).astype(image.dtype)
    return np.clip(noisy, 0.0, 1.0)


def scale_intensity(image: np.ndarray, factor: float) -> np.ndarray:
    """Multiply intensities, clipped to [0, 1]."""
    return np.clip(image * np.float32(factor), 0.0, 1.0)


def elastic(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    alpha: float = 2.0,
    sigma: float = 8.0,
    order: int = 1,
) -> np.ndarray:
    """Mild elastic deformation: a smooth random displacement field of about ``alpha`` px.

    ``sigma`` is the field's smoothness in pixels at 256² and scales with the image size.
    For label maps use :func:`elastic_coords` with :func:`warp_labels` (no new label, and no
    half-pixel snapping of thin structures as with ``order=0``).
    """
    coords = elastic_coords(image.shape, rng, alpha=alpha, sigma=sigma)
    return ndimage.map_coordinates(image, coords, order=order, mode="nearest").astype(image.dtype)


def elastic_coords(
    shape: tuple[int, ...], rng: np.random.Generator, *, alpha: float, sigma: float
) -> np.ndarray:
    """The sampling grid of :func:`elastic` (2, H, W): where each output pixel reads from."""
    h, w = shape
    s = sigma * h / 256.0
    fields = []
    for _ in range(2):
        f = ndimage.gaussian_filter(rng.standard_normal((h, w)), s)
        f *= alpha / (np.abs(f).max() + 1e-9)
        fields.append(f)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([yy + fields[0], xx + fields[1]])


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Small in-plane rotation about the centre (bilinear, border = nearest)."""
    return ndimage.rotate(image, degrees, reshape=False, order=1, mode="nearest").astype(
        image.dtype
    )


def random_affine(
    rng: np.random.Generator,
    *,
    degrees: float = 10.0,
    scale: float = 0.1,
    shift: float = 0.06,
    flip: bool = False,
) -> dict[str, float | bool]:
    """Parameters of one random in-plane affine: rotation ±``degrees``, scale 1 ± ``scale``,
    shift ± ``shift`` of the side, and (if ``flip``) a left-right mirror with probability ½."""
    return {
        "degrees": float(rng.uniform(-degrees, degrees)),
        "scale": float(rng.uniform(1 - scale, 1 + scale)),
        "shift_y": float(rng.uniform(-shift, shift)),
        "shift_x": float(rng.uniform(-shift, shift)),
        "mirror": bool(flip and rng.random() < 0.5),
    }


def _affine(size: int, params: dict[str, float | bool]) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) that take an output pixel to where it reads the input (scipy's order)."""
    angle = np.deg2rad(float(params["degrees"]))
    c, si = np.cos(angle) / float(params["scale"]), np.sin(angle) / float(params["scale"])
    matrix = np.array([[c, -si], [si, c]])
    if params["mirror"]:
        matrix = matrix @ np.diag([1.0, -1.0])
    centre_px = np.array([(size - 1) / 2, (size - 1) / 2])
    moved = centre_px + np.array([float(params["shift_y"]), float(params["shift_x"])]) * size
    return matrix, centre_px - matrix @ moved


def affine_warp(
    image: np.ndarray, params: dict[str, float | bool], *, order: int, cval: float
) -> np.ndarray:
    """Apply :func:`random_affine` parameters about the centre of a square (S, S) array.

    Uncovered pixels get ``cval``. For label maps use :func:`affine_coords` with
    :func:`warp_labels`.
    """
    matrix, offset = _affine(image.shape[0], params)
    out = ndimage.affine_transform(image, matrix, offset, order=order, mode="constant", cval=cval)
    return out.astype(image.dtype)


def affine_coords(size: int, params: dict[str, float | bool]) -> np.ndarray:
    """The sampling grid (2, S, S) of :func:`affine_warp`: where each output pixel reads from."""
    matrix, offset = _affine(size, params)
    grid = np.indices((size, size), dtype=np.float64).reshape(2, -1)
    return (matrix @ grid + offset[:, None]).reshape(2, size, size)


def warp_labels(mask: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Resample a class-index map at ``coords`` (2, H, W) by label shares.

    Each label's indicator is interpolated bilinearly (a neighbour off the grid counts as
    background) and every pixel takes the label with the largest share. Nearest neighbour snaps
    every boundary to the old grid, up to half a pixel away from where the image's interpolated
    edge lands; on a 2-px vessel that misalignment puts dim edge pixels under the label. No new
    label appears.
    """
    h, w = mask.shape
    y0, x0 = np.floor(coords[0]), np.floor(coords[1])
    fy, fx = (coords[0] - y0).astype(np.float32), (coords[1] - x0).astype(np.float32)
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    corners = []
    for dy, dx, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        label = np.where(inside, mask[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0)
        corners.append((label, weight))
    out = np.zeros(coords.shape[1:], mask.dtype)
    best = np.full(coords.shape[1:], -1.0, np.float32)
    for c in np.union1d([0], np.unique(mask)).astype(mask.dtype):
        share = sum(weight * (label == c) for label, weight in corners)
        take = share > best  # ties keep the lower label, as an argmax would
        out[take], best[take] = c, share[take]
    return out


def blend(image: np.ndarray, other: np.ndarray, weight: float = 0.7) -> np.ndarray:
    """``weight`` of ``image`` plus the rest of ``other``."""
    return (weight * image + (1 - weight) * other).astype(image.dtype)


#: The planted near-copies the privacy filter must catch (name → transform of a source slice).
#: ``other`` is a different slice, used only by the blend.
PLANTED: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "copy": lambda x, o, r: x.copy(),
    "hflip": lambda x, o, r: hflip(x),
    "shift+3": lambda x, o, r: shift(x, 3, 3),
    "shift-3": lambda x, o, r: shift(x, -3, -3),
    "noise0.02": lambda x, o, r: add_noise(x, 0.02, r),
    "intensity0.95": lambda x, o, r: scale_intensity(x, 0.95),
    "intensity1.05": lambda x, o, r: scale_intensity(x, 1.05),
    "elastic": lambda x, o, r: elastic(x, r),
    "blend70/30": lambda x, o, r: blend(x, o, 0.7),
}


def random_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random near-copy (for contrastive training): any mix of the transforms above."""
    out = image
    if rng.random() < 0.5:
        out = hflip(out)
    if rng.random() < 0.5:
        out = rotate(out, float(rng.uniform(-8, 8)))
    if rng.random() < 0.7:
        m = max(1, image.shape[0] // 64)
        out = shift(out, int(rng.integers(-3 * m, 3 * m + 1)), int(rng.integers(-3 * m, 3 * m + 1)))
    if rng.random() < 0.5:
        out = elastic(out, rng, alpha=float(rng.uniform(0.5, 2.0)))
    if rng.random() < 0.7:
        out = scale_intensity(out, float(rng.uniform(0.9, 1.1)))
    if rng.random() < 0.5:
        out = add_noise(out, float(rng.uniform(0.0, 0.03)), rng)
    return out.astype(np.float32)


#: How ``generate --masks augmented`` deforms a training mask by default, and so how the
#: filter's label-map check plants its deformed copies (one recipe, not two sets of numbers).
DEFORM_DEFAULTS = {"alpha": 0.03, "degrees": 12.0, "scale": 0.1, "shift": 0.05}


def deformation_coords(shape: tuple[int, ...], params: dict[str, Any]) -> np.ndarray:
    """Where each pixel of a deformed map reads from (2, H, W), rebuilt from the record
    :func:`deform_mask` returns: the same deformation can move a second map (a body outline)."""
    size = shape[0]
    bend = elastic_coords(
        shape,
        np.random.default_rng(params["elastic"]["seed"]),
        alpha=params["elastic"]["alpha_px"],
        sigma=24.0,
    )
    # one resampling of the composed map (affine, then the field read where the affine lands);
    # a point the affine takes off the grid reads a far-off coordinate, hence background
    at = affine_coords(size, params["affine"])
    return np.stack(
        [ndimage.map_coordinates(b, at, order=1, mode="constant", cval=-(10**6)) for b in bend]
    )


def deform_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    class_names: tuple[str, ...],
    drop: float,
    alpha: float,
    degrees: float,
    scale: float,
    shift: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A new, label-preserving variant of a class-index mask and the parameters that made it.

    Elastic field (about ``alpha``·side px, seeded and recorded), then an affine, resampled by
    label shares (:func:`~pipeline.augment.warp_labels`: no new label, and 2-px vessels keep
    their width instead of fraying into nearest-neighbour steps); each present structure is
    dropped with probability ``drop`` (at least one is kept). Returns the mask and a JSON-ready
    parameter record.
    """
    size = mask.shape[0]
    field_seed = int(rng.integers(0, 2**31 - 1))
    # a smooth field (24 px at 256², scaled with the side): organs bend, edges do not fray
    elastic_params = {"alpha_px": alpha * size, "sigma_px": 24.0 * size / 256.0, "seed": field_seed}
    affine = random_affine(rng, degrees=degrees, scale=scale, shift=shift)
    coords = deformation_coords(mask.shape, {"elastic": elastic_params, "affine": affine})
    out = warp_labels(mask, coords)
    present = [int(c) for c in np.unique(out) if c > 0]
    dropped = [c for c in present if rng.random() < drop]
    if dropped and len(dropped) == len(present):
        dropped = dropped[1:]
    for c in dropped:
        out[out == c] = 0
    return out.astype(np.uint8), {
        "elastic": elastic_params,
        "affine": affine,
        "dropped": [class_names[c] for c in dropped],
    }
