"""Preprocessing: Fourier-crop downsampling, background normalisation, soft mask, phase flip, Preprocessor."""

import numpy as np
import pytest

from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.physics.ctf import compute_ctf
from cryo_forum.streams.preprocess import (
    Preprocessor,
    apply_soft_mask,
    downsample,
    flip_and_downsample,
    normalise_background,
    phase_flip,
    radius_grid,
    soft_circular_mask,
)

CTF = {"defocus_u": 12000.0, "defocus_v": 10000.0, "defocus_angle": 30.0, "voltage": 300.0}


def _cosines(size: int, waves: list[tuple[int, int, float]], step: float = 1.0) -> np.ndarray:
    """Sum of cos(2 pi (kx x + ky y) / size + phase) sampled every ``step`` fine pixels about the centre."""
    coarse = round(size / step)
    y, x = (np.indices((coarse, coarse)) - coarse // 2) * step
    return sum(np.cos(2 * np.pi * (kx * x + ky * y) / size + phase) for kx, ky, phase in waves)


def _blob(size: int, sigma: float = 1.2) -> np.ndarray:
    """A Gaussian centred on pixel D // 2: its spectrum (origin at the centre) is real and positive."""
    r = radius_grid(size)
    return np.exp(-(r**2) / (2 * sigma**2))


def _apply_ctf(images: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    return np.fft.ifft2(np.fft.fft2(images) * ctf).real


def _centred_spectrum(images: np.ndarray) -> np.ndarray:
    return np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1)))


def test_downsample_keeps_band_limited_content_and_scales_the_pixel_size():
    low = [(3, 1, 0.2), (-5, 7, 1.0), (0, 10, -0.5), (12, -9, 2.0)]  # all below the new Nyquist (16)
    high = [(20, 3, 0.0), (2, -25, 0.7)]
    images = np.stack([_cosines(64, low), _cosines(64, low + high), 5.0 + _cosines(64, low)])
    out, pixel_size = downsample(images.astype(np.float32), 1.5, 32)
    assert out.dtype == np.float32 and out.shape == (3, 32, 32)
    assert pixel_size == pytest.approx(3.0)
    expected = _cosines(64, low, step=2.0)  # the same function on the coarse grid, centres aligned
    np.testing.assert_allclose(out[0], expected, atol=1e-4)
    np.testing.assert_allclose(out[1], expected, atol=1e-4)  # frequencies above Nyquist are removed
    np.testing.assert_allclose(out[2], 5.0 + expected, atol=1e-4)
    same, same_pixel = downsample(images, 1.5, 64)
    np.testing.assert_allclose(same, images, atol=1e-5)
    assert same_pixel == 1.5


def test_downsample_refuses_a_larger_size():
    with pytest.raises(CryoForumError, match="image_size 40"):
        downsample(np.zeros((2, 32, 32)), 1.0, 40)


def test_normalised_background_has_zero_mean_and_unit_std():
    rng = np.random.default_rng(0)
    size, fraction = 48, 0.8
    scales, offsets = np.array([0.5, 3.0, 40.0]), np.array([-2.0, 0.0, 1000.0])
    noise = rng.standard_normal((3, size, size))
    particle = 10.0 * (radius_grid(size) < 12)
    images = (offsets[:, None, None] + scales[:, None, None] * (noise + particle)).astype(np.float32)
    out = normalise_background(images, fraction)
    outside = radius_grid(size) > fraction * size / 2
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, outside].mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(out[:, outside].std(axis=1), 1.0, atol=1e-4)
    mean = images[:, outside].mean(axis=1, dtype=np.float64)[:, None, None]
    std = images[:, outside].std(axis=1, dtype=np.float64)[:, None, None]
    np.testing.assert_allclose(out, (images - mean) / std, atol=1e-3)


def test_flat_images_are_only_mean_subtracted():
    images = np.stack([np.full((32, 32), 7.5), np.zeros((32, 32))]).astype(np.float32)
    out = normalise_background(images)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, 0.0, atol=1e-5)


