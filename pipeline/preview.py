"""PNG previews: windowed slices with per-structure colour overlays, tiled into grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.atomic import atomic_write

#: In label pictures, a pixel of this value is body outside every structure, drawn in
#: :data:`BODY_GREY` (the generator's body channel, issue 24).
BODY_VALUE = 255
BODY_GREY = 70
#: One colour per class index (0 = background, unused), chosen to stay distinct on grey.
PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
    ],
    dtype=np.uint8,
)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats → 8-bit grey."""
    return (np.clip(unit, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def overlay(unit: np.ndarray, mask: np.ndarray, *, alpha: float = 0.35) -> np.ndarray:
    """RGB uint8 of a [0, 1] slice with each structure tinted and outlined in its colour."""
    grey = np.repeat(to_uint8(unit)[..., None], 3, axis=2).astype(np.float32)
    colours = PALETTE[np.asarray(mask) % len(PALETTE)].astype(np.float32)
    inside = mask > 0
    grey[inside] = (1 - alpha) * grey[inside] + alpha * colours[inside]
    edge = (
        inside & ~ndimage.binary_erosion(inside)
        | (ndimage.grey_dilation(mask, size=3) != ndimage.grey_erosion(mask, size=3)) & inside
    )
    grey[edge] = colours[edge]
    return grey.astype(np.uint8)


def grid(tiles: list[np.ndarray], *, columns: int) -> np.ndarray:
    """Tile equally sized RGB (or grey) images row-major into one image."""
    if not tiles:
        raise ValueError("no tiles")
    tiles = [t if t.ndim == 3 else np.repeat(t[..., None], 3, axis=2) for t in tiles]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    out = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return out


def volume_planes(
    rows: list[tuple[str, np.ndarray, np.ndarray]],
    *,
    storage: tuple[float, float],
    units: str,
    tile: int = 128,
) -> np.ndarray:
    """RGB picture: per row (name, image volume (Z, H, W) in [0, 1] feet → head, its labels)
    the axial, coronal and sagittal planes through the heart's centre, every tile in the same
    picture window, the slice axis stretched to the tile and the head up."""
    from PIL import ImageDraw

    from pipeline.preprocess import picture_window

    tiles = []
    for name, vol, lab in rows:
        heart = np.asarray(lab) > 0
        centre = ndimage.center_of_mass(heart) if heart.any() else np.array(vol.shape) / 2
        z, y, x = (min(round(c), n - 1) for c, n in zip(centre, vol.shape, strict=True))
        for i, plane in enumerate((vol[z], vol[::-1, y, :], vol[::-1, :, x])):
            grey = picture_window(plane, storage=storage, units=units)
            img = Image.fromarray(to_uint8(grey)).resize((tile, tile), Image.BILINEAR)
            img = img.convert("RGB")
            if i == 0:
                ImageDraw.Draw(img).text((2, 2), name, fill=(255, 255, 0))
            tiles.append(np.asarray(img))
    return grid(tiles, columns=3)


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write an RGB/grey uint8 array as PNG atomically (temp file in the same folder, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
