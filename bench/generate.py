"""Generation benchmark: images/s and GFLOP/s of the `paper` generator, float32 and bf16.

In the same run, for 128² and 256², batch 16: inference of the paper U-Net generator in
inference mode (the `pipeline generate` path, ``generate_images``) in float32 and, where the
CPU has native bf16 (or on a GPU, float16), in mixed precision with the same weights, the
largest and mean absolute output difference between the two, and a 4096² float32 matmul as the
ceiling. Then peak RSS of `pipeline generate` end to end (a tiny 64² run) for a small and a
five times larger batch, each in its own process: memory must be flat in N.

    .venv/bin/python bench/generate.py [--sizes 128,256] [--seconds 10] [--n 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import RESULTS, conv_flops, matmul_ceiling, timed

ROOT = Path(__file__).resolve().parents[1]


def throughput(cfg: Any, weights: list[Any] | None, seconds: float) -> tuple[dict, Any, Any]:
    """Images/s and GFLOP/s of generate_images on one batch of random masks."""
    import numpy as np

    from models.gan import build_generator, generate_images

    g = build_generator(cfg)
    if weights is not None:
        g.set_weights(weights)
    masks = np.random.default_rng(0).integers(0, cfg.num_classes, (cfg.batch, cfg.size, cfg.size))
    masks = masks.astype(np.uint8)
    out: dict[str, Any] = {}

    def run() -> None:
        out["images"] = generate_images(g, masks, cfg, batch=cfg.batch)

    sec = timed(run, seconds)
    flops = conv_flops(g) * cfg.batch
    return {"images_per_s": cfg.batch / sec, "gflops": flops / sec / 1e9}, g, out["images"]


def peak_rss_generate(workspace: Path, count: int, name: str) -> float:
    """Peak RSS (MiB) of one `pipeline generate` process."""
    cmd = [sys.executable, "-m", "pipeline.cli", "generate", "-w", str(workspace)]
    cmd += ["--run", "r", "--count", str(count), "--batch-name", name]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"generate failed: {proc.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024


def memory(n: int) -> dict[str, float]:
    """A tiny 64² workspace and run, then generate n and 5n candidates in separate processes."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        ws, src = Path(tmp) / "ws", Path(tmp) / "src"
        base = [sys.executable, "-m", "pipeline.cli"]
        for args in (
            ["phantom", str(src), "--volumes", "4", "--size", "64", "--slices", "16"],
            ["ingest", str(src), "-w", str(ws), "--size", "64", "--split", "0.5,0.25,0.25"],
            ["train", "-w", str(ws), "--preset", "tiny", "--steps", "2", "--run", "r"],
        ):
            subprocess.run(base + args, check=True, env=env, capture_output=True)
        small = peak_rss_generate(ws, n, "small")
        large = peak_rss_generate(ws, 5 * n, "large")
    return {"n_small": n, "rss_small_mib": small, "n_large": 5 * n, "rss_large_mib": large}


def main() -> None:
    """Run the benchmark, print the table, write bench/results/generate.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--n", type=int, default=32, help="Candidates of the small memory run.")
    ap.add_argument("--out", type=Path, default=RESULTS / "generate.json")
    args = ap.parse_args()
    # First, while this process is small: Linux carries a parent's RSS high-water mark into a
    # forked child's ru_maxrss, so measuring after loading models would report the parent.
    mem = memory(args.n)

    import numpy as np
    import tensorflow as tf

    from models.config import preset
    from pipeline.cpu import read_cpu
    from pipeline.train import resolve_precision

    gpus = tf.config.list_logical_devices("GPU")
    policy = resolve_precision("auto", gpus=len(gpus), cpu=read_cpu())
    mixed = None if policy == "float32" else policy
    ceiling = matmul_ceiling("float32", args.seconds / 2)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        cfg = preset("paper", size=size, batch=args.batch)
        f32, g32, img32 = throughput(cfg, None, args.seconds)
        row: dict[str, Any] = {"size": size, "batch": args.batch, "float32": f32}
        row["float32_of_matmul"] = f32["gflops"] / ceiling
        line = (
            f"{size:>4}²  float32 {f32['images_per_s']:6.1f} img/s ({f32['gflops']:5.0f} "
            f"GFLOP/s, {row['float32_of_matmul']:.0%} of matmul)"
        )
        if mixed:
            low, _, img_low = throughput(
                replace(cfg, precision=mixed), g32.get_weights(), args.seconds
            )
            diff = np.abs(img_low - img32)
            row[mixed] = low
            row["speedup_mixed"] = low["images_per_s"] / f32["images_per_s"]
            row["max_abs_diff"] = float(diff.max())
            row["mean_abs_diff"] = float(diff.mean())
            line += (
                f" | {mixed} {low['images_per_s']:6.1f} img/s (×{row['speedup_mixed']:.2f}; "
                f"|Δ| mean {row['mean_abs_diff']:.4f}, max {row['max_abs_diff']:.4f} of [0, 1])"
            )
        print(line, flush=True)
        rows.append(row)
    print(
        f"peak RSS of pipeline generate: {mem['n_small']} candidates {mem['rss_small_mib']:.0f} "
        f"MiB, {mem['n_large']} candidates {mem['rss_large_mib']:.0f} MiB"
    )
    print(f"matmul ceiling float32: {ceiling:.0f} GFLOP/s")
    result = {
        "matmul_gflops_float32": ceiling,
        "mixed": mixed,
        "rows": rows,
        "memory": mem,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
