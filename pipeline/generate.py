"""`pipeline generate`: candidate images from new masks, with provenance, resumable.

Mask sources: ``synthetic`` (the default: label maps drawn from a shape model of the training
patients' label volumes, :mod:`pipeline.anatomy` — no one patient's anatomy), ``augmented``
(training masks deformed by a seeded, label-preserving elastic + affine transform, optionally
dropping whole structures: a patient's own anatomy, deformed, for research only), ``heldout``
(the test split's masks, unchanged) or a folder of user masks (NIfTI or PNG, validated against
the run's label schema). Each candidate ``cand_XXXXX`` depends only on (batch seed, index), so a
re-run fills in what is missing instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.anatomy import (
    MODEL_FORMAT,
    AnatomyConfig,
    AnatomyModel,
    fit_anatomy,
    load_model,
    planes_picture,
    sample_anatomy,
)
from pipeline.atomic import atomic_write
from pipeline.augment import DEFORM_DEFAULTS, deform_mask, deformation_coords, warp_labels
from pipeline.candidates import (
    batch_row,
    group_cases,
    open_batch,
    read_batch_json,
    read_candidate,
    write_batch_json,
    write_candidate,
)
from pipeline.catalog import Candidate, Slice, Source, write_session
from pipeline.errors import PipelineError
from pipeline.imageio import image_files, read_nifti_slices, read_png
from pipeline.labels import LabelSchema
from pipeline.noise import NoiseModel, add_noise, fit_noise
from pipeline.preprocess import body_outline, body_outlines, resize_image, resize_mask
from pipeline.preview import BODY_VALUE, save_png, volume_planes
from pipeline.progress import Progress
from pipeline.runs import TrainedRun, find_run, load_generator
from pipeline.slices import (
    SliceRef,
    SliceStore,
    load_slices,
    neighbour_rows,
    planar_files,
    slice_spacings,
    volume_neighbours,
    volume_rows,
    workspace_refs,
)
from pipeline.validate import path_name
from pipeline.workspace import Workspace

MASK_SOURCES = ("synthetic", "augmented", "heldout")


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate (stored with the batch; a re-run must ask for the same)."""

    run: str = "run"
    count: int = 64
    masks: str = "synthetic"  # synthetic | augmented | heldout | a folder path
    batch_name: str | None = None
    seed: int = 0
    drop_structures: float = 0.0  # probability of dropping each structure (augmented)
    elastic_alpha: float = DEFORM_DEFAULTS["alpha"]  # displacement, as a fraction of the side
    degrees: float = DEFORM_DEFAULTS["degrees"]
    scale: float = DEFORM_DEFAULTS["scale"]
    shift: float = DEFORM_DEFAULTS["shift"]
    batch: int = 16  # inference batch
    # whole cases instead of loose slices: ``count`` is then a number of volumes, each painted
    # slice by slice with its neighbours' maps (a 2.5-D run), every slice a candidate that
    # records its case and z (synthetic, heldout, or a folder of NIfTI label volumes)
    volumes: bool = False
    # scanner noise (:mod:`pipeline.noise`) on every painted slice: "auto" gives it to whole
    # cases (neighbouring slices of a scan differ by their noise too) and not to loose slices
    # (judged one by one against their real pair); "on" / "off" ask for it either way
    noise: str = "auto"
    # a workspace of label volumes from outside the training set (a public atlas, ingested
    # with `pipeline ingest`): the synthetic masks' shape model is fitted on all of its
    # patients instead of the run's training patients (:func:`anatomy_people`). A model of
    # the training patients sits nearer them than a new person by 2σ²/n; on 12 + 12 their
    # mask-share AUC read 0.64–0.73, a model of 12 people from outside 0.34–0.56
    anatomy_from: str | None = None


NOISE_CHOICES = ("auto", "on", "off")


@dataclass
class MaskSpec:
    """One candidate's mask and where it came from."""

    mask: np.ndarray  # (S, S) uint8 class indices
    source: str  # synthetic | augmented | heldout | file
    slice_id: int | None
    file: str | None
    spacing: list[float]
    transform: dict[str, Any]
    # the body outline the candidate is painted in (None: the run's generator has no body
    # channel); never a real person's when the mask is no real person's
    body: np.ndarray | None = None
    # (2k, S, S) label maps of the slices z−k … z−1, z+1 … z+k of the same volume (2.5-D runs)
    neighbours: np.ndarray | None = None


@dataclass
class GenerateReport:
    """What a generate call did."""

    batch: str
    folder: str
    count: int
    generated: int
    reused: int
    units: str
    notes: list[str]
    cases: int | None = None  # whole volumes (``volumes``), each ``count`` slices in all


#: The anatomy model's in-plane grid at most (a 256² run's samples are drawn at 128² and their
#: maps resampled, not their labels: the PCA of 256² maps would take gigabytes).
ANATOMY_GRID = 128


def training_volumes(
    refs: list[SliceRef], masks: np.ndarray, planar: set[str], bodies: np.ndarray | None = None
) -> tuple[list[np.ndarray], list[str], list[np.ndarray]]:
    """Training label maps grouped into volumes (one per cache file, in slice order) with their
    patients, and ``bodies`` (the slices' body outlines) grouped the same way (empty list when
    None); a 2-D source (``planar`` cache files: PNG slices) gives one 1-slice volume per
    labelled slice, since its slices need not be neighbours."""
    extra = np.zeros(masks.shape, bool) if bodies is None else bodies
    vols: list[np.ndarray] = []
    outlines: list[np.ndarray] = []
    patients: list[str] = []
    for rows in volume_rows(refs, planar):
        vol = masks[rows]
        if vol.any():
            vols.append(vol)
            outlines.append(extra[rows])
            patients.append(refs[rows[0]].patient)
    return vols, patients, outlines if bodies is not None else []


