"""The candidate batch format: ``candidates/<batch>/`` and its catalog rows, written and read here.

A batch folder holds ``batch.json`` (run, generator hash, units, window, label schema),
``images/NAME.nii.gz`` (HU int16, or display units 0–255 uint8), ``masks/NAME.nii.gz`` (class
indices) and ``previews/``. Generation writes them; the filter, the evaluation, the review app
and the export read them back through :func:`read_candidate` only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.atomic import atomic_write
from pipeline.catalog import CandidateBatch
from pipeline.errors import PipelineError
from pipeline.preprocess import (
    PICTURE_WINDOW,
    display_to_ras,
    picture_window,
    ras_to_display,
    stored_to_unit,
    unit_to_hu,
    view_label,
)
from pipeline.preview import overlay, save_png, to_uint8
from pipeline.workspace import Workspace


def write_candidate(
    folder: Path,
    name: str,
    image: np.ndarray,
    mask: np.ndarray,
    spacing: list[float],
    *,
    units: str,
    window: tuple[float, float],
) -> None:
    """images/NAME.nii.gz (HU int16, or display units 0–255 uint8), masks/NAME.nii.gz (class
    indices), previews/NAME.png and NAME_overlay.png (HU in the cardiac window, as every
    picture). Each file atomically."""
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    hu = units == "HU"
    data = np.rint(unit_to_hu(image, window)).astype(np.int16) if hu else to_uint8(image)
    for sub, array in (("images", data), ("masks", mask.astype(np.uint8))):
        nii = nib.Nifti1Image(display_to_ras(array[None]), affine)
        nii.header.set_xyzt_units("mm")
        nii.header["descrip"] = f"cardiac-synth synthetic {units}".encode()
        (folder / sub).mkdir(parents=True, exist_ok=True)
        atomic_write(folder / sub / f"{name}.nii.gz", lambda tmp, n=nii: nib.save(n, tmp))
    shown = picture_window(image, storage=window, units=units)
    save_png(to_uint8(shown), folder / "previews" / f"{name}.png")
    save_png(overlay(shown, mask), folder / "previews" / f"{name}_overlay.png")


def write_batch_json(
    folder: Path,
    *,
    batch: str,
    run: str,
    generator_sha256: str,
    units: str,
    window: tuple[float, float],
    label_schema: dict[str, int],
    **extra: Any,
) -> None:
    """``batch.json``: what a batch folder holds (run, generator, units, window, schema)."""
    info = {
        "batch": batch,
        "run": run,
        "generator_sha256": generator_sha256,
        "units": units,
        "window": list(window),
        "previews": view_label(units, PICTURE_WINDOW),
        **extra,
        "label_schema": label_schema,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "batch.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2)))


def read_batch_json(folder: Path) -> dict[str, Any]:
    """A batch folder's ``batch.json``."""
    path = folder / "batch.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"unreadable batch.json ({exc})", path=path) from None


@dataclass
class StoredCandidate:
    """One candidate read back from its files (display orientation, one slice)."""

    stored: np.ndarray  # as written: HU int16 or display units uint8, (S, S)
    mask: np.ndarray  # (S, S) uint8 class indices
    unit: np.ndarray  # (S, S) float32 in [0, 1]: what the filter and the metrics judge


def read_candidate(
    folder: Path, name: str, *, units: str, window: tuple[float, float]
) -> StoredCandidate:
    """Read candidate ``name`` of a batch folder back (image, mask and its [0, 1] reading)."""
    path = folder / "images" / f"{name}.nii.gz"
    if not path.exists():
        raise PipelineError("candidate image missing (re-run generate)", path=path)
    stored = ras_to_display(np.asanyarray(nib.load(path).dataobj))[0]
    mask = ras_to_display(np.asanyarray(nib.load(folder / "masks" / f"{name}.nii.gz").dataobj))[0]
    unit = stored_to_unit(stored, units=units, window=window)
    return StoredCandidate(stored, mask.astype(np.uint8), unit)


def batch_row(session: Session, name: str) -> CandidateBatch:
    """The catalog row of batch ``name``; an error naming the command that makes one."""
    batch = session.scalar(select(CandidateBatch).where(CandidateBatch.name == name))
    if batch is None:
        raise PipelineError(f"no candidate batch {name!r} (run 'pipeline generate')")
    return batch


def open_batch(
    session: Session,
    name: str,
    *,
    run_id: int,
    generator_sha256: str,
    kind: str,
    config: dict[str, Any],
    units: str,
    same: Sequence[str] = (),
    folder: Path | None = None,
) -> CandidateBatch:
    """Batch ``name``, created when new. An existing one must be of the same ``kind``, from
    the same generator and agree on the ``same`` config keys (else: choose another name)."""
    batch = session.scalar(select(CandidateBatch).where(CandidateBatch.name == name))
    if batch is None:
        batch = CandidateBatch(
            name=name,
            run_id=run_id,
            generator_sha256=generator_sha256,
            masks=kind,
            config=config,
            units=units,
        )
        session.add(batch)
        session.flush()
        return batch
    if (batch.masks == "honeypot") != (kind == "honeypot"):
        what = "is not a honeypot batch" if kind == "honeypot" else "is a honeypot batch"
        raise PipelineError(f"batch {name!r} exists and {what}", path=folder)
    changed = [k for k in same if batch.config.get(k) != config.get(k)]
    if batch.generator_sha256 != generator_sha256:
        changed.append("generator")
    if changed:
        raise PipelineError(
            f"batch {name!r} exists with other settings ({', '.join(changed)}); "
            "choose another --batch-name",
            path=folder,
        )
    return batch


def case_position(transform: dict[str, Any] | None) -> dict[str, int]:
    """Case, z and depth of a volume batch's slice, read from its provenance (``transform``);
    one line naming what is missing when a row lacks them (a batch from an older version)."""
    try:
        return {k: int(transform[k]) for k in ("case", "z", "depth")}  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise PipelineError(
            "a candidate of a volume batch lacks its case, z or depth; regenerate the batch "
            "with this version (pipeline generate --volumes)"
        ) from None


def group_cases(transforms: Sequence[dict[str, Any] | None]) -> dict[int, list[int]]:
    """A volume batch's rows grouped by case: case → row positions in z order. Every slice's
    position is checked (:func:`case_position`), and a case must hold each z once."""
    cases: dict[int, list[tuple[int, int]]] = {}
    for i, t in enumerate(transforms):
        pos = case_position(t)
        cases.setdefault(pos["case"], []).append((pos["z"], i))
    out: dict[int, list[int]] = {}
    for case in sorted(cases):
        members = sorted(cases[case])
        zs = [z for z, _ in members]
        if len(set(zs)) != len(zs):
            raise PipelineError(f"volume case {case} holds a slice position twice")
        out[case] = [i for _, i in members]
    return out


def batch_images(ws: Workspace, name: str) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """Candidate ids, names, [0, 1] images and masks of a batch, read back from its files."""
    folder = ws.candidates_dir / name
    with Session(ws.engine) as session:
        batch = batch_row(session, name)
        units = batch.units
        rows = [(c.id, c.name) for c in batch.candidates]
    if not rows:
        raise PipelineError(f"batch {name!r} has no candidates", path=folder)
    window = tuple(read_batch_json(folder)["window"])
    read = [read_candidate(folder, cand, units=units, window=window) for _, cand in rows]
    return (
        [r[0] for r in rows],
        [r[1] for r in rows],
        np.stack([c.unit for c in read]),
        np.stack([c.mask for c in read]),
    )
