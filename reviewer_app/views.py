"""What the review app shows: a candidate's pictures (CT windows, mask overlay), its nearest
source slices, its provenance. Reading and drawing only; the rules are in ``pipeline.review``."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
from PIL import Image

from pipeline.candidates import read_batch_json, read_candidate
from pipeline.catalog import Candidate, read_session
from pipeline.decisions import review_policy
from pipeline.preprocess import view_window
from pipeline.preview import PALETTE, overlay, to_uint8
from pipeline.workspace import Workspace, open_workspace

DISPLAY_SIDE = 512


@st.cache_resource
def open_ws(path: str) -> Workspace:
    """The workspace, opened once per app process."""
    return open_workspace(Path(path), create=False)


def catalog_identity(ws: Workspace) -> tuple[int, int] | None:
    """``catalog.db``'s (device, inode) now, or None when it is gone."""
    try:
        st_ = (ws.root / "catalog.db").stat()
    except OSError:
        return None
    return st_.st_dev, st_.st_ino


@st.cache_resource
def _catalog_at_start(path: str) -> tuple[int, int] | None:
    return catalog_identity(open_ws(path))


def catalog_unchanged(ws: Workspace) -> bool:
    """Whether ``catalog.db`` is still the file this app process opened. Deleted or replaced
    under a running app, SQLite would keep writing into the old, unlinked file: decisions
    that nobody will ever see. Every write checks this first."""
    first = _catalog_at_start(str(ws.root))
    return first is not None and catalog_identity(ws) == first


def policy_of(ws: Workspace) -> str:
    """The workspace's review policy (``one`` unless set)."""
    with read_session(ws.engine) as session:
        return review_policy(session)


