"""`pipeline index` and `pipeline filter` end to end on small phantoms: copies are caught."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from pipeline.augment import add_noise, hflip, shift
from pipeline.catalog import PrivacyCalibration, read_session
from pipeline.phantom import make_volume
from pipeline.preprocess import centre, unit_to_hu
from pipeline.slices import SliceRef, SliceStore, slice_refs
from pipeline.workspace import open_workspace
from tests.conftest import run


@pytest.fixture
def indexed(phantom_dir, ws_path):
    """Six phantom volumes at 64², split 4/1/1, indexed with calibration."""
    assert (
        run("ingest", phantom_dir, "-w", ws_path, "--size", 64, "--split", "0.6,0.2,0.2").exit_code
        == 0
    )
    result = run("index", "-w", ws_path, "--json")
    assert result.exit_code == 0, result.stderr
    return ws_path, json.loads(result.stdout)


def train_slices(ws_path, n=6):
    ws = open_workspace(ws_path, create=False)
    with read_session(ws.engine) as s:
        refs = [r for r in slice_refs(s) if r.split == "train"]
    picked = refs[:: max(1, len(refs) // n)][:n]
    images = SliceStore(ws.cache_dir, refs).images([r.slice_id for r in picked])
    ws.close()
    return picked, images


def save_nifti_hu(folder, name, unit):
    hu = unit_to_hu(unit).astype(np.int16)[:, :, None]
    nib.save(nib.Nifti1Image(hu.transpose(1, 0, 2)[::-1, ::-1], np.eye(4)), folder / name)


def test_index_manifest_and_calibration(indexed):
    ws_path, manifest = indexed
    assert manifest["count"] == 96 and manifest["index"]["type"] == "flat"
    cal = manifest["calibration"]
    # every patient's slices are in the baseline (leave one patient out), not only val/test's
    assert cal["n_baseline"] == 96 and 0 < cal["threshold"] <= 1 and cal["quantile"] == 0.99
    assert cal["method"] == "leave-one-patient-out" and "baseline" not in cal  # not printed
    stored = json.loads((ws_path / "index" / "manifest.json").read_text())["calibration"]
    assert len(stored["baseline"]) == 96 and len(stored["planted"]["copy"]["ssim"]) == 20
    # six patients cannot bound a new patient's flag rate at 1% (needs 199): said, bounded by
    # conformal risk control at the patient level, 2 (1 + sum of rates) / 7; slice-level 2/97
    assert not cal["certified"] and "6 patients are too few" in cal["note"]
    assert cal["n_patients"] == 6 and cal["bound"] >= 2 / 7 and cal["slice_bound"] == 2 / 97
    # the other tail: planted copies of every kind, scored; the kinds missed are named
    recall = cal["planted_recall"]
    assert set(recall) >= {"copy", "hflip", "blend70/30"} and recall["copy"] == 1.0
    assert cal["indistinct"] == [k for k, r in recall.items() if r < 0.99]
    assert (ws_path / "index" / "calibration.png").exists()
    assert (ws_path / "index" / "faiss.index").exists()
    ws = open_workspace(ws_path, create=False)
    with read_session(ws.engine) as s:
        assert s.scalar(select(func.count()).select_from(PrivacyCalibration)) == 1
    ws.close()


def test_planted_copies_are_flagged_and_new_patients_are_not(indexed, tmp_path):
    ws_path, _ = indexed
    picked, images = train_slices(ws_path)
    planted = tmp_path / "planted"
    planted.mkdir()
    rng = np.random.default_rng(0)
    for i, im in enumerate(images):
        save_nifti_hu(planted, f"copy{i}.nii.gz", im)
        save_nifti_hu(planted, f"flip{i}.nii.gz", hflip(im))
        save_nifti_hu(planted, f"noise{i}.nii.gz", add_noise(im, 0.02, rng))
        save_nifti_hu(planted, f"shift{i}.nii.gz", shift(im, 2, -2))
        # (blends are measured at 256² in bench/privacy.py: at 64² little scan grain survives)
    result = run("filter", "-w", ws_path, "--images", planted, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["summary"]["images"] == 4 * len(images)
    assert out["summary"]["texture_threshold"] is not None
    assert all("texture" in r for r in out["images"])
    missed = [r["name"] for r in out["images"] if not r["flagged"]]
    assert missed == []
    patients = {r.patient for r in picked}
    assert {r["nearest_patient"] for r in out["images"]} <= patients

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    vol = make_volume(4242, size=64, n_slices=16)
    for z in range(0, 16, 2):
        unit = np.clip((vol.hu[z].astype(np.float32) + 1024) / 3072, 0, 1)
        Image.fromarray((unit * 255).astype(np.uint8)).save(fresh / f"new{z}.png")
    result = run("filter", "-w", ws_path, "--images", fresh, "--json")
    out = json.loads(result.stdout)
    assert sum(r["flagged"] for r in out["images"]) <= 1  # a new patient is not a copy
    text = run("filter", "-w", ws_path, "--images", fresh)
    assert text.exit_code == 0 and "flagged" in text.stdout


def test_stale_index_is_refused_then_updated_incrementally(indexed, tmp_path):
    ws_path, _ = indexed
    extra = tmp_path / "extra"
    extra.mkdir()
    from pipeline.phantom import volume_to_nifti

    img, lab = volume_to_nifti(make_volume(77, size=64, n_slices=8))
    nib.save(img, extra / "late_image.nii.gz")
    nib.save(lab, extra / "late_label.nii.gz")
    assert run("ingest", extra, "-w", ws_path, "--size", 64).exit_code == 0
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(images / "a.png")
    result = run("filter", "-w", ws_path, "--images", images)
    assert (
        result.exit_code == 2
        and "stale" in result.stderr
        and "run 'pipeline index'" in result.stderr
    )
    result = run("index", "-w", ws_path, "--json")
    manifest = json.loads(result.stdout)
    assert manifest["count"] == 104 and manifest["reused_embeddings"] == 96
    assert run("filter", "-w", ws_path, "--images", images).exit_code == 0


def test_index_needs_two_patients_or_a_threshold(phantom_dir, ws_path, tmp_path):
    # every patient in training is fine now: each is compared with all the others
    assert (
        run("ingest", phantom_dir, "-w", ws_path, "--size", 64, "--split", "1,0,0").exit_code == 0
    )
    result = run("index", "-w", ws_path)
    assert result.exit_code == 0 and "leave-one-patient-out" in result.stdout, result.stderr
    # one patient has nobody to be different from: a clear line, and --threshold still works
    one = tmp_path / "one"
    one.mkdir()
    for f in ("ct_0001_image.nii.gz", "ct_0001_label.nii.gz"):
        (one / f).write_bytes((phantom_dir / f).read_bytes())
    ws1 = tmp_path / "ws1"
    assert run("ingest", one, "-w", ws1, "--size", 64, "--split", "1,0,0").exit_code == 0
    result = run("index", "-w", ws1)
    assert result.exit_code == 2 and "one patient" in result.stderr
    assert "--threshold" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (ws1 / "index" / "manifest.json").exists()
    result = run("index", "-w", ws1, "--threshold", "0.9")
    assert result.exit_code == 0 and "explicit" in result.stdout


def test_filter_bad_input(indexed, tmp_path):
    ws_path, _ = indexed
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("filter", "-w", ws_path, "--images", empty)
    assert result.exit_code == 2 and "no PNG or NIfTI" in result.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    data = np.zeros((64, 64, 1), np.float32)
    data[3, 3, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), bad / "nan.nii.gz")
    result = run("filter", "-w", ws_path, "--images", bad)
    assert result.exit_code == 2 and "nan.nii.gz" in result.stderr and "NaN" in result.stderr
    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(colour / "c.png")
    result = run("filter", "-w", ws_path, "--images", colour)
    assert result.exit_code == 2 and "c.png" in result.stderr and "colour" in result.stderr
    grey_rgb = tmp_path / "greyrgb"
    grey_rgb.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(grey_rgb / "g.png")
    result = run("filter", "-w", ws_path, "--images", grey_rgb, "--json")
    assert result.exit_code == 0
    assert "RGB PNG of grey values read as one channel" in result.stdout
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.full((100, 100), 50, np.uint8)).save(big / "b.png")
    result = run("filter", "-w", ws_path, "--images", big, "--json")
    assert result.exit_code == 0
    assert "resized to 64x64" in json.loads(result.stdout)["warnings"][0]
    assert run("filter", "-w", tmp_path / "nows", "--images", big).exit_code == 2


def test_filter_without_index(phantom_dir, ws_path, tmp_path):
    assert run("ingest", phantom_dir, "-w", ws_path, "--size", 64).exit_code == 0
    result = run("filter", "-w", ws_path, "--images", tmp_path)
    assert result.exit_code == 2 and "no source index" in result.stderr


def test_centre_undoes_a_shift():
    im = np.zeros((32, 32), np.float32)
    im[10:16, 12:20] = 1.0
    np.testing.assert_array_equal(centre(im), centre(shift(im, 3, -4)))


@pytest.mark.slow
def test_encoder_embedder_trains_saves_and_reloads(phantom_dir, ws_path, tmp_path):
    assert (
        run("ingest", phantom_dir, "-w", ws_path, "--size", 64, "--split", "0.6,0.2,0.2").exit_code
        == 0
    )
    result = run("index", "-w", ws_path, "--embedder", "encoder", "--encoder-steps", 5, "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["embedder"] == "encoder" and manifest["dim"] == 128
    assert (ws_path / "index" / "encoder.weights.h5").exists()
    _, images = train_slices(ws_path, n=2)
    folder = tmp_path / "q"
    folder.mkdir()
    for i, im in enumerate(images):
        save_nifti_hu(folder, f"copy{i}.nii.gz", im)
    out = json.loads(run("filter", "-w", ws_path, "--images", folder, "--json").stdout)
    assert all(r["flagged"] for r in out["images"])


def test_leave_one_patient_out_on_three_patients(phantom_dir, ws_path):
    """Each patient's slices are scored against the other two patients' slices only: the
    same numbers as a brute-force index built without that patient, for every patient."""
    import faiss

    from pipeline.embed import PixelEmbedder
    from pipeline.filtering import FilterConfig, baseline_scores, score_against
    from pipeline.index import embed_refs

    for f in list(phantom_dir.iterdir()):
        if not f.name.startswith(("ct_0001", "ct_0002", "ct_0003")):
            f.unlink()
    assert run("ingest", phantom_dir, "-w", ws_path, "--size", 32).exit_code == 0
    ws = open_workspace(ws_path, create=False)
    with read_session(ws.engine) as s:
        refs = slice_refs(s)
    store = SliceStore(ws.cache_dir, refs)
    embedder = PixelEmbedder()
    vectors = embed_refs(store, refs, embedder)
    cfg = FilterConfig()
    ssim, texture, patients = baseline_scores(vectors, refs, embedder, store, cfg)
    assert len(ssim) == len(refs) == 48 and len({r.patient for r in refs}) == 3
    assert patients.tolist() == [r.patient for r in refs]
    for patient in sorted({r.patient for r in refs}):
        mine = [i for i, r in enumerate(refs) if r.patient == patient]
        others = [i for i, r in enumerate(refs) if r.patient != patient]
        brute = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        brute.add_with_ids(vectors[others], np.array([refs[i].slice_id for i in others]))
        images = store.images([refs[i].slice_id for i in mine])
        s, nearest, _, tex = score_against(
            brute, embedder, store, images, k=cfg.k, max_shift=cfg.max_shift, smooth=cfg.smooth
        )
        np.testing.assert_allclose(ssim[mine], s, atol=1e-12)
        np.testing.assert_allclose(texture[mine], tex, atol=1e-12)
        assert {store.refs[int(n)].patient for n in nearest} <= {refs[i].patient for i in others}
    # a sample, when asked for, is seeded and a subset of the same numbers
    small = baseline_scores(
        vectors, refs, embedder, store, FilterConfig(calibration_max=20, seed=3)
    )
    assert len(small[0]) == 20 and set(np.round(small[0], 12)) <= set(np.round(ssim, 12))
    ws.close()


def test_memorisation_audit_sees_copies_of_training_slices(indexed):
    """Copies of training slices land nearest training patients' slices (the same number of
    slices from every patient); held-out slices themselves lean the other way. With 4 + 2
    patients the patient-level test cannot judge: it says so, with no p-value to gate on."""
    from pipeline.filtering import memorisation_audit
    from pipeline.index import load_index

    ws_path, _ = indexed
    loaded = load_index(open_workspace(ws_path, create=False))
    _, copies = train_slices(ws_path, n=8)
    audit = memorisation_audit(loaded, copies)
    assert audit["candidates"] == 8 and audit["closer_to_training"] >= 7
    assert audit["chance_share"] == pytest.approx(4 / 6)
    assert audit["share_closer_to_training"] > 0.8 and audit["p_value"] is None
    assert "memorisation test not testable: 4 training and 2 held-out" in audit["note"]
    per_patient = {r.patient for r in loaded.refs}
    counts = [sum(r.patient == p for r in loaded.refs) for p in per_patient]
    assert audit["reference_slices_each"] == min(counts)
    held = [r for r in loaded.refs if r.split != "train"][:8]
    other = memorisation_audit(loaded, loaded.store.images([r.slice_id for r in held]))
    assert other["share_closer_to_training"] < 0.5


def _people(n_patients: int, slices: int, size: int = 48) -> tuple[list, np.ndarray]:
    """Label maps of people whose anatomy differs (each its own proportions and layout of
    three structures), a few slices each, varying slowly along the slices."""
    yy, xx = np.mgrid[:size, :size]
    refs, masks = [], []
    for p in range(n_patients):
        rng = np.random.default_rng([11, p])
        shape = rng.uniform([6, 4, 3, -6, -6, 0.4], [14, 10, 7, 6, 6, 2.5])
        for z in range(slices):
            a, b, r, dy, dx, e = shape * (1 + 0.02 * z)
            m = np.zeros((size, size), np.uint8)
            m[((yy - 24) / a) ** 2 + ((xx - 24) / (a / e)) ** 2 < 1] = 1
            m[(yy - 24 - dy) ** 2 + (xx - 24 - dx) ** 2 < b**2] = 2
            m[(yy - 24 + a) ** 2 + (xx - 24) ** 2 < r**2] = 3
            refs.append(SliceRef(len(masks), "f", len(masks), f"p{p}", "train"))
            masks.append(m)
    return refs, np.stack(masks)


class _Store:
    def __init__(self, masks):
        self._masks = masks

    def masks(self, ids):
        return self._masks[list(ids)]


def test_the_mask_check_flags_deformed_copies_where_people_differ():
    """Issue 24, item 2: a candidate's label map against every source label map, calibrated
    leave-one-patient-out against planted deformed copies. Where anatomy differs between
    people the tails separate and a deformed copy of a patient's map is flagged while a new
    person's is not; on the phantom (people near-identical) the check says it cannot tell."""
    from types import SimpleNamespace

    from pipeline.augment import deform_mask
    from pipeline.filtering import FilterConfig, calibrate_masks, check_masks

    refs, masks = _people(8, 4)
    rule = calibrate_masks(_Store(masks), refs, FilterConfig(seed=0))
    assert rule is not None and not rule["indistinct"] and rule["copy_recall"] >= 0.99
    assert rule["copies_median"] > rule["baseline_median"]
    loaded = SimpleNamespace(manifest={"mask_check": rule}, refs=refs, store=_Store(masks))
    kw = {"class_names": tuple("abcd"), "alpha": 0.03, "degrees": 12, "scale": 0.1}
    copies = [
        deform_mask(masks[4 * p + 1], np.random.default_rng([3, p]), drop=0.0, shift=0.05, **kw)[0]
        for p in range(8)
    ]
    strangers = _people(16, 1)[1][8:]  # eight people outside the workspace
    names = [f"copy{p}" for p in range(8)] + [f"new{p}" for p in range(8)]
    flags, summary = check_masks(loaded, np.concatenate([copies, strangers]), names)
    assert sum(flags[:8]) == 8 and sum(flags[8:]) <= 2, summary
    assert summary["flagged"] == sum(flags) and "copy0" in summary["flagged_names"]
    # an index from before the check: said, not silently passed
    old = SimpleNamespace(manifest={}, refs=refs, store=_Store(masks))
    flags, summary = check_masks(old, masks[:2], ["a", "b"])
    assert flags == [False, False] and "run 'pipeline index'" in summary["note"]
