"""Sub-pixel translation and Fourier cropping."""

import numpy as np
import pytest

from cryo_forum.physics.fourier import fft2_centered, fourier_crop, ifft2_centered, translate_images


def test_translation_moves_content_by_the_shift():
    image = np.zeros((1, 16, 16), np.float32)
    image[0, 8, 8] = 1.0
    moved = translate_images(image, np.array([[3.0, -2.0]]))
    assert np.unravel_index(np.argmax(moved[0]), (16, 16)) == (6, 11)
    half = translate_images(image, np.array([[0.5, 0.0]]))[0]
    assert half[8, 8] == pytest.approx(half[8, 9], rel=1e-5)


def test_centred_transform_round_trip_and_origin():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 15, 15))
    np.testing.assert_allclose(ifft2_centered(fft2_centered(images)).real, images, atol=1e-12)
    delta = np.zeros((16, 16))
    delta[8, 8] = 1.0
    np.testing.assert_allclose(fft2_centered(delta), np.ones((16, 16)), atol=1e-12)


def test_fourier_crop_keeps_band_limited_content():
    size, small = 64, 32
    y, x = np.mgrid[:size, :size]
    wave = np.cos(2 * np.pi * 3 * x / size) + 0.5 * np.sin(2 * np.pi * 5 * y / size)
    cropped = fourier_crop(wave[None], small)[0]
    ys, xs = np.mgrid[:small, :small] * (size / small)
    expected = np.cos(2 * np.pi * 3 * xs / size) + 0.5 * np.sin(2 * np.pi * 5 * ys / size)
    np.testing.assert_allclose(cropped, expected, atol=1e-9)
    with pytest.raises(ValueError, match="larger"):
        fourier_crop(wave, 80)
