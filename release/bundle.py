"""`pipeline export`: the release bundle — only what may leave the hospital, reproducibly.

A candidate is released only if it passed the privacy filter (filtered and not flagged), its
batch passed the quality gates (or an admin overrode a failed gate with a written reason), it is
not a honeypot, and the review policy says accepted. There is no override for the privacy
filter. The bundle is an nnU-Net v2 raw dataset plus previews, manifest, datasheet and checksums,
built in a temporary folder beside the target and renamed at the end; with the same catalog
state and ``SOURCE_DATE_EPOCH`` every byte is the same.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import unicodedata
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline import __version__
from pipeline.atomic import exclusive_lock
from pipeline.candidates import case_position, read_batch_json, read_candidate
from pipeline.catalog import (
    Candidate,
    CandidateBatch,
    PatientSplit,
    Release,
    Reviewer,
    Run,
    write_session,
)
from pipeline.decisions import candidate_states, effective_decisions
from pipeline.errors import PipelineError
from pipeline.figures import privacy_figure
from pipeline.preprocess import display_to_ras, picture_window
from pipeline.preview import overlay
from pipeline.privacy import Calibration
from pipeline.progress import Progress
from pipeline.render import describe_privacy, gate_table, metrics_lines
from pipeline.validate import path_name
from pipeline.workspace import Workspace
from release.ledger import LedgerCase, choose_dataset_id, record_release

TMP_PREFIX = ".export-tmp-"
#: Mask sources whose label maps are real patients' anatomy: deformed training slices, and
#: held-out patients' own label maps. A label map tells whoever holds that patient's scan that
#: the patient was used, so releasing them needs an admin's written reason.
DERIVED_ANATOMY = {
    "augmented": "deformed training slices",
    "heldout": "held-out patients' own label maps",
}
#: Who a synthetic batch's shape model was fitted on without ``--anatomy-from``.
TRAINING_PEOPLE = {"who": "the training patients"}
#: Out-of-plane spacing of a single-slice case: nnU-Net v2's convention for 2-D data, so its
#: planner treats the slice axis as the one not to convolve over (the real slice spacing is
#: in the manifest).
SLICE_SPACING_2D = 999.0


def is_releasable(
    *, flagged: bool | None, honeypot: bool, state: str, gates_passed: bool | None, override: bool
) -> bool:
    """The release rule. ``flagged`` None means never filtered: not releasable either."""
    if honeypot or flagged is None or flagged:
        return False
    if state != "accepted":
        return False
    return bool(gates_passed) or override


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to label it."""

    out: Path
    batches: tuple[str, ...] = ()  # empty: every batch
    name: str = "CardiacSynth"
    dataset_id: int | None = None  # None: from the release ledger (release/ledger.py)
    license: str = "CC-BY-4.0"
    accept_failed_gate: str | None = None  # an admin's written reason
    # an admin's written reason to release label maps derived from real patients (issue 24)
    derived_anatomy: str | None = None
    policy: str = "one"
    source_date_epoch: int | None = None
    by: str = ""  # who exported (the OS account), for the release ledger


@dataclass
class Released:
    """One candidate going into the bundle."""

    candidate_id: int
    batch: str
    name: str
    units: str
    spacing: list[float]
    privacy_score: float
    texture_score: float | None
    privacy_margin: float
    reviewers: list[str]
    # a slice of a volume batch (``generate --volumes``): its case, z and the case's depth
    case: int | None = None
    z: int | None = None
    depth: int | None = None


