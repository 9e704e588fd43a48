"""Issue 24, item 3: the patient-level membership audit. The finding first: candidates whose
masks are deformed training slices (today's `augmented` source) tell an attacker who was
trained on; masks of people outside the workspace do not."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.generate import GenerateConfig, source_masks
from pipeline.ingest import IngestConfig, ingest
from pipeline.labels import LabelSchema
from pipeline.membership import (
    MIN_PER_GROUP,
    Patients,
    auc,
    image_similarity,
    mask_similarity,
    membership_audit,
)
from pipeline.phantom import write_phantom
from pipeline.slices import load_slices, workspace_refs
from pipeline.workspace import open_workspace


def test_auc_counts_ties_half_and_the_exact_test_is_exact():
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    member = {f"p{i}": i < 3 for i in range(6)}
    # three members, each with one slice that every candidate copies; others untouched
    masks = np.zeros((6, 8, 8), np.uint8)
    for i in range(6):
        masks[i, i : i + 2, 1:7] = 1
    pts = Patients(masks.astype(np.float32), masks, [f"p{i}" for i in range(6)], member)
    cands = masks[[0, 1, 2, 0, 1, 2]]
    out = membership_audit((cands.astype(np.float32), cands), pts, n_classes=2)
    mask_share = out["statistics"]["mask_share"]
    assert mask_share["auc"] == 1.0 and mask_share["p_value"] == pytest.approx(1 / 20)
    assert out["permutations"] == "exact" and out["joint_p_value"] == pytest.approx(1 / 20)


def test_too_few_patients_is_one_line_with_the_number_needed():
    member = {"a": True, "b": False}
    masks = np.zeros((2, 8, 8), np.uint8)
    out = membership_audit(
        (masks.astype(np.float32), masks),
        Patients(masks.astype(np.float32), masks, ["a", "b"], member),
        n_classes=2,
    )
    assert out["testable"] is False and f"at least {MIN_PER_GROUP}" in out["note"]
    assert "\n" not in out["note"] and "1 training and 1 held-out" in out["note"]


def test_similarities_are_dice_and_correlation():
    a = np.zeros((1, 4, 4), np.uint8)
    a[0, :2] = 1
    b = np.zeros((2, 4, 4), np.uint8)
    b[0, :2] = 1
    b[1, 1:3] = 1
    assert mask_similarity(a, b, 2).tolist() == [[1.0, 0.5]]
    x = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    assert image_similarity(x, x).diagonal() == pytest.approx([1.0, 1.0], abs=1e-5)


def _patients(ws) -> Patients:
    refs = workspace_refs(ws)
    images, masks = load_slices(ws, refs, 64)
    member = {r.patient: r.split == "train" for r in refs}
    return Patients(images, masks, [r.patient for r in refs], member)


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """The demo's workspace without its training: 10 phantom patients (seed 0, 256² × 64
    slices) ingested at 64² with the default split (7 trained on, 3 held out), and the masks of
    3 phantom people from outside it (seed 99). ~20 s."""
    root = tmp_path_factory.mktemp("members")
    write_phantom(root / "src", volumes=10, seed=0, workers=1)
    ws = open_workspace(root / "ws")
    ingest(ws, root / "src", IngestConfig(size=64, seed=0))
    write_phantom(root / "other", volumes=3, seed=99, workers=1)
    other = open_workspace(root / "ows")
    ingest(other, root / "other", IngestConfig(size=64, seed=0))
    outsiders = _patients(other)
    other.close()
    yield ws, outsiders
    ws.close()


def test_deformed_training_masks_give_their_patients_away(demo_like):
    """The issue's finding, reproduced on the demo's patients: the 64 `augmented` masks that
    `generate` makes (deformed training slices) → best-Dice membership AUC 1.00, exact
    permutation p = 1/120 (the issue measured the same on `make demo`). The masks of people
    outside the workspace → nothing to see."""
    ws, outsiders = demo_like
    patients = _patients(ws)
    assert sum(patients.member.values()) == 7 and len(patients.member) == 10
    spec = source_masks(ws, GenerateConfig(run="r"), LabelSchema.mmwhs(), 64)
    masks = np.stack([spec(i).mask for i in range(64)])
    # images with no signal at all: the mask channel alone
    noise = np.random.default_rng(0).random(masks.shape).astype(np.float32)
    leak = membership_audit((noise, masks), patients, n_classes=8)
    best = leak["statistics"]["mask_best"]
    assert best["auc"] == 1.0 and best["p_value"] == pytest.approx(1 / 120)
    assert leak["max_auc"] > 0.65 and leak["joint_p_value"] <= 0.05  # the gate fails it
    keep = np.flatnonzero([m.any() for m in outsiders.masks])
    keep = np.random.default_rng(1).choice(keep, 64, replace=False)
    clean = membership_audit((outsiders.images[keep], outsiders.masks[keep]), patients, n_classes=8)
    assert clean["joint_p_value"] > 0.05, clean["statistics"]


def test_derived_anatomy_needs_a_reason_and_says_so(tmp_path):
    """Item 4: a batch of `augmented` (or `heldout`) masks exported silently, as if its label
    maps were no one's. Now refused without an admin's reason; with one, the manifest and the
    datasheet say the anatomy is derived from real patients."""
    import json

    from tests.conftest import run
    from tests.test_release import fake_workspace

    ws, _ = fake_workspace(
        tmp_path,
        [
            {
                "honeypot": False,
                "gates": True,
                "masks": "augmented",
                "cands": [(False, ("accept", None))] * 2,
            }
        ],
    )
    refused = run("export", "-w", ws, "--out", tmp_path / "o")
    assert refused.exit_code == 2 and "derived from real patients" in refused.stderr
    assert "--allow-derived-anatomy" in refused.stderr and "\n" not in refused.stderr.strip()
    assert not list((tmp_path / "o").glob("*"))
    blank = run("export", "-w", ws, "--out", tmp_path / "o", "--allow-derived-anatomy", " ")
    assert blank.exit_code == 2 and "needs a reason" in blank.stderr
    ok = run("export", "-w", ws, "--out", tmp_path / "o", "--allow-derived-anatomy", "a study")
    assert ok.exit_code == 0, ok.stderr
    bundle = tmp_path / "o" / "Dataset500_CardiacSynth"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["anatomy"] == {
        "derived_from_real_patients": {"b0": "deformed training slices"},
        "reason": "a study",
    }
    sheet = (bundle / "DATASHEET.md").read_text()
    assert "anatomy derived from real patients" in sheet and "a study" in sheet
    assert run("verify", bundle).exit_code == 0
