"""The local fit: its Jacobian is the score's, its steps find the pose and origin, its expected error is the
spread of the fit over noise."""

import numpy as np
import pytest

from cryo_forum import geometry
from cryo_forum.io.maps import benchmark_map_path, load_volume
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.prediction.local_fit import LocalFit, expected_errors_deg
from cryo_forum.prediction.matching import _Band

SIZE = 32


@pytest.fixture(scope="module")
def fit():
    volume, _ = load_volume(benchmark_map_path(), pixel_size=9.0, size=SIZE)
    return LocalFit(FourierProjector(volume))


def _spectra(fit, poses, origins, noise=0.0, seed=0):
    """Noise-free model spectra [n, D * (D // 2 + 1)] of the map at poses and origins (px), plus white noise of
    standard deviation ``noise`` per coefficient (real and imaginary parts)."""
    grid = FourierGrid(SIZE)
    slices = fit.projector.spectra(poses).numpy().astype(np.complex128)
    phase = np.exp(2j * np.pi * (grid.kx * origins[:, 0, None, None] + grid.ky * origins[:, 1, None, None]) / SIZE)
    rng = np.random.default_rng(seed)
    shape = (len(poses), *grid.shape)
    noisy = slices * phase + noise * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    return noisy.reshape(len(poses), -1)


def _rotated(poses, rotvecs):
    return geometry.quaternion_multiply(geometry.matrix_to_quaternion(geometry.rotvec_to_matrix(rotvecs)), poses)


def test_the_normal_equations_hold_the_derivatives_of_the_score(fit):
    """h_j = <b_j, x>: moving the pose by R(eps e_j) (or the origin by eps) changes h_0 = <m, x> by eps h_j."""
    rng = np.random.default_rng(1)
    poses = geometry.random_quaternions(4, rng)
    origins = rng.uniform(-1, 1, size=(4, 2))
    spectra = _spectra(fit, _rotated(poses, rng.normal(scale=0.05, size=(4, 3))), origins + 0.3)
    band, ctf = _Band(SIZE, SIZE / 2, np.ones(SIZE // 2 + 1)), np.ones_like(spectra.real)
    data = fit.on_band(band, spectra, ctf)
    _, _, projections = fit.normal_equations(data, poses, origins)
    step = 5e-3  # radians and px: central differences well above float32 rounding
    for parameter in range(5):
        move = np.zeros((4, 5))
        move[:, parameter] = step
        ahead, behind = (
            fit.normal_equations(data, _rotated(poses, sign * move[:, :3]), origins + sign * move[:, 3:])
            for sign in (1.0, -1.0)
        )
        measured = (ahead[2][:, 0] - behind[2][:, 0]) / (2 * step)
        expected = projections[:, 1 + parameter]
        np.testing.assert_allclose(measured, expected, atol=0.03 * np.abs(expected).max())


def test_steps_find_a_pose_4_degrees_and_an_origin_1_px_away(fit):
    rng = np.random.default_rng(2)
    truth = geometry.random_quaternions(16, rng)
    origins = rng.uniform(-2, 2, size=(16, 2))
    spectra = _spectra(fit, truth, origins)
    axes = rng.normal(size=(16, 3))
    start = _rotated(truth, 4.0 * np.pi / 180 * axes / np.linalg.norm(axes, axis=1, keepdims=True))
    guess = origins + np.stack([np.cos(axes[:, 0]), np.sin(axes[:, 0])], axis=1)
    ctf, active = np.ones_like(spectra.real), np.ones(16, dtype=bool)
    state = None
    for step, radius in ((4.0, 6.0), (2.0, 12.0), (1.0, SIZE / 2)):  # widening bands, as refinement's stages
        data = fit.on_band(_Band(SIZE, radius, np.ones(SIZE // 2 + 1)), spectra, ctf)
        state = fit.state(data, state.poses if state else start, state.origins if state else guess)
        state = fit.iterate(data, state, active, guess, step, 2.0, 3)
    errors = np.degrees(geometry.geodesic_distance(state.poses, truth))
    assert np.median(errors) < 0.2 and errors.max() < 1.0, errors
    assert np.median(np.hypot(*(state.origins - origins).T)) < 0.05


def test_the_expected_error_is_the_spread_of_the_fit_over_noise(fit):
    """One pose, 64 noise draws: the fits scatter about the truth as much as the Laplace approximation says
    (its RMS over the draws within 30 % of the mean expected error), and twice the noise doubles both. The band
    whitens by the noise power per coefficient, E|n|^2 = 2 noise^2, as the matcher's does."""
    truth = np.repeat(geometry.random_quaternions(1, 3), 64, axis=0)
    origins = np.zeros((64, 2))
    active = np.ones(64, dtype=bool)
    spread = []
    for noise in (40.0, 80.0):
        band = _Band(SIZE, SIZE / 2, np.full(SIZE // 2 + 1, 2.0 * noise**2))
        spectra = _spectra(fit, truth, origins, noise=noise, seed=int(noise))
        data = fit.on_band(band, spectra, np.ones_like(spectra.real))
        state = fit.iterate(data, fit.state(data, truth, origins), active, origins, 2.0, 0.0, 6)
        rms = np.degrees(np.sqrt(np.mean(geometry.geodesic_distance(state.poses, truth) ** 2)))
        expected = np.mean(expected_errors_deg(state))
        assert 0.7 < rms / expected < 1.3, (noise, rms, expected)
        spread.append(expected)
    assert 1.6 < spread[1] / spread[0] < 2.5
