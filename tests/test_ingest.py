import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import func, select

from pipeline.cache import open_cache
from pipeline.catalog import Ingest, PatientSplit, Slice, Source, read_session
from pipeline.errors import PipelineError
from pipeline.ingest import IngestConfig, ingest
from pipeline.labels import LabelSchema
from pipeline.phantom import make_volume, volume_to_nifti
from pipeline.preprocess import display_to_ras, ras_to_display, unit_to_hu

CFG = IngestConfig(size=64, min_foreground=0.0)


def counts(ws):
    with read_session(ws.engine) as s:
        return tuple(
            s.scalar(select(func.count()).select_from(t))
            for t in (Ingest, PatientSplit, Source, Slice)
        )


def test_phantom_ingest_counts_and_cache(ws, phantom_dir):
    report = ingest(ws, phantom_dir, CFG)
    assert report.format == "mmwhs" and len(report.added_volumes) == 6
    assert report.added_slices == 6 * 16
    st = report.status
    assert st["volumes"] == 6 and st["slices"] == 96 and st["units"] == ["HU"]
    assert {k: v["patients"] for k, v in st["splits"].items()} == {"train": 4, "val": 1, "test": 1}
    with read_session(ws.engine) as s:
        for src in s.scalars(select(Source)):
            arr = open_cache(ws.cache_dir / src.cache_file)
            assert isinstance(arr, np.memmap)
            assert arr.shape == (src.n_slices,) == (len(src.slices),)
            assert arr["image"].dtype == np.float32 and arr["mask"].dtype == np.uint8
            assert arr["image"].min() >= 0 and arr["image"].max() <= 1
            assert arr["mask"].max() <= 7
            assert src.spacing[0] == pytest.approx(380 / 64) and src.units == "HU"
            assert (src.window_lo, src.window_hi) == (-1024.0, 2048.0)


def test_slices_of_a_patient_never_cross_splits(ws, phantom_dir):
    ingest(ws, phantom_dir, CFG)
    with read_session(ws.engine) as s:
        rows = s.execute(
            select(Source.patient, PatientSplit.split).join(Slice).join(PatientSplit)
        ).all()
    per_patient = {}
    for patient, split in rows:
        per_patient.setdefault(patient, set()).add(split)
    assert all(len(v) == 1 for v in per_patient.values())


def test_reingest_is_idempotent_and_new_source_adds(ws, phantom_dir, tmp_path):
    ingest(ws, phantom_dir, CFG)
    before = counts(ws)
    files_before = sorted(p.name for p in ws.cache_dir.iterdir())
    again = ingest(ws, phantom_dir, CFG)
    assert again.added_volumes == [] and len(again.skipped_volumes) == 6
    assert counts(ws)[1:] == before[1:]
    assert sorted(p.name for p in ws.cache_dir.iterdir()) == files_before
    other = tmp_path / "other"
    other.mkdir()
    vol = make_volume(99, size=64, n_slices=10)
    img, lab = volume_to_nifti(vol)
    nib.save(img, other / "new_image.nii.gz")
    nib.save(lab, other / "new_label.nii.gz")
    added = ingest(ws, other, CFG)
    assert added.added_volumes == ["new"] and added.added_slices == 10
    assert counts(ws)[2:] == (7, 96 + 10)


def test_hu_round_trip_without_resizing(ws, tmp_path):
    vol = make_volume(5, size=64, n_slices=6)
    src = tmp_path / "src"
    src.mkdir()
    img, lab = volume_to_nifti(vol)
    nib.save(img, src / "a_image.nii.gz")
    nib.save(lab, src / "a_label.nii.gz")
    ingest(ws, src, IngestConfig(size=64, min_foreground=0.0, split=(1.0, 0.0, 0.0)))
    with read_session(ws.engine) as s:
        source = s.scalars(select(Source)).one()
        arr = open_cache(ws.cache_dir / source.cache_file)
        window = (source.window_lo, source.window_hi)
    hu = unit_to_hu(arr["image"], window)
    expected = np.clip(vol.hu, *window)
    np.testing.assert_allclose(hu, expected, atol=0.02)
    schema = LabelSchema.mmwhs()
    np.testing.assert_array_equal(arr["mask"], schema.to_classes(vol.labels))


