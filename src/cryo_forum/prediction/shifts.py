"""Origins of particles that were picked but never aligned: trial centres for the network, and a translational
search at the predicted poses against the reference map.

For a particle with pose A, CTF C and image spectrum X, the reference map's central slice P at A predicts the
image up to a shift. The noise-whitened cross-correlation ``c(s) = sum_k w_k X(k) conj(C P)(k) e^{2 pi i k.s / D}``
(``w_k`` = 1 / the set's noise power in the shell of k) peaks at the shift s of the particle's content from the
box centre, found on the pixel grid by one inverse FFT and refined to a fraction of a pixel by a parabola through
the peak and its neighbours. RELION's origin is the opposite: the particle appears at the box centre minus its
origin, so ``origin = -s``.

A network trained on centred particles gives its poses for a particle re-centred by each of a grid of trial
origins (:func:`trial_origins`); :class:`OriginSearch` scores every trial by the correlation peak within reach
of its centre at its pose, and keeps the best. A wrong centre gives a wrong pose and a poor fit, so the search
needs no pose to start from.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from cryo_forum import geometry
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.particle_ctf import ParticleCTFs
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.prediction.matching import shell_noise_power
from cryo_forum.progress import progress as progress_bar


def trial_origins(reach_px: float, step_px: float) -> np.ndarray:
    """Origins (x, y, px) [T, 2] of a square grid of spacing ``step_px`` within ``reach_px`` of the centre, (0, 0)
    first. Every origin within reach is at most ``step_px / sqrt(2)`` from one of them."""
    count = int(np.ceil(reach_px / step_px))
    steps = np.arange(-count, count + 1) * step_px
    grid = np.stack(np.meshgrid(steps, steps, indexing="xy"), axis=-1).reshape(-1, 2)
    grid = grid[np.hypot(*grid.T) <= reach_px + 0.5 * step_px]
    return grid[np.argsort(np.hypot(*grid.T), kind="stable")]


def parabola_offset(left: np.ndarray, centre: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Sub-pixel offset in [-0.5, 0.5] of the vertex of the parabola through three samples [N]."""
    curvature = left - 2.0 * centre + right
    offset = np.divide(0.5 * (left - right), curvature, out=np.zeros_like(centre), where=curvature < 0)
    return np.clip(offset, -0.5, 0.5)


