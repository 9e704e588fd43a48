"""The conditional GAN's configuration: a frozen ``GanConfig`` and the named presets.

No Keras or TensorFlow here: the CLI, the catalog and ``--help`` read configs without loading
a deep-learning framework; ``models.gan`` builds models from them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

PRESETS = ("paper", "seed-code", "tiny")
#: Keras dtype policies a model can be built with (variables stay float32 in the mixed ones).
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclass(frozen=True)
class GanConfig:
    """Everything that shapes the models and their optimisation."""

    preset: str = "paper"
    size: int = 256
    num_classes: int = 8  # background + structures
    condition: str = "onehot"  # "onehot" (num_classes channels) or "labelmap" (one channel)
    # one more input channel, the body outline (``pipeline.preprocess.body_outline``): no label
    # map describes the body, and a generator left to guess paints one of its training
    # people's (issue 24). Off in ``seed-code`` (the authors' model) and in runs from before
    body: bool = True
    # 2.5-D conditioning (issue 25): the label maps of the k slices above and below as more
    # input channels, so that neighbouring slices of one volume are painted alike. 0: the
    # paper's 2-D model (``paper``, ``seed-code``, and runs from before)
    neighbours: int = 0
    g_filters: tuple[int, ...] = (64, 128, 256, 512, 512, 512, 512)  # one per stride-2 step
    skips: bool = True
    up_block: str = "paper"  # "paper": transposed conv + conv; "seed-code": see DESIGN.md
    d_filters: tuple[int, ...] = (64, 128, 256, 512, 512)  # one per stride-2 layer
    bn_momentum: float = 0.9
    batch: int = 16  # global
    steps: int = 100_000
    g_lr: float = 1.3e-4
    d_lr: float = 1.3e-4
    beta1: float = 0.5
    # fraction of the steps at the end over which both learning rates fall linearly to 0
    # (pix2pix's schedule); 0 keeps them constant, as the paper and the seed code do
    lr_decay: float = 0.0
    adv_weight: float = 0.012
    l1_weight: float = 1.0
    # L1 weighted inside the structures (``models.gan.structure_weights``): in each example a
    # labelled class counts min(cap, l1_share / its pixel share) times more than elsewhere, so
    # a thin vessel's brightness is learnt, not averaged away by the air and the body around
    # it (demo, 500 steps, paired held-out contrast over the myocardium: pulmonary artery 16% →
    # 70%, aorta 73% → 92%). 0: the plain L1 of the paper and of runs from before
    l1_cap: float = 0.0
    l1_share: float = 0.05
    precision: str = "float32"  # a PRECISIONS policy; outputs and losses are always float32
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Generator stride-2 steps."""
        return len(self.g_filters)

    @property
    def condition_channels(self) -> int:
        """Channels of the generator input."""
        per_map = self.num_classes if self.condition == "onehot" else 1
        return per_map * (1 + 2 * self.neighbours) + int(self.body)

    @property
    def patch_map(self) -> int:
        """Side of the discriminator's output map."""
        return self.size // 2 ** len(self.d_filters)

    def learning_rates(self, step: int) -> tuple[float, float]:
        """(G, D) learning rates at ``step`` (0-based) under the ``lr_decay`` schedule."""
        return self.g_lr * self.lr_factor(step), self.d_lr * self.lr_factor(step)

    def lr_factor(self, step: int) -> float:
        """1 until the last ``lr_decay`` share of the steps, then falling linearly to 0."""
        start = self.steps * (1.0 - self.lr_decay)
        if self.lr_decay <= 0 or step < start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / (self.steps - start))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (for ``runs/<run>/config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> GanConfig:
        """The config stored in a run's ``config.json`` (other keys, such as ``data`` or
        ``train``, are ignored; JSON lists become the tuples they were; a config without
        ``body`` is a run from before the body channel, which has none; one without
        ``neighbours`` is a 2-D run)."""
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        fields.setdefault("body", False)  # a run trained before the body channel existed
        fields.setdefault("neighbours", 0)
        for k in ("g_filters", "d_filters"):
            if k in fields:
                fields[k] = tuple(fields[k])
        return cls(**fields)


def preset(name: str, **overrides: Any) -> GanConfig:
    """A named preset with field overrides; the generator's depth follows the image size.

    ``tiny`` (32–64 px, base width 16) keeps the bottleneck at least 1×1: below 128² seven
    stride-2 steps no longer fit, so depth = min(7, log2(size)).
    """
    if name == "paper":
        cfg = GanConfig()
    elif name == "seed-code":
        cfg = GanConfig(
            preset="seed-code",
            condition="labelmap",
            body=False,
            skips=False,
            up_block="seed-code",
            d_filters=(64, 128, 256, 512),
            bn_momentum=0.8,
            batch=8,
            d_lr=1.5e-4,
            adv_weight=1.0,
            l1_weight=100.0,
        )
    elif name == "tiny":
        cfg = GanConfig(
            preset="tiny",
            size=64,
            g_filters=(16, 32, 64, 128, 128, 128, 128),
            d_filters=(16, 32, 64),
            batch=16,
            steps=1000,
            g_lr=1e-3,
            d_lr=1e-3,
            lr_decay=0.5,
            neighbours=1,
            l1_cap=20.0,
        )
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = replace(cfg, **overrides)
    if cfg.size < 4 or cfg.size & (cfg.size - 1):
        raise ValueError(f"size {cfg.size} must be a power of two ≥ 4")
    depth = min(len(cfg.g_filters), int(math.log2(cfg.size)))
    cfg = replace(cfg, g_filters=tuple(cfg.g_filters[:depth]))
    # "mixed" / "auto" are requests that the training code resolves for the machine
    if cfg.precision not in (*PRECISIONS, "mixed", "auto"):
        raise ValueError(f"precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not 0 <= cfg.neighbours <= 4:
        raise ValueError(f"neighbours {cfg.neighbours} must lie in 0–4 (slices each side)")
    if cfg.l1_cap < 0 or cfg.l1_share <= 0:
        raise ValueError(f"l1_cap {cfg.l1_cap} must be ≥ 0 and l1_share {cfg.l1_share} > 0")
    if not 0.0 <= cfg.lr_decay <= 1.0:
        raise ValueError(f"lr_decay {cfg.lr_decay} must lie in [0, 1]")
    if cfg.size // 2 ** len(cfg.d_filters) < 1:
        raise ValueError(f"{len(cfg.d_filters)} discriminator layers do not fit {cfg.size}²")
    return cfg
