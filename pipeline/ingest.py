"""`pipeline ingest`: CT volumes (or PNG slices) with label maps into the slice cache and catalog.

Flow: discover image/label pairs → check headers → skip content already ingested → preprocess one
volume at a time into temporary cache files → assign patient splits → one short write
transaction that renames the cache files into place and records every row. Any failure removes
the temporary files and records nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline import __version__
from pipeline.cache import close_cache, create_cache
from pipeline.catalog import (
    Ingest,
    PatientSplit,
    Slice,
    Source,
    get_meta,
    set_meta,
    write_session,
)
from pipeline.errors import PipelineError
from pipeline.imageio import check_nifti_header, read_png, short_reason
from pipeline.labels import LabelSchema
from pipeline.preprocess import (
    DEFAULT_WINDOW,
    MIN_FOREGROUND,
    foreground_fraction,
    resize_image,
    resize_mask,
    resized_spacing,
    window_to_unit,
)
from pipeline.progress import Progress
from pipeline.splits import SPLITS, assign_splits, check_required
from pipeline.workspace import Workspace

FORMATS = ("auto", "mmwhs", "nnunet", "png")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class IngestConfig:
    """Options of one ingest (stored with it in the catalog)."""

    format: str = "auto"
    size: int = 256
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    min_foreground: float = MIN_FOREGROUND
    window: tuple[float, float] = DEFAULT_WINDOW
    labels_file: str | None = None
    ignore_unknown_labels: bool = False


@dataclass
class VolumeSpec:
    """One source volume found on disk: a NIfTI pair, or one patient's PNG slices."""

    patient: str
    name: str
    format: str
    image: Path
    label: Path
    png_slices: list[tuple[int, Path, Path]] = field(default_factory=list)

    def files(self) -> list[Path]:
        """Every file this volume is read from."""
        if self.png_slices:
            return [p for _, img, msk in self.png_slices for p in (img, msk)]
        return [self.image, self.label]


@dataclass
class PreparedVolume:
    """A preprocessed volume waiting to be recorded."""

    spec: VolumeSpec
    sha: ContentHash
    units: str
    window: tuple[float, float]
    original_shape: list[int]
    original_spacing: list[float] | None
    spacing: list[float] | None
    z: list[int]
    foreground: list[float]
    classes: list[list[int]]
    tmp_cache: Path | None = None


# --------------------------------------------------------------------------- discovery


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def detect_format(src: Path) -> str:
    """Guess the layout of ``src``: nnU-Net raw, PNG pairs, or MM-WHS-style NIfTI pairs."""
    if (src / "imagesTr").is_dir():
        return "nnunet"
    if (src / "images").is_dir() and (src / "masks").is_dir():
        return "png"
    for p in src.iterdir():
        stem = _strip_nifti(p.name)
        if stem and (stem.endswith("_image") or stem.endswith("_label")):
            return "mmwhs"
    raise PipelineError(
        "cannot tell the format: expected *_image.nii.gz + *_label.nii.gz files, an nnU-Net "
        "imagesTr/ + labelsTr/ folder, or images/ + masks/ PNG folders",
        path=src,
    )


def _pair_by_stem(images: dict[str, Path], labels: dict[str, Path], what: str) -> list[str]:
    for stem, path in sorted(images.items()):
        if stem not in labels:
            raise PipelineError(f"{what} has no matching label file", path=path)
    for stem, path in sorted(labels.items()):
        if stem not in images:
            raise PipelineError(f"label has no matching {what} file", path=path)
    return sorted(images)


