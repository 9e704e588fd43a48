"""`pipeline verify BUNDLE`: checksums and invariants of a release bundle, as a list of problems.

Checks: SHA256SUMS against every file and no file unlisted; manifest.json's per-file sizes and
hashes; the nnU-Net v2 raw layout (``imagesTr/case_XXXX_0000.nii.gz`` ↔ ``labelsTr/case_XXXX
.nii.gz``, dataset.json's required keys, ``numTraining``, ``file_ending``, labels 0..K with
background 0); every label file's values inside dataset.json's labels; image and label grids
(shape and affine) matching; a volume case's shape and spacing matching what the manifest
says of it (nnU-Net plans 3d_fullres from the spacing, so a resampled file is a finding).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.errors import PipelineError
from pipeline.imageio import check_nifti_header
from pipeline.validate import inside

REQUIRED = ("channel_names", "labels", "numTraining", "file_ending")
IMAGE = re.compile(r"^(case_\d{4})_(\d{4})\.nii\.gz$")
LABEL = re.compile(r"^(case_\d{4})\.nii\.gz$")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_bundle(root: Path) -> list[str]:
    """Every problem found in the bundle folder ``root`` (empty: sound)."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: not a bundle folder"]
    problems: list[str] = []
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    sums_path = root / "SHA256SUMS"
    listed: dict[str, str] = {}
    if not sums_path.exists():
        problems.append("SHA256SUMS is missing")
    else:
        for n, line in enumerate(sums_path.read_text().splitlines(), start=1):
            m = re.match(r"^([0-9a-f]{64})  (.+)$", line)
            if not m:
                problems.append(f"SHA256SUMS line {n} is malformed")
                continue
            if not _inside(root, m.group(2)):
                problems.append(f"SHA256SUMS line {n}: {m.group(2)!r} points outside the bundle")
                continue
            listed[m.group(2)] = m.group(1)
    for f in files:
        if f != "SHA256SUMS" and f not in listed:
            problems.append(f"{f}: not listed in SHA256SUMS")
    for f, digest in listed.items():
        p = root / f
        if not p.is_file():
            problems.append(f"{f}: listed in SHA256SUMS but missing")
        elif _sha(p) != digest:
            problems.append(f"{f}: SHA-256 does not match SHA256SUMS")
    manifest = _json(root / "manifest.json", problems)
    if manifest is not None:
        problems += _check_manifest(root, manifest, files)
    dataset = _json(root / "dataset.json", problems)
    if dataset is not None:
        shape = _dataset_shape(dataset)
        problems += shape or _check_layout(root, dataset)
    cases = manifest.get("cases") if isinstance(manifest, dict) else None
    if dataset is not None and isinstance(cases, list):
        named = {c.get("case") for c in cases if isinstance(c, dict)}
        found = {p.name[: -len(".nii.gz")] for p in (root / "labelsTr").glob("case_*.nii.gz")}
        if named != found:
            extra, gone = sorted(found - named), sorted(named - found, key=str)
            problems.append(
                f"manifest.json cases differ from labelsTr (not in manifest: {extra[:5]}, "
                f"missing files: {gone[:5]})"
            )
        problems += _check_case_grids(root, [c for c in cases if isinstance(c, dict)], found)
    return problems


def _check_case_grids(root: Path, cases: list[dict[str, Any]], found: set[str]) -> list[str]:
    """Each volume case's label and image grid against the manifest's shape and spacing."""
    problems = []
    for c in cases:
        name, shape, spacing = c.get("case"), c.get("shape"), c.get("spacing_mm")
        if (shape is None and spacing is None) or name not in found:
            continue
        paths = [root / "labelsTr" / f"{name}.nii.gz", root / "imagesTr" / f"{name}_0000.nii.gz"]
        for path in paths:
            try:
                img = nib.load(path)
                check_nifti_header(img, path)
            except PipelineError as exc:
                problems.append(f"{path.parent.name}/{path.name}: {exc.message}")
                continue
            except Exception as exc:
                problems.append(
                    f"{path.parent.name}/{path.name}: unreadable ({type(exc).__name__})"
                )
                continue
            zooms = [round(float(z), 4) for z in img.header.get_zooms()[:3]]
            if not isinstance(shape, list) or list(img.shape) != shape:
                problems.append(
                    f"{name}: shape {list(img.shape)} of {path.parent.name}/{path.name} differs "
                    f"from the manifest's {shape}"
                )
            try:
                same = np.allclose(zooms, [float(v) for v in spacing], atol=1e-3)
            except (TypeError, ValueError):
                same = False
            if not same:
                problems.append(
                    f"{name}: spacing {zooms} mm of {path.parent.name}/{path.name} differs from "
                    f"the manifest's {spacing}"
                )
    return problems


#: The most a bundle zip may inflate to (a zip bomb is refused before anything is written).
MAX_ZIP_BYTES = 64 * 2**30


