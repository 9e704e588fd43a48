"""Issue 24, item 3: the patient-level membership audit. The finding first: candidates whose
masks are deformed training slices (today's `augmented` source) tell an attacker who was
trained on; masks of people outside the workspace do not."""

from __future__ import annotations

import json
import math

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
    nearest_share_test,
    patient_statistics,
)
from pipeline.phantom import write_phantom
from pipeline.slices import load_slices, workspace_refs
from pipeline.workspace import open_workspace


def test_auc_counts_ties_half_and_the_exact_test_is_exact():
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    n = 2 * MIN_PER_GROUP
    member = {f"p{i:02d}": i < MIN_PER_GROUP for i in range(n)}
    # every patient one slice, a bar of its own rows; each member's slice copied once
    masks = np.zeros((n, 2 * n, 8), np.uint8)
    for i in range(n):
        masks[i, 2 * i : 2 * i + 2, 1:7] = 1
    pts = Patients(masks.astype(np.float32), masks, sorted(member), member)
    cands = masks[:MIN_PER_GROUP]
    out = membership_audit((cands.astype(np.float32), cands), pts, n_classes=2)
    best = out["statistics"]["mask_best"]
    arrangements = math.comb(n, MIN_PER_GROUP)
    assert best["auc"] == 1.0 and best["p_value"] == pytest.approx(1 / arrangements)
    assert out["permutations"] == "exact" and out["joint_p_value"] <= 2 / arrangements


def test_too_few_patients_is_one_line_with_the_number_needed():
    """The demo's 7 + 3 patients: not testable (and why), not a gate that passes or fails by
    who happens to be typical."""
    member = {f"p{i}": i < 7 for i in range(10)}
    masks = np.zeros((10, 8, 8), np.uint8)
    out = membership_audit(
        (masks.astype(np.float32), masks),
        Patients(masks.astype(np.float32), masks, sorted(member), member),
        n_classes=2,
    )
    assert out["testable"] is False and f"at least {MIN_PER_GROUP}" in out["note"]
    assert "\n" not in out["note"] and "7 training and 3 held-out" in out["note"]


def test_the_memorisation_test_is_calibrated_over_patients_not_candidates():
    """Issue 24: candidates from one model share its traits, so they are not independent draws.
    Here nobody was trained on: every candidate's nearest patient is drawn by how typical the
    patients are, whatever their group. A binomial test over the 128 candidates (the audit's
    test before) called that memorisation in about half of random splits; the patient-level
    permutation test keeps near its 5% (6 of 60). A batch that does point at its training
    patients still fails it."""
    from scipy.stats import binomtest

    rng = np.random.default_rng(3)
    names = [f"p{i:02d}" for i in range(24)]
    typical = rng.lognormal(0.0, 0.8, len(names))  # some people are nearer the middle
    alarms_binomial = alarms = 0
    for _ in range(60):
        members = set(rng.choice(names, 12, replace=False).tolist())
        member = {p: p in members for p in names}
        nearest = rng.choice(names, 128, p=typical / typical.sum()).tolist()
        out = nearest_share_test(nearest, member)
        k = out["closer_to_training"]
        alarms_binomial += binomtest(k, 128, 0.5, alternative="greater").pvalue < 0.05
        alarms += out["p_value"] < 0.05
    assert alarms_binomial >= 20 and alarms <= 8  # measured: 29 and 6 of 60
    # pointing at the members: every candidate nearest a training patient, one twice as often
    member = {p: i < 12 for i, p in enumerate(names)}
    nearest = [names[i % 12] for i in range(128)]
    out = nearest_share_test(nearest, member)
    assert out["share_closer_to_training"] == 1.0 and out["p_value"] < 0.01
    # unequal groups: chance is the members' share of patients, and the balanced share is ½
    member = {p: i < 16 for i, p in enumerate(names)}
    out = nearest_share_test([names[i % 24] for i in range(240)], member)
    assert out["chance_share"] == pytest.approx(16 / 24)
    assert out["share_closer_to_training"] == pytest.approx(0.5) and out["p_value"] > 0.3
    # too few in a group: said in one line, no p-value to gate on
    out = nearest_share_test(names[:8], {p: i < 4 for i, p in enumerate(names[:8])})
    assert out["p_value"] is None and "memorisation test not testable" in out["note"]


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
def twelve(tmp_path_factory):
    """12 phantom patients (128² × 32 slices, ingested at 64²; 6 trained on, 6 held out) and
    3 phantom people from outside the workspace. ~10 s."""
    root = tmp_path_factory.mktemp("members")
    write_phantom(root / "src", volumes=12, seed=0, size=128, n_slices=32, workers=1)
    ws = open_workspace(root / "ws")
    ingest(ws, root / "src", IngestConfig(size=64, seed=0, split=(0.5, 0.25, 0.25)))
    write_phantom(root / "other", volumes=3, seed=123, size=128, n_slices=32, workers=1)
    other = open_workspace(root / "ows")
    ingest(other, root / "other", IngestConfig(size=64, seed=0))
    outsiders = _patients(other)
    other.close()
    yield ws, outsiders
    ws.close()


