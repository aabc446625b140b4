"""Fourier-slice projection of a 3-D map in TensorFlow (batched, usable inside tf.function and tf.data).

By the projection-slice theorem the 2-D spectrum of ``image(x, y) = integral of V(A^T [x, y, z]) dz`` is the
3-D spectrum of V on the plane through the origin spanned by the first two rows of A:
``F_image(kx, ky) = F_V(A^T [kx, ky, 0])``. The projector holds the centred spectrum of the map zero-padded
``oversampling`` times (finer frequency sampling, so that trilinear interpolation is accurate), reads it
trilinearly on the rotated plane (half plane only: the images are real), zeroes everything at or beyond
Nyquist and transforms back. The map is divided beforehand by the real-space footprint of trilinear
interpolation (``sinc^2`` per axis, the gridding correction), so the projections are not apodised; the
zero-frequency term, always read exactly on its grid point, keeps the true total so image sums are exact.

Arrays follow the package conventions: volumes ``[z, y, x]``, images ``[y, x]`` (x = column), centre at
index ``D // 2``; poses are RELION matrices A or their quaternions ``[x, y, z, w]`` (:mod:`cryo_forum.geometry`).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from cryo_forum import geometry, resources
from cryo_forum.tensorflow_quiet import tf


def _gridding_correction(size: int, padded: int) -> np.ndarray:
    """1 / (sinc^2 footprint of trilinear interpolation) along one axis of the unpadded box [size] (float32)."""
    offsets = (np.arange(size) - size // 2) / padded
    return (1.0 / np.sinc(offsets) ** 2).astype(np.float32)


def _padded_spectrum(volume: np.ndarray, padded: int) -> tf.Variable:
    """The centred spectrum ``fftshift(fftn(ifftshift(box)))`` of the gridding-corrected map zero-padded to
    ``padded``^3 (map voxel D // 2 at box voxel padded // 2), as a flat complex64 variable [padded^3].

    Built without the padded box or any complex128 copy: the map's transform along z first (a padded x D x D
    slab, zero-padding done by placing the voxels where ifftshift would), then a few planes at a time their 2-D
    transforms, written in place into the variable (a TensorFlow constant made from a NumPy array would need two
    more copies). The zero-frequency term is set to the map's exact total.
    """
    size = volume.shape[0]
    correction = _gridding_correction(size, padded)
    rolled = (np.arange(size) - size // 2) % padded  # where ifftshift of the padded box puts each voxel
    slab = np.zeros((padded, size, size), dtype=np.complex64)
    slab[rolled] = np.asarray(volume, dtype=np.float32) * correction[:, None, None]
    slab *= correction[None, :, None] * correction[None, None, :]
    slab = scipy.fft.fft(slab, axis=0, overwrite_x=True)
    spectrum = tf.Variable(tf.zeros([0], tf.complex64), shape=tf.TensorShape([None]), trainable=False)
    spectrum.assign(tf.zeros([padded**3], tf.complex64))
    plane = padded * padded
    step = resources.chunk_of(padded, plane)
    for start in range(0, padded, step):
        rows = np.arange(start, min(start + step, padded))
        planes = np.zeros((len(rows), padded, padded), dtype=np.complex64)
        planes[:, rolled[:, None], rolled[None, :]] = slab[(rows - padded // 2) % padded]  # fftshift along z
        planes = np.fft.fftshift(scipy.fft.fft2(planes, overwrite_x=True), axes=(1, 2))
        if start <= padded // 2 < start + len(rows):
            planes[padded // 2 - start, padded // 2, padded // 2] = np.sum(volume, dtype=np.float64)
        # The raw op writes into the variable's buffer; slicing the variable (spectrum[a:b].assign) would read
        # it first and so copy all of it.
        tf.raw_ops.ResourceStridedSliceAssign(
            ref=spectrum.handle,
            begin=[start * plane],
            end=[rows[-1] * plane + plane],
            strides=[1],
            value=planes.ravel(),
        )
    return spectrum


class FourierProjector:
    """Projections of one cubic map [D, D, D] at arbitrary poses, as float32 images [N, D, D].

    ``oversampling`` (an integer >= 1) zero-pads the map to ``oversampling * D`` before its 3-D FFT; 2 keeps the
    interpolation error of trilinear lookup well below 1 % of the signal. The padded spectrum is held as a
    complex64 variable of ``(oversampling * D)^3`` values (16 MB for D = 64 at oversampling 2, 1.1 GB for D = 256),
    never written after it is built; a map whose projector would not fit in the available memory is refused
    (:class:`~cryo_forum.errors.InvalidSetting` ``size``) before anything is allocated.
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
        size = self.size
        resources.require_memory(
            "size",
            resources.projector_bytes(size, self.oversampling),
            f"a {size} px map",
            f"its projector (a {self.oversampling}x-padded spectrum of {self.padded_size}^3 complex values)",
        )
        self._spectrum = _padded_spectrum(volume, self.padded_size)

        # Image frequencies (kx, ky, 0) of the half plane in irfft2d order: rows ky in FFT order, columns kx >= 0.
        ky = np.fft.fftfreq(size) * size
        kx = np.arange(size // 2 + 1, dtype=np.float64)
        grid_y, grid_x = np.meshgrid(ky, kx, indexing="ij")
        self._frequencies = tf.constant(
            np.stack([grid_x.ravel(), grid_y.ravel()], axis=-1) * self.oversampling, dtype=tf.float32
        )
        inside = np.hypot(grid_x, grid_y) < size / 2.0  # strictly below Nyquist: keeps the slice Hermitian
        self._mask = tf.constant(inside.reshape(1, size, size // 2 + 1).astype(np.complex64))
        self._project_matrices = tf.function(
            self._project_matrices_eager,
            input_signature=[tf.TensorSpec([None, 3, 3], tf.float32)],
        )
        # XLA fuses the eight gathers and their index arithmetic: four times faster on CPUs (compiled per shape).
        self._slices = tf.function(self._interpolate, jit_compile=True)

    def _interpolate(self, matrices: tf.Tensor, frequencies: tf.Tensor) -> tf.Tensor:
        """Trilinear reads of the padded spectrum [N, P] at image frequencies [P, 2] (padded-grid units) under A."""
        padded = self.padded_size
        # Frequency (x, y, z) of the map sampled by image frequency k: A^T [kx, ky, 0] = kx A[0] + ky A[1].
        coords = tf.einsum("pj,njc->npc", frequencies, matrices[:, :2, :]) + float(padded // 2)
        base = tf.floor(coords)
        frac = coords - base
        base = tf.cast(base, tf.int32)
        values = tf.zeros(tf.shape(coords)[:2], dtype=tf.complex64)
        for corner in range(8):
            offset = tf.constant([corner & 1, (corner >> 1) & 1, (corner >> 2) & 1], dtype=tf.int32)
            index = tf.math.floormod(base + offset, padded)  # periodic, as the DFT is
            weight = tf.reduce_prod(
                tf.where(tf.cast(offset, tf.bool), frac, 1.0 - frac), axis=-1
            )  # [N, P] product over x, y, z
            flat = (index[..., 2] * padded + index[..., 1]) * padded + index[..., 0]  # array order [z, y, x]
            values += tf.complex(weight, 0.0) * tf.gather(self._spectrum, flat)
        return values

    def _project_matrices_eager(self, matrices: tf.Tensor) -> tf.Tensor:
        size = self.size
        half = tf.reshape(self._interpolate(matrices, self._frequencies), [-1, size, size // 2 + 1]) * self._mask
        images = tf.signal.irfft2d(half, fft_length=[size, size])
        return tf.roll(images, shift=[size // 2, size // 2], axis=[1, 2])  # origin from index 0 to D // 2

    def central_slices(self, matrices, frequencies) -> tf.Tensor:
        """Spectra of the projections at chosen frequencies only: matrices A [N, 3, 3], frequencies [P, 2] -> [N, P].

        ``frequencies`` are (kx, ky) in cycles per box, below Nyquist; the values are those of
        ``rfft2(ifftshift(projection))`` there (phases relative to the box centre ``D // 2``), computed without
        forming the images, which is what a search that scores thousands of poses per particle needs. Each new
        pair of shapes compiles once: callers keep N and P fixed (pad the last batch).
        """
        scaled = tf.convert_to_tensor(frequencies, tf.float32) * float(self.oversampling)
        return self._slices(tf.convert_to_tensor(matrices, tf.float32), scaled)

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