def test_soft_mask_is_one_inside_zero_outside_and_a_smooth_cosine_between():
    size, radius, edge = 64, 20.0, 6.0
    mask = soft_circular_mask(size, radius, edge)
    r = radius_grid(size)
    assert mask.dtype == np.float32
    assert np.all(mask[r <= radius] == 1.0) and np.all(mask[r >= radius + edge] == 0.0)
    between = (r > radius) & (r < radius + edge)
    assert np.all((mask[between] > 0.0) & (mask[between] < 1.0))
    np.testing.assert_allclose(mask[between], 0.5 + 0.5 * np.cos(np.pi * (r[between] - radius) / edge), atol=1e-6)
    assert mask[size // 2, size // 2 + 23] == pytest.approx(0.5)  # r = radius + edge / 2
    order = np.argsort(r.ravel(), kind="stable")
    assert np.all(np.diff(mask.ravel()[order]) <= 1e-7)  # never rises outwards
    steepest = np.pi / (2 * edge)  # largest slope per pixel of the raised cosine
    assert np.abs(np.diff(mask, axis=1)).max() <= steepest + 1e-6
    hard = soft_circular_mask(size, radius, 0.0)
    np.testing.assert_array_equal(hard, (r <= radius).astype(np.float32))


def test_apply_soft_mask_zeroes_the_outside():
    images = np.random.default_rng(1).standard_normal((2, 32, 32))
    out = apply_soft_mask(images, 10.0, 3.0)
    np.testing.assert_allclose(out, images * soft_circular_mask(32, 10.0, 3.0), atol=1e-6)
    assert np.all(out[:, radius_grid(32) >= 13.0] == 0.0)


def test_phase_flipped_spectrum_has_the_sign_of_abs_ctf():
    size, pixel_size = 64, 2.0
    params = {**CTF, "defocus_u": np.array([12000.0, 20000.0]), "defocus_v": np.array([10000.0, 19000.0])}
    ctf = compute_ctf(size, pixel_size, **params)
    clean = _centred_spectrum(_blob(size)).real
    images = _apply_ctf(np.stack([_blob(size)] * 2), ctf)
    before = _centred_spectrum(images).real
    assert (before < -0.01 * clean.max()).any()  # the CTF made parts of the spectrum negative
    flipped = phase_flip(images.astype(np.float32), pixel_size, params)
    assert flipped.dtype == np.float32
    after = _centred_spectrum(flipped.astype(np.float64))
    below_nyquist = np.ones((size, size), dtype=bool)
    below_nyquist[size // 2] = below_nyquist[:, size // 2] = False  # sign(CTF) is not even there
    tolerance = 1e-3 * clean.max()
    np.testing.assert_allclose(after.real[:, below_nyquist], (np.abs(ctf) * clean)[:, below_nyquist], atol=tolerance)
    assert np.all(after.real > -tolerance)
    np.testing.assert_allclose(after.imag, 0.0, atol=tolerance)
    np.testing.assert_allclose(phase_flip(flipped, pixel_size, params), images, atol=1e-4)


@pytest.mark.parametrize("size", [39, 40])
def test_phase_flip_before_cropping_equals_flipping_the_crop_with_the_cropped_grid(size):
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, 64, 64)).astype(np.float32)
    params = {**CTF, "defocus_u": np.array([8000.0, 15000.0, 25000.0]), "bfactor": 20.0, "phase_shift": 10.0}
    flip_then_crop, _ = downsample(phase_flip(images, 1.2, params), 1.2, size)
    cropped, cropped_pixel = downsample(images, 1.2, size)
    crop_then_flip = phase_flip(cropped, cropped_pixel, params)
    assert not np.allclose(flip_then_crop, cropped, atol=0.1)
    difference = np.fft.fft2(flip_then_crop - crop_then_flip)
    if size % 2 == 0:  # an even box's Nyquist row and column hold +-Nyquist at once: sign(CTF) is ambiguous
        difference[:, size // 2] = difference[:, :, size // 2] = 0.0
    np.testing.assert_allclose(np.fft.ifft2(difference).real, 0.0, atol=1e-4)


@pytest.mark.parametrize("size", [32, 31, 64])
def test_fused_flip_and_crop_equals_flipping_at_the_input_size_then_cropping(size):
    images = np.random.default_rng(5).standard_normal((3, 64, 64)).astype(np.float32)
    params = {**CTF, "defocus_angle": np.array([10.0, 70.0, 135.0]), "amplitude_contrast": 0.07}
    fused, pixel_size = flip_and_downsample(images, 1.3, size, params)
    reference, reference_pixel = downsample(phase_flip(images, 1.3, params), 1.3, size)
    assert fused.dtype == np.float32 and pixel_size == reference_pixel
    np.testing.assert_allclose(fused, reference, atol=1e-5)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"defocus_u": 1e4, "defocus_v": 1e4}, "missing keys \\['defocus_angle'\\]"),
        ({**CTF, "defocus": 1.0}, "unknown keys \\['defocus'\\]"),
        ({**CTF, "defocus_u": np.ones(3)}, "defocus_u needs a scalar or 2 values"),
        ({**CTF, "voltage": np.nan}, "voltage has non-finite"),
    ],
)
def test_bad_ctf_parameters_are_refused(params, message):
    with pytest.raises(CryoForumError, match=message):
        phase_flip(np.zeros((2, 16, 16)), 1.0, params)


