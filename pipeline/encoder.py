"""Training and using the slice encoder (``models.encoder``) as an index embedder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.augment import random_view
from pipeline.preprocess import centre, resize_image
from pipeline.progress import Progress

WEIGHTS = "encoder.weights.h5"
CONFIG = "encoder.json"


class EncoderEmbedder:
    """Embeds slices with a trained encoder (centred and resized to its input size)."""

    name = "encoder"

    def __init__(self, model: Any, cfg: Any) -> None:
        self.model = model
        self.cfg = cfg
        self.dim = cfg.dim

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) → (N, size, size, 1) model input."""
        out = [resize_image(centre(np.asarray(im, np.float32)), self.cfg.size) for im in images]
        return np.stack(out)[..., None] if out else np.zeros((0, self.cfg.size, self.cfg.size, 1))

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) in [0, 1] → (N, dim) unit rows."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        x = self.prepare(images)
        return np.asarray(self.model.predict_on_batch(x), dtype=np.float32)

    def params(self) -> dict[str, Any]:
        """Manifest entry."""
        return {"config": self.cfg.to_dict(), "weights": WEIGHTS}

    def save(self, folder: Path) -> None:
        """Write weights and config into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_weights(folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(self.cfg.to_dict(), indent=2))

    @classmethod
    def load(cls, folder: Path) -> EncoderEmbedder:
        """Rebuild from ``folder`` (offline: only local files)."""
        from models.encoder import EncoderConfig, build_encoder

        cfg = EncoderConfig(**json.loads((folder / CONFIG).read_text()))
        model = build_encoder(cfg)
        model.load_weights(folder / WEIGHTS)
        return cls(model, cfg)


def train_encoder(
    store: Any,
    refs: Sequence[Any],
    folder: Path,
    *,
    steps: int = 300,
    batch: int = 64,
    seed: int = 0,
    progress: Progress = iter,
) -> EncoderEmbedder:
    """Train the encoder contrastively on ``refs``' slices; save it into ``folder``.

    Each step takes ``batch`` slices and two random near-copies of each (flip, small rotation and
    shift, mild elastic deformation, intensity scaling, noise): the transforms a copied scan
    survives, so the encoder learns to map a copy next to its source.
    """
    import tensorflow as tf

    from models.encoder import ContrastiveTrainer, EncoderConfig

    cfg = EncoderConfig()
    rng = np.random.default_rng(seed)
    ids = [r.slice_id for r in refs]
    # Downsample every training slice once; augment at the encoder's resolution.
    pool = np.stack(
        [
            resize_image(im, cfg.size)
            for i in range(0, len(ids), 256)
            for im in store.images(ids[i : i + 256])
        ]
    )
    trainer = ContrastiveTrainer(cfg, seed=seed)
    batch = min(batch, len(pool))

    def views() -> tuple[np.ndarray, np.ndarray]:
        pick = rng.choice(len(pool), size=batch, replace=False)
        v1 = np.stack([centre(random_view(pool[p], rng)) for p in pick])[..., None]
        v2 = np.stack([centre(random_view(pool[p], rng)) for p in pick])[..., None]
        return v1, v2

    # one helper thread draws the next step's views while TensorFlow trains on these (the
    # draws stay in order, so the run is the same as drawing them in line): ~25% of a step
    with ThreadPoolExecutor(1) as helper:
        upcoming = helper.submit(views)
        for step in progress(range(steps)):
            v1, v2 = upcoming.result()
            if step + 1 < steps:
                upcoming = helper.submit(views)
            trainer.step(tf.constant(v1), tf.constant(v2))
    embedder = EncoderEmbedder(trainer.encoder, cfg)
    embedder.save(folder)
    return embedder
