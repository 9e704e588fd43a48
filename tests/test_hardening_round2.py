"""Issue 23's attack sweep, round 2, as tests: numbers that would switch a rule off, inputs that
would store damage a later run cannot repair. Each failed before its fix."""

from __future__ import annotations

import click
import pytest

from pipeline.cli import FiniteRange, cli
from tests.conftest import indexed_workspace, run
from tests.test_hardening import one_line_exit_2


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    return indexed_workspace(tmp_path_factory.mktemp("r2"), volumes=4, seed=3, slices=8)


def _float_params():
    for name, command in cli.commands.items():
        subs = command.commands.items() if isinstance(command, click.Group) else [("", command)]
        for sub, cmd in subs:
            for p in cmd.params:
                if isinstance(p.type, click.FloatRange) or p.type is click.FLOAT:
                    yield f"{name} {sub}".strip(), p


def test_every_float_option_refuses_nan_and_infinity():
    """A.1/A.2: click's FloatRange lets NaN through every bound (NaN fails no comparison)."""
    params = list(_float_params())
    assert len(params) >= 10
    for where, p in params:
        assert isinstance(p.type, FiniteRange), f"{where} {p.opts}: not a finite range"
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(click.BadParameter, match=r"not a finite number|not in the range"):
                p.type.convert(bad, p, None)


@pytest.mark.parametrize("option", ["--threshold", "--smooth", "--quantile"])
def test_index_nan_is_refused_before_anything_is_written(indexed, option):
    manifest = indexed / "index" / "manifest.json"
    before = manifest.read_bytes()
    result = run("index", "-w", indexed, option, "nan")
    one_line_exit_2(result)
    assert option in result.stderr and manifest.read_bytes() == before


@pytest.mark.parametrize("window", ["-1024,inf", "-inf,2048", "nan,100"])
def test_ingest_window_must_be_finite(phantom_dir, ws_path, window):
    """A.7: an infinite bound stored all-zero slices that a later ingest then skipped by hash."""
    result = run("ingest", phantom_dir, "-w", ws_path, "--window", window)
    one_line_exit_2(result)
    assert "--window" in result.stderr and not ws_path.exists()


def test_a_bom_csv_is_read_like_any_other():
    """E: Excel's "CSV UTF-8" starts with a byte-order mark; it was refused as lacking columns."""
    from pipeline.review import parse_decision_csv

    text = "candidate,decision,reason\n7,reject,artefact\n"
    assert parse_decision_csv("\ufeff" + text) == parse_decision_csv(text)
    rows, problems = parse_decision_csv("\ufeff" + text)
    assert len(rows) == 1 and not problems


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seeds_outside_numpys_range_are_one_line(phantom_dir, ws_path, seed):
    one_line_exit_2(run("ingest", phantom_dir, "-w", ws_path, "--seed", seed))
    assert not ws_path.exists()


@pytest.mark.parametrize("raw", ["6.5", "abc", "", "-1", "0", "99999999999999"])
def test_a_damaged_schema_version_is_one_line(indexed, tmp_path, raw):
    """E: int('6.5') was a traceback."""
    from pipeline.catalog import Meta, write_session
    from pipeline.workspace import open_workspace
    from tests.conftest import copy_workspace

    ws = copy_workspace(indexed, tmp_path)
    w = open_workspace(ws, create=False)
    with write_session(w.engine) as s:
        s.get(Meta, "schema_version").value = raw
    w.close()
    result = run("status", "-w", ws)
    one_line_exit_2(result)
    assert "schema version" in result.stderr or "newer" in result.stderr


def test_an_empty_catalog_file_is_refused_not_reinitialised(indexed, tmp_path):
    """B.8: a 0-byte catalog.db read as an empty workspace and got a fresh schema written."""
    from tests.conftest import copy_workspace

    ws = copy_workspace(indexed, tmp_path)
    (ws / "catalog.db").write_bytes(b"")
    for f in ws.glob("catalog.db-*"):
        f.unlink()
    result = run("status", "-w", ws)
    one_line_exit_2(result)
    assert "empty file" in result.stderr and (ws / "catalog.db").stat().st_size == 0


