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

    def lookup_table(self, max_value: int) -> np.ndarray:
        """Array ``lut`` with ``lut[source_value] = class index``, and -1 for unknown values."""
        lut = np.full(max(max_value, max(self.values)) + 1, -1, dtype=np.int16)
        for index, value in enumerate(self.values):
            lut[value] = index
        return lut

    def to_classes(self, labels: np.ndarray, *, ignore_unknown: bool = False) -> np.ndarray:
        """Map source label values to class indices (uint8).

        Raises ``ValueError`` naming the unknown values unless ``ignore_unknown``, in which case
        they become background.
        """
        if labels.size == 0:
            return labels.astype(np.uint8)
        if labels.dtype.kind == "f":
            rounded = np.rint(labels)
            if not np.array_equal(rounded, labels):
                bad = labels[rounded != labels]
                raise ValueError(f"non-integer label values (e.g. {float(bad.flat[0]):g})")
            labels = rounded
        elif labels.dtype.kind not in "iub":
            raise ValueError(f"label data of type {labels.dtype} is not integer")
        values = np.unique(labels).astype(np.int64)
        unknown = [int(v) for v in values if v < 0 or v not in self.values]
        if unknown and not ignore_unknown:
            shown = ", ".join(str(v) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise ValueError(
                f"label values {shown} are not in the schema {self.to_dict()} "
                "(pass --labels or --ignore-unknown-labels)"
            )
        lut = self.lookup_table(int(values.max()))
        lut[lut < 0] = 0
        idx = labels.astype(np.int64)
        idx = np.where(idx < 0, 0, idx)  # negatives only reach here when ignored
        out = lut[idx]
        if unknown:
            out[labels < 0] = 0
        return out.astype(np.uint8)
