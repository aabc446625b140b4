"""rotate_images: direction and centre convention, accuracy, noise power and round trips."""

import numpy as np
import pytest
import scipy.ndimage as ndi

from cryo_forum.physics.fourier import fourier_crop, fourier_crop_and_filter, rotate_images


def _even_filter(size: int) -> np.ndarray:
    """A real filter m(f) = m(-f) on the unshifted FFT grid (cycles per fine pixel of a 64 px box)."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size) * size / 64, np.fft.fftfreq(size) * size / 64, indexing="ij")
    return np.cos(60 * fx**2 - 35 * fx * fy + 20 * fy**2) + 0.3


@pytest.mark.parametrize("new_size", [24, 25, 64])
def test_crop_and_filter_equals_filtering_at_full_size_then_cropping(new_size):
    images = np.random.default_rng(4).standard_normal((2, 64, 64))
    filtered = np.fft.ifft2(np.fft.fft2(images) * _even_filter(64)).real
    np.testing.assert_allclose(
        fourier_crop_and_filter(images, new_size, _even_filter(new_size)), fourier_crop(filtered, new_size), atol=1e-10
    )
    plain = fourier_crop_and_filter(images, new_size, np.ones((new_size, new_size)))
    np.testing.assert_allclose(plain, fourier_crop(images, new_size), atol=1e-10)


def _blobs(size: int, offsets: list[tuple[float, float]], sigma: float = 1.5) -> np.ndarray:
    """Gaussian blobs at (u, v) = (x, y) offsets from pixel D // 2: smooth, nearly band-limited content."""
    y, x = np.indices((size, size)) - size // 2
    return sum(np.exp(-((x - u) ** 2 + (y - v) ** 2) / (2 * sigma**2)) for u, v in offsets)


def _rotate_offsets(offsets, alpha):
    cos, sin = np.cos(alpha), np.sin(alpha)
    return [(cos * u - sin * v, sin * u + cos * v) for u, v in offsets]


def _inside(size: int, fraction: float = 0.8) -> np.ndarray:
    y, x = np.indices((size, size)) - size // 2
    return np.hypot(x, y) < fraction * size / 2


@pytest.mark.parametrize("size", [32, 33])
@pytest.mark.parametrize("turns", [1, 2, 3, -1])
def test_quarter_turns_move_a_pixel_exactly(size, turns):
    centre = size // 2
    image = np.zeros((size, size))
    u, v = 5, -3  # x = column, y = row offsets from the centre
    image[centre + v, centre + u] = 1.0
    out = rotate_images(image, turns * np.pi / 2)
    cos, sin = round(np.cos(turns * np.pi / 2)), round(np.sin(turns * np.pi / 2))
    expected = np.zeros_like(image)
    expected[centre + sin * u + cos * v, centre + cos * u - sin * v] = 1.0
    np.testing.assert_array_equal(out, expected)


def test_quarter_turn_of_an_odd_image_is_rot90_clockwise_in_array_display():
    image = np.random.default_rng(0).standard_normal((33, 33)).astype(np.float32)
    np.testing.assert_array_equal(rotate_images(image, np.pi / 2), np.rot90(image, -1))
    np.testing.assert_array_equal(rotate_images(image, -np.pi / 2), np.rot90(image, 1))
    np.testing.assert_array_equal(rotate_images(image, np.pi), np.rot90(image, 2))


@pytest.mark.parametrize("degrees", [30.0, -44.0, 45.0, 100.0, -170.0])
@pytest.mark.parametrize("size", [64, 65])
def test_blobs_land_where_the_rotation_puts_them(size, degrees):
    offsets = [(10.0, 0.0), (0.0, -6.0), (-7.0, 12.0), (18.0, 16.0)]
    alpha = np.radians(degrees)
    out = rotate_images(_blobs(size, offsets).astype(np.float32), alpha)
    np.testing.assert_allclose(out, _blobs(size, _rotate_offsets(offsets, alpha)), atol=1e-3)
    wrong_way = _blobs(size, _rotate_offsets(offsets, -alpha))
    assert np.abs(out - wrong_way).max() > 0.5


def test_thirty_degrees_moves_a_point_to_within_a_tenth_of_a_pixel():
    size, alpha = 64, np.radians(30.0)
    out = rotate_images(_blobs(size, [(12.0, 0.0)]), alpha)
    y, x = np.indices((size, size)) - size // 2
    weights = np.clip(out, 0, None)
    centroid = np.array([(weights * x).sum(), (weights * y).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, [12 * np.cos(alpha), 12 * np.sin(alpha)], atol=0.1)


def test_scipy_ndimage_rotate_turns_the_other_way():
    image = _blobs(65, [(10.0, 3.0), (-5.0, 12.0)])
    ours = rotate_images(image, np.radians(30.0))[_inside(65)]
    assert np.corrcoef(ours, ndi.rotate(image, -30.0, reshape=False, order=5)[_inside(65)])[0, 1] > 0.999
    assert np.corrcoef(ours, ndi.rotate(image, 30.0, reshape=False, order=5)[_inside(65)])[0, 1] < 0.5


def test_white_noise_keeps_its_power_unlike_bilinear_interpolation():
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((12, 64, 64)).astype(np.float32)
    angles = rng.uniform(np.radians(10), np.radians(80), len(noise)) * rng.choice([-1, 1], len(noise))
    inside = _inside(64)
    ratio = rotate_images(noise, angles)[:, inside].var() / noise[:, inside].var()
    assert ratio == pytest.approx(1.0, abs=0.03)
    bilinear = np.stack(
        [ndi.rotate(im, -np.degrees(a), reshape=False, order=1) for im, a in zip(noise, angles, strict=True)]
    )
    assert bilinear[:, inside].var() / noise[:, inside].var() < 0.8


def test_rotating_back_returns_the_image():
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((6, 48, 48)).astype(np.float32)
    angles = np.radians([46.0, 100.0, -30.0, -100.0, 170.0, -135.0])  # across quarter-turn boundaries
    back = rotate_images(rotate_images(noise, angles), -angles)
    inside = _inside(48)
    for original, returned in zip(noise, back, strict=True):
        assert np.corrcoef(original[inside], returned[inside])[0, 1] > 0.99


def test_batch_rotates_each_image_by_its_own_angle_and_keeps_dtype():
    rng = np.random.default_rng(3)
    images = rng.standard_normal((4, 32, 32))
    angles = np.array([0.0, 0.3, -2.0, np.pi / 2])
    out = rotate_images(images, angles)
    assert out.dtype == np.float64 and out.shape == images.shape
    for image, angle, rotated in zip(images, angles, out, strict=True):
        np.testing.assert_allclose(rotated, rotate_images(image, angle), atol=1e-12)
    np.testing.assert_array_equal(out[0], images[0])
    assert rotate_images(images.astype(np.float32), angles).dtype == np.float32


def test_non_square_images_are_refused():
    with pytest.raises(ValueError, match="square"):
        rotate_images(np.zeros((2, 32, 30)), [0.1, 0.2])
