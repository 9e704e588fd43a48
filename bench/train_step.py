"""Train-step benchmark: steps/s and achieved GFLOP/s of the `paper` cGAN step, batch 16.

In the same run, for each size: our train step (``ConditionalGAN.train_step`` in one
``tf.function``, as `pipeline train` runs it) in float32 and, where the CPU has native bf16 or a
GPU is present, mixed precision; (a) a baseline written the way the authors' code trains (Keras
``train_on_batch`` on D with real, on D with fake, then on a combined G→D model); (b) a large
matrix product (float32, and bf16 where supported) as the machine's practical ceiling. Speeds
only count as same-run ratios: the machine is shared and its speed swings about 2×.

FLOPs are counted from the layers (multiply-adds × 2 of every convolution and transposed
convolution; batch norm, activations and the optimizer are left out). One forward pass costs F;
a backward pass ≈ 2F (input and weight gradients). Our step: G forward, D on real and fake,
D's gradients through both passes, G's through D(fake) (input gradients only) and G:
3·F_G + 7·F_D. The authors' loop does more work per update (G runs forward twice):
4·F_G + 8·F_D; its GFLOP/s is counted with its own total, the speed ratio is per update.

    .venv/bin/python bench/train_step.py [--sizes 64,128,256] [--seconds 20] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def conv_flops(model: Any) -> int:
    """Forward FLOPs of one example: 2 × multiply-adds of every (transposed) convolution."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            _, h, w, cin = layer.input.shape
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * k * cin * layer.filters * h * w  # each input pixel scatters k·cout
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, cout = layer.output.shape
            cin = layer.input.shape[-1]
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * k * cin * cout * h * w
    return total


def timed(step: Any, seconds: float, *, min_steps: int = 3) -> float:
    """Seconds per call: two warm-up calls, then at least ``min_steps`` or ``seconds``."""
    for _ in range(2):
        step()
    n, start = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - start < seconds:
        step()
        n += 1
    return (time.perf_counter() - start) / n


def inputs(cfg: Any, seed: int = 0) -> tuple[Any, Any]:
    """A batch of random one-hot conditions and images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cond = np.eye(cfg.num_classes, dtype="float32")[
        rng.integers(0, cfg.num_classes, (cfg.batch, cfg.size, cfg.size))
    ]
    return cond, rng.random((cfg.batch, cfg.size, cfg.size, 1)).astype("float32")


def our_step(cfg: Any, seconds: float) -> dict[str, float]:
    """The project's train step, one tf.function, default strategy."""
    import tensorflow as tf

    from models.gan import ConditionalGAN

    gan = ConditionalGAN(cfg)
    cond, img = (tf.constant(a) for a in inputs(cfg))
    step = tf.function(gan.train_step)
    flops = cfg.batch * (3 * conv_flops(gan.generator) + 7 * conv_flops(gan.discriminator))
    sec = timed(lambda: {k: float(v) for k, v in step(cond, img).items()}, seconds)
    return {"s_per_step": sec, "gflops": flops / sec / 1e9}


def authors_step(cfg: Any, seconds: float) -> dict[str, float]:
    """The authors' style: train_on_batch on D (real), D (fake), then a combined G→D model."""
    import keras
    import numpy as np

    from models.gan import build_discriminator, build_generator

    g, d = build_generator(cfg), build_discriminator(cfg)
    d.compile(optimizer=keras.optimizers.Adam(cfg.d_lr, beta_1=cfg.beta1), loss="mse")
    cond, img = inputs(cfg)
    ones = np.ones((cfg.batch, cfg.patch_map, cfg.patch_map, 1), "float32")
    zeros = np.zeros_like(ones)
    d.train_on_batch([img, cond], ones)  # trace D's train function while D is trainable
    d.trainable = False
    x = keras.Input(g.input_shape[1:])
    fake = g(x)
    combined = keras.Model(x, [d([fake, x]), fake])
    combined.compile(
        optimizer=keras.optimizers.Adam(cfg.g_lr, beta_1=cfg.beta1),
        loss=["mse", "mae"],
        loss_weights=[cfg.adv_weight, cfg.l1_weight],
    )
    before = [w.copy() for w in d.get_weights()]

    def step() -> None:
        fake = g.predict_on_batch(cond)
        d.train_on_batch([img, cond], ones)
        d.train_on_batch([fake, cond], zeros)
        combined.train_on_batch(cond, [ones, img])

    sec = timed(step, seconds)
    changed = any(not np.array_equal(a, b) for a, b in zip(before, d.get_weights(), strict=True))
    if not changed:
        raise SystemExit("authors'-style baseline: D did not train (trainable flag mishandled)")
    flops = cfg.batch * (4 * conv_flops(g) + 8 * conv_flops(d))
    return {"s_per_step": sec, "gflops": flops / sec / 1e9}


