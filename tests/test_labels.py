import json

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.labels import MMWHS_LABELS, LabelSchema


def test_mmwhs_schema_orders_classes_by_code():
    schema = LabelSchema.mmwhs()
    assert schema.names[0] == "background"
    assert schema.values == (0, 205, 420, 500, 550, 600, 820, 850)
    assert schema.num_classes == 8
    assert schema.to_dict() == dict(sorted(MMWHS_LABELS.items(), key=lambda kv: kv[1]))


def test_to_classes_maps_codes_to_indices():
    schema = LabelSchema.mmwhs()
    labels = np.array([[0, 205, 420], [500, 550, 600], [820, 850, 0]], dtype=np.int16)
    np.testing.assert_array_equal(schema.to_classes(labels), [[0, 1, 2], [3, 4, 5], [6, 7, 0]])


def test_unknown_values_fail_unless_ignored():
    schema = LabelSchema.mmwhs()
    labels = np.array([0, 205, 999, 3], dtype=np.int32)
    with pytest.raises(ValueError, match=r"3, 999 are not in the schema"):
        schema.to_classes(labels)
    np.testing.assert_array_equal(schema.to_classes(labels, ignore_unknown=True), [0, 1, 0, 0])


def test_float_labels_must_be_integral():
    schema = LabelSchema.mmwhs()
    np.testing.assert_array_equal(schema.to_classes(np.array([0.0, 205.0])), [0, 1])
    with pytest.raises(ValueError, match="non-integer"):
        schema.to_classes(np.array([0.0, 204.5]))


def test_label_file_reading(tmp_path):
    good = tmp_path / "labels.json"
    good.write_text(json.dumps({"background": 0, "b": 2, "a": 1}))
    assert LabelSchema.from_json_file(good).names == ("background", "a", "b")
    nnunet = tmp_path / "dataset.json"
    nnunet.write_text(
        json.dumps({"labels": {"background": 0, "heart": 1}, "file_ending": ".nii.gz"})
    )
    assert LabelSchema.from_json_file(nnunet).values == (0, 1)
    bad = tmp_path / "bad.json"
    for text, msg in [
        ("{", "not a readable JSON"),
        ('{"background": 0, "x": 1.5}', "non-negative integer"),
        ('{"x": 1}', "no background"),
        ('{"background": 0, "a": 1, "b": 1}', "same value"),
        ('{"background": 0, "r": [1, 2]}', "region-based"),
    ]:
        bad.write_text(text)
        with pytest.raises(PipelineError, match=msg) as exc:
            LabelSchema.from_json_file(bad)
        assert str(bad) in str(exc.value)
