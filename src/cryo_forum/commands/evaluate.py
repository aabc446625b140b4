"""Compare predicted poses and uncertainty with the true poses and write a report folder.

Particles are matched by rlnImageName (a stack named by an absolute path in one file and a relative path
in the other still matches). Pose errors are symmetric geodesic distances in degrees, split into the
viewing-direction and in-plane parts; with labelled outliers (cfIsOutlier in the truth) they cover the
inliers, and the uncertainty's power to flag outliers is reported as an AUROC. Particles whose uncertainty
is at or below a threshold (--threshold, or calibrated in the training run --model RUN) are "kept".

Writes into REPORT: metrics.json, errors.csv (one row per matched particle) and PNG plots: error
histogram, error CDF, predicted viewing directions, uncertainty against error and the ROC curve.

Example:
  cryo-forum evaluate --pred predicted.star --truth particles.star --out report --symmetry D2 --model run1
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cryo_forum.choices import UNCERTAINTY_METRICS
from cryo_forum.errors import CryoForumError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=Path, required=True, help="predicted particles (.star from cryo-forum predict)")
    parser.add_argument("--truth", type=Path, required=True, help="particles with the true poses (.star or .cs)")
    parser.add_argument("--out", type=Path, required=True, metavar="REPORT", help="output folder")
    parser.add_argument("--symmetry", default="C1", help="point group of the particle (default C1)")
    parser.add_argument(
        "--align", action="store_true", help="first align the predictions by one global rotation and hand flip"
    )
    parser.add_argument(
        "--metric",
        choices=UNCERTAINTY_METRICS,
        help="uncertainty score (default: the calibration's with --model, else expected_error_deg)",
    )
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, metavar="X", help="keep particles with score <= X")
    threshold.add_argument("--model", type=Path, metavar="RUN", help="take the threshold calibrated in this run")


def resolve_metric(args: argparse.Namespace) -> str:
    """--metric, else the default metric of --model RUN's calibration, else the package's default."""
    from cryo_forum.prediction.uncertainty import DEFAULT_METRIC
    from cryo_forum.training.run import Run

    if args.metric is not None:
        return args.metric
    if args.model is not None:
        return Run(args.model).load_calibration().get("default_metric", DEFAULT_METRIC)
    return DEFAULT_METRIC


def resolve_threshold(args: argparse.Namespace) -> float | None:
    """The keep threshold from --threshold or from the calibration of --model RUN (None without either)."""
    if args.model is None:
        if args.threshold is not None and not math.isfinite(args.threshold):
            raise CryoForumError(f"--threshold: must be a finite number, got {args.threshold}")
        return args.threshold
    from cryo_forum.prediction.calibration import threshold_for
    from cryo_forum.training.run import Run

    return float(threshold_for(Run(args.model).load_calibration(), args.metric))


def summary_lines(metrics: dict) -> list[str]:
    """A short table of the figures in ``metrics`` (degrees) for the terminal."""

    def cell(value) -> str:
        return f"{value:8.2f}" if value is not None else f"{'-':>8}"

    lines = [
        f"matched {metrics['n_matched']} particles ({metrics['n_pred_unmatched']} predicted and "
        f"{metrics['n_truth_unmatched']} true unmatched); errors over {metrics['errors_over']} "
        f"(n = {metrics['n']}), symmetry {metrics['symmetry']}",
    ]
    if "alignment" in metrics:
        alignment = metrics["alignment"]
        flip = "with a hand flip" if alignment["flipped"] else "no hand flip"
        lines.append(f"aligned by a global rotation of {alignment['rotation_deg']:.1f} deg, {flip}")
    lines.append(f"{'(degrees)':<20}{'median':>8}{'mean':>8}{'p90':>8}")
    rows = [("pose", ""), ("viewing", "viewing_"), ("in-plane", "inplane_")]
    if "kept_n" in metrics:
        rows += [(f"kept (n={metrics['kept_n']})", "kept_")]
    for label, prefix in rows:
        values = (metrics.get(f"{prefix}{stat}_deg") for stat in ("median", "mean", "p90"))
        lines.append(f"{label:<20}" + "".join(cell(value) for value in values))
    if metrics.get("outlier_auroc") is not None:
        lines.append(f"outlier AUROC ({metrics['metric']}): {metrics['outlier_auroc']:.3f}")
    if "threshold" in metrics:
        text = f"threshold {metrics['threshold']:.4g}: kept {100 * metrics['kept_fraction']:.1f} %"
        if metrics.get("outliers_rejected_fraction") is not None:
            text += f", outliers rejected {100 * metrics['outliers_rejected_fraction']:.1f} %"
        if metrics.get("inliers_kept_fraction") is not None:
            text += f", inliers kept {100 * metrics['inliers_kept_fraction']:.1f} %"
        lines.append(text)
    lines += [f"note: {note}" for note in metrics["notes"]]
    return lines


def main(args: argparse.Namespace) -> int:
    from cryo_forum.analysis.evaluate import METRICS_NAME, PARTICLES_NAME, PLOT_NAMES, evaluate, write_report
    from cryo_forum.geometry import normalise_symmetry_name
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.particles import ParticleSet

    try:
        symmetry = normalise_symmetry_name(args.symmetry)
    except ValueError as error:
        raise CryoForumError(f"--symmetry: {error}") from None
    args.metric = resolve_metric(args)
    threshold = resolve_threshold(args)
    pred = ParticleSet.open(args.pred)
    truth = ParticleSet.open(args.truth)
    guard = OutputGuard().protect_particles(pred).protect_particles(truth).protect(args.model, "a file of the run")
    guard.check_folder(args.out, produces=(METRICS_NAME, PARTICLES_NAME, *PLOT_NAMES.values()))
    evaluation = evaluate(pred, truth, symmetry=symmetry, align=args.align, metric=args.metric, threshold=threshold)
    paths = write_report(evaluation, args.out, inputs=(args.pred, args.truth))
    print("\n".join(summary_lines(evaluation.metrics)))
    width = max(len(name) for name in paths) + 1
    print("\n".join(f"{name + ':':<{width}} {path}" for name, path in paths.items()))
    return 0
