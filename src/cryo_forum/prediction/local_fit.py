"""The continuous local fit of a particle's pose and origin to a map: Gauss-Newton on the matching score.

For a particle with spectrum ``x``, CTF ``C``, pose A and origin o, the model of its spectrum is
``m = C P_A e^{2 pi i k.o / D}`` (``P_A`` the map's central slice) and the score is the matcher's
noise-whitened normalised correlation ``s = <m, x>_w / ||m||_w`` (:mod:`cryo_forum.prediction.matching`;
``<a, b>_w = Re sum_k w_k conj(a_k) b_k`` over one band). Maximising s is fitting x by ``alpha m`` in the
whitened least-squares sense. Around the current pose, with the pose moved to ``R(delta) A``
(``R = geometry.rotvec_to_matrix``) and the origin to ``o + t``, the model is linear to first order::

    m(delta, t) ~ m + sum_j delta_j C (k x g)_j e^{...} + sum_i t_i (2 pi i k_i / D) m,    g = A grad P(A^T k)

with ``grad P`` the gradient of the trilinear interpolant, read with the slice
(:meth:`~cryo_forum.physics.slices.SpectrumTable.read_with_gradient`). Fitting
``x ~ alpha m + sum beta_j b_j`` over the six basis vectors ``[m, b_1..b_5]`` is a 6 x 6 linear system, and
``(delta, t) = beta / alpha`` is the Gauss-Newton step: one read per step, where a grid search reads every
candidate. A step is kept when it raises the score; otherwise it is halved and tried again at the next
iteration. Steps are bounded by a trust region (the stage's step in rotation, the origin's reach in shift).

At the optimum the curvature of the log-likelihood ``s^2 / 2`` is about ``alpha^2 J^T W J`` restricted to the
directions orthogonal to m (the Schur complement of the Gram matrix): the Laplace approximation of the pose's
posterior, whose covariance gives the expected error (:func:`expected_errors_deg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryo_forum import geometry
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.tensorflow_quiet import tf

PARAMETERS = 6  # alpha (the scale), three rotation components, two origin components
DAMPING = 1e-3  # Levenberg-Marquardt: the fraction of each diagonal added to the pose block
FLAT_ERROR_DEG = 120.0  # the expected error of a random pose (uncertainty.expected_error_deg of a flat belief)


@dataclass(frozen=True)
class BandData:
    """The particles' data on one band, as the fit's tensors: frequencies [K, 2] (cycles per box), whitening
    weights [K], spectra complex64 [b, K] and CTFs [b, K] (:meth:`LocalFit.on_band`)."""

    frequencies: tf.Tensor
    weights: tf.Tensor
    spectra: tf.Tensor
    ctf: tf.Tensor


@dataclass
class FitState:
    """Where a batch's fit stands: poses [b, 4], origins [b, 2] (px), scores [b] on the current band, and the
    normal equations there, Gram matrices [b, 6, 6] and projections [b, 6] (:meth:`LocalFit.normal_equations`)."""

    poses: np.ndarray
    origins: np.ndarray
    scores: np.ndarray
    gram: np.ndarray
    projections: np.ndarray

    def take(self, chosen: np.ndarray, other: FitState) -> None:
        """Replace the rows ``chosen`` [b] (boolean) by those of ``other``."""
        for name in ("poses", "origins", "scores", "gram", "projections"):
            getattr(self, name)[chosen] = getattr(other, name)[chosen]


class LocalFit:
    """Gauss-Newton fits of the poses and origins of particles against one map, through its projector (the map
    sampled like the particles)."""

    def __init__(self, projector: FourierProjector):
        self.projector = projector
        self.size = projector.size
        self._equations = tf.function(self._equations_eager, jit_compile=True, autograph=False)

    def _equations_eager(self, matrices, frequencies, weights, spectra, ctf, origins):
        values, gradients = self.projector.table.read_with_gradient(matrices, frequencies)
        # Real arithmetic throughout (pairs of real and imaginary parts): XLA runs it faster than complex.
        central = (tf.math.real(values), tf.math.imag(values))
        rotated = [  # g = A grad P, elementwise (an einsum here keeps XLA from fusing the rest)
            tf.reduce_sum(matrices[:, None, :, :] * part(gradients)[:, :, None, :], axis=-1)
            for part in (tf.math.real, tf.math.imag)
        ]
        kx, ky = frequencies[:, 0], frequencies[:, 1]
        turn = 2.0 * math.pi / self.size
        phase = turn * tf.einsum("bc,kc->bk", origins, frequencies)
        modulation = (ctf * tf.cos(phase), ctf * tf.sin(phase))
        model = _times(modulation, central)
        along = [(rotated[0][..., axis], rotated[1][..., axis]) for axis in range(3)]  # g = A grad P
        cross = (  # k x g with k = (kx, ky, 0)
            _scaled(ky, along[2]),
            _scaled(-kx, along[2]),
            (kx * along[1][0] - ky * along[0][0], kx * along[1][1] - ky * along[0][1]),
        )
        basis = [model, *(_times(modulation, term) for term in cross)]
        basis += [(-turn * k * model[1], turn * k * model[0]) for k in (kx, ky)]  # i 2 pi k / D m
        real = tf.stack([tf.concat(pair, axis=-1) for pair in basis], axis=1)  # [b, 6, 2K]: Re(conj(a) b) = dot
        data = tf.concat([tf.math.real(spectra), tf.math.imag(spectra)], axis=-1)
        weighted = real * tf.concat([weights, weights], axis=-1)
        gram = tf.matmul(weighted, real, transpose_b=True)
        projections = tf.linalg.matvec(weighted, data)
        return gram, projections

    def on_band(self, band, spectra: np.ndarray, ctf: np.ndarray) -> BandData:
        """The particles' data on ``band`` (a matcher band: frequencies and whitening weights), made once for the
        steps that share it: spectra [b, D * (D // 2 + 1)] from
        :func:`~cryo_forum.prediction.matching.particle_spectra` and CTFs in the same layout."""
        return BandData(
            tf.constant(band.frequencies.astype(np.float32)),
            tf.constant(band.weights.astype(np.float32)),
            tf.constant(spectra[:, band.flat].astype(np.complex64)),
            tf.constant(ctf[:, band.flat].astype(np.float32)),
        )

    def normal_equations(self, data: BandData, poses, origins) -> tuple[np.ndarray, ...]:
        """Scores [b], Gram matrices [b, 6, 6] and projections [b, 6] (float64) of the particles of ``data`` at
        poses [b, 4] and origins [b, 2] (px)."""
        matrices = geometry.quaternion_to_matrix(poses).astype(np.float32)
        origins = np.asarray(origins, dtype=np.float32)
        gram, projections = self._equations(
            tf.constant(matrices), data.frequencies, data.weights, data.spectra, data.ctf, tf.constant(origins)
        )
        gram, projections = gram.numpy().astype(np.float64), projections.numpy().astype(np.float64)
        scores = projections[:, 0] / np.sqrt(np.maximum(gram[:, 0, 0], 1e-30))
        return scores, gram, projections

    def state(self, data: BandData, poses, origins) -> FitState:
        """The fit's state at poses [b, 4] and origins [b, 2] on the band of ``data``."""
        return FitState(np.array(poses), np.array(origins), *self.normal_equations(data, poses, origins))

    def iterate(
        self,
        data: BandData,
        state: FitState,
        active: np.ndarray,
        start: np.ndarray,
        trust_deg: float,
        shift_px: float,
        iterations: int,
    ) -> FitState:
        """``iterations`` Gauss-Newton steps of the ``active`` [b] particles (the others stay), each rotation step
        at most ``trust_deg`` and each origin within ``shift_px`` of ``start`` [b, 2] (0: origins kept). A step
        that does not raise the score is halved for the next iteration."""
        scale = np.ones(len(state.scores))
        step = _step(state.gram, state.projections, math.radians(trust_deg), shift_px)
        for _ in range(iterations):
            moved = geometry.matrix_to_quaternion(geometry.rotvec_to_matrix(step[:, :3] * scale[:, None]))
            poses = geometry.quaternion_multiply(moved, state.poses)
            origins = _within(state.origins + step[:, 3:] * scale[:, None], start, shift_px)
            trial = self.state(data, poses, origins)
            better = active & (trial.scores > state.scores)
            state.take(better, trial)
            scale = np.where(better, 1.0, 0.5 * scale)
            step = np.where(
                better[:, None], _step(state.gram, state.projections, math.radians(trust_deg), shift_px), step
            )
        state.poses = geometry.canonical_quaternion(state.poses)
        return state


def _times(a: tuple, b: tuple) -> tuple:
    """The product of two complex arrays held as (real, imaginary) pairs."""
    return a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]


def _scaled(factor, a: tuple) -> tuple:
    """A real factor times a complex array held as a (real, imaginary) pair."""
    return factor * a[0], factor * a[1]


def _within(origins: np.ndarray, start: np.ndarray, reach: float) -> np.ndarray:
    """Origins [b, 2] pulled back onto the circle of radius ``reach`` about ``start`` [b, 2] when beyond it."""
    offset = origins - start
    length = np.hypot(offset[:, 0], offset[:, 1])
    shrink = np.where(length > reach, reach / np.maximum(length, 1e-12), 1.0)
    return start + offset * shrink[:, None]


def _step(gram: np.ndarray, projections: np.ndarray, trust: float, shift_px: float) -> np.ndarray:
    """Gauss-Newton steps [b, 5] (rotation vector in radians, origin shift in px) from the normal equations, the
    rotation's length at most ``trust`` and the shift's at most ``shift_px``; zero where the fitted scale
    ``alpha`` is not positive (the model does not explain the image)."""
    diagonal = np.diagonal(gram, axis1=1, axis2=2)
    scale = 1.0 / np.sqrt(np.maximum(diagonal, 1e-30))  # Jacobi scaling keeps the solve well conditioned
    scaled = gram * scale[:, :, None] * scale[:, None, :]
    scaled += DAMPING * np.diag((np.arange(PARAMETERS) > 0).astype(np.float64))[None]
    coefficients = np.linalg.solve(scaled, (projections * scale)[..., None])[..., 0] * scale
    alpha = coefficients[:, 0]
    fitted = alpha > 0
    step = np.where(fitted[:, None], coefficients[:, 1:] / np.where(fitted, alpha, 1.0)[:, None], 0.0)
    rotation, shift = step[:, :3], step[:, 3:] if shift_px > 0 else np.zeros_like(step[:, 3:])
    rotation *= np.minimum(1.0, trust / np.maximum(np.linalg.norm(rotation, axis=1), 1e-30))[:, None]
    shift *= np.minimum(1.0, shift_px / np.maximum(np.linalg.norm(shift, axis=1), 1e-30))[:, None]
    return np.concatenate([rotation, shift], axis=1)


def expected_errors_deg(state: FitState) -> np.ndarray:
    """Each pose's expected error [b] (degrees): the RMS rotation of the Laplace approximation at the fit, from
    the curvature ``alpha^2`` times the Schur complement of the scale in the Gram matrix's pose block. A fit
    with no peak (alpha or the curvature not positive) gets FLAT_ERROR_DEG, the error of a random pose."""
    gram, projections = state.gram, state.projections
    alpha = projections[:, 0] / np.maximum(gram[:, 0, 0], 1e-30)
    pose = slice(1, 4)
    schur = gram[:, pose, pose] - gram[:, pose, :1] * gram[:, :1, pose] / np.maximum(gram[:, :1, :1], 1e-30)
    precision = alpha[:, None, None] ** 2 * schur
    determinant = np.linalg.det(precision)
    peaked = (alpha > 0) & (determinant > 0) & np.all(np.linalg.eigvalsh(precision) > 0, axis=1)
    safe = np.where(peaked[:, None, None], precision, np.eye(3)[None])
    variance = np.trace(np.linalg.inv(safe), axis1=1, axis2=2)
    errors = np.degrees(np.sqrt(np.maximum(variance, 0.0)))
    return np.where(peaked, np.minimum(errors, FLAT_ERROR_DEG), FLAT_ERROR_DEG)
