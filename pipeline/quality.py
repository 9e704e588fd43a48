"""`pipeline evaluate`: quality metrics of a run and a candidate batch, the gates, the report.

`evaluate` computes paired fidelity on held-out masks and distribution distances in a named
feature space, judges them with :func:`apply_gates` (pure) and writes a report folder. A batch
must have been through the privacy filter first (``pipeline.filtering.filter_batch``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from pipeline.atomic import atomic_write
from pipeline.candidates import batch_images, batch_row, group_cases
from pipeline.catalog import write_session
from pipeline.errors import PipelineError
from pipeline.membership import STATISTICS, Patients, membership_audit
from pipeline.metrics import (
    adjacent_differences,
    contrast_over,
    contrast_ratio_interval,
    frechet_of_features,
    heart_ssim,
    matched_agreement,
    matched_distribution,
    paired_fidelity,
    plane_distribution,
    structure_intensities,
    wasserstein_1,
)
from pipeline.preprocess import (
    PICTURE_WINDOW,
    body_outlines,
    resize_image,
    unit_scale,
    view_label,
    view_window,
)
from pipeline.preview import overlay, to_uint8, volume_planes
from pipeline.progress import Progress
from pipeline.runs import find_run, load_generator
from pipeline.slices import (
    HELDOUT,
    SliceStore,
    gather_neighbours,
    load_slices,
    neighbour_rows,
    planar_files,
    volume_rows,
    workspace_refs,
)
from pipeline.utility import UtilityConfig, utility_study
from pipeline.workspace import Workspace

FeatureFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GateConfig:
    """Quality gate thresholds (stored with every result) and the feature space."""

    min_heart_ssim: float = 0.5  # mean paired SSIM inside the heart region, held-out masks
    min_heldout_ssim: float | None = None  # the same on whole slices (off: air dominates it)
    # FD(n candidates, real reference) / FD(n real slices of other patients, same reference)
    max_fd_ratio: float = 2.0
    max_flagged_fraction: float = 0.2  # share of the batch flagged too similar
    # the membership audit's largest AUC (training vs held-out patients; pipeline/membership.py)
    max_membership_auc: float = 0.65
    # the memorisation audit's share of candidates closer to training than to held-out
    # patients, for batches whose masks are no training patient's (synthetic, a folder)
    max_memorisation_share: float = 0.6
    features: str = "encoder"  # encoder | pixel
    encoder_steps: int = 300  # when the workspace has no trained encoder yet
    seed: int = 0
    utility: bool = False  # train on synthetic, test on real (needs a batch)
    utility_steps: int = 300  # segmenter steps per arm and seed
    utility_seeds: int = 3
    utility_mixed: bool = True  # the real+synthetic arm too (augmentation gain)
    # Dice(synthetic) / Dice(real), when utility runs: the lower end of its 95% interval
    min_utility_ratio: float = 0.5
    # the yardstick must learn: below this the real arm's Dice says nothing (HOCM, 6 training
    # slices: 0.08), and a ratio of two near-zero numbers would pass or fail by chance
    min_real_dice: float = 0.3


def feature_extractor(
    ws: Workspace, cfg: GateConfig, *, progress: Progress = iter
) -> tuple[FeatureFn, str]:
    """The feature space for distribution metrics, and its name for every report.

    ``encoder``: the project's slice encoder — the index's when it was built with
    ``--embedder encoder``, else one trained once on the training split and kept in
    ``workspace/features/`` (offline, local weights only). ``pixel``: centred 32² thumbnails.
    """
    from pipeline.embed import PixelEmbedder

    if cfg.features == "pixel":
        emb = PixelEmbedder()
        return emb.embed, "pixel-32x32"
    if cfg.features != "encoder":
        raise PipelineError(f"unknown feature space {cfg.features!r}; use encoder or pixel")
    from pipeline.encoder import CONFIG, WEIGHTS, EncoderEmbedder, train_encoder

    folder = next((f for f in (ws.index_dir, ws.root / "features") if (f / CONFIG).exists()), None)
    if folder is None:
        folder = ws.root / "features"
        refs = workspace_refs(ws, ["train"])
        train_encoder(
            SliceStore(ws.cache_dir, refs),
            refs,
            folder,
            steps=cfg.encoder_steps,
            seed=cfg.seed,
            progress=progress,
        )
    emb = EncoderEmbedder.load(folder)
    digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()[:12]
    return emb.embed, f"encoder-{emb.dim}d-{digest}"


def _heldout(
    ws: Workspace, size: int, k: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """Held-out images, masks, their patients and (k > 0) each slice's neighbours' maps."""
    refs = workspace_refs(ws, HELDOUT)
    if not refs:
        raise PipelineError("no held-out (val/test) patients to evaluate on", path=ws.root)
    images, masks = load_slices(ws, refs, size)
    near = gather_neighbours(masks, neighbour_rows(refs, k, planar_files(ws))) if k else None
    return images, masks, [r.patient for r in refs], near


@dataclass
class ThroughPlane:
    """Through-plane figures of a volume batch, and what its picture shows."""

    figures: dict[str, Any]
    body_differences: tuple[np.ndarray, np.ndarray]  # pooled |Δ| inside the body: synthetic, real
    examples: list[tuple[str, np.ndarray, np.ndarray]]  # (name, volume, labels) to picture


def through_plane(
    synthetic: list[tuple[np.ndarray, np.ndarray]],
    real: list[tuple[np.ndarray, np.ndarray]],
    patients: list[str],
    features: Callable[[np.ndarray], np.ndarray],
    *,
    class_names: list[str],
    scale: float,
    units: str,
    size: int,
    seed: int = 0,
) -> ThroughPlane:
    """Whether synthetic volumes (images in [0, 1], labels; Z, S, S each) hold together through
    the plane like the real held-out volumes (``patients`` names each real volume's patient):
    adjacent-slice agreement (:func:`~pipeline.metrics.matched_agreement`, ``scale``: [0, 1] →
    source units) and each plane's distribution distance
    (:func:`~pipeline.metrics.plane_distribution`), each beside a size-matched real-vs-real
    baseline; ``units`` (HU or display) names what ``scale`` gives."""

    def differences(vols: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [
            adjacent_differences(v, lab, body_outlines(v, lab), class_names=class_names)
            for v, lab in vols
        ]

    syn_diffs, real_diffs = differences(synthetic), differences(real)
    figures = {
        "volumes_synthetic": len(synthetic),
        "volumes_real": len(real),
        "units": units,
        "adjacent": matched_agreement(syn_diffs, real_diffs, patients, scale=scale, seed=seed),
        "planes": plane_distribution(synthetic, real, patients, features, size=size, seed=seed),
    }
    pooled = tuple(
        np.concatenate([d["body"] for d in ds]) * scale for ds in (syn_diffs, real_diffs)
    )
    examples = [("synthetic", *synthetic[0]), ("real held-out", *real[0])]
    return ThroughPlane(figures, pooled, examples)


def _summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": float("nan"), "median": float("nan"), "min": float("nan")}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min())}


@dataclass(frozen=True)
class GateVerdict:
    """The gates' judgement of one evaluation: each gate's row, and whether all passed."""

    results: list[dict[str, Any]]
    passed: bool

    @property
    def failed(self) -> list[str]:
        """Names of the gates that failed."""
        return [g["gate"] for g in self.results if not g["passed"]]


#: The membership gate fails only when its joint permutation p is below this.
MEMBERSHIP_ALPHA = 0.05


def _gate(cfg: GateConfig, name: str, value: float, **extra: Any) -> dict[str, Any]:
    # each gate is named after its GateConfig threshold; "min_" gates need value ≥ threshold,
    # "max_" gates value ≤ threshold (render shows the same sign from the same prefix)
    threshold = getattr(cfg, name)
    passed = value >= threshold if name.startswith("min_") else value <= threshold
    return {"gate": name, **extra, "value": value, "threshold": threshold, "passed": bool(passed)}


def apply_gates(
    cfg: GateConfig,
    *,
    heart_ssim: float,
    heldout_ssim: float,
    fd_ratio: float,
    feature_space: str,
    flagged_fraction: float | None = None,
    utility_ratio: float | None = None,
    real_dice: float | None = None,
    membership: tuple[float, float] | None = None,
    memorisation: tuple[float, float] | None = None,
) -> GateVerdict:
    """Judge the figures against ``cfg``'s thresholds (the whole-slice SSIM gate only when set,
    the flagged-fraction gate only for a batch, ``flagged_fraction`` not None; the utility
    ratio (the lower bound of its interval) and the real arm's Dice when the utility study
    ran; the membership audit's largest AUC when it could run on a batch; the memorisation
    audit's balanced share and patient-permutation p when the batch's masks are no training
    patient's). Both audit gates fail only beyond chance (p < :data:`MEMBERSHIP_ALPHA`).
    Pure: numbers in, verdict out."""
    results = [_gate(cfg, "min_heart_ssim", heart_ssim)]
    if cfg.min_heldout_ssim is not None:
        results.append(_gate(cfg, "min_heldout_ssim", heldout_ssim))
    results.append(_gate(cfg, "max_fd_ratio", fd_ratio, feature_space=feature_space))
    optional = {
        "max_flagged_fraction": flagged_fraction,
        "min_utility_ratio": utility_ratio,
        "min_real_dice": real_dice,
    }
    reads = {"min_utility_ratio": "lower 95% bound"}
    results += [
        _gate(cfg, name, value, **({"reads": reads[name]} if name in reads else {}))
        for name, value in optional.items()
        if value is not None
    ]
    if membership is not None:
        # The largest of 4 AUCs of a few patients strays far from ½ by chance (12 + 12
        # patients: sd 0.12 per AUC; 7 + 3: 0.21), so an AUC over the bound fails the gate only
        # when the joint permutation test says chance does not explain it.
        largest, joint_p = membership
        what = "largest of 4 AUCs; fails beyond chance, joint p"
        results.append(_beyond_chance(cfg, "max_membership_auc", largest, joint_p, what, "joint_p"))
    if memorisation is not None:
        # masks deformed from training slices put candidates nearer training by construction;
        # on anatomy that is no patient's, "closer to training" is the generator's doing
        share, p = memorisation
        what = "balanced share closer to training; fails beyond chance, patient permutation p"
        results.append(_beyond_chance(cfg, "max_memorisation_share", share, p, what, "p_value"))
    return GateVerdict(results, all(g["passed"] for g in results))


def _beyond_chance(
    cfg: GateConfig, name: str, value: float, p: float, what: str, p_key: str
) -> dict[str, Any]:
    """A gate row that fails only when ``value`` is over its bound *and* ``p`` <
    :data:`MEMBERSHIP_ALPHA`: an audit statistic of few patients strays by chance."""
    row = _gate(cfg, name, value, reads=f"{what} < {MEMBERSHIP_ALPHA}", **{p_key: p})
    row["passed"] = row["passed"] or p >= MEMBERSHIP_ALPHA
    return row


def _memorisation(privacy: dict[str, Any] | None) -> tuple[float, float] | None:
    """The memorisation audit's (share closer to training, p) when it gates: a filtered batch
    whose masks are no real patient's (synthetic or a folder; held-out masks pull candidates
    towards the held-out patients by construction, deformed training ones towards training)."""
    m = (privacy or {}).get("memorisation")
    if not m or m.get("mask_source") not in ("synthetic", "dir") or m.get("p_value") is None:
        return None  # the test could not run (too few patients per group): said, not gated
    return float(m["share_closer_to_training"]), float(m["p_value"])


def heart_figures(
    real: np.ndarray,
    masks: np.ndarray,
    cand: np.ndarray,
    cand_masks: np.ndarray,
    heart: np.ndarray,
    *,
    class_names: list[str],
    units: str,
    window: tuple[float, float],
) -> dict[str, Any]:
    """The heart, judged on its own: paired SSIM inside the heart region (``heart``), and per
    structure the candidates' source-unit intensities against the real held-out slices'
    (Wasserstein-1) and each structure's contrast over the myocardium, real and synthetic."""
    scale = unit_scale(units, window)
    offset = window[0] if units == "HU" else 0.0
    real_v = structure_intensities(real, masks, class_names=class_names, scale=scale, offset=offset)
    fake_v = structure_intensities(
        cand, cand_masks, class_names=class_names, scale=scale, offset=offset
    )
    both = [k for k in real_v if k in fake_v]
    real_c = contrast_over(real_v, "myocardium")
    fake_c = contrast_over(fake_v, "myocardium")
    ratio = {k: fake_c[k] / real_c[k] for k in real_c if k in fake_c and abs(real_c[k]) > 1e-6}
    interval = (
        contrast_ratio_interval(
            real,
            masks,
            cand,
            cand_masks,
            class_names=class_names,
            reference="myocardium",
            scale=scale,
            offset=offset,
        )
        if ratio
        else {}
    )
    return {
        "ssim": _summary(heart),
        "region": "bounding box of all labels + 4 px",
        "units": "HU" if units == "HU" else "display",
        "wasserstein": {k: wasserstein_1(real_v[k], fake_v[k]) for k in both},
        "mean_real": {k: float(np.mean(real_v[k])) for k in both},
        "mean_synthetic": {k: float(np.mean(fake_v[k])) for k in both},
        "contrast_over_myocardium": {
            "real": real_c,
            "synthetic": fake_c,
            "ratio": ratio,
            # percentile bootstrap over whole candidates and real slices (2000 draws, seed 0)
            # (None: the real contrast's own interval reaches 0, so the ratio has none)
            "ratio_ci95": {
                k: None if v is None else list(v) for k, v in interval.items() if k in ratio
            },
        },
        "intensities": {"real": real_v, "synthetic": fake_v},  # for the figure, not stored
    }