def anatomy_model(
    ws: Workspace,
    run: str,
    schema: LabelSchema,
    size: int,
    *,
    body: bool = True,
    progress: Progress = iter,
    people: Workspace | None = None,
) -> tuple[AnatomyModel, Path]:
    """The shape model of the training split's label volumes (and, with ``body``, their body
    outlines), fitted once per training set and kept (content-addressed) in the run's folder:
    ``anatomy-<key>.npz``. Volumes when the sources are volumes; per slice for PNG sources.
    One line when there are too few patients. ``people``: a workspace from outside the
    training set (:func:`anatomy_people`) whose every patient is modelled instead; one line
    when one of its label volumes is one of this workspace's patients'."""
    source = ws if people is None else people
    refs = workspace_refs(source, ["train"] if people is None else None)
    planar = planar_files(source)
    grid = min(size, ANATOMY_GRID)
    images, masks = load_slices(source, refs, grid)
    bodies = body_outlines(images, masks) if body else None
    vols, patients, outlines = training_volumes(refs, masks, planar, bodies)
    if people is not None:
        _not_our_patients(ws, people, vols, patients, grid)
    flat = len(vols) > 0 and all(len(v) == 1 for v in vols)
    cfg = AnatomyConfig(depth=1 if flat else AnatomyConfig.depth, shell=shell_classes(schema))
    key = hashlib.sha256(
        repr(
            (
                MODEL_FORMAT,
                cfg,
                body,
                people is not None,
                schema.names,
                sorted(zip(patients, (v.shape for v in vols), strict=True)),
            )
        ).encode()
        + b"".join(v.tobytes() for v in (*vols, *outlines))
    ).hexdigest()[:16]
    path = ws.runs_dir / path_name(run, what="run") / f"anatomy-{key}.npz"
    if path.exists():
        return load_model(path), path
    model = fit_anatomy(vols, patients, len(schema.names), cfg, outlines if body else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(model.to_bytes()))
    who = "training" if people is None else "outside"  # a title as wide as a panel
    _write_anatomy_picture(model, schema, path.with_suffix(".png"), f"real ({who})")
    return model, path


#: Training patients under which ``generate`` says that the anatomy model points at them:
#: on 12 + 12 phantom patients the mask-share AUC read 0.64–0.73 over five seeds; on 24 + 12
#: every AUC of three seeds was ≤ 0.65 (README, membership audit).
FEW_PATIENTS = 24
#: Who a synthetic batch's shape model was fitted on, with ``--anatomy-from``.
OUTSIDE = "outside the training set"


def synthetic_anatomy(
    ws: Workspace, cfg: GenerateConfig, schema: LabelSchema, size: int, *, body: bool = True
) -> tuple[AnatomyModel, Path]:
    """The shape model behind ``cfg``'s synthetic masks: :func:`anatomy_model` of the run's
    training patients, or with ``cfg.anatomy_from`` of that workspace's people."""
    if cfg.anatomy_from is None:
        return anatomy_model(ws, cfg.run, schema, size, body=body)
    people = anatomy_people(ws, cfg.anatomy_from, schema)
    try:
        return anatomy_model(ws, cfg.run, schema, size, body=body, people=people)
    finally:
        people.close()


#: Dice of two aligned label volumes at or above which they are one person's anatomy (two
#: different people of the 24-patient phantom: at most 0.90, of the demo's 16: 0.87; one
#: volume ingested twice: 1.0). A deformed copy can pass under it: the filter's label-map
#: check still compares every candidate with every training slice.
SAME_PERSON = 0.97


def anatomy_people(ws: Workspace, path: str | Path, schema: LabelSchema) -> Workspace:
    """The workspace at ``path`` opened as the people of a synthetic-anatomy model (the caller
    closes it): an ingested workspace, not ``ws`` itself, with ``schema``'s labels, at least
    :data:`~pipeline.anatomy.MIN_PATIENTS` patients, and a field of view within 25% of the
    training scans' (a heart drawn at another scale would be painted at the wrong size). One
    line naming the path otherwise."""
    from pipeline.anatomy import MIN_PATIENTS
    from pipeline.workspace import open_workspace

    root = Path(path)
    if root.exists() and root.resolve() == ws.root.resolve():
        raise PipelineError(
            "--anatomy-from is this workspace: its patients are the ones to keep out of the "
            "release's anatomy; give a workspace of label volumes from outside the training set",
            path=root,
        )
    people = open_workspace(root, create=False)
    try:
        theirs = people.label_schema()
        if theirs is None or theirs.names != schema.names:
            found = "no labels" if theirs is None else f"labels {list(theirs.names)}"
            raise PipelineError(
                f"--anatomy-from has {found}, not the run's {list(schema.names)}", path=root
            )
        refs = workspace_refs(people)
        count = len({r.patient for r in refs})
        if count < MIN_PATIENTS:
            raise PipelineError(
                f"--anatomy-from holds {count} patient(s); the anatomy model needs at least "
                f"{MIN_PATIENTS}",
                path=root,
            )
        ours = _field_of_view(ws, workspace_refs(ws, ["train"]))
        other = _field_of_view(people, refs)
        if ours and other and not 0.8 <= other / ours <= 1.25:
            raise PipelineError(
                f"--anatomy-from: its field of view ({other:.0f} mm) is not the training scans' "
                f"({ours:.0f} mm): its hearts would be drawn {other / ours:.2f}× too "
                f"{'small' if other > ours else 'large'}",
                path=root,
            )
    except BaseException:
        people.close()
        raise
    return people


