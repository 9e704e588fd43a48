"""`pipeline train` end to end on a tiny phantom workspace (issue 3 groundwork)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.catalog import Run, read_session
from pipeline.workspace import open_workspace
from tests.conftest import run


@pytest.fixture
def ws32(phantom_dir, ws_path):
    assert (
        run("ingest", phantom_dir, "-w", ws_path, "--size", 32, "--split", "0.6,0.2,0.2").exit_code
        == 0
    )
    return ws_path


TINY = ("--preset", "tiny", "--size", 32, "--batch", 8, "--eval-every", 6, "--checkpoint-every", 6)


def test_train_writes_run_and_resumes(ws32):
    result = run("train", "-w", ws32, *TINY, "--steps", 12, "--run", "r", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    run_dir = Path(report["run_dir"])
    assert report["steps_done"] == 12 and report["heldout_ssim"] is not None
    assert (run_dir / "generator.keras").exists()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        "step_000006.png",
        "step_000012.png",
    ]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["size"] == 32 and config["num_classes"] == 8 and config["preset"] == "tiny"
    ws = open_workspace(ws32, create=False)
    with read_session(ws.engine) as s:
        row = s.scalar(select(Run).where(Run.name == "r"))
        assert row.steps_done == 12 and len(row.generator_sha256) == 64
    ws.close()

    again = run("train", "-w", ws32, *TINY, "--steps", 12, "--run", "r")
    assert again.exit_code == 2 and "--resume" in again.stderr
    resumed = run("train", "-w", ws32, *TINY, "--steps", 16, "--run", "r", "--resume")
    assert resumed.exit_code == 0 and "resumed from step 12" in resumed.stdout
    assert "trained 16 steps" in resumed.stdout
    bad = run(
        "train",
        "-w",
        ws32,
        "--preset",
        "tiny",
        "--size",
        64,
        "--batch",
        8,
        "--steps",
        20,
        "--run",
        "r",
        "--resume",
    )
    assert bad.exit_code == 2 and "incompatible config (size" in bad.stderr


def test_train_bad_input(ws32, tmp_path):
    empty = tmp_path / "empty_ws"
    open_workspace(empty).close()
    result = run("train", "-w", empty, *TINY, "--steps", 2)
    assert result.exit_code == 2 and "no ingested data" in result.stderr
    result = run(
        "train", "-w", ws32, "--preset", "tiny", "--size", 32, "--batch", 4096, "--steps", 2
    )
    assert result.exit_code == 2 and "larger than the" in result.stderr
    result = run("train", "-w", ws32, "--preset", "tiny", "--size", 48, "--steps", 2)
    assert result.exit_code == 2 and "power of two" in result.stderr
    result = run("train", "-w", ws32, *TINY, "--steps", 2, "--run", "new", "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.stderr


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus(ws32):
    """The mirrored code path on a CPU-only machine (fresh process: devices are set first)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            "-w",
            str(ws32),
            "--preset",
            "tiny",
            "--size",
            "32",
            "--batch",
            "8",
            "--steps",
            "4",
            "--eval-every",
            "4",
            "--strategy",
            "mirrored",
            "--devices",
            "2",
            "--run",
            "m",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["steps_done"] == 4
