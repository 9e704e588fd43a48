"""Results in words: the index build, the evaluation and the gate table.

One renderer per kind of result, shared by the CLI (plain text) and the datasheet (Markdown), so
a figure reads the same wherever it is shown. Pure: dicts in, strings out.
"""

from __future__ import annotations

from typing import Any

from pipeline.privacy import Calibration


def describe_index(manifest: dict[str, Any]) -> str:
    """An index build: what is indexed, the threshold with what it promises, and in one line
    each, a baseline too small for the quantile and the planted kinds it misses."""
    cal = Calibration.from_manifest(manifest["calibration"])
    lines = [
        f"indexed {manifest['count']} slices ({manifest['embedder']}, {manifest['dim']}-d, "
        f"{manifest['index']['type']}; {manifest['reused_embeddings']} embeddings reused)",
        f"too similar: {cal.describe()} ({cal.provenance()})",
    ]
    if cal.note:
        lines.append(f"note: {cal.note}")
    if cal.indistinct:
        kinds = ", ".join(f"{k} ({cal.planted_recall[k]:.0%})" for k in cal.indistinct)
        lines.append(f"planted copies not told apart from a different person here: {kinds}")
    m = manifest.get("mask_check")
    if m and m.get("explicit"):
        lines.append(
            f"label maps: near-copy if centred Dice > {m['threshold']:.3f} (hand-set by "
            f"{m['set_by']} at {m['set_at']}, not calibrated)"
        )
    elif m:
        lines.append(
            f"label maps: near-copy if centred Dice > {m['threshold']:.3f} (different people "
            f"median {m['baseline_median']:.2f}, deformed copies {m['copies_median']:.2f}; "
            f"copies told apart {m['copy_recall']:.0%}"
            + ("; not told apart here: the check flags only closer maps" if m["indistinct"] else "")
            + ")"
        )
    return "\n".join(lines)


def describe_privacy(privacy: dict[str, Any]) -> str:
    """A batch's privacy verdict, e.g. ``7 of 64 flagged too similar (SSIM > 0.55 ...)``."""
    rule = Calibration.from_manifest(privacy).describe()
    text = f"{privacy['flagged']} of {privacy['count']} flagged too similar ({rule})"
    masks = privacy.get("masks")
    if masks and masks.get("checked"):
        text += (
            f"; label maps: {masks['flagged']} near-copies of a source map (centred Dice > "
            f"{masks['threshold']:.3f}"
            + (", hand-set, not calibrated" if masks.get("explicit") else "")
            + (
                f"; deformed copies told apart from a different person only "
                f"{masks['copy_recall']:.0%} of the time here"
                if masks["indistinct"]
                else ""
            )
            + ")"
        )
    elif masks:
        text += f"; label maps not checked: {masks['note']}"
    m = privacy.get("memorisation")
    if m:
        if m.get("p_value") is None:
            read = m.get("note", "not testable")
        elif "chance_share" in m:
            read = (
                f"balanced share {m['share_closer_to_training']:.0%}, chance "
                f"{m['chance_share']:.0%} of candidates; patient permutation "
                f"p = {m['p_value']:.3g}"
            )
        else:  # a batch filtered before the patient-level test
            read = f"{m['share_closer_to_training']:.0%}, binomial p = {m['p_value']:.3g}"
        text += (
            f"; memorisation audit: {m['closer_to_training']} of {m['candidates']} nearest a "
            f"training patient's slice ({read}; {m['reference_slices_each']} slices each"
            + (
                # not "expected": the anatomy itself then points at the training patients,
                # which is the leak the membership audit gates (issue 24)
                "; the masks are deformed training slices: their anatomy points at the "
                "training patients"
                if m.get("masks_from_training")
                else ""
            )
            + ")"
        )
    return text