def _field_of_view(ws: Workspace, refs: list[SliceRef]) -> float | None:
    """The median in-plane field of view (mm) of the volumes behind ``refs`` (None: unknown,
    as for PNG slices)."""
    files = {r.cache_file for r in refs}
    with Session(ws.engine) as session:
        rows = session.execute(
            select(Source.cache_file, Source.spacing, Source.size).where(Source.format != "png")
        ).all()
    fov = [spacing[0] * size for f, spacing, size in rows if f in files and spacing]
    return float(np.median(fov)) if fov else None


def _not_our_patients(
    ws: Workspace, people: Workspace, vols: list[np.ndarray], patients: list[str], grid: int
) -> None:
    """One line when a label volume of ``people`` is one of ``ws``'s patients' (any split):
    aligned, the two agree to :data:`SAME_PERSON` Dice."""
    from pipeline.anatomy import align
    from pipeline.membership import mask_similarity

    refs = workspace_refs(ws)
    _, masks = load_slices(ws, refs, grid)
    ours, names, _ = training_volumes(refs, masks, planar_files(ws))
    # 2-D sources are 1-slice volumes: compared as slices, not stretched to a volume's depth
    depth = 1 if all(len(v) == 1 for v in (*vols, *ours)) else AnatomyConfig.depth
    a = np.stack([align(v, depth) for v in vols]).reshape(len(vols), depth * grid, grid)
    b = np.stack([align(v, depth) for v in ours]).reshape(len(ours), depth * grid, grid)
    dice = mask_similarity(a, b, int(max(a.max(), b.max())) + 1)
    i, j = np.unravel_index(int(np.argmax(dice)), dice.shape)
    if dice[i, j] >= SAME_PERSON:
        raise PipelineError(
            f"--anatomy-from holds {patients[i]!r}, whose label volume is this workspace's "
            f"patient {names[j]!r} (Dice {dice[i, j]:.2f}): the release's anatomy would be "
            "theirs",
            path=people.root,
        )


def _write_anatomy_picture(
    model: AnatomyModel, schema: LabelSchema, path: Path, title: str = "real (training)"
) -> None:
    """Four of the model's people (``title``: whose) beside four kept samples, three planes
    each: what the model makes, next to what it learnt from (in the run's folder, beside the
    model)."""
    shell = shell_classes(schema)
    myo, lv = shell if shell else (None, None)
    n = min(4, len(model.train))

    def shown(labels: np.ndarray, body: np.ndarray | None) -> np.ndarray:
        # the body, where it is not a structure, in the picture's body grey
        return labels if body is None else np.where((labels == 0) & body, BODY_VALUE, labels)

    try:
        samples = []
        for i in range(n):
            s = sample_anatomy(model, [0, i, 24], myo=myo, lv=lv)
            samples.append(shown(s.labels, model.body_of(s.maps, s.labels)))
    except PipelineError:
        samples = []  # the batch will say so, one line, when it draws
    real = [
        shown(t, model.bodies[j] > 0 if model.has_body else None)
        for j, t in enumerate(model.train[:n])
    ]
    rows = [(title, real)]
    if samples:
        rows.append(("synthetic", samples))
    picture = planes_picture(rows)
    atomic_write(path, lambda tmp: Image.fromarray(picture).save(tmp))


#: Training volumes the noise model is fitted on at most (spread over the split): enough for
#: thousands of adjacent-slice differences, few enough to paint in seconds at 256².
NOISE_VOLUMES = 8
#: Seed stream of the per-candidate noise (beside the anatomy's and the deformations').
NOISE_STREAM = 26


def noise_model(ws: Workspace, run: TrainedRun, generator: Any) -> tuple[NoiseModel, Path]:
    """The run's scanner-noise model (:mod:`pipeline.noise`), fitted once on up to
    :data:`NOISE_VOLUMES` training volumes painted by ``generator`` from their own label maps,
    and kept in the run's folder (``noise-<key>.json``, keyed by generator and training
    slices). One line when the sources are 2-D slices, which have no neighbours to fit it on."""
    size, k = run.model.size, run.model.neighbours
    refs, planar = workspace_refs(ws, ["train"]), planar_files(ws)
    runs: list[list[int]] = []
    for group in volume_rows(refs, planar):
        if refs[group[0]].cache_file in planar:
            continue
        # a volume's kept slices may skip a z (too little foreground): contiguous runs only
        start = 0
        for j in range(1, len(group) + 1):
            if j == len(group) or refs[group[j]].z != refs[group[j - 1]].z + 1:
                if j - start >= 2:
                    runs.append(group[start:j])
                start = j
    if not runs:
        raise PipelineError(
            "scanner noise is fitted on neighbouring slices of training volumes; this "
            "workspace's training sources are 2-D slices (use --noise off)"
        )
    runs.sort(key=len, reverse=True)
    picked = sorted(runs[: max(NOISE_VOLUMES, 1)], key=lambda g: refs[g[0]].slice_id)
    key = hashlib.sha256(
        repr((run.generator_sha256, size, [[refs[i].slice_id for i in g] for g in picked])).encode()
    ).hexdigest()[:16]
    path = ws.runs_dir / path_name(run.name, what="run") / f"noise-{key}.json"
    if path.exists():
        return NoiseModel.from_dict(json.loads(path.read_text())), path
    from models.gan import generate_images

    real, painted = [], []
    for group in picked:
        images, masks = load_slices(ws, [refs[i] for i in group], size)
        bodies = body_outlines(images, masks)
        near = volume_neighbours(masks, k) if k else None
        painted.append(
            generate_images(
                generator,
                masks,
                run.model,
                bodies=bodies if run.model.body else None,
                neighbours=near,
            )
        )
        real.append((images, masks, bodies))
    model = fit_noise(real, painted)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(model.to_dict(), indent=2)))
    return model, path


