"""Reading user image files: grey PNGs and NIfTI slices as arrays, with one-line errors.

Ingest reads sources, the filter reads images to score and generate reads user masks through
these functions, so a file is judged the same way at every door.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError
from pipeline.preprocess import ras_to_display

#: The image files the pipeline reads from a folder.
IMAGE_SUFFIXES = (".png", ".nii", ".nii.gz")
#: The most voxels a NIfTI may declare (512³, a whole-body CT at full resolution); gzip lets a
#: 2 MB file declare gigabytes, and PNG's decompression-bomb limit has no NIfTI twin.
MAX_NIFTI_VOXELS = 2**27
#: Plausible voxel spacing in mm (our own 2-D bundles use a 999 mm slice axis).
SPACING_MM = (0.01, 1000.0)


def _stored_pixdim(img: nib.Nifti1Image, path: Path) -> list[float]:
    """The voxel sizes as the file stores them: nibabel's loader silently "fixes" a zero
    pixdim to 1 (with only a log warning), so read the raw header again without its checks."""
    try:
        with nib.openers.ImageOpener(path) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        return [float(z) for z in raw["pixdim"][1:4]]
    except Exception:  # not a single-file NIfTI on disk: the loaded header is all there is
        return [float(z) for z in img.header.get_zooms()]


def check_nifti_header(img: nib.Nifti1Image, path: Path, *, what: str = "NIfTI") -> None:
    """Refuse, before any voxel is read, a file whose header declares more than
    :data:`MAX_NIFTI_VOXELS` voxels or an implausible spacing (zero, negative, not finite, or
    outside :data:`SPACING_MM`; pixdim 0 with no qform/sform used to become 1 mm)."""
    shape = tuple(int(s) for s in img.header.get_data_shape())
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > MAX_NIFTI_VOXELS:
        raise PipelineError(
            f"{what} declares {shape} = {voxels:,} voxels, more than any CT volume we read "
            f"({MAX_NIFTI_VOXELS:,}); refusing to load it",
            path=path,
        )
    zooms = [float(z) for z in _stored_pixdim(img, path)[: min(3, len(shape))]]
    lo, hi = SPACING_MM
    if not all(np.isfinite(z) and lo <= z <= hi for z in zooms):
        shown = ", ".join(f"{z:g}" for z in zooms)
        raise PipelineError(
            f"{what} voxel spacing ({shown}) mm is not plausible (each must be {lo:g}–{hi:g} mm; "
            "fix the header's pixdim or its qform/sform)",
            path=path,
        )


def image_files(folder: Path, *, what: str) -> list[Path]:
    """The PNG and NIfTI files in ``folder``, sorted; an error naming the folder when there is
    none (``what``: images / masks) or it is not a folder."""
    if not folder.is_dir():
        raise PipelineError(f"{what} folder not found", path=folder)
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and p.name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise PipelineError(f"no PNG or NIfTI {what} here", path=folder)
    return files


def skipped_entries(folder: Path) -> str | None:
    """What :func:`image_files` leaves out of ``folder``, counted in words ("2 subfolders, 1
    file of another type"), or None when it reads everything: a reader must not lose files
    silently (subfolders are not searched)."""
    counts = {"subfolder": 0, "file of another type": 0, "special file (link, FIFO, device)": 0}
    for p in folder.iterdir():
        if p.is_symlink() or not (p.is_dir() or p.is_file()):
            counts["special file (link, FIFO, device)"] += 1
        elif p.is_dir():
            counts["subfolder"] += 1
        elif not p.name.lower().endswith(IMAGE_SUFFIXES):
            counts["file of another type"] += 1
    parts = [
        f"{n} {kind}{'s' if n > 1 and kind == 'subfolder' else ''}"
        for kind, n in counts.items()
        if n
    ]
    return ", ".join(parts) if parts else None


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def read_png(path: Path, *, mask: bool) -> np.ndarray:
    """A grey PNG as an array: masks as stored, images as float32 display units 0-255.

    Grey stored as RGB(A) is accepted; real colour, or an unreadable file, is a PipelineError.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except Image.DecompressionBombError as exc:
        raise PipelineError(
            f"PNG is too large to be a CT slice ({short_reason(exc)})", path=path
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"unreadable PNG ({short_reason(exc)})", path=path) from None
    if arr.ndim == 3 and arr.shape[-1] == 2:  # grey + alpha (LA): the alpha is not the image
        arr = arr[..., 0]
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            kind = "mask" if mask else "image"
            raise PipelineError(f"{kind} is colour ({mode}); expected single-channel", path=path)
        arr = rgb[..., 0]
    if mask:
        return arr
    if arr.dtype == np.uint16 or mode.startswith("I;16"):
        return arr.astype(np.float32) * np.float32(255.0 / 65535.0)
    return arr.astype(np.float32)


def read_nifti_slices(path: Path, *, what: str) -> tuple[np.ndarray, list[float]]:
    """Axial slices of a 2-D or 3-D NIfTI in radiological view, (Z, rows, cols) as stored,
    and its first three zooms (a 2-D file's slice is 1 mm thick unless the header says more).
    Trailing singleton dimensions are dropped; ``what`` (image / mask) names the file's role."""
    try:
        img = nib.load(path)
    except Exception as exc:
        raise PipelineError(f"unreadable NIfTI ({short_reason(exc)})", path=path) from None
    check_nifti_header(img, path, what=what)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise PipelineError(f"unreadable NIfTI ({short_reason(exc)})", path=path) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise PipelineError(f"{data.ndim}-D {what}; expected 2-D or 3-D", path=path)
    canon = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(img.affine))
    zooms = ([float(z) for z in img.header.get_zooms()[:3]] + [1.0, 1.0, 1.0])[:3]
    return ras_to_display(canon), zooms
