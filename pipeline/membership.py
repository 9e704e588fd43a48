"""Patient-level membership audit: does a batch tell an attacker who was in the training set?

The attacker holds one patient's real slices and label maps and asks whether the release points
at that patient. Two channels, because a bundle ships both: the **masks** (multi-label Dice of a
candidate's label map with a real one) and the **images** (pixel correlation). Two statistics
each, per patient: ``best`` (the highest similarity of any candidate to any of the patient's
slices) and ``share`` (the share of candidates whose most similar real slice is the patient's).
Training patients are members, held-out (val + test) patients are not; for each statistic the
AUC of members against non-members (Mann–Whitney, ties count half), an exact (or, past
``MAX_EXACT`` arrangements, seeded Monte Carlo) permutation p-value over patients, a joint
p-value for the largest AUC of all four (the same permutations, so the four looks are paid for
once), and a 95% bootstrap interval (patients resampled within each group). Pure: arrays in,
numbers out; the caller loads the slices.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The fewest patients per group for the audit to mean something. Measured: with the demo's
#: 7 + 3 patients the masks of three phantom people from *outside* the workspace scored a
#: best-Dice AUC of 1.00 (p = 0.017) — the three held-out people are the least typical of the
#: ten, so anyone's anatomy is nearer the training ones — and so did the `augmented` masks;
#: with 6 + 6 outsiders read 0.49–0.58 and near-copies of training slices were caught
#: (image-share AUC 0.93, joint p 0.017). One AUC's chance spread is 0.21 at 7 + 3, 0.17 at
#: 6 + 6, 0.12 at 12 + 12.
MIN_PER_GROUP = 6
#: Past this many arrangements of the labels, the permutation test samples them.
MAX_EXACT = 20_000
STATISTICS = ("mask_best", "mask_share", "image_best", "image_share")


@dataclass(frozen=True)
class Patients:
    """The real slices of every patient: images [0, 1], class-index masks, owner, membership."""

    images: np.ndarray  # (M, H, W) float32
    masks: np.ndarray  # (M, H, W) uint8
    patient: list[str]  # per slice
    member: dict[str, bool]  # patient → trained on


def mask_similarity(a: np.ndarray, b: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, M) multi-label Dice of label maps ``a`` (N, H, W) with ``b`` (M, H, W) over the
    foreground classes 1..n_classes-1; 0 where either map is empty (no anatomy, no evidence)."""
    a2, b2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter = np.zeros((len(a), len(b)), np.float64)
    size_a = np.zeros(len(a), np.float64)
    size_b = np.zeros(len(b), np.float64)
    for c in range(1, n_classes):
        ha, hb = (a2 == c).astype(np.float32), (b2 == c).astype(np.float32)
        inter += ha @ hb.T
        size_a += ha.sum(1)
        size_b += hb.sum(1)
    total = size_a[:, None] + size_b[None, :]
    dice = np.divide(2 * inter, total, out=np.zeros_like(inter), where=total > 0)
    dice[(size_a == 0)[:, None] | (size_b == 0)[None, :]] = 0.0
    return dice.astype(np.float32)