def shell_classes(schema: LabelSchema) -> tuple[int, int] | None:
    """(myocardium, left ventricle) class indices, the anatomy model's wall around a cavity,
    when the schema has both."""
    names = schema.names
    if "myocardium" in names and "left_ventricle" in names:
        return names.index("myocardium"), names.index("left_ventricle")
    return None


def typical_depth(ws: Workspace) -> int:
    """Slices in a typical training volume (the median count of kept slices): how many a
    synthetic volume has, at the typical slice spacing; 1 for 2-D (PNG) sources."""
    refs, planar = workspace_refs(ws, ["train"]), planar_files(ws)
    counts = [len(g) for g in volume_rows(refs, planar) if refs[g[0]].cache_file not in planar]
    return int(np.median(counts)) if counts else 1


def _stacked(labels: np.ndarray, k: int, planar: bool) -> np.ndarray:
    """(Z, 2k, S, S) neighbours of a label volume's slices; a 2-D source's slices stand for
    their own neighbours (as in training, :func:`~pipeline.slices.neighbour_rows`)."""
    if planar:
        return np.repeat(labels[:, None], 2 * k, axis=1)
    return volume_neighbours(labels, k)


@dataclass
class CaseSource:
    """A mask source read as whole cases: ``case(c)`` is case c's slices in z order."""

    case: Callable[[int], list[MaskSpec]]
    depth: Callable[[int], int]  # slices of case c, known without painting it
    available: int | None  # cases there are (None: as many as asked)


def source_cases(
    ws: Workspace,
    cfg: GenerateConfig,
    schema: LabelSchema,
    size: int,
    anatomy: tuple[AnatomyModel, Path] | None = None,
    k: int = 0,
    *,
    grid: bool = False,
) -> CaseSource:
    """``cfg.masks`` (synthetic or heldout) as whole label volumes, each slice a MaskSpec
    with its case, z and (k > 0) its neighbours' maps; ``anatomy`` is the model for
    ``synthetic`` (fitted here when not given), decoded at the training volumes' typical
    slice count, or with ``grid`` at the model's own (where loose slices are drawn from)."""
    spacing = slice_spacings(ws)
    if cfg.masks == "synthetic":
        model, path = anatomy or synthetic_anatomy(ws, cfg, schema, size)
        digest = model.sha256()
        shell = shell_classes(schema)
        myo, lv = shell if shell else (None, None)
        typical = _typical_spacing(spacing, workspace_refs(ws, ["train"]))
        flat = model.shape[1] == 1  # fitted on 2-D slices: a sample is one slice
        depth = model.shape[1] if flat or grid else typical_depth(ws)

        def synthetic(c: int) -> list[MaskSpec]:
            sample = sample_anatomy(model, [cfg.seed, c], myo=myo, lv=lv)
            labels, body = model.place(sample.maps, size, depth=None if grid else depth)
            near = _stacked(labels, k, flat) if k else None
            record = {
                "anatomy_model_sha256": digest,
                "anatomy_model": path.name,
                **({"anatomy_people": OUTSIDE} if cfg.anatomy_from is not None else {}),
                "seed": [cfg.seed, c],
                **sample.record,
                "body": "synthetic" if body is not None else "none",
                "case": c,
                "depth": depth,
            }
            return [
                MaskSpec(
                    labels[z],
                    "synthetic",
                    None,
                    None,
                    typical,
                    {**record, "z": z},
                    None if body is None else body[z],
                    None if near is None else near[z],
                )
                for z in range(depth)
            ]

        return CaseSource(synthetic, lambda _c: depth, None)
    if cfg.masks == "heldout":
        refs = workspace_refs(ws, ["test"])
        if not refs:
            raise PipelineError("the test split is empty: no held-out masks", path=ws.root)
        planar = planar_files(ws)
        groups = volume_rows(refs, planar)
        near_rows = neighbour_rows(refs, k, planar) if k else None
        store = SliceStore(ws.cache_dir, refs)

        def heldout(c: int) -> list[MaskSpec]:
            # the case's masks read once: its neighbours are rows of the same volume
            rows = set(groups[c])
            if near_rows is not None:
                rows |= {int(r) for j in groups[c] for r in near_rows[j] if r >= 0}
            rows = sorted(rows)
            read = store.masks([refs[j].slice_id for j in rows])
            masks = {
                j: m if m.shape[0] == size else resize_mask(m, size)
                for j, m in zip(rows, read, strict=True)
            }
            empty = np.zeros((size, size), np.uint8)
            out = []
            for z, j in enumerate(groups[c]):
                ref = refs[j]
                mask, image = masks[j], store.images([ref.slice_id])[0]
                if image.shape[0] != size:
                    image = resize_image(image, size)
                near = None
                if near_rows is not None:
                    near = np.stack([masks.get(int(r), empty) for r in near_rows[j]])
                record = {"body": "the slice's own", "case": c, "z": z, "depth": len(groups[c])}
                out.append(
                    MaskSpec(
                        mask,
                        "heldout",
                        ref.slice_id,
                        None,
                        spacing[ref.cache_file],
                        record,
                        body_outline(image, mask),
                        near,
                    )
                )
            return out

        return CaseSource(heldout, lambda c: len(groups[c]), len(groups))
    if cfg.masks == "augmented":
        raise PipelineError(
            "--volumes: augmented masks are single deformed training slices, not volumes; "
            "use synthetic or heldout masks"
        )
    raise PipelineError(f"unknown mask source {cfg.masks!r}")