def verify_zip(path: Path, *, beside: Path | None = None) -> list[str]:
    """Every problem found in a bundle zip (empty: sound): what is *sent* is checked, not only
    the folder it was made from.

    Members must all lie under one ``DatasetNNN_Name/`` folder named like the zip, as regular
    files (no absolute path, ``..``, backslash, link, duplicate or folder entry), inflate to at
    most :data:`MAX_ZIP_BYTES`, and be exactly the files its ``SHA256SUMS`` lists, each with that
    digest. The sound members are then unpacked into a temporary folder and checked like a
    bundle folder (manifest, dataset.json, layout). ``beside``: the folder exported with it,
    whose ``SHA256SUMS`` must be the zip's, byte for byte.
    """
    import stat
    import tempfile
    import zipfile

    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return [f"{path.name}: not a readable zip ({type(exc).__name__})"]
    problems: list[str] = []
    with z:
        infos = z.infolist()
        root = path.name[: -len(".zip")] if path.name.endswith(".zip") else path.stem
        names: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            mode = info.external_attr >> 16
            if name.startswith(("/", "\\")) or "\\" in name or ".." in name.split("/"):
                problems.append(f"{path.name}: member {name!r} points outside the bundle")
            elif not name.startswith(f"{root}/") or name.endswith("/"):
                problems.append(f"{path.name}: member {name!r} is not a file under {root}/")
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # ours carry no type bits
                problems.append(f"{path.name}: member {name!r} is not a regular file")
            elif name in names:
                problems.append(f"{path.name}: member {name!r} appears twice")
            else:
                names[name[len(root) + 1 :]] = info
        if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
            return [*problems, f"{path.name}: inflates to more than {MAX_ZIP_BYTES >> 30} GiB"]
        sums = names.get("SHA256SUMS")
        if sums is None:
            return [*problems, f"{path.name}: SHA256SUMS is missing"]
        sums_text = z.read(sums)
        listed = {}
        for line in sums_text.decode("utf-8", "replace").splitlines():
            m = re.match(r"^([0-9a-f]{64})  (.+)$", line)
            if m:
                listed[m.group(2)] = m.group(1)
        for name in sorted(set(names) - set(listed) - {"SHA256SUMS"}):
            problems.append(f"{path.name}: {name} is not listed in SHA256SUMS")
        for name in sorted(set(listed) - set(names)):
            problems.append(f"{path.name}: {name} is listed in SHA256SUMS but not in the zip")
        for name in sorted(set(listed) & set(names)):
            h = hashlib.sha256()
            with z.open(names[name]) as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != listed[name]:
                problems.append(f"{path.name}: {name}: SHA-256 does not match SHA256SUMS")
        if beside is not None:
            folder_sums = Path(beside) / "SHA256SUMS"
            if not folder_sums.is_file() or folder_sums.read_bytes() != sums_text:
                problems.append(
                    f"{path.name}: its SHA256SUMS differs from the folder's: the zip is not "
                    "the bundle that was checked"
                )
        if problems:
            return problems
        with tempfile.TemporaryDirectory(prefix="verify-zip-") as tmp:
            for name, info in names.items():
                target = Path(tmp) / root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            problems += [f"{path.name}: {p}" for p in verify_bundle(Path(tmp) / root)]
    return problems


def _inside(root: Path, relative: str) -> bool:
    """Whether a listed path names a file inside the bundle (no absolute path, no '..')."""
    if relative.startswith(("/", "\\")) or ".." in Path(relative).parts:
        return False
    try:
        return inside(root, root / relative) != root.resolve()
    except PipelineError:
        return False


def _check_manifest(root: Path, manifest: Any, files: list[str]) -> list[str]:
    """manifest.json's file list against the files (its shape checked, never trusted)."""
    entries_raw = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries_raw, list) or not all(
        isinstance(e, dict)
        and isinstance(e.get("path"), str)
        and isinstance(e.get("size"), int)
        and isinstance(e.get("sha256"), str)
        for e in entries_raw
    ):
        return ["manifest.json: 'files' is not a list of {path, size, sha256} entries"]
    problems = []
    entries = {}
    for e in entries_raw:
        if not _inside(root, e["path"]):
            problems.append(f"manifest.json: {e['path']!r} points outside the bundle")
        else:
            entries[e["path"]] = e
    for f in files:
        if f not in ("manifest.json", "SHA256SUMS") and f not in entries:
            problems.append(f"{f}: not listed in manifest.json")
    for f, e in entries.items():
        p = root / f
        if not p.is_file():
            problems.append(f"{f}: listed in manifest.json but missing")
            continue
        if p.stat().st_size != e["size"]:
            problems.append(f"{f}: size differs from manifest.json")
        if _sha(p) != e["sha256"]:
            problems.append(f"{f}: SHA-256 differs from manifest.json")
    return problems