def test_generate_with_unknown_labels_gives_advice_it_can_take(tmp_path):
    """E: generate advised --labels / --ignore-unknown-labels, options only ingest has."""
    import numpy as np

    from pipeline.errors import PipelineError
    from pipeline.generate import read_user_masks
    from pipeline.labels import LabelSchema

    d = tmp_path / "masks"
    d.mkdir()
    m = np.zeros((32, 32), np.uint8)
    m[8:20, 8:20] = 77
    from PIL import Image

    Image.fromarray(m).save(d / "a.png")
    with pytest.raises(PipelineError) as err:
        read_user_masks(d, LabelSchema.mmwhs(), 32)
    assert "--labels" not in str(err.value) and "label codes the run was trained on" in str(
        err.value
    )


def test_a_closed_pipe_ends_quietly(indexed):
    """E: `pipeline status | head -1` printed "Error: Broken pipe" and exited 2."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "status", "-w", str(indexed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert b"Error" not in err and b"Traceback" not in err, err
    assert proc.returncode in (0, 141), (proc.returncode, err)


def test_writes_never_swap_a_device_or_a_link_for_a_file(indexed, tmp_path):
    """B.9: `decisions export --csv /dev/full` replaced the device with a regular file and
    reported success; a symlinked target was replaced by a file."""
    import os

    from pipeline.atomic import atomic_write
    from pipeline.errors import PipelineError

    target = tmp_path / "real.csv"
    target.write_text("keep")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (link, fifo, tmp_path):
        with pytest.raises(PipelineError, match="refusing to replace"):
            atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert link.is_symlink() and target.read_text() == "keep" and fifo.is_fifo()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    atomic_write(target, lambda tmp: tmp.write_text("new"))  # a regular file is replaced
    assert target.read_text() == "new"
    # through the command, on a FIFO (as /dev/full would be, without touching /dev)
    result = run("decisions", "export", "--csv", fifo, "-w", indexed)
    one_line_exit_2(result)
    assert "refusing to replace" in result.stderr and fifo.is_fifo()


def test_nifti_headers_are_checked_before_any_voxel_is_read(tmp_path):
    """B.10: a 2.3 MB .nii.gz declaring 2048²×64 took 1.7 GB to ingest and to verify; pixdim 0
    became 1 mm, spacings of 1.48 km or 1 nm passed."""
    import nibabel as nib
    import numpy as np

    from pipeline.errors import PipelineError
    from pipeline.imageio import MAX_NIFTI_VOXELS, check_nifti_header, read_nifti_slices

    def img(shape, zooms):
        out = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
        out.header.set_data_shape(shape)
        out.header.set_zooms(zooms)
        return out

    with pytest.raises(PipelineError, match="voxels, more than"):
        check_nifti_header(img((2048, 2048, 64), (0.5, 0.5, 2.0)), tmp_path / "x.nii.gz")
    assert MAX_NIFTI_VOXELS >= 512**3
    check_nifti_header(img((512, 512, 400), (0.4, 0.4, 0.6)), tmp_path / "ok.nii.gz")
    check_nifti_header(img((64, 64, 1), (1.0, 1.0, 999.0)), tmp_path / "ours.nii.gz")
    for zooms in ((0.0, 0.5, 2.0), (1480_000.0, 1, 1), (1e-6, 1, 1)):
        with pytest.raises(PipelineError, match=r"spacing .* not plausible"):
            check_nifti_header(img((8, 8, 8), zooms), tmp_path / "bad.nii.gz")
    # through the reader: a real file with pixdim 0 and no qform/sform
    data = np.zeros((8, 8, 3), np.int16)
    bad = nib.Nifti1Image(data, None)
    bad.header.set_zooms((0.0, 0.0, 0.0))
    path = tmp_path / "zero.nii.gz"
    nib.save(bad, path)
    with pytest.raises(PipelineError, match="not plausible"):
        read_nifti_slices(path, what="mask")


def test_licence_is_a_bounded_utf8_text_file_or_a_name(tmp_path):
    """D.20: `export --license FILE` copied any file (a binary one was a traceback)."""
    from pipeline.errors import PipelineError
    from release.bundle import MAX_LICENCE_BYTES, read_licence

    good = tmp_path / "LICENCE.txt"
    good.write_text("Creative Commons Attribution 4.0\n\nYou are free to share.\n")
    text, said = read_licence(str(good))
    assert text.startswith("Creative Commons") and str(good) in said and "characters" in said
    assert read_licence("CC-BY-4.0") == ("CC-BY-4.0", "the licence name 'CC-BY-4.0'")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    big = tmp_path / "big.txt"
    big.write_text("x" * (MAX_LICENCE_BYTES + 1))
    cases = {
        str(binary): "not UTF-8|control characters",
        str(big): "larger than",
        str(tmp_path / "missing.txt"): "not found",
        str(tmp_path): "not a regular file",
        "x" * 300: "licence name",
    }
    for value, why in cases.items():
        with pytest.raises(PipelineError, match=why):
            read_licence(value)
    result = run("export", "-w", tmp_path / "ws", "--out", tmp_path / "o", "--license", binary)
    one_line_exit_2(result)
    assert "model.bin" in result.stderr and not (tmp_path / "o").exists()


def test_one_writer_per_run(indexed, tmp_path):
    """B.6: two `train --resume` of one run both exited 0; the 300-step result was overwritten
    by the 260-step one and orphan checkpoints remained."""
    from pipeline.train import run_lock
    from tests.conftest import copy_workspace

    ws = copy_workspace(indexed, tmp_path)
    args = ("train", "-w", ws, "--preset", "tiny", "--size", 32, "--batch", 4, "--run", "r")
    with run_lock(ws / "runs", "r"):  # another training holds the run
        busy = run(*args, "--steps", 1)
        one_line_exit_2(busy)
        assert "another training is writing this run" in busy.stderr
        assert not (ws / "runs" / "r" / "config.json").exists()
    done = run(*args, "--steps", 1)  # released: the run trains
    assert done.exit_code == 0, done.stderr
    assert (ws / "runs" / "r" / "generator.keras").exists()


def test_verify_checks_the_zip_that_is_sent(tmp_path):
    """D.18: appending a source CT and `../../evil.txt` to Dataset500_X.zip still verified
    "sound": only the folder was checked."""
    import zipfile

    from tests.test_hardening import _bundle
    from tests.test_release import fake_workspace

    ws, _ = fake_workspace(
        tmp_path, [{"honeypot": False, "gates": True, "cands": [(False, ("accept", None))] * 3}]
    )
    bundle = _bundle(ws, tmp_path)
    sent = bundle.with_name(bundle.name + ".zip")
    assert run("verify", bundle).exit_code == 0 and run("verify", sent).exit_code == 0
    pristine = sent.read_bytes()
    tampered = {
        f"{bundle.name}/imagesTr/source_ct_0000.nii.gz": b"a patient's CT",
        "../../evil.txt": b"x",
        "/etc/cron.d/evil": b"x",
        f"{bundle.name}/../evil.txt": b"x",
    }
    for name, data in tampered.items():
        sent.write_bytes(pristine)
        with zipfile.ZipFile(sent, "a") as z:
            z.writestr(name, data)
        for target in (bundle, sent):  # the folder with its zip, and the zip alone
            result = run("verify", target)
            assert result.exit_code == 1, (name, result.stdout)
            assert "Traceback" not in result.stderr
        assert not (tmp_path / "evil.txt").exists()
    # a member changed in place (same name): its digest no longer matches
    sent.write_bytes(pristine)
    with zipfile.ZipFile(sent) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    label = next(n for n in members if "/labelsTr/" in n)
    data = bytearray(members[label])
    data[len(data) // 2] ^= 0xFF
    members[label] = bytes(data)
    with zipfile.ZipFile(sent, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    result = run("verify", sent)
    assert result.exit_code == 1 and "SHA-256 does not match" in result.stdout
    sent.write_bytes(b"not a zip")
    assert run("verify", sent).exit_code == 1


def test_notes_are_bounded_like_imported_fields(tmp_path):
    """C.15: a note of 200,058 characters was stored while imports cap fields at 4,096."""
    from pipeline.catalog import Candidate, write_session
    from pipeline.errors import PipelineError
    from pipeline.review import MAX_FIELD, add_reviewer, record_decision
    from pipeline.workspace import open_workspace
    from tests.test_release import PW, fake_workspace

    ws_path, _ = fake_workspace(
        tmp_path, [{"honeypot": False, "gates": True, "cands": [(False, (None, None))] * 2}]
    )
    w = open_workspace(ws_path, create=False)
    with write_session(w.engine) as s:
        ann = add_reviewer(s, "cat", "reviewer", PW)
        ids = [c.id for c in s.query(Candidate).all()]
        with pytest.raises(PipelineError, match="limited to 4,096"):
            record_decision(s, ann, ids[0], "reject", reason="artefact: " + "x" * 200_000)
        record_decision(s, ann, ids[0], "reject", reason="x" * MAX_FIELD)
    w.close()


def test_filter_images_says_what_it_did_not_read(indexed, tmp_path):
    """E: `filter --images DIR` skipped subfolders, other extensions and special files without
    counting them."""
    import os

    import numpy as np
    from PIL import Image

    d = tmp_path / "imgs"
    (d / "nested").mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(d / "a.png")
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(d / "nested" / "b.png")
    (d / "notes.txt").write_text("x")
    (d / "link.png").symlink_to(d / "a.png")
    os.mkfifo(d / "pipe.png")
    result = run("filter", "-w", indexed, "--images", d)
    assert result.exit_code == 0, result.stderr
    assert "1 subfolder, 1 file of another type, 2 special file" in result.stderr
    assert "of 1 flagged" in result.stdout  # only a.png was scored


def test_a_hand_set_rule_says_so_wherever_it_is_shown(indexed, tmp_path):
    """A.3: `index --threshold 1.0` switched the filter off, but reports still described the
    calibrated tails and the datasheet said "No image is a real patient's scan"."""
    import json

    from pipeline.catalog import CandidateBatch, write_session
    from pipeline.workspace import open_workspace
    from tests.conftest import copy_workspace
    from tests.test_hardening import _bundle
    from tests.test_release import fake_workspace

    ws = copy_workspace(indexed, tmp_path)
    built = run("index", "-w", ws, "--threshold", "1.0", "--rebuild")
    assert built.exit_code == 0, built.stderr
    assert "hand-set by" in built.stdout and "it flags nothing" in built.stdout
    cal = json.loads((ws / "index" / "manifest.json").read_text())["calibration"]
    assert cal["explicit"] and cal["set_by"] and cal["set_at"]
    src = sorted((indexed.parent / "src").glob("*_image.nii.gz"))[0]  # a source volume itself
    scored = run("filter", "-w", ws, "--images", src)
    assert scored.exit_code == 0, scored.stderr
    assert "0 of" in scored.stdout and "hand-set by" in scored.stdout
    assert "flags nothing" in scored.stdout
    # the datasheet of a release filtered under a hand-set rule
    root = tmp_path / "rel"
    root.mkdir()
    rel, _ = fake_workspace(
        root, [{"honeypot": False, "gates": True, "cands": [(False, ("accept", None))] * 2}]
    )
    w = open_workspace(rel, create=False)
    with write_session(w.engine) as s:
        for b in s.query(CandidateBatch).all():
            hand = {"n_baseline": 0, "method": "explicit", "threshold": 1.0}
            hand |= {"texture_threshold": None, "set_by": "ann", "set_at": "2026-11-28T10:00:00"}
            b.privacy = {**b.privacy, **hand}
    w.close()
    sheet = (_bundle(rel, root) / "DATASHEET.md").read_text()
    assert "No image is a real patient's scan" not in sheet
    assert "set by hand" in sheet and "hand-set by ann at 2026-11-28T10:00:00" in sheet


def test_the_review_app_never_shows_a_traceback(indexed, monkeypatch):
    """C.16: client.showErrorDetails was `full`: a locked catalog or a missing index/ put a raw
    traceback with server paths in the page."""
    import os

    seen = {}

    def fake_exec(path, argv, env):
        seen["argv"] = argv
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_exec)
    run("review", "-w", indexed)
    argv = seen["argv"]
    assert argv[argv.index("--client.showErrorDetails") + 1] == "none"


def test_the_app_sees_a_re_index_without_a_restart(indexed, tmp_path):
    """A.4: the app cached the index per process; after a re-index, new sessions still showed
    the old rule."""
    from reviewer_app.views import index_stamp, load_index_cached, open_ws
    from tests.conftest import copy_workspace

    ws_path = copy_workspace(indexed, tmp_path)
    ws = open_ws(str(ws_path))
    before, stamp = load_index_cached(ws).calibration.threshold, index_stamp(ws)
    assert run("index", "-w", ws_path, "--threshold", 0.5, "--rebuild").exit_code == 0
    assert index_stamp(ws) != stamp
    after = load_index_cached(ws).calibration
    assert after.threshold == 0.5 != before and after.explicit


def test_the_demo_never_revives_or_takes_over_an_account(tmp_path):
    """C.14 (part): `demo --review` re-enabled a disabled demo-physician, reset its password and
    called it admin while its role stayed reviewer."""
    from pipeline.catalog import write_session
    from pipeline.errors import PipelineError
    from pipeline.review import add_reviewer, demo_account, disable_reviewer, login
    from pipeline.workspace import open_workspace

    w = open_workspace(tmp_path / "ws")
    with write_session(w.engine) as s:
        demo_account(s, "demo-physician", "first-password-1")  # created as admin
        demo_account(s, "demo-physician", "second-password-2")  # an earlier demo's: new password
    assert login(w.engine, "demo-physician", "second-password-2")["role"] == "admin"
    with write_session(w.engine) as s:
        disable_reviewer(s, "demo-physician")
        add_reviewer(s, "dr-ann", "reviewer", "ann-password-1234")
    for name, why in (("demo-physician", "disabled"), ("dr-ann", "exists as a reviewer")):
        with write_session(w.engine) as s, pytest.raises(PipelineError, match=why):
            demo_account(s, name, "third-password-3")
    assert login(w.engine, "dr-ann", "ann-password-1234")["role"] == "reviewer"
    w.close()


def test_an_automatic_demo_review_is_never_presented_as_a_human_one(tmp_path):
    """C.14 (part): the datasheet of a demo auto-review opened with "Every released image was
    accepted in review" like a physician's."""
    from pipeline.catalog import Reviewer, write_session
    from pipeline.workspace import open_workspace
    from tests.test_hardening import _bundle
    from tests.test_release import fake_workspace

    ws, _ = fake_workspace(
        tmp_path, [{"honeypot": False, "gates": True, "cands": [(False, ("accept", None))] * 2}]
    )
    w = open_workspace(ws, create=False)
    with write_session(w.engine) as s:
        s.query(Reviewer).filter(Reviewer.name == "ann").one().role = "demo"
    w.close()
    sheet = (_bundle(ws, tmp_path) / "DATASHEET.md").read_text()
    assert "No physician reviewed these images" in sheet
    assert "Every released image was accepted in review" not in sheet