def _failed_gates(**audits) -> list[str]:
    """The gates a batch with perfect figures fails, given only its audits."""
    from pipeline.quality import GateConfig, apply_gates

    figures = dict(heart_ssim=1.0, heldout_ssim=1.0, fd_ratio=1.0, feature_space="x")
    return apply_gates(GateConfig(), **figures, **audits).failed


def _gate(audit):
    membership = (audit["max_auc"], audit["joint_p_value"])
    return _failed_gates(membership=membership) == ["max_membership_auc"]


def test_a_tie_for_the_nearest_slice_is_shared_not_given_to_whoever_comes_first():
    """Slices come in split order (training first): an argmax gave every tied candidate, and
    every candidate like no slice at all, to a training patient."""
    sim = np.array(
        [
            [0.8, 0.8, 0.1],  # tied between a (first) and b
            [0.0, 0.0, 0.0],  # like nothing: no one's
            [0.2, 0.3, 0.9],  # c's
            [0.5, 0.1, 0.5],  # tied between a and c
        ],
        np.float32,
    )
    stats = patient_statistics(sim, ["a", "b", "c"])
    shares = {p: stats[p]["share"] for p in "abc"}
    third = 1 / 3 / 4
    assert shares == pytest.approx(
        {"a": (0.5 + 0.5) / 4 + third, "b": 0.5 / 4 + third, "c": (1 + 0.5) / 4 + third}
    )
    assert sum(shares.values()) == pytest.approx(1.0)
    assert {p: stats[p]["best"] for p in "abc"} == pytest.approx({"a": 0.8, "b": 0.8, "c": 0.9})


def test_a_memorising_batch_fails_the_gate(twelve, tmp_path):
    """What the audit is for: a generator that memorised its training slices (each candidate a
    training slice and its label map, shifted ±2 px, faint noise: the honeypots' recipe)
    points at its training patients — image share AUC 0.93 — beyond chance, and the gate
    fails. (On this phantom the masks alone cannot tell a shifted copy from another person:
    the phantom's people are near-identical.)"""
    from pipeline.augment import add_noise, shift

    ws, _ = twelve
    patients = _patients(ws)
    assert sum(patients.member.values()) == 6 and len(patients.member) == 12
    rng = np.random.default_rng(0)
    train = [i for i, p in enumerate(patients.patient) if patients.member[p]]
    train = [i for i in train if patients.masks[i].any()]
    images, masks = [], []
    for i in rng.choice(train, 64, replace=False):
        dy, dx = (int(v) for v in rng.integers(-2, 3, 2))
        images.append(add_noise(shift(patients.images[i], dy, dx), 0.01, rng))
        masks.append(shift(patients.masks[i], dy, dx))
    leak = membership_audit((np.stack(images), np.stack(masks)), patients, n_classes=8)
    assert leak["statistics"]["image_share"]["auc"] >= 0.9
    assert leak["joint_p_value"] <= 0.05 and _gate(leak)
    # what evaluate writes and prints: per-patient scores only in the report folder's file
    from pipeline.quality import write_membership
    from pipeline.render import membership_line

    per_patient = leak.pop("per_patient")
    write_membership(tmp_path, leak, per_patient)
    stored = json.loads((tmp_path / "membership.json").read_text())
    assert len(stored["per_patient"]) == 12 and (tmp_path / "membership.png").stat().st_size
    line = membership_line(leak)
    assert "6 training vs 6 held-out" in line and "image share 0.9" in line and "joint p" in line


