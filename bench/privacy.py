"""Privacy filter benchmark: are planted near-copies of source slices caught, and at what cost?

Recall per planted transformation and false positives on held-out patients' slices, for each
embedder, with and without the SSIM re-score. The threshold is calibrated on the validation
patients; negatives are the test patients' slices, which the calibration never saw.

    .venv/bin/python bench/privacy.py [--datasets phantom,hocm] [--embedders pixel,encoder]
    .venv/bin/python bench/privacy.py --scale      # 1M random 256-d vectors: IVF vs exact flat

Prints tables and writes bench/results/privacy.json (or privacy_scale.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.augment import PLANTED
from pipeline.filtering import RERANK, FilterConfig, make_embedder, score_against
from pipeline.index import embed_refs, make_index, search_both_ways
from pipeline.ingest import IngestConfig, ingest
from pipeline.phantom import write_phantom
from pipeline.privacy import Calibration, calibrate
from pipeline.slices import SliceStore, slice_refs
from pipeline.workspace import open_workspace

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def workspace_for(name: str, size: int):
    """Build (once) a workspace for a dataset with train/val/test patients."""
    root = RESULTS / f"privacy-{name}-{size}"
    if name == "phantom":
        src = RESULTS / "phantom-20x256x64"
        if not (src / "preview.png").exists():
            write_phantom(src, volumes=20, seed=11, size=256, n_slices=64)
        split = (0.6, 0.2, 0.2)
    elif name == "hocm":
        src = SHARED / "hocm-2d"
        split = (0.5, 0.0, 0.5)  # two patients: one trains, one is held out
    else:
        raise SystemExit(f"unknown dataset {name}")
    ws = open_workspace(root)
    ingest(ws, src, IngestConfig(size=size, split=split, seed=0))
    return ws


def run_dataset(name: str, embedders: list[str], args) -> list[dict]:
    ws = workspace_for(name, args.size)
    with Session(ws.engine) as session:
        refs = slice_refs(session)
    store = SliceStore(ws.cache_dir, refs)
    train = [r for r in refs if r.split == "train"]
    held = [r for r in refs if r.split != "train"]
    if name == "hocm":  # one held-out patient: alternate its slices between calibration/negatives
        cal_refs, neg_refs = held[0::2], held[1::2]
    else:
        cal_refs = [r for r in refs if r.split == "val"]
        neg_refs = [r for r in refs if r.split == "test"]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(train), size=min(args.planted, len(train)), replace=False)
    others = rng.permutation(len(train))
    rows = []
    for emb_name in embedders:
        cfg = FilterConfig(embedder=emb_name, k=args.k, encoder_steps=args.encoder_steps)
        t0 = time.perf_counter()
        embedder, _ = make_embedder(ws, cfg, store, refs, iter)
        if emb_name == "pixel":
            from pipeline.embed import PixelEmbedder

            embedder = PixelEmbedder(side=args.side)
        vectors = embed_refs(store, refs, embedder)
        ids = np.array([r.slice_id for r in refs], dtype=np.int64)
        t_embed = time.perf_counter() - t0
        # the index holds every source slice except the negatives' patients (never seen)
        neg_patients = {r.patient for r in neg_refs}
        keep = np.array([i for i, r in enumerate(refs) if r.patient not in neg_patients])
        full, _ = make_index(vectors[keep], ids[keep])
        train_pos = np.array([i for i, r in enumerate(refs) if r.split == "train"])
        train_index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        train_index.add_with_ids(vectors[train_pos], ids[train_pos])

        textures = []

        def scores(index, images, embedder=embedder, textures=textures):
            s, _, sim, tex = score_against(
                index, embedder, store, images, k=args.k, max_shift=4, smooth=args.smooth
            )
            textures.append(tex)
            return s, sim

        t0 = time.perf_counter()
        cal_img = store.images([r.slice_id for r in cal_refs])
        cal_ssim, cal_sim = scores(train_index, cal_img)
        cal_tex = textures[-1]
        thr_ssim = calibrate(cal_ssim, quantile=args.quantile).threshold
        thr_sim = calibrate(cal_sim, quantile=args.quantile).threshold
        neg_img = store.images([r.slice_id for r in neg_refs])
        neg_ssim, neg_sim = scores(full, neg_img)
        neg_tex = textures[-1]
        row = {
            "dataset": name,
            "embedder": emb_name,
            "k": args.k,
            "smooth": args.smooth,
            "side": args.side,
            "threshold_ssim": thr_ssim,
            "threshold_embedding": thr_sim,
            "n_calibration": len(cal_refs),
            "n_negatives": len(neg_refs),
            "embed_seconds": t_embed,
            "fp_ssim": float(np.mean(neg_ssim > thr_ssim)),
            "fp_embedding": float(np.mean(neg_sim > thr_sim)),
            "recall": {},
        }
        found_all, total = [0, 0], 0
        kind_scores, kind_tex = {}, {}
        for kind, fn in PLANTED.items():
            planted = np.stack(
                [
                    fn(
                        store.images([train[p].slice_id])[0],
                        store.images([train[others[(j + 1) % len(train)]].slice_id])[0],
                        np.random.default_rng(1000 + j),
                    )
                    for j, p in enumerate(picks)
                ]
            ).astype(np.float32)
            s, sim = scores(full, planted)
            kind_scores[kind] = s
            kind_tex[kind] = textures[-1]
            # the true source must also be among the neighbours searched
            _, nn = search_both_ways(full, embedder, planted, args.k * RERANK)
            in_topk = np.mean([train[p].slice_id in nn[j] for j, p in enumerate(picks)])
            r_ssim, r_sim = float(np.mean(s > thr_ssim)), float(np.mean(sim > thr_sim))
            row["recall"][kind] = {
                "ssim": r_ssim,
                "embedding": r_sim,
                "source_in_topk": in_topk,
                "median_ssim": float(np.median(s)),
            }
            found_all[0] += int(np.sum(s > thr_ssim))
            found_all[1] += int(np.sum(sim > thr_sim))
            total += len(picks)
        row["recall_all_ssim"] = found_all[0] / total
        row["recall_all_embedding"] = found_all[1] / total
        row["score_seconds_per_image"] = (time.perf_counter() - t0) / (
            total + len(cal_refs) + len(neg_refs)
        )

        def product(cal, k, kind_scores=kind_scores, kind_tex=kind_tex):  # the shipped rule
            return (kind_scores[k] > cal.threshold) | (kind_tex[k] > cal.texture_threshold)

        row["sweep"] = []
        for q in (0.99, 0.975, 0.95):
            cal = calibrate(cal_ssim, cal_tex, quantile=q)
            ssim_only = calibrate(cal_ssim, quantile=q).threshold
            per_kind = {k: float(np.mean(product(cal, k))) for k in kind_scores}
            row["sweep"].append(
                {
                    "quantile": q,
                    "ssim_threshold": cal.threshold,
                    "texture_threshold": cal.texture_threshold,
                    "recall_all": float(
                        np.mean(np.concatenate([product(cal, k) for k in kind_scores]))
                    ),
                    "fp": float(
                        np.mean((neg_ssim > cal.threshold) | (neg_tex > cal.texture_threshold))
                    ),
                    "worst_kind": min(per_kind, key=per_kind.get),
                    "worst_recall": min(per_kind.values()),
                    "ssim_only_recall_all": float(
                        np.mean(np.concatenate(list(kind_scores.values())) > ssim_only)
                    ),
                    "ssim_only_fp": float(np.mean(neg_ssim > ssim_only)),
                }
            )
        cal = calibrate(cal_ssim, cal_tex, quantile=args.quantile)
        row["product"] = {
            "ssim_threshold": cal.threshold,
            "texture_threshold": cal.texture_threshold,
            "recall": {k: float(np.mean(product(cal, k))) for k in kind_scores},
            "recall_all": float(np.mean(np.concatenate([product(cal, k) for k in kind_scores]))),
            "fp": float(np.mean((neg_ssim > cal.threshold) | (neg_tex > cal.texture_threshold))),
            "texture_median": {k: float(np.median(v)) for k, v in kind_tex.items()},
            "texture_median_negatives": float(np.median(neg_tex)),
        }
        rows.append(row)
        print_row(row)
    ws.close()
    return rows


def print_row(row: dict) -> None:
    p = row["product"]
    rule = Calibration.from_manifest(
        {"threshold": p["ssim_threshold"], "texture_threshold": p["texture_threshold"]}
    ).describe()
    print(
        f"\n{row['dataset']} / {row['embedder']} (k={row['k']}, smooth={row['smooth']}): "
        f"flag if {rule} "
        f"(calibration n={row['n_calibration']}, negatives n={row['n_negatives']})"
    )
    print(
        f"  {'planted':<15}{'product':>9}{'SSIM only':>10}{'emb only':>9}{'in top-k':>9}"
        f"{'med SSIM':>9}{'med tex':>8}"
    )
    for kind, r in row["recall"].items():
        print(
            f"  {kind:<15}{p['recall'][kind]:>9.1%}{r['ssim']:>10.1%}{r['embedding']:>9.1%}"
            f"{r['source_in_topk']:>9.0%}{r['median_ssim']:>9.3f}{p['texture_median'][kind]:>8.2f}"
        )
    print(
        f"  {'ALL planted':<15}{p['recall_all']:>9.1%}{row['recall_all_ssim']:>10.1%}"
        f"{row['recall_all_embedding']:>9.1%}"
    )
    print(
        f"  {'false pos.':<15}{p['fp']:>9.1%}{row['fp_ssim']:>10.1%}{row['fp_embedding']:>9.1%}"
        f"{'':>18}{p['texture_median_negatives']:>8.2f}"
    )
    print(f"  {'quantile':<10}{'recall':>8}{'FP':>7}  worst kind    | SSIM only: recall, FP")
    for s in row["sweep"]:
        print(
            f"  {s['quantile']:<10}{s['recall_all']:>8.1%}{s['fp']:>7.1%}  "
            f"{s['worst_kind']} {s['worst_recall']:.0%}  | {s['ssim_only_recall_all']:.1%}, "
            f"{s['ssim_only_fp']:.1%}"
        )
    print(
        f"  embed {row['embed_seconds']:.1f}s, score {row['score_seconds_per_image'] * 1e3:.0f}"
        " ms/image"
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
    ap.add_argument("--datasets", default="phantom,hocm")
    ap.add_argument("--embedders", default="pixel,encoder")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--planted", type=int, default=60, help="source slices planted per kind")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--smooth", type=float, default=1.0)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--encoder-steps", type=int, default=300)
    ap.add_argument("--scale", action="store_true")
    ap.add_argument("--scale-n", type=int, default=1_000_000)
    ap.add_argument("--scale-queries", type=int, default=10_000)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.scale:
        out = run_scale(args)
        (RESULTS / "privacy_scale.json").write_text(json.dumps(out, indent=2))
        return
    rows = []
    for name in args.datasets.split(","):
        rows.extend(run_dataset(name, args.embedders.split(","), args))
    (RESULTS / "privacy.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {RESULTS / 'privacy.json'}")


if __name__ == "__main__":
    main()
