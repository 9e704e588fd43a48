"""Is the release useful? Train a segmenter on synthetic data, test it on real patients.

Three arms, one code path (``models.segmenter``, fixed step budget, seeded): (a) the batch's
unflagged candidates, (b) the same number of real training-split slices, (c) both; each tested
on the real held-out (val + test) patients, over several seeds because segmenter training is
noisy. TSTR/TRTR = Dice(a) / Dice(b); augmentation gain = Dice(c) − Dice(b).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.metrics import dice
from pipeline.progress import Progress

ARMS = ("synthetic", "real", "real+synthetic")


@dataclass(frozen=True)
class UtilityConfig:
    """The segmenter's budget (the same for every arm and seed)."""

    steps: int = 300
    seeds: int = 3
    width: int = 8
    depth: int = 3
    batch: int = 16


def utility_study(
    synthetic: tuple[np.ndarray, np.ndarray],
    real_train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    class_names: list[str],
    cfg: UtilityConfig,
    progress: Progress = iter,
) -> dict[str, Any]:
    """Dice per structure and mean (mean ± sd over ``cfg.seeds``) of each arm on ``test``; each
    pair is (images in [0, 1], class-index masks), (N, S, S)."""
    from models.segmenter import SegmenterConfig, segment, train_segmenter

    syn_x, syn_y = synthetic
    real_x, real_y = real_train
    test_x, test_y = test
    if len(syn_x) == 0:
        raise ValueError("no synthetic images to train on (every candidate flagged?)")
    if len(real_x) == 0 or len(test_x) == 0:
        raise ValueError("utility needs real training slices and real held-out slices")
    n = len(syn_x)
    seg = SegmenterConfig(
        size=int(test_x.shape[1]),
        classes=len(class_names),
        width=cfg.width,
        depth=min(cfg.depth, int(np.log2(test_x.shape[1])) - 2),
        steps=cfg.steps,
        batch=cfg.batch,
    )
    scores: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS}
    runs = [(seed, arm) for seed in range(cfg.seeds) for arm in ARMS]
    for seed, arm in progress(runs):
        pick = np.random.default_rng([seed, 7]).choice(len(real_x), size=min(n, len(real_x)))
        if arm == "synthetic":
            x, y = syn_x, syn_y
        elif arm == "real":
            x, y = real_x[pick], real_y[pick]
        else:
            x, y = np.concatenate([real_x[pick], syn_x]), np.concatenate([real_y[pick], syn_y])
        model = train_segmenter(x, y, seg, seed=seed)
        scores[arm].append(dice(segment(model, test_x), test_y, classes=len(class_names)))
    arms = {}
    for arm, per_seed in scores.items():
        table = np.array(per_seed)  # (seeds, structures)
        means = np.nanmean(table, axis=1)  # each seed's mean over the structures it saw
        arms[arm] = {
            "dice_mean": float(np.mean(means)),
            "dice_sd": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
            "per_structure": {
                name: float(np.nanmean(table[:, c]))
                for c, name in enumerate(class_names[1:])
                if not np.all(np.isnan(table[:, c]))
            },
        }
    real_dice = arms["real"]["dice_mean"]
    return {
        "arms": arms,
        "tstr_trtr": arms["synthetic"]["dice_mean"] / real_dice if real_dice > 0 else 0.0,
        "augmentation_gain": arms["real+synthetic"]["dice_mean"] - real_dice,
        "n_train": n,
        "n_test": len(test_x),
        "seeds": cfg.seeds,
        "segmenter": {**seg.to_dict(), **{k: v for k, v in asdict(cfg).items() if k == "seeds"}},
    }