def test_anatomy_from_outside_or_deformed_passes(twelve):
    """Masks and images of three people outside the workspace read as outsiders; the
    `augmented` masks (deformed training slices) show no membership effect beyond chance here
    either (on the demo's 7 + 3 patients both scored a best-Dice AUC of 1.00 — a property of
    who was held out, which is why the audit needs 6 per group); the default synthetic masks
    do point at their training people, on some seeds beyond chance (below)."""
    ws, outsiders = twelve
    patients = _patients(ws)
    keep = np.flatnonzero([m.any() for m in outsiders.masks])
    keep = np.random.default_rng(1).choice(keep, 64, replace=False)
    outside = membership_audit(
        (outsiders.images[keep], outsiders.masks[keep]), patients, n_classes=8
    )
    assert outside["joint_p_value"] > 0.05 and not _gate(outside), outside["statistics"]
    spec = source_masks(ws, GenerateConfig(run="r", masks="augmented"), LabelSchema.mmwhs(), 64)
    masks = np.stack([spec(i).mask for i in range(64)])
    noise = np.random.default_rng(0).random(masks.shape).astype(np.float32)
    augmented = membership_audit((noise, masks), patients, n_classes=8)
    assert augmented["joint_p_value"] > 0.05 and not _gate(augmented)
    # the default source: label maps drawn from the shape model of the 6 training volumes.
    # A model of 6 people points at them (issue 24 stays open: the structures' model, not
    # the body), and on 6 + 6 one seed's gate verdict is a coin flip: over generation seeds
    # 0–5 the joint p read 0.021–0.22 with the body of the joint maps (2 of 6 over 0.05) and
    # 0.025–0.38 with the outline body (3 of 6; this seed 0.025, mask share AUC 0.90); pooled
    # two seeds at a time (128 masks), 0.015 / 0.11 / 0.035, mask share 0.83–0.94. The
    # memorising batch above reads joint p 0.017, AUC 0.93: the audit cannot tell these
    # apart at 6 + 6. Asserted: no statistic reaches 1.0 (every training person above every
    # held-out one: what copies of their slices give) and p > 0.01 (all twelve runs above).
    spec = source_masks(ws, GenerateConfig(run="r"), LabelSchema.mmwhs(), 64)
    masks = np.stack([spec(i).mask for i in range(64)])
    synthetic = membership_audit((noise, masks), patients, n_classes=8)
    assert synthetic["max_auc"] < 0.95 and synthetic["joint_p_value"] > 0.01, synthetic


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """Six phantom people from outside the `twelve` workspace, ingested as one (every one in
    the train split): the people of an ``--anatomy-from`` model. ~5 s."""
    root = tmp_path_factory.mktemp("atlas")
    write_phantom(root / "src", volumes=6, seed=321, size=128, n_slices=32, workers=1)
    ws = open_workspace(root / "ws")
    ingest(ws, root / "src", IngestConfig(size=64, seed=0, split=(1.0, 0.0, 0.0)))
    ws.close()
    return root / "ws"


