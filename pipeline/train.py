"""`pipeline train`: the conditional GAN on the training split, with checkpoints and logs.

Side effects live here, around the pure train step of ``models.gan``: data loading, the
distribution strategy, checkpoints (every N steps, at the end, and on SIGINT/SIGTERM), resume,
TensorBoard scalars and sample grids, the final ``generator.keras`` and the catalog row.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.atomic import atomic_write
from pipeline.catalog import Run, get_meta, utcnow, write_session
from pipeline.errors import PipelineError
from pipeline.index import SliceStore, slice_refs
from pipeline.preprocess import resize_image, resize_mask
from pipeline.preview import PALETTE, grid, save_png, to_uint8
from pipeline.privacy import ssim_batch
from pipeline.workspace import Workspace

Progress = Callable[[Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class TrainOptions:
    """How to run the training (not what is trained: that is the GanConfig)."""

    run: str = "run"
    strategy: str = "auto"  # auto | default | mirrored
    resume: bool = False
    eval_every: int = 100
    checkpoint_every: int = 200
    seed: int = 0


@dataclass
class TrainReport:
    """Where the results are."""

    run_dir: str
    steps_done: int
    resumed_from: int
    generator: str
    last: dict[str, float]
    heldout_ssim: float | None


def load_split(ws: Workspace, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All slices of one split: images (N, size, size, 1) float32, masks (N, size, size) uint8."""
    with Session(ws.engine) as session:
        refs = [r for r in slice_refs(session) if r.split == split]
    if not refs:
        return np.zeros((0, size, size, 1), np.float32), np.zeros((0, size, size), np.uint8)
    store = SliceStore(ws.cache_dir, refs)
    ids = [r.slice_id for r in refs]
    images, masks = store.images(ids), store.masks(ids)
    if images.shape[1] != size:
        images = np.stack([resize_image(im, size) for im in images])
        masks = np.stack([resize_mask(m, size) for m in masks])
    return images[..., None].astype(np.float32), masks.astype(np.uint8)


def encode_condition(masks: Any, num_classes: int, kind: str) -> Any:
    """Masks → generator input: one-hot channels, or the label map scaled to [0, 1]."""
    import tensorflow as tf

    if kind == "onehot":
        return tf.one_hot(tf.cast(masks, tf.int32), num_classes, dtype=tf.float32)
    return tf.cast(masks, tf.float32)[..., None] / float(max(num_classes - 1, 1))


def make_strategy(name: str) -> Any:
    """default: one device; mirrored: all local GPUs, else every logical CPU device."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise PipelineError(f"unknown strategy {name!r}")


def _sample_grid(masks: np.ndarray, fake: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Rows of condition | generated | original."""
    tiles = []
    for m, f, r in zip(masks, fake, real, strict=True):
        tiles += [PALETTE[m % len(PALETTE)], to_uint8(f[..., 0]), to_uint8(r[..., 0])]
    return grid(tiles, columns=3)


