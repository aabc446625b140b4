"""Uncertainty calibration: score quantiles of validation predictions, and the thresholds they give.

A threshold is calibrated on predictions the model did not train on but whose poses are known (the run's
validation particles) and then applied unchanged to any other set, never recomputed from the set being
filtered. A particle is kept when its score is at most the threshold (larger score = more uncertain).

A calibration (``RUN/calibration.json``) holds, for every metric of :data:`uncertainty.SCORES`, the score
quantiles at 0.00, 0.01, ..., 1.00 of the calibration set, so ``threshold_for(calibration, metric, 0.8)``
keeps 80 % of particles that behave like the validation set. When the validation errors are known, each
metric also gets a recommended threshold (:func:`recommend_threshold`): the largest score at which the
particles scoring about that much (the 10 % of the calibration set ranked around it) have a median pose error
at most ``tolerance`` (3) times the median error of the 10 % with the lowest scores. It keeps everything when
the score says nothing about the error, and cuts where the particles turn clearly worse than the best ones
(junk, ice, wrong poses).

NumPy and pandas only: no TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cryo_forum import geometry
from cryo_forum.choices import UNCERTAINTY_METRICS
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.prediction import uncertainty
from cryo_forum.prediction.directional import JUNK_SCORE, directional_model, junk_scores
from cryo_forum.prediction.uncertainty import DEFAULT_METRIC

FORMAT = "cryo-forum uncertainty calibration"
VERSION = 1
QUANTILE_LEVELS = np.round(np.linspace(0.0, 1.0, 101), 2)
TOLERANCE = 3.0
BOUND_LEVEL = 0.9  # the coverage of the error bounds predict writes
WINDOW = 0.1

# Columns that hold a metric when the eigenvalue columns are absent: (column, sign turning it into the score).
FALLBACK_COLUMNS = {
    "expected_error_deg": (star.EXPECTED_ERROR, 1.0),
    "dispersion_trace": (star.DISPERSION_TRACE, 1.0),
    "max_dispersion": (star.MAX_DISPERSION, 1.0),
    "negative_eigengap": (star.EIGEN_GAP, -1.0),
}


METRICS = UNCERTAINTY_METRICS  # the eigenvalue scores of uncertainty.SCORES, the junk score, refinement's fit
FIT_JUNK_SCORE = "fit_junk_score"


def check_metric(metric: str) -> None:
    """InvalidSetting when ``metric`` is not one of :data:`METRICS`."""
    if metric not in METRICS:
        raise InvalidSetting("metric", f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def scores_from_table(
    table: pd.DataFrame, metric: str, source: str = "table", calibration: dict | None = None
) -> np.ndarray:
    """Scores [N] of ``metric`` from the cfEigenvalue1-4 columns, else from the metric's own column.

    The junk score comes from its column (written by cryo-forum predict), else from the expected error and the
    angles under the directional model of ``calibration``; the fit junk score only from its column (written by
    refinement). Rows with a missing or non-finite value score NaN. ``source`` names the file in error messages.
    """
    check_metric(metric)
    if metric == JUNK_SCORE:
        return _junk_scores(table, source, calibration)
    if metric == FIT_JUNK_SCORE:
        if star.FIT_JUNK_SCORE not in table:
            raise CryoForumError(
                f"{source}: no {star.FIT_JUNK_SCORE} column; refine the poses first (cryo-forum refine)"
            )
        scores = numeric_columns(table, [star.FIT_JUNK_SCORE], source)[:, 0]
        return np.where(np.isfinite(scores), scores, np.nan)
    if all(column in table for column in star.EIGENVALUES):
        values = numeric_columns(table, list(star.EIGENVALUES), source)
        scores = np.full(len(table), np.nan)
        finite = np.isfinite(values).all(axis=1)
        scores[finite] = uncertainty.SCORES[metric](values[finite])
        return scores
    missing = [column for column in star.EIGENVALUES if column not in table]
    fallback = FALLBACK_COLUMNS.get(metric)
    if fallback is not None and fallback[0] in table:
        column, sign = fallback
        scores = sign * numeric_columns(table, [column], source)[:, 0]
        return np.where(np.isfinite(scores), scores, np.nan)
    alternative = f" or {fallback[0]}" if fallback else ""
    raise CryoForumError(
        f"{source}: metric {metric} needs the columns {', '.join(star.EIGENVALUES)}{alternative} "
        f"(missing: {', '.join(missing)}); is it the output of cryo-forum predict with a qcqp model?"
    )


def _junk_scores(table: pd.DataFrame, source: str, calibration: dict | None) -> np.ndarray:
    if star.JUNK_SCORE in table:
        return numeric_columns(table, [star.JUNK_SCORE], source)[:, 0]
    if calibration is None or "directional" not in calibration:
        raise CryoForumError(
            f"{source}: no {star.JUNK_SCORE} column, and no run calibration with a directional model to compute it"
        )
    expected = scores_from_table(table, "expected_error_deg", source)
    quaternions = geometry.euler_to_quaternion(numeric_columns(table, list(star.ANGLES), source))
    return junk_scores(expected, quaternions, calibration["directional"])


def numeric_columns(table: pd.DataFrame, columns: list[str], source: str) -> np.ndarray:
    """The values of ``columns`` as float64 [N, len(columns)]; CryoForumError naming ``source`` if one holds text."""
    try:
        return table[columns].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise CryoForumError(f"{source}: non-numeric values in {', '.join(columns)}") from None


def available_metrics(table: pd.DataFrame) -> list[str]:
    """The metrics of :data:`uncertainty.SCORES` that ``table``'s columns allow, in SCORES order."""
    if all(column in table for column in star.EIGENVALUES):
        return list(uncertainty.SCORES)
    return [name for name, (column, _) in FALLBACK_COLUMNS.items() if column in table]


