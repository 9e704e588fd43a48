"""A quiet TensorFlow start-up for the command line and the app.

TensorFlow 2.21 logs through C++ absl before anyone calls ``absl::InitializeLog()``, and absl then
writes every message straight to file descriptor 2 whatever ``TF_CPP_MIN_LOG_LEVEL`` says:
"All log messages before absl::InitializeLog() ...", "oneDNN custom operations are on", "Could
not find cuda drivers". A user reads these as errors. The only lever from Python is the file
descriptor itself, so the first ``import tensorflow`` (direct, or through keras) runs with fd 2
pointed at a temporary file; if the import fails, what it wrote is replayed so nothing that
explains a failure is lost. Later messages obey ``TF_CPP_MIN_LOG_LEVEL`` as usual.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from types import ModuleType

#: Hide TensorFlow's C++ log lines below FATAL unless the user chose a level.
QUIET_LEVEL = "3"


@contextmanager
def stderr_to_file() -> Iterator[None]:
    """Point fd 2 at a temporary file for the block; replay its text if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` inside :func:`stderr_to_file`."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with stderr_to_file():
            self.inner.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders and wraps its loader; then steps aside."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow(env: MutableMapping[str, str], *, verbose: bool = False) -> None:
    """Silence TensorFlow's start-up lines in this process (and, through ``env``, its children).

    A level the user set in ``TF_CPP_MIN_LOG_LEVEL`` is kept; ``verbose`` shows everything.
    Does nothing once TensorFlow is imported.
    """
    if verbose:
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    user_chose = "TF_CPP_MIN_LOG_LEVEL" in env
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LEVEL)
    if user_chose or "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
