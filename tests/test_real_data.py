"""Ingest of the real CT in ../shared/data (skipped, with the reason, where it is absent)."""

import json

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import select

from pipeline.cache import open_cache
from pipeline.catalog import PatientSplit, Source, read_session
from pipeline.ingest import IngestConfig, ingest
from pipeline.preprocess import unit_to_hu
from tests.conftest import shared_dataset


def test_hocm_png(ws):
    src = shared_dataset("hocm-2d")
    report = ingest(ws, src, IngestConfig(size=64, split=(0.5, 0.0, 0.5)))
    assert report.format == "png"
    assert report.label_schema == json.loads((src / "labels.json").read_text())
    st = report.status
    assert st["volumes"] == 2 and st["slices"] == 36 and st["units"] == ["display"]
    with read_session(ws.engine) as s:
        rows = s.execute(select(Source, PatientSplit.split).join(PatientSplit)).all()
        by_patient = {src_.patient: (src_.n_slices, split) for src_, split in rows}
        assert {k: v[0] for k, v in by_patient.items()} == {"10001": 14, "10002": 22}
        assert {v[1] for v in by_patient.values()} == {"train", "test"}
        for source, _ in rows:
            arr = open_cache(ws.cache_dir / source.cache_file)
            assert 0.0 <= arr["image"].min() < 0.1 and arr["image"].max() > 0.9
            assert set(np.unique(arr["mask"])) <= set(range(8))
            assert source.units == "display" and source.spacing is None


def test_totalseg_cta_in_hu(ws, tmp_path):
    src = shared_dataset("totalseg-cta")
    report = ingest(ws, src, IngestConfig(size=64, split=(1.0, 0.0, 0.0), min_foreground=0.0))
    assert report.format == "mmwhs" and report.added_slices == 164
    with read_session(ws.engine) as s:
        source = s.scalars(select(Source)).one()
        assert source.units == "HU" and source.original_shape == [120, 126, 164]
        assert source.original_spacing == pytest.approx([1.5, 1.5, 1.5])
        assert source.spacing == pytest.approx([126 * 1.5 / 64, 126 * 1.5 / 64, 1.5])
        arr = open_cache(ws.cache_dir / source.cache_file)
    # range -1078..3343 HU: clipped at both ends of the default window
    assert arr["image"].min() == 0.0 and arr["image"].max() == 1.0
    hu = unit_to_hu(arr["image"], (source.window_lo, source.window_hi))
    heart = arr["mask"] == 1
    assert 100 < np.median(hu[heart]) < 600  # contrast-enhanced blood pool
    # the original volume's heart, for comparison
    img = nib.as_closest_canonical(nib.load(src / "cta_0001_image.nii.gz"))
    lab = nib.as_closest_canonical(nib.load(src / "cta_0001_label.nii.gz"))
    ref = np.median(np.asanyarray(img.dataobj)[np.asanyarray(lab.dataobj) == 1])
    assert abs(np.median(hu[heart]) - ref) < 40


def test_totalseg_heart_only_keeps_heart_slices(ws, tmp_path):
    src = shared_dataset("totalseg-cta")
    labels = tmp_path / "heart.json"
    labels.write_text('{"background": 0, "heart": 1}')
    report = ingest(
        ws,
        src,
        IngestConfig(
            size=64,
            split=(1.0, 0.0, 0.0),
            min_foreground=1e-9,
            labels_file=str(labels),
            ignore_unknown_labels=True,
        ),
    )
    assert report.added_slices == 85  # the heart is on 85 of 164 axial slices (data README)
