"""Fourier-space image operations shared by simulation, preprocessing and reconstruction.

Images are float arrays ``[..., y, x]`` of even or odd size D whose centre (the rotation origin)
is pixel ``D // 2`` along each axis, as in RELION. A centred transform puts frequency zero at index
``D // 2`` as well.
"""

from __future__ import annotations

import numpy as np


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
    images = np.asarray(images)
    shifts = np.asarray(shifts_px, dtype=np.float64)
    size = images.shape[-1]
    freq = np.fft.fftfreq(size)
    ramp_x = np.exp(-2j * np.pi * freq[None, :] * shifts[..., 0, None, None])
    ramp_y = np.exp(-2j * np.pi * freq[:, None] * shifts[..., 1, None, None])
    moved = np.fft.ifft2(np.fft.fft2(images) * ramp_x * ramp_y).real
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