def _dataset_shape(dataset: Any) -> list[str]:
    """dataset.json's keys and their types (nnU-Net v2), before anything reads them."""
    if not isinstance(dataset, dict):
        return ["dataset.json is not a JSON object"]
    problems = [f"dataset.json lacks {k!r}" for k in REQUIRED if k not in dataset]
    if problems:
        return problems
    labels, channels = dataset["labels"], dataset["channel_names"]
    if not isinstance(labels, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels.values()
    ):
        problems.append("dataset.json labels must map names to integers")
    if not isinstance(channels, dict) or not channels:
        problems.append("dataset.json channel_names must be a non-empty object")
    n = dataset["numTraining"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        problems.append("dataset.json numTraining must be a non-negative integer")
    if not isinstance(dataset["file_ending"], str):
        problems.append("dataset.json file_ending must be a string")
    return problems


def _json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{path.name} is missing")
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
    return None


def _check_layout(root: Path, dataset: dict[str, Any]) -> list[str]:
    """nnU-Net v2 raw rules (nnU-Net's dataset_format.md), checked explicitly."""
    problems = [f"dataset.json lacks {k!r}" for k in REQUIRED if k not in dataset]
    if problems:
        return problems
    if dataset["file_ending"] != ".nii.gz":
        problems.append(f"dataset.json file_ending is {dataset['file_ending']!r}")
    labels = dataset["labels"]
    values = sorted(labels.values()) if isinstance(labels, dict) else []
    if labels.get("background") != 0 or values != list(range(len(values))):
        problems.append("dataset.json labels must be consecutive integers with background = 0")
    channels = len(dataset["channel_names"])
    images: dict[str, set[str]] = {}
    for p in sorted((root / "imagesTr").glob("*")):
        m = IMAGE.match(p.name)
        if not m:
            problems.append(f"imagesTr/{p.name}: not named case_XXXX_CCCC.nii.gz")
            continue
        images.setdefault(m.group(1), set()).add(m.group(2))
    labels_found = {}
    for p in sorted((root / "labelsTr").glob("*")):
        m = LABEL.match(p.name)
        if not m:
            problems.append(f"labelsTr/{p.name}: not named case_XXXX.nii.gz")
            continue
        labels_found[m.group(1)] = p
    if len(labels_found) != dataset["numTraining"]:
        problems.append(
            f"dataset.json numTraining is {dataset['numTraining']}, labelsTr has "
            f"{len(labels_found)} cases"
        )
    for case in sorted(set(images) | set(labels_found)):
        if case not in labels_found:
            problems.append(f"{case}: image without a label file")
            continue
        expected = {f"{c:04d}" for c in range(channels)}
        if images.get(case) != expected:
            problems.append(
                f"{case}: channels {sorted(images.get(case, []))} != {sorted(expected)}"
            )
            continue
        try:
            label = nib.load(labels_found[case])
            check_nifti_header(label, labels_found[case])  # before a gzip bomb is inflated
            data = np.asanyarray(label.dataobj)
        except PipelineError as exc:
            problems.append(f"labelsTr/{case}.nii.gz: {exc.message}")
            continue
        except Exception as exc:  # a damaged file is a finding, not a crash
            problems.append(f"labelsTr/{case}.nii.gz: unreadable ({type(exc).__name__})")
            continue
        bad = sorted(set(np.unique(data).tolist()) - set(values))
        if bad:
            problems.append(f"labelsTr/{case}.nii.gz: label values {bad} not in dataset.json")
        for ch in sorted(expected):
            try:
                img = nib.load(root / "imagesTr" / f"{case}_{ch}.nii.gz")
                check_nifti_header(img, root / "imagesTr" / f"{case}_{ch}.nii.gz")
                np.asanyarray(img.dataobj)
            except PipelineError as exc:
                problems.append(f"imagesTr/{case}_{ch}.nii.gz: {exc.message}")
                continue
            except Exception as exc:
                problems.append(f"imagesTr/{case}_{ch}.nii.gz: unreadable ({type(exc).__name__})")
                continue
            if img.shape != label.shape or not np.allclose(img.affine, label.affine):
                problems.append(f"{case}: image and label grids differ (shape or affine)")
        problems += _slice_axis_problem(case, label)
    return problems


def _slice_axis_problem(case: str, label: Any) -> list[str]:
    """A single-slice case whose slice axis is not its largest spacing: nnU-Net v2 puts the
    largest-spacing axis first and plans 1-pixel-wide 2-D patches (then crashes in training)."""
    shape, zooms = label.shape, [float(z) for z in label.header.get_zooms()[:3]]
    flat = [i for i, n in enumerate(shape[:3]) if n == 1]
    if len(shape) < 3 or len(flat) != 1:
        return []
    axis = flat[0]
    if zooms[axis] > max(z for i, z in enumerate(zooms) if i != axis):
        return []
    return [
        f"{case}: the single-slice axis has spacing {zooms[axis]:g} mm, not above the in-plane "
        f"{max(zooms[:axis] + zooms[axis + 1 :]):g} mm; nnU-Net v2 would plan 1-pixel 2-D "
        "patches (export 2-D cases with an out-of-plane spacing of 999, its convention)"
    ]
