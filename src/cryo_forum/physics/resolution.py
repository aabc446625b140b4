"""Fourier shell correlation (FSC) of two maps and the resolution where it falls below a threshold.

``FSC(s) = Re sum F1 conj(F2) / sqrt(sum |F1|^2 sum |F2|^2)`` over the Fourier shell of radius s (shells one
voxel of the 3-D FFT wide, rounded radius). Half maps of one data set are judged at 0.143 (Rosenthal and
Henderson 2003); a map against an independent reference at 0.5. Maps are ``[z, y, x]`` cubes; frequencies
are in 1/Angstrom, resolutions in Angstrom.

A mask removes the solvent's noise and raises the FSC, but also correlates the maps by itself (both are
multiplied by the same function, which convolves their spectra with the same kernel). :func:`masked_fsc`
corrects for that as RELION's post-processing does (Chen et al. 2013): beyond the shell where the unmasked
FSC first falls below 0.8 both maps get independent random phases, the masked FSC of those, ``FSC_n``,
is what the mask alone produces, and ``FSC_true = (FSC_t - FSC_n) / (1 - FSC_n)`` from there on, with
``FSC_t`` the masked FSC of the maps themselves.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cryo_forum.physics.fourier import FourierGrid

HALF_MAP_THRESHOLD = 0.143
REFERENCE_THRESHOLD = 0.5
THRESHOLDS = (HALF_MAP_THRESHOLD, REFERENCE_THRESHOLD)
RANDOMISE_BELOW = 0.8  # phases are randomised from the shell where the unmasked FSC first falls below this


class Resolution(NamedTuple):
    """Where an FSC curve first drops below a threshold: ``angstrom``; ``nyquist_limited`` if it never does
    (then ``angstrom`` is the Nyquist resolution, a bound: the true resolution is at least as fine)."""

    angstrom: float
    nyquist_limited: bool

    def __str__(self) -> str:
        return f"{self.angstrom:.2f} A (Nyquist-limited)" if self.nyquist_limited else f"{self.angstrom:.2f} A"


def shell_indices(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shell number (rounded radius in FFT voxels) [D, D, D//2+1] of every rfftn coefficient of a D^3 map, and
    the multiplicity [D, D, D//2+1] (2 where the half spectrum stands for a conjugate pair, else 1)."""
    return FourierGrid(size).volume_shells()


