"""Uncertainty scores from the QCQP eigenvalues (Peretroukhin et al. 2020).

The QCQP head's matrix A defines a Bingham density ``p(q) ~ exp(-q^T A q)`` over unit quaternions. With the
eigenvalues of A in ascending order ``l0 <= l1 <= l2 <= l3``, the mode is the eigenvector of l0 and the
concentrations are the gaps ``l_i - l0`` (i = 1..3): the larger, the sharper the belief. Near its mode the
density is a Gaussian in the tangent space with variance ``1 / (2 (l_i - l0))`` along eigenvector i, so the
inverse gaps measure the spread.

Every entry of :data:`SCORES` maps eigenvalues [N, 4] to scores [N] where a LARGER score means MORE
uncertain; a threshold keeps the particles scoring below it. Inputs may be in any order (they are sorted).
Gaps are floored at the resolution of the eigenvalues themselves (machine epsilon times the largest
magnitude, at least the smallest normal float), so zero or rounding-negative gaps give large finite scores.
NumPy only, float64: no TensorFlow needed to filter a table of predictions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bingham_concentrations(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues [..., 4] -> concentrations [..., 3]: the gaps ``l_i - l0`` for i = 1..3 (larger = sharper).

    Gaps below the eigenvalues' resolution are raised to it, so they are always positive.
    """
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64), axis=-1)
    resolution = np.maximum(
        np.finfo(np.float64).eps * np.max(np.abs(values), axis=-1, keepdims=True), np.finfo(np.float64).tiny
    )
    return np.maximum(values[..., 1:] - values[..., :1], resolution)


def dispersion_trace(eigenvalues: np.ndarray) -> np.ndarray:
    """``sum_i 1 / (l_i - l0)`` [...]: twice the trace of the Bingham's tangent-space covariance."""
    return np.sum(1.0 / bingham_concentrations(eigenvalues), axis=-1)


def max_dispersion(eigenvalues: np.ndarray) -> np.ndarray:
    """``1 / (l1 - l0)`` [...]: the spread along the least certain direction."""
    return 1.0 / bingham_concentrations(eigenvalues)[..., 0]


def first_eigengap(eigenvalues: np.ndarray) -> np.ndarray:
    """``l1 - l0`` [...]: the smallest concentration (larger = MORE certain; see :func:`negative_eigengap`)."""
    return bingham_concentrations(eigenvalues)[..., 0]


def negative_eigengap(eigenvalues: np.ndarray) -> np.ndarray:
    """``-(l1 - l0)`` [...]: the first eigengap as a score (larger = more uncertain)."""
    return -first_eigengap(eigenvalues)


SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "dispersion_trace": dispersion_trace,
    "max_dispersion": max_dispersion,
    "negative_eigengap": negative_eigengap,
}
