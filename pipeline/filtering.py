"""`pipeline index` and `pipeline filter`: build the source index, calibrate, score images."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import nibabel as nib
import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.atomic import atomic_write
from pipeline.catalog import PrivacyCalibration, Source, write_session
from pipeline.embed import EMBEDDERS, Embedder, PixelEmbedder, centre
from pipeline.errors import PipelineError
from pipeline.index import (
    LoadedIndex,
    SliceRef,
    SliceStore,
    catalog_fingerprint,
    embed_refs,
    load_index,
    make_index,
    read_manifest,
    search_both_ways,
    slice_refs,
    write_index,
)
from pipeline.ingest import read_png
from pipeline.preprocess import ras_to_display, resize_image, window_to_unit
from pipeline.privacy import DEFAULT_QUANTILE, Calibration, aligned_scores, calibrate
from pipeline.workspace import Workspace

Progress = Callable[[Iterable[Any]], Iterable[Any]]
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


def _make_embedder(
    ws: Workspace, cfg: FilterConfig, store: SliceStore, refs: list[SliceRef], progress: Progress
) -> tuple[Embedder, dict[str, Any]]:
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
            cand = list(dict.fromkeys(int(x) for x in found if x >= 0))
            if not cand:
                continue
            sources = store.images(cand)
            if len(cand) > k:  # full-resolution correlation picks the k to re-score
                order = np.argsort(-full_correlation(view, sources), kind="stable")[:k]
                cand, sources = [cand[o] for o in order], sources[order]
            ssim, tex = aligned_scores(
                view, sources, max_shift=max_shift, flips=False, smooth=smooth
            )
            j = int(np.argmax(ssim))
            if nearest[i] < 0 or ssim[j] > scores[i]:
                scores[i], nearest[i] = ssim[j], cand[j]
            texture[i] = max(texture[i], float(tex.max()))
    return scores, nearest, sims.max(axis=1), texture


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
        from pipeline.embed import load_embedder

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
        embedder, params = _make_embedder(ws, cfg, store, refs, progress)
        vectors = embed_refs(store, refs, embedder, progress=progress)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index, info = make_index(vectors, ids, k=cfg.k, seed=cfg.seed)

    if cfg.threshold is not None:
        cal = Calibration(
            quantile=float("nan"), threshold=float(cfg.threshold), n_baseline=0, baseline=()
        )
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
        "calibration": {
            "quantile": None if cal.n_baseline == 0 else cal.quantile,
            "threshold": cal.threshold,
            "texture_threshold": cal.texture_threshold,
            "n_baseline": cal.n_baseline,
            "explicit": cal.n_baseline == 0,
        },
    }
    atomic_write(emb_file, lambda tmp: np.save(tmp, vectors))
    write_index(ws, index, manifest)
    with write_session(ws.engine) as session:
        session.add(
            PrivacyCalibration(
                index_fingerprint=fingerprint,
                embedder=embedder.name,
                k=cfg.k,
                quantile=None if cal.n_baseline == 0 else cal.quantile,
                threshold=cal.threshold,
                texture_threshold=cal.texture_threshold,
                n_baseline=cal.n_baseline,
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


IMAGE_SUFFIXES = (".png", ".nii", ".nii.gz")


def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PipelineError("no such file or folder", path=path)
    folder = path / "images" if (path / "images").is_dir() else path
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise PipelineError("no PNG or NIfTI images here", path=folder)
    return files


def read_images(path: Path, *, size: int, window: tuple[float, float] | None) -> InputImages:
    """Read PNG / NIfTI images (a NIfTI volume gives each axial slice) for scoring.

    NIfTI values are HU and are windowed with the workspace's window; PNG values are display
    units (/255). Other sizes are resized (with a warning); NaN or infinite pixels are an error.
    """
    names: list[str] = []
    slices: list[np.ndarray] = []
    notes: list[str] = []
    for f in _image_files(path):
        if f.name.lower().endswith(".png"):
            planes = [(f.name, read_png(f, mask=False) / np.float32(255.0))]
            with Image.open(f) as probe:
                if probe.mode not in ("L", "P", "I", "I;16", "I;16B"):
                    notes.append(f"{f.name}: {probe.mode} PNG of grey values read as one channel")
        else:
            if window is None:  # display-unit workspace (PNG sources): NIfTI holds 0–255
                note = "display-unit workspace: NIfTI values read as 0–255 display units"
                if note not in notes:
                    notes.append(note)
            try:
                img = nib.load(f)
                data = np.asanyarray(img.dataobj).astype(np.float32)
            except Exception as exc:
                raise PipelineError(f"unreadable NIfTI ({exc})", path=f) from None
            while data.ndim > 3 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim == 2:
                data = data[:, :, None]
            if data.ndim != 3:
                raise PipelineError(f"{data.ndim}-D image; expected 2-D or 3-D", path=f)
            canon = nib.orientations.apply_orientation(
                data, nib.orientations.io_orientation(img.affine)
            )
            disp = ras_to_display(canon)
            planes = [
                (
                    f"{f.name}#{z}" if len(disp) > 1 else f.name,
                    window_to_unit(disp[z], window) if window else disp[z] / np.float32(255.0),
                )
                for z in range(len(disp))
            ]
            if not np.isfinite(data).all():
                raise PipelineError("NaN or infinite pixel values", path=f)
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
    stored = loaded.manifest["calibration"]
    cal = Calibration(
        quantile=stored["quantile"] or float("nan"),
        threshold=float(stored["threshold"]),
        n_baseline=int(stored["n_baseline"]),
        baseline=(),
        texture_threshold=stored.get("texture_threshold"),
    )
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
    summary = {
        "images": len(results),
        "flagged": sum(r.flagged for r in results),
        "threshold": loaded.manifest["calibration"]["threshold"],
        "texture_threshold": loaded.manifest["calibration"].get("texture_threshold"),
        "quantile": loaded.manifest["calibration"]["quantile"],
        "n_baseline": loaded.manifest["calibration"]["n_baseline"],
        "embedder": loaded.manifest["embedder"],
    }
    return results, summary, inputs.warnings


def dumps_results(results: list[ImageScore], summary: dict[str, Any], notes: list[str]) -> str:
    """JSON for ``--json``."""
    return json.dumps(
        {"summary": summary, "warnings": notes, "images": [asdict(r) for r in results]}, indent=2
    )
