"""One validator per kind of user input that becomes something else.

- a name that becomes a path (a run, a candidate batch, a bundle): :func:`path_name`, and
  :func:`inside` for any path built from one;
- a reviewer's name (an account, shown to admins): :func:`reviewer_name`;
- free text shown in the app (names, reasons, notes): :func:`markdown_text`;
- text written into a spreadsheet cell (the audit CSV): :func:`csv_cell` / :func:`csv_uncell`.

Every door (CLI option, app form, library entry point) calls these; nothing re-spells the rules.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from pipeline.errors import PipelineError

#: Longest name that becomes a folder: well under every filesystem's 255-byte component limit,
#: with room for suffixes such as ``.zip`` and ``.export-tmp-XXXXXXXX``.
MAX_NAME = 64
_PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REVIEWER = re.compile(r"[a-z0-9](?:[a-z0-9._-]| (?! ))*[a-z0-9._-]")
MAX_REVIEWER = 32


def path_name(value: str, *, what: str) -> str:
    """A name that becomes one folder or file name under the workspace (run, batch, bundle).

    Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most
    ``MAX_NAME`` characters: no separators, no ``..``, nothing absolute, nothing hidden, nothing
    a shell or a filesystem reads specially. Returns the name unchanged or raises a one-line
    :class:`PipelineError` saying what is allowed.
    """
    if not isinstance(value, str) or not value:
        raise PipelineError(f"{what} name is empty")
    shown = value if len(value) <= 40 else value[:37] + "..."
    if len(value) > MAX_NAME:
        raise PipelineError(f"{what} name {shown!r} is longer than {MAX_NAME} characters")
    if not _PATH_NAME.fullmatch(value) or ".." in value:
        raise PipelineError(
            f"{what} name {shown!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved, refused unless it lies inside ``root`` (symlinks followed)."""
    base = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != base and base not in resolved.parents:
        raise PipelineError("path leaves the workspace", path=path)
    return resolved


def reviewer_name(value: str) -> str:
    """The canonical form of a reviewer's name: Unicode NFKC, trimmed, case-folded; 2 to
    ``MAX_REVIEWER`` of ``a-z 0-9 . _ -`` and single spaces, starting with a letter or digit.

    So ``Bob``, ``bob`` and ``ｂｏｂ`` are one account, ``Dr Ann Lee`` is ``dr ann lee``, and a
    name can hold no markup, no tab, newline, double space, control or zero-width character.
    """
    name = unicodedata.normalize("NFKC", value or "").strip().casefold()
    if not 2 <= len(name) <= MAX_REVIEWER or not _REVIEWER.fullmatch(name):
        raise PipelineError(
            f"reviewer names are 2–{MAX_REVIEWER} of a-z, 0-9, '.', '_', '-' and single spaces "
            "(case does not matter), starting with a letter or digit"
        )
    return name


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~=$&:])")


def markdown_text(value: object) -> str:
    """Text that Streamlit's markdown shows literally: every markdown and HTML metacharacter
    escaped, line breaks and other control characters replaced by spaces (no images, links,
    HTML or layout can come from user text)."""
    text = "".join(
        " " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in str(value)
    )
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


#: Characters that make a spreadsheet treat a cell as a formula (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    """A CSV cell that no spreadsheet runs: text starting with ``= + - @``, a tab or a carriage
    return gets a leading apostrophe (OWASP's advice; spreadsheets hide it)."""
    text = "" if value is None else str(value)
    # apostrophes already in front are kept and one more added, so csv_uncell is exact
    return "'" + text if text.lstrip("'").startswith(FORMULA_START) else text


def csv_uncell(value: str) -> str:
    """The inverse of :func:`csv_cell`, for reading our own export back."""
    if value.startswith("'") and value.lstrip("'").startswith(FORMULA_START):
        return value[1:]
    return value
