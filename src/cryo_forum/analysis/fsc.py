"""Fourier shell correlation (FSC) of two maps, the resolution where it falls below a threshold, and its report.

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

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cryo_forum.analysis.plots import save_png
from cryo_forum.io.atomic import atomic_directory
from cryo_forum.physics.fourier import FourierGrid

HALF_MAP_THRESHOLD = 0.143
REFERENCE_THRESHOLD = 0.5
THRESHOLDS = (HALF_MAP_THRESHOLD, REFERENCE_THRESHOLD)
RANDOMISE_BELOW = 0.8  # phases are randomised from the shell where the unmasked FSC first falls below this
JSON_NAME = "fsc.json"
PNG_NAME = "fsc.png"


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
    return np.fft.irfftn(spectrum, s=volume.shape)


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


def fsc_plot(
    frequencies: np.ndarray,
    curve: np.ndarray,
    path: str | os.PathLike,
    thresholds: tuple[float, ...] = THRESHOLDS,
    title: str | None = None,
    label: str = "FSC",
    others: dict[str, np.ndarray] | None = None,
) -> Path:
    """Save the FSC curve as a PNG: frequency (1/A) below, resolution (A) on top, a dashed line and the
    resolution label for each threshold; ``others`` (label -> curve) as thin lines. Written atomically."""
    from matplotlib.figure import Figure

    frequencies = np.asarray(frequencies, dtype=np.float64)
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    axis = figure.subplots()
    others = others or {}
    for (name, other), colour in zip(others.items(), ("tab:grey", "tab:cyan", "tab:olive"), strict=False):
        axis.plot(frequencies, other, color=colour, linewidth=1.0, label=name)
    axis.plot(frequencies, curve, color="tab:blue", linewidth=1.8, label=label)
    axis.axhline(0.0, color="grey", linewidth=0.6)
    colours = ("tab:red", "tab:orange", "tab:green", "tab:purple")
    for k, threshold in enumerate(thresholds):
        colour = colours[k % len(colours)]
        resolution = resolution_at(frequencies, curve, threshold)
        axis.axhline(threshold, color=colour, linestyle="--", linewidth=1.0)
        label = f"FSC = {threshold:g}: {resolution}"
        if not resolution.nyquist_limited:
            axis.axvline(1.0 / resolution.angstrom, color=colour, linestyle=":", linewidth=1.0)
        axis.plot([], [], color=colour, linestyle="--", label=label)
    axis.set_xlim(0.0, frequencies[-1])
    lowest = min(float(np.min(c)) for c in (curve, *others.values()))
    axis.set_ylim(min(-0.1, lowest - 0.05), 1.05)
    axis.set_xlabel("spatial frequency (1/A)")
    axis.set_ylabel("Fourier shell correlation")
    axis.legend(loc="lower left", fontsize=8)
    top = axis.secondary_xaxis("top", functions=(_reciprocal, _reciprocal))
    ticks = np.linspace(0.0, frequencies[-1], 6)[1:]
    top.set_xticks([1.0 / f for f in ticks], labels=[f"{1.0 / f:.1f}" for f in ticks])
    top.set_xlabel("resolution (A)")
    if title:
        axis.set_title(title, fontsize=10)
    return save_png(figure, path)


def _reciprocal(values):
    """1 / x for the resolution axis; frequency zero maps to a huge finite resolution (matplotlib needs finite)."""
    return 1.0 / np.maximum(np.asarray(values, dtype=np.float64), 1e-9)


def fsc_report(
    frequencies: np.ndarray,
    curve: np.ndarray,
    pixel_size: float,
    thresholds: tuple[float, ...] = THRESHOLDS,
    **extra,
) -> dict:
    """The FSC as a JSON-ready dict: curve, resolution at each threshold, pixel size, box; plus ``extra`` keys."""
    entry = curve_entry(frequencies, curve, thresholds)
    return {
        "pixel_size": float(pixel_size),
        "box_size": round(1.0 / (frequencies[1] * pixel_size)),
        "nyquist_angstrom": float(2.0 * pixel_size),
        "resolution": entry["resolution"],
        "frequencies_per_angstrom": [round(float(f), 6) for f in frequencies],
        "fsc": entry["fsc"],
        **extra,
    }


def curve_entry(frequencies: np.ndarray, curve: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """``{"resolution": {threshold: {"angstrom", "nyquist_limited"}}, "fsc": [...]}`` of one curve, for JSON."""
    resolutions = {f"{t:g}": resolution_at(frequencies, curve, t) for t in thresholds}
    return {
        "resolution": {
            key: {"angstrom": round(r.angstrom, 4), "nyquist_limited": r.nyquist_limited}
            for key, r in resolutions.items()
        },
        "fsc": [round(float(c), 6) for c in curve],
    }


def write_fsc(
    out_dir: str | os.PathLike,
    frequencies: np.ndarray,
    curve: np.ndarray,
    pixel_size: float,
    thresholds: tuple[float, ...] = THRESHOLDS,
    title: str | None = None,
    label: str = "FSC",
    others: dict[str, np.ndarray] | None = None,
    **extra,
) -> dict:
    """Write ``fsc.json`` (see :func:`fsc_report`) and ``fsc.png`` (see :func:`fsc_plot`) into out_dir, together
    or not at all."""
    report = fsc_report(frequencies, curve, pixel_size, thresholds, **extra)
    with atomic_directory(out_dir) as staging:
        (staging / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n")
        fsc_plot(frequencies, curve, staging / PNG_NAME, thresholds, title, label, others)
    return report


def write_masked_fsc(
    out_dir: str | os.PathLike,
    result: MaskedFSC,
    pixel_size: float,
    thresholds: tuple[float, ...] = THRESHOLDS,
    title: str | None = None,
    **extra,
) -> dict:
    """:func:`write_fsc` of the curve to quote (``result.corrected``: masked and corrected, or unmasked without
    a mask), named under ``"curve"``, with the ``"unmasked"`` one and, with a mask, the raw ``"masked"`` and
    the ``"phase_randomised"`` ones (their shell and curve) beside it in the JSON and the plot."""
    frequencies = result.frequencies
    details = {
        "unmasked": curve_entry(frequencies, result.unmasked, thresholds),
        "masked": None,
        "phase_randomised": None,
    }
    others = {}
    if result.has_mask:
        shell = result.randomised_from
        details["masked"] = curve_entry(frequencies, result.masked, thresholds)
        details["phase_randomised"] = {
            "from_shell": shell,
            "from_angstrom": round(1.0 / frequencies[shell], 4) if shell < len(frequencies) else None,
            "fsc": [round(float(c), 6) for c in result.randomised],
        }
        others = {"unmasked": result.unmasked, "masked": result.masked, "phase-randomised, masked": result.randomised}
    label = "masked, corrected" if result.has_mask else "unmasked"
    return write_fsc(
        out_dir,
        frequencies,
        result.corrected,
        pixel_size,
        thresholds,
        title,
        label,
        others,
        curve="masked_corrected" if result.has_mask else "unmasked",
        **details,
        **extra,
    )
