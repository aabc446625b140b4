"""The one Fourier grid: its half plane against numpy's rfft2 layout, shells, the Nyquist mask, Hermitian weights,
bands, the gridding correction and the 3-D shells, each against a brute-force construction."""

import numpy as np
import pytest

from cryo_forum.physics.fourier import FourierGrid


@pytest.mark.parametrize("size", [16, 15])
def test_the_half_plane_is_numpys_rfft2_layout(size):
    grid = FourierGrid(size)
    assert grid.shape == np.fft.rfft2(np.zeros((size, size))).shape
    ky, kx = np.meshgrid(np.fft.fftfreq(size) * size, np.fft.rfftfreq(size) * size, indexing="ij")
    np.testing.assert_array_equal(grid.ky, np.rint(ky))
    np.testing.assert_array_equal(grid.kx, np.rint(kx))
    np.testing.assert_array_equal(grid.shells, np.rint(np.hypot(kx, ky)).astype(int))
    np.testing.assert_array_equal(grid.inside, np.hypot(kx, ky) < size / 2)
    assert grid.inside[0, 0] and grid.inside[size // 2, 0] == (size % 2 == 1)  # an even box's Nyquist row is out
    np.testing.assert_array_equal(grid.inside_frequencies, np.stack([kx[grid.inside], ky[grid.inside]], axis=-1))


@pytest.mark.parametrize("size", [16, 15])
def test_hermitian_weights_turn_half_plane_sums_into_full_plane_sums(size):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((size, size))
    power = np.abs(np.fft.fft2(image)) ** 2
    half = np.abs(np.fft.rfft2(image)) ** 2
    grid = FourierGrid(size)
    assert (grid.hermitian_weights * half).sum() == pytest.approx(power.sum(), rel=1e-12)
    full = np.hypot(*np.meshgrid(np.fft.fftfreq(size) * size, np.fft.fftfreq(size) * size))
    assert (grid.hermitian_weights * half)[grid.inside].sum() == pytest.approx(power[full < size / 2].sum())


def test_a_band_holds_the_frequencies_between_zero_and_its_radius():
    grid = FourierGrid(32)
    flat, frequencies, weights = grid.band(5.5)
    radius = np.hypot(frequencies[:, 0], frequencies[:, 1])
    assert radius.min() > 0 and radius.max() < 5.5
    assert len(flat) == ((grid.modulus > 0) & (grid.modulus < 5.5)).sum()
    np.testing.assert_array_equal(grid.kx.ravel()[flat], frequencies[:, 0])
    np.testing.assert_array_equal(weights, np.where(frequencies[:, 0] > 0, 2.0, 1.0))
    circle = np.hypot(*np.meshgrid(np.arange(-16, 16), np.arange(-16, 16)))
    assert weights.sum() == ((circle > 0) & (circle < 5.5)).sum()  # the full disc, each frequency once
    assert len(grid.band(100.0)[0]) == grid.inside.sum() - 1  # capped at Nyquist, without frequency zero


def test_the_gridding_correction_undoes_the_trilinear_footprint():
    correction = FourierGrid(8).gridding_correction(16)
    offsets = np.arange(8) - 4
    np.testing.assert_allclose(correction * np.sinc(offsets / 16) ** 2, 1.0)
    assert correction[4] == 1.0 and correction[0] > correction[1] > 1.0


@pytest.mark.parametrize("size", [8, 7])
def test_volume_shells_and_nyquist_ball_against_a_brute_force_grid(size):
    grid = FourierGrid(size)
    shells, weights = grid.volume_shells()
    k = np.fft.fftfreq(size) * size
    kz, ky, kx = np.meshgrid(k, k, np.fft.rfftfreq(size) * size, indexing="ij")
    radius = np.sqrt(kz**2 + ky**2 + kx**2)
    np.testing.assert_array_equal(shells, np.rint(radius))
    np.testing.assert_array_equal(grid.volume_inside(), radius < size / 2)
    volume = np.random.default_rng(1).standard_normal((size,) * 3)
    power = (weights * np.abs(np.fft.rfftn(volume)) ** 2).sum()
    assert power == pytest.approx((np.abs(np.fft.fftn(volume)) ** 2).sum(), rel=1e-12)