def source_masks(
    ws: Workspace,
    cfg: GenerateConfig,
    schema: LabelSchema,
    size: int,
    anatomy: tuple[AnatomyModel, Path] | None = None,
    k: int = 0,
) -> Callable[[int], MaskSpec]:
    """A function index → MaskSpec for ``cfg.masks`` (synthetic / augmented / heldout), with
    (k > 0) the maps of its neighbouring slices; ``anatomy`` is the model for ``synthetic``
    (fitted here when not given). A synthetic or held-out slice is a slice of its volume."""
    if cfg.masks == "synthetic":
        # a loose slice is drawn from the sample at the model's own slice count, as before
        # volumes existed (the same draws for the same seed)
        cases = source_cases(ws, cfg, schema, size, anatomy, k, grid=True)

        def synthetic(i: int) -> MaskSpec:
            slices = cases.case(i)
            filled = [z for z, spec in enumerate(slices) if spec.mask.any()]
            z = filled[int(np.random.default_rng([cfg.seed, i, 1]).integers(len(filled)))]
            spec = slices[z]
            spec.transform = {
                **{key: v for key, v in spec.transform.items() if key not in ("case", "z")},
                "slice": z,
            }
            return spec

        return synthetic
    if cfg.masks == "augmented":
        spacing = slice_spacings(ws)
        refs = workspace_refs(ws, ["train"])
        store = SliceStore(ws.cache_dir, refs)
        near_rows = neighbour_rows(refs, k, planar_files(ws)) if k else None
        position = {r.slice_id: j for j, r in enumerate(refs)}
        with Session(ws.engine) as session:
            fg = dict(session.execute(select(Slice.id, Slice.foreground)).all())
        pool = [r for r in refs if fg.get(r.slice_id, 0) > 0]
        if not pool:
            raise PipelineError("no training slice has a labelled structure", path=ws.root)

        def augmented(i: int) -> MaskSpec:
            rng = np.random.default_rng([cfg.seed, i])
            for _ in range(20):
                ref = pool[int(rng.integers(len(pool)))]
                src, image = store.masks([ref.slice_id])[0], store.images([ref.slice_id])[0]
                if src.shape[0] != size:
                    src, image = resize_mask(src, size), resize_image(image, size)
                mask, params = deform_mask(
                    src,
                    rng,
                    class_names=schema.names,
                    drop=cfg.drop_structures,
                    alpha=cfg.elastic_alpha,
                    degrees=cfg.degrees,
                    scale=cfg.scale,
                    shift=cfg.shift,
                )
                if mask.any():
                    break
            # the source slice's body, deformed as its label map was: its own outline left
            # unchanged makes near-copies of the source (16 of 24 in a test batch flagged,
            # 10 with the elastic field alone, 0 deformed fully)
            coords = deformation_coords(src.shape, params)
            body = warp_labels(body_outline(image, src).astype(np.uint8), coords) > 0
            near = None
            if near_rows is not None:
                # the neighbours under the same field, without the structures it dropped
                dropped = [schema.names.index(n) for n in params.get("dropped", [])]
                near = []
                for r in near_rows[position[ref.slice_id]]:
                    m = np.zeros_like(src) if r < 0 else store.masks([refs[r].slice_id])[0]
                    m = m if m.shape[0] == size else resize_mask(m, size)
                    near.append(warp_labels(np.where(np.isin(m, dropped), 0, m), coords))
                near = np.stack(near).astype(np.uint8)
            return MaskSpec(
                mask,
                "augmented",
                ref.slice_id,
                None,
                spacing[ref.cache_file],
                {**params, "body": "the source slice's, deformed with its label map"},
                body | (mask > 0),
                near,
            )

        return augmented
    if cfg.masks == "heldout":
        cases = source_cases(ws, cfg, schema, size, anatomy, k)
        flat = [(c, z) for c in range(cases.available or 0) for z in range(cases.depth(c))]
        last: dict[int, list[MaskSpec]] = {}

        def heldout(i: int) -> MaskSpec:
            c, z = flat[i % len(flat)]
            if c not in last:  # slices are asked for in order: keep the one case read
                last.clear()
                last[c] = cases.case(c)
            spec = last[c][z]
            spec.transform = {"body": "the slice's own"}
            return spec

        return heldout
    raise PipelineError(f"unknown mask source {cfg.masks!r}")


