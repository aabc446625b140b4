"""Predicted poses against the truth: pose, viewing and in-plane errors, outlier detection, a report folder.

Particles are matched by ``rlnImageName``: first on (image index, stack resolved to an absolute path by each
set), so a prediction naming a stack by an absolute path matches a truth naming it relatively, then on
(image index, stack file name) for what is left, when that pair is unique on both sides.

Errors are symmetric geodesic distances (the minimum over the point group's mates ``A_true g^T``). The mate
that minimises the pose error also gives the two parts of it: the viewing error (the angle between the third
rows of A, the viewing directions) and the in-plane error (the twist about z of the relative rotation
``A_pred A_true^T``, from its swing-twist decomposition). A change of psi alone is all in-plane; a change
of tilt alone is all viewing.

The uncertainty score (larger = less sure) comes from the predicted eigenvalues through
:data:`cryo_forum.prediction.uncertainty.SCORES`, or from the matching score column when the eigenvalues are absent.
With labelled outliers (``cfIsOutlier`` in the truth) the pose errors cover the inliers only and the score's
power to separate outliers is its AUROC (rank statistic). Particles scoring at or below a threshold are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from cryo_forum import geometry
from cryo_forum.analysis import plots
from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io.atomic import atomic_directory, refuse_overwriting_inputs
from cryo_forum.io.particles import ParticleSet
from cryo_forum.prediction import calibration
from cryo_forum.prediction.uncertainty import DEFAULT_METRIC

IDENTITY = np.array([0.0, 0.0, 0.0, 1.0])
_CHUNK = 65536  # particles per block when comparing against every symmetry mate

METRICS_NAME = "metrics.json"
PARTICLES_NAME = "errors.csv"
PLOT_NAMES = {
    "error_histogram": "error_histogram.png",
    "error_cdf": "error_cdf.png",
    "viewing_directions": "viewing_directions.png",
    "uncertainty": "uncertainty_vs_error.png",
    "roc": "roc.png",
}


# ---------------------------------------------------------------- matching


class Matching(NamedTuple):
    """Row positions [M] of matched particles in the predicted and true sets, and what could not be matched."""

    pred_rows: np.ndarray
    truth_rows: np.ndarray
    by_file_name: int
    pred_unmatched: int
    truth_unmatched: int


def _absolute_stack(particles: ParticleSet, name: str) -> str:
    """The stack's absolute path as the set resolves it; beside the source when the file is not found."""
    try:
        return str(particles.resolve_stack(name).resolve())
    except CryoForumError:
        return str((particles.source.parent / name).resolve())


def particle_keys(particles: ParticleSet) -> pd.DataFrame:
    """One row per particle: ``row``, 1-based image ``index``, absolute stack ``path`` and stack file ``name``."""
    parts = particles.table[star.IMAGE_NAME].astype(str).str.partition("@")
    has_at = parts[1] == "@"
    stacks = parts[2].where(has_at, parts[0])
    paths = {name: _absolute_stack(particles, name) for name in stacks.unique()}
    keys = pd.DataFrame(
        {
            "row": np.arange(len(particles)),
            "index": pd.to_numeric(parts[0].where(has_at, "1")).astype(np.int64),
            "path": stacks.map(paths),
            "name": stacks.map(lambda stack: PurePath(stack).name),
        }
    )
    repeated = keys.duplicated(["index", "path"], keep=False)
    if repeated.any():
        example = particles.table[star.IMAGE_NAME].iloc[int(np.flatnonzero(repeated)[0])]
        raise CryoForumError(
            f"{particles.source}: image {example} appears more than once; evaluation needs one row per image"
        )
    return keys


