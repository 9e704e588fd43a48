"""Every command through click's CliRunner, and every kind of bad input `ingest` must refuse."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import cli
from pipeline.phantom import make_volume, volume_to_nifti
from pipeline.workspace import open_workspace
from tests.conftest import run


def assert_refused(result, *fragments, ws_path=None):
    """Exit 2, one line on stderr containing every fragment, and an untouched catalog."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if ws_path is not None and (ws_path / "catalog.db").exists():
        status = json.loads(run("status", "-w", ws_path, "--json").stdout)
        assert status["volumes"] == 0 and status["slices"] == 0
        assert [p.name for p in (ws_path / "cache").iterdir()] == []


def test_help_for_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for name, command in cli.commands.items():
        assert command.help, name
        sub = run(name, "--help")
        assert sub.exit_code == 0 and "Usage" in sub.stdout


def test_phantom_ingest_status_json(tmp_path):
    src, ws = tmp_path / "ph", tmp_path / "ws"
    result = run("phantom", src, "--volumes", 3, "--size", 32, "--slices", 6)
    assert result.exit_code == 0 and "wrote 3 volume pairs" in result.stdout
    assert (src / "preview.png").exists()
    result = run("ingest", src, "-w", ws, "--size", 32, "--json", "--min-foreground", 0)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["added_slices"] == 18 and report["status"]["volumes"] == 3
    status = json.loads(run("status", "-w", ws, "--json").stdout)
    assert (
        status["splits"]["train"]["patients"]
        + status["splits"]["val"]["patients"]
        + status["splits"]["test"]["patients"]
        == 3
    )
    assert status["label_schema"]["myocardium"] == 205
    text = run("status", "-w", ws)
    assert text.exit_code == 0 and "train" in text.stdout and "myocardium=205" in text.stdout


def test_workspace_from_environment(tmp_path, phantom_dir, monkeypatch):
    monkeypatch.setenv("PIPELINE_WORKSPACE", str(tmp_path / "envws"))
    assert run("ingest", phantom_dir, "--size", 32).exit_code == 0
    assert (tmp_path / "envws" / "catalog.db").exists()
    assert json.loads(run("status", "--json").stdout)["volumes"] == 6


def test_status_without_workspace(tmp_path):
    assert_refused(run("status", "-w", tmp_path / "nope"), "nope", "no workspace")


def test_newer_catalog_refused_by_cli(tmp_path, phantom_dir):
    import sqlite3

    ws = tmp_path / "ws"
    assert run("ingest", phantom_dir, "-w", ws, "--size", 32).exit_code == 0
    con = sqlite3.connect(ws / "catalog.db")
    con.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    con.commit()
    con.close()
    assert_refused(run("status", "-w", ws), "catalog.db", "schema version 999 is newer")


# ----------------------------------------------------------------- bad input, one per case


def nifti_pair(folder, stem, hu, labels, affine=None):
    affine = np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(hu, affine), folder / f"{stem}_image.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / f"{stem}_label.nii.gz")