def draw(
    unit: np.ndarray,
    *,
    window: tuple[float, float],
    units: str,
    preset: str | None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The one way every slice in the app is drawn: a [0, 1] slice stored in ``window`` (HU) is
    taken back to HU and shown in the CT ``preset``, then enlarged (nearest) to about
    ``DISPLAY_SIDE`` px. Candidates and source slices go through here alike, so a physician
    compares them in the same window at the same scale."""
    grey = view_window(unit, storage=window, units=units, preset=preset)
    rgb = overlay(grey, mask) if mask is not None else np.repeat(to_uint8(grey)[..., None], 3, 2)
    zoom = max(1, DISPLAY_SIDE // rgb.shape[0])
    return np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)


@dataclass
class CandidateView:
    """One candidate ready to draw."""

    units: str
    window: tuple[float, float]  # the storage window of the run's sources (HU)
    unit: np.ndarray  # [0, 1], as the filter saw it
    mask: np.ndarray
    class_names: list[str]
    provenance: dict[str, Any]
    filtered: dict[str, Any]  # the privacy filter's stored verdict: ssim, texture, nearest_slice
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # rows, columns, slice (mm)

    def picture(self, preset: str | None, show_mask: bool) -> np.ndarray:
        """RGB uint8, enlarged to about 512 px, in the CT window ``preset``."""
        mask = self.mask if show_mask else None
        return draw(self.unit, window=self.window, units=self.units, preset=preset, mask=mask)

    def source_picture(self, source: np.ndarray, preset: str | None) -> np.ndarray:
        """A source slice ([0, 1] in the same storage window) drawn exactly like this one."""
        return draw(source, window=self.window, units=self.units, preset=preset)


def candidate_view(ws: Workspace, candidate_id: int) -> CandidateView:
    """Read a candidate's image and mask files and its provenance (cached: files are
    immutable once generated)."""
    return _candidate_view(str(ws.root), candidate_id)


@st.cache_data(max_entries=512)
def _candidate_view(root: str, candidate_id: int) -> CandidateView:
    ws = open_ws(root)
    with read_session(ws.engine) as session:
        c = session.get(Candidate, candidate_id)
        batch = c.batch
        folder = ws.candidates_dir / batch.name
        meta = read_batch_json(folder)
        provenance = {
            "batch": batch.name,
            "run": meta["run"],
            "generator_sha256": batch.generator_sha256[:16],
            "mask source": c.mask_source,
            "source slice": c.source_slice_id,
            "mask file": c.mask_file,
            "transform": c.transform,
            "seed": c.seed,
            "created": c.created_at.isoformat(),
        }
        filtered = {
            "ssim": c.privacy_score,
            "texture": c.texture_score,
            "nearest_slice": c.nearest_slice_id,
        }
        name, units = c.name, batch.units
        spacing = tuple(float(v) for v in c.spacing[:3])
    window = (float(meta["window"][0]), float(meta["window"][1]))
    stored = read_candidate(folder, name, units=units, window=window)
    return CandidateView(
        units=units,
        window=window,
        unit=stored.unit,
        mask=stored.mask,
        class_names=list(meta["label_schema"]),
        provenance=provenance,
        filtered=filtered,
        spacing=spacing,
    )


def case_planes(
    views: list[CandidateView], z: int, preset: str | None, show_mask: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A volume case's coronal and sagittal planes through the heart's centre, head up, drawn
    like its axial slices: the same window, the same pixels per millimetre (the slice axis at
    its true length from the slice spacing), the current slice ``z`` marked in yellow."""
    vol = np.stack([v.unit for v in views])
    lab = np.stack([v.mask for v in views])
    first = views[0]
    heart = lab > 0
    centre = np.argwhere(heart).mean(axis=0) if heart.any() else np.array(vol.shape) / 2
    y, x = (min(round(c), n - 1) for c, n in zip(centre[1:], vol.shape[1:], strict=True))
    # rows per slice: the slice spacing over the in-plane spacing, so anatomy keeps its shape
    per_slice = max(first.spacing[2] / max(first.spacing[0], 1e-6), 1e-3)
    rows = np.floor(np.arange(max(1, round(len(views) * per_slice))) / per_slice).astype(int)
    rows = np.clip(rows, 0, len(views) - 1)
    zoom = max(1, DISPLAY_SIDE // first.unit.shape[0])  # the axial picture's scale
    out = []
    for plane, plane_mask in ((vol[:, y, :], lab[:, y, :]), (vol[:, :, x], lab[:, :, x])):
        plane, plane_mask = plane[rows][::-1], plane_mask[rows][::-1]  # head up
        grey = view_window(plane, storage=first.window, units=first.units, preset=preset)
        rgb = overlay(grey, plane_mask) if show_mask else np.repeat(to_uint8(grey)[..., None], 3, 2)
        big = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
        # the display row nearest the current slice (a thinned slice axis skips some): a thin
        # line, so the anatomy under it stays visible
        row = len(rows) - 1 - int(np.argmin(np.abs(rows - z)))
        big[row * zoom : row * zoom + max(1, zoom // 4)] = (255, 215, 0)
        out.append(big)
    return out[0], out[1]


def image_html(rgb: np.ndarray, *, alt: str, width: int | None = None) -> str:
    """An ``<img>`` whose bytes are inline (a PNG data URI). Streamlit's ``st.image`` serves
    pictures from ``/media/<hash>``, a URL anyone can fetch without logging in; inline bytes
    leave no URL to fetch, and vanish with the page."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=1)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    size = f'width="{int(width)}"' if width else 'style="width:100%"'
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" {size}>'


def legend_html(class_names: list[str]) -> str:
    """Coloured labels of the structures, in the overlay's palette."""
    chips = []
    for i, name in enumerate(class_names[1:], start=1):
        r, g, b = (int(v) for v in PALETTE[i % len(PALETTE)])
        chips.append(
            f'<span style="display:inline-block;margin-right:10px">'
            f'<span style="background:rgb({r},{g},{b});width:12px;height:12px;'
            f'display:inline-block;margin-right:4px"></span>'
            f"{html.escape(name.replace('_', ' '))}</span>"
        )
    return "".join(chips)


def index_stamp(ws: Workspace) -> str:
    """The identity of the index on disk (its manifest's inode, size and mtime): the caches
    below are keyed on it, so a re-index reaches the next script run of every session instead
    of the old rule being served for the life of the process."""
    try:
        st_ = (ws.index_dir / "manifest.json").stat()
    except OSError:
        return "missing"
    return f"{st_.st_ino}:{st_.st_size}:{st_.st_mtime_ns}"


@st.cache_resource(max_entries=4)
def _load_index(root: str, stamp: str) -> Any:
    from pipeline.index import load_index

    return load_index(open_ws(root))


def load_index_cached(ws: Workspace) -> Any:
    """The source index, loaded once per app process, workspace and index build."""
    return _load_index(str(ws.root), index_stamp(ws))


@st.cache_data(max_entries=256)
def _neighbours(root: str, stamp: str, candidate_id: int, unit: np.ndarray) -> list[dict[str, Any]]:
    from pipeline.filtering import nearest_sources

    loaded = _load_index(root, stamp)
    return [
        {k: n[k] for k in ("slice_id", "ssim", "texture", "mirrored", "image")}
        for n in nearest_sources(loaded, unit, k=3)
    ]


def neighbours_cached(ws: Workspace, candidate_id: int, unit: np.ndarray) -> list[dict[str, Any]]:
    """The three nearest source slices of a candidate ([0, 1] images with the SSIM and texture
    the filter's scorer gives them; cached per candidate). Draw them with
    ``CandidateView.source_picture``."""
    return _neighbours(str(ws.root), index_stamp(ws), candidate_id, unit)


def source_slice(ws: Workspace, slice_id: int) -> np.ndarray | None:
    """One source slice ([0, 1]) from the index's slice store, or None if it is not there (or
    there is no index)."""
    from pipeline.errors import PipelineError

    try:
        return load_index_cached(ws).store.images([slice_id])[0]
    except (KeyError, IndexError, PipelineError):
        return None