def select_releasable(
    session: Session, cfg: ExportConfig
) -> tuple[list[Released], dict[str, Any], list[str]]:
    """The releasable candidates, the batches they come from, and why others were left out."""
    batches = {b.name: b for b in session.scalars(select(CandidateBatch))}
    for name in cfg.batches:
        if name not in batches:
            raise PipelineError(f"no candidate batch {name!r}")
    chosen = [b for n, b in sorted(batches.items()) if not cfg.batches or n in cfg.batches]
    failed = [b.name for b in chosen if b.masks != "honeypot" and b.gates_passed is not True]
    notes: list[str] = []
    if failed and cfg.accept_failed_gate is None:
        reasons = []
        for name in failed:
            b = batches[name]
            if b.gates is None:
                reasons.append(f"{name}: gates never ran (pipeline filter --batch {name})")
            else:
                bad = [g["gate"] for g in b.gates["results"] if not g["passed"]]
                reasons.append(f"{name}: failed {', '.join(bad)}")
        raise PipelineError(
            "quality gates did not pass — " + "; ".join(reasons) + " (an admin may pass "
            "--accept-failed-gate REASON; the reason is written into the manifest)"
        )
    states = {s.id: s for s in candidate_states(session, policy=cfg.policy)}
    current = effective_decisions(session)
    names = dict(session.execute(select(CandidateBatch.id, CandidateBatch.name)).all())
    released: list[Released] = []
    skipped = {"flagged": 0, "not accepted": 0, "honeypot": 0, "unfiltered": 0}
    withheld: set[tuple[str, int]] = set()  # volume cases with a slice that may not leave
    for b in chosen:
        volumes = bool((b.config or {}).get("volumes"))
        for c in session.scalars(
            select(Candidate).where(Candidate.batch_id == b.id).order_by(Candidate.index)
        ):
            st = states.get(c.id)
            honeypot = b.masks == "honeypot"
            ok = is_releasable(
                flagged=c.flagged,
                honeypot=honeypot,
                state=st.state if st else "unreviewed",
                gates_passed=b.gates_passed,
                override=cfg.accept_failed_gate is not None,
            )
            if not ok:
                key = (
                    "honeypot"
                    if honeypot
                    else "unfiltered"
                    if c.flagged is None
                    else "flagged"
                    if c.flagged
                    else "not accepted"
                )
                skipped[key] += 1
                if volumes:
                    withheld.add((b.name, case_position(c.transform)["case"]))
                continue
            reviewers = sorted(
                str(d.reviewer_id) for d in current.get(c.id, {}).values() if d.decision == "accept"
            )
            released.append(
                Released(
                    candidate_id=c.id,
                    batch=names[c.batch_id],
                    name=c.name,
                    units=b.units,
                    spacing=[float(v) for v in c.spacing],
                    privacy_score=float(c.privacy_score),
                    texture_score=None if c.texture_score is None else float(c.texture_score),
                    privacy_margin=float(c.privacy_margin),
                    reviewers=reviewers,
                    **(case_position(c.transform) if volumes else {}),
                )
            )
    released = _whole_cases(released, withheld, skipped)
    if failed:
        notes.append(f"gates failed for {', '.join(failed)}; exported on: {cfg.accept_failed_gate}")
    derived = sorted({r.batch for r in released if batches[r.batch].masks in DERIVED_ANATOMY})
    if derived and cfg.derived_anatomy is None:
        what = "; ".join(f"{n}: {DERIVED_ANATOMY[batches[n].masks]}" for n in derived)
        raise PipelineError(
            f"the label maps of batch(es) {what} are anatomy derived from real patients, and a "
            "label map tells anyone holding a patient's scan whether that patient was used; "
            "an admin may pass --allow-derived-anatomy REASON (written into the manifest and "
            "the datasheet)"
        )
    selection = {
        "chosen": [b.name for b in chosen],
        "skipped": skipped,
        "derived_anatomy": {n: DERIVED_ANATOMY[batches[n].masks] for n in derived},
    }
    return released, selection, notes


def _whole_cases(
    released: list[Released], withheld: set[tuple[str, int]], skipped: dict[str, int]
) -> list[Released]:
    """Slices of volume cases leave only as whole cases: a case with any slice flagged, not
    accepted or never generated stays out entirely (its other slices are counted as
    ``incomplete case``). Loose slices pass through."""
    slices: dict[tuple[str, int], set[int]] = {}
    depths: dict[tuple[str, int], int] = {}
    for r in released:
        if r.case is not None:
            slices.setdefault((r.batch, r.case), set()).add(int(r.z or 0))
            depths[(r.batch, r.case)] = int(r.depth or 0)
    for key, zs in slices.items():
        if zs != set(range(depths[key])):
            withheld.add(key)
    kept = [r for r in released if r.case is None or (r.batch, r.case) not in withheld]
    if slices or withheld:
        skipped["incomplete case"] = len(released) - len(kept)
    return kept


