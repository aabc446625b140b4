"""Figures people would rather look at than read: particle montages, error, uncertainty and ROC plots.

Uses matplotlib's Agg backend through the object API, so it never needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryo_forum.io.atomic import atomic_output


def save_png(figure, path: str | Path) -> Path:
    """Lay out a matplotlib ``figure`` and write it to ``path`` as a PNG, atomically."""
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


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
    return save_png(figure, path)


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
    return save_png(figure, path)


def error_cdf(curves: dict[str, np.ndarray], path: str | Path, title: str | None = None) -> Path:
    """Save the cumulative distributions of several sets of angular errors (label -> degrees [n]) on one axis.

    The error axis ends a little beyond the largest 99th percentile (the histogram shows the whole range).
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axis = figure.subplots()
    top = 5.0
    for number, (label, errors) in enumerate(curves.items()):
        ordered = np.sort(np.asarray(errors, dtype=np.float64))
        if not len(ordered):
            continue
        fraction = np.arange(1, len(ordered) + 1) / len(ordered)
        label = f"{label} (median {np.median(ordered):.1f} deg)"
        axis.step(ordered, fraction, where="post", label=label, linestyle=("-", "--", ":", "-.")[number % 4])
        top = max(top, 1.1 * float(np.percentile(ordered, 99)))
    axis.set_xlabel("angular error (degrees)")
    axis.set_ylabel("fraction of particles at or below")
    axis.set_xlim(0, min(top, 180.0))
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(title or "Cumulative distribution of errors", fontsize=10)
    return save_png(figure, path)


def uncertainty_scatter(
    scores: np.ndarray,
    errors_deg: np.ndarray,
    path: str | Path,
    outliers: np.ndarray | None = None,
    threshold: float | None = None,
    score_name: str = "uncertainty",
) -> Path:
    """Save pose error (degrees [N]) against uncertainty score ([N], larger = less sure) as a scatter plot.

    The score axis is logarithmic (symmetric-logarithmic when scores are not all positive); labelled outliers
    (bool [N]) are drawn in another colour and the filtering threshold as a vertical line.
    """
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=np.float64)
    errors_deg = np.asarray(errors_deg, dtype=np.float64)
    outliers = np.zeros(len(scores), dtype=bool) if outliers is None else np.asarray(outliers, dtype=bool)
    figure = Figure(figsize=(6.4, 4.4), dpi=100)
    axis = figure.subplots()
    style = {"s": 6, "alpha": 0.6, "linewidths": 0}
    axis.scatter(scores[~outliers], errors_deg[~outliers], color="tab:blue", label="particles", **style)
    if outliers.any():
        axis.scatter(scores[outliers], errors_deg[outliers], color="tab:red", label="labelled outliers", **style)
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    if len(scores) and np.all(scores > 0):
        axis.set_xscale("log")
    else:
        axis.set_xscale("symlog", linthresh=max(float(np.min(np.abs(scores[scores != 0]), initial=1.0)), 1e-12))
    axis.set_xlabel(f"{score_name} (larger = less certain)")
    axis.set_ylabel("pose error (degrees)")
    axis.set_ylim(0, 180)
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title("Uncertainty against pose error", fontsize=10)
    return save_png(figure, path)


def viewing_direction_map(
    directions: np.ndarray, path: str | Path, title: str | None = None, bins: int | None = None
) -> Path:
    """Save the distribution of viewing directions (unit vectors [N, 3]) on a Mollweide map of the sphere.

    Azimuth is ``atan2(y, x)`` (RELION's rot) and elevation ``asin(z)`` (90 deg - tilt). The 2-D histogram
    uses equal-area cells (uniform in azimuth and in sin(elevation)), so colour is proportional to density;
    ``bins`` elevation bands (twice as many azimuth bins) default to about ten particles per cell.
    """
    from matplotlib.figure import Figure

    directions = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    directions = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    bins = int(np.clip(round(np.sqrt(len(directions) / 20)), 6, 36)) if bins is None else bins
    azimuth = np.arctan2(directions[:, 1], directions[:, 0])
    sin_elevation = np.clip(directions[:, 2], -1.0, 1.0)
    azimuth_edges = np.linspace(-np.pi, np.pi, 2 * bins + 1)
    sine_edges = np.linspace(-1.0, 1.0, bins + 1)
    counts, _, _ = np.histogram2d(azimuth, sin_elevation, bins=[azimuth_edges, sine_edges])
    # Drawn on a finer mesh of the same cells so that their edges follow the map's curves.
    fine = max(1, 72 // bins)
    counts = np.repeat(np.repeat(counts, fine, axis=0), fine, axis=1)
    azimuth_edges = np.linspace(-np.pi, np.pi, 2 * bins * fine + 1)
    sine_edges = np.linspace(-1.0, 1.0, bins * fine + 1)
    figure = Figure(figsize=(8.0, 4.8), dpi=100)
    axis = figure.add_subplot(projection="mollweide")
    mesh = axis.pcolormesh(azimuth_edges, np.arcsin(sine_edges), counts.T, cmap="viridis", shading="flat")
    figure.colorbar(mesh, ax=axis, orientation="horizontal", fraction=0.05, pad=0.1, label="particles per cell")
    axis.set_xlabel("azimuth (rlnAngleRot)")
    axis.set_ylabel("elevation (90° - rlnAngleTilt)")
    axis.tick_params(axis="x", labelsize=7, labelcolor="white")
    axis.tick_params(axis="y", labelsize=8)
    axis.grid(alpha=0.4)
    axis.set_title(title or f"Viewing directions of {len(directions)} particles (equal-area cells)", fontsize=10)
    return save_png(figure, path)


def roc_curve_plot(
    false_positive_rate: np.ndarray, true_positive_rate: np.ndarray, auroc: float, path: str | Path
) -> Path:
    """Save a ROC curve (rates [K], from (0, 0) to (1, 1)) of outlier detection with its area in the legend."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.8, 4.8), dpi=100)
    axis = figure.subplots()
    axis.plot(false_positive_rate, true_positive_rate, color="tab:blue", label=f"AUROC {auroc:.3f}")
    axis.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
    axis.set_xlabel("false positive rate (inliers flagged)")
    axis.set_ylabel("true positive rate (outliers flagged)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_aspect("equal")
    axis.legend(loc="lower right")
    axis.set_title("Outlier detection by uncertainty", fontsize=10)
    return save_png(figure, path)
