"""Uncertainty scores from QCQP eigenvalues: values by hand, sign convention, ranking, tiny gaps."""

import numpy as np
import pytest

from cryo_forum.uncertainty import (
    SCORES,
    bingham_concentrations,
    dispersion_trace,
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
    assert set(SCORES) == {"dispersion_trace", "max_dispersion", "negative_eigengap"}
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
