"""Privacy filter benchmark: the product's calibration (leave one patient out + planted copies),
judged on what it claims: planted near-copies caught, never-ingested patients not flagged beyond
the stated bound, and the scorer's speed against the previous one (same run, same flags).

    .venv/bin/python bench/privacy.py [--embedders pixel,encoder]   # phantom: 16 + 4 new
    .venv/bin/python bench/privacy.py --small     # phantom 3 / 5 / 8 patients (+12 new), HOCM
    .venv/bin/python bench/privacy.py --scale     # 1M random 256-d vectors: IVF vs exact flat

Prints tables and writes bench/results/privacy.json (or privacy_scale.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import legacy_scorer  # bench/ is on sys.path when run as a script

from pipeline.augment import PLANTED
from pipeline.filtering import (
    FilterConfig,
    baseline_scores,
    build_index,
    planted_scores,
    score_against,
    score_images,
)
from pipeline.index import load_index, make_index
from pipeline.ingest import IngestConfig, ingest
from pipeline.phantom import write_phantom
from pipeline.privacy import calibrate
from pipeline.slices import SliceStore, slice_refs
from pipeline.workspace import Workspace, open_workspace

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def phantom_source() -> Path:
    """The 20-volume phantom (256² × 64), written once."""
    src = RESULTS / "phantom-20x256x64"
    if not (src / "preview.png").exists():
        write_phantom(src, volumes=20, seed=11, size=256, n_slices=64)
    return src


def subset(src: Path, out: Path, names: list[str]) -> Path:
    """A folder of links to some volumes (or PNG slices) of a source set."""
    if out.exists():
        shutil.rmtree(out)
    for sub in ("", "images", "masks"):
        folder = src / sub
        if not folder.is_dir() or (sub == "" and (src / "images").is_dir()):
            continue
        (out / sub).mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if f.is_file() and any(f.name.startswith(n) for n in names):
                (out / sub / f.name).symlink_to(f)
    for f in ("labels.json",):
        if (src / f).exists():
            (out / f).symlink_to(src / f)
    return out


def fresh_workspace(name: str, src: Path, size: int) -> Workspace:
    """A new workspace holding ``src`` (every patient in it; splits do not matter here)."""
    root = RESULTS / "privacy-ws" / name
    if root.exists():
        shutil.rmtree(root)
    ws = open_workspace(root)
    ingest(ws, src, IngestConfig(size=size, split=(1.0, 0.0, 0.0), seed=0))
    return ws


def slices_of(ws: Workspace) -> tuple[list, np.ndarray]:
    """Every cached slice of a workspace with its reference."""
    with Session(ws.engine) as session:
        refs = slice_refs(session)
    return refs, SliceStore(ws.cache_dir, refs).images([r.slice_id for r in refs])


def planted_set(store: SliceStore, refs: list, n: int, seed: int) -> dict[str, np.ndarray]:
    """Near-copies of ``n`` indexed slices per kind (seeded apart from the calibration's)."""
    rng = np.random.default_rng([seed, 99])
    picks = rng.choice(len(refs), size=min(n, len(refs)), replace=False)
    partners = rng.permutation(len(refs))[: len(picks)]
    images = store.images([refs[i].slice_id for i in picks])
    others = store.images([refs[i].slice_id for i in partners])
    return {
        kind: np.stack(
            [
                fn(a, b, np.random.default_rng([seed, 98, j]))
                for j, (a, b) in enumerate(zip(images, others, strict=True))
            ]
        ).astype(np.float32)
        for kind, fn in PLANTED.items()
    }


def judge(ws: Workspace, cfg: FilterConfig, novel: np.ndarray, args, label: str) -> dict:
    """Index + calibrate ``ws`` the product's way, then: planted copies of its slices (recall
    per kind), never-ingested patients' slices (flag rate against the stated bound), and the
    scorer's speed against today's (legacy) scorer on the same images, same flags."""
    t0 = time.perf_counter()
    manifest = build_index(ws, cfg)
    t_index = time.perf_counter() - t0
    loaded = load_index(ws)
    cal = loaded.calibration
    planted = planted_set(loaded.store, loaded.refs, args.planted, cfg.seed)
    recall = {}
    for kind, images in planted.items():
        scores = score_images(loaded, images, [kind] * len(images))
        recall[kind] = float(np.mean([s.flagged for s in scores]))
    flags_novel = [s.flagged for s in score_images(loaded, novel, ["n"] * len(novel))]
    row = {
        "dataset": label,
        "embedder": cfg.embedder,
        "patients": len({r.patient for r in loaded.refs}),
        "slices": len(loaded.refs),
        "n_baseline": cal.n_baseline,
        "certified": cal.certified,
        "bound": cal.bound,
        "note": cal.note,
        "ssim_threshold": cal.threshold,
        "texture_threshold": cal.texture_threshold,
        "calibration_recall": cal.recall,
        "indistinct_at_calibration": list(cal.indistinct),
        "recall": recall,
        "recall_all": float(np.mean([recall[k] for k in recall])),
        "novel_slices": len(novel),
        "novel_flagged": float(np.mean(flags_novel)) if len(novel) else None,
        "index_seconds": t_index,
        "count": manifest["count"],
    }
    if args.speed:
        row["speed"] = speed(loaded, np.concatenate([*planted.values(), novel]), cal)
    print_row(row)
    return row


def speed(loaded, images: np.ndarray, cal) -> dict:
    """Images/s of today's scorer and of the issue-11 scorer (``legacy_scorer``) on the same
    images in the same run, and whether both flag exactly the same images."""
    cfg = loaded.manifest["config"]
    kw = {"k": int(cfg["k"]), "max_shift": int(cfg["max_shift"]), "smooth": float(cfg["smooth"])}
    out = {}
    for name, fn in (("legacy", legacy_scorer.score_against), ("now", score_against)):
        t0 = time.perf_counter()
        s, _, _, tex = fn(loaded.index, loaded.embedder, loaded.store, images, **kw)
        out[name] = {
            "seconds": time.perf_counter() - t0,
            "flags": [cal.flag(float(a), float(b)) for a, b in zip(s, tex, strict=True)],
            "scores": s,
        }
    same = out["legacy"]["flags"] == out["now"]["flags"]
    result = {
        "images": len(images),
        "legacy_images_per_s": len(images) / out["legacy"]["seconds"],
        "now_images_per_s": len(images) / out["now"]["seconds"],
        "speedup": out["legacy"]["seconds"] / out["now"]["seconds"],
        "identical_flags": same,
        "max_score_difference": float(
            np.max(np.abs(out["legacy"]["scores"] - out["now"]["scores"]))
        ),
    }
    print(
        f"  speed: {result['now_images_per_s']:.1f} images/s vs {result['legacy_images_per_s']:.1f}"
        f" before (x{result['speedup']:.2f}, target ≥ 4), identical flags: {same}, "
        f"max |Δscore| {result['max_score_difference']:.1e}"
    )
    return result


def run_full(args) -> list[dict]:
    """The phantom at full size (16 patients indexed, 4 never ingested) and HOCM (two patients,
    each in turn never ingested... impossible to calibrate with one: see run_small)."""
    src = phantom_source()
    names = sorted({f.name.split("_image")[0] for f in src.glob("*_image.nii.gz")})
    ws = fresh_workspace(
        "phantom-16", subset(src, RESULTS / "src-phantom-16", names[:16]), args.size
    )
    novel_ws = fresh_workspace(
        "phantom-novel", subset(src, RESULTS / "src-novel", names[16:]), args.size
    )
    _, novel = slices_of(novel_ws)
    rows = []
    for emb in args.embedders.split(","):
        cfg = FilterConfig(embedder=emb, k=args.k, quantile=args.quantile, planted=args.cal_planted)
        rows.append(judge(ws, cfg, novel, args, "phantom 16 (+4 never ingested)"))
    return rows


def run_small(args) -> list[dict]:
    """Few patients: phantom subsets of 3, 5 and 8 patients (the 12 last volumes never
    ingested are the new people); HOCM's two patients, each in turn kept out (one patient
    alone cannot be calibrated, so the other is scored as a never-ingested patient against a
    workspace of both... by cross-fitting: see README)."""
    src = phantom_source()
    names = sorted({f.name.split("_image")[0] for f in src.glob("*_image.nii.gz")})
    novel_ws = fresh_workspace(
        "phantom-novel12", subset(src, RESULTS / "src-novel12", names[8:]), args.size
    )
    _, novel = slices_of(novel_ws)
    rows = []
    cfg = FilterConfig(k=args.k, quantile=args.quantile, planted=args.cal_planted)
    for p in (3, 5, 8):
        ws = fresh_workspace(
            f"phantom-{p}", subset(src, RESULTS / f"src-phantom-{p}", names[:p]), args.size
        )
        rows.append(judge(ws, cfg, novel, args, f"phantom {p} patients"))
    hocm = SHARED / "hocm-2d"
    if hocm.is_dir():
        ws = fresh_workspace("hocm", hocm, args.size)
        row = judge(
            ws, cfg, np.zeros((0, args.size, args.size), np.float32), args, "hocm 2 patients"
        )
        row.update(crossfit(ws, cfg))
        print(
            f"  cross-fit: a patient's slices flagged {row['novel_flagged']:.1%} of "
            f"{row['novel_slices']} under thresholds calibrated without that patient's scores"
        )
        rows.append(row)
    return rows


def crossfit(ws: Workspace, cfg: FilterConfig) -> dict:
    """Held-out flag rate when no patient is left to keep out of the workspace: for each
    patient p, thresholds from the other patients' leave-one-out scores (and the planted
    copies), applied to p's leave-one-out scores, which the thresholds never saw."""
    loaded = load_index(ws)
    vectors = loaded.embedder.embed(loaded.store.images([r.slice_id for r in loaded.refs]))
    ssim, texture, who = baseline_scores(vectors, loaded.refs, loaded.embedder, loaded.store, cfg)
    planted = planted_scores(loaded.index, loaded.refs, loaded.embedder, loaded.store, cfg)
    flagged = []
    for p in sorted(set(who)):
        mine = who == p
        cal = calibrate(
            ssim[~mine], texture[~mine], quantile=cfg.quantile, planted=planted, patients=who[~mine]
        )
        flagged += [cal.flag(s, t) for s, t in zip(ssim[mine], texture[mine], strict=True)]
    return {"novel_flagged": float(np.mean(flagged)), "novel_slices": len(flagged)}


def print_row(row: dict) -> None:
    bound = "n/a" if row["bound"] is None else f"{row['bound']:.3g}"
    novel = (
        "n/a"
        if row["novel_flagged"] is None
        else f"{row['novel_flagged']:.1%} of {row['novel_slices']}"
    )
    print(
        f"\n{row['dataset']} / {row['embedder']}: {row['slices']} slices, "
        f"baseline n={row['n_baseline']}"
        f" ({'certified' if row['certified'] else 'too small: fallback'}), stated bound {bound}; "
        f"SSIM > {row['ssim_threshold']:.3f} or texture > {row['texture_threshold']:.3f}"
    )
    print("  recall: " + ", ".join(f"{k} {v:.0%}" for k, v in row["recall"].items()))
    print(
        f"  all planted {row['recall_all']:.1%} (target ≥ 99%); "
        f"never-ingested flagged {novel} (target ≤ 5%)"
    )


def run_scale(args) -> dict:
    """1M random unit 256-d vectors + planted noisy copies; IVF (tuned) vs exact flat search."""
    n, d, nq = args.scale_n, 256, args.scale_queries
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, d), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    targets = rng.choice(n, size=nq, replace=False)
    queries = base[targets] + rng.normal(0, 0.3 / np.sqrt(d), (nq, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    raw_mib = base.nbytes / 2**20
    flat = faiss.IndexFlatIP(d)
    flat.add(base)
    t0 = time.perf_counter()
    _, f_ids = flat.search(queries, 5)
    t_flat = time.perf_counter() - t0
    del flat
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    ivf, info = make_index(base, ids, k=5, flat_max=0)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, i_ids = ivf.search(queries, 5)
    t_ivf = time.perf_counter() - t0
    recall_ivf = float(np.mean([t in row for t, row in zip(targets, i_ids, strict=True)]))
    recall_flat = float(np.mean([t in row for t, row in zip(targets, f_ids, strict=True)]))
    index_mib = faiss.serialize_index(ivf).nbytes / 2**20
    out = {
        "n": n,
        "dim": d,
        "queries": nq,
        "flat_seconds": t_flat,
        "ivf_seconds": t_ivf,
        "speedup": t_flat / t_ivf,
        "ivf_build_seconds": t_build,
        "recall_ivf": recall_ivf,
        "recall_flat": recall_flat,
        "index_mib": index_mib,
        "raw_mib": raw_mib,
        "memory_ratio": index_mib / raw_mib,
        "peak_rss_mib_before_ivf": rss0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **info,
    }
    print(f"\n{n} x {d}-d vectors, {nq} queries (top-5), planted noisy copies")
    print(f"  exact IndexFlatIP   {t_flat:8.1f} s   recall {recall_flat:.4f}")
    print(
        f"  IVF{info['nlist']}/nprobe{info['nprobe']:<4} {t_ivf:8.1f} s   recall {recall_ivf:.4f}"
        f"   speed-up {t_flat / t_ivf:.1f}x (target ≥ 15x)   build {t_build:.0f} s"
    )
    print(
        f"  index {index_mib:.0f} MiB vs raw vectors {raw_mib:.0f} MiB = "
        f"{index_mib / raw_mib:.2f}x (target ≤ 1.5x); peak RSS {out['peak_rss_mib']:.0f} MiB"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="few patients: phantom 3/5/8, HOCM")
    ap.add_argument("--embedders", default="pixel,encoder")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--planted", type=int, default=30, help="test copies planted per kind")
    ap.add_argument("--cal-planted", type=int, default=20, help="calibration copies per kind")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--no-speed", dest="speed", action="store_false", help="skip the timing")
    ap.add_argument("--scale", action="store_true")
    ap.add_argument("--scale-n", type=int, default=1_000_000)
    ap.add_argument("--scale-queries", type=int, default=10_000)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.scale:
        out = run_scale(args)
        (RESULTS / "privacy_scale.json").write_text(json.dumps(out, indent=2))
        return
    rows = run_small(args) if args.small else run_full(args)
    out = RESULTS / ("privacy_small.json" if args.small else "privacy.json")
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