def pose_errors_deg(predicted: pd.DataFrame, truth: pd.DataFrame, symmetry: str = "C1") -> np.ndarray:
    """Angles [N] in degrees between the rlnAngleRot/Tilt/Psi poses of two row-aligned tables (symmetry-aware)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted rows for {len(truth)} true ones")
    q_pred = geometry.euler_to_quaternion(predicted[list(star.ANGLES)].to_numpy(dtype=np.float64))
    q_true = geometry.euler_to_quaternion(truth[list(star.ANGLES)].to_numpy(dtype=np.float64))
    return np.degrees(geometry.symmetric_distance(q_pred, q_true, symmetry))


def recommend_threshold(
    scores: np.ndarray, errors_deg: np.ndarray, tolerance: float = TOLERANCE, window: float = WINDOW
) -> dict[str, float]:
    """The recommended threshold of one metric from calibration scores [N] and pose errors [N] in degrees.

    For each quantile level q >= ``window`` of QUANTILE_LEVELS the candidate is the scores' q-quantile, and
    its neighbourhood the ``window`` fraction of the particles ranked around it (centred, cut at the top).
    The recommendation is the largest candidate whose neighbourhood has a median error at most ``tolerance``
    times the median error of the ``window`` fraction with the lowest scores: where the typical particle
    scoring about the threshold turns clearly worse than the best ones. Returns the threshold, its level q,
    the fraction of the calibration set it keeps and the kept particles' median and mean errors.
    """
    scores = np.asarray(scores, dtype=np.float64)
    errors = np.asarray(errors_deg, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_errors = scores[order], errors[order]
    n = len(scores)
    width = max(1, math.ceil(window * n))
    limit = tolerance * float(np.median(sorted_errors[:width]))
    level, threshold, kept = float(QUANTILE_LEVELS[0]), float(sorted_scores[0]), 1
    for candidate in QUANTILE_LEVELS[QUANTILE_LEVELS >= window]:
        value = float(np.quantile(sorted_scores, candidate))
        count = int(np.searchsorted(sorted_scores, value, side="right"))
        low = min(max(0, count - (width + 1) // 2), n - width)
        if np.median(sorted_errors[low : low + width]) <= limit:
            level, threshold, kept = float(candidate), value, count
    return {
        "threshold": threshold,
        "quantile": level,
        "keep_fraction": kept / n,
        "kept_median_error_deg": float(np.median(sorted_errors[:kept])),
        "kept_mean_error_deg": float(np.mean(sorted_errors[:kept])),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def calibrate(
    predictions: pd.DataFrame | np.ndarray,
    errors_deg: np.ndarray | None = None,
    source: str = "",
    tolerance: float = TOLERANCE,
    window: float = WINDOW,
    symmetry: str = "C1",
) -> dict:
    """A calibration (JSON-ready dict) from validation predictions: a table or eigenvalues [N, 4].

    For every metric the table allows: the score quantiles at QUANTILE_LEVELS and, with ``errors_deg`` [N]
    (the predictions' pose errors, e.g. from :func:`pose_errors_deg`), the recommended threshold and the
    Spearman correlation between score and error. ``source`` describes the calibration set. A table with angles
    also gets the directional model of the junk score (:mod:`cryo_forum.prediction.directional`), which becomes
    the default metric.
    """
    if isinstance(predictions, pd.DataFrame):
        metrics = available_metrics(predictions)
        if not metrics:
            raise CryoForumError(f"{source or 'calibration set'}: no uncertainty columns to calibrate")
        scores = {name: scores_from_table(predictions, name, source or "calibration set") for name in metrics}
        n = len(predictions)
        directional = None
        if "expected_error_deg" in scores and all(column in predictions for column in star.ANGLES):
            quaternions = geometry.euler_to_quaternion(numeric_columns(predictions, list(star.ANGLES), source))
            directional = directional_model(scores["expected_error_deg"], quaternions, symmetry)
            scores[JUNK_SCORE] = junk_scores(scores["expected_error_deg"], quaternions, directional)
    else:
        eigenvalues = np.asarray(predictions, dtype=np.float64)
        if eigenvalues.ndim != 2 or eigenvalues.shape[1] != 4:
            raise ValueError(f"eigenvalues must have shape [N, 4], got {eigenvalues.shape}")
        scores = {name: function(eigenvalues) for name, function in uncertainty.SCORES.items()}
        n = len(eigenvalues)
        directional = None
    if n == 0:
        raise CryoForumError(f"{source or 'calibration set'}: no particles to calibrate on")
    for name, values in scores.items():
        if not np.isfinite(values).all():
            bad = int(np.sum(~np.isfinite(values)))
            raise CryoForumError(f"{source or 'calibration set'}: {bad} of {n} particles have no finite {name}")
    if errors_deg is not None:
        errors_deg = np.asarray(errors_deg, dtype=np.float64)
        if errors_deg.shape != (n,) or not np.isfinite(errors_deg).all():
            raise ValueError(f"errors_deg must be {n} finite values, got shape {errors_deg.shape}")
    entries = {name: metric_entry(values, errors_deg, tolerance, window) for name, values in scores.items()}
    calibration = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "n": n,
        "default_metric": next((name for name in (JUNK_SCORE, DEFAULT_METRIC) if name in entries), next(iter(entries))),
        "quantile_levels": QUANTILE_LEVELS.tolist(),
        "metrics": entries,
    }
    if directional is not None:
        calibration["directional"] = directional
    if errors_deg is not None and DEFAULT_METRIC in scores:
        true = _unlabelled(predictions, n)  # a labelled outlier's pose is random: no bound should cover it
        calibration["bound_90"] = {"network": bound_factor(errors_deg[true], scores[DEFAULT_METRIC][true])}
    if errors_deg is not None:
        calibration["errors_deg"] = {"median": float(np.median(errors_deg)), "mean": float(np.mean(errors_deg))}
        calibration["rule"] = {
            "tolerance": tolerance,
            "window": window,
            "text": (
                f"largest score quantile (>= {window:g}) whose neighbourhood (the {window:.0%} of particles ranked "
                f"around it) has a median error at most {tolerance:g} x that of the {window:.0%} with the lowest "
                "scores"
            ),
        }
    return calibration


def _unlabelled(predictions, n: int) -> np.ndarray:
    """Rows [n] not flagged as outliers (all rows when the predictions carry no outlier flag)."""
    if isinstance(predictions, pd.DataFrame) and star.OUTLIER in predictions:
        return predictions[star.OUTLIER].to_numpy() == 0
    return np.ones(n, dtype=bool)


def metric_entry(
    values: np.ndarray, errors_deg: np.ndarray | None = None, tolerance: float = TOLERANCE, window: float = WINDOW
) -> dict:
    """One metric's calibration: its quantiles over the calibration particles' scores [N] and, with their pose
    errors [N], the recommended threshold and the Spearman correlation of score and error."""
    entry: dict = {"quantiles": np.quantile(values, QUANTILE_LEVELS).tolist()}
    if errors_deg is not None:
        entry["recommended"] = recommend_threshold(values, errors_deg, tolerance, window)
        entry["spearman_with_error"] = _spearman(values, errors_deg)
    return entry


def bound_factor(errors_deg: np.ndarray, expected_error_deg: np.ndarray) -> float:
    """The factor k that makes ``k * expected error`` a 90 % bound: the 0.9 quantile of error / expected error over
    calibration particles of known pose [N] (their true errors below k times their expected errors in 90 % of
    cases)."""
    ratios = np.asarray(errors_deg, dtype=np.float64) / np.maximum(np.asarray(expected_error_deg, np.float64), 1e-6)
    return float(np.quantile(ratios, BOUND_LEVEL))


def error_bounds(calibration: dict, kind: str, expected_error_deg: np.ndarray) -> np.ndarray | None:
    """The calibrated 90 % error bounds [N] (degrees) of expected errors [N] of ``kind`` ("network"), None when
    the calibration has no factor for it."""
    factor = calibration.get("bound_90", {}).get(kind)
    return None if factor is None else factor * np.asarray(expected_error_deg, dtype=np.float64)


def check_calibration(calibration, where: str) -> dict:
    """``calibration`` (a document read back) if it is a complete cryo-forum calibration; CryoForumError otherwise."""
    if not _well_formed(calibration):
        raise CryoForumError(f"{where}: not a cryo-forum calibration (or a damaged one)")
    return calibration


def _well_formed(calibration) -> bool:
    if not isinstance(calibration, dict) or calibration.get("format") != FORMAT:
        return False
    levels = calibration.get("quantile_levels")
    metrics = calibration.get("metrics")
    if not isinstance(levels, list) or len(levels) < 2 or not isinstance(metrics, dict) or not metrics:
        return False
    for entry in metrics.values():
        quantiles = entry.get("quantiles") if isinstance(entry, dict) else None
        if not isinstance(quantiles, list) or len(quantiles) != len(levels):
            return False
        if not all(isinstance(value, int | float) for value in quantiles):
            return False
    return calibration.get("default_metric") in metrics


def threshold_for(calibration: dict, metric: str, quantile: float | None = None) -> float:
    """The calibration set's ``metric`` score at ``quantile`` (keeps that fraction; interpolated between the
    stored levels), or the recommended threshold when ``quantile`` is None."""
    check_metric(metric)
    entry = calibration["metrics"].get(metric)
    if entry is None:
        known = ", ".join(calibration["metrics"])
        raise InvalidSetting("metric", f"{metric!r} is not in the calibration (it has {known})")
    if quantile is None:
        if "recommended" not in entry:
            raise InvalidSetting(
                "metric",
                f"the calibration has no recommended threshold for {metric!r} (calibrated without known errors); "
                "give --quantile or --threshold",
            )
        return float(entry["recommended"]["threshold"])
    if not 0.0 <= quantile <= 1.0:
        raise InvalidSetting("quantile", f"must lie in [0, 1] (the fraction to keep), got {quantile}")
    return float(np.interp(quantile, calibration["quantile_levels"], entry["quantiles"]))


def calibration_fraction_below(calibration: dict, metric: str, threshold: float) -> float:
    """The fraction of the calibration set with ``metric`` at most ``threshold`` (inverse of threshold_for)."""
    quantiles = np.asarray(calibration["metrics"][metric]["quantiles"], dtype=np.float64)
    levels = np.asarray(calibration["quantile_levels"], dtype=np.float64)
    if threshold < quantiles[0]:
        return 0.0
    return float(levels[np.searchsorted(quantiles, threshold, side="right") - 1])