def typical_body(ws: Workspace, size: int) -> np.ndarray:
    """The body outline of the typical training slice: the pixels inside the body in more than
    half of the training slices (every person's outline blended: nobody's own). For masks
    that come without a body (a folder of user masks)."""
    images, masks = load_slices(ws, workspace_refs(ws, ["train"]), size)
    if not len(images):
        raise PipelineError("no training slices to take a typical body from", path=ws.root)
    return np.mean(body_outlines(images, masks), axis=0) > 0.5


def _typical_spacing(spacing: dict[str, list[float]], refs: list[SliceRef]) -> list[float]:
    """The median spacing of the training volumes: a synthetic slice is no one's, so it gets
    the spacing a typical training slice has."""
    rows = [spacing[r.cache_file] for r in refs if r.cache_file in spacing]
    if not rows:
        return [1.0, 1.0, 1.0]
    return [float(v) for v in np.median(np.array(rows, float), axis=0)]


def read_user_cases(
    folder: Path, schema: LabelSchema, size: int, k: int = 0
) -> list[list[MaskSpec]]:
    """Masks from a folder, one case per file: PNG (one slice, label values per the run's
    schema) or NIfTI (its axial slices from the first to the last with a structure, in
    radiological view). Any value outside the schema is an error naming the file; other sizes
    are resized by nearest neighbour. With k > 0 each slice carries its neighbours' maps (the
    file's own slices, empty beyond its ends; a PNG slice stands for its own)."""
    files = image_files(folder, what="masks")
    cases: list[list[MaskSpec]] = []
    for f in files:
        png = f.name.lower().endswith(".png")
        if png:
            planes, zooms = read_png(f, mask=True)[None], [1.0, 1.0, 1.0]
        else:
            planes, zooms = read_nifti_slices(f, what="mask")
        try:
            classes = np.stack([schema.to_classes(p) for p in planes])
        except ValueError as exc:
            # generate has no label options: the masks must use the run's own label codes
            advice = " (masks must use the label codes the run was trained on)"
            raise PipelineError(f"{exc}{advice}", path=f) from None
        filled = np.flatnonzero(classes.reshape(len(classes), -1).any(axis=1))
        if not len(filled):
            continue
        factor = max(classes.shape[1:]) / size
        if classes.shape[1:] != (size, size):
            classes = np.stack([resize_mask(c, size) for c in classes])
        spacing = [zooms[0] * factor, zooms[1] * factor, zooms[2]]
        near = _stacked(classes, k, png) if k else None
        cases.append(
            [
                MaskSpec(
                    classes[z],
                    "file",
                    None,
                    f.name if png else f"{f.name}#{z}",
                    spacing,
                    {
                        "case": len(cases),
                        "z": int(z - filled[0]),
                        "depth": int(filled[-1] - filled[0] + 1),
                    },
                    None,
                    None if near is None else near[z],
                )
                for z in range(filled[0], filled[-1] + 1)
            ]
        )
    if not cases:
        raise PipelineError("no mask in this folder has a labelled structure", path=folder)
    return cases


def read_user_masks(folder: Path, schema: LabelSchema, size: int, k: int = 0) -> list[MaskSpec]:
    """Every slice with a structure of :func:`read_user_cases`, as loose slices."""
    out = []
    for case in read_user_cases(folder, schema, size, k):
        for spec in case:
            if spec.mask.any():
                spec.transform = {}
                out.append(spec)
    return out