def train(ws: Workspace, cfg: Any, opts: TrainOptions, *, progress: Progress = iter) -> TrainReport:
    """Train ``cfg`` (a ``models.gan.GanConfig``) on the workspace's training split."""
    import keras
    import tensorflow as tf

    from models.gan import ConditionalGAN

    with Session(ws.engine) as session:
        schema = get_meta(session, "label_schema")
    if schema is None:
        raise PipelineError("no ingested data (run 'pipeline ingest' first)", path=ws.root)
    n_classes = len(json.loads(schema))
    if cfg.num_classes != n_classes:
        from dataclasses import replace

        cfg = replace(cfg, num_classes=n_classes)
    images, masks = load_split(ws, "train", cfg.size)
    if len(images) == 0:
        raise PipelineError("the training split is empty", path=ws.root)
    strategy = make_strategy(opts.strategy)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch % replicas:
        raise PipelineError(f"global batch {cfg.batch} is not divisible by {replicas} replicas")
    if len(images) < cfg.batch:
        raise PipelineError(
            f"batch {cfg.batch} is larger than the {len(images)} training slices "
            "(batches drop the remainder); pass a smaller --batch"
        )
    val_images, val_masks = load_split(ws, "val", cfg.size)

    run_dir = ws.runs_dir / opts.run
    ckpt_dir = run_dir / "checkpoints"
    config = {**cfg.to_dict(), "label_schema": json.loads(schema)}
    if run_dir.exists() and (run_dir / "config.json").exists():
        if not opts.resume:
            raise PipelineError("run exists; pass --resume or choose another --run", path=run_dir)
        saved = json.loads((run_dir / "config.json").read_text())
        keys = ("size", "num_classes", "condition", "g_filters", "skips", "up_block", "d_filters")
        now = json.loads(json.dumps(config))  # tuples → lists, as stored
        changed = [k for k in keys if saved.get(k) != now.get(k)]
        if changed:
            raise PipelineError(
                f"--resume with an incompatible config ({', '.join(changed)} differ)", path=run_dir
            )
    elif opts.resume:
        raise PipelineError("nothing to resume", path=run_dir)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))

    keras.utils.set_random_seed(opts.seed)
    with strategy.scope():
        gan = ConditionalGAN(cfg)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        ckpt = tf.train.Checkpoint(
            generator=gan.generator,
            discriminator=gan.discriminator,
            g_opt=gan.g_opt,
            d_opt=gan.d_opt,
            step=step_var,
        )
    manager = tf.train.CheckpointManager(ckpt, str(ckpt_dir), max_to_keep=3)
    resumed_from = 0
    if opts.resume and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        resumed_from = int(step_var.numpy())

    ds = (
        tf.data.Dataset.from_tensor_slices((masks, images))
        .shuffle(len(images), seed=opts.seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(cfg.batch, drop_remainder=True)
        .map(lambda m, i: (encode_condition(m, cfg.num_classes, cfg.condition), i))
        .prefetch(tf.data.AUTOTUNE)
    )
    iterator = iter(strategy.experimental_distribute_dataset(ds))

    @tf.function
    def dist_step(cond: Any, img: Any) -> dict[str, Any]:
        out = strategy.run(gan.train_step, args=(cond, img))
        return {k: strategy.reduce("SUM", v, axis=None) for k, v in out.items()}

    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    last: dict[str, float] = {}
    heldout = None
    try:
        for _ in progress(range(resumed_from, cfg.steps)):
            cond, img = next(iterator)
            out = dist_step(cond, img)
            step_var.assign_add(1)
            step = int(step_var.numpy())
            last = {k: float(v) for k, v in out.items()}
            with writer.as_default(step=step):
                for k, v in last.items():
                    tf.summary.scalar(k, v)
                tf.summary.scalar("lr_g", float(cfg.g_lr))
                tf.summary.scalar("lr_d", float(cfg.d_lr))
            if step % opts.eval_every == 0 or step == cfg.steps:
                heldout = _evaluate(gan, cfg, val_images, val_masks, run_dir, step, writer)
            if step % opts.checkpoint_every == 0:
                manager.save(checkpoint_number=step)
            if stop["signal"] is not None:
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        manager.save(checkpoint_number=int(step_var.numpy()))
        writer.flush()
    steps_done = int(step_var.numpy())
    generator_path = run_dir / "generator.keras"
    atomic_write(generator_path, gan.generator.save)
    digest = hashlib.sha256(generator_path.read_bytes()).hexdigest()
    with write_session(ws.engine) as session:
        row = session.scalar(select(Run).where(Run.name == opts.run))
        if row is None:
            row = Run(name=opts.run, preset=cfg.preset, config=config)
            session.add(row)
        row.config, row.steps_done, row.updated_at = config, steps_done, utcnow()
        row.generator_path, row.generator_sha256 = str(generator_path), digest
    if stop["signal"] is not None:
        raise PipelineError(
            f"interrupted at step {steps_done}; checkpoint saved, continue with --resume",
            path=run_dir,
        )
    return TrainReport(str(run_dir), steps_done, resumed_from, str(generator_path), last, heldout)


def _evaluate(
    gan: Any, cfg: Any, images: np.ndarray, masks: np.ndarray, run_dir: Path, step: int, writer: Any
) -> float | None:
    """Held-out SSIM (moving BN statistics: the way generation runs) and a sample grid PNG."""
    import tensorflow as tf

    if len(images) == 0:
        return None
    pick = np.linspace(0, len(images) - 1, min(16, len(images))).astype(int)
    cond = encode_condition(masks[pick], cfg.num_classes, cfg.condition)
    fake = np.asarray(gan.generator(cond, training=False))
    score = float(np.mean(ssim_batch(images[pick, ..., 0], fake[..., 0])))
    show = pick[:4]
    picture = _sample_grid(masks[show], fake[: len(show)], images[show])
    save_png(picture, run_dir / "samples" / f"step_{step:06d}.png")
    with writer.as_default(step=step):
        tf.summary.scalar("heldout_ssim", score)
        tf.summary.image("samples", picture[None], max_outputs=1)
    return score
