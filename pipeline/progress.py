"""The progress hook every long library call takes: it wraps an iterable and yields its items.

``iter`` is the silent default; the CLI passes a tqdm bar. Library code never draws anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Progress = Callable[[Iterable[Any]], Iterable[Any]]