def evaluate(
    ws: Workspace,
    run: str,
    cfg: GateConfig,
    *,
    batch: str | None = None,
    inception_weights: Path | None = None,
    progress: Progress = iter,
    utility_progress: Progress = iter,
) -> dict[str, Any]:
    """Quality report of a run (and of a candidate batch, whose gates it stores).

    Paired fidelity: every held-out (val + test) slice's mask through the generator, compared
    with the real slice. Distribution: Fréchet distance, KID and PRDC of the candidates (the
    batch, else the paired generations) in the named feature space, each beside a real-vs-real
    baseline of the same size (:func:`~pipeline.metrics.matched_distribution`).
    """
    from models.gan import generate_images

    trained = find_run(ws, run)
    model_cfg, schema = trained.model, trained.schema
    units, window = trained.units
    scale = unit_scale(units, window)
    real, masks, patients, near = _heldout(ws, model_cfg.size, model_cfg.neighbours)
    generator = load_generator(trained.generator_path, trained.generator_sha256)
    # each held-out slice painted inside its own body (and beside its own neighbours): the
    # pairing compares like with like
    fake = generate_images(
        generator, masks, model_cfg, bodies=body_outlines(real, masks), neighbours=near
    )
    paired = paired_fidelity(real, fake, masks, class_names=list(schema.names), scale=scale)
    heart = heart_ssim(real, fake, masks)

    features, space = feature_extractor(ws, cfg, progress=progress)
    f_real = features(real)
    privacy = None
    if batch is not None:
        _, _, cand, cand_masks = batch_images(ws, batch)
        with Session(ws.engine) as session:
            b = batch_row(session, batch)
            if b.run_id != trained.id:
                raise PipelineError(f"batch {batch!r} was not generated by run {run!r}")
            privacy = b.privacy
            flags = [c.flagged for c in b.candidates]
            cases = (
                [np.array(r) for r in group_cases([c.transform for c in b.candidates]).values()]
                if (b.config or {}).get("volumes")
                else None
            )
        if privacy is None:
            raise PipelineError(
                f"batch {batch!r} has not been through the privacy filter "
                "(run 'pipeline filter --batch')"
            )
    else:
        cand, cand_masks, cases = fake, masks, None
    f_cand = features(cand)
    owner = None  # slices of volumes: matched to real patients volume for volume
    if cases:
        owner = np.zeros(len(cand), int)
        for i, rows in enumerate(cases):
            owner[rows] = i
    distribution: dict[str, Any] = {
        "feature_space": space,
        **matched_distribution(f_cand, f_real, patients, seed=cfg.seed, cases=owner),
        "n_candidates": len(f_cand),
        "n_real": len(f_real),
    }
    if inception_weights is not None:
        distribution["fid_inception_v3"] = inception_fid(real, cand, inception_weights)

    heart_block = heart_figures(
        real, masks, cand, cand_masks, heart, class_names=list(schema.names), units=units,
        window=window,
    )  # fmt: skip
    intensities = heart_block.pop("intensities")
    fraction = None if batch is None else sum(bool(f) for f in flags) / max(len(flags), 1)
    utility = None
    if cfg.utility:
        if batch is None:
            raise PipelineError("--utility judges a candidate batch: pass --batch NAME")
        keep = np.array([not f for f in flags], bool)
        train_refs = workspace_refs(ws, ["train"])
        train_x, train_y = load_slices(ws, train_refs, model_cfg.size)
        try:
            utility = utility_study(
                (cand[keep], cand_masks[keep]),
                (train_x, train_y),
                (real, masks),
                class_names=list(schema.names),
                cfg=UtilityConfig(
                    steps=cfg.utility_steps, seeds=cfg.utility_seeds, mixed=cfg.utility_mixed
                ),
                test_patients=patients,
                real_patients=[r.patient for r in train_refs],
                progress=utility_progress,
            )
        except ValueError as exc:
            raise PipelineError(f"--utility: {exc}") from None
    planes = None
    if cases:
        refs = workspace_refs(ws, HELDOUT)
        groups = [g for g in volume_rows(refs, planar_files(ws)) if len(g) > 1]
        if len(groups) >= 2:  # a real-vs-real baseline needs two volumes
            planes = through_plane(
                [(cand[c], cand_masks[c]) for c in cases],
                [(real[g], masks[g]) for g in groups],
                [refs[g[0]].patient for g in groups],
                features,
                class_names=list(schema.names),
                scale=scale,
                units=units,
                size=model_cfg.size,
                seed=cfg.seed,
            )
    membership = None
    if batch is not None:
        n_classes = len(schema.names)
        membership = _membership(
            ws, (cand, cand_masks), flags, size=model_cfg.size, n_classes=n_classes, cfg=cfg
        )
    verdict = apply_gates(
        cfg,
        heart_ssim=heart_block["ssim"]["mean"],
        heldout_ssim=float(np.mean(paired["ssim"])),
        fd_ratio=distribution["frechet_ratio"],
        feature_space=space,
        flagged_fraction=fraction,
        # the interval's lower bound: a ratio of two noisy means passes on its worst plausible
        # value, so one lucky seed cannot carry the gate
        utility_ratio=None if utility is None else utility["tstr_trtr_lower"],
        real_dice=None if utility is None else utility["arms"]["real"]["dice_mean"],
        membership=(membership["max_auc"], membership["joint_p_value"])
        if membership and membership["testable"]
        else None,
        memorisation=_memorisation(privacy),
    )
    # per-patient scores name patients: they stay in the report folder, never in the catalog's
    # gate record (which a release manifest copies)
    per_patient = (membership or {}).pop("per_patient", None)
    report = {
        "run": run,
        "batch": batch,
        "generator_sha256": trained.generator_sha256,
        "units": units,
        "paired": {
            "n": len(real),
            "masks": "held-out (val + test) slices",
            "ssim": _summary(paired["ssim"]),
            "psnr_db": _summary(paired["psnr"]),
            "mae_unit": _summary(paired["mae"]),
            f"structure_mae_{'hu' if units == 'HU' else 'display'}": paired["structure_mae_units"],
        },
        "heart": heart_block,
        "utility": utility,
        "membership": membership,
        "distribution": distribution,
        "through_plane": None if planes is None else planes.figures,
        "privacy": None if privacy is None else {**privacy, "flagged_fraction": fraction},
        "gates": {"config": asdict(cfg), "results": verdict.results, "passed": verdict.passed},
    }
    out = (ws.candidates_dir / batch / "report") if batch else (ws.runs_dir / run / "evaluation")
    report["report_dir"] = str(out)
    write_report(
        out,
        report,
        real=real,
        fake=fake,
        masks=masks,
        ssim=paired["ssim"],
        heart=heart,
        intensities=intensities,
        view=(units, window),
    )
    if per_patient is not None:
        write_membership(out, membership, per_patient)
    if planes is not None:
        write_through_plane(out, planes, view=(units, window))
    if batch is not None:
        with write_session(ws.engine) as session:
            b = batch_row(session, batch)
            b.gates = report["gates"] | {
                "metrics": {
                    "paired": report["paired"],
                    "heart": heart_block,
                    "utility": utility,
                    "membership": membership,
                    "distribution": distribution,
                    "through_plane": report["through_plane"],
                }
            }
            b.gates_passed = verdict.passed
    return report


