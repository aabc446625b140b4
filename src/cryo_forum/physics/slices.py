"""Central slices of 3-D spectra: the one trilinear reader (TensorFlow, XLA) and its adjoint, the insertion.

By the projection-slice theorem the 2-D spectrum of ``image(x, y) = integral of V(A^T [x, y, z]) dz`` is the
3-D spectrum of V on the plane through the origin spanned by the first two rows of A:
``F_image(kx, ky) = F_V(A^T [kx, ky, 0])``. :class:`SpectrumTable` holds the centred spectra of one or several
maps zero-padded ``oversampling`` times (finer frequency sampling, so that trilinear interpolation is
accurate) and reads them trilinearly at rotated image frequencies. Each map is divided beforehand by the
real-space footprint of trilinear interpolation (the gridding correction of :class:`FourierGrid`), so slices are
not apodised; the zero-frequency term, always read exactly on its grid point, keeps the map's true total.

:func:`insert_slices` is the reader's adjoint, the step of direct Fourier reconstruction: it spreads values at
rotated image frequencies onto a half grid (``numpy.fft.rfftn`` layout, samples at kx < 0 entering as their
conjugate at -k) with the same trilinear weights. For the spectrum ``H`` (half grid) of a real map and ``V``
(the full cube) ``Re sum conj(read(V)) x = Re sum conj(H) insert(x)`` for any slice values x.

Coordinates are (x, y, z) of the spectrum, arrays are ``[z, y, x]``; poses are RELION matrices A
(:mod:`cryo_forum.geometry`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from cryo_forum import resources
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.tensorflow_quiet import tf

_CORNERS = np.indices((2, 2, 2)).reshape(3, -1)  # (z, y, x) bits of the eight corners, x fastest


def _wrapped_planes(volume: np.ndarray, padded: int, rows: np.ndarray, slab: np.ndarray) -> np.ndarray:
    """Planes ``rows`` [R] of the wrapped table of the corrected map's centred padded spectrum -> complex64
    [R, P + 2, P + 2]; ``slab`` is the map's transform along z [P, D, D], in FFT order along z."""
    size = volume.shape[0]
    rolled = (np.arange(size) - size // 2) % padded  # where ifftshift of the padded box puts each voxel
    source = (np.arange(padded + 2) - 1 - padded // 2) % padded  # FFT-order index of each wrapped index
    planes = np.zeros((len(rows), padded, padded), dtype=np.complex64)
    planes[:, rolled[:, None], rolled[None, :]] = slab[source[rows]]
    planes = scipy.fft.fft2(planes, overwrite_x=True)[:, source[:, None], source[None, :]]
    planes[source[rows] == 0, padded // 2 + 1, padded // 2 + 1] = np.sum(volume, dtype=np.float64)  # exact total
    return planes


def _corrected_slab(volume: np.ndarray, padded: int) -> np.ndarray:
    """The gridding-corrected map [D, D, D], zero-padded along z to P (in ifftshift order) and transformed along z:
    complex64 [P, D, D]."""
    size = volume.shape[0]
    correction = FourierGrid(size).gridding_correction(padded).astype(np.float32)
    rolled = (np.arange(size) - size // 2) % padded
    slab = np.zeros((padded, size, size), dtype=np.complex64)
    slab[rolled] = np.asarray(volume, dtype=np.float32) * correction[:, None, None]
    slab *= correction[None, :, None] * correction[None, None, :]
    return scipy.fft.fft(slab, axis=0, overwrite_x=True)


class SpectrumTable:
    """Centred padded spectra of cubic maps [D, D, D] (one or several, one size) and trilinear reads of them.

    ``values`` is a complex64 variable of ``len(volumes) * Q^3`` values, ``Q = P + 2`` with ``P = oversampling *
    D``: map m's ``fftshift(fftn(ifftshift(box)))`` of its gridding-corrected map zero-padded to P^3 (map voxel
    D // 2 at box voxel P // 2), with one periodic plane before and after every axis (``np.pad(..., 1,
    mode="wrap")``), so that the eight corners of any frequency below Nyquist are plain offsets, without a
    modulo. It is built in place a few planes at a time, without the padded box or any complex128 copy, and never
    written afterwards.
    """

    def __init__(self, volumes: Sequence[np.ndarray], oversampling: int = 2):
        size = int(np.shape(volumes[0])[0])
        self.size, self.oversampling, self.maps = size, int(oversampling), len(volumes)
        self.padded = self.oversampling * size
        self._wrapped = self.padded + 2
        cube = self._wrapped**3
        self._index_type = tf.int32 if self.maps * cube < 2**31 else tf.int64
        self.values = tf.Variable(tf.zeros([0], tf.complex64), shape=tf.TensorShape([None]), trainable=False)
        self.values.assign(tf.zeros([self.maps * cube], tf.complex64))
        for number, volume in enumerate(volumes):
            self._write(number, np.asarray(volume))
        q = self._wrapped
        self._corners = tf.constant((_CORNERS[0] * q + _CORNERS[1]) * q + _CORNERS[2], self._index_type)
        grid = FourierGrid(size)
        self._points = tf.constant(grid.inside_frequencies * self.oversampling, tf.float32)  # [K, 2]
        layout = np.full(grid.inside.size, grid.inside.sum(), dtype=np.int32)  # half plane -> point (or a zero)
        layout[grid.inside.ravel()] = np.arange(grid.inside.sum())
        self._layout = tf.constant(layout)
        # XLA fuses the gathers, the index arithmetic and the interpolation (compiled once per shape); plain Python
        # control flow only, so no autograph.
        self._read = tf.function(self._read_eager, jit_compile=True, autograph=False)
        self._read_with_gradient = tf.function(self._read_with_gradient_eager, jit_compile=True, autograph=False)
        self._half_planes = tf.function(self._half_planes_eager, jit_compile=True, autograph=False)

    def _write(self, number: int, volume: np.ndarray) -> None:
        """Write map ``number``'s wrapped spectrum into ``values``, a few planes at a time."""
        padded, q = self.padded, self._wrapped
        slab = _corrected_slab(volume, padded)
        step = resources.chunk_of(q, q * q)
        for start in range(0, q, step):
            planes = _wrapped_planes(volume, padded, np.arange(start, min(start + step, q)), slab)
            # The raw op writes into the variable's buffer; slicing the variable (values[a:b].assign) would read
            # it first and so copy all of it.
            offset = (number * q + start) * q * q
            tf.raw_ops.ResourceStridedSliceAssign(
                ref=self.values.handle,
                begin=[offset],
                end=[offset + planes.size],
                strides=[1],
                value=planes.ravel(),
            )

    def _corners_at(self, matrices: tf.Tensor, points: tf.Tensor, maps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The eight corner values [N, K, 2, 2, 2] (z, y, x bits) around each rotated point and the point's
        fractions (x, y, z) [N, K, 3] within its cell."""
        q = self._wrapped
        # Frequency (x, y, z) of the map sampled by image frequency k: A^T [kx, ky, 0] = kx A[0] + ky A[1].
        coords = tf.einsum("pj,njc->npc", points, matrices[:, :2, :]) + float(self.padded // 2 + 1)
        base = tf.floor(coords)
        fractions = coords - base
        base = tf.cast(base, self._index_type)
        first = (base[..., 2] * q + base[..., 1]) * q + base[..., 0] + tf.cast(maps, self._index_type)[:, None] * q**3
        values = tf.gather(self.values, first[..., None] + self._corners)  # [N, K, 8]
        return tf.reshape(values, [tf.shape(values)[0], tf.shape(values)[1], 2, 2, 2]), fractions

    def _read_eager(self, matrices: tf.Tensor, points: tf.Tensor, maps: tf.Tensor) -> tf.Tensor:
        values, fractions = self._corners_at(matrices, points, maps)
        frac = tf.complex(fractions, 0.0)
        for axis in range(3):  # interpolate along x, then y, then z
            values = values[..., 0] + frac[..., axis, *(None,) * (2 - axis)] * (values[..., 1] - values[..., 0])
        return values

    def _read_with_gradient_eager(self, matrices: tf.Tensor, points: tf.Tensor, maps: tf.Tensor):
        values, fractions = self._corners_at(matrices, points, maps)
        parts = []
        for corners in (tf.math.real(values), tf.math.imag(values)):  # real arithmetic: XLA runs it faster
            # Interpolating along one axis at a time turns the corners' difference across that axis into the
            # derivative along it, and carries the derivatives already taken along.
            derivatives = []
            for axis in range(3):  # x, then y, then z
                weight = fractions[..., axis, *(None,) * (2 - axis)]
                derivatives = [d[..., 0] + weight * (d[..., 1] - d[..., 0]) for d in derivatives]
                derivatives.append(corners[..., 1] - corners[..., 0])
                corners = corners[..., 0] + weight * (corners[..., 1] - corners[..., 0])
            parts.append((corners, tf.stack(derivatives, axis=-1) * float(self.oversampling)))
        (real, real_gradient), (imag, imag_gradient) = parts
        return tf.complex(real, imag), tf.complex(real_gradient, imag_gradient)

    def _half_planes_eager(self, matrices: tf.Tensor, maps: tf.Tensor) -> tf.Tensor:
        values = self._read_eager(matrices, self._points, maps)
        values = tf.concat([values, tf.zeros_like(values[:, :1])], axis=1)
        return tf.reshape(tf.gather(values, self._layout, axis=1), [-1, self.size, self.size // 2 + 1])

    def read(self, matrices, frequencies, maps=None) -> tf.Tensor:
        """Trilinear values complex64 [N, K] of map ``maps`` [N] (default 0) at image frequencies [K, 2] (kx, ky in
        cycles per box, below Nyquist) under poses A [N, 3, 3]: ``rfft2(ifftshift(projection))`` there."""
        matrices = tf.convert_to_tensor(matrices, tf.float32)
        points = tf.convert_to_tensor(frequencies, tf.float32) * float(self.oversampling)
        return self._read(matrices, points, self._map_numbers(matrices, maps))

    def read_with_gradient(self, matrices, frequencies, maps=None) -> tuple[tf.Tensor, tf.Tensor]:
        """As :meth:`read`, and the gradient of the trilinear interpolant there: values complex64 [N, K] and their
        derivatives [N, K, 3] along the map's frequency axes (x, y, z), per cycle per box. The derivative is the
        interpolant's own (constant across a cell, exact for it), read from the same eight corners, so a local fit
        gets its Jacobian at the cost of a read."""
        matrices = tf.convert_to_tensor(matrices, tf.float32)
        points = tf.convert_to_tensor(frequencies, tf.float32) * float(self.oversampling)
        return self._read_with_gradient(matrices, points, self._map_numbers(matrices, maps))

    def half_planes(self, matrices, maps=None) -> tf.Tensor:
        """Whole central slices complex64 [N, D, D // 2 + 1] (rfft2 layout, phases relative to the box centre, zero
        from Nyquist on) of map ``maps`` [N] (default 0) under poses A [N, 3, 3]."""
        matrices = tf.convert_to_tensor(matrices, tf.float32)
        return self._half_planes(matrices, self._map_numbers(matrices, maps))

    def _map_numbers(self, matrices: tf.Tensor, maps) -> tf.Tensor:
        if maps is None:
            return tf.zeros(tf.shape(matrices)[:1], tf.int32)
        return tf.convert_to_tensor(maps, tf.int32)


def insert_slices(
    data: np.ndarray,
    padded: int,
    matrices: np.ndarray,
    points: np.ndarray,
    values: np.ndarray,
    weight: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> None:
    """Add slice values [m, K] (complex) at ``points`` [K, 2] (kx, ky in padded-grid units, below its Nyquist)
    under poses A [m, 3, 3] into ``data``, the flat half grid [P, P, P // 2 + 1] (rfftn layout, P = ``padded``),
    with trilinear weights, and real ``weights`` [m, K] likewise into ``weight`` (if given). In place; the adjoint
    of :meth:`SpectrumTable.read` for real maps (see the module docstring). ``padded`` must be even: then every
    corner of a sample below Nyquist lies in the half grid."""
    if padded % 2:
        raise ValueError(f"slices are inserted into even grids, got {padded}")
    half = padded // 2 + 1
    matrices = np.asarray(matrices, dtype=np.float64)
    coords = points[None, :, 0, None] * matrices[:, None, 0, :] + points[None, :, 1, None] * matrices[:, None, 1, :]
    flip = coords[..., 0] < 0  # stored as the conjugate at -k
    coords[flip] *= -1.0
    values = np.where(flip, np.conj(values), values)
    base = np.floor(coords)
    frac = coords - base
    base = base.astype(np.int64)
    indices, trilinear = [], []
    for bits in _CORNERS.T:
        offset = bits[::-1]  # (x, y, z)
        trilinear.append(np.prod(np.where(offset.astype(bool), frac, 1.0 - frac), axis=-1).ravel())
        x, y, z = np.moveaxis(base + offset, -1, 0)
        indices.append((((z % padded) * padded + y % padded) * half + x).ravel())
    index = np.concatenate(indices)
    trilinear = np.concatenate(trilinear)
    spread = np.tile(values.ravel(), 8) * trilinear
    length = len(data)
    data.real += np.bincount(index, weights=spread.real, minlength=length)
    data.imag += np.bincount(index, weights=spread.imag, minlength=length)
    if weight is not None:
        weight += np.bincount(index, weights=trilinear * np.tile(np.asarray(weights).ravel(), 8), minlength=length)
