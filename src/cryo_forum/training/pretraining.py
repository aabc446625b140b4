"""Pre-training from the set's own map: a consensus set of a few thousand noisy particles is too small to learn
orientations from, but its reconstruction, CTFs, noise and origins describe an endless supply of particles
like it.

Before a run on labelled particles trains on their images, :func:`pretraining_config` makes a map run from
what the set shows: its reference map (reconstructed from the consensus poses, FSC-weighted and masked), the
CTF of one of its particles for every simulated one, its noise power spectrum and signal-to-noise ratio
(measured on the residuals of its particles against the map's projections). The simulated particles are
centred to within the error ``predict``'s centring leaves (CENTRING_ERROR_PX): a network learns poses from
centred particles several times faster than from particles a few pixels off-centre, and finds the centre of
particles never aligned by trying it (see :mod:`cryo_forum.prediction.shifts`). The simulated particles
start clearer than the set (an SNR curriculum from START_SNR down to the set's own over the first half of the
pre-training), so the network learns features in a fraction of the epochs. The network
trained on those particles (RUN/pretrain/, a run folder of its own) is then fine-tuned on the real images.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.particle_ctf import ParticleCTFs
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.streams.augment import CENTRING_ERROR_PX
from cryo_forum.training.config import LossSchedule, MapData, Optimisation, StarData, TrainingConfig

log = logging.getLogger(__name__)

NOISE_SAMPLE = 1000  # particles whose residuals measure the noise
PARTICLES_PER_EPOCH = 6400
START_SNR = 1.0  # the curriculum's first SNR (when the set's own is lower): features are learnt there quickly
SIMULATED_OUTLIERS = 0.1  # the training stream's own junk kinds: they teach flat beliefs
FINE_TUNE_LEARNING_RATE = 0.3  # of the run's learning rate


@dataclass(frozen=True)
class NoiseEstimate:
    """What the residuals of a set's particles against its map's projections say about its noise."""

    spectrum: np.ndarray  # [D // 2 + 1] mean noise power per radial shell, relative (mean 1)
    snr: float  # var(signal) / var(noise) over the box, as the renderer defines it
    particles: int  # how many particles were measured


def noise_estimate(particles: ParticleSet, indices: np.ndarray, reference: np.ndarray) -> NoiseEstimate:
    """Noise power spectrum and SNR of particles ``indices`` from their residuals against ``reference``.

    Each particle's model is the map's projection at its pose, moved by its origin and multiplied by its CTF,
    scaled by least squares (image and map units differ); the residual is the rest. Medians over particles keep
    unflagged junk (whose residual is all signal) from inflating the noise.
    """
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(indices, size=min(NOISE_SAMPLE, len(indices)), replace=False))
    size = particles.box_size
    grid = FourierGrid(size)
    shells = np.minimum(grid.shells, size // 2).ravel()
    projector = FourierProjector(reference)
    ctfs = ParticleCTFs(particles)
    quaternions, origins = particles.quaternions(), particles.shifts_px()
    counts = np.bincount(shells, weights=grid.hermitian_weights.ravel(), minlength=size // 2 + 1)
    shell_power, snrs = [], []
    for start in range(0, len(chosen), 256):
        rows = chosen[start : start + 256]
        images = particles.images(rows).astype(np.float64)
        projections = projector.project(quaternions[rows]).numpy().astype(np.float64)
        spectra = np.fft.rfft2(np.fft.ifftshift(projections, axes=(-2, -1)))
        phase = np.exp(
            -2j * np.pi * (grid.kx * -origins[rows, 0, None, None] + grid.ky * -origins[rows, 1, None, None]) / size
        )
        models = np.fft.fftshift(np.fft.irfft2(spectra * phase * ctfs(rows), s=(size, size)), axes=(-2, -1))
        images -= images.mean(axis=(1, 2), keepdims=True)
        models -= models.mean(axis=(1, 2), keepdims=True)
        scale = np.sum(images * models, axis=(1, 2)) / np.maximum(np.sum(models**2, axis=(1, 2)), 1e-30)
        signal = scale[:, None, None] * models
        residuals = images - signal
        power = np.abs(np.fft.rfft2(residuals)) ** 2 * grid.hermitian_weights
        per_shell = np.stack([np.bincount(shells, weights=p.ravel(), minlength=size // 2 + 1) for p in power])
        shell_power.append(per_shell / np.maximum(counts, 1e-30))
        snrs.append(np.var(signal, axis=(1, 2)) / np.maximum(np.var(residuals, axis=(1, 2)), 1e-30))
    spectrum = np.median(np.concatenate(shell_power), axis=0)
    spectrum[0] = spectrum[1]  # the images' means were removed: shell 0 says nothing about the noise
    spectrum = np.maximum(spectrum, 1e-3 * spectrum.max()) / np.mean(spectrum)
    return NoiseEstimate(spectrum, float(np.median(np.concatenate(snrs))), len(chosen))


def origin_sigma(particles: ParticleSet) -> float:
    """The spread (std per axis, px) of the set's origins; 0 for a set without origins."""
    return float(np.std(particles.shifts_px()))


def pretraining_config(
    config: TrainingConfig, reference_path: str, pixel_size: float, noise: NoiseEstimate
) -> TrainingConfig:
    """The map run that pre-trains a run on labelled particles (see the module notes)."""
    data: StarData = config.data
    simulated = MapData(
        volume=reference_path,
        apix=pixel_size,
        box_size=config.images.input_size,
        snr=max(noise.snr, 1e-3),
        snr_start=max(START_SNR, noise.snr),
        ctf=True,
        ctf_from=data.star,
        noise_spectrum=[float(value) for value in noise.spectrum],
        max_shift_px=CENTRING_ERROR_PX * config.images.input_size / config.images.image_size,
        outliers=SIMULATED_OUTLIERS,
        particles_per_epoch=PARTICLES_PER_EPOCH,
        n_val=500,
        n_test=0,
    )
    optimisation = dataclasses.replace(config.optimisation, epochs=data.pretrain_epochs)
    images = dataclasses.replace(config.images, pixel_size_in=None, input_size=None)
    return TrainingConfig(
        data=simulated,
        images=images,
        model=config.model,
        loss=config.loss,
        optimisation=optimisation,
        symmetry=config.symmetry,
        seed=config.seed,
    )


def fine_tuning_config(config: TrainingConfig) -> TrainingConfig:
    """The run on the real images after pre-training: a lower learning rate, both losses from the start."""
    optimisation: Optimisation = config.optimisation
    loss = LossSchedule(
        kind="constant", distance_weight=config.loss.distance_weight, direct_weight=config.loss.direct_weight
    )
    return dataclasses.replace(
        config,
        loss=loss,
        optimisation=dataclasses.replace(
            optimisation, learning_rate=optimisation.learning_rate * FINE_TUNE_LEARNING_RATE, warmup_epochs=0.5
        ),
    )
