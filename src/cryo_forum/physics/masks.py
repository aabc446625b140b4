"""An automatic soft mask around the particle of a map, for masked FSCs and the FSC-weighted reconstruction.

The map [D, D, D] is low-passed with a Gaussian (amplitude 1/2 at ``1 / lowpass_angstrom``). The solvent level
and its noise are the median and the MAD-based standard deviation of the voxels outside the inscribed sphere
(robust to some density reaching in there). Voxels above

    threshold = solvent + max(NOISE_SIGMAS * noise, PEAK_FRACTION * (peak - solvent))

form the core: well above what low-passed noise reaches (a noise-only map gives no core at all) and a fraction
of the particle's peak. Only the largest connected component (6-connected, ``scipy.ndimage.label``) is kept;
the mask is 1 within ``extend_px`` voxels of it and falls to 0 over a raised-cosine edge ``soft_edge_px`` wide
(both by the Euclidean distance to the core). :func:`half_map_mask` masks the mean of two half maps, low-passed
to twice their resolution (at least MASK_LOWPASS_ANGSTROM, at most a quarter of the box: a worse map gets a
smoother mask). Maps are ``[z, y, x]``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cryo_forum.errors import InvalidSetting
from cryo_forum.physics.resolution import HALF_MAP_THRESHOLD, fsc, resolution_at

MASK_LOWPASS_ANGSTROM = 15.0
EXTEND_PX = 3.0
SOFT_EDGE_PX = 4.0
NOISE_SIGMAS = 5.0
PEAK_FRACTION = 0.1
_MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution per median absolute deviation


def lowpass(volume: np.ndarray, pixel_size: float, angstrom: float) -> np.ndarray:
    """The map [D, D, D] filtered by the Gaussian whose amplitude is 1/2 at ``1 / angstrom`` (float64)."""
    cutoff = pixel_size / angstrom  # cycles per voxel
    sigma_px = np.sqrt(np.log(2.0) / 2.0) / (np.pi * cutoff)  # real-space sigma of that Gaussian
    size = volume.shape[-1]
    spectrum = ndimage.fourier_gaussian(np.fft.rfftn(np.asarray(volume, dtype=np.float64)), sigma_px, n=size)
    return np.fft.irfftn(spectrum, s=volume.shape, axes=(0, 1, 2))


def outside_sphere(size: int) -> np.ndarray:
    """The voxels [D, D, D] (bool) farther than D / 2 from the centre voxel D // 2: the corners of the box."""
    z, y, x = np.ogrid[:size, :size, :size]
    centre = size // 2
    return (z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2 > (size / 2.0) ** 2


def mask_threshold(lowpassed: np.ndarray) -> float:
    """The level (see the module) above which a low-passed map [D, D, D] is taken to be particle."""
    corners = lowpassed[outside_sphere(lowpassed.shape[0])]
    solvent = float(np.median(corners))
    noise = _MAD_TO_SIGMA * float(np.median(np.abs(corners - solvent)))
    peak = float(lowpassed.max())
    return solvent + max(NOISE_SIGMAS * noise, PEAK_FRACTION * (peak - solvent))


def largest_component(binary: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a bool map [D, D, D] (all False if it has none)."""
    labels, count = ndimage.label(binary)
    if count == 0:
        return np.zeros_like(binary, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def soft_edge(core: np.ndarray, extend_px: float, soft_edge_px: float) -> np.ndarray:
    """float32 [D, D, D]: 1 within ``extend_px`` of the ``core`` voxels, a raised cosine to 0 over the next
    ``soft_edge_px``, 0 beyond (and everywhere if the core is empty)."""
    if not core.any():
        return np.zeros(core.shape, dtype=np.float32)
    distance = ndimage.distance_transform_edt(~core)
    into_edge = np.clip((distance - extend_px) / max(soft_edge_px, 1e-9), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * into_edge))).astype(np.float32)


def auto_mask(
    volume: np.ndarray,
    pixel_size: float,
    lowpass_angstrom: float = MASK_LOWPASS_ANGSTROM,
    extend_px: float = EXTEND_PX,
    soft_edge_px: float = SOFT_EDGE_PX,
) -> np.ndarray:
    """A soft mask float32 [D, D, D] in [0, 1] around the particle of a map [D, D, D] (see the module); all zeros
    when nothing stands out of the noise."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InvalidSetting("volume", f"a mask needs a cubic map [D, D, D], got shape {volume.shape}")
    for setting, value in (("pixel_size", pixel_size), ("lowpass_angstrom", lowpass_angstrom)):
        if not value > 0:
            raise InvalidSetting(setting, f"must be positive, got {value}")
    for setting, value in (("extend_px", extend_px), ("soft_edge_px", soft_edge_px)):
        if not value >= 0:
            raise InvalidSetting(setting, f"must be >= 0, got {value}")
    smooth = lowpass(volume, pixel_size, lowpass_angstrom)
    core = largest_component(smooth > mask_threshold(smooth))
    return soft_edge(core, extend_px, soft_edge_px)


def mask_lowpass(resolution_angstrom: float, size: int, pixel_size: float) -> float:
    """How far (A) to low-pass a map of ``resolution_angstrom`` in a box of ``size`` px before masking it."""
    return min(max(MASK_LOWPASS_ANGSTROM, 2.0 * resolution_angstrom), size * pixel_size / 4.0)


def half_map_mask(half1: np.ndarray, half2: np.ndarray, pixel_size: float) -> np.ndarray:
    """:func:`auto_mask` float32 [D, D, D] of the mean of two maps [D, D, D], low-passed by :func:`mask_lowpass`
    of their unmasked FSC's resolution (at 0.143)."""
    frequencies, curve = fsc(half1, half2, pixel_size)
    resolution = resolution_at(frequencies, curve, HALF_MAP_THRESHOLD).angstrom
    mean = 0.5 * (np.asarray(half1, dtype=np.float64) + half2)
    return auto_mask(mean, pixel_size, mask_lowpass(resolution, mean.shape[0], pixel_size))
