"""`pipeline generate`, `filter --batch` and `evaluate`: provenance, resumability, gates."""

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from pipeline.augment import deform_mask
from pipeline.catalog import CandidateBatch, Slice, read_session
from pipeline.generate import GenerateConfig, source_masks
from pipeline.preprocess import ras_to_display
from pipeline.workspace import open_workspace
from tests.conftest import copy_workspace, indexed_workspace, run, thin_vessel

# At 32² different phantom patients already score SSIM ≈ 0.99 against each other, so a
# fifth of good candidates land above the calibrated threshold; the flagged-fraction gate is
# loosened here and judged on the 64² demo instead.
GATES_FAST = ("--features", "encoder", "--encoder-steps", 20, "--max-flagged", 0.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 32² phantom workspace (8 patients: 4 trained on, 4 held out — the anatomy model needs
    4) with an index, a trained tiny run and a 1-step one."""
    root = tmp_path_factory.mktemp("gen")
    ws = indexed_workspace(root, volumes=8, seed=5, slices=16)
    tiny = ("--preset", "tiny", "--size", 32, "--batch", 16, "--eval-every", 1000)
    good = run("train", "-w", ws, *tiny, "--steps", 400, "--run", "good", "--precision", "float32")
    assert good.exit_code == 0, good.stderr
    bad = run("train", "-w", ws, *tiny, "--steps", 1, "--run", "untrained")
    assert bad.exit_code == 0, bad.stderr
    return ws


@pytest.fixture
def ws(trained, tmp_path):
    return copy_workspace(trained, tmp_path)


def test_deform_mask_preserves_labels_and_records_parameters():
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:44] = 1
    mask[26:34, 26:38] = 2
    mask[44:52, 30:36] = 5
    names = tuple(f"c{i}" for i in range(8))
    kw = {"class_names": names, "alpha": 0.04, "degrees": 12, "scale": 0.1, "shift": 0.05}
    a, pa = deform_mask(mask, np.random.default_rng(7), drop=0.0, **kw)
    b, pb = deform_mask(mask, np.random.default_rng(7), drop=0.0, **kw)
    assert np.array_equal(a, b) and pa == pb
    assert set(np.unique(a)) <= {0, 1, 2, 5} and not np.array_equal(a, mask)
    assert set(pa) == {"elastic", "affine", "dropped"} and pa["dropped"] == []
    json.dumps(pa)  # recordable
    dropped, pd = deform_mask(mask, np.random.default_rng(7), drop=1.0, **kw)
    kept = {int(c) for c in np.unique(dropped)} - {0}
    assert len(kept) == 1 and len(pd["dropped"]) == 2  # all but one structure removed
    assert all(name in names for name in pd["dropped"])


def test_deform_mask_keeps_a_thin_vessel_whole():
    """Label shares, not nearest neighbour: over 40 seeds a 2-px vessel stays one piece and keeps
    its area (nearest neighbour broke it in two once in 40 and drifted more)."""
    from scipy import ndimage

    _, mask = thin_vessel()
    names = tuple(f"c{i}" for i in range(8))
    kw = {"class_names": names, "alpha": 0.03, "degrees": 12, "scale": 0.1, "shift": 0.05}
    area = []
    for seed in range(40):
        out, _ = deform_mask(mask, np.random.default_rng(seed), drop=0.0, **kw)
        assert ndimage.label(out == 7, structure=np.ones((3, 3)))[1] == 1, seed
        area.append((out == 7).sum() / (mask == 7).sum())
    assert 0.9 < np.mean(area) < 1.1 and np.std(area) < 0.125


def _rows(ws, batch):
    w = open_workspace(ws, create=False)
    with read_session(w.engine) as s:
        b = s.scalar(select(CandidateBatch).where(CandidateBatch.name == batch))
        rows = [
            {
                "name": c.name,
                "source": c.mask_source,
                "slice": c.source_slice_id,
                "transform": c.transform,
                "flagged": c.flagged,
                "score": c.privacy_score,
                "split": None,
            }
            for c in b.candidates
        ]
        info = {
            "gates_passed": b.gates_passed,
            "privacy": b.privacy,
            "units": b.units,
            "gates": b.gates,
        }
        from pipeline.slices import slice_refs

        splits = {r.slice_id: r.split for r in slice_refs(s)}
        spacing = {c.name: c.spacing for c in b.candidates}
        assert s.scalar(select(Slice).limit(1)) is not None
    w.close()
    for r in rows:
        r["split"] = splits.get(r["slice"])
    return rows, info, spacing


@pytest.mark.numerics
def test_generate_provenance_files_determinism_and_resume(ws):
    result = run("generate", "-w", ws, "--run", "good", "--count", 10, "--batch-name", "b1")
    assert result.exit_code == 0, result.stderr
    assert "10 generated" in result.stdout
    folder = Path(ws) / "candidates" / "b1"
    rows, info, spacing = _rows(ws, "b1")
    assert len(rows) == 10 and info["units"] == "HU" and info["gates_passed"] is None
    # the default source: anatomy drawn from the shape model, no source slice; provenance
    # names the model (its file in the run's folder, by hash) and the seed
    assert all(r["source"] == "synthetic" and r["slice"] is None for r in rows)
    digests = {r["transform"]["anatomy_model_sha256"] for r in rows}
    (model_file,) = (Path(ws) / "runs" / "good").glob("anatomy-*.npz")
    assert digests == {hashlib.sha256(model_file.read_bytes()).hexdigest()}
    picture = Image.open(model_file.with_suffix(".png"))  # real beside synthetic, 3 planes
    assert picture.size[0] > picture.size[1] > 0
    assert [r["transform"]["seed"] for r in rows] == [[0, i] for i in range(10)]
    assert all(r["transform"]["margin"] <= 0 for r in rows)  # no training patient's own
    assert "anatomy model: 4 training patients" in result.stderr
    assert "a shape model of 4 training patients points at them" in result.stderr
    img = nib.load(folder / "images" / "cand_00000.nii.gz")
    msk = nib.load(folder / "masks" / "cand_00000.nii.gz")
    assert img.get_data_dtype() == np.int16 and img.shape == (32, 32, 1)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), spacing["cand_00000"], rtol=1e-5)
    hu = np.asanyarray(img.dataobj)
    assert hu.min() >= -1024 and hu.max() <= 2048 and hu.std() > 50
    assert set(np.unique(np.asanyarray(msk.dataobj))) <= set(range(8))
    for suffix in ("", "_overlay"):
        assert Image.open(folder / "previews" / f"cand_00000{suffix}.png").size == (32, 32)
    # previews in the cardiac window (level 200, width 700 HU), as batch.json says
    batch_json = json.loads((folder / "batch.json").read_text())
    assert batch_json["previews"] == "cardiac window 200/700 HU"
    shown = np.asarray(Image.open(folder / "previews" / "cand_00000.png"), np.float64)
    expected = np.clip((ras_to_display(hu)[0] - (200 - 350)) / 700, 0, 1) * 255
    assert np.abs(shown - expected).max() <= 1.0
    first = {p.name: p.read_bytes() for p in (folder / "images").iterdir()}

    # resumable: asking for 16 fills in 6, leaves the first 10 untouched
    more = run("generate", "-w", ws, "--run", "good", "--count", 16, "--batch-name", "b1")
    assert more.exit_code == 0 and "6 generated, 10 already there" in more.stdout
    assert all((folder / "images" / n).read_bytes() == b for n, b in first.items())
    # deterministic: the same seed in another batch gives the same voxels
    run("generate", "-w", ws, "--run", "good", "--count", 3, "--batch-name", "b2")
    for i in range(3):
        a = nib.load(folder / "images" / f"cand_{i:05d}.nii.gz").get_fdata()
        b = nib.load(Path(ws) / "candidates" / "b2" / "images" / f"cand_{i:05d}.nii.gz")
        assert np.array_equal(a, b.get_fdata())
    clash = run("generate", "-w", ws, "--run", "good", "--batch-name", "b1", "--seed", 9)
    assert clash.exit_code == 2 and "exists with other settings (seed)" in clash.stderr


def test_a_model_file_written_by_other_code_is_fitted_again_not_read(ws, monkeypatch):
    """The anatomy model is kept in the run's folder under a key of its inputs. A file that
    code of another format wrote under the same inputs (3-D moments: nine numbers per
    structure, read by this code as five) was read back, and the first draw crashed. The
    key carries MODEL_FORMAT, so such a file is not this code's and the model is fitted
    again."""
    import pipeline.generate as generate
    from pipeline.anatomy import MODEL_FORMAT, sample_anatomy
    from pipeline.labels import LabelSchema

    schema = LabelSchema.mmwhs()
    w = open_workspace(ws)
    try:
        monkeypatch.setattr(generate, "MODEL_FORMAT", MODEL_FORMAT - 1)
        old, old_path = generate.anatomy_model(w, "good", schema, 32)
        other = dataclasses.replace(
            old,
            moment_structures=np.array([0]),
            moment_mean=np.zeros(9),
            moment_cov=np.eye(9),
            moment_template=np.zeros((1, 9)),
        )
        old_path.write_bytes(other.to_bytes())
        monkeypatch.setattr(generate, "MODEL_FORMAT", MODEL_FORMAT)
        model, path = generate.anatomy_model(w, "good", schema, 32)
    finally:
        w.close()
    assert path != old_path and path.exists() and old_path.exists()
    assert len(model.moment_structures) == 0
    myo, lv = generate.shell_classes(schema)
    assert sample_anatomy(model, [0, 0], myo=myo, lv=lv).labels.any()


@pytest.mark.numerics
def test_generation_on_another_cpu_family_is_within_one_hu(ws):
    """What the README promises across machines: the same generator, seed and index give voxels
    within 1 HU on AVX-512 and AVX2 kernels (float32 rounding differs; int16 HU hides most)."""
    import os
    import subprocess
    import sys

    assert (
        run("generate", "-w", ws, "--run", "good", "--count", 20, "--batch-name", "here").exit_code
        == 0
    )
    other = "ALL" if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2" else "AVX2"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": other, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = ["generate", "-w", ws, "--run", "good", "--count", 20, "--batch-name", "there"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    worst, differing = 0.0, 0
    for i in range(20):
        a = nib.load(Path(ws) / "candidates" / "here" / "images" / f"cand_{i:05d}.nii.gz")
        b = nib.load(Path(ws) / "candidates" / "there" / "images" / f"cand_{i:05d}.nii.gz")
        diff = np.abs(np.asanyarray(a.dataobj).astype(int) - np.asanyarray(b.dataobj).astype(int))
        worst, differing = max(worst, diff.max()), differing + int((diff > 0).sum())
    print(f"ISA {other} vs this process: max |ΔHU| {worst}, {differing} voxels of {20 * 32 * 32}")
    assert worst <= 1


def test_generate_from_heldout_and_user_masks(ws, tmp_path):
    aug = run("generate", "-w", ws, "--run", "good", "--masks", "augmented", "--count", 3)
    assert aug.exit_code == 0, aug.stderr
    rows, _, _ = _rows(ws, "good-augmented")
    assert all(r["source"] == "augmented" and r["split"] == "train" for r in rows)
    assert all({"elastic", "affine", "dropped"} <= set(r["transform"]) for r in rows)
    held = run("generate", "-w", ws, "--run", "good", "--masks", "heldout", "--count", 4)
    assert held.exit_code == 0, held.stderr
    rows, _, _ = _rows(ws, "good-heldout")
    assert len(rows) == 4 and {r["split"] for r in rows} == {"test"}

    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((48, 48, 1), np.int16)
    m[10:30, 12:30] = 205  # MM-WHS codes, as the run's schema has them
    m[16:24, 18:24] = 500
    nib.save(nib.Nifti1Image(m, np.diag([0.8, 0.8, 2.0, 1.0])), masks / "mine.nii.gz")
    user = run("generate", "-w", ws, "--run", "good", "--masks", masks, "--count", 5)
    assert user.exit_code == 0, user.stderr
    assert "1 masks in" in user.stderr  # asked for 5, one mask given
    rows, _, _ = _rows(ws, "good-dir")
    assert [r["source"] for r in rows] == ["file"]
    out = nib.load(Path(ws) / "candidates" / "good-dir" / "masks" / "cand_00000.nii.gz")
    assert set(np.unique(np.asanyarray(out.dataobj))) == {0, 1, 3}  # class indices

    np.testing.assert_allclose(out.header.get_zooms(), [0.8 * 48 / 32, 0.8 * 48 / 32, 2.0])
    m[0, 0] = 77
    nib.save(nib.Nifti1Image(m, np.diag([0.8, 0.8, 2.0, 1.0])), masks / "mine.nii.gz")
    bad = run("generate", "-w", ws, "--run", "good", "--masks", masks, "--batch-name", "x")
    assert bad.exit_code == 2 and "mine.nii.gz" in bad.stderr and "77" in bad.stderr
    assert not (Path(ws) / "candidates" / "x").exists()
    missing = run("generate", "-w", ws, "--run", "nope")
    assert missing.exit_code == 2 and "no trained run 'nope'" in missing.stderr


def _atlas(root: Path, *, seed: int, volumes: int = 6, zoom: float = 1.0) -> Path:
    """``root/ws``: phantom people (64² × 16, ingested at 32², every one in the train split)
    as a workspace of label volumes from outside; ``zoom`` scales their voxel size."""
    from pipeline.phantom import write_phantom

    write_phantom(root / "src", volumes=volumes, seed=seed, size=64, n_slices=16, workers=1)
    if zoom != 1.0:
        for f in (root / "src").glob("*.nii.gz"):
            img = nib.load(f)
            affine = img.affine @ np.diag([zoom, zoom, 1.0, 1.0])
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header), f)
    ingest = run("ingest", root / "src", "-w", root / "ws", "--size", 32, "--split", "1,0,0")
    assert ingest.exit_code == 0, ingest.stderr
    return root / "ws"


def test_anatomy_from_people_outside_the_training_set(ws, tmp_path):
    """``--anatomy-from``: the synthetic masks' shape model fitted on a workspace of people from
    outside the training set (a model of few training patients points at them: on 12 + 12 the
    mask-share AUC read 0.64–0.73, a model of 12 outsiders 0.34–0.56). Provenance says so;
    a workspace that is not one, is this one, holds one of its patients, has another field of
    view, or comes with another mask source is refused in one line with nothing written."""
    atlas = _atlas(tmp_path / "atlas", seed=91)
    made = run("generate", "-w", ws, "--run", "good", "--count", 4, "--anatomy-from", atlas)
    assert made.exit_code == 0, made.stderr
    assert "anatomy model: 6 people outside the training set" in made.stderr
    assert "points at them" not in made.stderr
    rows, _, _ = _rows(ws, "good-synthetic")
    assert all(r["transform"]["anatomy_people"] == "outside the training set" for r in rows)
    assert _configs(ws)["good-synthetic"]["anatomy_people"] == {
        "who": "outside the training set",
        "patients": 6,
    }
    from pipeline.anatomy import load_model

    digest = rows[0]["transform"]["anatomy_model_sha256"]
    (model_file,) = [
        f
        for f in (Path(ws) / "runs" / "good").glob("anatomy-*.npz")
        if hashlib.sha256(f.read_bytes()).hexdigest() == digest
    ]
    model = load_model(model_file)
    # fitted on the atlas's six people, not the run's four training patients
    from pipeline.workspace import open_workspace as _open

    w = _open(atlas, create=False)
    try:
        from pipeline.generate import training_volumes
        from pipeline.slices import load_slices, planar_files, workspace_refs

        refs = workspace_refs(w)
        _, masks = load_slices(w, refs, 32)
        theirs = training_volumes(refs, masks, planar_files(w))[0]
    finally:
        w.close()
    assert model.config["patients"] == 6 and len(model.train) == len(theirs)
    before = sorted((Path(ws) / "runs" / "good").glob("anatomy-*"))

    def refused(*args: object, batch: str) -> str:
        out = run("generate", "-w", ws, "--run", "good", "--count", 2, "--batch-name", batch,
                  *args)  # fmt: skip
        assert out.exit_code == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not (Path(ws) / "candidates" / batch).exists()
        assert sorted((Path(ws) / "runs" / "good").glob("anatomy-*")) == before
        return out.stderr

    assert "no workspace here" in refused("--anatomy-from", tmp_path / "nope", batch="a")
    assert "is this workspace" in refused("--anatomy-from", ws, batch="b")
    ours = _atlas(tmp_path / "ours", seed=5, volumes=4)  # the run's own phantom: its first four
    assert "whose label volume is this workspace's patient" in refused(
        "--anatomy-from", ours, batch="c"
    )
    wide = _atlas(tmp_path / "wide", seed=91, zoom=1.5)
    assert "field of view (570 mm)" in refused("--anatomy-from", wide, batch="d")
    assert "not for --masks augmented" in refused(
        "--anatomy-from", atlas, "--masks", "augmented", batch="e"
    )
    empty = tmp_path / "empty"
    _open(empty).close()
    assert "has no labels" in refused("--anatomy-from", empty, batch="f")
    assert set(_configs(ws)).isdisjoint("abcdef")


def test_anatomy_from_people_outside_works_on_2d_slices(tmp_path):
    """PNG sources (2-D, per-slice model): ``--anatomy-from`` a workspace of other people's
    slices fits the model on them, per slice; the same slices ingested again are refused."""
    from pipeline.errors import PipelineError
    from pipeline.generate import synthetic_anatomy
    from pipeline.ingest import IngestConfig, ingest
    from pipeline.labels import MMWHS_LABELS
    from pipeline.phantom import make_volume

    def slices(folder: Path, seeds: range) -> Path:
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        for s in seeds:
            v = make_volume(s, size=64, n_slices=16)
            for z in range(5, 11):
                labels = np.zeros(v.labels[z].shape, np.uint8)
                for i, code in enumerate(list(MMWHS_LABELS.values())[1:]):
                    labels[v.labels[z] == code] = i + 1
                grey = np.clip((v.hu[z] + 1000) / 3000 * 255, 0, 255).astype(np.uint8)
                Image.fromarray(grey).save(folder / "images" / f"p{s}_{z}.png")
                Image.fromarray(labels).save(folder / "masks" / f"p{s}_{z}.png")
        names = {n: i for i, n in enumerate(MMWHS_LABELS)}
        (folder / "labels.json").write_text(json.dumps(names))
        return folder

    def workspace(name: str, src: Path, split: tuple[float, float, float]) -> Path:
        w = open_workspace(tmp_path / name)
        ingest(w, src, IngestConfig(size=32, split=split))
        w.close()
        return tmp_path / name

    ours = slices(tmp_path / "ours", range(8))
    ws = workspace("ws", ours, (0.5, 0.5, 0.0))
    atlas = workspace("atlas", slices(tmp_path / "theirs", range(100, 106)), (1.0, 0.0, 0.0))
    again = workspace("again", ours, (1.0, 0.0, 0.0))
    w = open_workspace(ws, create=False)
    try:
        schema = w.label_schema()
        cfg = GenerateConfig(run="r", anatomy_from=str(atlas))
        model, path = synthetic_anatomy(w, cfg, schema, 32)
        assert model.shape[1] == 1 and model.config["patients"] == 6
        spec = source_masks(w, cfg, schema, 32, anatomy=(model, path))(0)
        assert spec.mask.any() and spec.transform["anatomy_people"] == "outside the training set"
        with pytest.raises(PipelineError, match="whose label volume is this workspace's"):
            synthetic_anatomy(w, GenerateConfig(run="r", anatomy_from=str(again)), schema, 32)
    finally:
        w.close()


def _configs(ws) -> dict:
    """Batch name → its stored generate config."""
    w = open_workspace(ws, create=False)
    try:
        with read_session(w.engine) as s:
            return {b.name: b.config for b in s.scalars(select(CandidateBatch))}
    finally:
        w.close()


def _case_volumes(ws, batch):
    """{case: (images, masks, spacing, zs)} of a volume batch, slices in z order (HU and
    class indices, in display orientation)."""
    rows, _, spacing = _rows(ws, batch)
    folder = Path(ws) / "candidates" / batch
    cases = {}
    for r in sorted(rows, key=lambda r: (r["transform"]["case"], r["transform"]["z"])):
        c = r["transform"]["case"]
        img, msk = (
            ras_to_display(np.asanyarray(nib.load(folder / d / f"{r['name']}.nii.gz").dataobj))[0]
            for d in ("images", "masks")
        )
        cases.setdefault(c, []).append((r["transform"]["z"], img, msk, spacing[r["name"]]))
    return {
        c: (np.stack([v[1] for v in s]), np.stack([v[2] for v in s]), s[0][3], [v[0] for v in s])
        for c, s in cases.items()
    }


def test_generate_volumes_paints_whole_cases_with_their_neighbours(ws, tmp_path):
    """--volumes: --count cases, each every slice of one label volume in z order, painted with
    its neighbours' maps (the run is 2.5-D); resumable by case; held-out cases are the test
    volumes; augmented masks and PNG folders are refused."""
    from models.gan import generate_images
    from pipeline.anatomy import load_model, sample_anatomy
    from pipeline.generate import NOISE_STREAM, shell_classes, typical_depth
    from pipeline.noise import NoiseModel, add_noise
    from pipeline.runs import find_run, load_generator
    from pipeline.slices import load_slices, volume_neighbours, volume_rows, workspace_refs

    out = run("generate", "-w", ws, "--run", "good", "--volumes", "--count", 2, "--batch-name", "v")
    assert out.exit_code == 0, out.stderr
    w = open_workspace(ws, create=False)
    depth = typical_depth(w)
    assert f"batch v: 2 volumes, {2 * depth} candidates" in out.stdout
    cases = _case_volumes(ws, "v")
    assert sorted(cases) == [0, 1]
    trained = find_run(w, "good")
    cfg = trained.model
    assert cfg.neighbours == 1
    generator = load_generator(trained.generator_path, trained.generator_sha256)
    for _, masks, spacing, zs in cases.values():
        assert zs == list(range(depth)) and masks.any()
        # neighbouring label maps overlap: a volume, not loose slices
        both = [(a > 0) & (b > 0) for a, b in itertools.pairwise(masks)]
        assert np.mean([x.sum() > 0 for x in both]) > 0.8
        assert spacing[2] > 0
    # the written slices are what the generator paints from the volume's own neighbours
    images, masks, _, _ = cases[0]
    lo, hi = trained.units[1]
    rows, _, _ = _rows(ws, "v")
    (model_file,) = (Path(ws) / "runs" / "good").glob("anatomy-*.npz")
    bodies = [r for r in rows if r["transform"]["case"] == 0]
    assert all(b["transform"]["body"] == "synthetic" for b in bodies)
    # every slice knows its case's depth: export releases a case only when all of it is there
    assert [b["transform"]["depth"] for b in bodies] == [depth] * depth
    model = load_model(model_file)
    myo, lv = shell_classes(trained.schema)
    sample = sample_anatomy(model, [0, 0], myo=myo, lv=lv)
    labels, body = model.place(sample.maps, cfg.size, depth=depth)
    np.testing.assert_array_equal(labels, masks)
    painted = generate_images(
        generator, labels, cfg, bodies=body, neighbours=volume_neighbours(labels, 1)
    )
    # each slice carries its own draw of the run's scanner noise, fitted on the training
    # volumes and kept in the run's folder; without it the slices are the painting itself
    (noise_file,) = (Path(ws) / "runs" / "good").glob("noise-*.json")
    noise = NoiseModel.from_dict(json.loads(noise_file.read_text()))
    # (this 32² run's paintings already flicker as much as the real slices differ: sd 0)
    assert 0 <= noise.sd < 0.03 and noise.ks_with <= noise.ks_without and noise.volumes == 4
    assert "scanner noise per slice" in out.stderr
    batch_json = json.loads((Path(ws) / "candidates" / "v" / "batch.json").read_text())
    recorded = batch_json["config"]["noise_model"]
    assert NoiseModel.from_dict(recorded) == noise
    assert recorded["sd_source_units"] == pytest.approx(noise.sd * (hi - lo))

    def drawn(model: NoiseModel) -> np.ndarray:
        rngs = [np.random.default_rng([0, z, NOISE_STREAM]) for z in range(len(painted))]
        return np.stack([add_noise(p, model, r) for p, r in zip(painted, rngs, strict=True)])

    assert np.abs(drawn(noise) * (hi - lo) + lo - images).max() <= 1.0
    # the kept model is what later batches use: a louder one is drawn slice by slice
    loud = dataclasses.replace(noise, sd=0.01)
    noise_file.write_text(json.dumps(loud.to_dict()))
    out = run(
        "generate", "-w", ws, "--run", "good", "--volumes", "--count", 1, "--batch-name", "loud"
    )
    assert out.exit_code == 0 and f"sd {0.01 * (hi - lo):.1f} HU" in out.stderr, out.stderr
    noisy = _case_volumes(ws, "loud")[0][0]
    assert np.abs(drawn(loud) * (hi - lo) + lo - noisy).max() <= 1.0
    assert np.abs(painted * (hi - lo) + lo - noisy).mean() > 0.5 * loud.sd * (hi - lo)
    bare = run(
        "generate",
        "-w",
        ws,
        "--run",
        "good",
        "--volumes",
        "--count",
        1,
        "--noise",
        "off",
        "--batch-name",
        "bare",
    )
    assert bare.exit_code == 0 and "scanner noise" not in bare.stderr
    assert np.abs(painted * (hi - lo) + lo - _case_volumes(ws, "bare")[0][0]).max() <= 1.0
    noise_file.write_text(json.dumps(noise.to_dict()))
    blind = generate_images(
        generator,
        labels,
        cfg,
        bodies=body,
        neighbours=np.zeros((depth, 2, *labels.shape[1:]), np.uint8),
    )
    assert np.abs(blind * (hi - lo) + lo - images).max() > 1.0  # the neighbours were used

    more = run(
        "generate", "-w", ws, "--run", "good", "--volumes", "--count", 3, "--batch-name", "v"
    )
    assert more.exit_code == 0 and f"{depth} generated, {2 * depth} already there" in more.stdout
    clash = run("generate", "-w", ws, "--run", "good", "--count", 3, "--batch-name", "v")
    assert clash.exit_code == 2 and "volumes" in clash.stderr

    held = run("generate", "-w", ws, "--run", "good", "--masks", "heldout", "--volumes")
    assert held.exit_code == 0, held.stderr
    refs = workspace_refs(w, ["test"])
    groups = volume_rows(refs, set())
    assert f"only {len(groups)} volumes" in held.stderr
    cases = _case_volumes(ws, "good-heldout")
    held_rows, _, _ = _rows(ws, "good-heldout")
    assert all(r["transform"]["depth"] == len(groups[r["transform"]["case"]]) for r in held_rows)
    for c, g in enumerate(groups):
        _, real_masks = load_slices(w, [refs[j] for j in g], cfg.size)
        np.testing.assert_array_equal(cases[c][1], real_masks)
    w.close()

    aug = run("generate", "-w", ws, "--run", "good", "--masks", "augmented", "--volumes")
    assert aug.exit_code == 2 and "not volumes" in aug.stderr
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    m = np.zeros((32, 32), np.uint8)
    m[8:20, 8:20] = 205
    Image.fromarray(m).save(pngs / "a.png")
    flat = run("generate", "-w", ws, "--run", "good", "--masks", pngs, "--volumes")
    assert flat.exit_code == 2 and "NIfTI label volumes" in flat.stderr
    assert not (Path(ws) / "candidates" / "good-dir").exists()


@pytest.mark.slow
def test_filter_and_gates_pass_trained_and_fail_untrained(ws):
    aug = ("--masks", "augmented")
    # deformed bodies (issue 24) are turned and scaled with their hearts: 24 of them sit
    # further from the real held-out slices (Fréchet ratio 2.3) than bodies the generator
    # copied from its training people did (2.0), and none is flagged (7 before)
    loose = ("--max-fd-ratio", 2.6)
    good = run(
        "generate", "-w", ws, "--run", "good", "--count", 24, *aug, "--filter", *GATES_FAST, *loose
    )
    assert good.exit_code == 0, good.stdout + good.stderr
    # 4 + 4 patients: the membership audit says it cannot judge, and why (no gate)
    assert "membership audit not testable: 4 training and 4 held-out" in good.stdout
    assert "gates passed" in good.stdout and "[encoder-128d-" in good.stdout
    rows, info, _ = _rows(ws, "good-augmented")
    assert info["gates_passed"] is True
    assert all(r["flagged"] is not None and r["score"] is not None for r in rows)
    assert info["privacy"]["count"] == 24
    # the label maps are checked too; on the phantom the check says it cannot tell a deformed
    # copy from a different person (its people are near-identical), rather than pass silently
    checked = info["privacy"]["masks"]
    assert checked["checked"] and checked["indistinct"] and "label maps: " in good.stdout
    audit = info["privacy"]["memorisation"]  # reported with the batch, read with its mask source
    assert audit["candidates"] == 24 and audit["masks_from_training"] is True
    assert 0.0 <= audit["share_closer_to_training"] <= 1.0 and audit["p_value"] is None
    assert "memorisation test not testable: 4 training and 4 held-out" in audit["note"]
    report = Path(ws) / "candidates" / "good-augmented" / "report"
    for f in ("metrics.json", "ssim_hist.png", "privacy_hist.png", "examples.png"):
        assert (report / f).stat().st_size > 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["membership"]["testable"] is False
    assert "max_membership_auc" not in {g["gate"] for g in info["gates"]["results"]}
    assert metrics["distribution"]["feature_space"].startswith("encoder-128d-")
    dist = metrics["distribution"]
    assert set(dist["prdc_k5"]) == set(dist["prdc_k5_baseline"]) == {
        "precision", "recall", "density", "coverage"
    }  # fmt: skip
    assert 0 < dist["n_matched"] <= dist["n_candidates"]
    assert "KID" in good.stdout and f"{dist['n_matched']} candidates vs" in good.stdout
    contrast = metrics["heart"]["contrast_over_myocardium"]  # with how far it can be read
    assert contrast["ratio_ci95"] and set(contrast["ratio_ci95"]) <= set(contrast["ratio"])
    assert all(v is None or v[0] <= v[1] for v in contrast["ratio_ci95"].values())
    assert "95% bootstrap interval over images" in good.stdout

    # the default source on 4 training patients: the anatomy is a blend of those four, and
    # the images land nearer them than the held-out people (measured: 22 of 24), but 4 + 4
    # patients are too few for the patient-level memorisation test: said, not gated
    synth = run("generate", "-w", ws, "--run", "good", "--count", 24, "--filter", *GATES_FAST)
    _, info, _ = _rows(ws, "good-synthetic")
    gates = {g["gate"]: g for g in info["gates"]["results"]}
    audit = info["privacy"]["memorisation"]
    assert audit["mask_source"] == "synthetic" and "max_memorisation_share" not in gates
    assert audit["p_value"] is None and "memorisation test not testable" in synth.stdout

    bad = run(
        "generate", "-w", ws, "--run", "untrained", "--count", 24, *aug, "--filter", *GATES_FAST
    )
    assert bad.exit_code == 1 and "quality gates failed" in bad.stderr
    assert "min_heart_ssim" in bad.stderr  # the heart region is the default fidelity gate
    _, info, _ = _rows(ws, "untrained-augmented")
    assert info["gates_passed"] is False

    # evaluate on its own, JSON, pixel features; the untrained run fails the SSIM gate
    ev = run("evaluate", "-w", ws, "--run", "untrained", "--features", "pixel", "--json")
    assert ev.exit_code == 1
    result = json.loads(ev.stdout)
    assert result["distribution"]["feature_space"] == "pixel-32x32"
    assert not result["gates"]["passed"]


def test_evaluate_measures_a_volume_batch_through_the_plane(ws):
    """Issue 25, item 2: a volume batch's evaluation adds the through-plane figures —
    adjacent-slice agreement inside the body and per structure (KS, W1 in HU) and the three
    planes' distribution distances with the off-plane/axial ratios, each beside its
    size-matched real-vs-real baseline — to metrics.json, the command line, a figure, and the
    gate record a release's datasheet copies. A slice batch has none."""
    out = run(
        "generate", "-w", ws, "--run", "good", "--volumes", "--count", 4, "--batch-name", "v",
        "--filter", *GATES_FAST,
    )  # fmt: skip
    assert out.exit_code in (0, 1), out.stderr
    report = Path(ws) / "candidates" / "v" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    tp = metrics["through_plane"]
    assert tp["volumes_synthetic"] == 4 and tp["volumes_real"] >= 2
    body = tp["adjacent"]["regions"]["body"]
    for key in ("ks", "ks_base", "w1", "w1_base"):
        assert np.isfinite(body[key]) and body[key] >= 0
    assert body["median_synthetic"] > 0 and body["median_real"] > 0
    assert tp["adjacent"]["n_matched"] >= 2
    planes = tp["planes"]["planes"]
    assert set(planes) == {"axial", "coronal", "sagittal"}
    for figures in planes.values():
        assert figures["slices_synthetic"] > 0 and figures["frechet_baseline"] > 0
    ratios = tp["planes"]["off_plane_over_axial"]
    assert set(ratios["vs_baseline"]) == set(ratios["raw"]) == {"coronal", "sagittal"}
    assert "through the plane" in out.stdout and "adjacent-slice |Δ| inside the body" in out.stdout
    assert "off-plane/axial" in out.stdout
    assert (report / "through_plane.png").stat().st_size > 1000
    _, info, _ = _rows(ws, "v")
    assert info["gates"]["metrics"]["through_plane"]["volumes_synthetic"] == 4

    loose = run("generate", "-w", ws, "--run", "good", "--count", 8, "--filter", *GATES_FAST)
    assert loose.exit_code in (0, 1), loose.stderr
    flat = json.loads((Path(ws) / "candidates" / "good-synthetic" / "report" / "metrics.json")
                      .read_text())  # fmt: skip
    assert flat["through_plane"] is None and "through the plane" not in loose.stdout


def test_filter_batch_usage(ws):
    both = run("filter", "-w", ws)
    assert both.exit_code == 2 and "exactly one of --images" in both.stderr
    missing = run("filter", "-w", ws, "--batch", "nope")
    assert missing.exit_code == 2 and "no candidate batch 'nope'" in missing.stderr


@pytest.mark.slow
def test_true_fid_only_from_a_local_weights_file(tmp_path):
    """InceptionV3 weights are never downloaded: a local file (here randomly initialised and
    saved) gives a finite FID, a missing one a clear error."""
    import keras

    from pipeline.errors import PipelineError
    from pipeline.quality import inception_fid

    keras.utils.set_random_seed(0)
    model = keras.applications.InceptionV3(include_top=False, pooling="avg", weights=None)
    weights = tmp_path / "inception.weights.h5"
    model.save_weights(weights)
    rng = np.random.default_rng(0)
    # few images (2048-d features are rank-deficient at any n a unit test can afford); most of
    # this test's ~80 s on two cores is building InceptionV3 three times, not these images
    real = rng.random((5, 32, 32)).astype(np.float32)
    yy = np.linspace(0, 1, 32, dtype=np.float32)
    fake = np.stack([np.outer(yy, yy) * (0.3 + 0.05 * i) for i in range(5)])  # smooth ramps
    fid = inception_fid(real, fake, weights)
    assert np.isfinite(fid) and fid > 0
    assert abs(inception_fid(real, real, weights)) < 1e-3 * fid
    with pytest.raises(PipelineError, match="weights file not found"):
        inception_fid(real, fake, tmp_path / "missing.h5")