def image_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) Pearson correlation of images ``a`` (N, H, W) with ``b`` (M, H, W) over pixels
    (0 for a constant image)."""

    def standard(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1).astype(np.float64)
        x = x - x.mean(1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)

    return (standard(a) @ standard(b).T).astype(np.float32)


def patient_statistics(similarity: np.ndarray, owners: list[str]) -> dict[str, dict[str, float]]:
    """Per patient ``best`` and ``share`` from an (N candidates, M real slices) similarity. A
    candidate whose most similar slices belong to k patients counts 1/k to each: an argmax
    gave it to whichever came first in the slice order (the training split, in a workspace),
    and a candidate like no slice at all (every similarity 0) to that patient too."""
    owners_arr = np.asarray(owners)
    names = sorted(set(owners))
    n = similarity.shape[0]
    if n == 0:
        return {p: {"best": 0.0, "share": 0.0} for p in names}
    columns = [owners_arr == p for p in names]
    at_max = similarity >= similarity.max(1, keepdims=True)
    nearest = np.stack([at_max[:, cols].any(1) for cols in columns], 1).astype(float)
    weight = nearest / nearest.sum(1, keepdims=True)
    best = [float(similarity[:, cols].max()) for cols in columns]
    return {p: {"best": best[i], "share": float(weight[:, i].mean())} for i, p in enumerate(names)}


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(a member scores above a non-member), ties counting half (Mann–Whitney U / n m)."""
    diff = np.asarray(members, float)[:, None] - np.asarray(others, float)[None, :]
    return float((np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size)


def _arrangements(n: int, k: int, seed: int) -> np.ndarray:
    """Member masks over ``n`` patients with ``k`` members: every arrangement when there are
    at most ``MAX_EXACT``, else ``MAX_EXACT`` seeded draws (rows: boolean masks)."""
    if math.comb(n, k) <= MAX_EXACT:
        rows = []
        for chosen in itertools.combinations(range(n), k):
            row = np.zeros(n, bool)
            row[list(chosen)] = True
            rows.append(row)
        return np.array(rows)
    rng = np.random.default_rng([seed, 24])
    rows = np.zeros((MAX_EXACT, n), bool)
    for i in range(MAX_EXACT):
        rows[i, rng.choice(n, size=k, replace=False)] = True
    return rows


def testable(n_members: int, n_others: int) -> str | None:
    """None when the audit can run, else the one line that says why not."""
    if n_members >= MIN_PER_GROUP and n_others >= MIN_PER_GROUP:
        return None
    return (
        f"membership audit not testable: {n_members} training and {n_others} held-out "
        f"patient(s); it needs at least {MIN_PER_GROUP} in each group (with 3 held out, "
        "anatomy from outside the workspace scored AUC 1.00: who is typical, not who was "
        "trained on)"
    )


def nearest_share_test(
    nearest: list[str], member: dict[str, bool], *, seed: int = 0
) -> dict[str, Any]:
    """The memorisation test of a batch: ``nearest`` names, per candidate, the patient whose
    slice is most like it (each patient given the same number of slices), ``member`` every
    patient's membership. Reports how many candidates land nearest a training patient, the
    share a balanced comparison would give (``(T/m) / (T/m + (1-T)/h)`` for share T and group
    sizes m, h: ½ at chance, the plain share when m = h), and a permutation p-value over
    *patients* (as :func:`membership_audit`'s): a batch from one model shares its traits, so
    its candidates are not independent draws and a binomial test over candidates is not
    calibrated (measured: 70 of 200 random splits of 20 phantom people "failed" it at 5% for
    candidates from four people nobody trained on; this test: 6 of 200). ``p_value`` is None,
    with a ``note``, when a group has fewer than :data:`MIN_PER_GROUP` patients."""
    names = sorted(member)
    is_member = np.array([member[p] for p in names])
    m, h = int(is_member.sum()), int((~is_member).sum())
    tally = Counter(nearest)
    counts = np.array([tally[p] for p in names], float)
    total = max(len(nearest), 1)
    share = float(counts[is_member].sum() / total)
    rate_m, rate_h = share / max(m, 1), (1 - share) / max(h, 1)
    balanced = rate_m / (rate_m + rate_h) if rate_m + rate_h > 0 else 0.5
    out: dict[str, Any] = {
        "candidates": len(nearest),
        "patients": {"training": m, "held_out": h},
        "closer_to_training": int(counts[is_member].sum()),
        "share_nearest_training": share,
        "chance_share": m / max(m + h, 1),
        "share_closer_to_training": float(balanced),
    }
    note = testable(m, h)
    if note is not None:
        out.update(p_value=None, note=note.replace("membership audit", "memorisation test"))
        return out
    arrangements = _arrangements(len(names), m, seed)
    null = arrangements.astype(float) @ counts
    out["p_value"] = float(np.mean(null >= counts[is_member].sum() - 1e-9))
    out["permutations"] = "exact" if math.comb(m + h, m) <= MAX_EXACT else f"{MAX_EXACT} draws"
    return out


def membership_audit(
    candidates: tuple[np.ndarray, np.ndarray],
    patients: Patients,
    *,
    n_classes: int,
    seed: int = 0,
    boot: int = 2000,
) -> dict[str, Any]:
    """The audit of one batch (images, masks) against every patient; see the module text.
    Returns ``testable: False`` and a ``note`` when a group has fewer than
    :data:`MIN_PER_GROUP` patients. Per-patient scores are returned under ``per_patient``
    (the caller keeps them inside the hospital: they name patients)."""
    names = sorted(patients.member)
    is_member = np.array([patients.member[p] for p in names])
    note = testable(int(is_member.sum()), int((~is_member).sum()))
    if note is not None:
        return {"testable": False, "note": note}
    images, masks = candidates
    per: dict[str, dict[str, dict[str, float]]] = {
        "mask": patient_statistics(
            mask_similarity(masks, patients.masks, n_classes), patients.patient
        ),
        "image": patient_statistics(image_similarity(images, patients.images), patients.patient),
    }
    scores = {
        f"{channel}_{stat}": np.array([per[channel].get(p, {stat: 0.0})[stat] for p in names])
        for channel in ("mask", "image")
        for stat in ("best", "share")
    }
    arrangements = _arrangements(len(names), int(is_member.sum()), seed)
    rng = np.random.default_rng([seed, 25])
    members_idx, others_idx = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    boots = [
        (rng.choice(members_idx, len(members_idx)), rng.choice(others_idx, len(others_idx)))
        for _ in range(boot)
    ]
    out: dict[str, Any] = {}
    permuted_max = np.full(len(arrangements), -np.inf)
    for name in STATISTICS:
        s = scores[name]
        observed = auc(s[is_member], s[~is_member])
        perm = np.array([auc(s[row], s[~row]) for row in arrangements])
        permuted_max = np.maximum(permuted_max, perm)
        dist = [auc(s[m], s[o]) for m, o in boots]
        out[name] = {
            "auc": observed,
            "ci95": [float(np.percentile(dist, 2.5)), float(np.percentile(dist, 97.5))],
            "p_value": float(np.mean(perm >= observed - 1e-12)),
        }
    largest = max(out[n]["auc"] for n in STATISTICS)
    return {
        "testable": True,
        "patients": {"training": int(is_member.sum()), "held_out": int((~is_member).sum())},
        "candidates": len(images),
        "permutations": "exact"
        if math.comb(len(names), int(is_member.sum())) <= MAX_EXACT
        else f"{MAX_EXACT} seeded draws",
        "statistics": out,
        "max_auc": largest,
        "joint_p_value": float(np.mean(permuted_max >= largest - 1e-12)),
        # how large the largest of the four AUCs gets when nobody is pointed at: at 12 + 12
        # patients it passes 0.65 in a third of arrangements, so a threshold alone would
        # fail private releases by chance
        "max_auc_chance_q95": float(np.quantile(permuted_max, 0.95)),
        "per_patient": {
            p: {"member": bool(patients.member[p]), **{n: float(scores[n][i]) for n in STATISTICS}}
            for i, p in enumerate(names)
        },
    }
