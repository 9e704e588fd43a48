"""Issue 23's attack sweep, round 2, as tests: numbers that would switch a rule off, inputs that
would store damage a later run cannot repair. Each failed before its fix."""

from __future__ import annotations

import click
import pytest

from pipeline.cli import FiniteRange, cli
from tests.conftest import indexed_workspace, run
from tests.test_hardening import one_line_exit_2


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    return indexed_workspace(tmp_path_factory.mktemp("r2"), volumes=4, seed=3, slices=8)


def _float_params():
    for name, command in cli.commands.items():
        subs = command.commands.items() if isinstance(command, click.Group) else [("", command)]
        for sub, cmd in subs:
            for p in cmd.params:
                if isinstance(p.type, click.FloatRange) or p.type is click.FLOAT:
                    yield f"{name} {sub}".strip(), p


def test_every_float_option_refuses_nan_and_infinity():
    """A.1/A.2: click's FloatRange lets NaN through every bound (NaN fails no comparison)."""
    params = list(_float_params())
    assert len(params) >= 10
    for where, p in params:
        assert isinstance(p.type, FiniteRange), f"{where} {p.opts}: not a finite range"
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(click.BadParameter, match=r"not a finite number|not in the range"):
                p.type.convert(bad, p, None)


@pytest.mark.parametrize("option", ["--threshold", "--smooth", "--quantile"])
def test_index_nan_is_refused_before_anything_is_written(indexed, option):
    manifest = indexed / "index" / "manifest.json"
    before = manifest.read_bytes()
    result = run("index", "-w", indexed, option, "nan")
    one_line_exit_2(result)
    assert option in result.stderr and manifest.read_bytes() == before


@pytest.mark.parametrize("window", ["-1024,inf", "-inf,2048", "nan,100"])
def test_ingest_window_must_be_finite(phantom_dir, ws_path, window):
    """A.7: an infinite bound stored all-zero slices that a later ingest then skipped by hash."""
    result = run("ingest", phantom_dir, "-w", ws_path, "--window", window)
    one_line_exit_2(result)
    assert "--window" in result.stderr and not ws_path.exists()
