"""`pipeline train`: the conditional GAN on the training split, with checkpoints and logs.

Side effects live here, around the pure train step of ``models.gan``: data loading, the
distribution strategy, checkpoints (every N steps, at the end, and on SIGINT/SIGTERM), resume,
TensorBoard scalars and sample grids, the final ``generator.keras`` and the catalog row.

The order of training examples is a pure function of (seed, step): every global batch is a row of
:func:`batch_order`, and augmentation draws from a generator seeded by (seed, step, position).
So a resumed run sees exactly the batches an uninterrupted run would have seen, and any number
of replicas or workers splits the very same global batch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.config import GanConfig
from pipeline import __version__
from pipeline.atomic import atomic_write, exclusive_lock
from pipeline.augment import affine_coords, affine_warp, random_affine, warp_labels
from pipeline.catalog import PatientSplit, Run, Source, get_meta, utcnow, write_session
from pipeline.cpu import CpuProfile
from pipeline.errors import PipelineError
from pipeline.preprocess import body_outlines, picture_window
from pipeline.preview import BODY_GREY, PALETTE, grid, save_png, to_uint8
from pipeline.privacy import ssim_batch
from pipeline.progress import Progress
from pipeline.runs import run_units
from pipeline.slices import gather_neighbours, load_split, split_neighbours
from pipeline.validate import path_name
from pipeline.workspace import Workspace

StepCallback = Callable[[int, dict[str, float]], None]

STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
AUGMENTATIONS = ("none", "affine", "flip+affine")
#: Fields a checkpoint's variables depend on: --resume refuses a run where any differs.
ARCHITECTURE_KEYS = (
    "size",
    "num_classes",
    "condition",
    "body",
    "neighbours",
    "g_filters",
    "skips",
    "up_block",
    "d_filters",
)


@dataclass(frozen=True)
class TrainOptions:
    """How to run the training (not what is trained: that is the GanConfig)."""

    run: str = "run"
    strategy: str = "auto"  # one of STRATEGIES
    resume: bool = False
    eval_every: int = 100
    checkpoint_every: int = 200
    seed: int = 0
    augment: str = "none"  # one of AUGMENTATIONS
    cluster: dict[str, Any] | None = None  # TF_CONFIG (cluster + task) for multi-worker


@dataclass
class TrainReport:
    """Where the results are."""

    run_dir: str
    steps_done: int
    resumed_from: int
    generator: str
    last: dict[str, float]
    heldout_ssim: float | None
    heldout_ssim_batchstats: float | None
    heldout_mae: float | None
    precision: str
    replicas: int
    chief: bool


def batch_order(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) example indices: one seeded permutation per epoch, remainder dropped.

    Row ``s`` is the global batch of step ``s``; it depends only on (n, batch, seed, s).
    """
    if batch > n:
        raise ValueError(f"batch {batch} is larger than the {n} examples")
    per_epoch = n // batch
    epochs = -(-steps // per_epoch)
    rows = [
        np.random.default_rng([seed, e]).permutation(n)[: per_epoch * batch].reshape(-1, batch)
        for e in range(epochs)
    ]
    return np.concatenate(rows)[:steps].astype(np.int64)


def augment_pair(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One joint random affine (±10°, scale 0.9–1.1, shift ±6%) of a (S, S) image and mask
    (or a (C, S, S) stack of masks — a slice's own and its neighbours' — moved alike).

    The image is resampled by cubic spline, clipped to its own range, and the mask by label
    shares (:func:`~pipeline.augment.warp_labels`, never a new label): bilinear images under
    nearest-neighbour masks lost a quarter of a 2-px vessel's contrast in every pair, and the
    generator learned to paint vessels that dim. Uncovered image pixels are air (the slice's
    minimum). ``flip`` adds a left-right mirror with probability ½: mirrored anatomy
    (dextrocardia) is rare in patients, so it is opt-in.
    """
    params = random_affine(rng, flip=flip)
    low, high = float(image.min()), float(image.max())
    out_image = np.clip(affine_warp(image, params, order=3, cval=low), low, high)
    coords = affine_coords(image.shape[0], params)
    out_mask = (
        warp_labels(mask, coords)
        if mask.ndim == 2
        else np.stack([warp_labels(m, coords) for m in mask])
    )
    return out_image.astype(np.float32), out_mask.astype(np.uint8)


def resolve_precision(requested: str, *, gpus: int, cpu: CpuProfile) -> str:
    """``float32`` | ``mixed`` | ``auto`` (or a policy name) → a Keras dtype policy here.

    mixed: ``mixed_float16`` (with loss scaling) on GPUs, ``mixed_bfloat16`` on CPUs with native
    bf16 that oneDNN may use under its ISA limit, refused elsewhere. auto: mixed where
    supported, else float32. A policy named outright is refused on a CPU that cannot run it
    (TensorFlow would hand oneDNN a dtype the limited ISA has no kernel for and abort).
    """
    if requested == "float32":
        return requested
    if requested in ("mixed_bfloat16", "mixed_float16"):
        if not gpus and requested not in cpu.runnable_policies():
            raise PipelineError(
                f"--precision {requested}: oneDNN has no {requested.split('_')[1]} kernels on "
                f"this CPU under ONEDNN_MAX_CPU_ISA={cpu.max_isa}; use float32 or auto"
            )
        return requested
    if requested not in ("mixed", "auto"):
        raise PipelineError(f"unknown precision {requested!r}; use float32, mixed or auto")
    if gpus:
        return "mixed_float16"
    if cpu.native_bf16:
        return "mixed_bfloat16"
    if requested == "auto":
        return "float32"
    raise PipelineError(
        "--precision mixed: this CPU has no native bfloat16 (AVX512-BF16 or AMX) that oneDNN may "
        "use and no GPU is visible; emulated bf16 is slower than float32, so use --precision "
        "float32"
    )


def parse_cluster(tf_config: str | None) -> dict[str, Any]:
    """Validate a ``TF_CONFIG`` JSON string for multi-worker training."""
    if not tf_config:
        raise PipelineError(
            "--strategy multi-worker needs TF_CONFIG (cluster worker addresses and this "
            'task), e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}'
        )
    try:
        config = json.loads(tf_config)
        task_type, task_id = config["task"]["type"], int(config["task"]["index"])
        if not 0 <= task_id < len(config["cluster"][task_type]):
            raise IndexError(f"task index {task_id} has no {task_type} address")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise PipelineError(f"TF_CONFIG is not a valid cluster description ({exc!r})") from None
    return config


def is_chief(cluster: dict[str, Any] | None) -> bool:
    """The worker that writes the run (an explicit chief, else worker 0; always when local)."""
    if not cluster:
        return True
    task = cluster["task"]
    if "chief" in cluster["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and int(task["index"]) == 0


def make_strategy(name: str, cluster: dict[str, Any] | None = None) -> Any:
    """default: one device; mirrored: all local GPUs, else every logical CPU device;
    multi-worker: ``MultiWorkerMirroredStrategy`` over ``cluster`` (a parsed TF_CONFIG)."""
    import tensorflow as tf

    if name == "multi-worker":
        if not cluster:
            raise PipelineError("--strategy multi-worker needs TF_CONFIG")
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster["cluster"]),
            task_type=cluster["task"]["type"],
            task_id=int(cluster["task"]["index"]),
            rpc_layer="grpc",
        )
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise PipelineError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def split_hash(ws: Workspace) -> str:
    """SHA-256 of the patient → split assignment: which data a run was trained on."""
    with Session(ws.engine) as session:
        rows = session.execute(
            select(PatientSplit.patient, PatientSplit.split).order_by(PatientSplit.patient)
        ).all()
    return hashlib.sha256("".join(f"{p}:{s};" for p, s in rows).encode()).hexdigest()


def _preprocessing(ws: Workspace) -> dict[str, Any]:
    """Units and HU windows of the sources: how generated [0, 1] images map back."""
    with Session(ws.engine) as session:
        rows = session.execute(
            select(Source.units, Source.window_lo, Source.window_hi).distinct()
        ).all()
    return {
        "units": sorted({r[0] for r in rows}),
        "windows": sorted({(r[1], r[2]) for r in rows}),
    }


def make_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    order: np.ndarray,
    cfg: GanConfig,
    *,
    start: int,
    seed: int,
    augment: str,
    context: Any = None,
    neighbours: np.ndarray | None = None,
) -> Any:
    """tf.data of this input pipeline's per-replica batches from step ``start`` on.

    For each step the pipeline yields, in replica order, its replicas' consecutive slices of
    the global batch ``order[step]``, so the union over replicas and workers is exactly that
    batch. ``context`` is a ``tf.distribute.InputContext`` (None: one replica). A 2.5-D ``cfg``
    needs ``neighbours``, (N, 2k) rows of each slice's neighbours (−1: an empty map), from
    :func:`~pipeline.slices.neighbour_rows`; they are augmented with their slice.
    """
    import tensorflow as tf

    from models.gan import condition_of
    from pipeline.slices import gather_neighbours

    k = cfg.neighbours
    if k and (neighbours is None or neighbours.shape != (len(masks), 2 * k)):
        raise ValueError(f"a 2.5-D model (neighbours={k}) needs ({len(masks)}, {2 * k}) rows")

    replicas, pipelines, pipeline_id = 1, 1, 0
    if context is not None:
        replicas, pipelines = context.num_replicas_in_sync, context.num_input_pipelines
        pipeline_id = context.input_pipeline_id
    per_replica = cfg.batch // replicas
    local = replicas // pipelines
    steps = np.repeat(np.arange(start, len(order)), local)
    slots = np.tile(np.arange(pipeline_id * local, (pipeline_id + 1) * local), len(order) - start)
    size, flip = cfg.size, augment == "flip+affine"

    def load(
        step: np.int64, slot: np.int64
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        positions = range(int(slot) * per_replica, (int(slot) + 1) * per_replica)
        idx = order[int(step), int(slot) * per_replica : (int(slot) + 1) * per_replica]
        img, msk = images[idx, ..., 0], masks[idx]
        # (B, 2k, S, S); for a 2-D model an empty stack of the same rank
        near = gather_neighbours(masks, neighbours[idx]) if k else msk[:, None][:, :0]
        if augment != "none":
            stacks = np.concatenate([msk[:, None], near], axis=1)
            pairs = [
                augment_pair(
                    img[j], stacks[j], np.random.default_rng([seed, int(step), p]), flip=flip
                )
                for j, p in enumerate(positions)
            ]
            img = np.stack([p[0] for p in pairs])
            msk = np.stack([p[1][0] for p in pairs])
            near = np.stack([p[1][1:] for p in pairs])
        # the body of the image as trained on (after augmentation), so outline and image agree
        body = body_outlines(img, msk) if cfg.body else np.zeros(msk.shape, bool)
        return msk, body, near.astype(np.uint8), img[..., None]

    def to_tensors(step: Any, slot: Any) -> tuple[Any, Any]:
        msk, body, near, img = tf.numpy_function(
            load, [step, slot], [tf.uint8, tf.bool, tf.uint8, tf.float32], stateful=False
        )
        msk.set_shape((per_replica, size, size))
        body.set_shape((per_replica, size, size))
        near.set_shape((per_replica, 2 * k, size, size))
        img.set_shape((per_replica, size, size, 1))
        return condition_of(msk, body, cfg, near if k else None), img

    ds = tf.data.Dataset.from_tensor_slices((steps, slots))
    ds = ds.map(to_tensors, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(2)


def _sample_grid(
    masks: np.ndarray,
    fake: np.ndarray,
    real: np.ndarray,
    view: Callable[[np.ndarray], np.ndarray] = np.asarray,
    bodies: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of condition | generated | original, the slices through ``view`` (a viewing
    window; the condition's body outline, if any, in grey); small slices enlarged (nearest)
    to ≥ 128 px."""
    zoom = max(1, 128 // masks.shape[1])
    tiles = []
    for i, (m, f, r) in enumerate(zip(masks, fake, real, strict=True)):
        cond = PALETTE[m % len(PALETTE)]
        if bodies is not None:
            cond = np.where(((m == 0) & bodies[i])[..., None], np.uint8(BODY_GREY), cond)
        tiles += [cond.astype(np.uint8), to_uint8(view(f[..., 0])), to_uint8(view(r[..., 0]))]
    tiles = [np.repeat(np.repeat(t, zoom, axis=0), zoom, axis=1) for t in tiles]
    return grid(tiles, columns=3)


def _check_resume(run_dir: Path, config: dict[str, Any], opts: TrainOptions, chief: bool) -> None:
    """A new run must not exist; a resumed one must exist with compatible models and data."""
    exists = (run_dir / "config.json").exists()
    if exists and not opts.resume and chief:
        raise PipelineError("run exists; pass --resume or choose another --run", path=run_dir)
    if not opts.resume:
        return
    if not exists:
        raise PipelineError("nothing to resume", path=run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    # a field the saved run predates takes the value it had then (no body, no neighbours)
    model = json.loads(json.dumps(GanConfig.from_dict(saved).to_dict()))
    now = json.loads(json.dumps(config))  # tuples → lists, as stored
    changed = [k for k in ARCHITECTURE_KEYS if model.get(k) != now.get(k)]
    if changed:
        raise PipelineError(
            f"--resume with an incompatible config ({', '.join(changed)} differ)", path=run_dir
        )
    if saved.get("data", {}).get("split_hash") != now["data"]["split_hash"]:
        raise PipelineError(
            "--resume: the workspace's patient splits changed since this run started "
            "(new or moved patients); start a new --run",
            path=run_dir,
        )


def run_lock(runs_dir: Path, run: str) -> AbstractContextManager[None]:
    """One writer per run folder: an advisory lock on ``runs/.<run>.lock`` for as long as a
    training writes ``runs/<run>/``. A second ``train`` (a new run or ``--resume``) of the same
    run is refused instead of interleaving checkpoints and overwriting the other's result."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(
        runs_dir / f".{run}.lock",
        busy="another training is writing this run (one writer per run); wait for it or "
        "choose another --run",
        where=runs_dir / run,
    )


def train(
    ws: Workspace,
    cfg: GanConfig,
    opts: TrainOptions,
    *,
    progress: Progress = iter,
    on_step: StepCallback | None = None,
    cpu: CpuProfile | None = None,
) -> TrainReport:
    """Train ``cfg`` on the workspace's training split, as the run folder's only writer.

    ``cfg.precision`` may be ``float32``, ``mixed`` or ``auto`` (resolved for ``cpu``, this
    machine's flags and oneDNN limit; none given: a CPU with no flags, i.e. float32).
    ``on_step(step, metrics)`` is called after every step (a progress bar's losses).
    """
    path_name(opts.run, what="run")  # it becomes runs/<run>/: refuse it before any work
    # only the chief writes the run; the other workers of a multi-worker run share its folder
    if not is_chief(opts.cluster if opts.strategy == "multi-worker" else None):
        return _train(ws, cfg, opts, progress=progress, on_step=on_step, cpu=cpu)
    with run_lock(ws.runs_dir, opts.run):
        return _train(ws, cfg, opts, progress=progress, on_step=on_step, cpu=cpu)


def _train(
    ws: Workspace,
    cfg: GanConfig,
    opts: TrainOptions,
    *,
    progress: Progress,
    on_step: StepCallback | None,
    cpu: CpuProfile | None,
) -> TrainReport:
    import keras
    import tensorflow as tf

    from models.gan import ConditionalGAN, build_generator

    if opts.augment not in AUGMENTATIONS:
        raise PipelineError(f"unknown augmentation {opts.augment!r}")
    path_name(opts.run, what="run")  # it becomes runs/<run>/: refuse it before any work
    with Session(ws.engine) as session:
        schema = get_meta(session, "label_schema")
    if schema is None:
        raise PipelineError("no ingested data (run 'pipeline ingest' first)", path=ws.root)
    # Before any other TensorFlow work: multi-worker collectives are set up at start-up.
    strategy = make_strategy(opts.strategy, opts.cluster)
    chief = is_chief(opts.cluster if opts.strategy == "multi-worker" else None)
    replicas = strategy.num_replicas_in_sync
    precision = resolve_precision(
        cfg.precision,
        gpus=len(tf.config.list_logical_devices("GPU")),
        cpu=cpu or CpuProfile(frozenset()),
    )
    cfg = replace(cfg, num_classes=len(json.loads(schema)), precision=precision)
    images, masks = load_split(ws, "train", cfg.size)
    if len(images) == 0:
        raise PipelineError("the training split is empty", path=ws.root)
    if cfg.batch % replicas:
        raise PipelineError(f"global batch {cfg.batch} is not divisible by {replicas} replicas")
    if len(images) < cfg.batch:
        raise PipelineError(
            f"batch {cfg.batch} is larger than the {len(images)} training slices "
            "(batches drop the remainder); pass a smaller --batch",
            path=ws.root,
        )
    val_images, val_masks = load_split(ws, "val", cfg.size)
    k = cfg.neighbours
    near = split_neighbours(ws, "train", k) if k else None
    val_near = gather_neighbours(val_masks, split_neighbours(ws, "val", k)) if k else None

    run_dir = ws.runs_dir / opts.run
    ckpt_dir = run_dir / "checkpoints"
    config = {
        **cfg.to_dict(),
        "label_schema": json.loads(schema),
        "data": {
            "split_hash": split_hash(ws),
            "train_slices": len(images),
            "val_slices": len(val_images),
            **_preprocessing(ws),
        },
        "train": {
            "seed": opts.seed,
            "augment": opts.augment,
            "strategy": opts.strategy,
            "replicas": replicas,
        },
        "code_version": __version__,
    }
    _check_resume(run_dir, config, opts, chief)
    if chief:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write(
            run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2))
        )

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
    # Every worker must save (the save is collective); only the chief's copy is kept.
    scratch = run_dir / f".worker-{opts.cluster['task']['index']}" if not chief else None
    manager = tf.train.CheckpointManager(ckpt, str(scratch or ckpt_dir), max_to_keep=3)
    resumed_from = 0
    latest = tf.train.latest_checkpoint(str(ckpt_dir)) if opts.resume else None
    if opts.resume and latest is None:
        raise PipelineError("nothing to resume (no checkpoint)", path=ckpt_dir)
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        resumed_from = int(step_var.numpy())

    # A twin outside the strategy for evaluation and export: it gets the trained weights
    # copied in, so evaluating in batch-statistics mode never touches the moving averages.
    twin = build_generator(cfg)

    order = batch_order(len(images), cfg.batch, cfg.steps, opts.seed)

    def dataset_fn(context: Any) -> Any:
        return make_dataset(
            images,
            masks,
            order,
            cfg,
            start=resumed_from,
            seed=opts.seed,
            augment=opts.augment,
            context=context,
            neighbours=near,
        )

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    units, storage = run_units(config)

    def picture_view(unit: np.ndarray) -> np.ndarray:
        return picture_window(unit, storage=storage, units=units)

    @tf.function
    def dist_step(cond: Any, img: Any) -> dict[str, Any]:
        out = strategy.run(gan.train_step, args=(cond, img))
        return {k: strategy.reduce("SUM", v, axis=None) for k, v in out.items()}

    writer = (
        tf.summary.create_file_writer(str(run_dir / "tensorboard"))
        if chief
        else tf.summary.create_noop_writer()
    )
    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    last: dict[str, float] = {}
    saved_at = resumed_from
    heldout: dict[str, float | None] = {"ssim": None, "ssim_batchstats": None, "mae": None}
    try:
        for _ in progress(range(resumed_from, cfg.steps)):
            cond, img = next(iterator)
            out = dist_step(cond, img)
            step_var.assign_add(1)
            step = int(step_var.numpy())
            last = {k: float(v) for k, v in out.items()}
            if on_step is not None:
                on_step(step, last)
            with writer.as_default(step=step):
                for k, v in last.items():
                    tf.summary.scalar(k, v)
                lr_g, lr_d = cfg.learning_rates(step - 1)  # the rates this update used
                tf.summary.scalar("lr_g", lr_g)
                tf.summary.scalar("lr_d", lr_d)
            if chief and (step % opts.eval_every == 0 or step == cfg.steps):
                twin.set_weights(gan.generator.get_weights())
                heldout = _evaluate(
                    twin, cfg, val_images, val_masks, run_dir, step, writer, picture_view, val_near
                )
            if step % opts.checkpoint_every == 0:
                manager.save(checkpoint_number=step)
                saved_at = step
            if stop["signal"] is not None:
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        steps_done = int(step_var.numpy())
        if steps_done != saved_at:
            manager.save(checkpoint_number=steps_done)
        writer.flush()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    generator_path = run_dir / "generator.keras"
    twin.set_weights(gan.generator.get_weights())
    # Nothing trained (a resume at the last step): keep the generator file and its recorded
    # hash, so candidate batches made from it stay valid.
    unchanged = steps_done == resumed_from and generator_path.exists()
    if chief and not unchanged:
        atomic_write(generator_path, twin.save)
        digest = hashlib.sha256(generator_path.read_bytes()).hexdigest()
        with write_session(ws.engine) as session:
            row = session.scalar(select(Run).where(Run.name == opts.run))
            if row is None:
                row = Run(name=opts.run, preset=cfg.preset, config=config)
                session.add(row)
            row.config, row.steps_done, row.updated_at = config, steps_done, utcnow()
            # relative to the workspace: a workspace stays usable when copied or moved
            row.generator_path = generator_path.relative_to(ws.root).as_posix()
            row.generator_sha256 = digest
    if stop["signal"] is not None:
        raise PipelineError(
            f"interrupted at step {steps_done}; checkpoint saved, continue with --resume",
            path=run_dir,
        )
    return TrainReport(
        run_dir=str(run_dir),
        steps_done=steps_done,
        resumed_from=resumed_from,
        generator=str(generator_path),
        last=last,
        heldout_ssim=heldout["ssim"],
        heldout_ssim_batchstats=heldout["ssim_batchstats"],
        heldout_mae=heldout["mae"],
        precision=precision,
        replicas=replicas,
        chief=chief,
    )


def _evaluate(
    generator: Any,
    cfg: GanConfig,
    images: np.ndarray,
    masks: np.ndarray,
    run_dir: Path,
    step: int,
    writer: Any,
    view: Callable[[np.ndarray], np.ndarray] = np.asarray,
    neighbours: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Held-out SSIM and MAE in inference mode (moving BN statistics: how generation runs)
    and SSIM with batch statistics for comparison; a sample grid PNG (slices through
    ``view``). ``neighbours``: the (N, 2k, S, S) neighbour maps of a 2.5-D ``cfg``.

    ``generator`` is a scratch copy: batch-statistics mode updates its moving averages.
    """
    import tensorflow as tf

    from models.gan import condition_of, generate_images

    if len(images) == 0:
        return {"ssim": None, "ssim_batchstats": None, "mae": None}
    pick = np.linspace(0, len(images) - 1, min(16, len(images))).astype(int)
    real = images[pick, ..., 0]
    bodies = body_outlines(real, masks[pick])
    near = None if neighbours is None else neighbours[pick]
    fake = generate_images(generator, masks[pick], cfg, bodies=bodies, neighbours=near)
    cond = condition_of(masks[pick], bodies, cfg, near)
    batchstats = np.asarray(generator(cond, training=True), dtype=np.float32)[..., 0]
    result = {
        "ssim": float(np.mean(ssim_batch(real, fake))),
        "ssim_batchstats": float(np.mean(ssim_batch(real, batchstats))),
        "mae": float(np.mean(np.abs(real - fake))),
    }
    show = pick[:4]
    picture = _sample_grid(
        masks[show], fake[: len(show), ..., None], images[show], view, bodies[: len(show)]
    )
    save_png(picture, run_dir / "samples" / f"step_{step:06d}.png")
    with writer.as_default(step=step):
        for name, value in result.items():
            tf.summary.scalar(f"heldout_{name}", value)
        tf.summary.image("samples", picture[None], max_outputs=1)
    return result