def test_a_model_of_people_from_outside_does_not_point_at_the_training_people(twelve, atlas):
    """The same shape model fitted on 6 people from outside the workspace (``--anatomy-from``)
    instead of the 6 training patients. Measured over generation seeds 0–5 (64 masks each):
    fitted on the training patients the mask share read 0.61–0.89 (mean 0.80; joint p
    0.027–0.38, three of six under 0.05), fitted on the outsiders 0.47–0.72 (mean 0.60;
    joint p 0.15–0.55). Asserted at seed 0 (training 0.89, joint p 0.027; outsiders 0.67,
    0.49): the lean goes with whose anatomy the model holds."""
    ws, _ = twelve
    patients = _patients(ws)
    audits = {}
    for who, people in (("training", None), ("outside", str(atlas))):
        cfg = GenerateConfig(run="r", anatomy_from=people)
        spec = source_masks(ws, cfg, LabelSchema.mmwhs(), 64)
        masks = np.stack([spec(i).mask for i in range(64)])
        noise = np.random.default_rng(0).random(masks.shape).astype(np.float32)
        audits[who] = membership_audit((noise, masks), patients, n_classes=8)
    share = {who: a["statistics"]["mask_share"]["auc"] for who, a in audits.items()}
    assert share["training"] > 0.8 and audits["training"]["joint_p_value"] < 0.05, share
    assert share["outside"] < 0.75 and audits["outside"]["joint_p_value"] > 0.25, share


def test_derived_anatomy_needs_a_reason_and_says_so(tmp_path):
    """Item 4: a batch of `augmented` (or `heldout`) masks exported silently, as if its label
    maps were no one's. Now refused without an admin's reason; with one, the manifest and the
    datasheet say the anatomy is derived from real patients."""
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


def test_the_release_says_whose_label_volumes_its_anatomy_model_was_fitted_on(tmp_path):
    """A synthetic batch drawn with ``--anatomy-from`` (a shape model of people from outside
    the training set) says so in the manifest and the datasheet; one drawn from the training
    patients' model says whose it is too; neither needs an admin's reason."""
    from tests.conftest import run
    from tests.test_release import fake_workspace

    outside = {"who": "outside the training set", "patients": 12}
    ws, _ = fake_workspace(
        tmp_path,
        [
            {
                "honeypot": False,
                "gates": True,
                "masks": "synthetic",
                "config": {"anatomy_people": outside},
                "cands": [(False, ("accept", None))] * 2,
            },
            {
                "honeypot": False,
                "gates": True,
                "masks": "synthetic",
                "cands": [(False, ("accept", None))] * 2,
            },
        ],
    )
    ok = run("export", "-w", ws, "--out", tmp_path / "o")
    assert ok.exit_code == 0, ok.stderr
    bundle = tmp_path / "o" / "Dataset500_CardiacSynth"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["batches"]["b0"]["anatomy_people"] == outside
    assert manifest["batches"]["b1"]["anatomy_people"] == {"who": "the training patients"}
    assert not manifest["anatomy"]["derived_from_real_patients"]
    sheet = (bundle / "DATASHEET.md").read_text()
    assert "batch b0 was fitted on 12 people from outside the training set" in sheet
    assert "batch b1 was fitted" not in sheet
    assert run("verify", bundle).exit_code == 0


def test_the_memorisation_gate_reads_the_patient_level_test():
    """The gate fails a synthetic batch only when the balanced share is over its bound and the
    patient-level test says chance does not explain it; a test that could not run (too few
    patients) and batches on real patients' anatomy are reported, not gated."""
    from pipeline.quality import _memorisation

    def failed(memo: dict) -> list[str] | None:
        m = _memorisation({"memorisation": memo})
        return None if m is None else _failed_gates(memorisation=m)

    synth = {"mask_source": "synthetic", "share_closer_to_training": 0.8, "p_value": 0.01}
    assert failed(synth) == ["max_memorisation_share"]
    assert failed({**synth, "p_value": 0.2}) == []  # over the bound, within chance
    assert failed({**synth, "share_closer_to_training": 0.55}) == []
    assert failed({**synth, "p_value": None, "note": "not testable"}) is None
    assert failed({**synth, "mask_source": "augmented"}) is None


