"""Is the release useful? Train a segmenter on synthetic data, test it on real patients.

Three arms, one code path (``models.segmenter``, fixed step budget), each tested on the real
held-out (val + test) patients: (a) the batch's unflagged candidates, (b) as many real
training-split slices, drawn without replacement, (c) both. Seeds are paired: seed *s* gives
every arm the same initial weights and step count, so the per-seed ratio Dice(a) / Dice(b)
compares arms, not initialisations. TSTR/TRTR is reported with a 95% percentile-bootstrap
interval over seeds *and* held-out patients (a ratio of two noisy means needs one), and the gate
reads its lower bound: one lucky seed cannot carry a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.metrics import dice_counts
from pipeline.progress import Progress

ARMS = ("synthetic", "real", "real+synthetic")


@dataclass(frozen=True)
class UtilityConfig:
    """The segmenter's budget (the same for every arm and seed) and the interval's draws."""

    steps: int = 300
    seeds: int = 3
    width: int = 8
    depth: int = 3
    batch: int = 16
    draws: int = 2000  # bootstrap draws over seeds and held-out patients (seeded)
    # the third arm (real + synthetic: does the batch add to real data?); off, the study costs
    # a third less (the demo's budget) and reports no augmentation gain
    mixed: bool = True


def utility_study(
    synthetic: tuple[np.ndarray, np.ndarray],
    real_train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    class_names: list[str],
    cfg: UtilityConfig,
    test_patients: list[str] | None = None,
    real_patients: list[str] | None = None,
    progress: Progress = iter,
) -> dict[str, Any]:
    """Dice of each arm on ``test`` (per seed, mean ± sd, per structure, 95% intervals) and
    TSTR/TRTR with its interval. Each pair is (images in [0, 1], class-index masks), (N, S, S);
    ``test_patients`` names each test slice's patient (the bootstrap resamples patients; none
    given: every slice its own), ``real_patients`` each real training slice's (to report how
    many patients the real arm saw)."""
    from models.segmenter import Segmenter, SegmenterConfig

    syn_x, syn_y = synthetic
    real_x, real_y = real_train
    test_x, test_y = test
    if len(syn_x) == 0:
        raise ValueError("no synthetic images to train on (every candidate flagged?)")
    if len(real_x) == 0 or len(test_x) == 0:
        raise ValueError("utility needs real training slices and real held-out slices")
    patients = list(test_patients) if test_patients is not None else list(range(len(test_x)))
    if len(patients) != len(test_x):
        raise ValueError("test_patients must name the patient of every test slice")
    groups = {p: i for i, p in enumerate(dict.fromkeys(patients))}
    patient_of = np.array([groups[p] for p in patients])
    # equal size and equal distinctness: n distinct images per arm, never a slice twice
    n = min(len(syn_x), len(real_x))
    seg = SegmenterConfig(
        size=int(test_x.shape[1]),
        classes=len(class_names),
        width=cfg.width,
        depth=min(cfg.depth, int(np.log2(test_x.shape[1])) - 2),
        steps=cfg.steps,
        batch=cfg.batch,
    )
    k = len(class_names) - 1
    arms = ARMS if cfg.mixed else ARMS[:2]
    counts = np.zeros((cfg.seeds, len(arms), len(groups), k, 2))
    seen: set[str] = set()
    segmenter = Segmenter(seg)
    runs = [(seed, a) for seed in range(cfg.seeds) for a in range(len(arms))]
    for seed, a in progress(runs):
        draw = np.random.default_rng([seed, 7])
        pick_real = np.sort(draw.choice(len(real_x), size=n, replace=False))
        pick_syn = np.sort(draw.choice(len(syn_x), size=n, replace=False))
        if real_patients is not None and ARMS[a] != "synthetic":
            seen.update(real_patients[i] for i in pick_real)
        if ARMS[a] == "synthetic":
            x, y = syn_x[pick_syn], syn_y[pick_syn]
        elif ARMS[a] == "real":
            x, y = real_x[pick_real], real_y[pick_real]
        else:
            x = np.concatenate([real_x[pick_real], syn_x[pick_syn]])
            y = np.concatenate([real_y[pick_real], syn_y[pick_syn]])
        pred = segmenter.train(x, y, seed=seed).segment(test_x)
        for g in range(len(groups)):
            rows = patient_of == g
            counts[seed, a, g] = dice_counts(pred[rows], test_y[rows], classes=len(class_names))
    result = summarise_utility(counts, class_names=class_names, draws=cfg.draws)
    return {
        **result,
        "n_train": n,
        "n_test": len(test_x),
        "test_patients": len(groups),
        "real_patients_seen": len(seen) if real_patients is not None else None,
        "seeds": cfg.seeds,
        "segmenter": {**seg.to_dict(), "seeds": cfg.seeds},
    }


def _pooled_dice(counts: np.ndarray) -> np.ndarray:
    """(..., structures, 2) intersection / total counts → Dice (NaN where a structure is absent
    from both prediction and truth)."""
    inter, total = counts[..., 0], counts[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), np.nan)


def _mean_over_structures(d: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        present = np.isfinite(d)
        return np.where(present.any(-1), np.nansum(d, -1) / np.maximum(present.sum(-1), 1), 0.0)


def summarise_utility(
    counts: np.ndarray,
    *,
    class_names: list[str],
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Arm figures and TSTR/TRTR from Dice counts, pure.

    ``counts``: (seeds, arms, patients, structures, 2) of (|P∩T|, |P| + |T|) per seed, arm
    (``ARMS`` order; the first two alone: no augmentation gain), held-out patient and
    structure. An arm's Dice for a seed is pooled over
    the patients, then averaged over the structures present; its figure is the mean over seeds.
    The interval resamples seeds and patients with replacement (``draws`` times, seeded) and
    recomputes every figure, so it carries both the training noise and which patients happened
    to be held out; ``level`` is two-sided.
    """
    counts = np.asarray(counts, np.float64)
    n_seeds, n_arms, n_pat = counts.shape[:3]
    if n_arms not in (2, len(ARMS)):
        raise ValueError(f"counts must hold the arms {ARMS} (or the first two)")
    per_seed = _mean_over_structures(_pooled_dice(counts.sum(axis=2)))  # (seeds, arms)
    per_struct = _pooled_dice(counts.sum(axis=2))  # (seeds, arms, structures)

    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, n_seeds, size=(draws, n_seeds))
    p_w = np.stack(
        [np.bincount(r, minlength=n_pat) for r in rng.integers(0, n_pat, (draws, n_pat))]
    )
    pooled = np.einsum("dp,sapkc->dsakc", p_w.astype(np.float64), counts)  # (draws, seeds, ...)
    boot_struct = _pooled_dice(pooled)  # (draws, seeds, arms, structures)
    boot_seed = _mean_over_structures(boot_struct)  # (draws, seeds, arms)
    take = np.take_along_axis(boot_seed, s_idx[:, :, None], axis=1)  # resampled seeds
    boot_arm = take.mean(axis=1)  # (draws, arms)
    with np.errstate(invalid="ignore"):
        boot_struct_arm = np.nanmean(
            np.take_along_axis(boot_struct, s_idx[:, :, None, None], axis=1), axis=1
        )
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(values: np.ndarray) -> list[float] | None:
        v = values[np.isfinite(values)]
        if len(v) < 0.9 * len(values):  # a denominator at zero in many draws: no honest interval
            return None
        return [float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))]

    arms: dict[str, Any] = {}
    for a, arm in enumerate(ARMS[:n_arms]):
        means = per_seed[:, a]
        arms[arm] = {
            "dice_mean": float(means.mean()),
            "dice_sd": float(np.std(means, ddof=1)) if n_seeds > 1 else 0.0,
            "dice_per_seed": [float(v) for v in means],
            "dice_interval": interval(boot_arm[:, a]),
            "per_structure": {},
        }
        for c, name in enumerate(class_names[1:]):
            col = per_struct[:, a, c]
            if np.all(np.isnan(col)):
                continue
            arms[arm]["per_structure"][name] = {
                "dice": float(np.nanmean(col)),
                "interval": interval(boot_struct_arm[:, a, c]),
            }
    syn, real = per_seed[:, 0], per_seed[:, 1]
    real_mean = float(real.mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_ratio = boot_arm[:, 0] / boot_arm[:, 1]
        seed_ratio = np.where(real > 0, syn / np.where(real > 0, real, 1.0), np.nan)
    boot_ratio[~np.isfinite(boot_ratio)] = np.nan
    ratio_ci = interval(boot_ratio)
    return {
        "arms": arms,
        "tstr_trtr": float(syn.mean()) / real_mean if real_mean > 0 else 0.0,
        "tstr_trtr_interval": ratio_ci,
        # the gate reads this: no interval (the real arm at zero too often) reads as 0
        "tstr_trtr_lower": ratio_ci[0] if ratio_ci is not None else 0.0,
        "tstr_trtr_per_seed": [None if np.isnan(r) else float(r) for r in seed_ratio],
        "augmentation_gain": float(per_seed[:, 2].mean()) - real_mean if n_arms > 2 else None,
        "augmentation_gain_interval": interval(boot_arm[:, 2] - boot_arm[:, 1])
        if n_arms > 2
        else None,
        "interval": {"level": level, "draws": draws, "over": "seeds and held-out patients"},
    }