def generate(ws: Workspace, cfg: GenerateConfig, *, progress: Progress = iter) -> GenerateReport:
    """Generate ``cfg.count`` candidates into ``candidates/<batch>/`` and the catalog."""
    from models.gan import generate_images

    run = find_run(ws, cfg.run)
    model_cfg, schema = run.model, run.schema
    size = model_cfg.size
    units, window = run.units
    notes: list[str] = []
    if units == "display":
        notes.append("sources are display-unit PNGs: candidates are in display units, not HU")
    if len(run.config.get("data", {}).get("windows") or []) > 1:
        notes.append(f"sources use several HU windows; candidates use {window}")
    default = f"{cfg.run}-{cfg.masks if cfg.masks in MASK_SOURCES else 'dir'}"
    name = default if cfg.batch_name is None else cfg.batch_name  # "" is refused, not defaulted
    path_name(name, what="batch")
    folder = ws.candidates_dir / name
    stored: dict[str, Any] = {}
    anatomy = None
    kind = "dir"
    if cfg.anatomy_from is not None and cfg.masks != "synthetic":
        raise PipelineError(
            f"--anatomy-from is the people of the synthetic masks' shape model, not for "
            f"--masks {cfg.masks}",
            path=Path(cfg.anatomy_from),
        )
    if cfg.masks in MASK_SOURCES:
        if cfg.masks == "synthetic":
            anatomy = synthetic_anatomy(ws, cfg, schema, size, body=model_cfg.body)
            model = anatomy[0]
            stored["anatomy_model_sha256"] = model.sha256()
            people = "training patients"
            if cfg.anatomy_from is not None:
                people = f"people {OUTSIDE}"
                stored["anatomy_people"] = {"who": OUTSIDE, "patients": model.config["patients"]}
            notes.append(
                f"anatomy model: {model.config['patients']} {people}, "
                f"{model.config['modes']} modes, {anatomy[1].name}"
            )
            if cfg.anatomy_from is None and model.config["patients"] < FEW_PATIENTS:
                notes.append(
                    f"a shape model of {model.config['patients']} training patients points at "
                    "them (12: mask-share membership AUC 0.64–0.73); --anatomy-from fits it on "
                    "people from outside the training set"
                )
        kind = cfg.masks
    k = model_cfg.neighbours
    cases: CaseSource | None = None
    if cfg.volumes:
        if cfg.masks in MASK_SOURCES:
            cases = source_cases(ws, cfg, schema, size, anatomy, k)
        else:
            user = read_user_cases(Path(cfg.masks), schema, size, k)
            if any((s.file or "").lower().endswith(".png") for c in user for s in c):
                raise PipelineError(
                    "--volumes needs NIfTI label volumes; PNG masks are single slices",
                    path=Path(cfg.masks),
                )
            cases = CaseSource(user.__getitem__, lambda c: len(user[c]), len(user))
            kind = "dir"
        count = cfg.count
        if cases.available is not None and count > cases.available:
            notes.append(f"only {cases.available} volumes: generating {cases.available}")
            count = cases.available
        spec_of = _case_slices(cases, count)
        slices = sum(cases.depth(c) for c in range(count))
    elif cfg.masks in MASK_SOURCES:
        spec_of = source_masks(ws, cfg, schema, size, anatomy, k)
        count = slices = cfg.count
        if cfg.masks == "heldout":
            available = len(workspace_refs(ws, ["test"]))
            if count > available:
                notes.append(f"only {available} held-out masks: generating {available}")
                count = slices = available
    else:
        specs = read_user_masks(Path(cfg.masks), schema, size, k)
        count = slices = min(cfg.count, len(specs))
        if cfg.count > len(specs):
            notes.append(f"{len(specs)} masks in {cfg.masks}: generating {len(specs)}")
        spec_of = specs.__getitem__
        kind = "dir"
    if cfg.noise not in NOISE_CHOICES:
        raise PipelineError(f"noise {cfg.noise!r}: choose one of {', '.join(NOISE_CHOICES)}")
    generator = None
    noise: NoiseModel | None = None
    if cfg.noise == "on" or (cfg.noise == "auto" and cfg.volumes):
        generator = load_generator(run.generator_path, run.generator_sha256)
        try:
            noise, noise_path = noise_model(ws, run, generator)
        except PipelineError:
            if cfg.noise == "on":
                raise
            notes.append("no scanner noise: the training sources are 2-D slices")
        else:
            span = _span(window, units)
            stored["noise_model"] = {**noise.to_dict(), "sd_source_units": noise.sd * span}
            fitted = (
                f"fitted on {noise.volumes} training volumes (adjacent-slice KS "
                f"{noise.ks_without:.3f} → {noise.ks_with:.3f}), {noise_path.name}"
            )
            notes.append(
                f"scanner noise per slice: sd {noise.sd * span:.1f} "
                f"{'HU' if units == 'HU' else 'display units'}, in-plane correlation "
                f"{noise.correlation:.2f} px, {fitted}"
                if noise.sd > 0
                else "scanner noise per slice: none — the run's paintings already differ from "
                f"slice to slice as much as the real ones, {fitted}"
            )
    stored = {**asdict(cfg), **stored, "batch_name": name, "count": count}
    if not cfg.volumes:  # a slice batch's config reads as it did before volumes existed
        stored.pop("volumes")
    if noise is None:  # likewise without noise
        stored.pop("noise")
    if cfg.anatomy_from is None:  # and without people from outside
        stored.pop("anatomy_from")
    with write_session(ws.engine) as session:
        batch = open_batch(
            session,
            name,
            run_id=run.id,
            generator_sha256=run.generator_sha256,
            kind=kind,
            config=stored,
            units=units,
            same=(
                "run",
                "masks",
                "seed",
                "drop_structures",
                "elastic_alpha",
                "degrees",
                "scale",
                "anatomy_model_sha256",
                "volumes",
                "noise_model",
            ),
            folder=folder,
        )
        batch.config = {**batch.config, "count": max(count, batch.config["count"])}
        batch_id = batch.id
        done = {c.index for c in batch.candidates}
    todo = [i for i in range(slices) if i not in done]
    if todo and generator is None:
        generator = load_generator(run.generator_path, run.generator_sha256)
    chunks = [todo[i : i + cfg.batch] for i in range(0, len(todo), cfg.batch)]
    typical: np.ndarray | None = None
    for chunk in progress(chunks):
        specs_chunk = [spec_of(i) for i in chunk]
        masks = np.stack([s.mask for s in specs_chunk])
        bodies = None
        if model_cfg.body:
            for s in specs_chunk:
                if s.body is None:  # a user's mask comes without a body: the typical one
                    if typical is None:
                        typical = typical_body(ws, size)
                    s.body = typical | (s.mask > 0)
                    s.transform = {**s.transform, "body": "typical of the training split"}
            bodies = np.stack([s.body for s in specs_chunk])
        near = np.stack([s.neighbours for s in specs_chunk]) if k else None
        images = generate_images(
            generator, masks, model_cfg, bodies=bodies, neighbours=near, batch=cfg.batch
        )
        rows = []
        for i, spec, image in zip(chunk, specs_chunk, images, strict=True):
            cand = f"cand_{i:05d}"
            if noise is not None:  # each candidate's own draw: (seed, index) alone
                image = add_noise(image, noise, np.random.default_rng([cfg.seed, i, NOISE_STREAM]))
            write_candidate(
                folder, cand, image, spec.mask, spec.spacing, units=units, window=window
            )
            rows.append(
                Candidate(
                    batch_id=batch_id,
                    index=i,
                    name=cand,
                    mask_source=spec.source,
                    source_slice_id=spec.slice_id,
                    mask_file=spec.file,
                    transform=spec.transform,
                    seed=cfg.seed,
                    spacing=spec.spacing,
                )
            )
        with write_session(ws.engine) as session:
            session.add_all(rows)
    write_batch_json(
        folder,
        batch=name,
        run=cfg.run,
        generator_sha256=run.generator_sha256,
        units=units,
        window=window,
        label_schema=run.config["label_schema"],
        config=stored,
    )
    if cfg.volumes:
        write_case_planes(ws, name)
    return GenerateReport(
        name,
        str(folder),
        slices,
        len(todo),
        slices - len(todo),
        units,
        notes,
        count if cfg.volumes else None,
    )