def pair_by_image_name(pred: ParticleSet, truth: ParticleSet) -> Matching:
    """Pair the particles of two sets by image: (index, absolute stack), then (index, stack file name)."""
    pred_keys, truth_keys = particle_keys(pred), particle_keys(truth)
    exact = pred_keys.merge(truth_keys, on=["index", "path"], suffixes=("_pred", "_truth"))
    rest_pred = pred_keys[~pred_keys["row"].isin(exact["row_pred"])]
    rest_truth = truth_keys[~truth_keys["row"].isin(exact["row_truth"])]
    rest_pred = rest_pred[~rest_pred.duplicated(["index", "name"], keep=False)]
    rest_truth = rest_truth[~rest_truth.duplicated(["index", "name"], keep=False)]
    by_name = rest_pred.merge(rest_truth, on=["index", "name"], suffixes=("_pred", "_truth"))
    pairs = pd.concat([exact[["row_pred", "row_truth"]], by_name[["row_pred", "row_truth"]]]).sort_values("row_pred")
    return Matching(
        pred_rows=pairs["row_pred"].to_numpy(dtype=np.int64),
        truth_rows=pairs["row_truth"].to_numpy(dtype=np.int64),
        by_file_name=len(by_name),
        pred_unmatched=len(pred) - len(pairs),
        truth_unmatched=len(truth) - len(pairs),
    )


# ---------------------------------------------------------------- errors


class PoseErrors(NamedTuple):
    """Angular errors in radians [N]: the symmetric pose error and its viewing and in-plane parts."""

    pose: np.ndarray
    viewing: np.ndarray
    inplane: np.ndarray


def closest_mates(q_pred: np.ndarray, q_true: np.ndarray, symmetry: str = "C1") -> np.ndarray:
    """For each particle the mate ``A_true g^T`` (g in the point group) closest to A_pred, as quaternions [N, 4]."""
    q_pred = np.asarray(q_pred, dtype=np.float64)
    q_true = np.asarray(q_true, dtype=np.float64)
    inverse_group = geometry.quaternion_conjugate(geometry.symmetry_quaternions(symmetry))
    if len(inverse_group) == 1:
        return q_true.copy()
    mates = np.empty_like(q_true)
    for start in range(0, len(q_true), _CHUNK):
        block = slice(start, start + _CHUNK)
        candidates = geometry.quaternion_multiply(q_true[block, None, :], inverse_group)  # [n, G, 4]
        best = geometry.geodesic_distance(q_pred[block, None, :], candidates).argmin(axis=1)
        mates[block] = candidates[np.arange(len(best)), best]
    return mates


def pose_errors(q_pred: np.ndarray, q_true: np.ndarray, symmetry: str = "C1") -> PoseErrors:
    """Symmetric pose errors [N] of quaternions [N, 4], split into viewing and in-plane parts (radians)."""
    q_pred = np.asarray(q_pred, dtype=np.float64)
    mates = closest_mates(q_pred, q_true, symmetry)
    view_pred, view_true = geometry.viewing_directions(q_pred), geometry.viewing_directions(mates)
    viewing = np.arctan2(
        np.linalg.norm(np.cross(view_pred, view_true), axis=-1), np.sum(view_pred * view_true, axis=-1)
    )
    relative = geometry.quaternion_multiply(q_pred, geometry.quaternion_conjugate(mates))  # A_pred A_true^T
    inplane = 2.0 * np.arctan2(np.abs(relative[:, 2]), np.abs(relative[:, 3]))  # twist about z
    return PoseErrors(pose=geometry.geodesic_distance(q_pred, mates), viewing=viewing, inplane=inplane)


def apply_alignment(quaternions: np.ndarray, rotation: np.ndarray, flipped: bool) -> np.ndarray:
    """Apply :func:`cryo_forum.geometry.align_poses`' transform: optional hand flip, then ``A -> A Q``."""
    source = geometry.flip_handedness(quaternions) if flipped else np.asarray(quaternions, dtype=np.float64)
    return geometry.matrix_to_quaternion(geometry.quaternion_to_matrix(source) @ rotation)


def error_figures(errors: PoseErrors, prefix: str = "") -> dict[str, float | int | None]:
    """n, median, mean and 90th percentile (degrees) of the pose, viewing and in-plane errors."""
    figures: dict[str, float | int | None] = {f"{prefix}n": len(errors.pose)}
    for part, values in (("", errors.pose), ("viewing_", errors.viewing), ("inplane_", errors.inplane)):
        degrees = np.degrees(values)
        empty = len(degrees) == 0
        figures[f"{prefix}{part}median_deg"] = None if empty else float(np.median(degrees))
        figures[f"{prefix}{part}mean_deg"] = None if empty else float(np.mean(degrees))
        figures[f"{prefix}{part}p90_deg"] = None if empty else float(np.percentile(degrees, 90))
    return figures


