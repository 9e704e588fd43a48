"""The `pipeline` command line: thin commands that parse options, call the library and print."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from tqdm import tqdm

from models.config import GanConfig
from pipeline import __version__
from pipeline.cpu import CpuProfile, read_cpu
from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.tflog import quiet_tensorflow
from pipeline.workspace import DEFAULT_WORKSPACE, ENV_WORKSPACE, Workspace, open_workspace

F = TypeVar("F", bound=Callable[..., Any])


#: The demo's budget on two CPU cores (README "Quickstart", ≤ 5 minutes; what each part costs
#: is in README, `pipeline demo`): the tiny cGAN's steps, the phantom's size, the gates'
#: feature encoder's steps, the utility study's segmenter steps and seeds, the volumes.
DEMO_TRAIN_STEPS = 500
DEMO_VOLUMES = 16
DEMO_SLICES = 32  # axial slices per phantom volume (5 mm apart)
DEMO_SPLIT = (0.5, 0.25, 0.25)  # train, val, test: as many held-out patients as trained on
DEMO_ENCODER_STEPS = 200
DEMO_UTILITY_STEPS = 300
DEMO_UTILITY_SEEDS = 2
DEMO_CASES = 12  # synthetic volumes, painted slice by slice (issue 25; see README, `pipeline demo`)

#: ``pipeline --help`` lists the commands in the order data flows through them.
FLOW_ORDER = (
    "phantom",
    "ingest",
    "status",
    "index",
    "train",
    "generate",
    "filter",
    "evaluate",
    "reviewers",
    "review",
    "decisions",
    "honeypots",
    "export",
    "releases",
    "verify",
    "demo",
)


class FiniteRange(click.FloatRange):
    """click's ``FloatRange`` that also refuses NaN and ±inf: NaN fails no comparison, so click
    lets it through every range, and a NaN threshold switches a privacy rule or gate off."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The number, or click's usage error (exit 2) naming the option."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


#: Every seed option: numpy's generators take 0 … 2³²−1 (a negative seed was a traceback).
SEED = click.IntRange(0, 2**32 - 1)