def test_reorientation_to_canonical(ws, tmp_path):
    """An LPS-stored copy of a volume ingests to the same slices as the RAS original."""
    vol = make_volume(6, size=48, n_slices=5)
    img, lab = volume_to_nifti(vol)
    src = tmp_path / "src"
    src.mkdir()
    nib.save(img, src / "ras_image.nii.gz")
    nib.save(lab, src / "ras_label.nii.gz")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [47, 47]  # voxel index i → 47 - i on the first two axes
    for kind, im in (("image", img), ("label", lab)):
        data = np.asanyarray(im.dataobj)[::-1, ::-1, :]
        lps = nib.Nifti1Image(np.ascontiguousarray(data), im.affine @ flip)
        assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
        nib.save(lps, src / f"lps_{kind}.nii.gz")
    ingest(ws, src, IngestConfig(size=48, min_foreground=0.0, split=(1.0, 0.0, 0.0)))
    with read_session(ws.engine) as s:
        files = {src_.name: src_.cache_file for src_ in s.scalars(select(Source))}
    a = open_cache(ws.cache_dir / files["ras"])
    b = open_cache(ws.cache_dir / files["lps"])
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    # and the display orientation: anterior at the top, so the spine (bone) is in the lower half
    disp = ras_to_display(np.asanyarray(img.dataobj))
    assert np.argmax(disp[2].max(axis=1) > 400) > 20


def test_min_foreground_skips_slices(ws, phantom_dir):
    report = ingest(ws, phantom_dir, IngestConfig(size=64, min_foreground=0.05))
    assert 0 < report.added_slices < 96
    with read_session(ws.engine) as s:
        assert s.scalar(select(func.min(Slice.foreground))) >= 0.05


def test_nnunet_layout(ws, tmp_path):
    root = tmp_path / "Dataset001_Heart"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        vol = make_volume(i, size=48, n_slices=6)
        classes = LabelSchema.mmwhs().to_classes(vol.labels).astype(np.int16)
        img, _ = volume_to_nifti(vol)
        lab = nib.Nifti1Image(display_to_ras(classes), img.affine)  # consecutive 0..7
        nib.save(img, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(lab, root / "labelsTr" / f"case_{i:03d}.nii.gz")
    names = [
        "background",
        "myocardium",
        "left_atrium",
        "left_ventricle",
        "right_atrium",
        "right_ventricle",
        "aorta",
        "pulmonary_artery",
    ]
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {n: i for i, n in enumerate(names)},
                "numTraining": 3,
                "file_ending": ".nii.gz",
            }
        )
    )
    report = ingest(ws, root, IngestConfig(size=48, min_foreground=0.0))
    assert report.format == "nnunet" and report.added_volumes == [
        "case_000",
        "case_001",
        "case_002",
    ]
    assert report.label_schema_source.endswith("dataset.json")
    assert report.status["slices"] == 18


def test_png_layout_is_display_units(ws, tmp_path):
    from PIL import Image

    root = tmp_path / "png"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for patient in ("p1", "p2"):
        for k in range(3):
            img = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            mask = np.zeros((40, 40), np.uint8)
            mask[10:20, 10:20] = 1 + k
            Image.fromarray(img).save(root / "images" / f"{patient}_{k}.png")
            Image.fromarray(mask).save(root / "masks" / f"{patient}_{k}.png")
    (root / "labels.json").write_text(json.dumps({"background": 0, "a": 1, "b": 2, "c": 3}))
    report = ingest(ws, root, IngestConfig(size=32, split=(0.5, 0.5, 0.0)))
    assert report.format == "png" and report.status["units"] == ["display"]
    with read_session(ws.engine) as s:
        src = s.scalars(select(Source)).first()
        assert src.units == "display" and src.spacing is None
        assert (src.window_lo, src.window_hi) == (0.0, 255.0)
        assert [sl.z for sl in src.slices] == [0, 1, 2]


def test_workspace_rejects_other_schema_or_size(ws, phantom_dir, tmp_path):
    ingest(ws, phantom_dir, CFG)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"background": 0, "heart": 205}))
    with pytest.raises(PipelineError, match="label schema"):
        ingest(ws, phantom_dir, IngestConfig(size=64, labels_file=str(labels)))
    with pytest.raises(PipelineError, match="slice size 64"):
        ingest(ws, phantom_dir, IngestConfig(size=32))


def test_failure_half_way_leaves_nothing(ws, phantom_dir):
    # The fifth volume's data is truncated: its header reads, its voxels do not.
    target = phantom_dir / "ct_0005_image.nii.gz"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=r"ct_0005_image\.nii\.gz: corrupt or truncated"):
        ingest(ws, phantom_dir, CFG)
    assert counts(ws) == (0, 0, 0, 0)
    assert list(ws.cache_dir.iterdir()) == []


def test_crash_between_rename_and_commit_cleans_up(ws, phantom_dir, monkeypatch):
    import pipeline.ingest as ing

    real = ing.Slice

    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 40:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(ing, "Slice", exploding)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(ws, phantom_dir, CFG)
    monkeypatch.undo()
    assert counts(ws) == (0, 0, 0, 0)
    assert list(ws.cache_dir.iterdir()) == []
    shutil.rmtree(ws.cache_dir)
    ws.cache_dir.mkdir()
    assert ingest(ws, phantom_dir, CFG).added_slices == 96
