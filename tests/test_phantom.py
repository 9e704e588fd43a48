import nibabel as nib
import numpy as np

from pipeline.labels import MMWHS_LABELS
from pipeline.phantom import make_volume, write_phantom


def test_same_seed_same_volume_different_seed_different():
    a, b, c = (
        make_volume(7, size=64, n_slices=12),
        make_volume(7, size=64, n_slices=12),
        make_volume(8, size=64, n_slices=12),
    )
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_anatomy_is_plausible():
    vol = make_volume(1, size=128, n_slices=32)
    codes = set(np.unique(vol.labels).tolist())
    assert codes == set(MMWHS_LABELS.values())  # all seven structures and background
    hu, lab = vol.hu.astype(float), vol.labels

    def mean(code):
        inner = lab == code
        return hu[inner].mean()

    assert mean(500) > 250  # contrast-filled LV blood pool
    assert mean(820) > 250
    assert 40 < mean(205) < 200  # myocardium
    assert mean(500) > mean(205) + 150
    body = hu > -500
    assert (hu < -700).sum() > 0.1 * hu.size  # air and lungs
    assert 0.2 < body.mean() < 0.6  # soft tissue and bone of the body, not the whole FOV
    assert hu.max() > 300  # bone


def test_shapes_vary_smoothly_along_z():
    vol = make_volume(2, size=96, n_slices=48)
    fg = vol.labels > 0
    dices = []
    for z in range(fg.shape[0] - 1):
        a, b = fg[z], fg[z + 1]
        if a.any() or b.any():
            dices.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert np.median(dices) > 0.9


def test_write_phantom_files(tmp_path):
    paths = write_phantom(tmp_path, volumes=2, seed=0, size=32, n_slices=8, workers=1)
    assert [p.name for p in paths] == ["ct_0001_image.nii.gz", "ct_0002_image.nii.gz"]
    img = nib.load(paths[0])
    lab = nib.load(tmp_path / "ct_0001_label.nii.gz")
    assert img.get_data_dtype() == np.int16 and img.shape == (32, 32, 8)
    assert np.allclose(img.affine, lab.affine)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert set(np.unique(np.asanyarray(lab.dataobj))) <= set(MMWHS_LABELS.values())
    assert (tmp_path / "preview.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*"))  # no temporary files left
