"""The source slices every stage reads: references by split, the memory-mapped store, loading.

Ingest writes the slice cache (``pipeline.cache``) and the catalog rows; everything downstream
(index, train, generate, evaluate, the review app) reads slices through this module only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.cache import open_cache
from pipeline.catalog import PatientSplit, Slice, Source
from pipeline.preprocess import resize_image, resize_mask
from pipeline.workspace import Workspace

#: The held-out splits: patients the generator never trained on.
HELDOUT = ("val", "test")


@dataclass(frozen=True)
class SliceRef:
    """Where a source slice lives: its cache file and row, and whose it is."""

    slice_id: int
    cache_file: str
    row: int
    patient: str
    split: str
    z: int = -1  # position in the source volume (-1: unknown)


def slice_refs(session: Session, splits: Sequence[str] | None = None) -> list[SliceRef]:
    """Source slices of ``splits`` (every split when None), in id order."""
    stmt = (
        select(
            Slice.id, Source.cache_file, Slice.index, Source.patient, PatientSplit.split, Slice.z
        )
        .join(Source, Slice.source_id == Source.id)
        .join(PatientSplit, PatientSplit.patient == Source.patient)
        .order_by(Slice.id)
    )
    if splits is not None:
        stmt = stmt.where(PatientSplit.split.in_(list(splits)))
    return [SliceRef(*row) for row in session.execute(stmt).all()]


def workspace_refs(ws: Workspace, splits: Sequence[str] | None = None) -> list[SliceRef]:
    """:func:`slice_refs` in a session of its own."""
    with Session(ws.engine) as session:
        return slice_refs(session, splits)


class SliceStore:
    """Reads source slices by id from the memory-mapped cache (files opened once)."""

    def __init__(self, cache_dir: Path, refs: Sequence[SliceRef]) -> None:
        self.cache_dir = cache_dir
        self.refs = {r.slice_id: r for r in refs}
        self._open: dict[str, np.ndarray] = {}

    def images(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), S, S) float32 images."""
        return self._field("image", ids)

    def masks(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), S, S) uint8 class-index masks."""
        return self._field("mask", ids)

    def _field(self, name: str, ids: Sequence[int]) -> np.ndarray:
        out = []
        for i in ids:
            ref = self.refs[int(i)]
            arr = self._open.get(ref.cache_file)
            if arr is None:
                arr = self._open[ref.cache_file] = open_cache(self.cache_dir / ref.cache_file)
            out.append(np.asarray(arr[name][ref.row]))
        return np.stack(out)


def volume_rows(refs: Sequence[SliceRef], planar: set[str] | None = None) -> list[list[int]]:
    """Positions in ``refs`` grouped into volumes: one group per cache file, in slice order
    (ingest caches a volume's kept slices in order, rows follow z); each slice of a ``planar``
    cache file (PNG slices, which need not be neighbours) a group of its own."""
    planar = planar or set()
    groups: dict[str, list[int]] = {}
    alone: list[list[int]] = []
    for i, r in enumerate(refs):
        if r.cache_file in planar:
            alone.append([i])
        else:
            groups.setdefault(r.cache_file, []).append(i)
    ordered = [sorted(g, key=lambda i: refs[i].row) for g in groups.values()]
    return alone + ordered


def neighbour_rows(refs: Sequence[SliceRef], k: int, planar: set[str] | None = None) -> np.ndarray:
    """(N, 2k) positions in ``refs`` of each slice's neighbours z−k … z−1, z+1 … z+k in its own
    volume; −1 where that slice was not kept (it had too little foreground: an empty map is
    what it nearly is). A slice of a ``planar`` source (PNG slices, which need not be
    neighbours) stands for its own neighbours: a 2-D map's best guess at the next slice is
    itself, and generating from a folder of 2-D masks does the same."""
    planar = planar or set()
    where = {(r.cache_file, r.z): i for i, r in enumerate(refs)}
    offsets = [d for d in range(-k, k + 1) if d]
    out = np.full((len(refs), len(offsets)), -1, np.int64)
    for i, r in enumerate(refs):
        if r.cache_file in planar:
            out[i] = i
            continue
        for j, d in enumerate(offsets):
            out[i, j] = where.get((r.cache_file, r.z + d), -1)
    return out


def gather_neighbours(masks: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(N, 2k, S, S) label maps at ``rows`` (from :func:`neighbour_rows`), empty where −1."""
    out = masks[np.maximum(rows, 0)]
    out[rows < 0] = 0
    return out


def volume_neighbours(labels: np.ndarray, k: int) -> np.ndarray:
    """(Z, 2k, S, S): each slice's neighbours z−k … z−1, z+1 … z+k in a (Z, S, S) label
    volume, empty beyond its ends (as a training slice's unkept neighbours are)."""
    z = len(labels)
    padded = np.concatenate([np.zeros((k, *labels.shape[1:]), labels.dtype), labels])
    padded = np.concatenate([padded, np.zeros((k, *labels.shape[1:]), labels.dtype)])
    offsets = [d for d in range(-k, k + 1) if d]
    return np.stack([padded[k + d : k + d + z] for d in offsets], axis=1)


def load_slices(
    ws: Workspace, refs: Sequence[SliceRef], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cached slices by reference: images (N, size, size) float32, masks (N, size, size) uint8,
    resized (images anti-aliased, masks nearest) when the cache holds another size."""
    if not refs:
        return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.uint8)
    store = SliceStore(ws.cache_dir, refs)
    ids = [r.slice_id for r in refs]
    images, masks = store.images(ids), store.masks(ids)
    if images.shape[1] != size:
        images = np.stack([resize_image(im, size) for im in images])
        masks = np.stack([resize_mask(m, size) for m in masks])
    return images.astype(np.float32), masks.astype(np.uint8)


def load_split(ws: Workspace, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All slices of one split: images (N, size, size, 1) float32, masks (N, size, size) uint8."""
    images, masks = load_slices(ws, workspace_refs(ws, [split]), size)
    return images[..., None], masks


def planar_files(ws: Workspace) -> set[str]:
    """Cache files of 2-D sources (PNG slices): their slices are not a volume's neighbours."""
    with Session(ws.engine) as session:
        return set(session.scalars(select(Source.cache_file).where(Source.format == "png")))


def split_neighbours(ws: Workspace, split: str, k: int) -> np.ndarray:
    """:func:`neighbour_rows` of one split, row for row with :func:`load_split`."""
    return neighbour_rows(workspace_refs(ws, [split]), k, planar_files(ws))


def slice_spacings(ws: Workspace) -> dict[str, list[float]]:
    """cache file → in-plane and slice spacing after resizing (1 mm where unknown)."""
    with Session(ws.engine) as session:
        rows = session.execute(select(Source.cache_file, Source.spacing)).all()
    return {f: [float(v) for v in (sp or [1.0, 1.0, 1.0])] for f, sp in rows}
