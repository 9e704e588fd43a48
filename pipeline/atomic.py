"""Atomic file writes: write to a temporary file in the same folder, then rename over the target."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.keras``, ``.npy``), because
    the writers choose their format by them. A failure removes the temporary file and leaves
    any previous ``path`` as it was. A target that exists and is not a regular file (a device,
    a FIFO, a symbolic link) is refused, never replaced.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # rename would swap a device, a FIFO or a link for a regular file and report success
        # (`--csv /dev/full` as root): write where the user pointed, or refuse; we refuse
        kind = "a symbolic link" if path.is_symlink() else "not a regular file"
        raise PipelineError(f"{kind}: refusing to replace it (name a regular file)", path=path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent
    )
    os.close(fd)
    # mkstemp makes the file 0600; give it the mode a plain open() would (a run's generator
    # and logs are read by other users and by the other workers of a multi-worker run)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def exclusive_lock(path: Path, *, busy: str, where: Path | None = None) -> Iterator[None]:
    """Hold an advisory lock (``flock``) on ``path`` — a folder, or a lock file made if
    missing — for the life of the block; when another process holds it, fail at once with
    ``busy`` (naming ``where``, else ``path``). The lock goes with the process, so a crashed
    holder never leaves a stale lock behind."""
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(busy, path=where or path) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock
