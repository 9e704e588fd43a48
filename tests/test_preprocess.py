import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.preprocess import (
    DEFAULT_WINDOW,
    display_to_ras,
    fitted_shape,
    ras_to_display,
    resize_image,
    resize_mask,
    resized_spacing,
    unit_to_hu,
    window_to_unit,
)


def test_window_round_trip_back_to_hu():
    hu = np.arange(-2000, 3500, 7, dtype=np.int16)
    unit = window_to_unit(hu)
    assert unit.min() == 0.0 and unit.max() == 1.0
    back = unit_to_hu(unit)
    lo, hi = DEFAULT_WINDOW
    inside = (hu >= lo) & (hu <= hi)
    # float32 over a 3072 HU range: well under 0.01 HU of error
    np.testing.assert_allclose(back[inside], hu[inside], atol=1e-3)
    np.testing.assert_array_equal(back[hu < lo], lo)
    np.testing.assert_array_equal(back[hu > hi], hi)


def test_custom_window_round_trip():
    hu = np.array([-200.0, 0.0, 40.0, 300.0])
    np.testing.assert_allclose(
        unit_to_hu(window_to_unit(hu, (-200, 300)), (-200, 300)), hu, atol=1e-4
    )


@settings(max_examples=60, deadline=None)
@given(
    mask=arrays(
        np.uint8,
        st.tuples(st.integers(3, 70), st.integers(3, 70)),
        elements=st.sampled_from([0, 1, 3, 7]),
    ),
    size=st.integers(8, 96),
)
def test_resize_mask_keeps_only_existing_values(mask, size):
    out = resize_mask(mask, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    assert set(np.unique(out)) <= set(np.unique(mask)) | {0}


def test_resize_image_is_antialiased():
    # A 1-px checkerboard has all its energy at Nyquist: shrinking it must give flat grey,
    # not a moiré or a copy of one phase.
    board = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    small = resize_image(board, 64)
    assert abs(small.mean() - 0.5) < 0.02
    assert small.std() < 0.05


def test_resize_keeps_aspect_and_pads():
    img = np.ones((50, 100), dtype=np.float32)
    out = resize_image(img, 64, fill=0.0)
    rows = np.flatnonzero(out.max(axis=1) > 0.5)
    assert out.shape == (64, 64) and len(rows) == 32
    assert fitted_shape((50, 100), 64) == (32, 64)
    # anisotropic pixels: 100 x 50 pixels of 0.5 x 1 mm are 50 x 50 mm, a square
    assert fitted_shape((100, 50), 64, (0.5, 1.0)) == (64, 64)
    assert resized_spacing((100, 50), 64, (0.5, 1.0)) == 50 / 64


def test_orientation_round_trip():
    vol = np.random.default_rng(0).integers(0, 100, (5, 6, 7))
    disp = ras_to_display(vol)
    assert disp.shape == (7, 6, 5)
    np.testing.assert_array_equal(display_to_ras(disp), vol)
    # row 0 of a display slice is the most anterior (largest y), col 0 patient right (largest x)
    assert disp[2, 0, 0] == vol[4, 5, 2]


def test_body_outline_fills_the_lungs_keeps_the_largest_piece_and_the_heart():
    """The body channel (issue 24): a thorax with dark lungs is one filled piece; a table
    below it is left out; labelled pixels are always inside; a body cut by the frame (a small
    field of view) still has its lungs filled."""
    from scipy import ndimage

    from pipeline.preprocess import body_outline

    yy, xx = np.mgrid[:64, :64]
    image = np.zeros((64, 64), np.float32)
    body = ((yy - 30) / 20) ** 2 + ((xx - 32) / 28) ** 2 < 1
    image[body] = 0.35
    lungs = (((yy - 30) / 12) ** 2 + ((np.abs(xx - 32) - 13) / 8) ** 2) < 1
    image[lungs] = 0.05
    image[58:61, 8:56] = 0.5  # the table, apart from the body
    mask = np.zeros((64, 64), np.uint8)
    mask[5:8, 30:34] = 2  # a label outside what the threshold finds
    out = body_outline(image, mask)
    assert out[lungs].all() and not out[59, 10] and not out[2, 2] and out[6, 31]
    assert np.array_equal(out & ~(mask > 0), ndimage.binary_fill_holes(body))
    # the same thorax cut by the frame on the left: its left lung meets the edge
    cut = body_outline(image[:, 18:])
    assert cut[30, 0:6].all() and not cut[2, 2]
