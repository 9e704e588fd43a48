"""Slice embedders for the source index: a pixel-space descriptor and the trained encoder.

Both map (N, H, W) images in [0, 1] to (N, D) float32 rows of unit length, so inner product is
cosine similarity. ``load_embedder`` restores the one an index was built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.preprocess import centre, resize_image

EMBEDDERS = ("pixel", "encoder")


class Embedder(Protocol):
    """What the index needs from an embedder."""

    name: str
    dim: int

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) in [0, 1] → (N, dim) float32, unit rows."""
        ...


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class PixelEmbedder:
    """Centred, anti-aliased ``side``² thumbnail, mean removed, unit length (Pearson)."""

    side: int = 32
    name: str = "pixel"

    @property
    def dim(self) -> int:
        """Vector length."""
        return self.side * self.side

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed a stack of slices."""
        images = np.asarray(images, dtype=np.float32)
        thumbs = (
            np.stack([resize_image(centre(im), self.side) for im in images])
            if len(images)
            else np.zeros((0, self.side, self.side), np.float32)
        )
        flat = thumbs.reshape(len(images), -1)
        return _unit_rows(flat - flat.mean(axis=1, keepdims=True))


def load_embedder(name: str, folder: Path, params: dict) -> Embedder:
    """The embedder an index manifest names (the encoder's weights live in ``folder``)."""
    if name == "pixel":
        return PixelEmbedder(side=int(params.get("side", 32)))
    if name == "encoder":
        from pipeline.encoder import EncoderEmbedder

        return EncoderEmbedder.load(folder)
    raise ValueError(f"unknown embedder {name!r}")
