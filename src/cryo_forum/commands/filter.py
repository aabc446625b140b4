"""Keep the particles whose predicted pose is certain enough; list the others beside them.

Reads a STAR file written by `cryo-forum predict` and keeps the particles whose uncertainty score is at most
a threshold. The threshold is --threshold X, or comes from the run's calibration (RUN/calibration.json,
made from its validation predictions): the score that keeps the fraction --quantile Q of the calibration
set, or its recommended threshold. It is never computed from the set being filtered.

Metrics (larger = less certain): junk_score (the expected error against that of particles of the same view, a
directional z-score; the default of runs that have it), expected_error_deg (degrees), dispersion_trace,
max_dispersion, negative_eigengap. Writes OUT with every block and column of the input (optics intact) for the kept
particles, and OUT's name with .rejected.star (kept.star -> kept.rejected.star) for the others; both appear
together or not at all. Examples:
  cryo-forum filter --star predicted.star --out kept.star --model run1
  cryo-forum filter --star predicted.star --out kept.star --model run1 --quantile 0.7
  cryo-forum filter --star predicted.star --out kept.star --threshold 15
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryo_forum.errors import CryoForumError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--star", type=Path, required=True, help="predictions (STAR from cryo-forum predict)")
    parser.add_argument("--out", type=Path, required=True, help="STAR file for the kept particles")
    parser.add_argument("--metric", help="uncertainty score (default: the calibration's, else expected_error_deg)")
    parser.add_argument(
        "--model", type=Path, metavar="RUN", help="run folder whose calibration.json gives the threshold"
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--quantile", type=float, metavar="Q", help="keep this fraction of the calibration set")
    choice.add_argument("--threshold", type=float, metavar="X", help="keep particles scoring at most X")


def rejected_path(out: Path) -> Path:
    """Where the rejected particles go: kept.star -> kept.rejected.star."""
    return out.with_name(f"{out.stem if out.suffix == '.star' else out.name}.rejected.star")


def choose_threshold(args: argparse.Namespace) -> tuple[str, float, str, dict | None]:
    """(metric, threshold, where the threshold came from, calibration or None) from the options alone."""
    from cryo_forum.prediction.calibration import check_metric, threshold_for
    from cryo_forum.prediction.uncertainty import DEFAULT_METRIC
    from cryo_forum.training.run import Run

    if args.quantile is not None and args.model is None:
        raise CryoForumError(
            "--quantile: needs --model RUN, whose calibration (made on its validation predictions) turns it into "
            "a threshold; quantiles are never taken on the set being filtered"
        )
    if args.threshold is None and args.model is None:
        raise CryoForumError("--threshold: give --threshold X, or --model RUN to use the run's calibrated threshold")
    if args.threshold is not None and not np.isfinite(args.threshold):
        raise CryoForumError(f"--threshold {args.threshold}: must be a finite number")
    run = Run(args.model) if args.model is not None else None
    calibration = run.load_calibration() if run is not None else None
    metric = args.metric or (calibration["default_metric"] if calibration else DEFAULT_METRIC)
    check_metric(metric)
    if args.threshold is not None:
        return metric, float(args.threshold), "--threshold", calibration
    threshold = threshold_for(calibration, metric, args.quantile)
    where = f"the calibration of {run.path} ({calibration['n']} calibration particles"
    if args.quantile is None:
        where += f", recommended: keeps {calibration['metrics'][metric]['recommended']['keep_fraction']:.0%} of them)"
    else:
        where += f", quantile {args.quantile:g})"
    return metric, threshold, where, calibration


def main(args: argparse.Namespace) -> int:
    from cryo_forum.io.atomic import atomic_output
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.prediction.calibration import calibration_fraction_below, scores_from_table

    rejected_out = rejected_path(args.out)
    particles = ParticleSet.open(args.star)
    guard = OutputGuard().protect_particles(particles).protect(args.model, "a file of the run")
    guard.check_file(args.out)
    guard.check_file(rejected_out)
    metric, threshold, where, calibration = choose_threshold(args)
    scores = scores_from_table(particles.table, metric, source=str(args.star), calibration=calibration)
    keep = scores <= threshold  # NaN scores (no uncertainty) are rejected
    unscored = int(np.sum(np.isnan(scores)))
    with atomic_output(rejected_out) as rejected_tmp, atomic_output(args.out) as kept_tmp:
        particles.write_star(kept_tmp, keep=keep)
        particles.write_star(rejected_tmp, keep=~keep)
    kept = int(keep.sum())
    fraction = f" ({kept / len(particles):.1%})" if len(particles) else ""
    print(f"kept {kept} of {len(particles)} particles{fraction} with {metric} <= {threshold:.6g} -> {args.out}")
    print(f"threshold from {where}")
    if calibration is not None and args.threshold is not None and metric in calibration["metrics"]:
        below = calibration_fraction_below(calibration, metric, threshold)
        print(f"(that threshold keeps about {below:.0%} of the run's calibration set)")
    print(
        f"rejected {len(particles) - kept} -> {rejected_out}" + (f" ({unscored} without a score)" if unscored else "")
    )
    return 0