def metrics_lines(
    paired: dict[str, Any],
    distribution: dict[str, Any],
    heart: dict[str, Any] | None = None,
    utility: dict[str, Any] | None = None,
    membership: dict[str, Any] | None = None,
    through_plane: dict[str, Any] | None = None,
) -> list[str]:
    """The evaluation figures: the heart region's fidelity and contrast, whole-slice paired
    fidelity, per-structure error, each distribution number named by its feature space, the
    membership audit and (volume batches) the through-plane figures."""
    p, d = paired, distribution
    lines = []
    if heart:
        lines.append(
            f"heart region on {p['n']} held-out slices: SSIM {heart['ssim']['mean']:.3f} "
            f"(median {heart['ssim']['median']:.3f}; {heart['region']})"
        )
        c = heart["contrast_over_myocardium"]
        if c["ratio"]:
            ci = c.get("ratio_ci95", {})
            per = ", ".join(
                f"{k} {c['synthetic'][k]:.0f} vs {c['real'][k]:.0f} ({v:.0%}"
                + (f", {ratio_interval_text(ci[k])}" if k in ci else "")
                + ")"
                for k, v in c["ratio"].items()
            )
            lines.append(
                f"contrast over myocardium ({heart['units']}), synthetic vs real "
                f"(ratio, 95% bootstrap interval over images): {per}"
            )
        if heart["wasserstein"]:
            per = ", ".join(f"{k} {v:.0f}" for k, v in heart["wasserstein"].items())
            lines.append(f"intensity distance per structure (W1, {heart['units']}): {per}")
    if utility:
        lines += utility_lines(utility)
    if membership:
        lines.append(membership_line(membership))
    lines.append(
        f"whole slices: SSIM {p['ssim']['mean']:.3f} "
        f"(median {p['ssim']['median']:.3f}), PSNR {p['psnr_db']['mean']:.1f} dB, "
        f"MAE {p['mae_unit']['mean']:.4f} (of the [0, 1] range)"
    )
    key = next((k for k in p if k.startswith("structure_mae_")), None)
    if key is not None:
        unit = "HU" if key.endswith("hu") else "display units"
        per = ", ".join(f"{k} {v:.0f}" for k, v in p[key].items() if v is not None)
        lines.append(f"mean |error| inside structures ({unit}): {per}")
    lines.extend(distribution_lines(d))
    if "fid_inception_v3" in d:
        lines.append(f"[InceptionV3 pool3] FID {d['fid_inception_v3']:.2f}")
    if through_plane:
        lines.extend(through_plane_lines(through_plane, space=d["feature_space"]))
    return lines


def through_plane_lines(tp: dict[str, Any], *, space: str = "") -> list[str]:
    """A volume batch's through-plane figures, each beside its size-matched real-vs-real
    baseline: adjacent-slice agreement inside the body and per structure, the Fréchet ratio
    per plane, and the off-plane/axial ratios."""
    adj, planes = tp["adjacent"], tp["planes"]
    unit = "HU" if tp["units"] == "HU" else "display units"
    lines = [
        f"through the plane: {tp['volumes_synthetic']} synthetic vs {tp['volumes_real']} real "
        f"held-out volumes ({adj['n_matched']} vs {adj['n_matched']} per split against the same "
        f"real reference, {adj['baseline_split']}; means over {adj['repeats']} splits, 95% "
        "ranges):"
    ]
    regions = adj["regions"]
    body = regions.get("body")
    if body:
        lines.append(
            f"  adjacent-slice |Δ| inside the body: KS {body['ks']:.3f} "
            f"({_interval(body['ks_ci95'], '.3f')}) vs real {body['ks_base']:.3f} "
            f"({_interval(body['ks_base_ci95'], '.3f')}); W1 {body['w1']:.1f} vs real "
            f"{body['w1_base']:.1f} {unit}; median {body['median_synthetic']:.1f} vs "
            f"{body['median_real']:.1f} {unit}"
        )
    per = ", ".join(
        f"{k} {v['ks']:.2f} vs {v['ks_base']:.2f}" for k, v in regions.items() if k != "body"
    )
    if per:
        lines.append(f"  adjacent-slice KS per structure, synthetic vs real: {per}")
    per_plane = planes["planes"]
    lines.append(
        f"  [{space}] Fréchet ratio per plane (over its own real-vs-real baseline): "
        + ", ".join(
            f"{n} {v['frechet_ratio']:.2f} ({_interval(v['frechet_ratio_ci95'])})"
            for n, v in per_plane.items()
        )
    )
    ratio = planes["off_plane_over_axial"]
    lines.append(
        "  off-plane/axial (plane ratios): "
        + ", ".join(f"{n} {v:.2f}" for n, v in ratio["vs_baseline"].items())
        + " (raw Fréchet distances, MAISI's form: "
        + ", ".join(f"{n} {v:.2f}" for n, v in ratio["raw"].items())
        + ")"
    )
    return lines


