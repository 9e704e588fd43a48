"""Patient-level train/val/test splits: seeded, stable when patients are added later."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.errors import PipelineError

SPLITS: tuple[str, str, str] = ("train", "val", "test")


def parse_fractions(text: str) -> tuple[float, float, float]:
    """Parse ``"0.7,0.15,0.15"`` into train/val/test fractions that sum to 1."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise PipelineError(f"--split {text!r}: expected three fractions train,val,test")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise PipelineError(f"--split {text!r}: fractions must be numbers") from None
    if any(v < 0 or not math.isfinite(v) for v in values) or not math.isclose(
        sum(values), 1.0, abs_tol=1e-6
    ):
        raise PipelineError(f"--split {text!r}: fractions must be non-negative and sum to 1")
    if values[0] <= 0:
        raise PipelineError(f"--split {text!r}: the train fraction must be positive")
    return values  # type: ignore[return-value]


def target_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Patients per split for ``n``: largest remainder, then at least one per asked-for set.

    A set with a positive fraction gets a patient whenever ``n`` allows it, taken from the
    largest set.
    """
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def assign_splits(
    existing: Mapping[str, str],
    new: Sequence[str],
    fractions: Sequence[float],
    seed: int,
) -> dict[str, str]:
    """Assign each new patient to a split; existing assignments never change.

    The new patients are shuffled with ``seed`` and each goes to the set furthest below its
    target for the combined (existing + new) cohort, so the overall fractions stay balanced as
    sources are added.
    """
    if len(set(new)) != len(new):
        raise PipelineError("duplicate patient ids in one ingest")
    overlap = sorted(set(new) & set(existing))
    if overlap:
        raise PipelineError(f"patients already have a split: {', '.join(overlap[:5])}")
    total = len(existing) + len(new)
    targets = target_counts(total, fractions)
    counts = [sum(1 for s in existing.values() if s == name) for name in SPLITS]
    rng = np.random.default_rng(seed)
    order = [sorted(new)[i] for i in rng.permutation(len(new))]
    assigned: dict[str, str] = {}
    for patient in order:
        best = max(range(len(SPLITS)), key=lambda i: (targets[i] - counts[i], -i))
        counts[best] += 1
        assigned[patient] = SPLITS[best]
    return assigned


def check_required(counts: Mapping[str, int], fractions: Sequence[float], text: str) -> None:
    """Refuse a split that leaves a set the user asked for (positive fraction) without patients."""
    empty = [
        name for name, f in zip(SPLITS, fractions, strict=True) if f > 0 and not counts.get(name)
    ]
    if empty:
        n = sum(counts.values())
        raise PipelineError(
            f"--split {text} over {n} patient(s) leaves {', '.join(empty)} empty; "
            "add patients or set those fractions to 0"
        )
