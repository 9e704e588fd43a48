"""Issue 12's attack sweep as tests: names that would leave the workspace, relocation, export and
verify faults, import bounds, CSV formula cells, reviewer names, session checks on every write,
bad input files — and every CLI command with bad input answers with one line and exit 2."""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from pipeline.catalog import Candidate, Decision, Reviewer, Run, read_session, write_session
from pipeline.errors import PipelineError
from pipeline.review import (
    SESSION_IDLE_S,
    add_reviewer,
    authenticate,
    disable_reviewer,
    import_decisions,
    open_session_reviewer,
    record_decision,
    undo_last,
)
from pipeline.validate import csv_cell, csv_uncell, markdown_text, path_name, reviewer_name
from pipeline.workspace import open_workspace
from tests.conftest import copy_workspace, indexed_workspace, run
from tests.test_release import PW, fake_workspace

BAD_NAMES = ["../../x", "/tmp/abs-name", "..", "", "a/b", "x" * 300, ".hidden", "a\nb", "-rf"]


AUGMENTED = ("--masks", "augmented")  # 2 training patients: too few for synthetic anatomy


def one_line_exit_2(result) -> None:
    """The CLI's promise for bad input: exit 2 and exactly one line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 32² phantom workspace with an index and a 2-step tiny run 'r'."""
    root = tmp_path_factory.mktemp("hard")
    ws = indexed_workspace(root, volumes=4, seed=4, slices=12)
    tiny = ("--preset", "tiny", "--size", 32, "--batch", 8, "--steps", 2)
    result = run("train", "-w", ws, *tiny, "--run", "r")
    assert result.exit_code == 0, result.stderr
    return ws


@pytest.fixture
def ws(trained, tmp_path):
    return copy_workspace(trained, tmp_path)


# --- names and paths -------------------------------------------------------------------------


def test_path_name_rule():
    for good in ("r", "run-1", "demo_augmented", "b.2"):
        assert path_name(good, what="run") == good
    for bad in BAD_NAMES:
        with pytest.raises(PipelineError):
            path_name(bad, what="run")


