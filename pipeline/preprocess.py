"""Pure preprocessing of slices: HU windowing, square padding, anti-aliased and nearest resizing,
centring."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.augment import shift

#: Default HU window: air to dense contrast/bone; recorded per source so exports map back to HU.
DEFAULT_WINDOW: tuple[float, float] = (-1024.0, 2048.0)
#: CT viewing windows (name → (level, width) in HU), for pictures only.
VIEW_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "cardiac": (200.0, 700.0),
    "lung": (-600.0, 1500.0),
}


#: The window of every picture the pipeline writes of HU slices (previews, sample grids,
#: report figures): in the storage window 200 HU of heart contrast is 6% of the grey range.
PICTURE_WINDOW = "cardiac"


def window_to_unit(hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """Clip HU to ``window`` and scale linearly to [0, 1] (float32)."""
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"window {window} is empty")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def unit_to_hu(unit: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """Inverse of :func:`window_to_unit` (exact inside the window), as float32 HU."""
    lo, hi = window
    return np.asarray(unit, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)


def stored_to_unit(
    values: np.ndarray, *, units: str, window: tuple[float, float] | None
) -> np.ndarray:
    """Stored pixel values → [0, 1], the one reading every stage shares: HU through the
    ``window`` (``units == "HU"``), display units 0–255 divided by 255 (``window`` unused)."""
    if units == "HU":
        if window is None:
            raise ValueError("HU values need a window")
        return window_to_unit(values, window)
    return np.asarray(values, dtype=np.float32) / np.float32(255.0)


def view_window(
    unit: np.ndarray, *, storage: tuple[float, float], units: str, preset: str | None
) -> np.ndarray:
    """A [0, 1] slice stored in the ``storage`` HU window, re-windowed for viewing in the CT
    window ``preset`` (:data:`VIEW_WINDOWS`); display-unit slices (or no preset) unchanged.
    Every picture of a slice goes through here, so the same tissue looks the same."""
    if units != "HU" or preset is None:
        return np.asarray(unit, dtype=np.float32)
    lo, hi = storage
    level, width = VIEW_WINDOWS[preset]
    hu = np.float32(lo) + np.asarray(unit, dtype=np.float32) * np.float32(hi - lo)
    return window_to_unit(hu, (level - width / 2, level + width / 2))


def picture_window(unit: np.ndarray, *, storage: tuple[float, float], units: str) -> np.ndarray:
    """A [0, 1] slice as every written picture shows it (:data:`PICTURE_WINDOW` for HU)."""
    return view_window(unit, storage=storage, units=units, preset=PICTURE_WINDOW)


def view_label(units: str, preset: str | None) -> str:
    """How a picture's grey levels were set, in words (shown with every picture)."""
    if units != "HU" or preset is None:
        return "display units" if units != "HU" else "storage window"
    level, width = VIEW_WINDOWS[preset]
    return f"{preset} window {level:g}/{width:g} HU"


def unit_scale(units: str, window: tuple[float, float] | None) -> float:
    """How many stored units the [0, 1] range spans (the HU window's width, or 255)."""
    if units == "HU":
        if window is None:
            raise ValueError("HU values need a window")
        return float(window[1] - window[0])
    return 255.0


def ras_to_display(volume: np.ndarray) -> np.ndarray:
    """(x, y, z) RAS+ array → (z, rows, cols) in radiological view.

    Rows run anterior → posterior and columns patient-right → patient-left, as a reader shows an
    axial CT slice.
    """
    return np.ascontiguousarray(np.transpose(volume[::-1, ::-1, :], (2, 1, 0)))