def test_a_second_reader_learns_nothing_from_their_own_vote(tmp_path):
    """C.12: under policy two, bob's reject after ann's accept showed "waiting for others",
    while a lone reject showed "rejected" (and the overall count moved differently): bob could
    read ann's vote, undo, and vote again knowing it. Everything bob sees must be the same in
    both worlds, before and after an undo."""
    from pipeline.catalog import write_session
    from pipeline.decisions import candidate_states
    from pipeline.review import (
        add_reviewer,
        progress,
        record_decision,
        review_key,
        undo_last,
        visible_state,
    )
    from pipeline.workspace import open_workspace
    from tests.test_review import make_batch

    def bob_sees(s, bob):
        states = candidate_states(s, policy="two")
        key = review_key(s)
        table = [visible_state(x, viewer_id=bob.id, admin=False, key=key) for x in states]
        return table, progress(s, bob, policy="two", states=states, admin=False)

    seen = []
    for world, ann_votes in (("a", True), ("b", False)):
        ws = open_workspace(tmp_path / world)
        with write_session(ws.engine) as s:
            ids = make_batch(s, "b", [False, False, False])
            ann = add_reviewer(s, "ann", "reviewer", "correct horse")
            bob = add_reviewer(s, "bob", "reviewer", "correct horse")
            if ann_votes:
                record_decision(s, ann, ids[1], "accept")
            before = bob_sees(s, bob)
            record_decision(s, bob, ids[1], "reject", reason="artefact")
            after_vote = bob_sees(s, bob)
            undo_last(s, bob)
            after_undo = bob_sees(s, bob)
        ws.close()
        seen.append((before, after_vote, after_undo))

    def table(view):  # review codes are keyed per workspace: compare all but them
        return [{k: v for k, v in row.items() if k != "candidate"} for row in view[0]]

    def moved(a, b):  # what bob's own action changed in his counts
        return {k: b[1][k] - a[1][k] for k in a[1]}

    (a0, a1, a2), (b0, b1, b2) = seen
    assert table(a0) == table(b0) and table(a1) == table(b1) and table(a2) == table(b2)
    assert moved(a0, a1) == moved(b0, b1) and moved(a1, a2) == moved(b1, b2)
    assert [row["state"] for row in table(a1)] == ["open", "you rejected", "open"]
    assert "ann" not in str(seen[0])