def _nifti_gz(array: np.ndarray, spacing: list[float], *, dtype: Any) -> bytes:
    """A fresh NIfTI-1 (clean diagonal RAS affine, empty text fields), gzip with mtime 0."""
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.diag([*spacing[:3], 1.0]))
    img.header.set_xyzt_units("mm")
    img.header.set_sform(img.affine, code=1)
    img.header.set_qform(img.affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_time(source_date_epoch: int | None) -> str:
    """ISO time of the export: ``SOURCE_DATE_EPOCH`` when set (reproducible builds)."""
    if source_date_epoch is not None:
        return datetime.fromtimestamp(source_date_epoch, UTC).isoformat()
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _sweep(parent: Path) -> None:
    """Remove what crashed exports left beside the target: temporary folders *and* zips.
    Called only with the out folder's lock held, so no live export owns any of them."""
    for stale in parent.glob(f"{TMP_PREFIX}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _out_folder(out: Path) -> Path:
    """``--out``: a folder we can write into (created if missing), not a dangling link."""
    out = Path(out)
    if not str(out).strip():
        raise PipelineError("--out is empty")
    if out.is_symlink() and not out.exists():
        raise PipelineError("--out is a symbolic link to nothing", path=out)
    if out.exists() and not out.is_dir():
        raise PipelineError("--out exists and is not a folder", path=out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PipelineError("--out is not a folder this user can write into", path=out)
    return out


@dataclass(frozen=True)
class ExportReport:
    """A built bundle: its folder, its zip beside it, how many cases it holds, and whether an
    earlier release held exactly these cases (a reproduction under the same id)."""

    folder: Path
    zip: Path
    cases: int
    reproduces: str | None = None  # the earlier release's export time


def build_bundle(ws: Workspace, cfg: ExportConfig, *, progress: Progress = iter) -> ExportReport:
    """Build ``cfg.out/DatasetNNN_Name`` (and ``.zip``) from the releasable candidates."""
    if cfg.dataset_id is not None and not 1 <= cfg.dataset_id <= 999:
        raise PipelineError("--dataset-id must be 1–999 (nnU-Net's three digits)")
    path_name(cfg.name, what="bundle")
    if "." in cfg.name or "-" in cfg.name:  # nnU-Net's DatasetNNN_Name: no dots or dashes
        raise PipelineError(f"--name {cfg.name!r}: letters, digits and underscores only")
    out = _out_folder(cfg.out)
    # one export at a time into a folder: a lock on the folder itself (no lock file is left
    # among the bundles); a second export is refused
    with exclusive_lock(out, busy="another export is writing into this folder"):
        _sweep(out)
        return _build(ws, cfg, out, progress)


def _build(ws: Workspace, cfg: ExportConfig, out: Path, progress: Progress) -> ExportReport:
    with Session(ws.engine) as session:
        released, selection, notes = select_releasable(session, cfg)
        if not released:
            raise PipelineError(
                "nothing to export: no candidate is filtered, unflagged, accepted and from a "
                f"batch that passed its gates (left out: {selection['skipped']})"
            )
        batches = {
            b.name: b
            for b in session.scalars(
                select(CandidateBatch).where(CandidateBatch.name.in_(selection["chosen"]))
            )
        }
        runs = {r.id: r for r in session.scalars(select(Run))}
        manifest_batches = {}
        for name, b in sorted(batches.items()):
            run = runs[b.run_id]
            manifest_batches[name] = {
                "generator_sha256": b.generator_sha256,
                "run": run.name,
                "preset": run.preset,
                "units": b.units,
                "gates": b.gates,
                "gates_passed": b.gates_passed,
                # the index fingerprint hashes source cache names: not for release
                "privacy": {k: v for k, v in (b.privacy or {}).items() if k != "index_catalog"},
                "mask_source": b.masks,
                # whose label volumes a synthetic batch's shape model was fitted on
                **(
                    {"anatomy_people": (b.config or {}).get("anatomy_people") or TRAINING_PEOPLE}
                    if b.masks == "synthetic"
                    else {}
                ),
                # per-slice scanner noise (two numbers fitted on the training volumes), if any
                "noise": (b.config or {}).get("noise_model"),
            }
        split_seeds = sorted(set(session.scalars(select(PatientSplit.seed))))
        run_configs = {
            runs[b.run_id].name: _public_config(runs[b.run_id].config) for b in batches.values()
        }
        pseudonyms = {
            rid: f"reviewer-{i + 1}"
            for i, rid in enumerate(sorted({r for x in released for r in x.reviewers}, key=int))
        }
        demo_ids = {
            str(r.id) for r in session.scalars(select(Reviewer).where(Reviewer.role == "demo"))
        }
        schema = next(iter(run_configs.values()))["label_schema"]
    units = sorted({r.units for r in released})
    if len(units) > 1:
        raise PipelineError("the chosen batches mix HU and display units; export them separately")
    volume_batches = sorted({r.batch for r in released if r.case is not None})
    slice_batches = sorted({r.batch for r in released if r.case is None})
    if volume_batches and slice_batches:
        raise PipelineError(
            f"volume batches ({', '.join(volume_batches)}) and slice batches "
            f"({', '.join(slice_batches)}) make different datasets (3-D cases vs 2-D slices "
            "nnU-Net plans apart); export them separately with --batch"
        )
    groups: dict[tuple[str, int], list[Released]] = {}
    for r in released:  # a volume case is one bundle case; a loose slice is its own
        key = (r.batch, r.case) if r.case is not None else (r.batch, -1 - r.candidate_id)
        groups.setdefault(key, []).append(r)

    files: dict[str, bytes] = {}
    cases = []
    ledger_cases = []
    windows: dict[str, tuple[float, float]] = {}
    for n, group in enumerate(progress(list(groups.values()))):
        case = f"case_{n:04d}"
        group = sorted(group, key=lambda r: r.z or 0)
        first = group[0]
        src = ws.candidates_dir / first.batch
        if first.batch not in windows:
            windows[first.batch] = tuple(read_batch_json(src)["window"])
        read = [read_candidate(src, r.name, units=r.units, window=windows[r.batch]) for r in group]
        data_dtype = np.int16 if first.units == "HU" else np.uint8
        volume = first.case is not None
        # a volume keeps its real slice spacing (nnU-Net plans 3d_fullres); a loose slice gets
        # nnU-Net's 2-D convention
        spacing = [*first.spacing[:2], float(first.spacing[2]) if volume else SLICE_SPACING_2D]
        stack = display_to_ras(np.stack([c.stored for c in read]))
        labels = display_to_ras(np.stack([c.mask for c in read]))
        image = _nifti_gz(stack, spacing, dtype=data_dtype)
        label = _nifti_gz(labels, spacing, dtype=np.uint8)
        files[f"imagesTr/{case}_0000.nii.gz"] = image
        files[f"labelsTr/{case}.nii.gz"] = label
        middle = read[len(read) // 2]
        shown = picture_window(middle.unit, storage=windows[first.batch], units=first.units)
        files[f"previews/{case}.png"] = _png(overlay(shown, middle.mask))
        ledger_cases += [
            LedgerCase(r.candidate_id, case, _sha256(image), _sha256(label)) for r in group
        ]
        textures = [r.texture_score for r in group if r.texture_score is not None]
        reviewers = sorted({x for r in group for x in r.reviewers}, key=int)
        entry = {
            "case": case,
            # a case is as close to a source as its closest slice
            "privacy_ssim": max(r.privacy_score for r in group),
            "privacy_texture": max(textures) if textures else None,
            "privacy_margin": min(r.privacy_margin for r in group),
            "accepted_by": [pseudonyms[x] for x in reviewers],
            "pixel_spacing_mm": [float(v) for v in first.spacing[:2]],
            "slice_spacing_mm": float(first.spacing[2]),
            "batch": first.batch,
        }
        if volume:
            entry |= {
                "slices": len(group),
                "shape": [int(v) for v in labels.shape],
                "spacing_mm": [float(v) for v in spacing],
            }
        cases.append(entry)
    with Session(ws.engine) as session:
        dataset_id = choose_dataset_id(session, cfg.dataset_id, cfg.name, ledger_cases)
    folder_name = f"Dataset{dataset_id:03d}_{cfg.name}"
    target = out / folder_name
    if target.exists() or target.with_suffix(".zip").exists():
        raise PipelineError("bundle exists; choose another --out or --name", path=target)
    labels = {name: i for i, name in enumerate(schema)}
    when = export_time(cfg.source_date_epoch)
    dataset = {
        "channel_names": {"0": "CT" if units == ["HU"] else "display"},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": cfg.name,
        "description": (
            "Synthetic cardiac CT volumes, painted slice by slice from their label volumes"
            if volume_batches
            else "Synthetic cardiac CT slices generated from segmentation masks"
        )
        + " by a conditional GAN, privacy-filtered and physician-reviewed (cardiac-synth).",
        "licence": cfg.license,
        "release": when,
        "reference": f"cardiac-synth {__version__}",
        "tensorImageSize": "3D",
    }
    files["dataset.json"] = (json.dumps(dataset, indent=2) + "\n").encode()
    per_reviewer: dict[str, int] = {}
    for c in cases:
        for who in c["accepted_by"]:
            per_reviewer[who] = per_reviewer.get(who, 0) + 1
    hist = _privacy_histogram(cases, manifest_batches)
    if hist is not None:
        files["privacy_histogram.png"] = hist
    manifest = {
        "tool": {"name": "cardiac-synth", "version": __version__},
        "export_time": when,
        "dataset": folder_name,
        "units": units[0],
        "batches": manifest_batches,
        "generators": run_configs,
        "review": {
            "policy": cfg.policy,
            "accepts_per_reviewer": per_reviewer,
            "demo_auto_review": any(x in demo_ids for r in released for x in r.reviewers),
        },
        "accept_failed_gate": cfg.accept_failed_gate,
        "anatomy": {
            "derived_from_real_patients": selection["derived_anatomy"],
            "reason": cfg.derived_anatomy if selection["derived_anatomy"] else None,
        },
        "notes": notes,
        "split_seeds": split_seeds,
        "left_out": selection["skipped"],
        "cases": cases,
    }
    files["DATASHEET.md"] = _datasheet(manifest, dataset).encode()
    manifest["files"] = [
        {"path": p, "size": len(b), "sha256": _sha256(b)} for p, b in sorted(files.items())
    ]
    files["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    sums = "".join(f"{_sha256(b)}  {p}\n" for p, b in sorted(files.items()))
    files["SHA256SUMS"] = sums.encode()

    tmp = out / f"{TMP_PREFIX}{folder_name}-{os.getpid()}"
    zip_tmp = out / f"{TMP_PREFIX}{folder_name}-{os.getpid()}.zip"
    placed = False
    try:
        tmp.mkdir()
        for path, data in sorted(files.items()):
            dest = tmp / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        _write_zip(zip_tmp, folder_name, files, cfg.source_date_epoch)
        zip_sha = hashlib.sha256(zip_tmp.read_bytes()).hexdigest()
        # The ledger row and the bundle land together: the renames happen inside the
        # transaction that records them, and an id another export took meanwhile is refused.
        with write_session(ws.engine) as session:
            if choose_dataset_id(session, dataset_id, cfg.name, ledger_cases) != dataset_id:
                raise PipelineError(f"another export took {folder_name} meanwhile; run again")
            reproduces = session.scalar(
                select(Release.export_time).where(Release.dataset == folder_name).limit(1)
            )
            record_release(
                session,
                dataset=folder_name,
                dataset_id=dataset_id,
                folder=str(target.resolve()),
                export_time=when,
                manifest_sha256=_sha256(files["manifest.json"]),
                zip_sha256=zip_sha,
                policy=cfg.policy,
                by=cfg.by,
                cases=ledger_cases,
            )
            placed = True
            os.replace(tmp, target)
            os.replace(zip_tmp, target.with_suffix(".zip"))
    except BaseException:
        if placed:  # renamed, then the commit failed: the ledger does not have it, so neither
            shutil.rmtree(target, ignore_errors=True)  # may the out folder
            target.with_suffix(".zip").unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in out.glob(f"{TMP_PREFIX}{folder_name}-{os.getpid()}*"):
            stale.unlink(missing_ok=True) if stale.is_file() else shutil.rmtree(stale, True)
        raise
    return ExportReport(target, target.with_suffix(".zip"), len(cases), reproduces)


def _write_zip(path: Path, root: str, files: dict[str, bytes], epoch: int | None) -> None:
    """A zip with a fixed order, fixed timestamps and fixed permissions."""
    stamp = (1980, 1, 1, 0, 0, 0)
    if epoch is not None:
        t = datetime.fromtimestamp(max(epoch, 315532800), UTC)
        stamp = (t.year, t.month, t.day, t.hour, t.minute, t.second - t.second % 2)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(f"{root}/{name}", date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            z.writestr(info, data)


def _public_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without anything derived from patient identities (the split hash)."""
    out = {k: v for k, v in config.items() if k != "data"}
    data = config.get("data", {})
    out["training_data"] = {
        "train_slices": data.get("train_slices"),
        "val_slices": data.get("val_slices"),
        "units": data.get("units"),
        "windows": data.get("windows"),
    }
    return out


#: The most a licence file may hold (the longest common licences, GPL-3.0 and MPL-2.0, are
#: 35 KiB and 16 KiB).
MAX_LICENCE_BYTES = 64 * 1024


def read_licence(value: str) -> tuple[str, str]:
    """``--license TEXT or FILE`` → (the licence text, what was included, in words).

    A file must be UTF-8 text of at most :data:`MAX_LICENCE_BYTES` with no control characters
    but line breaks and tabs (a binary file was a traceback); a value that looks like a path
    but names no file is refused rather than shipped as the licence text.
    """
    p = Path(value)
    try:
        exists, is_file = p.exists(), p.is_file()
    except OSError:  # a name too long to be a path is a (bad) licence name, not a file
        exists = is_file = False
    looks_like_path = "/" in value or p.suffix.lower() in (".txt", ".md", ".rst", ".licence")
    if is_file:
        if p.stat().st_size > MAX_LICENCE_BYTES:
            raise PipelineError(
                f"licence file is larger than {MAX_LICENCE_BYTES // 1024} KiB", path=p
            )
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise PipelineError("licence file is not UTF-8 text", path=p) from None
        bad = {c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\r\t"}
        if bad:
            raise PipelineError("licence file holds control characters (binary?)", path=p)
        text = text.strip()
        if not text:
            raise PipelineError("licence file is empty", path=p)
        return text, f"the text of {p} ({len(text):,} characters)"
    if looks_like_path and not exists:
        raise PipelineError("licence file not found (pass a file or a licence name)", path=p)
    if exists:
        raise PipelineError("licence path is not a regular file", path=p)
    text = " ".join(value.split())
    if not text or len(text) > 200:
        raise PipelineError("--license: give a licence name (≤ 200 characters) or a text file")
    return text, f"the licence name {text!r}"


def _privacy_histogram(cases: list[dict[str, Any]], batches: dict[str, Any]) -> bytes | None:
    """The privacy figure of the released images against the batches' thresholds (the first
    batch's thresholds when several were filtered alike; None when none was calibrated)."""
    stored = [b["privacy"] for b in batches.values() if b["privacy"].get("threshold") is not None]
    if not stored:
        return None
    return privacy_figure(
        Calibration.from_manifest(stored[0]),
        title="Released images",
        ssim=[c["privacy_ssim"] for c in cases],
        texture=[c["privacy_texture"] for c in cases],
        label="released images",
    )


def _quality_lines(manifest: dict[str, Any]) -> list[str]:
    """Each batch's evaluation figures and the gate table, as ``pipeline evaluate`` prints them."""
    lines = []
    for name, b in manifest["batches"].items():
        metrics = (b.get("gates") or {}).get("metrics")
        if metrics:
            lines.append(f"**{name}**")
            figures = metrics_lines(
                metrics["paired"],
                metrics["distribution"],
                metrics.get("heart"),
                metrics.get("utility"),
                metrics.get("membership"),
                metrics.get("through_plane"),
            )
            lines += [f"- {x}" for x in figures]
            if (b.get("privacy") or {}).get("count") is not None:
                lines.append(f"- privacy: {describe_privacy(b['privacy'])}")
            lines.append("")
    gates = {n: (b.get("gates") or {}).get("results", []) for n, b in manifest["batches"].items()}
    return lines + gate_table(gates, markdown=True)


def _noise_sentence(manifest: dict[str, Any]) -> str:
    """What the datasheet says of the scanner noise painted slices were given ("" if none)."""
    noisy = [b for b in manifest["batches"].values() if (b.get("noise") or {}).get("sd")]
    if not noisy:
        return ""
    sds = ", ".join(
        f"{b['noise']['sd_source_units']:.1f} {'HU' if b['units'] == 'HU' else 'display levels'}"
        for b in noisy
    )
    return (
        f" Each slice carries its own draw of Gaussian scanner noise (sd {sds}; correlation "
        "and amplitude fitted on the training volumes so that neighbouring slices differ as a "
        "real scan's do); the generator alone paints none."
    )


def _datasheet(manifest: dict[str, Any], dataset: dict[str, Any]) -> str:
    """DATASHEET.md (Gebru et al.'s sections) filled from the manifest."""
    n = dataset["numTraining"]
    priv = [b["privacy"] for b in manifest["batches"].values() if b.get("privacy")]
    thresholds = ", ".join(
        f"{cal.describe()} ({cal.provenance()})"
        for cal in (Calibration.from_manifest(p) for p in priv if "threshold" in p)
    )
    notes = "".join(
        f"{p['note']}. " for p in priv if p.get("note")
    )  # a baseline too small for the requested quantile says so
    margins = [c["privacy_margin"] for c in manifest["cases"]]
    hand_set = "; ".join(
        cal.describe()
        for cal in (Calibration.from_manifest(p) for p in priv if "threshold" in p)
        if cal.explicit
    )
    labels = ", ".join(f"{k} = {v}" for k, v in dataset["labels"].items())
    derived = manifest["anatomy"]["derived_from_real_patients"]
    volumes = [c for c in manifest["cases"] if "slices" in c]
    if volumes:
        depths = sorted(c["slices"] for c in volumes)
        what = (
            f"{n} synthetic 3-D volume{'s' * (n != 1)} ({depths[0]}–{depths[-1]} axial slices "
            f"each, {manifest['units']})"
        )
        layout = (
            "written back in HU (int16) as one volume per case with its in-plane spacing and "
            "its slice spacing (synthetic anatomy: the training volumes' median; real label "
            "volumes: their own), so nnU-Net plans 3-D configurations (`3d_fullres`)"
        )
    else:
        what = f"{n} synthetic 2D axial slices ({manifest['units']})"
        layout = (
            "written back in HU (int16) with the in-plane spacing of the resized slice; each "
            f"case is one slice with an out-of-plane spacing of {SLICE_SPACING_2D:g} (nnU-Net "
            "v2's convention for 2-D data; the source slice spacing is in the manifest)"
        )
    lines = [
        f"# Datasheet: {manifest['dataset']}",
        "",
        f"Exported {manifest['export_time']} by cardiac-synth {manifest['tool']['version']}.",
        "",
        "## Motivation",
        "A shareable stand-in for segmented cardiac CT: images a model can be trained on without "
        "any patient's scan leaving the hospital.",
        "",
        "## Composition",
        f"{what} with label maps ({labels}), as "
        "an nnU-Net v2 raw dataset (`imagesTr/`, `labelsTr/`, `dataset.json`); overlay "
        "previews in `previews/`. "
        + (
            "The privacy filter's rule was set by hand, not calibrated "
            f"({hand_set}): this release makes no statement about how close its images are to "
            "a real patient's scan."
            if hand_set
            else "No image is a real patient's scan."
        ),
        "",
        *(
            [
                "**The label maps are anatomy derived from real patients** ("
                + "; ".join(f"{k}: {v}" for k, v in derived.items())
                + "): someone holding one of those patients' scans may tell from them that the "
                f"patient was used. Released on an admin's reason: "
                f"{manifest['anatomy']['reason']}",
                "",
            ]
            if derived
            else []
        ),
        "## Collection process",
        "Synthetic. A conditional GAN (pix2pix-style U-Net generator, PatchGAN discriminator) "
        "trained on the hospital's segmented cardiac CT maps a segmentation mask to a CT slice. "
        "Masks were sampled from a shape model of the training patients' label volumes (no one "
        "patient's anatomy, each sample checked against every training patient), or were "
        "training patients' masks deformed, held-out patients' masks, or user-provided masks "
        "(see `mask_source` and `anatomy` in `manifest.json`)."
        + "".join(
            f" The shape model of batch {name} was fitted on {b['anatomy_people']['patients']} "
            "people from outside the training set (`--anatomy-from`): no training patient's "
            "label volume went into its label maps."
            for name, b in sorted(manifest["batches"].items())
            if (b.get("anatomy_people") or {}).get("patients")
        )
        + (
            " Volumes were painted slice by slice, each slice seeing its neighbours' label "
            "maps; a volume is released only when every one of its slices passed the privacy "
            "filter and was accepted in review."
            if volumes
            else ""
        )
        + _noise_sentence(manifest),
        "",
        "Every image was compared with every source slice (FAISS nearest neighbours, then "
        f"aligned SSIM and fine-texture correlation); flagged when {thresholds or 'n/a'}. "
        "Thresholds sit between two measured tails: how similar each patient's slices are to "
        "every other patient's (leave one patient out; the stated flag-rate bound is exact for "
        "that many scores) and how similar planted near-copies of source slices are (exact, "
        "mirrored, shifted, noisy, rescaled, elastic, blended; the recall above). "
        f"{notes}Flagged images are never released. Released images' margin below the threshold: "
        f"min {min(margins):.4f}, median {float(np.median(margins)):.4f}. "
        "See `privacy_histogram.png`.",
        "",
        (
            "**No physician reviewed these images.** Demo export: a built-in demo account "
            "(not a person) accepted every unflagged image automatically; this is not a "
            f"clinical review (accepts per account: {manifest['review']['accepts_per_reviewer']})."
            if manifest["review"]["demo_auto_review"]
            else f"Every released image was accepted in review (policy: "
            f"{manifest['review']['policy']}); accepts per reviewer (pseudonyms): "
            f"{manifest['review']['accepts_per_reviewer']}."
        ),
        "",
        "![privacy scores of the released images](privacy_histogram.png)",
        "",
        "## Quality",
        *_quality_lines(manifest),
        "",
        (
            f"Gates were overridden by an admin: {manifest['accept_failed_gate']}"
            if manifest["accept_failed_gate"]
            else "All gates passed."
        ),
        "",
        "## Preprocessing",
        "Source CT was clipped to the recorded HU window and scaled to [0, 1]; images are "
        f"{layout}. Masks use consecutive class indices (0 = background).",
        "",
        "## Uses and misuses",
        "For training and benchmarking segmentation and image-analysis methods, teaching, and "
        "software testing. Not for diagnosis, not as evidence about any real patient, and not "
        "to estimate disease prevalence: the images reflect a model of the source data, "
        "including its biases, at reduced fidelity.",
        "",
        "## Distribution",
        f"Licence: {dataset['licence']}. Verify the files with `sha256sum -c SHA256SUMS`.",
        "",
        "## Maintenance",
        "Regenerate with cardiac-synth from the same catalog; the manifest records generator "
        "hashes, configurations, gate results and per-image privacy scores.",
        "",
    ]
    return "\n".join(lines)