def test_names_that_would_leave_the_workspace_are_refused(ws, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    runs_before = sorted(p.name for p in (ws / "runs").iterdir())
    tiny = ("--preset", "tiny", "--size", 32, "--batch", 8, "--steps", 1)
    for bad in BAD_NAMES:
        one_line_exit_2(run("train", "-w", ws, *tiny, "--run", bad))
        one_line_exit_2(run("generate", "-w", ws, "--run", "r", "--count", 1, "--batch-name", bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it
    assert sorted(p.name for p in (ws / "runs").iterdir()) == runs_before
    assert not (ws / "candidates").exists() or not list((ws / "candidates").iterdir())
    assert not Path("/tmp/abs-name").exists()


def test_workspace_is_relocatable(ws, tmp_path, monkeypatch):
    w = open_workspace(ws, create=False)
    with read_session(w.engine) as s:
        stored = s.scalar(select(Run.generator_path).where(Run.name == "r"))
    w.close()
    assert stored == "runs/r/generator.keras"  # relative to the workspace, not the cwd
    moved = tmp_path / "elsewhere" / "moved-ws"
    shutil.copytree(ws, moved)
    shutil.rmtree(ws)  # the original is gone: only the copy can serve
    other = tmp_path / "another-cwd"
    other.mkdir()
    monkeypatch.chdir(other)
    result = run("generate", "-w", moved.resolve(), "--run", "r", "--count", 2, *AUGMENTED)
    assert result.exit_code == 0, result.stderr
    assert len(list((moved / "candidates" / "r-augmented" / "images").iterdir())) == 2


def test_synthetic_anatomy_from_too_few_patients_is_one_line(ws):
    """The default mask source on 2 training patients: one line naming the minimum, exit 2,
    no batch folder, no catalog row, no model file."""
    from pipeline.catalog import CandidateBatch

    result = run("generate", "-w", ws, "--run", "r", "--count", 2)
    one_line_exit_2(result)
    assert "2 training patient(s): the anatomy model needs at least 4" in result.stderr
    assert not (ws / "candidates" / "r-synthetic").exists()
    assert not list((ws / "runs" / "r").glob("anatomy-*"))
    w = open_workspace(ws, create=False)
    with read_session(w.engine) as s:
        assert s.scalar(select(CandidateBatch).where(CandidateBatch.name == "r-synthetic")) is None
    w.close()


def test_generate_masks_bad_files(ws, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    flat = np.zeros((40, 40), np.int16)
    flat[10:30, 10:30] = 500
    nib.save(nib.Nifti1Image(flat, np.eye(4)), masks / "two_d.nii.gz")  # a 2-D NIfTI is fine
    result = run("generate", "-w", ws, "--run", "r", "--masks", masks, "--count", 1)
    assert result.exit_code == 0, result.stderr
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    Image.new("1", (13_500, 13_500)).save(bomb / "huge.png")
    one_line_exit_2(run("generate", "-w", ws, "--run", "r", "--masks", bomb, "--batch-name", "x"))


# --- export and verify -----------------------------------------------------------------------


@pytest.fixture
def releasable(tmp_path):
    spec = [{"honeypot": False, "gates": True, "cands": [(False, ("accept", None))] * 3}]
    ws_path, _ = fake_workspace(tmp_path, spec)
    return ws_path


def test_export_bad_name_and_out(releasable, tmp_path):
    out = tmp_path / "out"
    one_line_exit_2(run("export", "-w", releasable, "--out", out, "--name", "x" * 300))
    assert not out.exists() or not list(out.iterdir())
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    one_line_exit_2(run("export", "-w", releasable, "--out", dangling))
    one_line_exit_2(run("export", "-w", releasable, "--out", "/proc/self"))
    one_line_exit_2(run("export", "-w", "", "--out", out))


def test_export_sweeps_stale_temps_and_refuses_a_concurrent_export(releasable, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".export-tmp-Dataset500_CardiacSynth-99999.zip").write_bytes(b"partial")
    (out / ".export-tmp-Dataset500_CardiacSynth-99999").mkdir()
    held = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # another export is writing here
    fcntl.flock(held, fcntl.LOCK_EX)
    busy = run("export", "-w", releasable, "--out", out)
    os.close(held)
    one_line_exit_2(busy)
    assert "another export" in busy.stderr
    assert (out / ".export-tmp-Dataset500_CardiacSynth-99999.zip").exists()  # not its to sweep
    result = run("export", "-w", releasable, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert not list(out.glob(".export-tmp-*"))  # the dead export's zip and folder are gone


def test_export_onto_a_full_disk_is_one_line(releasable, tmp_path, monkeypatch):
    import release.bundle

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(release.bundle, "_write_zip", full)
    out = tmp_path / "out"
    result = run("export", "-w", releasable, "--out", out)
    one_line_exit_2(result)
    assert "No space left on device" in result.stderr
    assert list(out.iterdir()) == []  # no bundle, no temp


def _bundle(releasable, tmp_path) -> Path:
    out = tmp_path / "out"
    assert run("export", "-w", releasable, "--out", out).exit_code == 0
    return out / "Dataset500_CardiacSynth"


def test_verify_survives_wrong_shapes_and_paths_outside(releasable, tmp_path):
    bundle = _bundle(releasable, tmp_path)
    sums = (bundle / "SHA256SUMS").read_text()
    (bundle / "SHA256SUMS").write_text(
        sums + f"{'0' * 64}  ../../etc/hostname\n" + f"{'0' * 64}  /etc/hostname\n"
    )
    (bundle / "manifest.json").write_text("[1, 2, 3]")
    (bundle / "dataset.json").write_text(json.dumps({"channel_names": [], "labels": [1]}))
    result = run("verify", bundle)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stdout.count("points outside the bundle") == 2
    assert "manifest.json: 'files' is not a list" in result.stdout
    assert "dataset.json lacks 'numTraining'" in result.stdout
    one_line_exit_2(run("verify", tmp_path / "no-such-bundle"))


def test_verify_checks_the_manifest_case_list(releasable, tmp_path):
    bundle = _bundle(releasable, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["cases"] = manifest["cases"][:-1]  # one case the manifest no longer accounts for
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = run("verify", bundle, "--json")
    problems = json.loads(result.stdout)["problems"]
    assert any("manifest.json cases differ from labelsTr" in p for p in problems)


# --- decisions: CSV cells, import bounds -----------------------------------------------------


def test_csv_cells_are_neutralised_and_read_back_exactly():
    for text in ('=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "\tx", "'=x", "plain", ""):
        cell = csv_cell(text)
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
        assert csv_uncell(cell) == text


def test_decision_log_export_neutralises_formulas_and_imports_back(releasable, tmp_path):
    w = open_workspace(releasable, create=False)
    with write_session(w.engine) as s:
        ann = s.scalar(select(Reviewer).where(Reviewer.name == "ann"))
        cid = s.scalars(select(Candidate.id).order_by(Candidate.id)).first()
        record_decision(s, ann, cid, "reject", reason='=HYPERLINK("http://evil","x")')
    w.close()
    out = tmp_path / "log.csv"
    assert run("decisions", "export", "-w", releasable, "--csv", out).exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows[-1]["reason"] == '\'=HYPERLINK("http://evil","x")'
    assert all(not v.startswith(("=", "+", "@")) for r in rows for v in r.values() if v)
    w = open_workspace(releasable, create=False)
    with write_session(w.engine) as s:
        bob = s.scalar(select(Reviewer).where(Reviewer.name == "bob"))
        text = "candidate,decision,reason\n" + f'{cid},reject,"\'=HYPERLINK(""x"")"\n'
        import_decisions(s, bob, text)
        last = s.scalars(select(Decision).order_by(Decision.id.desc())).first().reason
    w.close()
    assert last == '=HYPERLINK("x")'


def test_import_bounds_and_summaries(releasable, tmp_path):
    def imp(text: str):
        path = tmp_path / "in.csv"
        path.write_text(text)
        args = ("decisions", "import", path, "-w", releasable, "--reviewer", "ann")
        return run(*args, "--password-stdin", input=PW + "\n")

    one_line_exit_2(imp("candidate,decision,reason\n1,reject," + "x" * 140_000 + "\n"))
    start = time.perf_counter()
    many = imp(
        "candidate,decision,reason\n" + "".join(f"{9000 + i},accept,\n" for i in range(300_000))
    )
    one_line_exit_2(many)
    assert time.perf_counter() - start < 60 and "more than 100,000 rows" in many.stderr
    unknown = imp(
        "candidate,decision,reason\n" + "".join(f"{9000 + i},accept,\n" for i in range(500))
    )
    one_line_exit_2(unknown)
    assert "500 bad row(s)" in unknown.stderr and "and 490 more" in unknown.stderr
    assert len(unknown.stderr) < 1000


# --- reviewers and sessions ------------------------------------------------------------------


def test_reviewer_name_policy():
    assert reviewer_name("  Bob ") == "bob" == reviewer_name("ｂｏｂ")  # NFKC + case-folded
    assert reviewer_name("Dr Ann Lee") == "dr ann lee" == reviewer_name("dr\u00a0ann lee")
    for bad in (
        "![px](http://127.0.0.1:9977/pixel.png)",
        "=HYPERLINK(1)",
        "a\nb",
        "a\tb",
        "b\u200bob",
        "x",
        "a" * 40,
        "bob  smith",
        " ",
    ):
        with pytest.raises(PipelineError):
            reviewer_name(bad)
    literal = markdown_text("![px](http://127.0.0.1:9977/pixel.png)\n<img src=x>")
    # every markup character is escaped: nothing can open an image, a link or a tag
    assert re.search(r"(?<!\\)[!\[\]()<>]", literal) is None, literal
    assert "\n" not in literal


def test_names_are_one_account_and_logins_take_equal_work(releasable, monkeypatch):
    import pipeline.review as review

    w = open_workspace(releasable, create=False)
    with write_session(w.engine) as s:
        with pytest.raises(PipelineError, match="already exists"):
            add_reviewer(s, "ANN", "reviewer", PW)
        assert authenticate(s, " Ann ", PW).name == "ann"
        calls = []
        real = review.hashlib.scrypt
        monkeypatch.setattr(
            review.hashlib, "scrypt", lambda *a, **k: calls.append(1) or real(*a, **k)
        )
        for name in ("ann", "nobody-here"):
            with pytest.raises(PipelineError, match="wrong name or password"):
                authenticate(s, name, "wrong-password")
        assert calls == [1, 1]  # the unknown name cost one scrypt too: no timing oracle
    w.close()


def test_disabled_reviewers_cannot_undo_and_sessions_expire(releasable):
    w = open_workspace(releasable, create=False)
    with write_session(w.engine) as s:
        ann = s.scalar(select(Reviewer).where(Reviewer.name == "ann"))
        now = time.time()
        assert open_session_reviewer(s, ann.id, now - 60, now) is ann
        assert open_session_reviewer(s, ann.id, now - SESSION_IDLE_S - 1, now) is None
        disable_reviewer(s, "ann")
        assert open_session_reviewer(s, ann.id, now, now) is None
        with pytest.raises(PipelineError, match="disabled"):
            undo_last(s, ann)
    w.close()


# --- bad source files ------------------------------------------------------------------------


def test_ingest_refuses_nan_and_infinite_voxels(phantom_dir, ws_path):
    src = sorted(phantom_dir.glob("*_image.nii.gz"))[1]
    img = nib.load(src)
    for bad in (np.nan, np.inf):
        data = np.asanyarray(img.dataobj).astype(np.float32)
        data[..., 3] = bad
        nib.save(nib.Nifti1Image(data, img.affine), src)
        result = run("ingest", phantom_dir, "-w", ws_path)
        one_line_exit_2(result)
        assert src.name in result.stderr and "NaN or infinite" in result.stderr
        assert not ws_path.exists()  # nothing half-written


def test_grey_alpha_pngs_are_read_as_grey(tmp_path):
    from pipeline.imageio import read_png

    grey = np.tile(np.arange(32, dtype=np.uint8), (32, 1))
    Image.fromarray(np.stack([grey, grey], -1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_png(tmp_path / "la.png", mask=False), grey)


# --- every command, bad input: one line, exit 2 ----------------------------------------------


def test_every_command_answers_bad_input_with_one_line(ws, tmp_path):
    missing = tmp_path / "missing"
    afile = tmp_path / "a-file.txt"
    afile.write_text("not a folder")
    badcsv = tmp_path / "bad.csv"
    badcsv.write_text("who,what\n1,2\n")
    assert run("reviewers", "add", "ann", "-w", ws, "--password-stdin", input=PW + "\n")
    cases = [
        ("phantom", afile),
        ("ingest", missing, "-w", tmp_path / "new-ws"),
        ("ingest", afile, "-w", tmp_path / "new-ws"),
        ("status", "-w", missing),
        ("status", "-w", ""),
        ("index", "-w", missing),
        ("train", "-w", ws, "--run", "../up"),
        ("generate", "-w", ws, "--run", "nope"),
        ("generate", "-w", ws, "--run", "r", "--batch-name", "a/b"),
        ("generate", "-w", ws, "--run", "r", "--masks", missing),
        ("filter", "-w", ws, "--batch", "nope"),
        ("filter", "-w", ws, "--images", missing),
        ("evaluate", "-w", ws, "--run", "nope"),
        ("honeypots", "-w", ws, "--run", "nope"),
        ("reviewers", "disable", "nobody", "-w", ws),
        ("decisions", "list", "-w", missing),
        ("decisions", "export", "-w", ws, "--csv", missing / "deeper" / "x.csv"),
        ("export", "-w", ws, "--out", tmp_path / "out", "--name", "x" * 300),
        ("export", "-w", ws, "--out", afile),
        ("verify", missing),
        ("review", "-w", missing),
    ]
    for args in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        one_line_exit_2(result)
    for name in ("![px](http://127.0.0.1:9977/pixel.png)", "Ann", "a\tb"):
        one_line_exit_2(
            run("reviewers", "add", name, "-w", ws, "--password-stdin", input=PW + "\n")
        )
    args = ("decisions", "import", badcsv, "-w", ws, "--reviewer", "ann", "--password-stdin")
    one_line_exit_2(run(*args, input=PW + "\n"))