def display_to_ras(slices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_display`: (z, rows, cols) → (x, y, z) RAS+."""
    return np.ascontiguousarray(np.transpose(slices, (2, 1, 0))[::-1, ::-1, :])


def fitted_shape(
    shape: tuple[int, int], size: int, spacing: tuple[float, float] = (1.0, 1.0)
) -> tuple[int, int]:
    """(rows, cols) that a slice of ``shape`` and pixel ``spacing`` takes inside a ``size``² square.

    The longer physical side fills the square; the other keeps the true aspect ratio, so
    anisotropic pixels become square ones.
    """
    extent_r, extent_c = shape[0] * spacing[0], shape[1] * spacing[1]
    scale = size / max(extent_r, extent_c)
    rows = min(size, max(1, round(extent_r * scale)))
    cols = min(size, max(1, round(extent_c * scale)))
    return rows, cols


def _pad_to_square(array: np.ndarray, size: int, fill: float | int) -> np.ndarray:
    dr, dc = size - array.shape[0], size - array.shape[1]
    if dr == 0 and dc == 0:
        return np.ascontiguousarray(array)
    pad = ((dr // 2, dr - dr // 2), (dc // 2, dc - dc // 2))
    return np.pad(array, pad, constant_values=fill)


def resize_image(
    image: np.ndarray,
    size: int,
    *,
    spacing: tuple[float, float] = (1.0, 1.0),
    fill: float = 0.0,
) -> np.ndarray:
    """Resize a 2D float slice into a ``size``² square (aspect kept, padded with ``fill``).

    Anti-aliased: Pillow's bilinear filter widens its support by the scale factor when it
    shrinks (a triangle low-pass). The result is clipped to the input's range.
    """
    image = np.asarray(image, dtype=np.float32)
    rows, cols = fitted_shape(image.shape, size, spacing)
    if (rows, cols) != image.shape:
        resized = Image.fromarray(image, mode="F").resize((cols, rows), Image.Resampling.BILINEAR)
        lo, hi = float(image.min()), float(image.max())
        image = np.clip(np.asarray(resized, dtype=np.float32), lo, hi)
    return _pad_to_square(image, size, fill)


def resize_mask(
    mask: np.ndarray, size: int, *, spacing: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Resize a 2D class-index mask like :func:`resize_image`, by nearest neighbour only (uint8)."""
    mask = np.asarray(mask, dtype=np.uint8)
    rows, cols = fitted_shape(mask.shape, size, spacing)
    if (rows, cols) != mask.shape:
        resized = Image.fromarray(mask, mode="L").resize((cols, rows), Image.Resampling.NEAREST)
        mask = np.asarray(resized, dtype=np.uint8)
    return _pad_to_square(mask, size, 0)


def resized_spacing(
    shape: tuple[int, int], size: int, spacing: tuple[float, float] = (1.0, 1.0)
) -> float:
    """In-plane pixel spacing after :func:`resize_image` (the same on both axes)."""
    return float(max(shape[0] * spacing[0], shape[1] * spacing[1]) / size)


#: The least share of labelled pixels a slice needs to count as cutting through the heart (ingest
#: keeps axial slices by it; the through-plane measures cut the other planes by it too).
MIN_FOREGROUND = 0.001


def foreground_fraction(mask: np.ndarray) -> float:
    """Share of pixels that are not background."""
    return float(np.count_nonzero(mask)) / float(mask.size)


def centre(image: np.ndarray) -> np.ndarray:
    """Move an image so its intensity centroid sits at the centre (whole pixels, air-filled).

    Both the index and the queries are centred, so a shifted copy embeds like its source.
    """
    h, w = image.shape
    weights = image - image.min()
    total = float(weights.sum())
    if total <= 0:
        return image
    cy = float((weights.sum(axis=1) * np.arange(h)).sum() / total)
    cx = float((weights.sum(axis=0) * np.arange(w)).sum() / total)
    dy, dx = round((h - 1) / 2 - cy), round((w - 1) / 2 - cx)
    return image if dy == 0 and dx == 0 else shift(image, dy, dx)


#: Where the body starts, in the stored [0, 1] range: −563 HU in the default window, between air
#: and lung (−1000 / −850 HU) below and fat (−100 HU) above.
BODY_LEVEL = 0.15


def body_outline(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The body of a [0, 1] slice (bool): pixels above :data:`BODY_LEVEL`, closed over gaps of a
    few pixels (thin fat in a narrow window), holes (the lungs) filled, the largest piece only
    (not the table), with every labelled pixel of ``mask`` added (a heart is always inside its
    body). Where the body meets a side of the image over more than a quarter of its length,
    the field of view cut it: that stretch of the frame counts as body when filling holes, so
    lungs cut by the frame are filled too. No label map describes the body, so the generator
    is given it: without it, it paints a training person's (issue 24)."""
    image = np.asarray(image)
    above = image > BODY_LEVEL
    r = max(1, image.shape[0] // 64)
    disk = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r
    # closed with a margin, so the frame does not stop the closing
    above = ndimage.binary_closing(np.pad(above, r, mode="edge"), disk)[r:-r, r:-r]
    cut = np.pad(above, 1, constant_values=False)
    # the frame's four sides, each as (where it lies in the padded array, what touches it)
    for border, side in (
        (cut[0, 1:-1], above[0]),
        (cut[-1, 1:-1], above[-1]),
        (cut[1:-1, 0], above[:, 0]),
        (cut[1:-1, -1], above[:, -1]),
    ):
        touch = np.flatnonzero(side)
        if len(touch) and touch[-1] - touch[0] + 1 > 0.25 * len(side):
            border[touch[0] : touch[-1] + 1] = True  # a view into ``cut``
    inside = ndimage.binary_fill_holes(cut)[1:-1, 1:-1]
    labelled, n = ndimage.label(inside)
    if n > 1:
        sizes = np.bincount(labelled.ravel())[1:]
        inside = labelled == 1 + int(np.argmax(sizes))
    if mask is not None:
        inside = inside | (np.asarray(mask) > 0)
    return np.asarray(inside, dtype=bool)


def body_outlines(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """:func:`body_outline` of a stack (N, S, S) (images may carry a trailing channel)."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    out = np.zeros(images.shape, dtype=bool)
    for i, image in enumerate(images):
        out[i] = body_outline(image, None if masks is None else masks[i])
    return out