def _peaks(correlation: np.ndarray, allowed: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peak shifts (x, y) [b, 2] and peak values [b] of correlation images [b, D, D] (FFT order) within
    ``allowed`` [b, D, D]: the best allowed pixel, refined by the parabola through it and its neighbours."""
    size = correlation.shape[-1]
    masked = np.where(allowed, correlation, -np.inf).reshape(len(correlation), -1)
    row, column = np.unravel_index(np.argmax(masked, axis=1), (size, size))
    take = np.arange(len(correlation))
    centre = correlation[take, row, column]
    around = {
        (dy, dx): correlation[take, (row + dy) % size, (column + dx) % size]
        for dy, dx in ((0, -1), (0, 1), (-1, 0), (1, 0))
    }
    shift_x = offsets[column] + parabola_offset(around[0, -1], centre, around[0, 1])
    shift_y = offsets[row] + parabola_offset(around[-1, 0], centre, around[1, 0])
    return np.stack([shift_x, shift_y], axis=-1), centre


class OriginSearch:
    """The translational search of one set's particles against one reference [D, D, D] sampled like them.

    The whitening weights (from the set's mean power spectrum per shell, ``noise_power`` [D // 2 + 1], by default
    read from up to 2000 particles), the map's projector and the CTFs are prepared once, so the searches of one
    prediction share them.
    """

    def __init__(self, particles: ParticleSet, reference: np.ndarray, noise_power: np.ndarray | None = None) -> None:
        self.particles = particles
        size = particles.box_size
        self.grid = FourierGrid(size)
        noise_power = shell_noise_power(particles) if noise_power is None else noise_power
        noise = noise_power[np.minimum(self.grid.shells, size // 2)]
        self.weights = np.where(self.grid.inside, 1.0, 0.0) / noise
        self.weights[0, 0] = 0.0  # the background level says nothing of the shift
        self.projector = FourierProjector(reference)
        self.ctfs = ParticleCTFs(particles)
        self.offsets = np.fft.fftfreq(size) * size  # shift of each correlation pixel, FFT order

    def __call__(
        self,
        quaternions: np.ndarray,
        indices: np.ndarray | None = None,
        max_shift_px: float | None = None,
        centres: np.ndarray | None = None,
        batch_size: int = 128,
        progress: bool = True,
        band: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Origins [n, 2] (x, y, px of the stack), peak scores [n] and chosen trials [n] of particles ``indices``
        (default all).

        ``quaternions`` are the poses, [n, 4], or [T, n, 4] for T trials per particle whose origins ``centres``
        [T, n, 2] (default zero) are where each trial's search is centred; a trial's origin is searched within
        ``max_shift_px`` (default a quarter of the box) of its centre, and the best-scoring trial is kept. The
        score is the whitened correlation at the peak divided by its norm: comparable between particles of one
        set, larger is a better fit. With ``band`` (cycles per box) only the frequencies below it are compared.
        """
        indices = np.arange(len(self.particles)) if indices is None else np.asarray(indices)
        quaternions = np.asarray(quaternions, dtype=np.float64)
        if quaternions.ndim == 2:
            quaternions = quaternions[None]
        trials = len(quaternions)
        centres = np.zeros((trials, len(indices), 2)) if centres is None else np.asarray(centres, dtype=np.float64)
        size = self.particles.box_size
        reach = size / 4.0 if max_shift_px is None else float(max_shift_px)
        origins = np.zeros((len(indices), 2))
        scores = np.full(len(indices), -np.inf)
        chosen = np.zeros(len(indices), dtype=np.int64)
        with progress_bar(len(indices), description="origins", enabled=progress) as bar:
            for start in range(0, len(indices), batch_size):
                rows = slice(start, start + batch_size)
                batch = indices[rows]
                spectra = self.weighted_spectra(self.particles.images(batch))
                ctf = self.ctfs(batch)
                for trial in range(trials):
                    poses, around = quaternions[trial, rows], centres[trial, rows]
                    found, score = self.best_origins(spectra, ctf, poses, around, reach, band)
                    better = score > scores[rows]
                    origins[rows][better] = found[better]
                    scores[rows] = np.where(better, score, scores[rows])
                    chosen[rows] = np.where(better, trial, chosen[rows])
                bar.update(len(batch))
        return origins, scores, chosen

    def weighted_spectra(self, images: np.ndarray) -> np.ndarray:
        """Whitened rfft2 [b, D, D // 2 + 1] of images [b, D, D], phases relative to the box centre."""
        return self.weights * np.fft.rfft2(np.fft.ifftshift(np.asarray(images, dtype=np.float64), axes=(-2, -1)))

    def best_origins(
        self, spectra, ctf, quaternions, centres, reach: float, band: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Origins [b, 2] (px) within ``reach`` of ``centres`` [b, 2] that best fit the poses [b, 4], and their
        normalised peak scores [b]; spectra from :meth:`weighted_spectra`, CTFs [b, D, D // 2 + 1]. With ``band``
        (cycles per box) only the projections' frequencies below it are read and compared."""
        size = self.particles.box_size
        if band is None:
            projections = self.projector.spectra(quaternions).numpy()
        else:
            flat, frequencies, _ = self.grid.band(band)
            matrices = geometry.quaternion_to_matrix(quaternions).astype(np.float32)
            projections = np.zeros((len(quaternions), self.grid.kx.size), dtype=np.complex64)
            projections[:, flat] = self.projector.central_slices(matrices, frequencies).numpy()
            projections = projections.reshape(len(quaternions), *self.grid.shape)
        models = projections * ctf
        product = spectra * np.conj(models)
        correlation = scipy.fft.irfft2(product, s=(size, size), workers=-1)  # content moved by (x, y)
        norm = np.sqrt(np.sum(self.weights * self.grid.hermitian_weights * np.abs(models) ** 2, axis=(1, 2)))
        centre = -np.asarray(centres)  # content shift of the trial's centre
        across = _wrapped(self.offsets[None, :] - centre[:, 0, None], size) ** 2  # [b, D] along x
        down = _wrapped(self.offsets[None, :] - centre[:, 1, None], size) ** 2  # [b, D] along y
        shifts, peak = _peaks(correlation, down[:, :, None] + across[:, None, :] <= reach**2, self.offsets)
        return -shifts, peak / np.maximum(norm, 1e-30)


def _wrapped(offsets: np.ndarray, size: int) -> np.ndarray:
    """Pixel offsets taken to the periodic box's nearest image, in [-D / 2, D / 2)."""
    return (offsets + size / 2) % size - size / 2
