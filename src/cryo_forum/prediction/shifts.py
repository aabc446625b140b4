"""Origins of particles that were picked but never aligned: a translational search at their predicted poses.

For a particle with pose A, CTF C and image spectrum X, the reference map's central slice P at A predicts the
image up to a shift. The noise-whitened cross-correlation ``c(s) = sum_k w_k X(k) conj(C P)(k) e^{2 pi i k.s / D}``
(``w_k`` = 1 / the set's noise power in the shell of k) peaks at the shift s of the particle's content from the
box centre, found on the pixel grid by one inverse FFT and refined to a fraction of a pixel by a parabola through
the peak and its neighbours. RELION's origin is the opposite: the particle appears at the box centre minus its
origin, so ``origin = -s``. The search is limited to ``max_shift_px``.
"""

from __future__ import annotations

import numpy as np

from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.particle_ctf import ParticleCTFs
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.prediction.matching import shell_noise_power
from cryo_forum.progress import progress as progress_bar


def _parabola_offset(left: np.ndarray, centre: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Sub-pixel offset in [-0.5, 0.5] of the vertex of the parabola through three samples [N]."""
    curvature = left - 2.0 * centre + right
    offset = np.divide(0.5 * (left - right), curvature, out=np.zeros_like(centre), where=curvature < 0)
    return np.clip(offset, -0.5, 0.5)


def _peaks(correlation: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peak shifts (x, y) [b, 2] and peak values [b] of correlation images [b, D, D] (FFT order)."""
    size = correlation.shape[-1]
    row, column = np.unravel_index(np.argmax(correlation.reshape(len(correlation), -1), axis=1), (size, size))
    take = np.arange(len(correlation))
    centre = correlation[take, row, column]
    around = {}
    for dy, dx in ((0, -1), (0, 1), (-1, 0), (1, 0)):
        values = correlation[take, (row + dy) % size, (column + dx) % size]
        around[dy, dx] = np.where(np.isfinite(values), values, centre)  # beyond the search: a flat parabola
    shift_x = offsets[column] + _parabola_offset(around[0, -1], centre, around[0, 1])
    shift_y = offsets[row] + _parabola_offset(around[-1, 0], centre, around[1, 0])
    return np.stack([shift_x, shift_y], axis=-1), centre


def search_origins(
    particles: ParticleSet,
    quaternions: np.ndarray,
    reference: np.ndarray,
    indices: np.ndarray | None = None,
    max_shift_px: float | None = None,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Origins [n, 2] (x, y, px of the stack) and peak scores [n] of particles ``indices`` (default all) whose
    poses are ``quaternions`` [n, 4], against ``reference`` [D, D, D] sampled like the particles.

    ``max_shift_px`` (default a quarter of the box) bounds the search. The score is the whitened correlation
    at the peak divided by its norm: comparable between particles of one set, larger is a better fit.
    """
    indices = np.arange(len(particles)) if indices is None else np.asarray(indices)
    size = particles.box_size
    reach = size / 4.0 if max_shift_px is None else float(max_shift_px)
    grid = FourierGrid(size)
    weights = np.where(grid.inside, 1.0, 0.0) / shell_noise_power(particles)[np.minimum(grid.shells, size // 2)]
    weights[0, 0] = 0.0  # the background level says nothing of the shift
    projector = FourierProjector(reference)
    ctfs = ParticleCTFs(particles)
    offsets = np.fft.fftfreq(size) * size  # shift of each correlation pixel, FFT order
    allowed = np.hypot(offsets[:, None], offsets[None, :]) <= reach
    origins = np.zeros((len(indices), 2))
    scores = np.zeros(len(indices))
    with progress_bar(len(indices), description="origins", enabled=progress) as bar:
        for start in range(0, len(indices), batch_size):
            rows = slice(start, start + batch_size)
            batch = indices[rows]
            images = particles.images(batch).astype(np.float64)
            spectra = np.fft.rfft2(np.fft.ifftshift(images, axes=(-2, -1)))
            models = np.fft.rfft2(np.fft.ifftshift(projector.project(quaternions[rows]).numpy(), axes=(-2, -1)))
            models *= ctfs(batch)
            product = weights * spectra * np.conj(models)
            correlation = np.fft.irfft2(product, s=(size, size))  # [b, y, x]: content moved by (x, y)
            norm = np.sqrt(np.sum(weights * grid.hermitian_weights * np.abs(models) ** 2, axis=(1, 2)))
            shifts, peak = _peaks(np.where(allowed, correlation, -np.inf), offsets)
            origins[rows] = -shifts
            scores[rows] = peak / np.maximum(norm, 1e-30)
            bar.update(len(batch))
    return origins, scores
