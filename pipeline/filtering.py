"""The privacy filter: build the source index and calibrate it (`pipeline index`), score images
(`pipeline filter --images`) and candidate batches (`--batch`), and the nearest source slices
the review app shows — all through one scorer, :func:`score_against`."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.atomic import atomic_write
from pipeline.candidates import batch_images, batch_row
from pipeline.catalog import Candidate, PrivacyCalibration, Source, utcnow, write_session
from pipeline.embed import EMBEDDERS, Embedder, PixelEmbedder, load_embedder
from pipeline.errors import PipelineError
from pipeline.imageio import image_files, read_nifti_slices, read_png
from pipeline.index import (
    LoadedIndex,
    catalog_fingerprint,
    embed_refs,
    load_index,
    make_index,
    read_manifest,
    search_both_ways,
    write_index,
)
from pipeline.preprocess import centre, resize_image, stored_to_unit
from pipeline.privacy import DEFAULT_QUANTILE, Calibration, aligned_scores, calibrate
from pipeline.progress import Progress
from pipeline.slices import SliceRef, SliceStore, slice_refs
from pipeline.workspace import Workspace

#: The embedding search returns RERANK·k neighbours; a full-resolution correlation keeps k.
RERANK = 4


def full_correlation(image: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Pearson correlation of the centred image with each centred source, at full resolution."""
    a = centre(image).ravel().astype(np.float64)
    a = (a - a.mean()) / (a.std() + 1e-12)
    out = np.empty(len(sources))
    for j, src in enumerate(sources):
        b = centre(src).ravel().astype(np.float64)
        out[j] = float(np.dot(a, (b - b.mean()) / (b.std() + 1e-12))) / a.size
    return out


@dataclass(frozen=True)
class FilterConfig:
    """Privacy filter settings (stored in the index manifest)."""

    embedder: str = "pixel"
    k: int = 5
    max_shift: int = 4
    smooth: float = 1.0  # Gaussian sigma (px) before SSIM; 0 compares raw pixels
    quantile: float = DEFAULT_QUANTILE
    threshold: float | None = None  # explicit threshold instead of calibration
    calibration_max: int = 2000  # held-out slices sampled for the baseline
    encoder_steps: int = 300
    seed: int = 0


def make_embedder(
    ws: Workspace, cfg: FilterConfig, store: SliceStore, refs: list[SliceRef], progress: Progress
) -> tuple[Embedder, dict[str, Any]]:
    """The embedder ``cfg`` names, with its manifest parameters (the encoder is trained on
    the training split and saved into the index folder)."""
    if cfg.embedder == "pixel":
        emb = PixelEmbedder()
        return emb, {"side": emb.side}
    if cfg.embedder == "encoder":
        from pipeline.encoder import train_encoder

        train_refs = [r for r in refs if r.split == "train"] or refs
        emb = train_encoder(
            store,
            train_refs,
            ws.index_dir,
            steps=cfg.encoder_steps,
            seed=cfg.seed,
            progress=progress,
        )
        return emb, emb.params()
    raise PipelineError(f"unknown embedder {cfg.embedder!r}; choose one of {', '.join(EMBEDDERS)}")