def test_a_stale_tab_cannot_replace_a_newer_vote(tmp_path):
    """C.15: two tabs of one reviewer both show X; the newer tab accepts, then the stale tab's
    reject silently replaced the accept. A vote from the app must find the reviewer undecided
    on X (a change of mind is Undo, then vote)."""
    from pipeline.catalog import write_session
    from pipeline.decisions import candidate_states
    from pipeline.errors import PipelineError
    from pipeline.review import add_reviewer, record_decision
    from pipeline.workspace import open_workspace
    from tests.test_review import make_batch

    ws = open_workspace(tmp_path / "ws")
    with write_session(ws.engine) as s:
        ids = make_batch(s, "b", [False])
        ann = add_reviewer(s, "ann", "reviewer", "correct horse")
        record_decision(s, ann, ids[0], "accept", if_undecided=True)  # the newer tab
        with pytest.raises(PipelineError, match="already accepted"):
            record_decision(s, ann, ids[0], "reject", reason="artefact", if_undecided=True)
        assert candidate_states(s, policy="one")[0].state == "accepted"
    ws.close()


def test_every_release_is_in_the_ledger(tmp_path):
    """D.19: export, undo an accept, export again: the earlier bundle kept the withdrawn case,
    nothing recorded what was released when, and both bundles were Dataset500. The catalog
    keeps a ledger (bundle, cases, hashes, time); a release with other cases gets its own
    id; an identical one is a reproduction under the same id; admins see what was withdrawn
    after it was released."""
    import json

    from pipeline.catalog import write_session
    from pipeline.review import get_reviewer, undo_last
    from pipeline.workspace import open_workspace
    from tests.test_release import fake_workspace

    ws_path, _ = fake_workspace(
        tmp_path,
        [
            {
                "honeypot": False,
                "gates": True,
                "cands": [(False, ("accept", None)), (False, (None, "accept"))],
            }
        ],
    )
    first = run("export", "-w", ws_path, "--out", tmp_path / "one")
    assert first.exit_code == 0, first.stderr
    assert (tmp_path / "one" / "Dataset500_CardiacSynth").is_dir()
    # the same cases again: a reproduction, under the same id
    again = run("export", "-w", ws_path, "--out", tmp_path / "again")
    assert again.exit_code == 0 and (tmp_path / "again" / "Dataset500_CardiacSynth").is_dir()
    w = open_workspace(ws_path, create=False)
    with write_session(w.engine) as s:
        undo_last(s, get_reviewer(s, "bob"))  # bob withdraws his accept of the second case
    w.close()
    taken = run("export", "-w", ws_path, "--out", tmp_path / "two", "--dataset-id", 500)
    one_line = taken.stderr.strip()
    assert taken.exit_code == 2 and "\n" not in one_line and "Dataset500" in one_line
    assert "--dataset-id 501" in one_line
    assert not list((tmp_path / "two").glob("*"))  # nothing half-written
    second = run("export", "-w", ws_path, "--out", tmp_path / "two")
    assert second.exit_code == 0, second.stderr
    assert (tmp_path / "two" / "Dataset501_CardiacSynth").is_dir()
    ledger = run("releases", "-w", ws_path, "--json")
    assert ledger.exit_code == 0, ledger.stderr
    rows = json.loads(ledger.stdout)
    assert [(r["dataset"], r["cases"]) for r in rows] == [
        ("Dataset500_CardiacSynth", 2),
        ("Dataset500_CardiacSynth", 2),
        ("Dataset501_CardiacSynth", 1),
    ]
    manifest = (tmp_path / "one" / "Dataset500_CardiacSynth" / "manifest.json").read_bytes()
    assert rows[0]["manifest_sha256"] == __import__("hashlib").sha256(manifest).hexdigest()
    assert all(len(c["image_sha256"]) == 64 for c in rows[0]["case_list"])
    withdrawn = [(r["dataset"], c["case"], c["state"]) for r in rows for c in r["withdrawn"]]
    assert withdrawn == [
        ("Dataset500_CardiacSynth", "case_0001", "unreviewed"),
        ("Dataset500_CardiacSynth", "case_0001", "unreviewed"),
    ]
    text = run("releases", "-w", ws_path).stdout
    assert "withdrawn after release" in text and "case_0001" in text
