"""The privacy filter: build the source index and calibrate it (`pipeline index`), score images
(`pipeline filter --images`) and candidate batches (`--batch`), and the nearest source slices
the review app shows — all through one scorer, :func:`score_against`."""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numexpr
import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.atomic import atomic_write
from pipeline.augment import DEFORM_DEFAULTS, PLANTED, deform_mask
from pipeline.candidates import batch_images, batch_row
from pipeline.catalog import Candidate, PrivacyCalibration, Source, utcnow, write_session
from pipeline.embed import EMBEDDERS, Embedder, PixelEmbedder, load_embedder
from pipeline.errors import PipelineError
from pipeline.figures import privacy_figure
from pipeline.imageio import image_files, read_nifti_slices, read_png, skipped_entries
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
from pipeline.membership import mask_similarity
from pipeline.preprocess import centre, resize_image, resize_mask, stored_to_unit
from pipeline.privacy import (
    COPY_RECALL,
    DEFAULT_QUANTILE,
    Calibration,
    PreparedImage,
    aligned_scores_prepared,
    calibrate,
    centre_masks,
    mask_best,
    place_threshold,
    prepare_images,
)
from pipeline.progress import Progress
from pipeline.slices import SliceRef, SliceStore, slice_refs
from pipeline.workspace import Workspace

#: The embedding search returns RERANK·k neighbours; a full-resolution correlation keeps k.
RERANK = 4
#: The calibration's score lists: stored in the manifest (p-values, figures), not printed.
SCORE_LISTS = ("baseline", "texture_baseline", "planted")


def _standardized(image: np.ndarray) -> np.ndarray:
    """The centred image as a zero-mean, unit-variance float64 row (full resolution)."""
    a = centre(image).ravel().astype(np.float64)
    return (a - a.mean()) / (a.std() + 1e-12)


def _correlations(row: np.ndarray, source_rows: list[np.ndarray]) -> np.ndarray:
    # einsum's own loop, not BLAS: OpenBLAS's threaded dot serialises the scorer's threads
    return np.array([float(np.einsum("i,i->", row, b)) / row.size for b in source_rows])