def matmul_ceiling(dtype: str, seconds: float, n: int = 4096) -> float:
    """GFLOP/s of an n² × n² matrix product: the machine's practical ceiling."""
    import tensorflow as tf

    a = tf.random.stateless_uniform((n, n), seed=(1, 2), dtype=tf.float32)
    b = tf.random.stateless_uniform((n, n), seed=(3, 4), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(b, dtype)
    mm = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b)[0, :1], tf.float32)))
    sec = timed(lambda: float(mm()), seconds, min_steps=5)
    return 2 * n**3 / sec / 1e9


def main() -> None:
    """Run the benchmark, print the table, write bench/results/train_step.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0, help="Timing budget per measurement.")
    ap.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0: default).")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = ap.parse_args()

    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    from models.config import preset
    from pipeline.cpu import read_cpu
    from pipeline.train import resolve_precision

    gpus = tf.config.list_logical_devices("GPU")
    policy = resolve_precision("auto", gpus=len(gpus), cpu=read_cpu())
    mixed = None if policy == "float32" else policy
    ceiling = {"float32": matmul_ceiling("float32", args.seconds / 2)}
    if mixed:
        low = "float16" if gpus else "bfloat16"
        ceiling[low] = matmul_ceiling(low, args.seconds / 2)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        cfg = preset("paper", size=size, batch=args.batch)
        row: dict[str, Any] = {"size": size, "batch": args.batch}
        row["ours_float32"] = our_step(cfg, args.seconds)
        row["authors_float32"] = authors_step(cfg, args.seconds)
        if mixed:
            from dataclasses import replace

            row[f"ours_{mixed}"] = our_step(replace(cfg, precision=mixed), args.seconds)
        base = row["authors_float32"]["s_per_step"]
        row["speedup_float32_vs_authors"] = base / row["ours_float32"]["s_per_step"]
        row["float32_of_matmul"] = row["ours_float32"]["gflops"] / ceiling["float32"]
        if mixed:
            row["speedup_mixed_vs_authors"] = base / row[f"ours_{mixed}"]["s_per_step"]
        rows.append(row)
        print_row(row, mixed)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpus": [g.name for g in gpus],
            "tensorflow": tf.__version__,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        },
        "matmul_gflops": ceiling,
        "mixed": mixed,
        "rows": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print("matmul ceiling GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def print_row(row: dict[str, Any], mixed: str | None) -> None:
    """One size's line of the table."""
    parts = [
        f"{row['size']:>4}²  ours f32 {row['ours_float32']['s_per_step']:7.3f} s/step "
        f"({row['ours_float32']['gflops']:5.0f} GFLOP/s, "
        f"{row['float32_of_matmul']:.0%} of matmul)",
        f"authors f32 {row['authors_float32']['s_per_step']:7.3f} s "
        f"(ours ×{row['speedup_float32_vs_authors']:.2f})",
    ]
    if mixed:
        m = row[f"ours_{mixed}"]
        parts.append(
            f"ours {mixed} {m['s_per_step']:7.3f} s ({m['gflops']:5.0f} GFLOP/s; "
            f"×{row['speedup_mixed_vs_authors']:.2f} vs authors)"
        )
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
