"""Training across processes: two multi-worker processes on 127.0.0.1, and SIGTERM mid-run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra):
    return {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def _pipeline(*args):
    return [sys.executable, "-m", "pipeline.cli", *[str(a) for a in args]]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ws32(phantom_dir, ws_path):
    result = run("ingest", phantom_dir, "-w", ws_path, "--size", 32, "--split", "0.6,0.2,0.2")
    assert result.exit_code == 0, result.stderr
    return ws_path


TINY = ["--preset", "tiny", "--size", "32", "--batch", "8"]


@pytest.mark.numerics
@pytest.mark.slow
def test_multi_worker_two_local_processes(ws32):
    hosts = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
        args = _pipeline("train", "-w", ws32, *TINY, "--steps", 6, "--eval-every", 3)
        args += ["--checkpoint-every", "3", "--strategy", "multi-worker", "--run", "mw", "--json"]
        procs.append(
            subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(TF_CONFIG=json.dumps(tf_config)),
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out) for out, _ in outs]
    assert [r["chief"] for r in reports] == [True, False]
    assert all(r["steps_done"] == 6 and r["replicas"] == 2 for r in reports)
    run_dir = Path(reports[0]["run_dir"])
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*.index"))
    assert ckpts == ["ckpt-3.index", "ckpt-6.index"]
    assert not list(run_dir.glob(".worker-*"))  # non-chief scratch checkpoints removed
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "generator.keras").exists()


@pytest.mark.numerics
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(ws32):
    args = _pipeline("train", "-w", ws32, *TINY, "--steps", 100000, "--eval-every", 2)
    args += ["--checkpoint-every", "100000", "--run", "t"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    sample = Path(ws32) / "runs" / "t" / "samples" / "step_000004.png"
    deadline = time.monotonic() + 300
    while not sample.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sample.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    line = [ln for ln in err.splitlines() if "interrupted at step" in ln][-1]
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert step >= 4
    assert (Path(ws32) / "runs" / "t" / "checkpoints" / f"ckpt-{step}.index").exists()
    assert (Path(ws32) / "runs" / "t" / "generator.keras").exists()
    resumed = subprocess.run(
        _pipeline("train", "-w", ws32, *TINY, "--steps", step + 2, "--run", "t", "--resume"),
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout
    assert f"trained {step + 2} steps" in resumed.stdout


NOISE = ("absl::InitializeLog", "I0000", "W0000", "E0000", "cuda", "cuInit", "oneDNN")


@pytest.mark.slow
def test_cli_start_is_quiet_unless_verbose(ws32):
    """No TensorFlow/absl/CUDA start-up lines on a plain command (TF 2.21 writes them to fd 2
    before its log level applies); --verbose shows TensorFlow's own lines again."""
    env = _env()
    del env["TF_CPP_MIN_LOG_LEVEL"]
    args = ["train", "-w", ws32, *TINY, "--steps", 2, "--eval-every", 2]
    quiet = subprocess.run(
        _pipeline(*args, "--run", "q"), capture_output=True, text=True, env=env, timeout=600
    )
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not [ln for ln in quiet.stderr.splitlines() if any(n in ln for n in NOISE)], quiet.stderr
    loud = subprocess.run(
        _pipeline("--verbose", *args, "--run", "v"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert any(n in loud.stderr for n in NOISE), "TensorFlow 2.21 logs its start-up lines"


def test_stderr_redirect_replays_what_a_failing_block_wrote():
    code = (
        "import os\n"
        "from pipeline.tflog import stderr_to_file\n"
        "with stderr_to_file():\n"
        "    os.write(2, b'hidden\\n')\n"
        "try:\n"
        "    with stderr_to_file():\n"
        "        os.write(2, b'explains the failure\\n')\n"
        "        raise ImportError('boom')\n"
        "except ImportError:\n"
        "    pass\n"
        "os.write(2, b'after\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["explains the failure", "after"]
