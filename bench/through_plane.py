"""Through the plane: does a volume painted slice by slice hold together like a real scan?

Issue 25's yardstick for slice-consistent generation, measured on a trained run as it is
today (its generator paints each axial slice from that slice's label map alone). Three sets of
volumes are compared with the real held-out volumes, each beside a size-matched real-vs-real
baseline (``pipeline.metrics``):

* ``synthetic``: label volumes from the run's anatomy model (as ``generate`` draws them), at
  the training volumes' median slice count, painted slice by slice;
* ``real anatomy``: the held-out patients' own label volumes painted slice by slice (the
  painter alone, with the anatomy fixed);
* for scale, the real volumes themselves are the baseline of every figure.

Figures: adjacent-slice agreement (KS and W1 in HU of |v[z+1] − v[z]| inside the body and per
structure), and Fréchet distance in the axial, coronal and sagittal planes (the workspace's
gate encoder) with the off-plane/axial ratios (raw, as MAISI reports them, and over each
plane's own baseline).

    .venv/bin/python bench/through_plane.py --workspace WS --run RUN [--volumes 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"


def measure(
    ws_root: Path,
    run_name: str,
    volumes: int,
    seed: int,
    picture: Path | None = None,
    *,
    with_noise: bool = True,
) -> dict[str, Any]:
    """Every figure for one run, as a JSON-ready dict (and, with ``picture``, a PNG of one
    real held-out volume, its anatomy painted, and a painted synthetic volume, three planes
    each). ``with_noise``: every painted slice gets its own draw of the run's scanner noise
    (:func:`pipeline.generate.noise_model`), as ``generate --volumes`` paints them."""

    from models.gan import generate_images
    from pipeline.anatomy import sample_anatomy
    from pipeline.generate import anatomy_model, noise_model, shell_classes
    from pipeline.metrics import adjacent_differences, matched_agreement, plane_distribution
    from pipeline.noise import add_noise
    from pipeline.preprocess import body_outlines
    from pipeline.quality import GateConfig, feature_extractor
    from pipeline.runs import find_run, load_generator
    from pipeline.slices import (
        HELDOUT,
        load_slices,
        planar_files,
        volume_neighbours,
        volume_rows,
        workspace_refs,
    )
    from pipeline.workspace import open_workspace

    ws = open_workspace(ws_root)
    run = find_run(ws, run_name)
    cfg, schema = run.model, run.schema
    size, names = cfg.size, schema.names
    lo, hi = run.units[1]
    scale = float(hi - lo)  # [0, 1] → HU
    generator = load_generator(run.generator_path, run.generator_sha256)
    planar = planar_files(ws)

    refs = workspace_refs(ws, HELDOUT)
    images, masks = load_slices(ws, refs, size)
    bodies = body_outlines(images, masks)
    groups = [g for g in volume_rows(refs, planar) if len(g) > 1]
    real = [(images[g], masks[g], bodies[g]) for g in groups]
    patients = [refs[g[0]].patient for g in groups]
    train_refs = workspace_refs(ws, ["train"])
    depth = int(np.median([len(g) for g in volume_rows(train_refs, planar) if len(g) > 1]))

    noise = noise_model(ws, run, generator)[0] if with_noise else None
    rng = np.random.default_rng([seed, 26])

    def paint(labels: np.ndarray, body: np.ndarray) -> np.ndarray:
        # a 2.5-D run sees each slice's neighbours in its own volume
        near = volume_neighbours(labels, cfg.neighbours) if cfg.neighbours else None
        painted = generate_images(generator, labels, cfg, bodies=body, neighbours=near)
        if noise is None:
            return painted
        # each slice its own draw of the run's scanner noise, as generate --volumes does
        return np.stack([add_noise(p, noise, rng) for p in painted])

    t0 = time.perf_counter()
    model, _ = anatomy_model(ws, run.name, schema, size, body=cfg.body)
    shell = shell_classes(schema)
    myo, lv = shell if shell else (None, None)
    synthetic = []
    for i in range(volumes):
        s = sample_anatomy(model, [seed, i, 25], myo=myo, lv=lv)
        labels, body = model.place(s.maps, size, depth=depth)
        body = body if body is not None else body_outlines(np.zeros(labels.shape), labels)
        synthetic.append((paint(labels, body), labels, body))
    t_syn = time.perf_counter() - t0
    t0 = time.perf_counter()
    repainted = [(paint(lab, b), lab, b) for _, lab, b in real]
    t_real = time.perf_counter() - t0

    if picture is not None:
        from pipeline.preview import save_png, volume_planes

        dims = "2.5-D" if cfg.neighbours else "2-D"

        rows = [
            ("real", real[0][0], real[0][1]),
            (f"its anatomy, painted {dims}", repainted[0][0], repainted[0][1]),
            (f"synthetic, painted {dims}", synthetic[0][0], synthetic[0][1]),
        ]
        save_png(volume_planes(rows, storage=(lo, hi), units="HU"), picture)
    feature_fn, space = feature_extractor(ws, GateConfig(seed=seed))

    def figures(vols: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
        diffs = [adjacent_differences(*v, class_names=names) for v in vols]
        real_diffs = [adjacent_differences(*v, class_names=names) for v in real]
        return {
            "adjacent": matched_agreement(diffs, real_diffs, patients, scale=scale, seed=seed),
            "planes": plane_distribution(
                [v[:2] for v in vols],
                [v[:2] for v in real],
                patients,
                feature_fn,
                size=size,
                seed=seed,
            ),
        }

    return {
        "workspace": str(ws_root),
        "run": run.name,
        "size": size,
        "feature_space": space,
        "real_volumes": len(real),
        "real_patients": len(set(patients)),
        "slices_per_synthetic_volume": depth,
        "neighbours": cfg.neighbours,
        "noise": None if noise is None else noise.to_dict(),
        "seconds": {"synthetic_volumes": t_syn, "repaint_real": t_real},
        "sets": {
            f"synthetic ({volumes} volumes)": figures(synthetic),
            "real anatomy, painted": figures(repainted),
        },
    }


def table(result: dict[str, Any]) -> str:
    """The figures as a plain-text table: each beside its real-vs-real baseline."""
    lines = [
        f"{result['run']} at {result['size']}², {result['real_volumes']} real held-out volumes "
        f"({result['real_patients']} patients); features {result['feature_space']}"
    ]
    for name, fig in result["sets"].items():
        lines.append(f"\n{name}")
        lines.append(f"  {'adjacent-slice |Δ| (HU)':<28}{'KS':>16}{'W1 HU':>18}{'median':>16}")
        for region, r in fig["adjacent"]["regions"].items():
            lines.append(
                f"  {region:<28}{r['ks']:>7.3f} ({r['ks_base']:.3f}){r['w1']:>9.1f} "
                f"({r['w1_base']:.1f}){r['median_synthetic']:>7.1f} ({r['median_real']:.1f})"
            )
        lines.append(f"  {'plane':<28}{'FD':>16}{'FD ratio':>18}")
        for plane, p in fig["planes"]["planes"].items():
            lines.append(
                f"  {plane:<28}{p['frechet_distance']:>7.3f} ({p['frechet_baseline']:.3f})"
                f"{p['frechet_ratio']:>9.2f} ({p['frechet_ratio_ci95'][0]:.2f}–"
                f"{p['frechet_ratio_ci95'][1]:.2f})"
            )
        off = fig["planes"]["off_plane_over_axial"]
        lines.append(
            "  off-plane / axial: raw "
            + ", ".join(f"{k} {v:.2f}" for k, v in off["raw"].items())
            + "; over each plane's baseline "
            + ", ".join(f"{k} {v:.2f}" for k, v in off["vs_baseline"].items())
        )
    lines.append("(in brackets: the same figure for real held-out volumes of the same count)")
    return "\n".join(lines)


def main() -> None:
    """Parse, measure, print the table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--volumes", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-noise", action="store_true", help="paint without the run's scanner noise")
    ap.add_argument("--out", type=Path, default=RESULTS / "through_plane.json")
    args = ap.parse_args()
    picture = args.out.with_suffix(".png")
    picture.parent.mkdir(parents=True, exist_ok=True)
    result = measure(
        args.workspace, args.run, args.volumes, args.seed, picture, with_noise=not args.no_noise
    )
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {args.out}\nthree planes: {picture}")


if __name__ == "__main__":
    main()