def _collect(files: Iterable[Path], pattern: re.Pattern[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(files):
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        key = m.group(1)
        if key in found:
            raise PipelineError(f"duplicate patient id {key!r} (also {found[key].name})", path=p)
        found[key] = p
    return found


def discover(src: Path, fmt: str) -> list[VolumeSpec]:
    """List the volumes under ``src`` in format ``fmt`` (not ``auto``), checking the pairing."""
    if fmt == "mmwhs":
        files = [p for p in src.iterdir() if p.is_file()]
        images = _collect(files, re.compile(r"(.+)_image\.nii(?:\.gz)?"))
        labels = _collect(files, re.compile(r"(.+)_label\.nii(?:\.gz)?"))
        keys = _pair_by_stem(images, labels, "image")
        return [VolumeSpec(k, k, "mmwhs", images[k], labels[k]) for k in keys]
    if fmt == "nnunet":
        img_dir, lab_dir = src / "imagesTr", src / "labelsTr"
        if not lab_dir.is_dir():
            raise PipelineError("nnU-Net dataset has imagesTr/ but no labelsTr/", path=src)
        img_files = [p for p in img_dir.iterdir() if p.is_file()]
        extra = sorted(
            p for p in img_files if re.fullmatch(r".+_(?!0000)\d{4}\.nii(\.gz)?", p.name)
        )
        if extra:
            raise PipelineError("multi-channel cases are not supported (CT has one)", path=extra[0])
        images = _collect(img_files, re.compile(r"(.+)_0000\.nii(?:\.gz)?"))
        labels = _collect(lab_dir.iterdir(), re.compile(r"(.+?)\.nii(?:\.gz)?"))
        keys = _pair_by_stem(images, labels, "image")
        return [VolumeSpec(k, k, "nnunet", images[k], labels[k]) for k in keys]
    if fmt == "png":
        img_dir, mask_dir = src / "images", src / "masks"
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise PipelineError("PNG dataset needs images/ and masks/ folders", path=d)
        pattern = re.compile(r"(.+)_(\d+)\.png", re.IGNORECASE)

        def scan(folder: Path) -> dict[tuple[str, int], Path]:
            out: dict[tuple[str, int], Path] = {}
            for p in sorted(folder.iterdir()):
                if p.name.startswith(".") or not p.is_file():
                    continue
                m = pattern.fullmatch(p.name)
                if not m:
                    raise PipelineError("expected a name <patient>_<slice>.png", path=p)
                key = (m.group(1), int(m.group(2)))
                if key in out:
                    raise PipelineError(f"duplicate slice (also {out[key].name})", path=p)
                out[key] = p
            return out

        images, masks = scan(img_dir), scan(mask_dir)
        for key, p in images.items():
            if key not in masks:
                raise PipelineError("image has no matching mask in masks/", path=p)
        for key, p in masks.items():
            if key not in images:
                raise PipelineError("mask has no matching image in images/", path=p)
        by_patient: dict[str, list[tuple[int, Path, Path]]] = defaultdict(list)
        for (patient, number), p in sorted(images.items()):
            by_patient[patient].append((number, p, masks[(patient, number)]))
        return [
            VolumeSpec(patient, patient, "png", img_dir, mask_dir, png_slices=slices)
            for patient, slices in sorted(by_patient.items())
        ]
    raise PipelineError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def resolve_schema(src: Path, fmt: str, labels_file: str | None) -> tuple[LabelSchema, str]:
    """The label schema for this source and where it came from."""
    if labels_file:
        return LabelSchema.from_json_file(Path(labels_file)), str(labels_file)
    if fmt == "nnunet" and (src / "dataset.json").is_file():
        return LabelSchema.from_json_file(src / "dataset.json"), str(src / "dataset.json")
    if (src / "labels.json").is_file():
        return LabelSchema.from_json_file(src / "labels.json"), str(src / "labels.json")
    return LabelSchema.mmwhs(), "MM-WHS default"


# --------------------------------------------------------------------------- reading


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise PipelineError(f"cannot read NIfTI header ({short_reason(exc)})", path=path) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise PipelineError("not a NIfTI image", path=path)
    check_nifti_header(img, path)
    shape = img.shape
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        img = img.slicer[(..., *([0] * (len(shape) - 3)))]
        shape = img.shape
    if len(shape) != 3:
        raise PipelineError(
            f"{len(shape)}-D volume {tuple(shape)}; expected a 3-D volume", path=path
        )
    return img


def check_pair_headers(spec: VolumeSpec) -> None:
    """Cheap checks before any data is read: 3-D, same grid, same affine."""
    if spec.png_slices:
        return
    img, lab = _load_nifti(spec.image), _load_nifti(spec.label)
    if img.shape != lab.shape:
        raise PipelineError(
            f"label shape {tuple(lab.shape)} differs from image shape {tuple(img.shape)}",
            path=spec.label,
        )
    if not np.allclose(img.affine, lab.affine, atol=1e-3, rtol=1e-4):
        raise PipelineError(
            "label affine differs from the image's (not on the same grid)", path=spec.label
        )


@dataclass(frozen=True)
class ContentHash:
    """SHA-256 of a volume's image bytes, and of image + label bytes (its identity)."""

    image: str
    content: str


def content_hash(spec: VolumeSpec) -> ContentHash:
    """Hash the bytes (not the names) of a volume's files, so a renamed copy is recognised."""
    pairs = (
        [(img, msk) for _, img, msk in spec.png_slices]
        if spec.png_slices
        else [(spec.image, spec.label)]
    )
    image_h, label_h = hashlib.sha256(), hashlib.sha256()
    for image, label in pairs:
        for path, h in ((image, image_h), (label, label_h)):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            h.update(b"\0")
    image_hex = image_h.hexdigest()
    return ContentHash(
        image_hex, hashlib.sha256(f"{image_hex}:{label_h.hexdigest()}".encode()).hexdigest()
    )


def _read_data(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:
        raise PipelineError(
            f"corrupt or truncated image data ({short_reason(exc)})", path=path
        ) from None


@dataclass
class LoadedVolume:
    """One source's raw slices in display orientation, before windowing and resizing."""

    spec: VolumeSpec
    units: str
    window: tuple[float, float]
    images: list[np.ndarray]
    labels: list[np.ndarray]
    numbers: list[int]  # z index (NIfTI) or slice number (PNG) of each slice
    label_files: list[Path]  # where each label slice came from, for error messages
    in_plane: tuple[float, float]  # (row, col) pixel spacing; (1, 1) when unknown
    original_shape: list[int]
    original_spacing: list[float] | None
    z_spacing: float | None


def load_nifti(spec: VolumeSpec, cfg: IngestConfig) -> LoadedVolume:
    """Read a NIfTI pair and reorient it to RAS+ (views, no copies of the voxel data)."""
    img, lab = _load_nifti(spec.image), _load_nifti(spec.label)
    ornt = io_orientation(img.affine)
    affine = img.affine @ inv_ornt_aff(ornt, img.shape)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    hu = apply_orientation(_read_data(img, spec.image), ornt)
    labels = apply_orientation(_read_data(lab, spec.label), ornt)
    if not np.issubdtype(hu.dtype, np.number) or np.issubdtype(hu.dtype, np.complexfloating):
        raise PipelineError(f"image data type {hu.dtype} is not real-valued", path=spec.image)
    if np.issubdtype(hu.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(hu)))
        if bad:  # NaN has no HU, and ±Inf is a broken scan, not a very dense or empty voxel
            raise PipelineError(
                f"{bad} voxels are NaN or infinite; fix or mask them before ingesting",
                path=spec.image,
            )
    n = hu.shape[2]
    # Display slice z is volume[::-1, ::-1, z].T: rows anterior→posterior, cols right→left.
    return LoadedVolume(
        spec=spec,
        units="HU",
        window=cfg.window,
        images=[hu[::-1, ::-1, z].T for z in range(n)],
        labels=[labels[::-1, ::-1, z].T for z in range(n)],
        numbers=list(range(n)),
        label_files=[spec.label] * n,
        in_plane=(float(zooms[1]), float(zooms[0])),
        original_shape=[int(s) for s in hu.shape],
        original_spacing=[round(float(s), 6) for s in zooms],
        z_spacing=float(zooms[2]),
    )


def load_png(spec: VolumeSpec) -> LoadedVolume:
    """Read one patient's PNG slices (display units 0-255, never HU) and their index masks."""
    images, labels = [], []
    for _, img_path, mask_path in spec.png_slices:
        image, mask = read_png(img_path, mask=False), read_png(mask_path, mask=True)
        if image.shape != mask.shape:
            raise PipelineError(
                f"mask size {mask.shape[::-1]} differs from image size {image.shape[::-1]}",
                path=mask_path,
            )
        images.append(image)
        labels.append(mask)
    return LoadedVolume(
        spec=spec,
        units="display",
        window=(0.0, 255.0),
        images=images,
        labels=labels,
        numbers=[number for number, _, _ in spec.png_slices],
        label_files=[mask_path for _, _, mask_path in spec.png_slices],
        in_plane=(1.0, 1.0),
        original_shape=[int(images[0].shape[0]), int(images[0].shape[1]), len(images)],
        original_spacing=None,
        z_spacing=None,
    )


def load_volume(spec: VolumeSpec, cfg: IngestConfig) -> LoadedVolume:
    """Read one source volume, whatever its format."""
    return load_png(spec) if spec.format == "png" else load_nifti(spec, cfg)


def prepare(
    vol: LoadedVolume, schema: LabelSchema, cfg: IngestConfig, sha: ContentHash, out: Path
) -> PreparedVolume:
    """Map labels to classes, drop near-empty slices, window and resize into cache file ``out``.

    Two passes: masks first (cheap) to know which slices stay, then each kept image is written
    straight into the memory-mapped cache file, so no second copy of the volume is held.
    """
    masks, kept, fg, present = [], [], [], []
    for k, raw in enumerate(vol.labels):
        try:
            classes = schema.to_classes(raw, ignore_unknown=cfg.ignore_unknown_labels)
        except ValueError as exc:
            where = f" (slice z={vol.numbers[k]})" if vol.units == "HU" else ""
            advice = " (pass --labels or --ignore-unknown-labels)"
            raise PipelineError(f"{exc}{where}{advice}", path=vol.label_files[k]) from None
        mask = resize_mask(classes, cfg.size, spacing=vol.in_plane)
        frac = foreground_fraction(mask)
        if frac < cfg.min_foreground or (cfg.min_foreground > 0 and frac == 0):
            continue
        masks.append(mask)
        kept.append(k)
        fg.append(frac)
        present.append(np.flatnonzero(np.bincount(mask.ravel())).tolist())
    written: Path | None = None
    if kept:
        cache = create_cache(out, len(kept), cfg.size)
        for i, k in enumerate(kept):
            unit = window_to_unit(vol.images[k], vol.window)
            cache["image"][i] = resize_image(unit, cfg.size, spacing=vol.in_plane, fill=0.0)
            cache["mask"][i] = masks[i]
        close_cache(cache, out)
        written = out
    shape2d = (vol.original_shape[1], vol.original_shape[0])
    if vol.units == "HU":
        px = round(resized_spacing(shape2d, cfg.size, vol.in_plane), 6)
        spacing = [px, px, round(float(vol.z_spacing or 0.0), 6)]
    else:
        spacing = None
    return PreparedVolume(
        spec=vol.spec,
        sha=sha,
        units=vol.units,
        window=vol.window,
        original_shape=vol.original_shape,
        original_spacing=vol.original_spacing,
        spacing=spacing,
        z=[vol.numbers[k] for k in kept],
        foreground=fg,
        classes=present,
        tmp_cache=written,
    )


# --------------------------------------------------------------------------- the command


@dataclass
class IngestReport:
    """What an ingest did, for humans and ``--json``."""

    src: str
    format: str
    label_schema: dict[str, int]
    label_schema_source: str
    added_volumes: list[str]
    skipped_volumes: list[str]
    empty_volumes: list[str]
    added_slices: int
    splits: dict[str, str]
    status: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def ingest(
    ws: Workspace, src: Path, cfg: IngestConfig, *, progress: Progress = iter
) -> IngestReport:
    """Ingest the volumes under ``src`` into ``ws`` atomically; see the module docstring."""
    src = Path(src)
    if not src.exists():
        raise PipelineError("source folder does not exist", path=src)
    if not src.is_dir():
        raise PipelineError("source is not a folder", path=src)
    if not any(src.iterdir()):
        raise PipelineError("source folder is empty", path=src)
    if cfg.size < 8:
        raise PipelineError(f"--size {cfg.size} is too small (at least 8)")
    if not 0.0 <= cfg.min_foreground < 1.0:
        raise PipelineError(f"--min-foreground {cfg.min_foreground} must be in [0, 1)")
    fmt = detect_format(src) if cfg.format == "auto" else cfg.format
    specs = discover(src, fmt)
    if not specs:
        raise PipelineError(f"no {fmt} volumes found", path=src)
    schema, schema_from = resolve_schema(src, fmt, cfg.labels_file)
    _check_workspace_compatible(ws, schema, cfg)
    for spec in specs:
        check_pair_headers(spec)

    hashes = {spec.name: content_hash(spec) for spec in specs}
    with Session(ws.engine) as session:
        known = dict(session.execute(select(Source.content_sha256, Source.patient)).all())
        known_images = dict(session.execute(select(Source.image_sha256, Source.patient)).all())
        existing_splits = dict(
            session.execute(select(PatientSplit.patient, PatientSplit.split)).all()
        )
    new_specs = [s for s in specs if hashes[s.name].content not in known]
    skipped = [s.name for s in specs if hashes[s.name].content in known]
    _check_duplicate_images(new_specs, hashes, known_images)
    clash = sorted(s.patient for s in new_specs if s.patient in existing_splits)
    if clash:
        raise PipelineError(
            f"patient id {clash[0]!r} is already in the catalog with different data; "
            "rename the source files so patient ids are unique",
            path=next(s.files()[0] for s in new_specs if s.patient == clash[0]),
        )
    split_text = ",".join(f"{f:g}" for f in cfg.split)
    if new_specs:
        _check_split_feasible(existing_splits, [s.patient for s in new_specs], cfg, split_text)

    prepared: list[PreparedVolume] = []
    assignment: dict[str, str] = {}
    with ws.lock("ingest"):
        _sweep_tmp(ws)
        try:
            # Read ahead: the next volume decompresses in a thread (zlib releases the GIL)
            # while this one is resampled, so ingest costs little more than reading.
            with ThreadPoolExecutor(max_workers=1) as reader:
                ahead = [reader.submit(load_volume, s, cfg) for s in new_specs[:1]]
                for i, spec in enumerate(progress(new_specs)):
                    loaded = ahead.pop().result()
                    ahead = [reader.submit(load_volume, s, cfg) for s in new_specs[i + 1 : i + 2]]
                    tmp = ws.cache_dir / f".tmp-{uuid.uuid4().hex}.npy"
                    try:
                        prepared.append(prepare(loaded, schema, cfg, hashes[spec.name], tmp))
                    except BaseException:
                        tmp.unlink(missing_ok=True)
                        raise
                    del loaded
            kept = [v for v in prepared if v.z]
            assignment = assign_splits(
                existing_splits, [v.spec.patient for v in kept], cfg.split, cfg.seed
            )
            if kept:
                counts = _split_counts(existing_splits, assignment)
                check_required(counts, cfg.split, split_text)
                _record(ws, src, fmt, cfg, schema, kept, assignment)
        finally:
            for vol in prepared:
                if vol.tmp_cache is not None:
                    vol.tmp_cache.unlink(missing_ok=True)

    return IngestReport(
        src=str(src),
        format=fmt,
        label_schema=schema.to_dict(),
        label_schema_source=schema_from,
        added_volumes=[v.spec.name for v in prepared if v.z],
        skipped_volumes=skipped,
        empty_volumes=[v.spec.name for v in prepared if not v.z],
        added_slices=sum(len(v.z) for v in prepared),
        splits=dict(sorted(assignment.items())),
        status=workspace_status(ws),
    )


def _check_duplicate_images(
    specs: list[VolumeSpec], hashes: dict[str, ContentHash], known_images: dict[str, str]
) -> None:
    # The same scan under two names (or with other labels) could land in two splits: refuse.
    seen: dict[str, VolumeSpec] = {}
    for spec in specs:
        h = hashes[spec.name].image
        if h in known_images:
            raise PipelineError(
                f"same image data as patient {known_images[h]!r} already in the catalog "
                "(with other labels); a scan may be ingested once",
                path=spec.files()[0],
            )
        if h in seen:
            raise PipelineError(
                f"same image data as {seen[h].name!r}; a scan may be ingested once",
                path=spec.files()[0],
            )
        seen[h] = spec


def _split_counts(existing: dict[str, str], new: dict[str, str]) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for s in [*existing.values(), *new.values()]:
        counts[s] += 1
    return counts


def _check_split_feasible(
    existing: dict[str, str], patients: list[str], cfg: IngestConfig, text: str
) -> None:
    if len(set(patients)) != len(patients):
        dup = next(p for p in patients if patients.count(p) > 1)
        raise PipelineError(f"duplicate patient id {dup!r} in one ingest")
    assignment = assign_splits(existing, patients, cfg.split, cfg.seed)
    check_required(_split_counts(existing, assignment), cfg.split, text)


def _check_workspace_compatible(ws: Workspace, schema: LabelSchema, cfg: IngestConfig) -> None:
    with Session(ws.engine) as session:
        schema_text = get_meta(session, "label_schema")
        size_text = get_meta(session, "slice_size")
    if schema_text is not None:
        current = LabelSchema.from_mapping(json.loads(schema_text))
        if current.names != schema.names:
            raise PipelineError(
                f"label schema {list(schema.names)} differs from this workspace's "
                f"{list(current.names)}; use a new workspace or pass --labels",
                path=ws.root,
            )
    if size_text is not None and int(size_text) != cfg.size:
        raise PipelineError(
            f"--size {cfg.size} differs from this workspace's slice size {size_text}", path=ws.root
        )


def _sweep_tmp(ws: Workspace) -> None:
    # Leftovers of a crashed ingest; safe to delete because we hold the ingest lock.
    for p in ws.cache_dir.glob(".tmp-*.npy"):
        p.unlink(missing_ok=True)


def _record(
    ws: Workspace,
    src: Path,
    fmt: str,
    cfg: IngestConfig,
    schema: LabelSchema,
    volumes: list[PreparedVolume],
    assignment: dict[str, str],
) -> None:
    renamed: list[Path] = []
    try:
        with write_session(ws.engine) as session:
            if get_meta(session, "label_schema") is None:
                set_meta(session, "label_schema", schema.to_json())
                set_meta(session, "slice_size", str(cfg.size))
            config = {**asdict(cfg), "format": fmt, "label_schema": schema.to_dict()}
            run = Ingest(
                src=str(src.resolve()), format=fmt, config=config, tool_version=__version__
            )
            session.add(run)
            session.flush()
            for patient, split in sorted(assignment.items()):
                session.add(
                    PatientSplit(patient=patient, split=split, seed=cfg.seed, ingest_id=run.id)
                )
            session.flush()
            for vol in volumes:
                final = ws.cache_dir / f"{vol.sha.content[:24]}.npy"
                source = Source(
                    ingest_id=run.id,
                    patient=vol.spec.patient,
                    name=vol.spec.name,
                    image_path=str(vol.spec.image.resolve()),
                    label_path=str(vol.spec.label.resolve()),
                    content_sha256=vol.sha.content,
                    image_sha256=vol.sha.image,
                    format=vol.spec.format,
                    units=vol.units,
                    window_lo=vol.window[0],
                    window_hi=vol.window[1],
                    original_shape=vol.original_shape,
                    original_spacing=vol.original_spacing,
                    spacing=vol.spacing,
                    size=cfg.size,
                    cache_file=final.name,
                    n_slices=len(vol.z),
                )
                session.add(source)
                session.flush()
                session.add_all(
                    Slice(source_id=source.id, index=i, z=z, foreground=round(f, 6), classes=c)
                    for i, (z, f, c) in enumerate(
                        zip(vol.z, vol.foreground, vol.classes, strict=True)
                    )
                )
                assert vol.tmp_cache is not None
                vol.tmp_cache.replace(final)
                renamed.append(final)
                vol.tmp_cache = None
    except BaseException:
        for path in renamed:
            path.unlink(missing_ok=True)
        raise


def workspace_status(ws: Workspace) -> dict[str, Any]:
    """Counts per split, label schema, units and sizes: what `pipeline status` prints."""
    with Session(ws.engine) as session:
        schema_text = get_meta(session, "label_schema")
        size_text = get_meta(session, "slice_size")
        per_split = dict.fromkeys(SPLITS, None)
        for name in SPLITS:
            patients = session.scalar(
                select(func.count()).select_from(PatientSplit).where(PatientSplit.split == name)
            )
            volumes = session.scalar(
                select(func.count(Source.id)).join(PatientSplit).where(PatientSplit.split == name)
            )
            slices = session.scalar(
                select(func.count(Slice.id))
                .join(Source)
                .join(PatientSplit)
                .where(PatientSplit.split == name)
            )
            per_split[name] = {"patients": patients, "volumes": volumes, "slices": slices}
        units = sorted({u for (u,) in session.execute(select(Source.units).distinct())})
        n_sources = session.scalar(select(func.count(Source.id)))
        n_slices = session.scalar(select(func.count(Slice.id)))
    return {
        "workspace": str(ws.root),
        "volumes": n_sources,
        "slices": n_slices,
        "splits": per_split,
        "label_schema": json.loads(schema_text) if schema_text else None,
        "slice_size": int(size_text) if size_text else None,
        "units": units,
    }