class SourceCache:
    """Per-slice work the scorer needs again and again — the standardized row of the
    correlation re-rank, and the prepared SSIM/texture quantities of the slices it keeps —
    for the most recently used slices within a memory budget. A source slice is a neighbour of
    many images (the slices around its level, in both orientations), so scoring a batch does
    that work once per source. Thread-safe; the work itself runs outside the lock."""

    def __init__(self, store: SliceStore, *, smooth: float, budget_mib: int = 384) -> None:
        self.store = store
        self.smooth = smooth
        self.budget = budget_mib * 2**20
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self._prepared: OrderedDict[int, PreparedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # score_against's threads share one cache

    def rows(self, ids: list[int]) -> list[np.ndarray]:
        """Standardized rows of slices ``ids`` (the correlation re-rank), in order."""
        found = self._lookup(self._rows, ids)
        missing = [i for i in ids if i not in found]
        if missing:
            images = self.store.images(missing)
            new = {i: _standardized(im) for i, im in zip(missing, images, strict=True)}
            self._insert(self._rows, new, lambda row: row.nbytes)
            found.update(new)
        return [found[i] for i in ids]

    def prepared(self, ids: list[int]) -> list[PreparedImage]:
        """Prepared SSIM/texture quantities of slices ``ids``, in order."""
        found = self._lookup(self._prepared, ids)
        missing = [i for i in ids if i not in found]
        if missing:
            batch = prepare_images(self.store.images(missing), smooth=self.smooth)
            new = dict(zip(missing, batch, strict=True))
            self._insert(self._prepared, new, lambda p: p.nbytes)
            found.update(new)
        return [found[i] for i in ids]

    def _lookup(self, table: OrderedDict, ids: list[int]) -> dict[int, Any]:
        with self._lock:
            found = {i: table[i] for i in ids if i in table}
            for i in found:
                table.move_to_end(i)
        return found

    def _insert(self, table: OrderedDict, new: dict[int, Any], size: Callable[[Any], int]) -> None:
        with self._lock:
            for i, value in new.items():
                if i not in table:
                    table[i] = value
                    self._bytes += size(value)
            # evict the least recently used entries of this table, never the ones just added
            while self._bytes > self.budget and len(table) > len(new):
                _, old = table.popitem(last=False)
                self._bytes -= size(old)


@dataclass(frozen=True)
class FilterConfig:
    """Privacy filter settings (stored in the index manifest)."""

    embedder: str = "pixel"
    k: int = 5
    max_shift: int = 4
    smooth: float = 1.0  # Gaussian sigma (px) before SSIM; 0 compares raw pixels
    quantile: float = DEFAULT_QUANTILE
    threshold: float | None = None  # explicit threshold instead of calibration
    mask_threshold: float | None = None  # explicit label-map Dice threshold, likewise
    set_by: str | None = None  # who passed an explicit threshold (recorded with it)
    calibration_max: int = 2000  # slices sampled for the leave-one-patient-out baseline
    planted: int = 20  # source slices planted per kind of near-copy (the other tail)
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
    prepared: PreparedImage,
    found: np.ndarray,
    cache: SourceCache,
    *,
    k: int,
    max_shift: int,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """One view (an image or its mirror image, raw and prepared) against the ids its embedding
    search found: a full-resolution correlation keeps the best ``k``, which get the aligned SSIM
    and texture scores. Returns (slice ids, SSIM, texture), in the kept order."""
    cand = list(dict.fromkeys(int(x) for x in found if x >= 0))
    if not cand:
        return [], np.zeros(0), np.zeros(0)
    if len(cand) > k:
        corr = _correlations(_standardized(view), cache.rows(cand))
        order = np.argsort(-corr, kind="stable")[:k]
        cand = [cand[o] for o in order]
    ssim, tex = aligned_scores_prepared(prepared, cache.prepared(cand), max_shift=max_shift)
    return cand, ssim, tex


def score_against(
    index: faiss.Index,
    embedder: Embedder,
    store: SliceStore,
    images: np.ndarray,
    *,
    k: int,
    max_shift: int,
    smooth: float = 0.0,
    cache: SourceCache | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each image: best aligned SSIM over its top-k neighbours, in both orientations.

    The image's own neighbours are compared with the image, its mirror image's neighbours with
    the mirror image (each over the small shift search). Returns (SSIM scores, nearest slice
    ids, best embedding similarity, best texture correlation). Pass one ``cache`` (with the
    same ``smooth``) to every call over a set of images so each source is prepared once.
    """
    if cache is None or cache.smooth != smooth:
        cache = SourceCache(store, smooth=smooth)
    sims, ids = search_both_ways(index, embedder, images, k * RERANK)
    half = ids.shape[1] // 2
    scores = np.zeros(len(images))
    texture = np.zeros(len(images))
    nearest = np.full(len(images), -1, dtype=np.int64)

    def one(i: int) -> None:
        image = images[i]
        prepared = prepare_images(image[None], smooth=smooth)[0]
        views = (
            (image, prepared, ids[i, :half]),
            (image[:, ::-1], prepared.mirrored(), ids[i, half:]),
        )
        for view, prep, found in views:
            cand, ssim, tex = _view_scores(view, prep, found, cache, k=k, max_shift=max_shift)
            if not cand:
                continue
            j = int(np.argmax(ssim))
            if nearest[i] < 0 or ssim[j] > scores[i]:
                scores[i], nearest[i] = ssim[j], cand[j]
            texture[i] = max(texture[i], float(tex.max()))

    # images are independent and numpy, scipy.ndimage and the FFT release the GIL: one thread
    # per core (each image's numbers do not depend on which thread or order computed them)
    workers = min(
        len(images),
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
    )
    if workers > 1:
        # numexpr serialises concurrent calls when it runs its own threads: one each here
        previous = numexpr.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(len(images))))
        finally:
            numexpr.set_num_threads(previous)
    else:
        for i in range(len(images)):
            one(i)
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
    cache = SourceCache(loaded.store, smooth=float(cfg.get("smooth", 0.0)))
    prepared = prepare_images(image[None], smooth=cache.smooth)[0]
    views = (
        (False, image, prepared, ids[0, :half]),
        (True, image[:, ::-1], prepared.mirrored(), ids[0, half:]),
    )
    for mirrored, view, prep, found in views:
        cand, ssim, tex = _view_scores(
            view, prep, found, cache, k=int(cfg["k"]), max_shift=int(cfg["max_shift"])
        )
        for sid, s_, t_ in zip(cand, ssim, tex, strict=True):
            if sid in rows and rows[sid]["ssim"] >= s_:
                continue
            src = loaded.store.images([sid])[0]
            rows[sid] = {
                "slice_id": sid,
                "patient": loaded.store.refs[sid].patient,
                "ssim": float(s_),
                "texture": float(t_),
                "mirrored": mirrored,
                "image": src[:, ::-1] if mirrored else src,
            }
    return sorted(rows.values(), key=lambda r: -r["ssim"])[:k]


class _WithoutPatient:
    """A flat index of every source slice searched as if one patient's slices were not in it
    (a FAISS ID selector), so each patient is scored against everybody else."""

    def __init__(self, flat: faiss.Index, ids: np.ndarray, excluded: np.ndarray) -> None:
        self.flat, self.ids = flat, ids
        self._batch = faiss.IDSelectorBatch(np.asarray(excluded, dtype=np.int64))
        self._not = faiss.IDSelectorNot(self._batch)  # holds on to _batch's C++ object
        self._params = faiss.SearchParameters(sel=self._not)
        self.ntotal = flat.ntotal - len(excluded)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products among the other patients' slices, as catalog slice ids."""
        sims, rows = self.flat.search(x, k, params=self._params)
        return sims, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)


def baseline_scores(
    vectors: np.ndarray,
    refs: list[SliceRef],
    embedder: Embedder,
    store: SliceStore,
    cfg: FilterConfig,
    progress: Progress = iter,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The "different person" baseline, leave one patient out: every patient's slices (a seeded
    sample of ``cfg.calibration_max`` when there are more) scored against all *other* patients'
    slices — the reference population a deployed candidate meets, short of one patient.
    Returns (SSIM, texture, patient) per sampled slice, in slice order."""
    rng = np.random.default_rng(cfg.seed)
    picked = np.arange(len(refs))
    if len(picked) > cfg.calibration_max:
        picked = np.sort(rng.choice(picked, size=cfg.calibration_max, replace=False))
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    ids = np.array([r.slice_id for r in refs], dtype=np.int64)
    rows_of: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        rows_of.setdefault(r.patient, []).append(i)
    chosen = set(picked.tolist())
    work = []  # (patient, chunk of its sampled rows), in slice order so neighbours repeat
    for patient, rows in rows_of.items():
        mine = [i for i in rows if i in chosen]
        work += [(patient, mine[j : j + 64]) for j in range(0, len(mine), 64)]
    cache = SourceCache(store, smooth=cfg.smooth)
    ssim, texture = np.zeros(len(refs)), np.zeros(len(refs))
    for patient, chunk in progress(work):
        index = _WithoutPatient(flat, ids, np.array(rows_of[patient]))
        s, _, _, tex = score_against(
            index,
            embedder,
            store,
            store.images(ids[chunk].tolist()),
            k=cfg.k,
            max_shift=cfg.max_shift,
            smooth=cfg.smooth,
            cache=cache,
        )
        ssim[chunk], texture[chunk] = s, tex
    patients = np.array([r.patient for r in refs])
    return ssim[picked], texture[picked], patients[picked]


def planted_scores(
    index: faiss.Index,
    refs: list[SliceRef],
    embedder: Embedder,
    store: SliceStore,
    cfg: FilterConfig,
    progress: Progress = iter,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The other tail: near-copies of indexed slices, disguised the ways a copy can be
    (:data:`pipeline.augment.PLANTED`: exact, mirrored, shifted, noisy, rescaled, elastic,
    blended), scored against the index that holds their source. ``cfg.planted`` seeded source
    slices per kind. Returns kind → (SSIM, texture)."""
    rng = np.random.default_rng([cfg.seed, 1])
    n = min(cfg.planted, len(refs))
    sources = rng.choice(len(refs), size=n, replace=False)
    partners = rng.permutation(len(refs))[:n]  # the blend's other slice
    images = store.images([refs[i].slice_id for i in sources])
    others = store.images([refs[i].slice_id for i in partners])
    cache = SourceCache(store, smooth=cfg.smooth)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for kind, make in progress(list(PLANTED.items())):
        copies = np.stack(
            [
                make(img, other, np.random.default_rng([cfg.seed, 2, j]))
                for j, (img, other) in enumerate(zip(images, others, strict=True))
            ]
        ).astype(np.float32)
        s, _, _, tex = score_against(
            index,
            embedder,
            store,
            copies,
            k=cfg.k,
            max_shift=cfg.max_shift,
            smooth=cfg.smooth,
            cache=cache,
        )
        out[kind] = (s, tex)
    return out


def calibrate_index(
    vectors: np.ndarray,
    refs: list[SliceRef],
    index: faiss.Index,
    embedder: Embedder,
    store: SliceStore,
    cfg: FilterConfig,
    progress: Progress = iter,
) -> Calibration | None:
    """Both tails → thresholds: the leave-one-patient-out baseline (:func:`baseline_scores`)
    and the planted copies (:func:`planted_scores`), placed by :func:`pipeline.privacy.calibrate`.

    Returns None with fewer than two patients (no different person to compare with: the caller
    then needs an explicit threshold).
    """
    if len({r.patient for r in refs}) < 2:
        return None
    ssim, texture, patients = baseline_scores(vectors, refs, embedder, store, cfg, progress)
    planted = planted_scores(index, refs, embedder, store, cfg, progress) if cfg.planted else None
    return calibrate(ssim, texture, quantile=cfg.quantile, planted=planted, patients=patients)


#: Planted deformed copies of source label maps, the mask check's other tail (deformed by
#: :data:`pipeline.augment.DEFORM_DEFAULTS`, as ``generate --masks augmented`` deforms).
MASK_COPIES = 40
MASK_BASELINE = 500  # labelled slices sampled for the different-person tail
#: Label maps covering less of the slice than this are not compared: a sliver of one vessel
#: matches many people's exactly (on the phantom the different-person tail reached Dice 1.0
#: through them, which left no threshold at all) and says little about whose anatomy it is.
MASK_MIN_FOREGROUND = 0.01


def _comparable(masks: np.ndarray) -> np.ndarray:
    return (masks > 0).reshape(len(masks), -1).mean(1) >= MASK_MIN_FOREGROUND


def calibrate_masks(
    store: SliceStore, refs: list[SliceRef], cfg: FilterConfig
) -> dict[str, Any] | None:
    """The mask near-copy check's threshold, calibrated like the image filter's: the
    different-person tail is each sampled labelled slice's best centred multi-label Dice with
    any *other* patient's label map (leave-one-patient-out); the other tail is deformed copies
    of sampled label maps scored against every source map; the threshold is placed between
    them by :func:`pipeline.privacy.place_threshold` at ``1 - cfg.quantile``. Label maps under
    :data:`MASK_MIN_FOREGROUND` of the slice take no part. None with fewer than two patients.

    Measured on the 24-patient phantom (64²): different people's best Dice median 0.89 (99th
    percentile 0.95), deformed copies' 0.83 — the phantom's people are more alike than a
    deformed copy is to its source, so the check reports itself indistinct there and flags
    nothing; on anatomy that differs between people it separates (``tests/test_filter``).
    ``cfg.mask_threshold`` replaces the calibration, recorded as hand-set by ``cfg.set_by``."""
    if cfg.mask_threshold is not None:
        return {
            "threshold": cfg.mask_threshold,
            "explicit": True,
            "set_by": cfg.set_by,
            "set_at": utcnow().isoformat(timespec="seconds"),
            "bound": None,
            "copy_recall": None,
            "indistinct": False,
            "n_classes": 0,
        }
    every = store.masks([r.slice_id for r in refs])
    labelled = np.flatnonzero(_comparable(every)).tolist()
    patients = np.array([refs[i].patient for i in labelled])
    if len(set(patients.tolist())) < 2:
        return None
    masks = every[labelled]
    n_classes = int(masks.max()) + 1
    centred = centre_masks(masks)
    rng = np.random.default_rng([cfg.seed, 7])
    sample = np.sort(rng.choice(len(masks), min(MASK_BASELINE, len(masks)), replace=False))
    sim = mask_similarity(centred[sample], centred, n_classes)
    sim[patients[sample][:, None] == patients[None, :]] = -np.inf
    baseline = sim.max(1)
    baseline = baseline[np.isfinite(baseline)]
    names = tuple(f"c{c}" for c in range(n_classes))
    picks = rng.choice(len(masks), min(MASK_COPIES, len(masks)), replace=False)
    copies = np.stack(
        [
            deform_mask(
                masks[j],
                np.random.default_rng([cfg.seed, 8, int(j)]),
                class_names=names,
                drop=0.0,
                **DEFORM_DEFAULTS,
            )[0]
            for j in picks
        ]
    )
    copy_scores, _ = mask_best(centre_masks(copies), centred, n_classes)
    det = place_threshold("mask_dice", baseline, copy_scores, alpha=1.0 - cfg.quantile)
    recall = float(np.mean(copy_scores > det.threshold))
    return {
        "threshold": det.threshold,
        "floor": det.floor,
        "bound": det.bound,
        "n_baseline": len(baseline),
        "n_copies": len(copy_scores),
        "copy_recall": recall,
        "indistinct": recall < COPY_RECALL,
        "baseline_median": float(np.median(baseline)),
        "copies_median": float(np.median(copy_scores)),
        "n_classes": n_classes,
    }


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
        cal = Calibration.given(
            cfg.threshold, set_by=cfg.set_by, set_at=utcnow().isoformat(timespec="seconds")
        )
    else:
        cal = calibrate_index(vectors, refs, index, embedder, store, cfg, progress)
        if cal is None:
            raise PipelineError(
                "one patient only: the threshold is calibrated on how similar different "
                "patients' slices are (held-out comparisons need two or more); ingest more "
                "patients, or pass --threshold",
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
        # a hand-set image threshold does not switch off the mask check: it is calibrated
        "mask_check": calibrate_masks(store, refs, cfg),
    }
    atomic_write(emb_file, lambda tmp: np.save(tmp, vectors))
    write_index(ws, index, manifest)
    figure = ws.index_dir / "calibration.png"
    if cal.explicit:
        figure.unlink(missing_ok=True)  # an explicit threshold has no tails to show
    else:
        png = privacy_figure(cal, title="Privacy calibration")
        atomic_write(figure, lambda tmp: tmp.write_bytes(png))
    with write_session(ws.engine) as session:
        session.add(
            PrivacyCalibration(
                index_fingerprint=fingerprint,
                embedder=embedder.name,
                k=cfg.k,
                quantile=None if cal.explicit else cal.quantile,
                threshold=cal.threshold,
                texture_threshold=cal.texture_threshold,
                n_baseline=cal.n_baseline,
                baseline=list(cal.baseline),
                texture_baseline=list(cal.texture_baseline),
                details={
                    k: v
                    for k, v in cal.to_manifest().items()
                    if k not in ("baseline", "texture_baseline")
                },  # the planted-copy scores stay: the baselines have their own columns
            )
        )
    shown = {k: v for k, v in manifest["calibration"].items() if k not in SCORE_LISTS}
    return {**{k: v for k, v in manifest.items() if k != "ids"}, "calibration": shown}


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
    notes: list[str] = []
    if path.is_file():
        files = [path]
    elif path.is_dir():
        folder = path / "images" if (path / "images").is_dir() else path
        files = image_files(folder, what="images")
        skipped = skipped_entries(folder)
        if skipped:
            notes.append(f"{folder}: not read (only PNG and NIfTI files are): {skipped}")
    else:
        raise PipelineError("no such file or folder", path=path)
    units = "HU" if window is not None else "display"
    names: list[str] = []
    slices: list[np.ndarray] = []
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
    p_value: float | None  # conformal, against the different-person baseline (None: explicit)


def _score(
    loaded: LoadedIndex,
    images: np.ndarray,
    *,
    index: Any = None,
    cache: SourceCache | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`score_against` with the settings the index was built with (its own index unless
    another, e.g. a subset, is given)."""
    cfg = loaded.manifest["config"]
    return score_against(
        loaded.index if index is None else index,
        loaded.embedder,
        loaded.store,
        images,
        k=int(cfg["k"]),
        max_shift=int(cfg["max_shift"]),
        smooth=float(cfg.get("smooth", 0.0)),
        cache=cache,
    )


def score_images(
    loaded: LoadedIndex, images: np.ndarray, names: list[str], *, progress: Progress = iter
) -> list[ImageScore]:
    """Score images against the index with the calibrated threshold (same path for candidates)."""
    cfg = loaded.manifest["config"]
    cal = loaded.calibration
    results: list[ImageScore] = []
    # one cache for every chunk: a source slice near many images is prepared once per call
    cache = SourceCache(loaded.store, smooth=float(cfg.get("smooth", 0.0)))
    chunks = [range(i, min(i + 64, len(images))) for i in range(0, len(images), 64)]
    for chunk in progress(chunks):
        sub = images[chunk.start : chunk.stop]
        scores, nearest, _, texture = _score(loaded, sub, cache=cache)
        p_values = cal.p_values(scores, texture)
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
                    p_value=None if p_values is None else float(p_values[j]),
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


def memorisation_audit(
    loaded: LoadedIndex, images: np.ndarray, *, seed: int = 0
) -> dict[str, Any] | None:
    """Are candidates closer to the training patients than to patients the generator never
    saw? In the filter's own scoring space: each candidate's most similar slice (best aligned
    SSIM) among the same seeded number of slices from every patient, training and held-out
    (val + test); the patients those slices belong to, tested at the patient level
    (:func:`pipeline.membership.nearest_share_test`: balanced share closer to training,
    permutation p over patients; the idea of SDMetrics' DCR overfitting protection, with
    patients, not candidates, as the unit). None without held-out slices."""
    from pipeline.membership import nearest_share_test

    refs = loaded.refs
    if not len(images) or len({r.split == "train" for r in refs}) < 2:
        return None  # no candidates, or no held-out (or no training) slices to compare
    by_patient: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        by_patient.setdefault(r.patient, []).append(i)
    each = min(len(v) for v in by_patient.values())
    rng = np.random.default_rng([seed, 5])
    pool = sorted(
        int(i)
        for p in sorted(by_patient)
        for i in rng.choice(by_patient[p], size=each, replace=False)
    )
    vectors = loaded.embedder.embed(loaded.store.images([refs[i].slice_id for i in pool]))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.array([refs[i].slice_id for i in pool]))
    scores, nearest, _, _ = _score(loaded, images, index=index)
    owner = {refs[i].slice_id: refs[i].patient for i in pool}
    member = {p: refs[v[0]].split == "train" for p, v in by_patient.items()}
    found = [owner[int(n)] for n in nearest if int(n) in owner]  # -1: nothing retrieved
    test = nearest_share_test(found, member, seed=seed)
    return {**test, "reference_slices_each": each, "median_ssim": float(np.median(scores))}


def check_masks(
    loaded: LoadedIndex, masks: np.ndarray, names: list[str]
) -> tuple[list[bool], dict[str, Any]]:
    """The mask near-copy check of a batch: each candidate's label map, centred, against every
    source label map; flagged above the index's ``mask_check`` threshold. Returns the flags and
    a summary (the rule, how many flagged and which, the median score)."""
    rule = loaded.manifest.get("mask_check")
    if rule is None:
        note = "the index has no mask check (built before it, or one patient): run 'pipeline index'"
        return [False] * len(masks), {"checked": False, "note": note}
    sources = loaded.store.masks([r.slice_id for r in loaded.refs])
    if sources.shape[1:] != masks.shape[1:]:
        sources = np.stack([resize_mask(m, masks.shape[1]) for m in sources])
    sources = centre_masks(sources[_comparable(sources)])
    n_classes = max(int(rule["n_classes"]), int(masks.max()) + 1)
    scores, _ = mask_best(centre_masks(masks), sources, n_classes)
    scores[~_comparable(masks)] = 0.0  # too little anatomy to say whose it is
    flags = [bool(s > rule["threshold"]) for s in scores]
    return flags, {
        "checked": True,
        **{k: rule[k] for k in ("threshold", "copy_recall", "indistinct", "bound")},
        "explicit": bool(rule.get("explicit")),
        "flagged": int(sum(flags)),
        "flagged_names": [n for n, f in zip(names, flags, strict=True) if f],
        "median_score": float(np.median(scores)) if len(scores) else None,
    }


def filter_batch(ws: Workspace, name: str, *, progress: Progress = iter) -> dict[str, Any]:
    """Score every candidate of a batch against the source index; store scores and flags, and
    the memorisation audit (:func:`memorisation_audit`)."""
    loaded = load_index(ws)
    ids, names, images, masks = batch_images(ws, name)
    results = score_images(loaded, images, names, progress=progress)
    mask_flags, mask_summary = check_masks(loaded, masks, names)
    summary = {
        "count": len(results),
        **_verdict_summary(loaded, results),
        "flagged": sum(r.flagged or m for r, m in zip(results, mask_flags, strict=True)),
        "masks": mask_summary,
        "memorisation": memorisation_audit(
            loaded, images, seed=int(loaded.manifest["config"]["seed"])
        ),
        "index_catalog": loaded.manifest["catalog"],
    }
    if summary["memorisation"] is not None:
        with Session(ws.engine) as session:
            kind = batch_row(session, name).masks
        # masks deformed from training slices carry those slices' anatomy: "closer to training"
        # is then expected of any generator, and the audit is read with that in mind
        summary["memorisation"]["masks_from_training"] = kind in ("augmented", "honeypot")
        summary["memorisation"]["mask_source"] = kind
    with write_session(ws.engine) as session:
        for cid, r, m in zip(ids, results, mask_flags, strict=True):
            row = session.get(Candidate, cid)
            row.privacy_score, row.texture_score = r.score, r.texture
            row.privacy_margin, row.flagged = r.margin, r.flagged or bool(m)
            row.nearest_slice_id = r.nearest_slice
        batch = batch_row(session, name)
        batch.privacy = summary
        batch.filtered_at = utcnow()
    png = privacy_figure(
        loaded.calibration,
        title=f"Privacy, batch {name}",
        ssim=[r.score for r in results],
        texture=[r.texture for r in results],
        label="candidates",
    )
    report = ws.candidates_dir / name / "report"
    report.mkdir(parents=True, exist_ok=True)
    atomic_write(report / "privacy_hist.png", lambda tmp: tmp.write_bytes(png))
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
