"""The slice cache: one memory-mappable ``.npy`` per source volume.

Each file is a structured array with one record per kept slice: ``image`` (float32 in [0, 1])
and ``mask`` (uint8 class indices), so a whole volume is one file that ``np.load(...,
mmap_mode="r")`` opens without reading it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def slice_dtype(size: int) -> np.dtype:
    """Record type of one cached slice at ``size``²."""
    return np.dtype([("image", "<f4", (size, size)), ("mask", "u1", (size, size))])


def create_cache(path: Path, n: int, size: int) -> np.memmap:
    """A new cache file for ``n`` slices at ``size``², memory-mapped for writing."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=slice_dtype(size), shape=(n,))


def close_cache(cache: np.memmap, path: Path) -> None:
    """Flush a cache opened by :func:`create_cache` and sync it to disk."""
    cache.flush()
    del cache
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_cache(path: Path) -> np.ndarray:
    """Memory-map a cache file read-only; ``arr["image"][i]`` and ``arr["mask"][i]`` are slices."""
    return np.load(path, mmap_mode="r")
