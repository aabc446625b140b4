"""The FSC report: a curve and its resolutions as JSON and as a plot (numerics in
:mod:`cryo_forum.physics.resolution`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cryo_forum.analysis.plots import save_png
from cryo_forum.io.atomic import atomic_directory
from cryo_forum.physics.resolution import THRESHOLDS, MaskedFSC, resolution_at

JSON_NAME = "fsc.json"
PNG_NAME = "fsc.png"


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
    a mask), named under ``"fsc_curve"``, with the ``"unmasked"`` one and, with a mask, the raw ``"masked"`` and
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
        fsc_curve="masked_corrected" if result.has_mask else "unmasked",
        **details,
        **extra,
    )