def fsc(
    map1: np.ndarray, map2: np.ndarray, pixel_size: float = 1.0, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FSC of two cubic maps [D, D, D] (each multiplied by ``mask`` [D, D, D] first, if given).

    Returns (frequencies [D//2 + 1] in 1/A, from 0 to Nyquist; curve [D//2 + 1]). An empty shell (a map with
    no power there) gives 0.
    """
    map1 = np.asarray(map1, dtype=np.float64)
    map2 = np.asarray(map2, dtype=np.float64)
    if map1.ndim != 3 or len(set(map1.shape)) != 1:
        raise ValueError(f"FSC needs cubic maps [D, D, D], got shape {map1.shape}")
    if map1.shape != map2.shape:
        raise ValueError(f"FSC needs maps of one shape, got {map1.shape} and {map2.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float64)
        if mask.shape != map1.shape:
            raise ValueError(f"the mask has shape {mask.shape}, the maps {map1.shape}")
        map1, map2 = map1 * mask, map2 * mask
    size = map1.shape[0]
    spectrum1, spectrum2 = np.fft.rfftn(map1), np.fft.rfftn(map2)
    shells, multiplicity = shell_indices(size)
    keep = shells <= size // 2
    shells, multiplicity = shells[keep], multiplicity[keep]
    spectrum1, spectrum2 = spectrum1[keep], spectrum2[keep]
    count = size // 2 + 1

    def shell_sum(values: np.ndarray) -> np.ndarray:
        return np.bincount(shells, weights=values * multiplicity, minlength=count)

    cross = shell_sum((spectrum1 * np.conj(spectrum2)).real)
    norm = np.sqrt(shell_sum(np.abs(spectrum1) ** 2) * shell_sum(np.abs(spectrum2) ** 2))
    curve = np.divide(cross, norm, out=np.zeros(count), where=norm > 0)
    frequencies = np.arange(count) / (size * pixel_size)
    return frequencies, curve


def resolution_at(frequencies: np.ndarray, curve: np.ndarray, threshold: float) -> Resolution:
    """The resolution (A) where ``curve`` first falls below ``threshold`` after frequency zero.

    Interpolates linearly in frequency between the last shell at or above the threshold and the first below
    it; if the curve never falls below it, returns the Nyquist resolution with ``nyquist_limited=True``.
    """
    frequencies = np.asarray(frequencies, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    below = np.flatnonzero(curve[1:] < threshold)
    if not len(below):
        return Resolution(float(1.0 / frequencies[-1]), True)
    i = int(below[0]) + 1
    f0, f1, c0, c1 = frequencies[i - 1], frequencies[i], curve[i - 1], curve[i]
    if c0 < threshold:  # shell 0 (one coefficient, FSC +-1) below as well: nothing to interpolate from
        return Resolution(float(1.0 / f1), False)
    crossing = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
    return Resolution(float(1.0 / crossing), False)


class MaskedFSC(NamedTuple):
    """FSC curves [D//2 + 1] of two maps at ``frequencies`` (1/A). ``unmasked``; ``masked``, of the maps times
    the mask; ``randomised``, the masked FSC of the maps with independent random phases from shell
    ``randomised_from`` on (what the mask alone produces there); ``corrected``, the masked curve corrected
    for the mask from that shell on: the one to quote. Without a mask (None or all zeros) ``masked`` and
    ``corrected`` are the unmasked curve, ``randomised`` is zero and ``has_mask`` False."""

    frequencies: np.ndarray
    unmasked: np.ndarray
    masked: np.ndarray
    randomised: np.ndarray
    corrected: np.ndarray
    randomised_from: int
    has_mask: bool

    def resolution(self, threshold: float = HALF_MAP_THRESHOLD) -> Resolution:
        """Where the corrected curve first falls below ``threshold``."""
        return resolution_at(self.frequencies, self.corrected, threshold)


def phase_randomised(volume: np.ndarray, from_shell: int, rng: np.random.Generator) -> np.ndarray:
    """The map [D, D, D] with its Fourier amplitudes kept and its phases random (uniform, independent) in the
    shells >= ``from_shell``. The phases are those of white noise, so the map stays real."""
    volume = np.asarray(volume, dtype=np.float64)
    spectrum = np.fft.rfftn(volume)
    noise = np.fft.rfftn(rng.standard_normal(volume.shape))
    beyond = shell_indices(volume.shape[0])[0] >= from_shell
    spectrum[beyond] = np.abs(spectrum[beyond]) * np.exp(1j * np.angle(noise[beyond]))
    return np.fft.irfftn(spectrum, s=volume.shape, axes=(0, 1, 2))


def masked_fsc(
    map1: np.ndarray,
    map2: np.ndarray,
    mask: np.ndarray | None,
    pixel_size: float = 1.0,
    randomise_below: float = RANDOMISE_BELOW,
    seed: int = 0,
) -> MaskedFSC:
    """The unmasked, masked, phase-randomised and corrected FSC of two maps [D, D, D] with a mask [D, D, D]
    (see the module); ``seed`` fixes the random phases."""
    frequencies, unmasked = fsc(map1, map2, pixel_size)
    if mask is None or not np.any(mask):
        zero = np.zeros_like(unmasked)
        return MaskedFSC(frequencies, unmasked, unmasked, zero, unmasked, len(unmasked), False)
    _, masked = fsc(map1, map2, pixel_size, mask)
    below = np.flatnonzero(unmasked[1:] < randomise_below)
    start = int(below[0]) + 1 if len(below) else len(unmasked)
    randomised = np.zeros_like(masked)
    corrected = masked.copy()
    if start < len(unmasked):
        rng = np.random.default_rng(seed)
        shuffled = [phase_randomised(volume, start, rng) for volume in (map1, map2)]
        randomised = fsc(*shuffled, pixel_size, mask)[1]
        tail, noise = masked[start:], randomised[start:]
        corrected[start:] = np.where(noise < tail, (tail - noise) / (1.0 - noise), 0.0)
    return MaskedFSC(frequencies, unmasked, masked, randomised, corrected, start, True)