def ratio_interval_text(ci: tuple[float, float] | list[float] | None) -> str:
    """A contrast ratio's interval as "lo%–hi%", or why it has none."""
    return _interval(ci, ".0%", missing="the real contrast's own interval reaches 0")


def distribution_lines(d: dict[str, Any]) -> list[str]:
    """The distribution figures, each beside its real-vs-real baseline of the same size (old
    reports, from before the size-matched baseline: as they were printed then)."""
    space = d["feature_space"]
    if "frechet_baseline_real_halves" in d:  # before the size-matched baseline
        return [
            f"[{space}] Fréchet distance {d['frechet_distance']:.4g} vs real-vs-real "
            f"{d['frechet_baseline_real_halves']:.4g} (ratio {d['frechet_ratio']:.2f}; "
            f"{d['n_candidates']} candidates, {d['n_real']} real; not size-matched)"
        ]
    n, reps = d["n_matched"], d["repeats"]
    vols = d.get("volumes_matched")
    who = "other patients"
    if vols:
        k = str(vols[0]) if vols[0] == vols[1] else f"{vols[0]}–{vols[1]}"
        who = f"{k} other patients, slices of as many synthetic volumes"
    lines = [
        f"[{space}] {n} candidates vs {n} real held-out slices of {who}, each against "
        f"the same real reference ({d['baseline_split']}; means over {reps} splits, 95% ranges):",
        f"  Fréchet distance {d['frechet_distance']:.4g} ({_interval(d['frechet_ci95'], '.4g')})"
        f" vs real {d['frechet_baseline']:.4g} ({_interval(d['frechet_baseline_ci95'], '.4g')}):"
        f" ratio {d['frechet_ratio']:.2f} ({_interval(d['frechet_ratio_ci95'])})",
        f"  KID {d['kid']:.4g} ({_interval(d['kid_ci95'], '.4g')}) vs real "
        f"{d['kid_baseline']:.4g} ({_interval(d['kid_baseline_ci95'], '.4g')}) (unbiased: "
        "0 when alike; no ratio, its baseline is near 0)",
    ]
    m, b = d.get("prdc_k5"), d.get("prdc_k5_baseline")
    if m and b:
        lines.append(
            "  PRDC (k=5) synthetic vs real: "
            + ", ".join(f"{f} {m[f]:.3f} vs {b[f]:.3f}" for f in m)
        )
    return lines


def _interval(
    ci: tuple[float, float] | list[float] | None,
    fmt: str = ".2f",
    *,
    missing: str = "the real arm is at zero too often",
) -> str:
    """``[lo, hi]`` as "lo–hi", or why there is none (``missing``: a denominator near zero)."""
    if ci is None:
        return f"no interval: {missing}"
    return f"{ci[0]:{fmt}}–{ci[1]:{fmt}}"


def membership_line(m: dict[str, Any]) -> str:
    """The membership audit in one line: each statistic's AUC (95% interval, permutation p),
    the joint p of the largest and how large chance alone makes it (one time in 20); or why
    it could not run."""
    if not m.get("testable"):
        return m["note"]
    per = "; ".join(
        f"{name.replace('_', ' ')} {s['auc']:.2f} ({s['ci95'][0]:.2f}–{s['ci95'][1]:.2f}, "
        f"p {s['p_value']:.3f})"
        for name, s in m["statistics"].items()
    )
    pts = m["patients"]
    return (
        f"membership audit ({pts['training']} training vs {pts['held_out']} held-out patients, "
        f"{m['candidates']} unflagged candidates; AUC, 95% interval, permutation p): {per}; "
        f"largest {m['max_auc']:.2f}, joint p {m['joint_p_value']:.3f}"
        + (
            f" (chance alone reaches {m['max_auc_chance_q95']:.2f} one time in 20)"
            if "max_auc_chance_q95" in m
            else ""
        )
    )