def _membership(
    ws: Workspace,
    batch: tuple[np.ndarray, np.ndarray],
    flags: list[bool | None],
    *,
    size: int,
    n_classes: int,
    cfg: GateConfig,
) -> dict[str, Any]:
    """The membership audit of a batch's unflagged candidates (what could be released) against
    every patient of the workspace, training patients as members."""
    refs = workspace_refs(ws)
    images, masks = load_slices(ws, refs, size)
    patients = Patients(
        images, masks, [r.patient for r in refs], {r.patient: r.split == "train" for r in refs}
    )
    keep = np.array([not f for f in flags], bool)
    return membership_audit(
        (batch[0][keep], batch[1][keep]), patients, n_classes=n_classes, seed=cfg.seed
    )


def write_membership(out: Path, audit: dict[str, Any], per_patient: dict[str, Any]) -> None:
    """``membership.json`` (per-patient scores, by patient: stays in the workspace) and
    ``membership.png``: each statistic's per-patient scores, training vs held-out, with its AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "membership.json").write_text(
        json.dumps({**audit, "per_patient": per_patient}, indent=2) + "\n"
    )
    fig, axes = plt.subplots(1, len(STATISTICS), figsize=(3.2 * len(STATISTICS), 3.2))
    rng = np.random.default_rng(0)
    for ax, name in zip(axes, STATISTICS, strict=True):
        for x, member, colour in ((0, True, "#cc3311"), (1, False, "#0077bb")):
            ys = [v[name] for v in per_patient.values() if v["member"] == member]
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(ys)), ys, color=colour, s=22)
        stat = audit["statistics"][name]
        ax.set_xticks([0, 1], ["training", "held out"])
        kind = "Dice" if name.startswith("mask") else "correlation"
        ax.set_ylabel(
            f"best {kind} of any candidate" if name.endswith("best") else f"share nearest ({kind})"
        )
        ax.set_xlim(-0.5, 1.5)
        ax.set_title(
            f"{name.replace('_', ' ')}\nAUC {stat['auc']:.2f} "
            f"({stat['ci95'][0]:.2f}–{stat['ci95'][1]:.2f}), p {stat['p_value']:.3f}",
            fontsize=9,
        )
    fig.suptitle(
        f"Membership audit: does the batch point at its training patients? "
        f"(joint p {audit['joint_p_value']:.3f}"
        + (
            f"; chance alone takes the largest AUC to {audit['max_auc_chance_q95']:.2f}"
            " one time in 20)"
            if "max_auc_chance_q95" in audit
            else ")"
        ),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "membership.png", dpi=110)
    plt.close(fig)


def write_through_plane(
    out: Path, planes: ThroughPlane, *, view: tuple[str, tuple[float, float]]
) -> None:
    """through_plane.png: the adjacent-slice differences inside the body (synthetic vs real),
    each plane's Fréchet ratio over its real-vs-real baseline, and a synthetic and a real
    volume in three planes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units, storage = view
    unit = "HU" if units == "HU" else "display units"
    fig = plt.figure(figsize=(13, 4.2), dpi=100)
    ax_hist, ax_bar, ax_img = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    syn, real = planes.body_differences
    top = float(np.quantile(np.concatenate([syn, real]), 0.99)) if len(syn) + len(real) else 1.0
    bins = np.linspace(0.0, max(top, 1e-6), 40)
    ax_hist.hist(real, bins=bins, density=True, alpha=0.55, color="#3465a4", label="real")
    ax_hist.hist(syn, bins=bins, density=True, alpha=0.55, color="#cc0000", label="synthetic")
    body = planes.figures["adjacent"]["regions"].get("body", {})
    if body:
        ax_hist.set_title(
            f"adjacent slices, inside the body: KS {body['ks']:.3f} (real vs real "
            f"{body['ks_base']:.3f})",
            fontsize=9,
        )
    ax_hist.set(xlabel=f"|v[z+1] − v[z]| ({unit})", ylabel="density")
    ax_hist.legend(fontsize=8)
    per_plane = planes.figures["planes"]["planes"]
    names = list(per_plane)
    ratios = [per_plane[n]["frechet_ratio"] for n in names]
    ci = [
        per_plane[n].get("frechet_ratio_ci95") or [r, r] for n, r in zip(names, ratios, strict=True)
    ]
    err = np.array([[r - c[0] for r, c in zip(ratios, ci, strict=True)],
                    [c[1] - r for r, c in zip(ratios, ci, strict=True)]])  # fmt: skip
    ax_bar.bar(names, ratios, yerr=np.clip(err, 0, None), color="#cc0000", alpha=0.7, capsize=4)
    ax_bar.axhline(1.0, color="#3465a4", ls="--", label="real vs real (size-matched)")
    ax_bar.set(ylabel="Fréchet distance / real-vs-real baseline")
    ax_bar.set_title("distribution distance per plane (95% ranges over splits)", fontsize=9)
    ax_bar.legend(fontsize=8)
    ax_img.imshow(volume_planes(planes.examples, storage=storage, units=units))
    ax_img.set_title("axial | coronal | sagittal (head up)", fontsize=9)
    ax_img.axis("off")
    fig.suptitle("Through the plane: synthetic volumes vs real held-out volumes")
    fig.tight_layout()
    atomic_write(out / "through_plane.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def inception_fid(real: np.ndarray, fake: np.ndarray, weights: Path) -> float:
    """True FID: InceptionV3 pool features from a local weights file (never downloaded)."""
    import keras

    if not Path(weights).is_file():
        raise PipelineError("InceptionV3 weights file not found", path=weights)
    model = keras.applications.InceptionV3(include_top=False, pooling="avg", weights=None)
    try:
        model.load_weights(str(weights))
    except Exception as exc:
        raise PipelineError(f"not InceptionV3 weights ({exc})", path=weights) from None

    def feats(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), 32):
            x = np.stack([resize_image(im, 299) for im in images[i : i + 32]])
            x = np.repeat(x[..., None], 3, axis=-1) * 2.0 - 1.0  # Inception's [-1, 1] input
            out.append(np.asarray(model.predict_on_batch(x)))
        return np.concatenate(out)

    return frechet_of_features(feats(fake), feats(real))


