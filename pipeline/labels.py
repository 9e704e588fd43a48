"""Label schemas: which source label values mean which structure, and their class indices."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

#: MM-WHS codes (Zhuang & Shen 2016) for the seven cardiac structures.
MMWHS_LABELS: dict[str, int] = {
    "background": 0,
    "myocardium": 205,
    "left_atrium": 420,
    "left_ventricle": 500,
    "right_atrium": 550,
    "right_ventricle": 600,
    "aorta": 820,
    "pulmonary_artery": 850,
}


@dataclass(frozen=True)
class LabelSchema:
    """Ordered structures with their source values; class index = position (0 is background)."""

    names: tuple[str, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.values):
            raise PipelineError("label schema has different numbers of names and values")
        if len(set(self.values)) != len(self.values):
            raise PipelineError("label schema maps two names to the same value")
        if len(set(self.names)) != len(self.names):
            raise PipelineError("label schema repeats a name")
        if len(self.names) > 255:
            raise PipelineError("label schema has more than 255 classes")
        if 0 not in self.values:
            raise PipelineError("label schema has no background value 0")
        if self.values[0] != 0:
            raise PipelineError("label schema must list background (value 0) first")

    @classmethod
    def from_mapping(cls, mapping: dict[str, int]) -> LabelSchema:
        """Build from name → value, ordered by value (so background, value 0, is class 0)."""
        items = sorted(mapping.items(), key=lambda kv: kv[1])
        return cls(tuple(k for k, _ in items), tuple(int(v) for _, v in items))

    @classmethod
    def mmwhs(cls) -> LabelSchema:
        """The default MM-WHS schema (8 classes)."""
        return cls.from_mapping(MMWHS_LABELS)

    @classmethod
    def from_json_file(cls, path: Path) -> LabelSchema:
        """Read a ``labels.json`` (name → integer value), or nnU-Net's ``dataset.json`` labels."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PipelineError("label file not found", path=path) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PipelineError(f"not a readable JSON label file ({exc})", path=path) from None
        if isinstance(data, dict) and isinstance(data.get("labels"), dict):
            data = data["labels"]
        if not isinstance(data, dict) or not data:
            raise PipelineError("expected a JSON object mapping label names to values", path=path)
        mapping: dict[str, int] = {}
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PipelineError(
                    f"label {name!r} has value {value!r}; expected a non-negative integer "
                    "(region-based labels are not supported)",
                    path=path,
                )
            mapping[str(name)] = value
        try:
            return cls.from_mapping(mapping)
        except PipelineError as exc:
            raise PipelineError(exc.message, path=path) from None

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.names)

    def to_dict(self) -> dict[str, int]:
        """Name → source value, in class order."""
        return dict(zip(self.names, self.values, strict=True))

    def to_json(self) -> str:
        """Stable JSON text for the catalog."""
        return json.dumps(self.to_dict())

    def check_values(self, values: np.ndarray, *, ignore_unknown: bool = False) -> None:
        """Raise ``ValueError`` naming the values not in the schema, unless ``ignore_unknown``."""
        unknown = [int(v) for v in values if int(v) not in self.values]
        if unknown and not ignore_unknown:
            shown = ", ".join(str(v) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise ValueError(f"label values {shown} are not in the schema {self.to_dict()}")

    def to_classes(self, labels: np.ndarray, *, ignore_unknown: bool = False) -> np.ndarray:
        """Map source label values to class indices (uint8).

        Raises ``ValueError`` for non-integer values, and for values outside the schema unless
        ``ignore_unknown``, in which case they become background.
        """
        labels = np.asarray(labels)
        if labels.size == 0:
            return np.zeros(labels.shape, dtype=np.uint8)
        if labels.dtype.kind == "f":
            if not np.isfinite(labels).all():
                raise ValueError("non-finite label values (NaN or infinity)")
            rounded = np.rint(labels)
            if not np.array_equal(rounded, labels):
                bad = labels[rounded != labels]
                raise ValueError(f"non-integer label values (e.g. {float(bad.flat[0]):g})")
            labels = rounded.astype(np.int64)
        elif labels.dtype.kind == "b":
            labels = labels.astype(np.uint8)
        elif labels.dtype.kind not in "iu":
            raise ValueError(f"label data of type {labels.dtype} is not integer")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > (1 << 24):
            outside = labels[(labels < 0) | (labels > max(self.values))]
            self.check_values(np.unique(outside), ignore_unknown=ignore_unknown)
            labels = np.where((labels < 0) | (labels > max(self.values)), 0, labels)
            hi = max(self.values)
        # One table lookup per voxel; _UNKNOWN marks values outside the schema.
        lut = np.full(max(hi, max(self.values)) + 1, _UNKNOWN, dtype=np.uint8)
        for index, value in enumerate(self.values):
            lut[value] = index
        out = lut[labels]
        unknown = out == _UNKNOWN
        if unknown.any():
            self.check_values(np.unique(labels[unknown]), ignore_unknown=ignore_unknown)
            out[unknown] = 0
        return out


_UNKNOWN = 255  # schemas have at most 255 classes