def _view_scores(
    view: np.ndarray,
    found: np.ndarray,
    store: SliceStore,
    *,
    k: int,
    max_shift: int,
    smooth: float,
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """One view (an image or its mirror image) against the ids its embedding search found:
    a full-resolution correlation keeps the best ``k``, which get the aligned SSIM and texture
    scores. Returns (slice ids, SSIM, texture, the source images), in the kept order."""
    cand = list(dict.fromkeys(int(x) for x in found if x >= 0))
    if not cand:
        empty = np.zeros(0)
        return [], empty, empty, np.zeros((0, *view.shape), np.float32)
    sources = store.images(cand)
    if len(cand) > k:
        order = np.argsort(-full_correlation(view, sources), kind="stable")[:k]
        cand, sources = [cand[o] for o in order], sources[order]
    ssim, tex = aligned_scores(view, sources, max_shift=max_shift, flips=False, smooth=smooth)
    return cand, ssim, tex, sources


def score_against(
    index: faiss.Index,
    embedder: Embedder,
    store: SliceStore,
    images: np.ndarray,
    *,
    k: int,
    max_shift: int,
    smooth: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each image: best aligned SSIM over its top-k neighbours, in both orientations.

    The image's own neighbours are compared with the image, its mirror image's neighbours with
    the mirror image (each over the small shift search). Returns (SSIM scores, nearest slice
    ids, best embedding similarity, best texture correlation).
    """
    sims, ids = search_both_ways(index, embedder, images, k * RERANK)
    half = ids.shape[1] // 2
    scores = np.zeros(len(images))
    texture = np.zeros(len(images))
    nearest = np.full(len(images), -1, dtype=np.int64)
    for i, image in enumerate(images):
        for view, found in ((image, ids[i, :half]), (image[:, ::-1], ids[i, half:])):
            cand, ssim, tex, _ = _view_scores(
                view, found, store, k=k, max_shift=max_shift, smooth=smooth
            )
            if not cand:
                continue
            j = int(np.argmax(ssim))
            if nearest[i] < 0 or ssim[j] > scores[i]:
                scores[i], nearest[i] = ssim[j], cand[j]
            texture[i] = max(texture[i], float(tex.max()))
    return scores, nearest, sims.max(axis=1), texture


def nearest_sources(loaded: LoadedIndex, image: np.ndarray, *, k: int = 3) -> list[dict[str, Any]]:
    """The ``k`` source slices most similar to ``image`` (a [0, 1] slice), best first, each
    with the SSIM and texture score the filter gives it (same search, same re-scoring, the
    index's settings; a neighbour found through the mirror image is shown mirrored, as it was
    compared). What the reviewer compares by eye."""
    cfg = loaded.manifest["config"]
    _, ids = search_both_ways(loaded.index, loaded.embedder, image[None], int(cfg["k"]) * RERANK)
    half = ids.shape[1] // 2
    rows: dict[int, dict[str, Any]] = {}
    for mirrored, view, found in (
        (False, image, ids[0, :half]),
        (True, image[:, ::-1], ids[0, half:]),
    ):
        cand, ssim, tex, sources = _view_scores(
            view,
            found,
            loaded.store,
            k=int(cfg["k"]),
            max_shift=int(cfg["max_shift"]),
            smooth=float(cfg.get("smooth", 0.0)),
        )
        for sid, s_, t_, src in zip(cand, ssim, tex, sources, strict=True):
            if sid in rows and rows[sid]["ssim"] >= s_:
                continue
            rows[sid] = {
                "slice_id": sid,
                "patient": loaded.store.refs[sid].patient,
                "ssim": float(s_),
                "texture": float(t_),
                "mirrored": mirrored,
                "image": src[:, ::-1] if mirrored else src,
            }
    return sorted(rows.values(), key=lambda r: -r["ssim"])[:k]


def calibrate_index(
    vectors: np.ndarray,
    refs: list[SliceRef],
    embedder: Embedder,
    store: SliceStore,
    cfg: FilterConfig,
    progress: Progress = iter,
) -> Calibration | None:
    """Held-out patients' slices scored against training patients' slices → threshold.

    Returns None when there are no held-out patients (the caller then needs an explicit
    threshold).
    """
    train = [i for i, r in enumerate(refs) if r.split == "train"]
    held = [i for i, r in enumerate(refs) if r.split != "train"]
    if not held or not train:
        return None
    rng = np.random.default_rng(cfg.seed)
    if len(held) > cfg.calibration_max:
        held = sorted(rng.choice(held, size=cfg.calibration_max, replace=False).tolist())
    sub = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    sub.add_with_ids(vectors[train], np.array([refs[i].slice_id for i in train], dtype=np.int64))
    scores, textures = [], []
    chunks = [held[i : i + 64] for i in range(0, len(held), 64)]
    for chunk in progress(chunks):
        images = store.images([refs[i].slice_id for i in chunk])
        s, _, _, tex = score_against(
            sub, embedder, store, images, k=cfg.k, max_shift=cfg.max_shift, smooth=cfg.smooth
        )
        scores.extend(s.tolist())
        textures.extend(tex.tolist())
    return calibrate(np.array(scores), np.array(textures), quantile=cfg.quantile)


def build_index(
    ws: Workspace, cfg: FilterConfig, *, rebuild: bool = False, progress: Progress = iter
) -> dict[str, Any]:
    """Embed every source slice, (re)build the FAISS index, calibrate; return the manifest.

    Incremental: with the same embedder, only slices not yet indexed are embedded and added.
    """
    with Session(ws.engine) as session:
        refs = slice_refs(session)
    if not refs:
        raise PipelineError("no source slices to index (run 'pipeline ingest' first)", path=ws.root)
    store = SliceStore(ws.cache_dir, refs)
    old = None if rebuild else read_manifest(ws)
    emb_file = ws.index_dir / "embeddings.npy"
    ids = np.array([r.slice_id for r in refs], dtype=np.int64)
    reused = 0
    if old is not None and old.get("embedder") == cfg.embedder and emb_file.exists():
        embedder = load_embedder(cfg.embedder, ws.index_dir, old.get("embedder_params", {}))
        params = old.get("embedder_params", {})
        saved = np.load(emb_file)
        saved_ids = np.asarray(old.get("ids", []), dtype=np.int64)
        known = dict(zip(saved_ids.tolist(), range(len(saved_ids)), strict=True))
        todo = [r for r in refs if r.slice_id not in known]
        new_vec = embed_refs(store, todo, embedder, progress=progress)
        fresh = dict(zip([r.slice_id for r in todo], range(len(todo)), strict=True))
        vectors = (
            np.stack([saved[known[i]] if i in known else new_vec[fresh[i]] for i in ids.tolist()])
            if len(ids)
            else np.zeros((0, embedder.dim), np.float32)
        )
        reused = len(refs) - len(todo)
    else:
        ws.index_dir.mkdir(exist_ok=True)
        embedder, params = make_embedder(ws, cfg, store, refs, progress)
        vectors = embed_refs(store, refs, embedder, progress=progress)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index, info = make_index(vectors, ids, k=cfg.k, seed=cfg.seed)

    if cfg.threshold is not None:
        cal = Calibration.given(cfg.threshold)
    else:
        cal = calibrate_index(vectors, refs, embedder, store, cfg, progress)
        if cal is None:
            raise PipelineError(
                "no held-out (val/test) patients to calibrate the threshold against; ingest "
                "with a split that keeps patients out of training, or pass --threshold",
                path=ws.root,
            )
    fingerprint = catalog_fingerprint(refs)
    manifest = {
        "embedder": embedder.name,
        "embedder_params": params,
        "dim": int(vectors.shape[1]),
        "count": len(refs),
        "reused_embeddings": reused,
        "index": info,
        "catalog": fingerprint,
        "ids": ids.tolist(),
        "config": asdict(cfg),
        "calibration": cal.to_manifest(),
    }
    atomic_write(emb_file, lambda tmp: np.save(tmp, vectors))
    write_index(ws, index, manifest)
    with write_session(ws.engine) as session:
        session.add(
            PrivacyCalibration(
                index_fingerprint=fingerprint,
                embedder=embedder.name,
                k=cfg.k,
                **cal.summary(),
                baseline=list(cal.baseline),
                texture_baseline=list(cal.texture_baseline),
            )
        )
    return {k: v for k, v in manifest.items() if k != "ids"}


# --------------------------------------------------------------------------- reading images


@dataclass
class InputImages:
    """Images to score, in [0, 1] at the workspace's slice size, with their names."""

    names: list[str]
    images: np.ndarray
    warnings: list[str] = field(default_factory=list)


def read_images(path: Path, *, size: int, window: tuple[float, float] | None) -> InputImages:
    """Read PNG / NIfTI images (a NIfTI volume gives each axial slice) for scoring: a file, a
    folder, or a batch-like folder with ``images/``.

    NIfTI values are HU and are windowed with the workspace's window (display units 0–255 in a
    workspace of PNG sources, ``window`` None); PNG values are display units. Other sizes are
    resized (with a warning); NaN or infinite pixels are an error.
    """
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = image_files(path / "images" if (path / "images").is_dir() else path, what="images")
    else:
        raise PipelineError("no such file or folder", path=path)
    units = "HU" if window is not None else "display"
    names: list[str] = []
    slices: list[np.ndarray] = []
    notes: list[str] = []
    for f in files:
        if f.name.lower().endswith(".png"):
            planes = [
                (f.name, stored_to_unit(read_png(f, mask=False), units="display", window=None))
            ]
            with Image.open(f) as probe:
                if probe.mode not in ("L", "P", "I", "I;16", "I;16B"):
                    notes.append(f"{f.name}: {probe.mode} PNG of grey values read as one channel")
        else:
            if window is None:  # display-unit workspace (PNG sources): NIfTI holds 0–255
                note = "display-unit workspace: NIfTI values read as 0–255 display units"
                if note not in notes:
                    notes.append(note)
            disp, _ = read_nifti_slices(f, what="image")
            disp = disp.astype(np.float32)
            if not np.isfinite(disp).all():
                raise PipelineError("NaN or infinite pixel values", path=f)
            planes = [
                (
                    f"{f.name}#{z}" if len(disp) > 1 else f.name,
                    stored_to_unit(disp[z], units=units, window=window),
                )
                for z in range(len(disp))
            ]
        for name, plane in planes:
            if not np.isfinite(plane).all():
                raise PipelineError("NaN or infinite pixel values", path=f)
            if plane.shape != (size, size):
                note = f"{f.name}: {plane.shape[1]}x{plane.shape[0]} resized to {size}x{size}"
                if note not in notes:  # once per file, not per slice of a volume
                    notes.append(note)
                plane = resize_image(plane, size)
            names.append(name)
            slices.append(np.clip(plane, 0.0, 1.0).astype(np.float32))
    return InputImages(names, np.stack(slices), notes)


@dataclass(frozen=True)
class ImageScore:
    """The privacy verdict on one image."""

    name: str
    score: float  # best SSIM to a source slice
    threshold: float
    texture: float  # best correlation of fine texture with a source slice
    texture_threshold: float | None
    flagged: bool
    nearest_slice: int
    nearest_patient: str
    margin: float  # distance below the nearest threshold (negative when flagged)


def score_images(
    loaded: LoadedIndex, images: np.ndarray, names: list[str], *, progress: Progress = iter
) -> list[ImageScore]:
    """Score images against the index with the calibrated threshold (same path for candidates)."""
    cfg = loaded.manifest["config"]
    cal = loaded.calibration
    results: list[ImageScore] = []
    chunks = [range(i, min(i + 64, len(images))) for i in range(0, len(images), 64)]
    for chunk in progress(chunks):
        sub = images[chunk.start : chunk.stop]
        scores, nearest, _, texture = score_against(
            loaded.index,
            loaded.embedder,
            loaded.store,
            sub,
            k=int(cfg["k"]),
            max_shift=int(cfg["max_shift"]),
            smooth=float(cfg.get("smooth", 0.0)),
        )
        for j, i in enumerate(chunk):
            ref = loaded.store.refs.get(int(nearest[j]))
            results.append(
                ImageScore(
                    name=names[i],
                    score=round(float(scores[j]), 6),
                    threshold=cal.threshold,
                    texture=round(float(texture[j]), 6),
                    texture_threshold=cal.texture_threshold,
                    flagged=cal.flag(float(scores[j]), float(texture[j])),
                    nearest_slice=int(nearest[j]),
                    nearest_patient=ref.patient if ref else "",
                    margin=round(cal.margin(float(scores[j]), float(texture[j])), 6),
                )
            )
    return results


def filter_images(
    ws: Workspace, path: Path, *, progress: Progress = iter
) -> tuple[list[ImageScore], dict[str, Any], list[str]]:
    """`pipeline filter --images PATH`: read, score, summarise."""
    loaded = load_index(ws)
    with Session(ws.engine) as session:
        windows = sorted(
            {
                (s.window_lo, s.window_hi)
                for s in session.scalars(select(Source).where(Source.units == "HU"))
            }
        )
        size = int(session.scalar(select(Source.size).limit(1)))
    if len(windows) > 1:
        warnings.warn(
            f"sources use several HU windows {windows}; NIfTI input uses the first", stacklevel=2
        )
    inputs = read_images(path, size=size, window=windows[0] if windows else None)
    results = score_images(loaded, inputs.images, inputs.names, progress=progress)
    summary = {"images": len(results), **_verdict_summary(loaded, results)}
    return results, summary, inputs.warnings


def _verdict_summary(loaded: LoadedIndex, results: list[ImageScore]) -> dict[str, Any]:
    """How many were flagged, under which thresholds, by which index."""
    return {
        "flagged": sum(r.flagged for r in results),
        **loaded.calibration.summary(),
        "embedder": loaded.manifest["embedder"],
    }


def filter_batch(ws: Workspace, name: str, *, progress: Progress = iter) -> dict[str, Any]:
    """Score every candidate of a batch against the source index; store scores and flags."""
    loaded = load_index(ws)
    ids, names, images = batch_images(ws, name)
    results = score_images(loaded, images, names, progress=progress)
    summary = {
        "count": len(results),
        **_verdict_summary(loaded, results),
        "index_catalog": loaded.manifest["catalog"],
    }
    with write_session(ws.engine) as session:
        for cid, r in zip(ids, results, strict=True):
            row = session.get(Candidate, cid)
            row.privacy_score, row.texture_score = r.score, r.texture
            row.privacy_margin, row.flagged = r.margin, r.flagged
            row.nearest_slice_id = r.nearest_slice
        batch = batch_row(session, name)
        batch.privacy = summary
        batch.filtered_at = utcnow()
    return {
        **summary,
        "scores": [r.score for r in results],
        "textures": [r.texture for r in results],
    }


def dumps_results(results: list[ImageScore], summary: dict[str, Any], notes: list[str]) -> str:
    """JSON for ``--json``."""
    return json.dumps(
        {"summary": summary, "warnings": notes, "images": [asdict(r) for r in results]}, indent=2
    )
