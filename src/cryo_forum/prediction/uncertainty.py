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

:func:`expected_error_deg` turns the whole belief into one angle in degrees: exact for any concentrations,
close to the RMS rotation error for sharp beliefs and saturating at 120 degrees for a flat one, so a
threshold such as 15 degrees means what it says.
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


def _talbot_contour(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Points s [M] and weights w [M] with ``f(1) ~ Re(sum_k w_k F(s_k))`` for ``F`` the Laplace transform of f.

    The fixed Talbot contour of Abate and Valko (2004); F may be singular on the non-positive real axis only.
    """
    theta = np.pi * np.arange(1, nodes) / nodes
    cot = 1.0 / np.tan(theta)
    r = 2.0 * nodes / 5.0
    points = np.concatenate([[r + 0j], r * theta * (cot + 1j)])
    sigma = theta + (theta * cot - 1.0) * cot
    weights = np.concatenate([[0.5 + 0j], 1.0 + 1j * sigma]) * np.exp(points) * r / nodes
    return points, weights


_TALBOT_POINTS, _TALBOT_WEIGHTS = _talbot_contour(24)  # ~1e-12 relative accuracy in float64
_CHUNK = 16384  # particles per block: bounds the [chunk, 24, 3] complex temporaries


def bingham_tangent_spread(eigenvalues: np.ndarray) -> np.ndarray:
    """``E[1 - <q, mode>^2] = E[sin^2(theta / 2)]`` [...] under the Bingham belief; 0 sharp, 3/4 flat.

    theta is the angle between a rotation drawn from the belief and its mode. With concentrations z_j
    (z_0 = 0), the Gaussian integral over R^4 gives ``pi^2 prod_j (t + z_j)^(-1/2) = 1/2 int rho exp(-t rho)
    c(rho Z) d rho`` where c is the Bingham normaliser, so ``rho c(rho Z)`` is an inverse Laplace transform,
    and ``E[x_j^2] = -d log c / d z_j`` multiplies the transform by ``1 / (2 (t + z_j))``. Both inverses are
    evaluated at rho = 1 on a Talbot contour. Exact (no Gaussian approximation), monotone: a larger
    concentration never increases the spread.
    """
    concentrations = bingham_concentrations(eigenvalues)
    shape = concentrations.shape[:-1]
    flat = concentrations.reshape(-1, 3)
    spread = np.empty(len(flat))
    s = _TALBOT_POINTS[None, :, None]
    for start in range(0, len(flat), _CHUNK):
        z = flat[start : start + _CHUNK, None, :]  # [n, 1, 3]
        shifted = s + z  # [n, M, 3]
        # prod_j (s + z_j)^(-1/2), scaled per particle by prod_j (r + z_j)^(1/2) so that nothing under- or
        # overflows; the scale cancels in the ratio.
        transform = _TALBOT_POINTS**-0.5 * np.prod(np.sqrt((_TALBOT_POINTS[0].real + z) / shifted), axis=-1)
        moments = 0.5 * transform * np.sum(1.0 / shifted, axis=-1)
        spread[start : start + _CHUNK] = np.real(moments @ _TALBOT_WEIGHTS) / np.real(transform @ _TALBOT_WEIGHTS)
    return np.clip(spread, 0.0, 0.75).reshape(shape)


def expected_error_deg(eigenvalues: np.ndarray) -> np.ndarray:
    """The rotation angle in degrees [...] whose cosine is the expected cosine of the error under the belief.

    ``acos(E[cos theta]) = 2 asin(sqrt(E[sin^2(theta / 2)]))`` with theta the rotation angle between a pose
    drawn from the Bingham belief and its mode (see :func:`bingham_tangent_spread`); ``E[cos theta]`` is the
    expected chordal agreement ``(tr(R^T R_mode) - 1) / 2``. Sharp beliefs: ``sqrt(2 sum_i 1 / z_i)`` radians,
    the RMS angle of the tangent-space Gaussian (variance 1 / (2 z_i) per axis, rotation angle = twice the
    quaternion angle). Limits: 120 for a flat belief (uniform rotations), 90 for one flat about an axis.
    """
    return np.degrees(2.0 * np.arcsin(np.sqrt(bingham_tangent_spread(eigenvalues))))


DEFAULT_METRIC = "expected_error_deg"  # the score every command uses unless told otherwise
SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "dispersion_trace": dispersion_trace,
    "max_dispersion": max_dispersion,
    "negative_eigengap": negative_eigengap,
    "expected_error_deg": expected_error_deg,
}