def write_report(
    out: Path,
    report: dict[str, Any],
    *,
    real: np.ndarray,
    fake: np.ndarray,
    masks: np.ndarray,
    ssim: np.ndarray,
    heart: np.ndarray,
    intensities: dict[str, dict[str, np.ndarray]],
    view: tuple[str, tuple[float, float]],
) -> None:
    """metrics.json, ssim_hist.png (whole slice and heart region), intensity_hist.png (each
    structure, real vs synthetic) and examples.png in the cardiac window (a batch's
    privacy_hist.png is the filter's, written by ``pipeline.filtering.filter_batch``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), dpi=100)
    gates = report["gates"]["config"]
    for ax, values, what, gate in (
        (axes[0], heart, "heart region", gates["min_heart_ssim"]),
        (axes[1], ssim, "whole slice", gates["min_heldout_ssim"]),
    ):
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=30, color="#3465a4")
        if gate is not None:
            ax.axvline(gate, color="#cc0000", ls="--", label=f"gate: mean ≥ {gate}")
        if len(v):
            ax.axvline(float(v.mean()), color="black", label=f"mean {v.mean():.3f}")
        ax.set(xlabel=f"SSIM, {what} (generated vs real)", ylabel="held-out slices")
        ax.legend(fontsize=8)
    fig.suptitle(f"Paired fidelity on held-out masks, run {report['run']} (n={len(ssim)})")
    fig.tight_layout()
    atomic_write(out / "ssim_hist.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)

    names = [k for k in intensities["real"] if k in intensities["synthetic"]]
    if names:
        unit = report["heart"]["units"]
        cols = min(4, len(names))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=100)
        axes = np.atleast_1d(axes).ravel()
        for ax, name in zip(axes, names, strict=False):
            r, f = intensities["real"][name], intensities["synthetic"][name]
            bins = np.linspace(min(r.min(), f.min()), max(r.max(), f.max()) + 1e-6, 40)
            ax.hist(r, bins=bins, density=True, alpha=0.55, color="#3465a4", label="real")
            ax.hist(f, bins=bins, density=True, alpha=0.55, color="#cc0000", label="synthetic")
            w1 = report["heart"]["wasserstein"][name]
            ax.set_title(f"{name.replace('_', ' ')} (W1 {w1:.0f} {unit})", fontsize=9)
            ax.set_xlabel(unit, fontsize=8)
            ax.legend(fontsize=7)
        for ax in axes[len(names) :]:
            ax.axis("off")
        fig.suptitle("Intensity inside each structure: real held-out vs synthetic")
        fig.tight_layout()
        atomic_write(out / "intensity_hist.png", lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)

    units, storage = view
    preset = PICTURE_WINDOW if units == "HU" else None
    shown = view_label(units, preset)

    def view(x: np.ndarray) -> np.ndarray:
        return view_window(x, storage=storage, units=units, preset=preset)

    def grey(x: np.ndarray) -> np.ndarray:
        return to_uint8(view(x))

    order = np.argsort(ssim)
    picks = {"best": order[-1], "median": order[len(order) // 2], "worst": order[0]}
    fig, axes = plt.subplots(3, 3, figsize=(9, 9.4), dpi=100)
    for r, (label, idx) in enumerate(picks.items()):
        panels = (
            (overlay(view(real[idx]), masks[idx]), f"{label}: mask on real"),
            (grey(fake[idx]), f"generated (SSIM {ssim[idx]:.3f})"),
            (grey(real[idx]), "real held-out slice"),
        )
        for c, (picture, title) in enumerate(panels):
            axes[r, c].imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes[r, c].set_title(title, fontsize=10)
            axes[r, c].axis("off")
    fig.suptitle(f"Best / median / worst paired examples, run {report['run']} ({shown})")
    fig.tight_layout()
    atomic_write(out / "examples.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
