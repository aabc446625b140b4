"""The Fourier grid of an image and the Fourier-space image operations of simulation, preprocessing and
reconstruction.

Images are float arrays ``[..., y, x]`` of even or odd size D whose centre (the rotation origin)
is pixel ``D // 2`` along each axis, as in RELION. A centred transform puts frequency zero at index
``D // 2`` as well. :class:`FourierGrid` describes the half plane ``numpy.fft.rfft2`` lays out (rows ky in
FFT order, columns kx >= 0) in cycles per box; every module that needs frequencies, shells, Hermitian
weights or the gridding correction takes them from it.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np


def _integer_frequencies(size: int) -> np.ndarray:
    """Frequencies in cycles per box in FFT order, exact integers as float64 [size]."""
    return np.rint(np.fft.fftfreq(size) * size)


def _hermitian_weights(kx: np.ndarray, size: int) -> np.ndarray:
    """2 where a half-spectrum coefficient stands for itself and its unstored mirror image, 1 where it is its own
    (the kx = 0 column or plane and, for even sizes, the Nyquist one)."""
    return np.where((kx == 0) | (2 * kx == size), 1.0, 2.0)


class FourierGrid:
    """The rfft2 half plane of a D x D image: frequencies in cycles per box, arrays ``[D, D // 2 + 1]``.

    ``kx``, ``ky`` (float64) are each coefficient's frequency (rows ky in FFT order, columns kx >= 0), ``modulus``
    their length and ``shells`` the rounded length (integer radial shells). ``inside`` is strictly below Nyquist
    (``|k| < D / 2``): the coefficients a projection or a central slice holds, since dropping the Nyquist ring of
    an even box keeps a slice Hermitian whatever its pose. ``hermitian_weights`` count each coefficient with its
    unstored mirror image (sums over them equal sums over the full plane). The 3-D counterparts for maps
    ``[D, D, D // 2 + 1]`` (rfftn layout) are :meth:`volume_shells` and :meth:`volume_inside`.
    """

    def __init__(self, size: int):
        self.size = int(size)
        self.shape = (self.size, self.size // 2 + 1)
        self.ky, self.kx = np.meshgrid(
            _integer_frequencies(self.size), np.arange(self.shape[1], dtype=np.float64), indexing="ij"
        )
        self.modulus = np.hypot(self.kx, self.ky)
        self.shells = np.rint(self.modulus).astype(np.int64)
        self.inside = self.kx**2 + self.ky**2 < (self.size / 2.0) ** 2
        self.hermitian_weights = _hermitian_weights(self.kx, self.size)

    @cached_property
    def inside_frequencies(self) -> np.ndarray:
        """(kx, ky) [K, 2] of the coefficients ``inside``, in their flat (row-major) order."""
        return np.stack([self.kx[self.inside], self.ky[self.inside]], axis=-1)

    def band(self, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The coefficients with 0 < |k| < radius (at most Nyquist): flat indices into the half plane [K],
        (kx, ky) [K, 2] and Hermitian weights [K]. Frequency zero is left out (the background level)."""
        chosen = (self.modulus > 0) & (self.modulus < min(radius, self.size / 2.0))
        flat = np.flatnonzero(chosen.ravel())
        frequencies = np.stack([self.kx.ravel()[flat], self.ky.ravel()[flat]], axis=-1)
        return flat, frequencies, self.hermitian_weights.ravel()[flat]

    def gridding_correction(self, padded: int) -> np.ndarray:
        """1 / sinc^2 [D] along one axis of the box: the inverse footprint of trilinear interpolation on a grid
        ``padded`` voxels wide (a map multiplied by it per axis gives unapodised trilinear slices)."""
        offsets = (np.arange(self.size) - self.size // 2) / padded
        return 1.0 / np.sinc(offsets) ** 2

    def _volume_squared_modulus(self) -> np.ndarray:
        """|k|^2 [D, D, D // 2 + 1] of a D^3 map's rfftn coefficients (exact: integers)."""
        k = _integer_frequencies(self.size)
        return k[:, None, None] ** 2 + k[None, :, None] ** 2 + self.kx[0][None, None, :] ** 2

    def volume_shells(self) -> tuple[np.ndarray, np.ndarray]:
        """Shell number (rounded radius) [D, D, D // 2 + 1] of every rfftn coefficient of a D^3 map, and its
        Hermitian weight [D, D, D // 2 + 1] (2 where it stands for a conjugate pair, else 1)."""
        shells = np.rint(np.sqrt(self._volume_squared_modulus())).astype(np.int64)
        return shells, np.broadcast_to(_hermitian_weights(self.kx[0], self.size), shells.shape)

    def volume_inside(self) -> np.ndarray:
        """Coefficients of a D^3 map's rfftn strictly below Nyquist, bool [D, D, D // 2 + 1]."""
        return self._volume_squared_modulus() < (self.size / 2.0) ** 2


def fft2_centered(images: np.ndarray) -> np.ndarray:
    """2-D FFT over the last two axes with the real-space and frequency origins at index D // 2."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1))), axes=(-2, -1))


def ifft2_centered(spectra: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fft2_centered` (complex result; take ``.real`` for real images)."""
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(spectra, axes=(-2, -1))), axes=(-2, -1))


def translate_images(images: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Move image content by (dx, dy) pixels (sub-pixel, periodic) with a Fourier phase ramp.

    images [N, D, D] (or [D, D]); shifts_px [N, 2] (or [2]) as (x, y): content at pixel p moves to p + shift.
    """
    import scipy.fft  # here, not at the top: the command line's help imports this module and must stay light

    images = np.asarray(images)
    shifts = np.asarray(shifts_px, dtype=np.float64)
    size = images.shape[-1]
    complex_type = np.complex64 if images.dtype == np.float32 else np.complex128  # single precision stays single
    freq = np.fft.fftfreq(size)
    ramp_x = np.exp(-2j * np.pi * freq[None, :] * shifts[..., 0, None, None]).astype(complex_type)
    ramp_y = np.exp(-2j * np.pi * freq[:, None] * shifts[..., 1, None, None]).astype(complex_type)
    spectra = scipy.fft.fft2(images.astype(complex_type), workers=-1)
    spectra *= ramp_x  # two separable ramps: far fewer exponentials than one over the whole grid
    spectra *= ramp_y
    moved = scipy.fft.ifft2(spectra, workers=-1, overwrite_x=True).real
    return moved.astype(images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32)


def fourier_crop(images: np.ndarray, new_size: int) -> np.ndarray:
    """Downsample square images [..., D, D] to [..., new_size, new_size] by cropping their spectrum.

    Mean intensity per pixel is preserved (the spectrum is rescaled by (new_size / D)^2). Cropping is
    the exact band limit, unlike real-space interpolation, which aliases. new_size may equal D.
    """
    images = np.asarray(images)
    size = images.shape[-1]
    if new_size > size:
        raise ValueError(f"cannot Fourier-crop {size} px images to a larger size {new_size}")
    if new_size == size:
        return images.copy()
    spectra = fft2_centered(images)
    start = size // 2 - new_size // 2
    cropped = spectra[..., start : start + new_size, start : start + new_size]
    out = ifft2_centered(cropped).real * (new_size / size) ** 2
    return out.astype(images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32)


def fourier_crop_and_filter(images: np.ndarray, new_size: int, multiplier: np.ndarray) -> np.ndarray:
    """:func:`fourier_crop` with the kept spectrum multiplied by a real filter (e.g. sign(CTF)) on the way.

    images [..., D, D]; multiplier [..., new_size, new_size] (broadcasts) on the unshifted FFT grid of the
    cropped image (``numpy.fft.fftfreq`` order, as :func:`cryo_forum.physics.ctf.compute_ctf` returns it, with the
    cropped pixel size). This equals filtering at the full size with the same filter values at the same
    physical frequencies and cropping afterwards, but evaluates the filter only on the small grid.
    """
    images = np.asarray(images)
    size = images.shape[-1]
    if new_size > size:
        raise ValueError(f"cannot Fourier-crop {size} px images to a larger size {new_size}")
    dtype = _working_dtype(images)
    start = size // 2 - new_size // 2
    spectra = fft2_centered(images.astype(dtype, copy=False))
    cropped = spectra[..., start : start + new_size, start : start + new_size]
    cropped = cropped * np.fft.fftshift(np.asarray(multiplier, dtype=dtype), axes=(-2, -1))
    return (ifft2_centered(cropped).real * (new_size / size) ** 2).astype(dtype, copy=False)


def _working_dtype(images: np.ndarray) -> np.dtype:
    """float32 or float64 to compute in: single precision stays single (numpy FFTs keep it), ints -> float32."""
    return np.dtype(np.float64 if images.dtype == np.float64 else np.float32)


def _quarter_turns(images: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Rotate the content of images [N, D, D] by turns[n] * 90 degrees about pixel D // 2 (exact, periodic)."""
    size = images.shape[-1]
    centre = size // 2
    v, u = np.indices((size, size)) - centre
    out = images.copy()
    for turn in (1, 2, 3):
        chosen = turns == turn
        if not chosen.any():
            continue
        cos, sin = ((0, 1), (-1, 0), (0, -1))[turn - 1]
        source_x = (centre + cos * u + sin * v) % size  # Rz(-alpha) (p - c) + c
        source_y = (centre - sin * u + cos * v) % size
        out[chosen] = images[chosen][:, source_y, source_x]
    return out


def _shear(images: np.ndarray, shifts: np.ndarray, axis: int) -> np.ndarray:
    """Move each line of images [N, A, B] along ``axis`` (-1: rows, -2: columns) by shifts [N, lines] pixels.

    The line length must be odd: without a Nyquist term the Fourier shift is exactly unitary and real.
    """
    length = images.shape[axis]
    spectra = np.fft.rfft(images, axis=axis)
    freqs = np.fft.rfftfreq(length).astype(images.dtype)
    ramp_arg = shifts.astype(images.dtype)[:, :, None] * freqs  # [N, lines, frequencies]
    if axis == -2:
        ramp_arg = np.swapaxes(ramp_arg, -1, -2)
    return np.fft.irfft(spectra * np.exp(ramp_arg * images.dtype.type(-2.0 * np.pi) * 1j), n=length, axis=axis)


def _odd_fast_length(minimum: int) -> int:
    """The smallest odd length >= minimum whose only prime factors are 3, 5, 7 and 11 (fast FFTs)."""
    length = minimum if minimum % 2 else minimum + 1
    while True:
        rest = length
        for prime in (3, 5, 7, 11):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return length
        length += 2


def _rotate_by_shears(images: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate images [N, D, D] by angles [N] (|angle| <= pi/4) with three Fourier shears on a padded grid.

    ``R(a) = Sx(-tan(a/2)) Sy(sin a) Sx(-tan(a/2))``. Every intermediate point of the D x D square stays
    within sqrt(2) D / 2 of the centre for |a| <= pi/4, so an odd padded length of about 1.45 D or more
    avoids wrap-around. Only the D rows holding content enter the first shear and only the D output rows
    leave the last one.
    """
    size = images.shape[-1]
    centre = size // 2
    padded = _odd_fast_length(2 * int(np.ceil(0.72 * size)) + 3)
    offset = padded // 2 - centre
    tan_half = -np.tan(angles / 2.0)[:, None]
    line = np.arange(size) - centre  # rows of the input and of the output
    padded_line = np.arange(padded) - padded // 2  # columns of the padded grid

    wide = np.zeros((len(images), size, padded), dtype=images.dtype)
    wide[:, :, offset : offset + size] = images
    wide = _shear(wide, tan_half * line, axis=-1)
    tall = np.zeros((len(images), padded, padded), dtype=images.dtype)
    tall[:, offset : offset + size] = wide
    tall = _shear(tall, np.sin(angles)[:, None] * padded_line, axis=-2)
    rows = _shear(tall[:, offset : offset + size], tan_half * line, axis=-1)
    return rows[:, :, offset : offset + size]


def rotate_images(images: np.ndarray, angles_rad: np.ndarray) -> np.ndarray:
    """Rotate image content by +alpha about pixel D // 2 without smoothing it (exact in-plane augmentation).

    images [N, D, D] (or [D, D]); angles_rad [N] (or a scalar). In the (x = column, y = row) frame the result
    is ``out(p) = in(Rz(-alpha) (p - c) + c)``: a projection at psi becomes the projection at psi - alpha, and
    a pose quaternion R becomes R Rz(-alpha). ``scipy.ndimage.rotate(img, +alpha)`` turns the other way.

    Whole quarter turns are exact pixel permutations; the rest (|angle| <= 45 degrees) is applied as three
    shears with Fourier phase ramps on a zero-padded odd grid (Larkin/Unser sinc interpolation), which is
    unitary, so white noise keeps its power instead of being low-passed as by spline interpolation, and
    rotating by -alpha undoes rotating by +alpha. Content moved out of the box is lost and the corners
    come in as zero. Cost: three pairs of 1-D FFT passes, the largest over about (1.5 D)^2 pixels.
    """
    images = np.asarray(images)
    if images.ndim not in (2, 3) or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotate_images needs square images [N, D, D] or [D, D], got shape {images.shape}")
    dtype = _working_dtype(images)
    batch = images.reshape(-1, *images.shape[-2:]).astype(dtype, copy=False)
    angles = np.broadcast_to(np.asarray(angles_rad, dtype=np.float64), (len(batch),))
    turns = np.round(angles / (np.pi / 2.0))
    residual = angles - turns * (np.pi / 2.0)
    turns = turns.astype(np.int64) % 4
    # Quarter turns commute with a true rotation but not with how the shears fold the spectrum's corners:
    # turning first for positive and last for negative angles makes -alpha the exact inverse of +alpha.
    positive = angles >= 0
    out = _quarter_turns(batch, np.where(positive, turns, 0))
    moving = residual != 0.0
    if moving.any():
        out[moving] = _rotate_by_shears(out[moving], residual[moving])
    out = _quarter_turns(out, np.where(positive, 0, turns))
    return out.reshape(images.shape)
