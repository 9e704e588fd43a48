"""The source index: every source slice embedded and searchable with FAISS.

Stored in ``workspace/index/``: ``faiss.index`` (ids = catalog slice ids), ``manifest.json``
(embedder, dimension, index type and parameters, count, measured recall, the catalog fingerprint
it was built from, calibration) and the encoder's weights when the encoder embeds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy.orm import Session

from pipeline.atomic import atomic_write
from pipeline.embed import Embedder, load_embedder
from pipeline.errors import PipelineError
from pipeline.privacy import Calibration
from pipeline.progress import Progress
from pipeline.slices import SliceRef, SliceStore, slice_refs
from pipeline.workspace import Workspace

#: Below this many slices the index is exact (IndexFlatIP); above it IVF with tuned nprobe.
FLAT_MAX = 100_000
TARGET_RECALL = 0.99


def catalog_fingerprint(refs: Sequence[SliceRef]) -> str:
    """Identity of the indexed set: changes whenever a slice is added or moved."""
    h = hashlib.sha256()
    for r in refs:
        h.update(f"{r.slice_id}:{r.cache_file}:{r.row}:{r.split};".encode())
    return h.hexdigest()


def embed_refs(
    store: SliceStore,
    refs: Sequence[SliceRef],
    embedder: Embedder,
    *,
    batch: int = 256,
    progress: Progress = iter,
) -> np.ndarray:
    """Embeddings of ``refs`` in order, batch by batch."""
    chunks = [refs[i : i + batch] for i in range(0, len(refs), batch)]
    parts = [embedder.embed(store.images([r.slice_id for r in c])) for c in progress(chunks)]
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)


def make_index(
    vectors: np.ndarray, ids: np.ndarray, *, k: int = 5, seed: int = 0, flat_max: int = FLAT_MAX
) -> tuple[faiss.Index, dict[str, Any]]:
    """Exact inner-product index for small sets, IVF above ``flat_max`` with nprobe tuned.

    IVF uses 8·√N lists; nprobe is the smallest of 1, 2, 3, 4, 6, 8, 12, … whose recall@k of
    noisy copies of indexed vectors (their own id among the k nearest) reaches 0.99: measured,
    not assumed.
    """
    n, d = vectors.shape
    if n <= flat_max:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        index.add_with_ids(vectors, ids)
        return index, {"type": "flat", "recall_at_k": 1.0}
    nlist = int(8 * math.sqrt(n))  # finer lists: fewer vectors scanned per probe
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(n, size=min(n, nlist * 40), replace=False)]
    ivf.train(sample)
    ivf.add_with_ids(vectors, ids)
    nprobe, recall = tune_nprobe(ivf, vectors, ids, k=k, seed=seed)
    ivf.nprobe = nprobe
    return ivf, {"type": "ivf", "nlist": nlist, "nprobe": nprobe, "recall_at_k": recall}


def tune_nprobe(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    k: int,
    seed: int,
    n_queries: int = 1000,
    noise: float = 0.33,
) -> tuple[int, float]:
    """Smallest nprobe (1, 2, 3, 4, 6, 8, …) with recall@k ≥ 0.99 on perturbed indexed vectors.

    The perturbation (``noise`` of the vector's length spread over all dimensions, cosine
    ≈ 0.95 to the original) is harsher than a planted copy's in our embedders (≥ 0.99).
    """
    rng = np.random.default_rng(seed + 1)
    pick = rng.choice(len(vectors), size=min(n_queries, len(vectors)), replace=False)
    d = vectors.shape[1]
    queries = vectors[pick] + rng.normal(0, noise / math.sqrt(d), (len(pick), d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    steps = sorted({min(m * 2**e, index.nlist) for e in range(20) for m in (1, 1.5)})
    recall, nprobe = 0.0, 1
    for nprobe in (int(x) for x in steps):
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = float(np.mean([ids[p] in row for p, row in zip(pick, found, strict=True)]))
        if recall >= TARGET_RECALL:
            break
    return min(nprobe, index.nlist), recall


def on_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when faiss-gpu sees one (the ``gpu`` extra), else unchanged.

    faiss-gpu imports on machines without a GPU but does not fall back by itself, so ask first.
    """
    get = getattr(faiss, "get_num_gpus", None)
    if get is None or get() < 1:
        return index
    return faiss.index_cpu_to_all_gpus(index)


def search_both_ways(
    index: faiss.Index, embedder: Embedder, images: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each image and of its mirror image, merged: (N, 2k) sims and ids (-1 padded)."""
    vec = embedder.embed(images)
    vec_flip = embedder.embed(images[:, :, ::-1])
    k = max(1, min(k, index.ntotal))
    s1, i1 = index.search(vec, k)
    s2, i2 = index.search(vec_flip, k)
    return np.concatenate([s1, s2], axis=1), np.concatenate([i1, i2], axis=1)


# ----------------------------------------------------------------------------- storage


def index_paths(ws: Workspace) -> tuple[Path, Path]:
    """(faiss index file, manifest file)."""
    return ws.index_dir / "faiss.index", ws.index_dir / "manifest.json"


def write_index(ws: Workspace, index: faiss.Index, manifest: dict[str, Any]) -> None:
    """Write index then manifest, each atomically; the manifest is written last."""
    ws.index_dir.mkdir(exist_ok=True)
    index_file, manifest_file = index_paths(ws)
    atomic_write(index_file, lambda tmp: faiss.write_index(index, str(tmp)))
    atomic_write(manifest_file, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))


def read_manifest(ws: Workspace) -> dict[str, Any] | None:
    """The index manifest, or None when there is no index."""
    _, manifest_file = index_paths(ws)
    if not manifest_file.exists():
        return None
    return json.loads(manifest_file.read_text())


@dataclass
class LoadedIndex:
    """An index that matches the catalog, ready to search."""

    index: faiss.Index
    manifest: dict[str, Any]
    embedder: Embedder
    refs: list[SliceRef]
    store: SliceStore

    @property
    def calibration(self) -> Calibration:
        """The thresholds this index was calibrated with."""
        return Calibration.from_manifest(self.manifest["calibration"])


def load_index(ws: Workspace) -> LoadedIndex:
    """Open the workspace's index; refuse a missing or stale one."""
    manifest = read_manifest(ws)
    index_file, _ = index_paths(ws)
    if manifest is None or not index_file.exists():
        raise PipelineError("no source index (run 'pipeline index')", path=ws.index_dir)
    with Session(ws.engine) as session:
        refs = slice_refs(session)
    if manifest.get("catalog") != catalog_fingerprint(refs):
        new = len(refs) - int(manifest.get("count", 0))
        raise PipelineError(
            f"source index is stale ({len(refs)} slices in the catalog, {manifest.get('count')} "
            f"indexed{f', {new} new' if new > 0 else ''}); run 'pipeline index'",
            path=ws.index_dir,
        )
    index = faiss.read_index(str(index_file))
    if index.ntotal != len(refs):
        raise PipelineError(
            "index file does not match its manifest; run 'pipeline index --rebuild'",
            path=index_file,
        )
    if manifest["index"].get("type") == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(manifest["index"]["nprobe"])
    embedder = load_embedder(
        manifest["embedder"], ws.index_dir, manifest.get("embedder_params", {})
    )
    store = SliceStore(ws.cache_dir, refs)
    return LoadedIndex(on_gpu_if_available(index), manifest, embedder, refs, store)
