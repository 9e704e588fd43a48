"""A trained run as the later stages use it: its catalog row, its generator, its units.

``pipeline train`` writes ``runs/<run>/`` and the ``Run`` row; generate, evaluate and the
honeypots read them back through :func:`find_run` only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.config import GanConfig
from pipeline.catalog import Run
from pipeline.errors import PipelineError
from pipeline.labels import LabelSchema
from pipeline.preprocess import DEFAULT_WINDOW
from pipeline.validate import path_name
from pipeline.workspace import Workspace


@dataclass(frozen=True)
class TrainedRun:
    """A run with a generator: what generation needs to know about it."""

    id: int
    name: str
    generator_path: Path  # derived from the open workspace (runs/<name>/generator.keras)
    generator_sha256: str
    config: dict[str, Any]  # runs/<name>/config.json as stored in the catalog

    @property
    def model(self) -> GanConfig:
        """The generator's configuration."""
        return GanConfig.from_dict(self.config)

    @property
    def schema(self) -> LabelSchema:
        """The label schema it was trained with."""
        return LabelSchema.from_mapping(self.config["label_schema"])

    @property
    def units(self) -> tuple[str, tuple[float, float]]:
        """The units (``HU`` or ``display``) and HU window its candidates are written in."""
        return run_units(self.config)


def run_units(config: dict[str, Any]) -> tuple[str, tuple[float, float]]:
    """The units and HU window a run's candidates are written in (from its config.json)."""
    data = config.get("data", {})
    units = data.get("units") or ["display"]
    windows = data.get("windows") or [list(DEFAULT_WINDOW)]
    unit = "HU" if units == ["HU"] else "display"
    return unit, (float(windows[0][0]), float(windows[0][1]))


def find_run(ws: Workspace, name: str) -> TrainedRun:
    """The trained run ``name``; an error when it is unknown or its generator file is missing."""
    with Session(ws.engine) as session:
        row = session.scalar(select(Run).where(Run.name == name))
        if row is None or not row.generator_path:
            raise PipelineError(f"no trained run {name!r} (run 'pipeline train')", path=ws.runs_dir)
        # the file always lives in the run's folder: derive it from the workspace that is open
        # now, so a copied or moved workspace (or another working directory) finds it
        path = ws.runs_dir / path_name(row.name, what="run") / "generator.keras"
        run = TrainedRun(row.id, row.name, path, row.generator_sha256, row.config)
    if not path.exists():
        raise PipelineError("the run's generator.keras is missing", path=path)
    return run


def load_generator(path: str | Path, expected_sha256: str) -> Any:
    """Load ``generator.keras`` after checking it is the file the run recorded."""
    import keras

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise PipelineError(
            "generator.keras differs from the one the run recorded (sha256 mismatch)", path=path
        )
    return keras.models.load_model(path, compile=False)