def test_preprocessor_composes_the_steps_in_order():
    rng = np.random.default_rng(3)
    images = (3.0 + 2.0 * rng.standard_normal((4, 64, 64))).astype(np.float32)
    params = {**CTF, "defocus_u": rng.uniform(8000, 20000, 4)}
    pre = Preprocessor(image_size=32, pixel_size_in=1.1, input_size=64, mask_radius=0.8, mask_edge=4.0, phase_flip=True)
    out = pre(images, params)
    assert out.dtype == np.float32 and out.shape == (4, 32, 32) and out.flags.c_contiguous
    assert pre.output_pixel_size == pytest.approx(2.2)
    by_hand, _ = downsample(phase_flip(images, 1.1, params), 1.1, 32)
    by_hand = apply_soft_mask(normalise_background(by_hand, 0.85), 0.8 * 16, 4.0)
    np.testing.assert_allclose(out, by_hand, atol=1e-5)
    assert np.all(out[:, radius_grid(32) >= 0.8 * 16 + 4.0] == 0.0)


def test_preprocessor_without_mask_gives_a_unit_background():
    images = np.random.default_rng(4).normal(5.0, 3.0, (3, 48, 48))
    pre = Preprocessor(image_size=24, pixel_size_in=1.0, input_size=48, background_radius=0.7, mask_radius=None)
    out = pre(images, ctf_params={"ignored": "without phase_flip"})
    outside = radius_grid(24) > 0.7 * 12
    np.testing.assert_allclose(out[:, outside].mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, outside].std(axis=1), 1.0, atol=1e-5)
    raw = Preprocessor(image_size=48, pixel_size_in=1.0, input_size=48, normalise=False, mask_radius=None)
    np.testing.assert_allclose(raw(images), images, atol=1e-5)


def test_preprocessor_is_completed_from_the_data():
    pre = Preprocessor(mask_radius=0.8)
    assert not pre.is_resolved
    with pytest.raises(CryoForumError, match="does not know the images"):
        pre(np.zeros((1, 32, 32)))
    assert pre.resolved(1.5, 200).image_size == 64 and pre.resolved(1.5, 48).image_size == 48
    done = Preprocessor(image_size=32).resolved(1.5, 200)
    assert (done.image_size, done.input_size, done.pixel_size_in, done.mask_radius) == (32, 200, 1.5, 0.9)
    with pytest.raises(InvalidSetting, match="at most the particles' box of 24 px"):
        Preprocessor(image_size=32).resolved(1.5, 24)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.full((2, 32, 32), np.nan), "NaN or infinite"),
        (np.zeros((2, 30, 30)), "30 px but the preprocessing expects 32 px"),
        (np.zeros((2, 32, 31)), "square images"),
        (np.zeros((32, 32)), "square images"),
    ],
)
def test_preprocessor_refuses_bad_images(images, message):
    with pytest.raises(CryoForumError, match=message):
        Preprocessor(image_size=16, pixel_size_in=1.0, input_size=32)(images)


def test_preprocessor_refuses_phase_flip_without_ctf():
    with pytest.raises(CryoForumError, match="phase flipping needs CTF parameters"):
        Preprocessor(image_size=16, pixel_size_in=1.0, input_size=32, phase_flip=True)(np.zeros((1, 32, 32)))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"image_size": 64}, "image_size: must be at most the particles' box of 32 px"),
        ({"image_size": 16.0}, "image_size"),
        ({"pixel_size_in": 0.0}, "pixel_size_in"),
        ({"pixel_size_in": "1.0"}, "pixel_size_in"),
        ({"pixel_size_in": np.nan}, "pixel_size_in"),
        ({"mask_radius": 1.5}, "mask_radius"),
        ({"background_radius": 1.0}, "background_radius"),
        ({"mask_edge": -1.0}, "mask_edge"),
    ],
)
def test_preprocessor_refuses_bad_options(options, message):
    with pytest.raises(CryoForumError, match=message):
        Preprocessor(**{"image_size": 16, "pixel_size_in": 1.0, "input_size": 32, **options})