@pytest.fixture
def good(tmp_path):
    """Two good volumes; tests add one bad thing."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        img, lab = volume_to_nifti(make_volume(i, size=32, n_slices=4))
        nib.save(img, src / f"v{i}_image.nii.gz")
        nib.save(lab, src / f"v{i}_label.nii.gz")
    return src


def ingest_args(src, ws_path, *extra):
    return ("ingest", src, "-w", ws_path, "--size", 32, "--split", "0.34,0.33,0.33", *extra)


def test_missing_folder(tmp_path, ws_path):
    assert_refused(run(*ingest_args(tmp_path / "absent", ws_path)), "absent", "does not exist")
    assert not ws_path.exists()  # a workspace this command would have created is not left behind


def test_same_scan_twice(good, ws_path):
    shutil.copy(good / "v0_image.nii.gz", good / "copy_image.nii.gz")
    shutil.copy(good / "v1_label.nii.gz", good / "copy_label.nii.gz")
    assert_refused(
        run(*ingest_args(good, ws_path)),
        "v0_image.nii.gz",
        "same image data as 'copy'",
        ws_path=ws_path,
    )


def test_renamed_copy_is_recognised(good, ws_path, tmp_path):
    assert run(*ingest_args(good, ws_path)).exit_code == 0
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for k in ("image", "label"):
        shutil.copy(good / f"v0_{k}.nii.gz", renamed / f"other_{k}.nii.gz")
    result = run(*ingest_args(renamed, ws_path, "--split", "1,0,0"))
    assert result.exit_code == 0 and "skipped 1 already ingested" in result.stdout


def test_empty_folder(tmp_path, ws_path):
    (tmp_path / "empty").mkdir()
    assert_refused(
        run(*ingest_args(tmp_path / "empty", ws_path)), "empty", "is empty", ws_path=ws_path
    )


def test_unknown_layout(tmp_path, ws_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hi")
    assert_refused(run(*ingest_args(tmp_path / "odd", ws_path)), "odd", "cannot tell the format")


def test_label_without_image(good, ws_path):
    (good / "v0_image.nii.gz").unlink()
    assert_refused(
        run(*ingest_args(good, ws_path)), "v0_label.nii.gz", "no matching image", ws_path=ws_path
    )


def test_image_without_label(good, ws_path):
    (good / "v1_label.nii.gz").unlink()
    assert_refused(
        run(*ingest_args(good, ws_path)), "v1_image.nii.gz", "no matching label", ws_path=ws_path
    )


def test_truncated_gzip_header(good, ws_path):
    path = good / "v2_label.nii.gz"
    path.write_bytes(path.read_bytes()[:40])
    assert_refused(
        run(*ingest_args(good, ws_path)), "v2_label.nii.gz", "cannot read NIfTI", ws_path=ws_path
    )


def test_truncated_gzip_data(good, ws_path):
    path = good / "v2_image.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    assert_refused(
        run(*ingest_args(good, ws_path)), "v2_image.nii.gz", "corrupt or truncated", ws_path=ws_path
    )


def test_not_a_nifti(good, ws_path):
    (good / "v2_image.nii.gz").write_bytes(b"garbage" * 50)
    assert_refused(
        run(*ingest_args(good, ws_path)), "v2_image.nii.gz", "cannot read NIfTI", ws_path=ws_path
    )


def test_shape_mismatch(good, ws_path):
    nifti_pair(good, "bad", np.zeros((32, 32, 4), np.int16), np.zeros((32, 30, 4), np.int16))
    assert_refused(
        run(*ingest_args(good, ws_path)),
        "bad_label.nii.gz",
        "differs from image shape",
        ws_path=ws_path,
    )


def test_affine_mismatch(good, ws_path):
    nifti_pair(good, "bad", np.zeros((32, 32, 4), np.int16), np.zeros((32, 32, 4), np.int16))
    lab = nib.load(good / "bad_label.nii.gz")
    shifted = lab.affine.copy()
    shifted[0, 3] += 10
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), shifted), good / "bad_label.nii.gz")
    assert_refused(
        run(*ingest_args(good, ws_path)), "bad_label.nii.gz", "affine differs", ws_path=ws_path
    )


def test_non_integer_labels(good, ws_path):
    labels = np.zeros((32, 32, 4), np.float32)
    labels[5, 5, 1] = 204.5
    nifti_pair(good, "bad", np.zeros((32, 32, 4), np.int16), labels)
    assert_refused(
        run(*ingest_args(good, ws_path)), "bad_label.nii.gz", "non-integer", ws_path=ws_path
    )


def test_unknown_label_values_and_ignore_flag(good, ws_path):
    labels = np.zeros((32, 32, 4), np.int16)
    labels[10:20, 10:20, :] = 205
    labels[1:3, 1:3, 0] = 7
    nifti_pair(good, "bad", np.zeros((32, 32, 4), np.int16), labels)
    assert_refused(
        run(*ingest_args(good, ws_path)), "bad_label.nii.gz", "label values 7", ws_path=ws_path
    )
    result = run(*ingest_args(good, ws_path, "--ignore-unknown-labels"))
    assert result.exit_code == 0, result.stderr


def test_four_d_volume(good, ws_path):
    nifti_pair(good, "bad", np.zeros((32, 32, 4, 2), np.int16), np.zeros((32, 32, 4, 2), np.int16))
    assert_refused(
        run(*ingest_args(good, ws_path)), "bad_image.nii.gz", "4-D volume", ws_path=ws_path
    )


def test_duplicate_patient_ids(good, ws_path):
    shutil.copy(good / "v0_image.nii.gz", good / "v0_image.nii")
    assert_refused(
        run(*ingest_args(good, ws_path)),
        "v0_image.nii",
        "duplicate patient id 'v0'",
        ws_path=ws_path,
    )


def test_patient_id_clash_with_catalog(good, ws_path, tmp_path):
    assert run(*ingest_args(good, ws_path)).exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    img, lab = volume_to_nifti(make_volume(50, size=32, n_slices=4))
    nib.save(img, other / "v0_image.nii.gz")
    nib.save(lab, other / "v0_label.nii.gz")
    result = run(*ingest_args(other, ws_path))
    assert result.exit_code == 2 and "patient id 'v0' is already in the catalog" in result.stderr


def test_split_leaving_a_set_empty(good, ws_path):
    assert_refused(
        run("ingest", good, "-w", ws_path, "--size", 32, "--split", "0.2,0.2,0.2"),
        "--split",
        "sum to 1",
    )
    for f in ("v1", "v2"):
        for k in ("image", "label"):
            (good / f"{f}_{k}.nii.gz").unlink()
    assert_refused(
        run("ingest", good, "-w", ws_path, "--size", 32), "leaves val, test empty", ws_path=ws_path
    )


def test_bad_labels_file(good, ws_path, tmp_path):
    bad = tmp_path / "labels.json"
    bad.write_text("{not json")
    assert_refused(
        run(*ingest_args(good, ws_path, "--labels", bad)), "labels.json", "not a readable JSON"
    )


def png_set(root, n=2):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, p in enumerate(("a", "b", "c")):
        for k in range(n):
            image = np.full((24, 24), 100 + 10 * i + k, np.uint8)  # every patient's scan differs
            Image.fromarray(image).save(root / "images" / f"{p}_{k}.png")
            m = np.zeros((24, 24), np.uint8)
            m[5:15, 5:15] = 1
            Image.fromarray(m).save(root / "masks" / f"{p}_{k}.png")
    (root / "labels.json").write_text('{"background": 0, "heart": 1}')
    return root


def test_unreadable_png(tmp_path, ws_path):
    root = png_set(tmp_path / "png")
    (root / "images" / "b_1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    assert_refused(run(*ingest_args(root, ws_path)), "b_1.png", "unreadable PNG", ws_path=ws_path)


def test_png_mask_missing_and_size_mismatch(tmp_path, ws_path):
    root = png_set(tmp_path / "png")
    (root / "masks" / "c_0.png").unlink()
    assert_refused(run(*ingest_args(root, ws_path)), "c_0.png", "no matching mask")
    root2 = png_set(tmp_path / "png2")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root2 / "masks" / "a_1.png")
    assert_refused(
        run(*ingest_args(root2, ws_path)), "a_1.png", "differs from image size", ws_path=ws_path
    )


def test_png_works(tmp_path, ws_path):
    root = png_set(tmp_path / "png")
    result = run(*ingest_args(root, ws_path))
    assert result.exit_code == 0, result.stderr
    assert "display" in result.stdout


def test_bad_window_and_format(good, ws_path):
    assert_refused(run(*ingest_args(good, ws_path, "--window", "100,-100")), "--window")
    result = run(*ingest_args(good, ws_path, "--format", "dicom"))
    assert result.exit_code == 2  # click usage error


@pytest.mark.slow
def test_demo(tmp_path, monkeypatch):
    args = ("demo", "-w", tmp_path / "demo", "--volumes", 8, "--size", 32, "--train-steps", 20)
    args = (*args, "--cases", 2)  # the default 12 is the demo's; two show the same here
    args += ("--candidates", 8, "--encoder-steps", 20, "--utility-steps", 5)
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    assert "train" in result.stdout
    # the demo judges usefulness too: three arms of a segmenter, tested on real patients
    assert "segmenter Dice on " in result.stdout and "TSTR/TRTR" in result.stdout
    assert "(2 paired seeds" in result.stdout  # the demo's budget: 2 seeds (about 50 s less)
    assert "gate min_utility_ratio" in result.stdout
    assert (tmp_path / "demo" / "demo-sources" / "phantom" / "preview.png").exists()
    run_dir = tmp_path / "demo" / "runs" / "demo"
    assert "trained 20 steps" in result.stdout and "tensorboard --logdir" in result.stdout
    assert (run_dir / "generator.keras").exists() and list((run_dir / "samples").glob("*.png"))
    # issue 25, item 5: two whole synthetic volumes, filtered, each shown in three planes
    assert "[6/6] generate 2 synthetic volumes" in result.stdout
    assert "2 cases" in result.stdout and "privacy: " in result.stdout
    planes = sorted((tmp_path / "demo" / "candidates" / "demo-volumes" / "previews").glob("case_*"))
    assert [p.name for p in planes] == ["case_000_planes.png", "case_001_planes.png"]
    started = []
    monkeypatch.setattr("pipeline.cli._exec_review_app", lambda *a: started.append(a))
    again = run(*args, "--auto-review", "--review")  # a second demo continues, not fails
    assert again.exit_code == 0, again.stderr
    # --review: a one-time admin account whose password is printed once, then the app
    assert started == [(tmp_path / "demo", 8501, "127.0.0.1")]
    password = again.stdout.split("demo-physician with password ")[1].split()[0]
    from pipeline.review import login

    w = open_workspace(tmp_path / "demo", create=False)
    assert login(w.engine, "demo-physician", password)["role"] == "admin"
    w.close()
    assert "resumed from step 20" in again.stdout
    # the candidates of the first demo are reused (the generator was not rewritten)
    batch = tmp_path / "demo" / "candidates" / "demo-synthetic"
    assert len(list((batch / "images").glob("*.nii.gz"))) == 8
    assert (batch / "report" / "metrics.json").exists() and "gate max_fd_ratio" in again.stdout
    # 20 training steps fail the quality gates, so the demo export is refused, with the reason
    assert "[demo] export refused: quality gates did not pass" in again.stdout


def test_help_lists_commands_in_the_order_of_the_flow():
    from pipeline.cli import FLOW_ORDER

    text = run("--help").stdout
    listed = [ln.split()[0] for ln in text.split("Commands:")[1].splitlines() if ln.strip()]
    assert listed == list(FLOW_ORDER)
