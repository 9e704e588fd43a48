"""Exceptions the CLI turns into one-line messages and exit codes (2 bad input, 1 check failed)."""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Bad input or an unusable workspace: the command stops with exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckFailedError(PipelineError):
    """A check the user asked for did not pass (a gate, a verify): exit code 1."""

    exit_code = 1
