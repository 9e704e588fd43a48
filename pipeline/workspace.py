"""The workspace folder: catalog, slice cache, index, runs, candidates and releases."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from pipeline.catalog import get_meta, init_catalog, read_session
from pipeline.errors import PipelineError
from pipeline.labels import LabelSchema

DEFAULT_WORKSPACE = "workspace"
ENV_WORKSPACE = "PIPELINE_WORKSPACE"


@dataclass
class Workspace:
    """An opened workspace: its root folder and a catalog engine."""

    root: Path
    engine: Engine

    @property
    def catalog_path(self) -> Path:
        """``catalog.db``."""
        return self.root / "catalog.db"

    @property
    def cache_dir(self) -> Path:
        """Preprocessed slices, one file per source volume."""
        return self.root / "cache"

    @property
    def index_dir(self) -> Path:
        """FAISS index of source-slice embeddings."""
        return self.root / "index"

    @property
    def runs_dir(self) -> Path:
        """Training runs."""
        return self.root / "runs"

    @property
    def candidates_dir(self) -> Path:
        """Generated candidate batches."""
        return self.root / "candidates"

    @property
    def releases_dir(self) -> Path:
        """Exported bundles."""
        return self.root / "releases"

    def label_schema(self) -> LabelSchema | None:
        """The label schema fixed by the first ingest, or None for an empty workspace."""
        with read_session(self.engine) as session:
            text = get_meta(session, "label_schema")
        return None if text is None else LabelSchema.from_mapping(json.loads(text))

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive advisory lock ``.NAME.lock``: two commands of one kind never interleave."""
        path = self.root / f".{name}.lock"
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PipelineError(
                    f"another '{name}' is running on this workspace", path=self.root
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release the catalog's connections."""
        self.engine.dispose()


def resolve_workspace_path(path: str | os.PathLike[str] | None) -> Path:
    """The workspace path from an explicit value, ``$PIPELINE_WORKSPACE`` or ``./workspace``."""
    if path is None:
        path = os.environ.get(ENV_WORKSPACE) or DEFAULT_WORKSPACE
    return Path(path)


def open_workspace(path: str | os.PathLike[str], *, create: bool = True) -> Workspace:
    """Open (and with ``create``, make) the workspace at ``path``."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise PipelineError("workspace path exists and is not a folder", path=root)
    if not root.exists():
        if not create:
            raise PipelineError("no workspace here (run 'pipeline ingest' first)", path=root)
        root.mkdir(parents=True)
    catalog = root / "catalog.db"
    if not create and not catalog.exists():
        raise PipelineError(
            "no catalog.db in this workspace (run 'pipeline ingest' first)", path=root
        )
    engine = init_catalog(catalog)
    ws = Workspace(root=root, engine=engine)
    ws.cache_dir.mkdir(exist_ok=True)
    return ws