def write_case_planes(ws: Workspace, batch: str) -> list[Path]:
    """``previews/case_NNN_planes.png`` for every case of a volume batch: its axial, coronal and
    sagittal planes through the heart's centre (:func:`pipeline.preview.volume_planes`, the
    batch's picture window, head up), read back from the written slices."""
    folder = ws.candidates_dir / batch
    with Session(ws.engine) as session:
        b = batch_row(session, batch)
        rows = [(c.name, c.transform) for c in b.candidates]
        units = b.units
    window = tuple(read_batch_json(folder)["window"])
    written = []
    for case, members in group_cases([t for _, t in rows]).items():
        read = [read_candidate(folder, rows[i][0], units=units, window=window) for i in members]
        volume = np.stack([r.unit for r in read])
        labels = np.stack([r.mask for r in read])
        picture = volume_planes(
            [(f"case {case}", volume, labels)], storage=window, units=units, tile=192
        )
        written.append(save_png(picture, folder / "previews" / f"case_{case:03d}_planes.png"))
    return written


def _span(window: tuple[float, float], units: str) -> float:
    """[0, 1] storage units → source units: the HU window's width, or 255 display levels."""
    return float(window[1] - window[0]) if units == "HU" else 255.0


def _case_slices(cases: CaseSource, count: int) -> Callable[[int], MaskSpec]:
    """Candidate index → MaskSpec over the first ``count`` cases, slice after slice (case c
    starts where case c − 1 ends; a case is read once while its slices are asked for)."""
    starts = np.cumsum([0] + [cases.depth(c) for c in range(count)])
    held: dict[int, list[MaskSpec]] = {}

    def spec_of(i: int) -> MaskSpec:
        c = int(np.searchsorted(starts, i, side="right")) - 1
        if c not in held:
            held.clear()
            held[c] = cases.case(c)
        return held[c][i - int(starts[c])]

    return spec_of


def add_honeypots(
    ws: Workspace, run: str, count: int, *, seed: int = 0, name: str = "honeypots"
) -> GenerateReport:
    """Known near-copies of training slices (a ±2 px shift plus faint noise: what a memorising
    generator would emit), written like candidates into a batch of kind ``honeypot``. They
    enter reviewers' queues unmarked; whether each reviewer rejects them is their catch rate.
    They are never exported."""
    from pipeline.augment import add_noise, shift

    trained = find_run(ws, run)
    size = trained.model.size
    units, window = trained.units
    refs = workspace_refs(ws, ["train"])
    if not refs:
        raise PipelineError("no training slices to make honeypots from", path=ws.root)
    store = SliceStore(ws.cache_dir, refs)
    spacing = slice_spacings(ws)
    folder = ws.candidates_dir / name
    with write_session(ws.engine) as session:
        batch = open_batch(
            session,
            name,
            run_id=trained.id,
            generator_sha256=trained.generator_sha256,
            kind="honeypot",
            config={"count": 0, "seed": seed},
            units=units,
        )
        start = len(batch.candidates)
        batch.config = {**batch.config, "count": start + count}
        batch_id = batch.id
    rng = np.random.default_rng([seed, start])
    rows = []
    for i in range(start, start + count):
        ref = refs[int(rng.integers(len(refs)))]
        image, mask = store.images([ref.slice_id])[0], store.masks([ref.slice_id])[0]
        if image.shape[0] != size:
            image, mask = resize_image(image, size), resize_mask(mask, size)
        dy, dx = (int(v) for v in rng.integers(-2, 3, 2))
        near_copy = add_noise(shift(image, dy, dx), 0.01, rng)
        mask = shift(mask, dy, dx) if mask.any() else mask
        cand = f"cand_{i:05d}"
        write_candidate(
            folder, cand, near_copy, mask, spacing[ref.cache_file], units=units, window=window
        )
        rows.append(
            Candidate(
                batch_id=batch_id,
                index=i,
                name=cand,
                mask_source="honeypot",
                source_slice_id=ref.slice_id,
                transform={"honeypot": {"shift": [dy, dx], "noise_sigma": 0.01}},
                seed=seed,
                spacing=spacing[ref.cache_file],
            )
        )
    with write_session(ws.engine) as session:
        session.add_all(rows)
    write_batch_json(
        folder,
        batch=name,
        run=run,
        generator_sha256=trained.generator_sha256,
        units=units,
        window=window,
        label_schema=trained.config["label_schema"],
        honeypot=True,
    )
    return GenerateReport(name, str(folder), start + count, count, start, units, [])
