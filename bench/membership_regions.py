"""Which part of a candidate points at the training patients? (issue 24)

The membership audit's image channel scores a patient by the share of a batch's candidates
whose most correlated real slice is that patient's (and by the best correlation). When it
points at the training patients, this script says where in the picture the evidence lies:
the same two AUCs (training vs held-out patients) with candidates and real slices reduced
alike to one region or one band of spatial frequencies:

* ``full``: the audit's own figure;
* ``coarse`` (Gaussian low-pass, σ 2 px) and ``fine`` (the rest): layout vs texture;
* ``heart``: only the labelled structures (+2 px); ``outside heart``: everything else;
* ``silhouette``: only the body outline (pixels above air);
* ``drawn anatomy``: no picture at all, the label map drawn flat inside the silhouette (each
  structure its own grey): what the anatomy alone says, whatever the generator paints.

    .venv/bin/python bench/membership_regions.py --workspace WS --batch BATCH

A trained run and a generated batch are needed, so this is not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"
AIR = 0.05  # display [0, 1]: above this a pixel is inside the body
SIGMA = 2.0


def _lowpass(x: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(x, (0, SIGMA, SIGMA))


def _near_labels(masks: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(masks > 0, np.ones((1, 3, 3), bool), iterations=2)


VIEWS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "full": lambda x, m: x,
    "coarse": lambda x, m: _lowpass(x),
    "fine": lambda x, m: x - _lowpass(x),
    "heart": lambda x, m: np.where(_near_labels(m), x, 0.0),
    "outside heart": lambda x, m: np.where(_near_labels(m), 0.0, x),
    "silhouette": lambda x, m: (x > AIR).astype(np.float32),
    "drawn anatomy": lambda x, m: np.where(m > 0, 0.3 + 0.1 * m, 0.2 * (x > AIR)).astype(
        np.float32
    ),
}


def region_aucs(
    candidates: tuple[np.ndarray, np.ndarray],
    real: tuple[np.ndarray, np.ndarray],
    owners: list[str],
    member: dict[str, bool],
) -> dict[str, dict[str, float]]:
    """For each of :data:`VIEWS`, the image channel's share and best AUCs (training vs held-out
    patients) with candidates and real slices (images [0, 1], class-index masks) viewed alike."""
    from pipeline.membership import auc, image_similarity, patient_statistics

    names = sorted(member)
    is_member = np.array([member[p] for p in names])
    out: dict[str, dict[str, float]] = {}
    for view, fn in VIEWS.items():
        sim = image_similarity(fn(*candidates), fn(*real))
        stats = patient_statistics(sim, owners)
        out[view] = {}
        for stat in ("share", "best"):
            s = np.array([stats[p][stat] for p in names])
            out[view][stat] = auc(s[is_member], s[~is_member])
    return out


def measure(ws_root: Path, batch: str) -> dict[str, Any]:
    """Every view's AUCs for one batch, as a JSON-ready dict."""
    from pipeline.candidates import batch_images
    from pipeline.slices import load_slices, workspace_refs
    from pipeline.workspace import open_workspace

    ws = open_workspace(ws_root, create=False)
    _, _, images, masks = batch_images(ws, batch)
    refs = workspace_refs(ws)
    real = load_slices(ws, refs, images.shape[-1])
    member = {r.patient: r.split == "train" for r in refs}
    aucs = region_aucs((images, masks), real, [r.patient for r in refs], member)
    ws.close()
    return {
        "workspace": str(ws_root),
        "batch": batch,
        "candidates": len(images),
        "patients": {
            "training": sum(member.values()),
            "held_out": len(member) - sum(member.values()),
        },
        "aucs": aucs,
    }


def main() -> None:
    """Parse, measure, print the table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--out", type=Path, default=RESULTS / "membership_regions.json")
    args = ap.parse_args()
    result = measure(args.workspace, args.batch)
    p = result["patients"]
    print(
        f"{result['batch']}: {result['candidates']} candidates, "
        f"{p['training']} training vs {p['held_out']} held-out patients"
    )
    print(f"{'view':<16}{'share AUC':>10}{'best AUC':>10}")
    for view, a in result["aucs"].items():
        print(f"{view:<16}{a['share']:>10.2f}{a['best']:>10.2f}")
    print("(0.5: the view says nothing about who was trained on)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