def _subset(errors: PoseErrors, mask: np.ndarray) -> PoseErrors:
    return PoseErrors(*(values[mask] for values in errors))


# ---------------------------------------------------------------- uncertainty


def uncertainty_scores(particles: ParticleSet, metric: str = DEFAULT_METRIC) -> tuple[np.ndarray | None, str]:
    """Scores [N] (larger = less sure) of ``metric`` and where they came from; (None, reason) without columns.

    The eigenvalue columns are preferred; otherwise the metric's own column (e.g. cfDispersionTrace), as in
    :func:`cryo_forum.prediction.calibration.scores_from_table`.
    """
    calibration.check_metric(metric)
    table = particles.table
    if not calibration.available_metrics(table):
        return None, f"{particles.source.name} has no uncertainty columns ({', '.join(star.EIGENVALUES)} or cf scores)"
    scores = calibration.scores_from_table(table, metric, str(particles.source))
    eigenvalues = all(column in table for column in star.EIGENVALUES)
    if metric == calibration.JUNK_SCORE:
        source = star.JUNK_SCORE
    else:
        source = "cfEigenvalue1-4" if eigenvalues else calibration.FALLBACK_COLUMNS[metric][0]
    bad = ~np.isfinite(scores)
    if bad.any():
        raise CryoForumError(
            f"{particles.source}: uncertainty ({source}) is not finite for {int(bad.sum())} particles, "
            f"e.g. {table[star.IMAGE_NAME].iloc[int(np.flatnonzero(bad)[0])]}"
        )
    return scores, source


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` [N] flagging ``positives`` (bool [N]); NaN without both classes.

    Computed from ranks (Mann-Whitney U, ties counted half): the probability that a random positive scores
    above a random negative.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates [K] of the thresholds ``score >= t``, from (0, 0) to (1, 1).

    Tied scores make one diagonal step, so the trapezoidal area under the curve equals :func:`auroc`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    ordered, flagged = scores[order], positives[order]
    last_of_each_value = np.r_[np.flatnonzero(np.diff(ordered) != 0), len(ordered) - 1]
    true_positives = np.cumsum(flagged)[last_of_each_value]
    false_positives = np.cumsum(~flagged)[last_of_each_value]
    fpr = np.r_[0.0, false_positives / max(int((~positives).sum()), 1)]
    tpr = np.r_[0.0, true_positives / max(int(positives.sum()), 1)]
    return fpr, tpr


# ---------------------------------------------------------------- the evaluation


@dataclass
class Evaluation:
    """Everything a report needs: the metrics and per-matched-particle arrays ([M] each, [M, 4] quaternions)."""

    metrics: dict
    image_names: np.ndarray
    q_pred: np.ndarray
    errors: PoseErrors
    evaluated: np.ndarray
    outliers: np.ndarray | None
    scores: np.ndarray | None
    kept: np.ndarray | None


def _quaternions(particles: ParticleSet, rows: np.ndarray) -> np.ndarray:
    """Quaternions [M, 4] of the poses of particles ``rows``; CryoForumError naming the file if absent or not finite."""
    if not particles.has_poses:
        raise CryoForumError(f"{particles.source}: no poses ({', '.join(star.ANGLES)})")
    angles = particles.numbers(star.ANGLES)[rows]
    bad = ~np.isfinite(angles).all(axis=1)
    if bad.any():
        name = particles.table[star.IMAGE_NAME].iloc[int(rows[np.flatnonzero(bad)[0]])]
        raise CryoForumError(f"{particles.source}: angles are not finite for {int(bad.sum())} particles, e.g. {name}")
    return geometry.euler_to_quaternion(angles)


def _outlier_labels(truth: ParticleSet, rows: np.ndarray) -> np.ndarray | None:
    if star.OUTLIER not in truth.table:
        return None
    labels = pd.to_numeric(truth.table[star.OUTLIER].iloc[rows], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise CryoForumError(f"{truth.source}: {star.OUTLIER} must be 0 or 1 for every particle")
    return labels == 1.0


def uncertainty_figures(
    scores: np.ndarray,
    errors: PoseErrors,
    evaluated: np.ndarray,
    outliers: np.ndarray | None,
    kept: np.ndarray | None,
    notes: list[str],
) -> dict:
    """Rank correlation with the error, outlier AUROC and the kept particles' figures (all arrays [M]).

    Appends to ``notes`` what could not be computed.
    """
    figures: dict = {"score_error_spearman": _spearman(scores[evaluated], errors.pose[evaluated])}
    if outliers is not None:
        figures["outlier_auroc"] = _finite_or_none(auroc(scores, outliers))
        if figures["outlier_auroc"] is None:
            notes.append("outlier AUROC needs labelled inliers and outliers among the matched particles")
    if kept is None:
        notes.append("no --threshold or --model: kept-particle figures skipped")
        return figures
    figures["kept_fraction"] = float(kept.mean())
    figures |= error_figures(_subset(errors, kept & evaluated), prefix="kept_")
    if outliers is not None:
        figures["outliers_rejected_fraction"] = _mean_or_none(~kept[outliers])
        figures["inliers_kept_fraction"] = _mean_or_none(kept[~outliers])
    return figures


def evaluate(
    pred: ParticleSet,
    truth: ParticleSet,
    symmetry: str = "C1",
    align: bool = False,
    metric: str = DEFAULT_METRIC,
    threshold: float | None = None,
) -> Evaluation:
    """Compare predicted poses and uncertainty with the truth; see the module docstring for the definitions."""
    symmetry = geometry.normalise_symmetry_name(symmetry)
    matching = pair_by_image_name(pred, truth)
    if not len(matching.pred_rows):
        example = pred.table[star.IMAGE_NAME].iloc[0] if len(pred) else "no particles"
        raise CryoForumError(
            f"{pred.source}: none of its {len(pred)} particles ({example}) matches one of the {len(truth)} "
            f"in {truth.source} by {star.IMAGE_NAME}"
        )
    q_pred = _quaternions(pred, matching.pred_rows)
    q_true = _quaternions(truth, matching.truth_rows)
    outliers = _outlier_labels(truth, matching.truth_rows)
    evaluated = np.ones(len(q_pred), dtype=bool) if outliers is None else ~outliers
    if not evaluated.any():
        raise CryoForumError(f"{truth.source}: every matched particle is labelled an outlier ({star.OUTLIER})")
    notes: list[str] = []
    metrics: dict = {
        "pred": str(pred.source),
        "truth": str(truth.source),
        "symmetry": symmetry,
        "n_pred": len(pred),
        "n_truth": len(truth),
        "n_matched": len(q_pred),
        "n_matched_by_file_name": matching.by_file_name,
        "n_pred_unmatched": matching.pred_unmatched,
        "n_truth_unmatched": matching.truth_unmatched,
        "n_outliers": None if outliers is None else int(outliers.sum()),
        "errors_over": "all matched particles" if outliers is None else "labelled inliers",
    }
    if outliers is None:
        notes.append(f"{truth.source.name} has no {star.OUTLIER} column: errors cover every matched particle")
    if align:
        _, fit = geometry.align_poses(q_pred[evaluated], q_true[evaluated], symmetry=symmetry)
        q_pred = apply_alignment(q_pred, fit["rotation"], fit["flipped"])
        metrics["alignment"] = {
            "flipped": bool(fit["flipped"]),
            "rotation": fit["rotation"].tolist(),
            "rotation_deg": float(
                np.degrees(geometry.geodesic_distance(geometry.matrix_to_quaternion(fit["rotation"]), IDENTITY))
            ),
        }
    errors = pose_errors(q_pred, q_true, symmetry)
    metrics |= error_figures(_subset(errors, evaluated))

    scores, score_source = uncertainty_scores(pred, metric)
    metrics["metric"] = metric
    kept = None
    if scores is None:
        notes.append(f"{score_source}: uncertainty figures (AUROC, kept particles) skipped")
        if threshold is not None:
            notes.append("the threshold was not used: no uncertainty scores")
    else:
        scores = scores[matching.pred_rows]
        metrics["score_source"] = score_source
        kept = None if threshold is None else scores <= threshold
        metrics |= uncertainty_figures(scores, errors, evaluated, outliers, kept, notes)
        if threshold is not None:
            metrics["threshold"] = float(threshold)
    metrics["notes"] = notes
    return Evaluation(
        metrics=metrics,
        image_names=pred.table[star.IMAGE_NAME].astype(str).to_numpy()[matching.pred_rows],
        q_pred=q_pred,
        errors=errors,
        evaluated=evaluated,
        outliers=outliers,
        scores=scores,
        kept=kept,
    )


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return _finite_or_none(stats.spearmanr(a, b).statistic)


# ---------------------------------------------------------------- the report folder


def particle_table(evaluation: Evaluation) -> pd.DataFrame:
    """Per matched particle: image name, errors in degrees, and outlier label, score and kept flag when known."""
    errors = evaluation.errors
    table = pd.DataFrame(
        {
            star.IMAGE_NAME: evaluation.image_names,
            "error_deg": np.degrees(errors.pose),
            "viewing_error_deg": np.degrees(errors.viewing),
            "inplane_error_deg": np.degrees(errors.inplane),
        }
    )
    if evaluation.outliers is not None:
        table[star.OUTLIER] = evaluation.outliers.astype(int)
    if evaluation.scores is not None:
        table[evaluation.metrics["metric"]] = evaluation.scores
    if evaluation.kept is not None:
        table["kept"] = evaluation.kept.astype(int)
    return table


def write_report(evaluation: Evaluation, out: str | Path, inputs: tuple = ()) -> dict[str, Path]:
    """Write metrics.json, errors.csv and the plots into ``out`` (all or nothing); returns name -> final path."""
    out = Path(out)
    refuse_overwriting_inputs(out, inputs)
    metrics = dict(evaluation.metrics)
    errors, evaluated, kept = evaluation.errors, evaluation.evaluated, evaluation.kept
    over = metrics["errors_over"]
    written: dict[str, str] = {}
    with atomic_directory(out) as staging:

        def plot(name: str, draw, *args, **kwargs) -> None:
            draw(*args, staging / PLOT_NAMES[name], **kwargs)
            written[name] = PLOT_NAMES[name]

        pose_deg = np.degrees(errors.pose)
        plot("error_histogram", plots.error_histogram, pose_deg[evaluated], title=f"Pose errors ({over})")
        curves = {
            "pose": pose_deg[evaluated],
            "viewing": np.degrees(errors.viewing[evaluated]),
            "in-plane": np.degrees(errors.inplane[evaluated]),
        }
        if kept is not None:
            curves["pose, kept"] = pose_deg[kept & evaluated]
        plot("error_cdf", plots.error_cdf, curves, title=f"Cumulative errors ({over})")
        directions = geometry.viewing_directions(evaluation.q_pred)
        title = f"Predicted viewing directions of {len(directions)} particles (equal-area cells)"
        plot("viewing_directions", plots.viewing_direction_map, directions, title=title)
        if evaluation.scores is not None:
            plot(
                "uncertainty",
                plots.uncertainty_scatter,
                evaluation.scores,
                pose_deg,
                outliers=evaluation.outliers,
                threshold=metrics.get("threshold"),
                score_name=metrics["metric"],
            )
        if metrics.get("outlier_auroc") is not None:
            fpr, tpr = roc_curve(evaluation.scores, evaluation.outliers)
            plot("roc", plots.roc_curve_plot, fpr, tpr, metrics["outlier_auroc"])
        metrics["files"] = {"particles": PARTICLES_NAME, **written}
        particle_table(evaluation).to_csv(staging / PARTICLES_NAME, index=False, float_format="%.6g")
        (staging / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    return {"metrics": out / METRICS_NAME, "particles": out / PARTICLES_NAME} | {
        name: out / filename for name, filename in written.items()
    }
