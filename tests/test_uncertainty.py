"""Uncertainty scores from QCQP eigenvalues: values by hand, sign convention, ranking, tiny gaps, expected error."""

import numpy as np
import pytest
from scipy import integrate

from cryo_forum.prediction.uncertainty import (
    SCORES,
    bingham_concentrations,
    bingham_tangent_spread,
    dispersion_trace,
    expected_error_deg,
    first_eigengap,
    max_dispersion,
    negative_eigengap,
)


def matrices_with_spectra(spectra: np.ndarray, seed: int) -> np.ndarray:
    """Symmetric 4x4 matrices [N, 4, 4] with the given eigenvalues [N, 4] and random eigenbases."""
    bases, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(spectra), 4, 4)))
    return np.einsum("nij,nj,nkj->nik", bases, spectra, bases)


def test_values_by_hand_in_any_order():
    eigenvalues = np.array([[1.0, 2.0, 3.0, 5.0], [5.0, 3.0, 1.0, 2.0]])
    np.testing.assert_array_equal(bingham_concentrations(eigenvalues), [[1.0, 2.0, 4.0]] * 2)
    np.testing.assert_allclose(dispersion_trace(eigenvalues), [1.75, 1.75])
    np.testing.assert_allclose(max_dispersion(eigenvalues), [1.0, 1.0])
    np.testing.assert_allclose(first_eigengap(eigenvalues), [1.0, 1.0])
    np.testing.assert_allclose(negative_eigengap(eigenvalues), [-1.0, -1.0])


def test_sharper_matrices_score_as_more_certain():
    rng = np.random.default_rng(0)
    sharp_spectra = np.column_stack([np.zeros(20), rng.uniform(40, 60, (20, 3))])
    flat_spectra = np.column_stack([np.zeros(20), rng.uniform(0.2, 2.0, (20, 3))])
    offsets = rng.normal(0, 5, (20, 1))  # adding c I changes no Bingham density, and no score
    sharp = np.linalg.eigvalsh(matrices_with_spectra(sharp_spectra + offsets, 1))
    flat = np.linalg.eigvalsh(matrices_with_spectra(flat_spectra, 2))
    assert set(SCORES) == {"dispersion_trace", "max_dispersion", "negative_eigengap", "expected_error_deg"}
    for name, score in SCORES.items():
        sharp_scores, flat_scores = score(sharp), score(flat)
        assert sharp_scores.shape == flat_scores.shape == (20,)
        assert sharp_scores.max() < flat_scores.min(), name
        np.testing.assert_allclose(sharp_scores, score(sharp_spectra), rtol=1e-9, err_msg=name)


def test_tiny_gaps_give_large_finite_ordered_scores():
    eigenvalues = np.array(
        [
            [1.0, 1.0 + 1e-10, 2.0, 3.0],
            [1.0, 1.0 + 1e-12, 2.0, 3.0],
            [1.0, 1.0, 1.0, 1.0],
            [1.0, 1.0 - 1e-16, 1.0, 1.0],  # rounding makes the gap negative
            [0.0, 0.0, 0.0, 0.0],
            [1e-300, 2e-300, 3e-300, 4e-300],
        ]
    )
    for name, score in SCORES.items():
        values = score(eigenvalues)
        assert np.all(np.isfinite(values)), name
        assert values[0] < values[1] <= values[2], name
    assert max_dispersion(eigenvalues)[2] == pytest.approx(1 / np.finfo(np.float64).eps)
    assert np.all(bingham_concentrations(eigenvalues) > 0)
    # Same relative spectrum at a tiny scale: the scores scale by 1/scale and stay finite.
    np.testing.assert_allclose(dispersion_trace(eigenvalues[5]), (1 + 1 / 2 + 1 / 3) * 1e300, rtol=1e-12)


def spectra(concentrations) -> np.ndarray:
    """Eigenvalues [N, 4] with the smallest at 0 and the given concentrations [N, 3]."""
    concentrations = np.atleast_2d(np.asarray(concentrations, dtype=np.float64))
    return np.column_stack([np.zeros(len(concentrations)), concentrations])


