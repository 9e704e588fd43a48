"""Shared fixtures: small phantoms, workspaces, the real CT data in ../shared/data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import cli
from pipeline.phantom import write_phantom
from pipeline.workspace import open_workspace

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def phantom_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small phantom volumes (64² × 16), written once per session."""
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, volumes=6, seed=3, size=64, n_slices=16, workers=1)
    return out


@pytest.fixture
def phantom_dir(phantom_master: Path, tmp_path: Path) -> Path:
    """A private copy of the small phantom that a test may damage."""
    dst = tmp_path / "src"
    shutil.copytree(phantom_master, dst)
    return dst


@pytest.fixture
def ws_path(tmp_path: Path) -> Path:
    """Path of a fresh workspace (not yet created)."""
    return tmp_path / "ws"


@pytest.fixture
def ws(ws_path: Path):
    """An opened fresh workspace, closed after the test."""
    workspace = open_workspace(ws_path)
    yield workspace
    workspace.close()


def shared_dataset(name: str) -> Path:
    """A folder of ../shared/data, or skip the test naming what is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real CT data not present: {path} (team machines only)")
    return path


def run(*args: object, input: str | None = None) -> Result:
    """Invoke the `pipeline` CLI in-process (click's CliRunner; stdout and stderr separate)."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def indexed_workspace(root: Path, *, volumes: int, seed: int, slices: int) -> Path:
    """``root/ws``: a small phantom (64², ``slices`` per volume) ingested at 32² with a
    0.5/0.25/0.25 split and its privacy index built."""
    write_phantom(root / "src", volumes=volumes, seed=seed, size=64, n_slices=slices, workers=1)
    ws = root / "ws"
    assert run("ingest", root / "src", "-w", ws, "--size", 32, "--split", "0.5,0.25,0.25")
    assert run("index", "-w", ws).exit_code == 0
    return ws


def copy_workspace(src: Path, tmp_path: Path) -> Path:
    """A private copy of a module-scoped workspace that a test may change."""
    dst = tmp_path / "ws"
    shutil.copytree(src, dst)
    return dst


def thin_vessel(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A myocardium-like disc (label 1, 0.40) holding a bright 2-px vessel (label 7, 0.80)
    and a 4-px one (label 6, 0.85), on air (0.0): the demo's pulmonary artery and aorta."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.uint8)
    mask[(yy - 32) ** 2 + (xx - 32) ** 2 < 22**2] = 1
    mask[(np.abs((yy - 30) - 0.6 * (xx - 32)) < 1.2) & (np.abs(xx - 32) < 14)] = 7
    mask[(yy - 40) ** 2 + (xx - 22) ** 2 < 2.2**2] = 6
    image = np.select([mask == 7, mask == 6, mask == 1], [0.80, 0.85, 0.40], 0.0)
    return image.astype(np.float32), mask