def test_the_largest_auc_is_read_against_what_chance_reaches():
    """At 12 + 12 patients a release that points at nobody still shows some AUC above 0.65
    in a third of arrangements (four statistics, each 0.65+ one time in ten): the audit says
    how large the largest AUC gets by chance, from its own permutations."""
    rng = np.random.default_rng(7)
    member = {f"p{i:02d}": i < 12 for i in range(24)}
    owners = [p for p in sorted(member) for _ in range(3)]
    masks = rng.integers(0, 3, (len(owners), 16, 16)).astype(np.uint8)
    images = rng.random((len(owners), 16, 16)).astype(np.float32)
    cands = (rng.random((20, 16, 16)).astype(np.float32), rng.integers(0, 3, (20, 16, 16)))
    out = membership_audit(cands, Patients(images, masks, owners, member), n_classes=3)
    per = out["per_patient"]
    names = sorted(per)
    is_member = np.array([per[p]["member"] for p in names])
    # the same quantile, from 2000 random relabellings of the audit's own per-patient scores
    draws = np.random.default_rng(1)
    largest = []
    for _ in range(2000):
        row = np.zeros(len(names), bool)
        row[draws.choice(len(names), int(is_member.sum()), replace=False)] = True
        largest.append(
            max(
                auc(
                    np.array([per[p][s] for p in np.array(names)[row]]),
                    np.array([per[p][s] for p in np.array(names)[~row]]),
                )
                for s in ("mask_best", "mask_share", "image_best", "image_share")
            )
        )
    assert out["max_auc_chance_q95"] == pytest.approx(np.quantile(largest, 0.95), abs=0.02)
    assert 0.65 < out["max_auc_chance_q95"] < 0.9
    from pipeline.render import membership_line

    assert f"chance alone reaches {out['max_auc_chance_q95']:.2f}" in membership_line(out)


def test_a_bound_passed_only_by_chance_reads_so():
    """'0.6875 ≤ 0.65 → pass' read as arithmetic gone wrong: the line says the bound is
    crossed and why the gate still passes."""
    from pipeline.render import gate_table

    over = {"gate": "max_membership_auc", "value": 0.6875, "threshold": 0.65, "passed": True,
            "joint_p": 0.362}  # fmt: skip
    within = {**over, "value": 0.6}
    fail = {**over, "passed": False, "joint_p": 0.01}
    lines = gate_table({"b": [over, within, fail]}, markdown=False)
    assert lines[0] == (
        "gate max_membership_auc: 0.6875 > 0.65 → pass (joint p 0.362: within chance)"
    )
    assert lines[1] == "gate max_membership_auc: 0.6000 ≤ 0.65 → pass (joint p 0.362)"
    assert lines[2] == "gate max_membership_auc: 0.6875 > 0.65 → FAIL (joint p 0.010)"


def test_region_views_point_where_the_copies_are():
    """bench/membership_regions.py: candidates that are the training patients' own slices point
    at the training patients in every view that keeps what tells people apart (share AUC 1),
    and copies of the held-out patients' slices point the other way (0)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "membership_regions.py"
    spec = importlib.util.spec_from_file_location("membership_regions", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    images, masks, owners = [], [], []
    for p in range(12):  # each person a body of their own size, a heart and a texture
        body = ((yy - 16) / (9 + p % 5)) ** 2 + ((xx - 16) / (10 + p // 3)) ** 2 < 1
        heart = ((yy - 15 - p % 3) ** 2 + (xx - 17 + p % 4) ** 2) < 9
        for _ in range(3):
            img = np.where(body, 0.3 + 0.05 * rng.standard_normal((32, 32)), 0.0)
            images.append(np.where(heart, 0.8, img).astype(np.float32))
            masks.append(heart.astype(np.uint8))
            owners.append(f"p{p:02d}")
    images, masks = np.stack(images), np.stack(masks)
    member = {f"p{p:02d}": p < 6 for p in range(12)}
    trained = np.array([member[o] for o in owners])
    as_members = bench.region_aucs(
        (images[trained], masks[trained]), (images, masks), owners, member
    )
    as_others = bench.region_aucs(
        (images[~trained], masks[~trained]), (images, masks), owners, member
    )
    assert set(as_members) == set(bench.VIEWS)
    for view in ("full", "fine", "outside heart"):
        assert as_members[view]["share"] == 1.0 and as_others[view]["share"] == 0.0, view
