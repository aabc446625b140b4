"""Fourier-slice projection of a 3-D map in TensorFlow (batched, usable inside tf.function and tf.data).

A projection ``image(x, y) = integral of V(A^T [x, y, z]) dz`` is the inverse transform of the map's central
slice at pose A (:mod:`cryo_forum.physics.slices`): read trilinearly from the map's oversampled, gridding-corrected
spectrum on the half plane strictly below Nyquist, zero beyond, transformed back. Image sums are exact (the
zero-frequency term is the map's total).

Arrays follow the package conventions: volumes ``[z, y, x]``, images ``[y, x]`` (x = column), centre at
index ``D // 2``; poses are RELION matrices A or their quaternions ``[x, y, z, w]`` (:mod:`cryo_forum.geometry`).
"""

from __future__ import annotations

import numpy as np

from cryo_forum import geometry, resources
from cryo_forum.physics.slices import SpectrumTable
from cryo_forum.tensorflow_quiet import tf


class FourierProjector:
    """Projections of one cubic map [D, D, D] at arbitrary poses, as float32 images [N, D, D].

    ``oversampling`` (an integer >= 1) zero-pads the map to ``oversampling * D`` before its 3-D FFT; 2 keeps the
    interpolation error of trilinear lookup well below 1 % of the signal. The padded spectrum is held as a
    :class:`~cryo_forum.physics.slices.SpectrumTable` of about ``(oversampling * D)^3`` complex64 values (17 MB for
    D = 64 at oversampling 2, 1.1 GB for D = 256); a map whose projector would not fit in the available memory is
    refused (:class:`~cryo_forum.errors.InvalidSetting` ``size``) before anything is allocated.
    """

    def __init__(self, volume: np.ndarray, oversampling: int = 2):
        volume = np.asarray(volume)
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ValueError(f"the projector needs a cubic volume [D, D, D], got shape {volume.shape}")
        if int(oversampling) != oversampling or oversampling < 1:
            raise ValueError(f"oversampling must be a positive integer, got {oversampling}")
        self.size = int(volume.shape[0])
        self.oversampling = int(oversampling)
        self.padded_size = self.size * self.oversampling
        resources.require_memory(
            "size",
            resources.projector_bytes(self.size, self.oversampling),
            f"a {self.size} px map",
            f"its projector (a {self.oversampling}x-padded spectrum of {self.padded_size}^3 complex values)",
        )
        self.table = SpectrumTable([volume], self.oversampling)
        self._project_matrices = tf.function(
            self._project_matrices_eager,
            input_signature=[tf.TensorSpec([None, 3, 3], tf.float32)],
            autograph=False,
        )

    def _project_matrices_eager(self, matrices: tf.Tensor) -> tf.Tensor:
        size = self.size
        images = tf.signal.irfft2d(self.table.half_planes(matrices), fft_length=[size, size])
        return tf.roll(images, shift=[size // 2, size // 2], axis=[1, 2])  # origin from index 0 to D // 2

    def central_slices(self, matrices, frequencies) -> tf.Tensor:
        """Spectra of the projections at chosen frequencies only: matrices A [N, 3, 3], frequencies [P, 2] -> [N, P].

        ``frequencies`` are (kx, ky) in cycles per box, below Nyquist; the values are those of
        ``rfft2(ifftshift(projection))`` there (phases relative to the box centre ``D // 2``), computed without
        forming the images, which is what a search that scores thousands of poses per particle needs. Each new
        pair of shapes compiles once: callers keep N and P fixed (pad the last batch).
        """
        return self.table.read(matrices, frequencies)

    def spectra(self, quaternions) -> tf.Tensor:
        """Whole spectra complex64 [N, D, D // 2 + 1] of the projections at poses [N, 4]: ``rfft2(ifftshift(
        projection))`` without forming the images, zero from Nyquist on."""
        quaternions = tf.convert_to_tensor(quaternions, dtype=tf.float32)
        matrices = geometry.quaternion_to_matrix_tf(quaternions / tf.norm(quaternions, axis=-1, keepdims=True))
        return self.table.half_planes(matrices)

    def project(self, rotations) -> tf.Tensor:
        """Project at poses given as quaternions [N, 4] ([x, y, z, w] of A) or matrices A [N, 3, 3] -> [N, D, D]."""
        rotations = tf.convert_to_tensor(rotations, dtype=tf.float32)
        if rotations.shape.rank == 2 and rotations.shape[-1] == 4:
            rotations = geometry.quaternion_to_matrix_tf(rotations / tf.norm(rotations, axis=-1, keepdims=True))
        elif rotations.shape.rank != 3 or tuple(rotations.shape[-2:]) != (3, 3):
            raise ValueError(f"rotations must be quaternions [N, 4] or matrices [N, 3, 3], got {rotations.shape}")
        return self._project_matrices(rotations)

    def project_numpy(self, rotations: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """NumPy convenience: quaternions [N, 4] or matrices [N, 3, 3] -> float32 images [N, D, D], in batches.

        A batch reads at most about ``resources.PROJECTION_POINTS`` spectrum points (fewer images for large boxes),
        so its temporaries (about 110 bytes per point) stay near 100 MB whatever the box.
        """
        rotations = np.asarray(rotations, dtype=np.float64)
        matrices = geometry.quaternion_to_matrix(rotations) if rotations.shape[-1] == 4 else rotations
        matrices = matrices.reshape(-1, 3, 3).astype(np.float32)
        out = np.empty((len(matrices), self.size, self.size), dtype=np.float32)
        batch_size = resources.chunk_of(batch_size, self.size * (self.size // 2 + 1), resources.PROJECTION_POINTS)
        for start in range(0, len(matrices), batch_size):
            out[start : start + batch_size] = self._project_matrices(matrices[start : start + batch_size]).numpy()
        return out


def project(volume: np.ndarray, rotations: np.ndarray, oversampling: int = 2) -> np.ndarray:
    """Project a cubic map [D, D, D] at poses (quaternions [N, 4] or matrices [N, 3, 3]) -> float32 [N, D, D]."""
    return FourierProjector(volume, oversampling).project_numpy(rotations)
