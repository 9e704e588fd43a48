"""The privacy figure, drawn one way wherever it appears: the index's calibration, a batch's
report and the release bundle.

Per detector (SSIM, texture): the different-person baseline, the planted-copy tail, the images
being judged (when given) and the threshold between the tails. Returns PNG bytes with no
timestamp, so a bundle that embeds it stays byte-identical.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline.privacy import Calibration


def privacy_figure(
    cal: Calibration,
    *,
    title: str,
    ssim: list[float] | None = None,
    texture: list[float] | None = None,
    label: str = "images judged",
) -> bytes:
    """PNG of both tails and the thresholds, with ``ssim``/``texture`` of the judged images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detectors = [("ssim", "SSIM to the nearest source slice", cal.threshold, cal.baseline, ssim)]
    if cal.texture_threshold is not None:
        detectors.append(
            (
                "texture",
                "texture correlation",
                cal.texture_threshold,
                cal.texture_baseline,
                texture,
            )
        )
    fig, axes = plt.subplots(1, len(detectors), figsize=(5.5 * len(detectors), 3.8), dpi=100)
    axes = np.atleast_1d(axes)
    for ax, (key, xlabel, threshold, baseline, judged) in zip(axes, detectors, strict=True):
        bins = np.linspace(-0.2, 1.0, 49)
        copies = [v for kind in cal.planted.values() for v in kind.get(key, [])]
        if baseline:
            ax.hist(baseline, bins=bins, density=True, alpha=0.55, color="#3465a4",
                    label=f"different person (n={len(baseline)})")  # fmt: skip
        if copies:
            ax.hist(copies, bins=bins, density=True, alpha=0.55, color="#cc0000",
                    label=f"planted copies (n={len(copies)})")  # fmt: skip
        values = [v for v in (judged or []) if v is not None]
        if values:
            ax.hist(values, bins=bins, density=True, histtype="step", lw=2, color="#4e9a06",
                    label=f"{label} (n={len(values)})")  # fmt: skip
        ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3f}")
        ax.set(xlabel=xlabel, ylabel="density")
        ax.legend(fontsize=8, loc="upper center")
    who = "a new patient's" if cal.n_patients else "different-person"
    bound = "" if cal.bound is None else f"; {who} flag rate ≤ {cal.bound:.3g}"
    recall = "" if cal.recall is None else f", planted-copy recall {cal.recall:.1%}"
    fig.suptitle(f"{title}: flagged when {cal.describe()}{bound}{recall}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