def utility_lines(u: dict[str, Any]) -> list[str]:
    """The utility study in words: each arm's Dice (mean ± seed sd, 95% interval, per seed),
    TSTR/TRTR with its interval and per-seed ratios, and per-structure Dice with intervals."""
    a = u["arms"]
    per = ", ".join(
        f"{arm} {a[arm]['dice_mean']:.3f} ± {a[arm]['dice_sd']:.3f} "
        f"({_interval(a[arm].get('dice_interval'), '.3f')})"
        for arm in a
    )
    seeds = ", ".join("–" if r is None else f"{r:.2f}" for r in u.get("tstr_trtr_per_seed", []))
    patients = u.get("real_patients_seen")
    saw = f"; the real arm saw {patients} patients" if patients is not None else ""
    lines = [
        f"segmenter Dice on {u['n_test']} real held-out slices of {u.get('test_patients', '?')} "
        f"patients ({u['seeds']} paired seeds, {u['n_train']} distinct training images per "
        f"arm{saw}), mean ± sd over seeds (95% interval over seeds and patients): {per}",
        f"TSTR/TRTR {u['tstr_trtr']:.2f} (95% interval {_interval(u.get('tstr_trtr_interval'))}; "
        f"per seed {seeds}), "
        + (
            "no real+synthetic arm"
            if u.get("augmentation_gain") is None
            else f"augmentation gain {u['augmentation_gain']:+.3f}"
        ),
    ]
    for arm in ("synthetic", "real"):
        structures = a[arm]["per_structure"]
        if structures:
            per = ", ".join(
                f"{k} {v['dice']:.2f} ({_interval(v['interval'])})"
                if isinstance(v, dict)
                else f"{k} {v:.2f}"  # a report written before intervals existed
                for k, v in structures.items()
            )
            lines.append(f"Dice per structure, trained on {arm}: {per}")
    return lines


def _gate_cells(g: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """(gate, value, comparison, threshold, verdict) of one gate result."""
    space = f" [{g['feature_space']}]" if "feature_space" in g else ""
    space += f" ({g['reads']})" if "reads" in g else ""
    low = g["gate"].startswith("min")
    holds = g["value"] >= g["threshold"] if low else g["value"] <= g["threshold"]
    sign = ("≥" if low else "≤") if holds else ("<" if low else ">")
    verdict = "pass" if g["passed"] else "FAIL"
    # a bound crossed by no more than chance explains passes: the line says so
    chance = ": within chance" if g["passed"] and not holds else ""
    if "joint_p" in g:
        verdict += f" (joint p {g['joint_p']:.3f}{chance})"
    elif "p_value" in g:
        verdict += f" (p {g['p_value']:.3g}{chance})"
    return f"{g['gate']}{space}", f"{g['value']:.4f}", sign, str(g["threshold"]), verdict


def gate_table(gates: dict[str, list[dict[str, Any]]], *, markdown: bool) -> list[str]:
    """The gate results of one or more batches (name → results): a Markdown table, or text
    lines ``gate NAME: value ≥ threshold → pass`` (the batch name prefixed when several)."""
    if markdown:
        rows = ["| batch | gate | value | threshold | result |", "|---|---|---:|---:|---|"]
        for batch, results in gates.items():
            for g in results:
                name, value, sign, threshold, verdict = _gate_cells(g)
                rows.append(f"| {batch} | {name} | {value} | {sign} {threshold} | {verdict} |")
        return rows
    lines = []
    for batch, results in gates.items():
        prefix = f"{batch}: " if len(gates) > 1 else ""
        for g in results:
            name, value, sign, threshold, verdict = _gate_cells(g)
            lines.append(f"{prefix}gate {name}: {value} {sign} {threshold} → {verdict}")
    return lines


def describe_evaluation(report: dict[str, Any]) -> str:
    """The evaluation summary: paired fidelity, distribution (named by feature space), privacy,
    gates and where the report is."""
    head = f"run {report['run']}" + (f", batch {report['batch']}" if report["batch"] else "")
    figures = metrics_lines(
        report["paired"],
        report["distribution"],
        report.get("heart"),
        report.get("utility"),
        report.get("membership"),
        report.get("through_plane"),
    )
    lines = [head, *(f"  {x}" for x in figures)]
    if report["privacy"]:
        lines.append(f"  privacy: {describe_privacy(report['privacy'])}")
    table = gate_table(
        {report["batch"] or report["run"]: report["gates"]["results"]}, markdown=False
    )
    lines += [f"  {x}" for x in table]
    lines.append(
        f"  gates {'passed' if report['gates']['passed'] else 'FAILED'}; "
        f"report: {report['report_dir']}"
    )
    return "\n".join(lines)
