"""Figures people would rather look at than read: particle montages (later: error and FSC plots).

Uses matplotlib's Agg backend through the object API, so it never needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryo_forum.io.atomic import atomic_output


def particle_montage(
    images: np.ndarray,
    path: str | Path,
    labels: list[str] | None = None,
    highlight: np.ndarray | None = None,
    columns: int = 8,
    title: str | None = None,
) -> Path:
    """Save a grid of particle images [N, D, D] as a PNG; ``highlight`` (bool [N]) frames images in red.

    Each image is shown with its own 1-99 % intensity range, y pointing up as in RELION's display.
    """
    from matplotlib.figure import Figure

    images = np.asarray(images)
    rows = int(np.ceil(len(images) / columns))
    figure = Figure(figsize=(1.6 * columns, 1.7 * rows + (0.4 if title else 0)), dpi=100)
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.set_xticks([])
        axis.set_yticks([])
        if index >= len(images):
            axis.set_axis_off()
            continue
        low, high = np.percentile(images[index], [1, 99])
        axis.imshow(images[index], cmap="gray", vmin=low, vmax=high, origin="lower")
        if labels is not None:
            axis.set_title(labels[index], fontsize=7)
        if highlight is not None and highlight[index]:
            for spine in axis.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2.5)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def error_histogram(errors_deg: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Save the distribution of pose errors (degrees) as a histogram with its cumulative curve."""
    from matplotlib.figure import Figure

    errors_deg = np.asarray(errors_deg, dtype=np.float64)
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axis = figure.subplots()
    axis.hist(errors_deg, bins=np.linspace(0, 180, 91), color="tab:blue", alpha=0.8)
    axis.set_xlabel("pose error (degrees)")
    axis.set_ylabel("particles")
    axis.set_xlim(0, 180)
    cumulative = axis.twinx()
    ordered = np.sort(errors_deg)
    cumulative.plot(ordered, np.arange(1, len(ordered) + 1) / max(len(ordered), 1), color="tab:red")
    cumulative.set_ylabel("fraction at or below", color="tab:red")
    cumulative.set_ylim(0, 1)
    median = float(np.median(errors_deg)) if len(errors_deg) else float("nan")
    axis.axvline(median, color="black", linestyle="--", label=f"median {median:.1f} deg")
    axis.legend(loc="center right")
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)