class PipelineGroup(click.Group):
    """A click group that turns library errors into one line on stderr and the right exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands in the order of the flow (any not in ``FLOW_ORDER`` last, sorted)."""
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(FLOW_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; PipelineError → ``Error: <file>: <problem>`` and exit 2 (or 1)."""
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            err = click.ClickException(str(exc))
            err.exit_code = exc.exit_code
            raise err from None
        except click.UsageError as exc:  # click's own checks of options: one line too
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            err = click.ClickException(" ".join(exc.format_message().split()) + where)
            err.exit_code = exc.exit_code
            raise err from None
        except BrokenPipeError:
            # the reader went away (`pipeline decisions list | head -1`): stop quietly, as
            # other command-line tools do; point stdout at nothing so the exit flush is silent
            # (a captured stdout, as in tests, has no descriptor to point elsewhere)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)  # 128 + SIGPIPE, what a shell reports for a killed writer
        except OSError as exc:  # a full disk, a permission, a path that is not what it seems
            raise _one_line(exc) from None
        except Exception as exc:
            if _is_locked_catalog(exc):
                raise _one_line(
                    PipelineError("the catalog is busy (another command is writing); try again")
                ) from None
            raise


def _one_line(exc: Exception) -> click.ClickException:
    """A library or system error as one line on stderr with exit code 2 (1 for failed checks)."""
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ""
        what = exc.strerror or str(exc)
        text = f"{where}: {what}" if where else what
    else:
        text = str(exc)
    err = click.ClickException(" ".join(text.split()))
    err.exit_code = getattr(exc, "exit_code", 2)
    return err


def _is_locked_catalog(exc: Exception) -> bool:
    """SQLite's 'database is locked' after the busy timeout, as SQLAlchemy raises it."""
    from sqlalchemy.exc import OperationalError

    return isinstance(exc, OperationalError) and "database is locked" in str(exc)


def workspace_option(func: F) -> F:
    """``--workspace DIR`` (env ``PIPELINE_WORKSPACE``, default ``./workspace``) on a command."""
    return click.option(
        "--workspace",
        "-w",
        type=click.Path(path_type=str, file_okay=False),
        callback=_workspace_path,
        envvar=ENV_WORKSPACE,
        default=DEFAULT_WORKSPACE,
        show_default=True,
        help=f"Workspace folder holding all state (env {ENV_WORKSPACE}).",
    )(func)


def _workspace_path(ctx: click.Context, param: click.Parameter, value: str) -> Path:
    """``--workspace`` as a path; an empty value is refused (it would mean the current folder)."""
    if not value.strip():
        raise PipelineError("--workspace is empty; name a folder (or leave the option out)")
    return Path(value)


def json_option(func: F) -> F:
    """``--json``: print machine-readable results."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(func)


def progress_bar(desc: str, unit: str) -> Progress:
    """A tqdm wrapper on stderr that stays silent when stderr is not a terminal (CI, pipes)."""

    def wrap(items: Iterable[Any]) -> Iterable[Any]:
        items = list(items)
        return tqdm(items, desc=desc, unit=unit, total=len(items), disable=None, leave=False)

    return wrap


@contextmanager
def opened_workspace(path: Path, *, create: bool) -> Iterator[Workspace]:
    """Open a workspace for one command; one this command created is removed again if it fails."""
    created = create and not path.exists()
    ws = open_workspace(path, create=create)
    try:
        yield ws
    except BaseException:
        ws.close()
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    ws.close()


def echo_json(data: Any) -> None:
    """Print indented JSON to stdout."""
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@click.group(cls=PipelineGroup)
@click.version_option(__version__, prog_name="cardiac-synth")
@click.option(
    "--verbose",
    is_flag=True,
    help="Show TensorFlow's own log lines (hidden unless TF_CPP_MIN_LOG_LEVEL is set).",
)
def cli(verbose: bool) -> None:
    """cardiac-synth: segmented cardiac CT in, a reviewed synthetic dataset out."""
    # before any command imports TensorFlow; children (the review app, workers) inherit the level
    quiet_tensorflow(os.environ, verbose=verbose)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--volumes", default=8, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--size",
    default=256,
    show_default=True,
    type=click.IntRange(16, 2048),
    help="In-plane matrix (pixels).",
)
@click.option(
    "--slices",
    default=64,
    show_default=True,
    type=click.IntRange(4, 2048),
    help="Axial slices per volume.",
)
@click.option(
    "--workers", default=0, type=click.IntRange(0, 64), help="Processes (0: one per CPU core)."
)
def phantom(out: Path, volumes: int, seed: int, size: int, slices: int, workers: int) -> None:
    """Write the built-in synthetic cardiac CT set to OUT as NIfTI (HU + MM-WHS labels).

    Also writes OUT/preview.png: mid-heart slices of the first volumes with the labels overlaid.
    """
    from pipeline.phantom import write_phantom

    paths = write_phantom(
        out,
        volumes=volumes,
        seed=seed,
        size=size,
        n_slices=slices,
        workers=workers,
        progress=progress_bar("phantom", "vol"),
    )
    click.echo(f"wrote {len(paths)} volume pairs to {out} (preview: {out / 'preview.png'})")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@workspace_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "mmwhs", "nnunet", "png"]),
    default="auto",
    show_default=True,
    help="Source layout.",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="labels.json (name → value). Default: SRC/labels.json, nnU-Net dataset.json, "
    "else the MM-WHS codes.",
)
@click.option(
    "--size",
    default=256,
    show_default=True,
    type=click.IntRange(8, 4096),
    help="Slice size after resizing (square, aspect kept by padding).",
)
@click.option(
    "--split",
    "split_text",
    default="0.7,0.15,0.15",
    show_default=True,
    help="train,val,test fractions of patients.",
)
@click.option("--seed", default=0, show_default=True, type=SEED, help="Split seed.")
@click.option(
    "--min-foreground",
    default=0.001,
    show_default=True,
    type=FiniteRange(0.0, 1.0),
    help="Skip slices whose labelled fraction is below this (0 keeps all).",
)
@click.option(
    "--window",
    default="-1024,2048",
    show_default=True,
    help="HU window lo,hi clipped and scaled to [0, 1] (NIfTI sources).",
)
@click.option(
    "--ignore-unknown-labels",
    is_flag=True,
    help="Treat label values outside the schema as background instead of failing.",
)
@json_option
def ingest(
    src: Path,
    workspace: Path,
    fmt: str,
    labels_file: Path | None,
    size: int,
    split_text: str,
    seed: int,
    min_foreground: float,
    window: str,
    ignore_unknown_labels: bool,
    as_json: bool,
) -> None:
    """Read CT volumes with label maps from SRC, split by patient, cache 2D axial slices."""
    from pipeline.ingest import IngestConfig
    from pipeline.ingest import ingest as run_ingest
    from pipeline.splits import parse_fractions

    cfg = IngestConfig(
        format=fmt,
        size=size,
        split=parse_fractions(split_text),
        seed=seed,
        min_foreground=min_foreground,
        window=_parse_window(window),
        labels_file=str(labels_file) if labels_file else None,
        ignore_unknown_labels=ignore_unknown_labels,
    )
    with opened_workspace(workspace, create=True) as ws:
        report = run_ingest(ws, src, cfg, progress=progress_bar("ingest", "vol"))
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(
        f"ingested {len(report.added_volumes)} volume(s), {report.added_slices} slices from {src} "
        f"({report.format}; labels: {report.label_schema_source})"
    )
    if report.skipped_volumes:
        click.echo(f"skipped {len(report.skipped_volumes)} already ingested volume(s)")
    if report.empty_volumes:
        click.echo(f"no slice above --min-foreground in: {', '.join(report.empty_volumes)}")
    click.echo(format_status(report.status))


def _parse_window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise PipelineError(f"--window {text!r}: expected lo,hi in HU") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        # an infinite bound scales every voxel to 0 (or NaN): the cache would be all zeros
        raise PipelineError(f"--window {text!r}: lo and hi must be finite HU values")
    if not hi > lo:
        raise PipelineError(f"--window {text!r}: hi must be above lo")
    return lo, hi


def format_status(status: dict[str, Any]) -> str:
    """Human-readable workspace status."""
    lines = [
        f"workspace {status['workspace']}: {status['volumes']} volumes, "
        f"{status['slices']} slices at {status['slice_size']}² "
        f"({', '.join(status['units']) or 'no data'})"
    ]
    lines.append(f"  {'split':<6} {'patients':>9} {'volumes':>8} {'slices':>7}")
    for name, row in status["splits"].items():
        lines.append(f"  {name:<6} {row['patients']:>9} {row['volumes']:>8} {row['slices']:>7}")
    if status["label_schema"]:
        schema = ", ".join(f"{k}={v}" for k, v in status["label_schema"].items())
        lines.append(f"  labels: {schema}")
    return "\n".join(lines)


@cli.command()
@workspace_option
@json_option
def status(workspace: Path, as_json: bool) -> None:
    """Show what the workspace holds: volumes and slices per split, the label schema."""
    from pipeline.ingest import workspace_status

    with opened_workspace(workspace, create=False) as ws:
        result = workspace_status(ws)
    echo_json(result) if as_json else click.echo(format_status(result))


@cli.command()
@workspace_option
@click.option(
    "--volumes",
    default=DEMO_VOLUMES,
    show_default=True,
    type=click.IntRange(8, 1000),  # 4 training patients: the anatomy model's minimum
    help="Phantom patients, split half for training, half held out (8 + 8: enough for the "
    "membership audit, which needs 6 per group).",
)
@click.option(
    "--size",
    default=64,
    show_default=True,
    type=click.IntRange(16, 512),
    help="Slice size for the demo workspace.",
)
@click.option(
    "--train-steps",
    default=DEMO_TRAIN_STEPS,
    show_default=True,
    type=click.IntRange(0, 1_000_000),
    help="Steps of the tiny cGAN (0 skips training).",
)
@click.option(
    "--candidates",
    default=64,
    show_default=True,
    type=click.IntRange(0, 100_000),
    help="Candidates to generate and judge (0 stops after training).",
)
@click.option(
    "--cases",
    default=DEMO_CASES,
    show_default=True,
    type=click.IntRange(0, 100),
    help="Whole synthetic volumes to paint slice by slice and filter after the slices (0: "
    "none); each gets a three-plane picture.",
)
@click.option(
    "--auto-review",
    is_flag=True,
    help="DEMO ONLY: a built-in 'demo' reviewer accepts every unflagged candidate, then the "
    "bundle is exported and verified (recorded as a demo review in the manifest).",
)
@click.option(
    "--review",
    "start_review",
    is_flag=True,
    help="Afterwards start the review app with a one-time admin account 'demo-physician' "
    "(a fresh random password, printed once).",
)
@click.option("--port", default=8501, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--encoder-steps",
    default=DEMO_ENCODER_STEPS,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Training steps of the feature encoder the quality gates use.",
)
@click.option(
    "--utility/--no-utility",
    default=True,
    show_default=True,
    help="Judge the batch's usefulness too: a segmenter trained on the unflagged candidates, "
    "tested on the real held-out patients, against one trained on real slices (TSTR/TRTR).",
)
@click.option(
    "--utility-steps",
    default=DEMO_UTILITY_STEPS,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Segmenter steps per arm and seed.",
)
@click.option(
    "--utility-seeds",
    default=DEMO_UTILITY_SEEDS,
    show_default=True,
    type=click.IntRange(2, 20),
    help="Paired seeds of the utility study (its interval also resamples patients).",
)
@click.option("--seed", default=0, show_default=True, type=SEED)
def demo(
    workspace: Path,
    volumes: int,
    size: int,
    train_steps: int,
    candidates: int,
    cases: int,
    auto_review: bool,
    start_review: bool,
    port: int,
    encoder_steps: int,
    utility: bool,
    utility_steps: int,
    utility_seeds: int,
    seed: int,
) -> None:
    """Run the main job on the built-in phantom: phantom → ingest → index → train (tiny) →
    generate --filter."""
    from pipeline.filtering import FilterConfig, build_index
    from pipeline.generate import GenerateConfig, generate
    from pipeline.ingest import IngestConfig
    from pipeline.ingest import ingest as run_ingest
    from pipeline.phantom import write_phantom
    from pipeline.quality import GateConfig
    from pipeline.render import describe_evaluation, describe_index
    from pipeline.train import TrainOptions, train

    src = workspace / "demo-sources" / "phantom"
    click.echo(f"[1/6] phantom: {volumes} volumes → {src}")
    write_phantom(
        src,
        volumes=volumes,
        seed=seed,
        n_slices=DEMO_SLICES,
        progress=progress_bar("phantom", "vol"),
    )
    click.echo(f"      preview: {src / 'preview.png'}")
    click.echo(f"[2/6] ingest → {workspace}")
    with opened_workspace(workspace, create=True) as ws:
        report = run_ingest(
            ws,
            src,
            IngestConfig(size=size, seed=seed, split=DEMO_SPLIT),
            progress=progress_bar("ingest", "vol"),
        )
        click.echo(format_status(report.status))
        click.echo(f"[3/6] privacy index → {ws.index_dir}")
        manifest = build_index(ws, FilterConfig(seed=seed), progress=progress_bar("index", "batch"))
        click.echo(describe_index(manifest))
        if not train_steps:
            return
        run_name = "demo"
        resume = (ws.runs_dir / run_name / "checkpoints" / "checkpoint").exists()
        click.echo(
            f"[4/6] train the tiny cGAN for {train_steps} steps → {ws.runs_dir / run_name}"
            + (" (resuming)" if resume else "")
        )
        cfg = dataclasses.replace(
            _gan_config("tiny", size=size, steps=train_steps), precision="auto"
        )
        # the candidates' anatomy is no training patient's: a generator that saw only the
        # training people's poses paints unfamiliar anatomy's thin myocardium ~30 HU dark
        # (measured on deformed masks), which skews every structure's contrast over it
        opts = TrainOptions(run=run_name, resume=resume, seed=seed, augment="affine")
        bar = StepProgress("train")
        trained = train(ws, cfg, opts, progress=bar, on_step=bar.postfix, cpu=_cpu())
        click.echo(describe_training(trained))
        if not candidates:
            return
        click.echo(f"[5/6] generate {candidates} candidates on synthetic anatomy, filter")
        generated = generate(
            ws,
            GenerateConfig(run=run_name, count=candidates, seed=seed),
            progress=progress_bar("generate", "batch"),
        )
        click.echo(f"      {generated.folder}: images/ (HU NIfTI), masks/, previews/")
        gates = GateConfig(
            seed=seed,
            encoder_steps=encoder_steps,
            utility=utility,
            utility_steps=utility_steps,
            utility_seeds=utility_seeds,
            utility_mixed=False,  # the real+synthetic arm: a third of the study's time
        )
        judged = _judge(ws, generated.batch, gates)
        click.echo(describe_evaluation(judged))
        if cases:
            _demo_volumes(ws, run_name, cases, seed)
    if auto_review:
        _demo_auto_review(workspace, generated.batch)
    if start_review:
        _demo_review_app(workspace, port)
    if auto_review:
        return
    click.echo(
        "Review: previews with mask overlays are in "
        f"{Path(generated.folder) / 'previews'}; plots in {judged['report_dir']}.\n"
        "Physician review (the app binds to 127.0.0.1; Ctrl-C stops it):\n"
        f"  .venv/bin/pipeline reviewers add YOUR_NAME --role admin --workspace {workspace}\n"
        f"  .venv/bin/pipeline review --workspace {workspace}   # then open http://127.0.0.1:8501"
    )
    click.echo(
        "Export the accepted, unflagged candidates and check the bundle:\n"
        f"  .venv/bin/pipeline export --workspace {workspace} --out {workspace}/releases\n"
        f"  .venv/bin/pipeline verify {workspace}/releases/Dataset500_CardiacSynth"
        "   # the folder export printed\n"
        "(or all in one, as a clearly marked demo: pipeline demo --auto-review)"
    )


def _demo_volumes(ws: Workspace, run: str, cases: int, seed: int) -> None:
    """The demo's whole cases: synthetic label volumes painted slice by slice (2.5-D, scanner
    noise), through the privacy filter; where their three-plane pictures are."""
    from pipeline.filtering import filter_batch
    from pipeline.generate import GenerateConfig, generate
    from pipeline.render import describe_privacy

    click.echo(f"[6/6] generate {cases} synthetic volumes (painted slice by slice), filter")
    made = generate(
        ws,
        GenerateConfig(run=run, count=cases, seed=seed, volumes=True, batch_name="demo-volumes"),
        progress=progress_bar("volumes", "batch"),
    )
    for note in made.notes:
        click.echo(f"      {note}")
    verdict = filter_batch(ws, made.batch, progress=progress_bar("filter", "batch"))
    click.echo(f"      privacy: {describe_privacy(verdict)}")
    planes = sorted((Path(made.folder) / "previews").glob("case_*_planes.png"))
    shown = planes[0] if len(planes) == 1 else Path(made.folder) / "previews" / "case_*_planes.png"
    click.echo(
        f"      {made.folder}: {made.cases} cases, {made.count} slices; three planes: {shown}"
        + (f" ({len(planes)} pictures)" if len(planes) > 1 else "")
    )


def _demo_review_app(workspace: Path, port: int) -> None:
    """A one-time account for a newcomer, its password printed once, then the app (exec)."""
    from pipeline.workflows import open_demo_account

    with opened_workspace(workspace, create=False) as ws:
        password = open_demo_account(ws, "demo-physician")
    click.echo(
        f"[demo] review app: http://127.0.0.1:{port} — log in as demo-physician with password "
        f"{password} (shown once; a new one is set on every 'demo --review')"
    )
    _exec_review_app(workspace, port, "127.0.0.1")


def _demo_auto_review(workspace: Path, batch: str) -> None:
    """DEMO ONLY: the 'demo' reviewer accepts every unflagged candidate; export; verify."""
    from pipeline.workflows import demo_auto_review

    click.echo(
        "[demo] auto-review: the built-in 'demo' reviewer accepts every unflagged "
        "candidate — a demonstration, not a clinical review"
    )
    with opened_workspace(workspace, create=False) as ws:
        done = demo_auto_review(ws, batch, progress=progress_bar("export", "case"))
    if done.refused is not None:  # e.g. a short demo run fails its gates: show why
        click.echo(f"[demo] export refused: {done.refused}")
        return
    if done.existed:
        click.echo(f"[demo] bundle already there: {done.bundle}")
    click.echo(
        f"[demo] bundle {done.bundle} (+ .zip): "
        + ("sound" if not done.problems else "; ".join(done.problems))
    )


@cli.command("index")
@workspace_option
@click.option(
    "--embedder",
    type=click.Choice(["pixel", "encoder"]),
    default="pixel",
    show_default=True,
    help="Slice embedding used for the nearest-neighbour search.",
)
@click.option(
    "--k",
    default=5,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Neighbours re-scored with SSIM per image (and per mirror image).",
)
@click.option(
    "--quantile",
    default=0.99,
    show_default=True,
    type=FiniteRange(0.5, 0.9999),
    help="Quantile of held-out-vs-training similarity used as the threshold.",
)
@click.option(
    "--threshold",
    type=FiniteRange(-1.0, 1.0),
    default=None,
    help="Explicit SSIM threshold instead of calibration (needed without held-out patients).",
)
@click.option(
    "--mask-threshold",
    type=FiniteRange(0.0, 1.0),
    default=None,
    help="Explicit label-map Dice threshold instead of calibration (recorded as hand-set; 1.0 "
    "flags no label map: for research batches of deformed real anatomy).",
)
@click.option(
    "--max-shift",
    default=4,
    show_default=True,
    type=click.IntRange(0, 32),
    help="Pixels of shift searched when re-scoring.",
)
@click.option(
    "--smooth",
    default=1.0,
    show_default=True,
    type=FiniteRange(0.0, 8.0),
    help="Gaussian sigma (px) applied before SSIM, so added noise cannot hide a copy.",
)
@click.option("--encoder-steps", default=300, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--rebuild", is_flag=True, help="Embed everything again instead of adding new slices."
)
@json_option
def index_cmd(
    workspace: Path,
    embedder: str,
    k: int,
    quantile: float,
    threshold: float | None,
    mask_threshold: float | None,
    max_shift: int,
    smooth: float,
    encoder_steps: int,
    seed: int,
    rebuild: bool,
    as_json: bool,
) -> None:
    """Embed every source slice into the FAISS index and calibrate the 'too similar' threshold."""
    from pipeline.filtering import FilterConfig, build_index
    from pipeline.render import describe_index

    cfg = FilterConfig(
        embedder=embedder,
        k=k,
        max_shift=max_shift,
        smooth=smooth,
        quantile=quantile,
        threshold=threshold,
        mask_threshold=mask_threshold,
        set_by=None if threshold is None and mask_threshold is None else _os_account(),
        encoder_steps=encoder_steps,
        seed=seed,
    )
    with opened_workspace(workspace, create=False) as ws:
        manifest = build_index(ws, cfg, rebuild=rebuild, progress=progress_bar("index", "batch"))
    if as_json:
        echo_json(manifest)
        return
    click.echo(describe_index(manifest))


def gate_options(func: F) -> F:
    """Quality gate thresholds and the feature space (``pipeline.quality.GateConfig``)."""
    from pipeline.quality import GateConfig

    d = GateConfig()
    options = [
        click.option(
            "--min-ssim",
            default=d.min_heart_ssim,
            show_default=True,
            type=FiniteRange(-1.0, 1.0),
            help="Gate: minimum mean SSIM inside the heart region on held-out masks.",
        ),
        click.option(
            "--min-slice-ssim",
            default=d.min_heldout_ssim,
            type=FiniteRange(-1.0, 1.0),
            help="Gate (off unless given): minimum mean SSIM of whole held-out slices.",
        ),
        click.option(
            "--max-fd-ratio",
            default=d.max_fd_ratio,
            show_default=True,
            type=FiniteRange(0.0),
            help="Gate: maximum Fréchet distance relative to the real-vs-real baseline.",
        ),
        click.option(
            "--max-flagged",
            default=d.max_flagged_fraction,
            show_default=True,
            type=FiniteRange(0, 1),
            help="Gate: maximum fraction of the batch flagged too similar.",
        ),
        click.option(
            "--max-membership-auc",
            default=d.max_membership_auc,
            show_default=True,
            type=FiniteRange(0.5, 1),
            help="Gate (a batch): the largest membership-audit AUC, training vs held-out "
            "patients, over both channels (masks, images) and both statistics.",
        ),
        click.option(
            "--max-memorisation-share",
            default=d.max_memorisation_share,
            show_default=True,
            type=FiniteRange(0.5, 1),
            help="Gate (a filtered batch of synthetic or folder masks): the largest share of "
            "candidates closer to training than to held-out patients (fails beyond chance).",
        ),
        click.option(
            "--utility",
            is_flag=True,
            help="Also train a segmenter on the unflagged candidates and test it on the real "
            "held-out patients, against real training slices (TSTR/TRTR; minutes).",
        ),
        click.option(
            "--utility-steps",
            default=d.utility_steps,
            show_default=True,
            type=click.IntRange(1, 100_000),
            help="Segmenter steps per arm and seed.",
        ),
        click.option(
            "--utility-seeds",
            default=d.utility_seeds,
            show_default=True,
            type=click.IntRange(2, 20),
            help="Paired seeds (every arm starts from the same weights per seed): mean ± sd and "
            "the 95% interval over seeds and held-out patients.",
        ),
        click.option(
            "--min-utility-ratio",
            default=d.min_utility_ratio,
            show_default=True,
            type=FiniteRange(0.0),
            help="Gate (with --utility): the lower 95% bound of Dice trained on synthetic / Dice "
            "trained on real.",
        ),
        click.option(
            "--min-real-dice",
            default=d.min_real_dice,
            show_default=True,
            type=FiniteRange(0, 1),
            help="Gate (with --utility): the segmenter trained on real slices must reach this "
            "Dice, or the ratio says nothing.",
        ),
        click.option(
            "--features",
            type=click.Choice(["encoder", "pixel"]),
            default=d.features,
            show_default=True,
            help="Feature space of the distribution metrics.",
        ),
        click.option(
            "--encoder-steps",
            default=d.encoder_steps,
            show_default=True,
            type=click.IntRange(1, 100_000),
            help="Training steps of the feature encoder when the workspace has none yet.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _gate_config(
    min_ssim: float,
    min_slice_ssim: float | None,
    max_fd_ratio: float,
    max_flagged: float,
    max_membership_auc: float,
    max_memorisation_share: float,
    features: str,
    encoder_steps: int,
    utility: bool,
    utility_steps: int,
    utility_seeds: int,
    min_utility_ratio: float,
    min_real_dice: float,
) -> Any:
    from pipeline.quality import GateConfig

    return GateConfig(
        utility=utility,
        utility_steps=utility_steps,
        utility_seeds=utility_seeds,
        min_utility_ratio=min_utility_ratio,
        min_real_dice=min_real_dice,
        min_heart_ssim=min_ssim,
        min_heldout_ssim=min_slice_ssim,
        max_fd_ratio=max_fd_ratio,
        max_flagged_fraction=max_flagged,
        max_membership_auc=max_membership_auc,
        max_memorisation_share=max_memorisation_share,
        features=features,
        encoder_steps=encoder_steps,
    )


def _judge(ws: Workspace, batch: str, gates: Any) -> dict[str, Any]:
    """The privacy filter and the gated evaluation of a batch, with progress bars."""
    from pipeline.workflows import judge_batch

    return judge_batch(
        ws,
        batch,
        gates,
        filter_progress=progress_bar("filter", "batch"),
        encoder_progress=progress_bar("training the feature encoder (once)", "step"),
        utility_progress=progress_bar("utility: segmenter trainings", "run"),
    )


def _print_judgement(report: dict[str, Any], as_json: bool) -> None:
    """Print an evaluation; a failed gate is exit 1 (after printing everything)."""
    from pipeline.render import describe_evaluation

    echo_json(report) if as_json else click.echo(describe_evaluation(report))
    _check_gates(report)


def _check_gates(report: dict[str, Any]) -> None:
    """Exit 1 naming the failed gates, if any."""
    from pipeline.errors import CheckFailedError

    if not report["gates"]["passed"]:
        failed = [g["gate"] for g in report["gates"]["results"] if not g["passed"]]
        raise CheckFailedError(f"quality gates failed: {', '.join(failed)}")


@cli.command("filter")
@workspace_option
@click.option(
    "--images",
    "images",
    type=click.Path(path_type=Path),
    help="A folder (or file) of PNG / NIfTI images to score.",
)
@click.option(
    "--batch",
    "batch_name",
    help="A generated candidate batch: store its privacy verdicts and run the quality gates.",
)
@gate_options
@json_option
def filter_cmd(
    workspace: Path, images: Path | None, batch_name: str | None, as_json: bool, **gates: Any
) -> None:
    """Score images against every source slice; flag those too similar to one."""
    from pipeline.filtering import dumps_results, filter_images
    from pipeline.privacy import Calibration

    if (images is None) == (batch_name is None):
        raise click.UsageError("give exactly one of --images PATH or --batch NAME")
    if batch_name is not None:
        with opened_workspace(workspace, create=False) as ws:
            report = _judge(ws, batch_name, _gate_config(**gates))
        _print_judgement(report, as_json)
        return
    with opened_workspace(workspace, create=False) as ws:
        results, summary, notes = filter_images(
            ws, images, progress=progress_bar("filter", "batch")
        )
    if as_json:
        click.echo(dumps_results(results, summary, notes))
        return
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(
        f"{'image':<32}{'SSIM':>8}{'texture':>9}{'margin':>9}{'p':>8}  "
        f"{'nearest (patient)':<24}flag"
    )
    for r in results:
        flag = "TOO SIMILAR" if r.flagged else ""
        p = "" if r.p_value is None else f"{r.p_value:.3g}"
        click.echo(
            f"{r.name[:31]:<32}{r.score:>8.4f}{r.texture:>9.4f}{r.margin:>9.4f}{p:>8}  "
            f"{f'{r.nearest_slice} ({r.nearest_patient})':<24}{flag}"
        )
    rule = Calibration.from_manifest(summary).describe()
    click.echo(
        f"{summary['flagged']} of {summary['images']} flagged ({rule}, {summary['embedder']} index)"
    )


@cli.command("generate")
@workspace_option
@click.option("--run", "run_name", default="run", show_default=True, help="Trained run to use.")
@click.option("--count", default=64, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option(
    "--masks",
    default="synthetic",
    show_default=True,
    help="synthetic (drawn from a shape model of the training label volumes: no one patient's "
    "anatomy), augmented (deformed training masks), heldout (test split) or a folder of masks; "
    "augmented and heldout are real patients' anatomy and need --allow-derived-anatomy to export.",
)
@click.option("--batch-name", help="Folder under candidates/ (default RUN-MASKS).")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--drop-structures",
    default=0.0,
    show_default=True,
    type=FiniteRange(0, 1),
    help="augmented: probability of removing each structure from a mask.",
)
@click.option(
    "--volumes",
    is_flag=True,
    help="Whole cases: --count volumes (synthetic, heldout or a folder of NIfTI label "
    "volumes), each painted slice by slice with its neighbours' maps; every slice is a "
    "candidate of its case.",
)
@click.option(
    "--noise",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Scanner noise on every painted slice, fitted on the training volumes' neighbouring "
    "slices (auto: for --volumes, whose slices must differ as a scan's do; not for loose "
    "slices).",
)
@click.option(
    "--anatomy-from",
    type=click.Path(path_type=Path),
    help="synthetic: fit the shape model on every patient of this workspace (label volumes "
    "from outside the training set, e.g. a public atlas run through 'pipeline ingest') "
    "instead of the training patients, whom a model of few people points at.",
)
@click.option(
    "--filter",
    "run_filter",
    is_flag=True,
    help="Then run the privacy filter and the quality gates on the batch.",
)
@gate_options
@json_option
def generate_cmd(
    workspace: Path,
    run_name: str,
    count: int,
    masks: str,
    batch_name: str | None,
    seed: int,
    drop_structures: float,
    volumes: bool,
    noise: str,
    anatomy_from: Path | None,
    run_filter: bool,
    as_json: bool,
    **gates: Any,
) -> None:
    """Generate candidate slices from new masks (resumable); --filter also judges them."""
    from pipeline.generate import GenerateConfig, generate

    cfg = GenerateConfig(
        run=run_name,
        count=count,
        masks=masks,
        batch_name=batch_name,
        seed=seed,
        drop_structures=drop_structures,
        volumes=volumes,
        noise=noise,
        anatomy_from=None if anatomy_from is None else str(anatomy_from),
    )
    with opened_workspace(workspace, create=False) as ws:
        report = generate(ws, cfg, progress=progress_bar("generate", "batch"))
        judged = _judge(ws, report.batch, _gate_config(**gates)) if run_filter else None
    if as_json:
        echo_json({"generate": dataclasses.asdict(report), "evaluation": judged})
    else:
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        cases = "" if report.cases is None else f"{report.cases} volumes, "
        click.echo(
            f"batch {report.batch}: {cases}{report.count} candidates ({report.generated} "
            f"generated, {report.reused} already there; {report.units}) in {report.folder}"
        )
    if judged is not None:
        if not as_json:
            _print_judgement(judged, as_json=False)
        else:
            _check_gates(judged)


@cli.command("evaluate")
@workspace_option
@click.option("--run", "run_name", default="run", show_default=True, help="Trained run.")
@click.option("--batch", "batch_name", help="Also judge this candidate batch and store its gates.")
@click.option(
    "--inception-weights",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Local InceptionV3 (no top) weights file: adds a true FID. Never downloaded.",
)
@gate_options
@json_option
def evaluate_cmd(
    workspace: Path,
    run_name: str,
    batch_name: str | None,
    inception_weights: Path | None,
    as_json: bool,
    **gates: Any,
) -> None:
    """Quality report: held-out SSIM/PSNR/MAE, Fréchet distance and PRDC, gates, plots."""
    from pipeline.quality import evaluate

    with opened_workspace(workspace, create=False) as ws:
        report = evaluate(
            ws,
            run_name,
            _gate_config(**gates),
            batch=batch_name,
            inception_weights=inception_weights,
            progress=progress_bar("training the feature encoder (once)", "step"),
            utility_progress=progress_bar("utility: segmenter trainings", "run"),
        )
    _print_judgement(report, as_json)


def _read_password(password_stdin: bool, *, confirm: bool) -> str:
    """A password from one line of stdin, or a hidden prompt."""
    if password_stdin:
        import sys

        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise PipelineError("--password-stdin: no password on standard input")
        return line
    return click.prompt("Password", hide_input=True, confirmation_prompt=confirm)


def _policy(ws: Workspace) -> str:
    from pipeline.catalog import read_session
    from pipeline.decisions import review_policy

    with read_session(ws.engine) as session:
        return review_policy(session)


@cli.group()
def reviewers() -> None:
    """Reviewer accounts (passwords stored only as salted scrypt hashes) and the policy."""


@reviewers.command("add")
@click.argument("name")
@workspace_option
@click.option(
    "--role", type=click.Choice(["reviewer", "admin"]), default="reviewer", show_default=True
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def reviewers_add(name: str, workspace: Path, role: str, password_stdin: bool) -> None:
    """Create an account NAME (the password is prompted for, twice)."""
    from pipeline.catalog import write_session
    from pipeline.review import add_reviewer

    password = _read_password(password_stdin, confirm=True)
    with opened_workspace(workspace, create=False) as ws, write_session(ws.engine) as session:
        add_reviewer(session, name, role, password)
    click.echo(f"added {role} {name}")


@reviewers.command("list")
@workspace_option
@json_option
def reviewers_list(workspace: Path, as_json: bool) -> None:
    """Accounts, roles, whether disabled, and their decision counts."""
    from pipeline.catalog import read_session
    from pipeline.review import list_reviewers

    with opened_workspace(workspace, create=False) as ws, read_session(ws.engine) as session:
        rows = list_reviewers(session)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        state = " (disabled)" if r["disabled"] else ""
        click.echo(f"{r['name']:<24}{r['role']:<10}{r['decisions']:>6} decisions{state}")


@reviewers.command("disable")
@click.argument("name")
@workspace_option
def reviewers_disable(name: str, workspace: Path) -> None:
    """Disable account NAME: it can no longer log in; its decisions stay in the log."""
    from pipeline.catalog import write_session
    from pipeline.review import disable_reviewer

    with opened_workspace(workspace, create=False) as ws, write_session(ws.engine) as session:
        disable_reviewer(session, name)
    click.echo(f"disabled {name}")


@reviewers.command("policy")
@click.argument("policy", required=False, type=click.Choice(["one", "two"]))
@workspace_option
def reviewers_policy(policy: str | None, workspace: Path) -> None:
    """Show or set the review policy: one accept suffices, or two reviewers must accept."""
    from pipeline.catalog import write_session
    from pipeline.decisions import set_review_policy

    with opened_workspace(workspace, create=False) as ws:
        if policy is not None:
            with write_session(ws.engine) as session:
                set_review_policy(session, policy)
        click.echo(f"review policy: {_policy(ws)}")


@cli.command("review")
@workspace_option
@click.option("--port", default=8501, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind (loopback unless you mean to expose the app).",
)
def review_cmd(workspace: Path, port: int, address: str) -> None:
    """Start the Streamlit reviewer app on this workspace (Ctrl-C stops it)."""
    open_workspace(workspace, create=False).close()  # a clear error before Streamlit starts
    _exec_review_app(workspace, port, address)


def _exec_review_app(workspace: Path, port: int, address: str) -> None:
    """Replace this process with the Streamlit server of the review app."""
    import sys

    import reviewer_app

    app = Path(reviewer_app.__file__).parent / "app.py"
    cmd = [sys.executable, "-m", "reviewer_app.serve", "run", str(app)]
    cmd += ["--server.port", str(port), "--server.address", address]
    cmd += ["--server.headless", "true", "--server.fileWatcherType", "none"]
    cmd += ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    cmd += ["--server.enableAgentApi", "false", "--server.enableStaticServing", "false"]
    # an uncaught error shows a generic message in the page, never a traceback with the
    # server's paths (the app answers the errors it expects in words of its own)
    cmd += ["--client.showErrorDetails", "none"]
    env = {**os.environ, "PIPELINE_WORKSPACE": str(workspace.resolve())}
    click.echo(f"reviewer app on http://{address}:{port} (workspace {workspace})")
    sys.stdout.flush()
    # exec, not a child: a supervisor's SIGTERM (or Ctrl-C) reaches the server itself, and
    # no orphaned app keeps serving on the port after 'pipeline review' is stopped
    os.execve(sys.executable, cmd, env)


@cli.command("honeypots")
@workspace_option
@click.option("--run", "run_name", default="run", show_default=True, help="Run they pose as.")
@click.option("--count", default=5, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--seed", default=0, show_default=True, type=SEED)
def honeypots_cmd(workspace: Path, run_name: str, count: int, seed: int) -> None:
    """Mix known near-copies of training slices into the review queues, unmarked (admins see
    each reviewer's catch rate; honeypots are never exported)."""
    from pipeline.generate import add_honeypots

    with opened_workspace(workspace, create=False) as ws:
        report = add_honeypots(ws, run_name, count, seed=seed)
    click.echo(f"{report.generated} honeypots added ({report.count} in {report.folder})")


@cli.group()
def decisions() -> None:
    """The review decisions: current state per candidate, the audit log, imports."""


@decisions.command("list")
@workspace_option
@click.option("--batch", "batch_name", help="Only this candidate batch.")
@json_option
def decisions_list(workspace: Path, batch_name: str | None, as_json: bool) -> None:
    """Candidates with their current state under the review policy."""
    from pipeline.catalog import read_session
    from pipeline.decisions import candidate_states, states_json

    with opened_workspace(workspace, create=False) as ws:
        policy = _policy(ws)
        with read_session(ws.engine) as session:
            states = candidate_states(session, policy=policy, batch=batch_name)
    if as_json:
        echo_json(states_json(states))
        return
    click.echo(f"{'id':>6}  {'batch':<20}{'candidate':<12}{'state':<14}decisions")
    for s in states:
        who = ", ".join([f"+{a}" for a in s.accepts] + [f"-{r}" for r in s.rejects])
        click.echo(f"{s.id:>6}  {s.batch[:19]:<20}{s.name:<12}{s.state:<14}{who}")
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    click.echo(f"policy {policy}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


@decisions.command("export")
@workspace_option
@click.option("--csv", "csv_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
def decisions_export(workspace: Path, csv_path: Path) -> None:
    """Write the full append-only decision log (for audits) as CSV."""
    from pipeline.atomic import atomic_write
    from pipeline.catalog import read_session
    from pipeline.review import decision_log, log_csv

    with opened_workspace(workspace, create=False) as ws, read_session(ws.engine) as session:
        rows = decision_log(session)
    atomic_write(csv_path, lambda tmp: tmp.write_text(log_csv(rows)))
    click.echo(f"wrote {len(rows)} decision rows to {csv_path}")


@decisions.command("import")
@click.argument("csv_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@workspace_option
@click.option("--reviewer", "reviewer_name", required=True, help="Whose decisions these are.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def decisions_import(
    csv_path: Path, workspace: Path, reviewer_name: str, password_stdin: bool
) -> None:
    """Record decisions made elsewhere (columns candidate,decision,reason), checked as at
    login; all or nothing."""
    from pipeline.review import import_decision_file, login

    password = _read_password(password_stdin, confirm=False)
    with opened_workspace(workspace, create=False) as ws:
        who = login(ws.engine, reviewer_name, password)
        n = import_decision_file(ws.engine, who["id"], csv_path)
    click.echo(f"imported {n} decisions as {reviewer_name} from {csv_path}")


@cli.command("export")
@workspace_option
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--batch", "batches", multiple=True, help="Only these batches (repeatable).")
@click.option("--name", default="CardiacSynth", show_default=True, help="Dataset name.")
@click.option(
    "--dataset-id",
    type=click.IntRange(1, 999),
    help="nnU-Net dataset id. Default: the id of an earlier release of exactly these cases, "
    "else the lowest from 500 the release ledger has not used.",
)
@click.option(
    "--license", "license_", default="CC-BY-4.0", show_default=True, help="Licence TEXT or FILE."
)
@click.option(
    "--accept-failed-gate",
    metavar="REASON",
    help="Admin override of failed quality gates (never of the privacy filter); the reason "
    "is written into the manifest.",
)
@click.option(
    "--allow-derived-anatomy",
    metavar="REASON",
    help="Admin: release label maps derived from real patients (augmented or held-out mask "
    "sources); the reason is written into the manifest and the datasheet.",
)
def export_cmd(
    workspace: Path,
    out: Path,
    batches: tuple[str, ...],
    name: str,
    dataset_id: int | None,
    license_: str,
    accept_failed_gate: str | None,
    allow_derived_anatomy: str | None,
) -> None:
    """Package the approved, unflagged candidates as a release bundle (folder + .zip)."""
    from release.bundle import ExportConfig, build_bundle, read_licence

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and not epoch.isdigit():
        raise PipelineError(f"SOURCE_DATE_EPOCH={epoch!r} is not a whole number of seconds")
    if accept_failed_gate is not None and not accept_failed_gate.strip():
        raise PipelineError("--accept-failed-gate needs a reason")
    if allow_derived_anatomy is not None and not allow_derived_anatomy.strip():
        raise PipelineError("--allow-derived-anatomy needs a reason")
    licence, licence_source = read_licence(license_)
    with opened_workspace(workspace, create=False) as ws:
        cfg = ExportConfig(
            out=out,
            batches=batches,
            name=name,
            dataset_id=dataset_id,
            license=licence,
            accept_failed_gate=accept_failed_gate,
            derived_anatomy=allow_derived_anatomy,
            policy=_policy(ws),
            source_date_epoch=int(epoch) if epoch is not None else None,
            by=_os_account(),
        )
        built = build_bundle(ws, cfg, progress=progress_bar("export", "case"))
    bundle = built.folder
    click.echo(f"exported {built.cases} cases to {bundle} and {built.zip}")
    if built.reproduces:
        click.echo(
            f"the same cases as the {bundle.name} released at {built.reproduces}: a "
            "reproduction under the same id (see: pipeline releases)"
        )
    click.echo(f"licence: {licence_source}")
    click.echo(f"check it: pipeline verify {bundle}   (or: cd {bundle} && sha256sum -c SHA256SUMS)")


@cli.command("releases")
@workspace_option
@json_option
def releases_cmd(workspace: Path, as_json: bool) -> None:
    """The release ledger: every bundle exported, its cases and their digests, and the cases
    the review has withdrawn since they were released."""
    from pipeline.catalog import read_session
    from release.ledger import release_ledger

    with opened_workspace(workspace, create=False) as ws:
        policy = _policy(ws)
        with read_session(ws.engine) as session:
            ledger = release_ledger(session, policy=policy)
    if as_json:
        echo_json(ledger)
        return
    if not ledger:
        click.echo("no release yet")
    for r in ledger:
        who = f" by {r['by']}" if r["by"] else ""
        click.echo(
            f"{r['dataset']}: {r['cases']} case(s), exported {r['export_time']}{who} "
            f"(policy {r['policy']}) to {r['folder']}; manifest sha256 {r['manifest_sha256'][:16]}…"
        )
        for c in r["withdrawn"]:
            click.echo(
                f"  withdrawn after release: {c['case']} = {c['batch']}/{c['name']} "
                f"(now {c['state']})"
            )


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
def verify_cmd(bundle: Path, as_json: bool) -> None:
    """Check a bundle's checksums, manifest and nnU-Net layout, and the zip that is sent: a
    folder (and the .zip beside it), or a .zip alone; exit 1 listing problems."""
    from pipeline.errors import CheckFailedError
    from release.verify import verify_bundle, verify_zip

    if bundle.is_file() and bundle.name.endswith(".zip"):
        problems = verify_zip(bundle)
    elif bundle.is_dir():
        problems = verify_bundle(bundle)
        sent = bundle.with_name(bundle.name + ".zip")
        if sent.exists():
            problems += verify_zip(sent, beside=bundle)
    else:
        raise PipelineError("not a bundle folder or a bundle .zip", path=bundle)
    if as_json:
        echo_json({"bundle": str(bundle), "sound": not problems, "problems": problems})
    else:
        for problem in problems:
            click.echo(problem)
        if not problems:
            click.echo(f"{bundle}: sound")
    if problems:
        raise CheckFailedError(f"{len(problems)} problem(s) in the bundle", path=bundle)


@cli.command("train")
@workspace_option
@click.option("--run", "run_name", default="run", show_default=True, help="Run name (runs/NAME).")
@click.option(
    "--preset",
    "preset_name",
    type=click.Choice(["paper", "seed-code", "tiny"]),
    default="paper",
    show_default=True,
)
@click.option("--steps", type=click.IntRange(1, 10_000_000), help="Override the preset's steps.")
@click.option("--batch", type=click.IntRange(1, 4096), help="Global batch size.")
@click.option("--size", type=click.IntRange(4, 1024), help="Image size (a power of two).")
@click.option("--lr", type=FiniteRange(0, 1, min_open=True), help="G and D learning rate.")
@click.option(
    "--lr-decay",
    type=FiniteRange(0, 1),
    help="Share of the steps at the end over which both rates fall linearly to 0 "
    "(preset's: tiny 0.5, paper and seed-code 0).",
)
@click.option(
    "--strategy",
    type=click.Choice(["auto", "default", "mirrored", "multi-worker"]),
    default="auto",
    show_default=True,
    help="mirrored: all local GPUs, or --devices logical CPUs; multi-worker: the machines "
    "in TF_CONFIG.",
)
@click.option(
    "--devices",
    default=0,
    type=click.IntRange(0, 64),
    help="Split the CPU into N logical devices (to run the mirrored path without GPUs).",
)
@click.option(
    "--precision",
    type=click.Choice(["float32", "mixed", "auto"]),
    default="auto",
    show_default=True,
    help="mixed: float16 on GPUs, bfloat16 on CPUs with native bf16 (refused elsewhere); "
    "auto: mixed where supported, else float32.",
)
@click.option(
    "--augment",
    type=click.Choice(["none", "affine", "flip+affine"]),
    default="none",
    show_default=True,
    help="Joint random affine of image and mask (flip adds left-right mirroring).",
)
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint.")
@click.option("--eval-every", default=100, show_default=True, type=click.IntRange(1, 10**7))
@click.option("--checkpoint-every", default=200, show_default=True, type=click.IntRange(1, 10**7))
@click.option("--seed", default=0, show_default=True, type=SEED)
@json_option
def train_cmd(
    workspace: Path,
    run_name: str,
    preset_name: str,
    steps: int | None,
    batch: int | None,
    size: int | None,
    lr: float | None,
    lr_decay: float | None,
    strategy: str,
    devices: int,
    precision: str,
    augment: str,
    resume: bool,
    eval_every: int,
    checkpoint_every: int,
    seed: int,
    as_json: bool,
) -> None:
    """Train the conditional GAN (mask → CT slice) on the training split."""
    from pipeline.train import TrainOptions, parse_cluster, train

    cluster = parse_cluster(os.environ.get("TF_CONFIG")) if strategy == "multi-worker" else None
    if devices:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices
        )
    cfg = _gan_config(preset_name, steps=steps, batch=batch, size=size, lr=lr, lr_decay=lr_decay)
    cfg = dataclasses.replace(cfg, precision=precision)
    opts = TrainOptions(
        run=run_name,
        strategy=strategy,
        resume=resume,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        seed=seed,
        augment=augment,
        cluster=cluster,
    )
    bar = StepProgress("train")
    with opened_workspace(workspace, create=False) as ws:
        report = train(ws, cfg, opts, progress=bar, on_step=bar.postfix, cpu=_cpu())
    if as_json:
        echo_json(dataclasses.asdict(report))
        return
    click.echo(describe_training(report))


def _gan_config(preset_name: str, **overrides: Any) -> GanConfig:
    """A ``models.config`` preset with the CLI's overrides (None: keep the preset's)."""
    from models.config import preset

    fields = {k: v for k, v in overrides.items() if v is not None and k != "lr"}
    if overrides.get("lr") is not None:
        fields["g_lr"] = fields["d_lr"] = overrides["lr"]
    try:
        return preset(preset_name, **fields)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None


def _os_account() -> str:
    """Who runs this command, as the OS knows them (recorded with a hand-set privacy rule)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): the numeric id
        return f"uid {os.getuid()}"


def _cpu() -> CpuProfile:
    return read_cpu()


class StepProgress:
    """A training progress bar: step/s and ETA from tqdm, the latest losses as its postfix."""

    KEYS = ("d_loss", "g_adv", "g_l1")

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def __call__(self, items: Iterable[Any]) -> Iterable[Any]:
        """Wrap the step range."""
        items = list(items)
        self.bar = tqdm(items, desc=self.desc, unit="step", disable=None, leave=False)
        return self.bar

    def postfix(self, step: int, metrics: dict[str, float]) -> None:
        """Show the losses of ``step``."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.4f}" for k in self.KEYS if k in metrics})


def describe_training(report: Any) -> str:
    """What a training run did and where to look (TensorBoard, sample grids, generator)."""
    run_dir = Path(report.run_dir)
    ssim = "n/a" if report.heldout_ssim is None else f"{report.heldout_ssim:.3f}"
    lines = []
    if report.resumed_from:
        lines.append(f"resumed from step {report.resumed_from}")
    lines += [
        f"trained {report.steps_done} steps ({report.precision}, {report.replicas} replica(s)); "
        f"held-out SSIM {ssim}; losses "
        + ", ".join(f"{k} {v:.4f}" for k, v in report.last.items()),
        f"generator: {report.generator}",
        f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}",
        f"samples: {run_dir / 'samples'}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    cli()