def isotropic_spread(z: float) -> float:
    """E[sin^2(phi)] for the density sin^2(phi) exp(-z sin^2(phi)) on [0, pi/2] (phi = half the rotation angle)."""
    options = {"epsabs": 0.0, "epsrel": 1e-12, "limit": 200, "points": [min(1.0, 3 / np.sqrt(z))]}
    weight = lambda phi, power: np.sin(phi) ** power * np.exp(-z * np.sin(phi) ** 2)  # noqa: E731
    top = integrate.quad(weight, 0, np.pi / 2, args=(4,), **options)[0]
    return top / integrate.quad(weight, 0, np.pi / 2, args=(2,), **options)[0]


def test_expected_error_limits_flat_half_flat_and_sharp():
    flat, axis_flat, plane_flat = expected_error_deg(spectra([[0, 0, 0], [1e-9, 1e9, 1e9], [1e-9, 1e-9, 1e9]]))
    assert flat == pytest.approx(120.0, abs=1e-9)  # uniform rotations: E[cos] = -1/2
    assert axis_flat == pytest.approx(90.0, abs=1e-3)  # uniform about one axis: E[cos] = 0
    assert plane_flat == pytest.approx(np.degrees(np.arccos(-1 / 3)), abs=1e-3)  # E[sin^2(theta/2)] = 2/3
    sharp = np.array([[1e4, 2e4, 5e4], [3e5, 3e5, 1e7], [1e8, 1e9, 1e10]])
    gaussian_rms = np.degrees(np.sqrt(2 * np.sum(1 / sharp, axis=1)))
    np.testing.assert_allclose(expected_error_deg(spectra(sharp)), gaussian_rms, rtol=2e-4)


@pytest.mark.parametrize("z", [1e-3, 0.5, 2.0, 10.0, 80.0, 1e3, 3e4])
def test_isotropic_spread_matches_quadrature(z):
    assert bingham_tangent_spread(spectra([z, z, z]))[0] == pytest.approx(isotropic_spread(z), rel=1e-9)


def test_expected_error_matches_poses_drawn_from_the_belief():
    """Draw rotations from each Bingham (uniform proposals, importance weights) and measure acos(E[cos theta])."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((400_000, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)  # mode along axis 0, eigenvectors along the axes
    cos_theta = 2 * q[:, 0] ** 2 - 1
    cases = np.array([[0.5, 2.0, 7.0], [1.0, 1.0, 20.0], [0.1, 5.0, 12.0], [3.0, 3.0, 3.0], [0.0, 0.0, 9.0]])
    for z, predicted in zip(cases, expected_error_deg(spectra(cases)), strict=True):
        weights = np.exp(-(q[:, 1:] ** 2) @ z)
        measured = np.degrees(np.arccos(np.sum(weights * cos_theta) / np.sum(weights)))
        assert predicted == pytest.approx(measured, abs=0.3), z


def test_expected_error_never_grows_with_a_concentration():
    rng = np.random.default_rng(4)
    base = 10 ** rng.uniform(-3, 6, (3000, 3))
    factors = np.where(rng.random((3000, 3)) < 0.5, 1.0, 10 ** rng.uniform(0.01, 1, (3000, 3)))
    factors[:, 0] = np.maximum(factors[:, 0], 1.05)  # every pair differs in at least one concentration
    before, after = expected_error_deg(spectra(base)), expected_error_deg(spectra(base * factors))
    assert np.all(after < before)
    assert np.all((before > 0) & (before <= 120))
    # Ranks like the trace of the tangent covariance wherever the belief is sharp (Gaussian regime).
    sharp = spectra(10 ** rng.uniform(4, 8, (500, 3)))
    assert np.array_equal(np.argsort(expected_error_deg(sharp)), np.argsort(dispersion_trace(sharp)))


def test_expected_error_ignores_offsets_order_and_batch_shape():
    rng = np.random.default_rng(5)
    eigenvalues = spectra(10 ** rng.uniform(-1, 3, (12, 3))) + rng.normal(0, 3, (12, 1))
    reference = expected_error_deg(eigenvalues)
    np.testing.assert_allclose(expected_error_deg(eigenvalues[:, ::-1]), reference, rtol=1e-12)
    np.testing.assert_allclose(expected_error_deg(eigenvalues.reshape(3, 4, 4)), reference.reshape(3, 4))
    np.testing.assert_allclose(expected_error_deg(eigenvalues[0]), reference[0], rtol=1e-12)
